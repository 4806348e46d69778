"""The proxy's preload table kept current in memory as the store's changes arrive, so a proxy start only copies it.

Why: writing 100k rows when the proxy agent asks (:func:`ha.coordinator.materialize.write`) took 0.6 s on a
quiet machine and 2.7 s on this 2-core one under load, most of a restart's budget. Kept up to date on the
watch thread instead (a few microseconds per change, ~1 s once per full resync, after the proxy has been
served), the table is copied with SQLite's online backup when the agent asks: tens of milliseconds.

Same schema and row format as :mod:`ha.coordinator.materialize` (the ruid carries the binding's mzxid); one
extra unique index on (username, contact) for the in-place updates, harmless to usrloc. Expired rows are
dropped from the copy, not from the live table (they go when the store's GC deletes them).
"""

from __future__ import annotations

import json
import logging
import marshal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ha.coordinator import materialize
from ha.coordinator.gcpause import gc_paused
from ha.coordinator.marshalchunks import dump_chunks, load_chunks
from ha.coordinator.materialize import Manifest, MaterializeError, Written

log = logging.getLogger(__name__)

_UPSERT = materialize._INSERT.replace("INSERT INTO", "INSERT OR REPLACE INTO")
_DELETE = "DELETE FROM location WHERE username=? AND contact=?"
KEYS_CHUNK = 5000  # keys per marshal chunk of the node cache's blob (~2.5 ms each)


class LiveTable:
    """Thread-safe: changes come from the watch thread, copies are asked for from the service's loop."""

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._db.executescript(materialize.SCHEMA + "CREATE UNIQUE INDEX sipha_key ON location (username, contact);")
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str], tuple[int, int]] = {}  # (aor, contact) -> (mzxid, expires_at)
        self._n = 0  # ruid counter: unique across the table's life
        self.complete = False  # holds a whole resync plus every change since

    def apply(self, puts: Iterable[Any], deletes: Iterable[Any], resync: bool) -> None:
        """Puts and deletes (ContactRecord-like) from one batch of the watch; a resync replaces everything."""
        now = time.time()
        rows: list[tuple[Any, ...]] = []
        with self._lock:
            with gc_paused():
                if resync:
                    self._db.execute("DELETE FROM location")
                    self._keys.clear()
                for r in puts:
                    self._n += 1
                    rows.append(materialize.row(r, self._n, now))
                    self._keys[(r.aor, r.contact)] = (int(getattr(r, "mzxid", 0)), r.expires_at)
                gone = [(r.aor, r.contact) for r in deletes]
                for k in gone:
                    self._keys.pop(k, None)
                self._db.execute("BEGIN")
                if gone:
                    self._db.executemany(_DELETE, gone)
                self._db.executemany(_UPSERT, rows)
                self._db.execute("COMMIT")
            if resync:
                self.complete = True

    def invalidate(self) -> None:
        """The view it follows is no longer complete (a lost connection): no copies until the next resync."""
        self.complete = False

    def copy_to(self, path: str | Path, meta: dict[str, Any], with_keys: bool = False,
                pause: Callable[[], None] | None = None) -> Written:
        """Write the current table to ``path`` (atomically), without expired rows; raises MaterializeError.

        ``with_keys``: also store {(aor, contact): (mzxid, expires_at)} of the rows, taken with them, as one
        marshal blob in ``sipha_keys`` (:func:`read_keys`), so whoever hands the file to a proxy later has its
        manifest without reading 100k rows back (the node cache). ``pause``: called between the blob's chunks."""
        t0 = time.monotonic()
        now = time.time()
        path = Path(path)
        # Only the table's image and a copy of its keys are taken under the lock: the watch thread's apply waits for
        # it, and an online backup into the file with the manifest built under it stalled the standby's passes for
        # up to ~0.3 s under load in the node cache's saves (see ha.coordinator.nodecache.CHUNK_ROWS).
        with self._lock:
            if not self.complete:
                raise MaterializeError("no complete view of the store yet")
            image = self._db.serialize()  # one copy of the in-memory pages
            all_keys = dict(self._keys)
        keys = all_keys if with_keys else None
        loaded = {k: z for k, (z, exp) in all_keys.items() if exp > now}
        total = len(all_keys)
        with materialize.atomic_sqlite(path, image=image) as dst:
            dst.execute("DELETE FROM location WHERE expires <= ?", (materialize._datetime(now),))
            m = {**meta, "written_at": now, "bindings": len(loaded)}
            dst.executemany("INSERT INTO sipha_meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in m.items()])
            if keys is not None:
                dst.execute("CREATE TABLE sipha_keys (blob BLOB NOT NULL)")
                dst.execute("INSERT INTO sipha_keys VALUES (?)", (_pack_keys(keys, pause),))
        return Written(str(path), len(loaded), total - len(loaded), time.monotonic() - t0, Manifest(loaded, m))


def keys_blob(db: sqlite3.Connection) -> bytes | None:
    """The keys :meth:`LiveTable.copy_to` stored with ``with_keys`` (for :func:`read_keys`); None: none stored."""
    try:
        row = db.execute("SELECT blob FROM sipha_keys").fetchone()
    except sqlite3.OperationalError:  # no such table: written without keys
        return None
    return None if row is None else bytes(row[0])


def _pack_keys(keys: dict[tuple[str, str], tuple[int, int]], pause: Callable[[], None] | None) -> bytes:
    """The sizes of the chunks, then the chunks: one marshal call for 100k keys held the GIL for ~50 ms, a stall
    of the watch thread in every node cache save."""
    chunks = dump_chunks(list(keys.items()), KEYS_CHUNK, dict, pause)
    return b"".join([marshal.dumps([len(c) for c in chunks]), *chunks])


def read_keys(blob: bytes | None) -> dict[tuple[str, str], tuple[int, int]] | None:
    """{(aor, contact): (mzxid, expires_at)} from :func:`keys_blob`'s bytes; None when there are none."""
    if blob is None:
        return None
    head = marshal.loads(blob)  # noqa: S302 - our own root-only file; never run
    if isinstance(head, dict):
        return head  # written in one piece (before stop 19)
    if not isinstance(head, list):
        return None
    keys: dict[tuple[str, str], tuple[int, int]] = {}
    for chunk in load_chunks(blob, head):
        keys.update(chunk)
    return keys


__all__ = ["LiveTable", "keys_blob", "read_keys"]
