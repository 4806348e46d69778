"""What a node keeps on its own disk so that its next start does not wait for a whole read of ZooKeeper.

Why: restarting a whole node with 100k bindings took 6.1 s to readiness (BENCHMARKS.md, "Restart resync"):
the starting coordinator had nothing to give the proxy until it had read every binding (0.5 s), decoded them
(0.9-1.5 s) and built the preload table (~1 s); only then could Kamailio load it (0.6-1 s). With this cache:

* ``usrloc.sqlite``: a copy of the live preload table (:class:`ha.coordinator.livetable.LiveTable`), handed to
  the starting proxy at once (:meth:`NodeCache.to_preload`), so Kamailio loads while the coordinator reads.
  Every row's ruid carries the mzxid it was written from, so the resync that follows pushes only what changed
  while the node was away and removes what was deleted meanwhile (as for any preload).
* ``view.marshal``: the watch's decoded records, handed to its first full read (``ZkStore.view_seed``), which
  reuses a record whose mzxid is the znode's instead of decoding it again.

Both are caches in the strict sense: an mzxid names exactly one write, so a stale, partial or missing file
costs pushes and decodes, never correctness; an unreadable one is ignored (logged). They are written every
:data:`SAVE_EVERY_S` while the view changes, off the service's loop, and once more at a clean stop.
``marshal``, not pickle: 10x faster for 100k records (0.05 s to load; the records, 0.19 s, are built only after
readiness: see store.Change), and it cannot run code; the header carries the format, the cluster, the store's
identity and the record's fields, and a file that does not match them is ignored (an upgrade that changes the
record only costs the decodes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ha.coordinator import materialize
from ha.coordinator.gcpause import gc_paused
from ha.coordinator.livetable import keys_blob, read_keys
from ha.coordinator.marshalchunks import dump_chunks, load_chunks
from ha.coordinator.materialize import Manifest, MaterializeError, Written
from ha.coordinator.store import RECORD_FIELDS, ContactRecord

log = logging.getLogger(__name__)

FORMAT = 3  # 2: the header names the store (its identity: see ZkStore.identity); 3: the rows in chunks
SAVE_EVERY_S = 60.0
# A background save builds and packs the rows this many at a time, and pauses YIELD_S between chunks. Why: built in
# one go (0.25 s of the GIL per 100k records on a quiet machine, one marshal call of 80 ms of it), a save stalled
# the watch's pass and the proxy's pushes on this node: the replication bench's slowest markers at 1000/s came
# together, in the second of a save (BENCHMARKS.md, "Replication lag", stop 19).
CHUNK_ROWS = 500
YIELD_S = 0.002
# While the store changes faster than this (changes/s its watch saw over ~10 s), a due save waits, at most
# SAVE_MAX_DEFER_S. Why: chunked or not, a save of 25k records is 0.5-0.8 s of a busy coordinator's GIL, and both
# nodes' saves came due in the same second (their starts 60 s before): the replication bench's slowest markers at
# 1000/s twice lined up with them (BENCHMARKS.md, stop 20). Bounded at one more interval: a big cluster changes
# faster than this all day (1M phones re-registering hourly: ~280/s), and every minute the cache is older costs a
# restarting node the decoding of what changed in it (17k bindings at that rate, ~0.4 s).
SAVE_BUSY_PER_S = 200.0
SAVE_MAX_DEFER_S = 60.0
VIEW_NAME = "view.marshal"
TABLE_NAME = "usrloc.sqlite"


class NodeCache:
    """One node's cache directory (beside the coordinator's journal, on disk: it must outlive a reboot)."""

    def __init__(self, directory: str | Path, cluster: str, store_id: Callable[[], str | None]) -> None:
        self.dir = Path(directory)
        self.cluster = cluster
        # The store's identity now (ZkStore.identity; None until known): what the cache was taken from, and what
        # it may be used with. zxids start again in a rebuilt ensemble, so the same path and mzxid in another
        # store can be another write.
        self.store_id = store_id
        self.view_path = self.dir / VIEW_NAME
        self.table_path = self.dir / TABLE_NAME
        self._saving: threading.Thread | None = None
        self._saved_mark: object = None
        self._next_save = time.monotonic() + SAVE_EVERY_S
        self._deferred_since: float | None = None
        self.saves = 0
        self.last_save_s: float | None = None

    # -- the decoded view -------------------------------------------------------------------------------

    def load_view(self) -> dict[str, tuple[Any, ...]]:
        """The cached records by znode path, as rows (the path, then the record's fields: ``record_from_row``);
        {} when there is no usable file (logged, never raised). Rows, not records: the first read needs only the
        mzxids of the 98k that did not change, and builds their records after readiness (store.Change)."""
        t0 = time.monotonic()
        try:
            raw = self.view_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("node cache: %s unreadable (%s): decoding everything", self.view_path, exc)
            return {}
        try:
            with gc_paused():  # 100k new tuples: the collector would walk the growing heap again and again
                fmt, cluster, store, fields, sizes = marshal.loads(raw)  # noqa: S302 - our own root-only file
                if (fmt, cluster, tuple(fields)) != (FORMAT, self.cluster, RECORD_FIELDS):
                    log.info("node cache: %s is for another cluster or format: ignored", self.view_path)
                    return {}
                if store is None or store != self.store_id():
                    log.warning("node cache: %s was taken from another ZooKeeper store (%s, this one is %s): "
                                "ignored", self.view_path, store, self.store_id())
                    return {}
                width = len(RECORD_FIELDS) + 1
                out = {}
                for rows in load_chunks(raw, sizes):
                    out.update({row[0]: row for row in rows if type(row) is tuple and len(row) == width})
        except (ValueError, TypeError, EOFError, IndexError) as exc:
            log.warning("node cache: %s is not a usable cache (%s): decoding everything", self.view_path, exc)
            return {}
        log.info("node cache: %d cached records loaded in %.0f ms", len(out), (time.monotonic() - t0) * 1000)
        return out

    def _save_view(self, view: Mapping[str, ContactRecord], store: str, pause: Callable[[], None] | None) -> None:
        """The header (with each chunk's size), then the rows in chunks (``pause`` between them: see CHUNK_ROWS)."""
        chunks = dump_chunks(list(view.items()), CHUNK_ROWS, _rows, pause)
        head = marshal.dumps((FORMAT, self.cluster, store, RECORD_FIELDS, [len(c) for c in chunks]))
        _atomic_write(self.view_path, b"".join([head, *chunks]))

    # -- the proxy's preload table ------------------------------------------------------------------------

    def to_preload(self, dst: str | Path, meta: Mapping[str, Any]) -> tuple[Written, Callable[[], Manifest | None]]:
        """Copy the cached table to ``dst`` for a starting proxy, as if written now: expired rows dropped, the
        metadata ``meta`` + ``written_at`` (the agent's boot check) + ``cached_at``. Raises MaterializeError.

        Also returns how to get the copy's manifest from the keys stored with the table (None: read it back from
        the rows): ~0.1 s for 100k, for the caller to run while the proxy loads, not before it may start."""
        t0 = time.monotonic()
        now = time.time()
        if not self.table_path.is_file():
            raise MaterializeError(f"{self.table_path}: no cached table")
        with materialize.atomic_sqlite(Path(dst), copy_of=self.table_path) as out:
            try:
                old = {k: json.loads(v) for k, v in out.execute("SELECT key, value FROM sipha_meta")}
            except (sqlite3.Error, ValueError) as exc:
                raise MaterializeError(f"{self.table_path}: not a sipha table: {exc}") from exc
            if old.get("cluster") != self.cluster:
                raise MaterializeError(f"{self.table_path} holds cluster {old.get('cluster')!r}'s table")
            blob = keys_blob(out)
            expired = out.execute("DELETE FROM location WHERE expires <= ?", (materialize._datetime(now),)).rowcount
            n = out.execute("SELECT count(*) FROM location").fetchone()[0]
            m = {**meta, "written_at": now, "bindings": n, "cached_at": old.get("written_at"),
                 "store": old.get("store")}
            out.execute("DELETE FROM sipha_meta")
            out.execute("DROP TABLE IF EXISTS sipha_keys")
            out.executemany("INSERT INTO sipha_meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in m.items()])

        def manifest() -> Manifest | None:
            try:
                keys = read_keys(blob)
            except (ValueError, TypeError, EOFError):
                return None  # then the manifest is read back from the rows
            if keys is None:
                return None
            loaded = {k: z for k, (z, exp) in keys.items() if exp > now}
            return Manifest(loaded, m) if len(loaded) == n else None  # else not the rows it was taken with

        return Written(str(dst), n, expired, time.monotonic() - t0), manifest

    # -- saving --------------------------------------------------------------------------------------------

    def save(self, view: Mapping[str, ContactRecord], live: Any, mark: object = None,
             pause: Callable[[], None] | None = None) -> float:
        """Write both files now (the caller's thread); returns the seconds it took. ``live``: the LiveTable, or
        None (then only the view is written and an older table is removed: it would be older than the view).
        ``pause``: called between chunks of the view (a background save: see CHUNK_ROWS); None: no pauses."""
        t0 = time.monotonic()
        store = self.store_id()
        if store is None:
            raise ValueError("the store's identity is not known yet")
        self.dir.mkdir(parents=True, exist_ok=True)
        with gc_paused():
            self._save_view(view, store, pause)
        if live is not None and live.complete:
            live.copy_to(self.table_path, {"cluster": self.cluster, "source": "node cache", "store": store},
                         with_keys=True, pause=pause)
        else:
            self.table_path.unlink(missing_ok=True)
        self._saved_mark = mark
        self.saves += 1
        self.last_save_s = time.monotonic() - t0
        return self.last_save_s

    def maybe_save(self, view_fn: Any, live: Any, mark: object, now: float, busy_per_s: float = 0.0) -> str | None:
        """From the service's loop: start a save on a thread of its own when one is due and the view changed
        since the last (``mark``: anything that changes with it). ``view_fn``: the complete view, or None.
        ``busy_per_s``: how fast the store changes now (see SAVE_BUSY_PER_S); says so when a save starts waiting."""
        if self._saving is not None and self._saving.is_alive():
            return None
        if now < self._next_save or mark == self._saved_mark or (live is not None and not live.complete):
            return None  # an incomplete live table is being rebuilt (~1 s): the next tick will do
        if busy_per_s > SAVE_BUSY_PER_S:
            if self._deferred_since is None:
                self._deferred_since = now
                return (f"node cache save deferred: the store changes {busy_per_s:.0f} times/s (up to "
                        f"{SAVE_MAX_DEFER_S:.0f} s)")
            if now - self._deferred_since < SAVE_MAX_DEFER_S:
                return None
        self._deferred_since = None
        view = view_fn()
        if view is None:
            return None
        self._next_save = now + SAVE_EVERY_S

        def run() -> None:
            saved, said = self._try_save(view, live, mark, pause=lambda: time.sleep(YIELD_S))
            (log.info if saved else log.warning)("%s", said)

        self._saving = threading.Thread(target=run, name="sipha-node-cache", daemon=True)
        self._saving.start()
        return None

    def save_at_exit(self, view_fn: Any, live: Any, mark: object,
                     complete: Callable[[], bool] = lambda: True) -> str | None:
        """A clean stop: wait for a save in flight, then write once more if the view changed since. ``complete``:
        whether the view is (a resync just delivered completes it after the live table: store._settle)."""
        if self._saving is not None:
            self._saving.join(30)
        deadline = time.monotonic() + 10  # a live table still being rebuilt after a resync: worth a short wait
        while ((live is not None and not live.complete) or not complete()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if mark == self._saved_mark:
            return None
        view = view_fn()
        return None if view is None else f"at exit: {self._try_save(view, live, mark)[1]}"

    def _try_save(self, view: Mapping[str, ContactRecord], live: Any, mark: object,
                  pause: Callable[[], None] | None = None) -> tuple[bool, str]:
        """:meth:`save`, never raising: (saved, the sentence to log)."""
        table = " and the preload table" if live is not None and live.complete else ""
        try:
            took = self.save(view, live, mark, pause)
        except (OSError, MaterializeError, ValueError) as exc:
            return False, f"node cache not saved: {exc}"
        return True, f"node cache: {len(view)} records{table} saved in {took * 1000:.0f} ms"


def view_rows(view: Mapping[str, ContactRecord]) -> list[tuple[Any, ...]]:
    """The rows the cached view is stored as (and ``load_view`` gives back, by path)."""
    return _rows(view.items())


def _rows(items: Iterable[tuple[str, ContactRecord]]) -> list[tuple[Any, ...]]:
    return [(p, *(getattr(r, f) for f in RECORD_FIELDS)) for p, r in items]


def preloaded_from(m: Manifest, store: str | None) -> dict[tuple[str, str], int]:
    """What a proxy that booted from ``m`` holds, as the resync may trust it in the store ``store``: a table
    taken from another store (a node cache from before the ensemble was rebuilt) holds the same keys, but its
    mzxids say nothing here, so none of them matches (every binding is pushed, every extra one removed)."""
    taken = m.meta.get("store")
    if taken is None or taken == store:  # None: written from this coordinator's view of the store it watches
        return m.loaded
    log.warning("the proxy preloaded a table taken from another ZooKeeper store (%s, this one is %s): every "
                "binding is pushed again", taken, store)
    return dict.fromkeys(m.loaded, -1)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


__all__ = ["SAVE_EVERY_S", "NodeCache", "preloaded_from", "view_rows"]
