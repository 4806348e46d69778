"""A bounded on-disk journal of events that ZooKeeper could not take yet (quorum lost), replayed in order.

Why on disk and not in memory: a quorum loss often comes with trouble on this node too, and a coordinator
restarted by Pacemaker must not forget the registrations it accepted. Format: append-only JSON lines, one
event per line (``Event.to_json()``), so an operator can read it with ``jq``. Bounded (``max_bytes``): when
full, :class:`JournalFull` is raised and the caller counts the dropped events (the periodic ``ul.dump``
reconciliation repairs them later) instead of filling the disk.

Order: while the journal holds anything, *every* new event goes to the journal too, and the journal is
replayed before anything newer is written; otherwise a REGISTER refresh could overtake an older
un-REGISTER. Replay is safe to repeat (the store's writes are idempotent), so a crash in the middle of a
replay just replays again; the file is emptied only after the store accepted every event in it.

fsync policy: ``always`` (each append is on disk before the proxy's next event is read: slowest, nothing
lost on power loss), ``interval`` (at most every ``fsync_interval_s``; default), ``never`` (page cache only;
a coordinator crash loses nothing, a kernel crash may).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ha.coordinator.events import Event, EventError, from_dict
from ha.coordinator.store import StaleEpoch, Store, StoreUnavailable, WriteResult

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "interval", "never"]


class JournalFull(Exception):
    """The journal reached its size bound; the events were not buffered."""


class Journal:
    """Append-only JSON-lines file with a size bound; one writer (the coordinator's write loop)."""

    def __init__(
        self,
        path: str | Path,
        max_bytes: int = 64 * 1024 * 1024,
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 0.2,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("ab")
        self._size = self._f.seek(0, os.SEEK_END)
        self._last_sync = time.monotonic()

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        """Events buffered (reads the file: for tests and status, not the hot path)."""
        return sum(1 for _ in self._lines())

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, events: Sequence[Event]) -> None:
        """Buffer events in order, all or none (a batch never half fits)."""
        blob = b"".join(json.dumps(ev.to_json(), separators=(",", ":")).encode() + b"\n" for ev in events)
        if self._size + len(blob) > self.max_bytes:
            raise JournalFull(
                f"journal {self.path} would grow to {self._size + len(blob)} bytes > {self.max_bytes}: "
                f"{len(events)} events not buffered"
            )
        self._f.write(blob)
        self._f.flush()
        self._size += len(blob)
        if self.fsync == "always" or (
            self.fsync == "interval" and time.monotonic() - self._last_sync >= self.fsync_interval_s
        ):
            self.sync()

    def sync(self) -> None:
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def _lines(self) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            yield from f

    def read(self) -> Iterator[Event]:
        """The buffered events, oldest first. A torn last line (crash mid-append) is skipped and logged."""
        for n, line in enumerate(self._lines(), 1):
            if not line.endswith(b"\n"):
                log.warning("journal %s: torn last line %d skipped (crash while appending)", self.path, n)
                return
            try:
                yield from_dict(json.loads(line))
            except (ValueError, EventError) as exc:
                log.error("journal %s: line %d unreadable, skipped: %s", self.path, n, exc)

    def clear(self) -> None:
        """Empty the journal (after a successful replay), durably."""
        self._f.truncate(0)
        self._f.seek(0)
        self._size = 0
        self.sync()

    def close(self) -> None:
        self._f.close()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one write call did, in words the service logs."""

    written: int
    journaled: int
    replayed: int
    message: str


class BufferedWriter:
    """Store writes that fall back to the journal while ZooKeeper has no quorum, and catch up in order.

    StaleEpoch is never absorbed: a fenced writer must stop (its journal stays on disk for an operator).
    """

    def __init__(self, store: Store, journal: Journal, replay_batch: int = 2000) -> None:
        self.store = store
        self.journal = journal
        self.replay_batch = replay_batch

    def write(self, events: Sequence[Event]) -> Outcome:
        """Write events, or journal them; raises JournalFull (events dropped, to be counted) or StaleEpoch."""
        replayed = 0
        if self.journal:
            try:
                replayed = self.replay()
            except StoreUnavailable:
                self.journal.append(events)
                return Outcome(0, len(events), 0, f"zookeeper unavailable: journaled {len(events)} events")
        if not self.store.available:
            self.journal.append(events)
            return Outcome(0, len(events), replayed, f"zookeeper not connected: journaled {len(events)} events")
        try:
            self.store.write(events)
        except StoreUnavailable as exc:
            self.journal.append(events)
            return Outcome(0, len(events), replayed, f"zookeeper write failed ({exc}): journaled {len(events)}")
        msg = f"wrote {len(events)} events" + (f" after replaying {replayed} from the journal" if replayed else "")
        return Outcome(len(events), 0, replayed, msg)

    def replay(self) -> int:
        """Write every journaled event in order, then empty the journal; returns how many were replayed."""
        if not self.journal:
            return 0
        if not self.store.available:
            raise StoreUnavailable("zookeeper not connected")
        total = 0
        batch: list[Event] = []
        for ev in self.journal.read():
            batch.append(ev)
            if len(batch) >= self.replay_batch:
                total += self._write(batch)
                batch = []
        if batch:
            total += self._write(batch)
        self.journal.clear()
        log.info("journal replayed: %d events written to zookeeper", total)
        return total

    def _write(self, batch: list[Event]) -> int:
        result: WriteResult = self.store.write(batch)
        return result.events


__all__ = ["BufferedWriter", "FsyncPolicy", "Journal", "JournalFull", "Outcome", "StaleEpoch"]
