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
from collections.abc import Iterator


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


__all__ = ["gc_paused"]
