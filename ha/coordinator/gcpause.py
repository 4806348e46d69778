"""The cyclic garbage collector paused around a bulk build of objects that hold no reference cycles.

Why: the coordinator's big steps (a full read of 100k bindings, a resync's changes, the preload tables, the node
cache) each make hundreds of thousands of tuples and records beside a live heap of the same size, and every
collection those allocations trigger walks the whole heap: 20-30 % of such a step on this machine. Nothing they
make is cyclic, so reference counting frees it all anyway.

The switch is process-wide (``gc.disable``): a pause that finds the collector already off leaves it off, and the
one that turned it off turns it back on, so overlapping pauses on several threads end with it on.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def gc_paused(when: bool = True) -> Iterator[None]:
    """Collector off for the block (only ``when``: callers pause for big batches only)."""
    was = gc.isenabled()
    if when:
        gc.disable()
    try:
        yield
    finally:
        if when and was:
            gc.enable()


class FullCollections:
    """Counts the collector's full (oldest-generation) collections and their longest, between two ``take()``s.

    Why: a full collection walks every tracked object, and a coordinator holding 100k records stops all its threads
    for it (~30 ms on a quiet machine for the records alone); the service's summary says how many and how long,
    so a lag tail that lines up with them shows."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._n = 0
        self._longest = 0.0
        self._lock = threading.Lock()

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t0 = time.monotonic()
        elif self._t0:
            took, self._t0 = time.monotonic() - self._t0, 0.0
            with self._lock:
                self._n += 1
                self._longest = max(self._longest, took)

    def take(self) -> tuple[int, float]:
        """(full collections, the longest in seconds) since the last call."""
        with self._lock:
            out, self._n, self._longest = (self._n, self._longest), 0, 0.0
        return out


class Freezer:
    """Moves what survived so far out of the collector's sight (``gc.freeze``), often, and back now and then.

    Why: a coordinator's heap is mostly its view of the store (a record per binding) and things like it, long
    lived and free of cycles; every full collection walked all of them, stopping every thread of the process for
    96-180 ms at 25k bindings under load (the summary's "garbage collector" lines), which was where the replication
    bench's slowest markers came from. Frozen objects are still freed by reference counting; a full collection then
    walks only what was made since the last freeze (:data:`FREEZE_EVERY_S` of changes). The price: garbage *cycles*
    among frozen objects wait for the next thaw (:data:`THAW_EVERY_S`), which hands everything back to the
    collector, and its next full collection, the one long one per thaw interval."""

    def __init__(self, freeze_every_s: float, thaw_every_s: float, now: float) -> None:
        self.freeze_every_s = freeze_every_s
        self.thaw_every_s = thaw_every_s
        self._next_freeze = now + freeze_every_s
        self._next_thaw = now + thaw_every_s
        self.freezes = 0
        self.thaws = 0

    def tick(self, now: float) -> None:
        if now >= self._next_thaw:
            gc.unfreeze()
            self.thaws += 1
            self._next_thaw = now + self.thaw_every_s
            self._next_freeze = now + self.freeze_every_s  # the next full collection sees everything once
        elif now >= self._next_freeze:
            gc.freeze()
            self.freezes += 1
            self._next_freeze = now + self.freeze_every_s

    def stop(self) -> None:
        gc.unfreeze()


__all__ = ["Freezer", "FullCollections", "gc_paused"]
