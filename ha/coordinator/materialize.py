"""Restart fast path: the store's bindings written into the SQLite ``location`` table Kamailio loads at start.

Why: a restarted proxy starts with an empty table, and pushing 100k bindings into it one ``ul.add`` at a time
is bounded by Kamailio's single RPC worker (~15k/s pipelined, ~7 s for 100k). usrloc's ``db_mode`` 4
("load records from the database at startup, use only memory at runtime, never write back", usrloc 5.6
README 3.27) reads a local table before the SIP workers fork, at C speed, and keeps what ``ul.add`` cannot
carry (the received address of a NATed phone, the local socket, Call-ID, CSeq, User-Agent). Live changes
still go through the RPC path (:mod:`ha.coordinator.replicator`); nothing is ever written back.

Who writes the file: the proxy agent's start (``ocf:sipha:proxy``) runs ``python -m
ha.coordinator.materialize`` just before it starts Kamailio; if ZooKeeper cannot be read in time it writes an
empty table (:func:`write_empty`, standard library only, so the agent can do it itself) and the coordinator's
RPC resync loads everything as before. Kamailio refuses to start without the table, so it always exists.

The window between the snapshot and the proxy's start: every row's ``ruid`` carries the ZooKeeper ``mzxid``
of the binding it was written from (``sipha-<mzxid hex>-<n>``), and ``sipha_meta`` says when and for which
cluster the file was written (a second table of keys cost ~30 % more write time). When the
coordinator sees a proxy that booted from this file (:func:`manifest_for_boot`), its resync skips bindings
whose ``mzxid`` is unchanged, ``ul.add``\\ s the ones that changed or appeared since, and ``ul.rm_contact``\\ s
the ones deleted since; readiness waits for that, as for a full resync.

Schema: Kamailio 5.6's own (``/usr/share/kamailio/db_sqlite/usrloc-create.sql``, ``location`` version 9).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ha.coordinator.gcpause import gc_paused

log = logging.getLogger(__name__)

DB_NAME = "usrloc.sqlite"  # in the proxy's run dir, beside its RPC socket
DEFAULT_DB = f"/run/sipha/{DB_NAME}"
LOCATION_VERSION = 9  # usrloc 5.6 checks it at start (version_table); SCHEMA below carries it
BOOT_WINDOW_S = 120  # a proxy that booted this long after the file was written did not start from it

SCHEMA = """
CREATE TABLE version (
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_table_name_idx UNIQUE (table_name)
);
INSERT INTO version (table_name, table_version) VALUES ('version', '1');
CREATE TABLE location (
    id INTEGER PRIMARY KEY NOT NULL,
    ruid VARCHAR(64) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT NULL,
    contact VARCHAR(512) DEFAULT '' NOT NULL,
    received VARCHAR(128) DEFAULT NULL,
    path VARCHAR(512) DEFAULT NULL,
    expires TIMESTAMP WITHOUT TIME ZONE DEFAULT '2030-05-28 21:32:15' NOT NULL,
    q REAL DEFAULT 1.0 NOT NULL,
    callid VARCHAR(255) DEFAULT 'Default-Call-ID' NOT NULL,
    cseq INTEGER DEFAULT 1 NOT NULL,
    last_modified TIMESTAMP WITHOUT TIME ZONE DEFAULT '2000-01-01 00:00:01' NOT NULL,
    flags INTEGER DEFAULT 0 NOT NULL,
    cflags INTEGER DEFAULT 0 NOT NULL,
    user_agent VARCHAR(255) DEFAULT '' NOT NULL,
    socket VARCHAR(64) DEFAULT NULL,
    methods INTEGER DEFAULT NULL,
    instance VARCHAR(255) DEFAULT NULL,
    reg_id INTEGER DEFAULT 0 NOT NULL,
    server_id INTEGER DEFAULT 0 NOT NULL,
    connection_id INTEGER DEFAULT 0 NOT NULL,
    keepalive INTEGER DEFAULT 0 NOT NULL,
    partition INTEGER DEFAULT 0 NOT NULL
);
INSERT INTO version (table_name, table_version) VALUES ('location', '9');
CREATE TABLE location_attrs (
    id INTEGER PRIMARY KEY NOT NULL,
    ruid VARCHAR(64) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT NULL,
    aname VARCHAR(64) DEFAULT '' NOT NULL,
    atype INTEGER DEFAULT 0 NOT NULL,
    avalue VARCHAR(512) DEFAULT '' NOT NULL,
    last_modified TIMESTAMP WITHOUT TIME ZONE DEFAULT '2000-01-01 00:00:01' NOT NULL
);
INSERT INTO version (table_name, table_version) VALUES ('location_attrs', '1');
CREATE TABLE sipha_meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
"""
# No index on location: usrloc reads it once, in full; an index would only slow the write down.

_INSERT = (
    "INSERT INTO location (ruid, username, contact, received, path, expires, q, callid, cseq, last_modified, "
    "flags, cflags, user_agent, socket, methods) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


class MaterializeError(Exception):
    """The file could not be written (disk, permissions) or read back."""


def received_uri(received: str) -> str | None:
    """Events carry ``proto:ip:port``; usrloc keeps a SIP URI (``sip:ip:port;transport=tcp``), as nathelper's
    ``fix_nated_register`` writes it. None when there is nothing usable."""
    proto, sep, hostport = received.partition(":")
    if not sep or not hostport:
        return None
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    uri = f"sip:{host}:{port}"
    return uri if proto.lower() == "udp" else f"{uri};transport={proto.lower()}"


def _datetime(t: float) -> float:
    """A DATETIME as Kamailio's db_sqlite reads it: a Julian day number (REAL), no time zone involved.

    Measured: text ("2026-11-24 22:12:41") is read as the number 2026 and lands in 1962, so every binding
    loaded expired. The half second keeps the driver's truncation from losing a second."""
    return (t + 0.5) / 86400 + 2440587.5


@dataclass(frozen=True, slots=True)
class Written:
    path: str
    bindings: int
    expired: int
    write_s: float
    manifest: Manifest | None = None  # what was written, so the writer need not read it back


def row(r: Any, n: int, now: float) -> tuple[Any, ...]:
    """One ``location`` row (the _INSERT columns) for a ContactRecord-like ``r``; ``n`` makes the ruid unique."""
    return (
        f"sipha-{int(getattr(r, 'mzxid', 0)):x}-{n}",
        r.aor,
        r.contact,
        received_uri(r.received) if r.received else None,
        r.path or None,
        _datetime(r.expires_at),
        r.q / 1000 if r.q >= 0 else -1.0,
        r.callid or "sipha-preload",
        r.cseq or 1,
        _datetime(now),
        r.flags,
        r.cflags,
        r.user_agent,
        r.socket or None,
        None if r.methods < 0 else r.methods,
    )


def _rows(records: Iterable[Any], now: float) -> tuple[list[tuple[Any, ...]], dict[tuple[str, str], int], int]:
    rows: list[tuple[Any, ...]] = []
    loaded: dict[tuple[str, str], int] = {}
    expired = 0
    for i, r in enumerate(records):
        if r.expires_at <= now:
            expired += 1
            continue
        loaded[(r.aor, r.contact)] = int(getattr(r, "mzxid", 0))
        rows.append(row(r, i, now))
    return rows, loaded, expired


def write(path: str | Path, records: Iterable[Any], meta: Mapping[str, Any] | None = None,
          now: float | None = None) -> Written:
    """Write a fresh database of ``records`` (ContactRecord-like) at ``path``, atomically (rename).

    Expired records are left out. ``meta`` goes to ``sipha_meta`` beside ``written_at`` (epoch seconds).
    """
    t0 = time.monotonic()
    now = time.time() if now is None else now
    path = Path(path)
    with gc_paused():  # 100k row tuples beside a big live heap: the cyclic collector alone cost ~30 % here
        return _write(path, records, meta, now, t0)


@contextlib.contextmanager
def atomic_sqlite(path: Path, copy_of: Path | None = None, image: bytes | None = None) -> Iterator[sqlite3.Connection]:
    """A SQLite file written beside ``path`` and renamed over it only when complete, so Kamailio never loads a
    half-written table; any failure removes the temp file and is raised as a MaterializeError. ``copy_of``: start
    from a copy of that file (the kernel copies it: no pages through SQLite, no GIL); ``image``: from these bytes
    (a database's ``serialize()``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        if copy_of is not None:
            shutil.copyfile(copy_of, tmp)
        elif image is not None:
            tmp.write_bytes(image)
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            yield db
        finally:
            db.close()
        os.chmod(tmp, 0o644)
        tmp.replace(path)
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise MaterializeError(f"cannot write {path}: {exc}") from exc
    except MaterializeError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write(path: Path, records: Iterable[Any], meta: Mapping[str, Any] | None, now: float, t0: float) -> Written:
    rows, loaded, expired = _rows(records, now)
    with atomic_sqlite(path) as db:
        db.execute("PRAGMA journal_mode=OFF")  # a half-written temp file is simply thrown away
        db.execute("PRAGMA synchronous=OFF")  # /run is tmpfs; nothing to wait for
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        db.executemany(_INSERT, rows)
        m: dict[str, Any] = {**(meta or {}), "written_at": now, "bindings": len(rows)}
        db.executemany("INSERT INTO sipha_meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in m.items()])
        db.execute("COMMIT")
    return Written(str(path), len(rows), expired, time.monotonic() - t0, Manifest(loaded, m))


def write_empty(path: str | Path, why: str) -> Written:
    """A table with no bindings, so Kamailio starts; the coordinator's resync then loads everything."""
    return write(path, (), {"empty": why})


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a proxy loaded at start: {(aor, contact): mzxid} and the file's metadata."""

    loaded: dict[tuple[str, str], int]
    meta: dict[str, Any]

    @property
    def written_at(self) -> float:
        return float(self.meta.get("written_at", 0))


def read_manifest(path: str | Path, known: Manifest | None = None) -> Manifest:
    """Raises MaterializeError when the file is missing or is not one of ours. ``known``: the manifest of a
    file this process wrote; returned as it is when the file is still that one (same ``written_at``)."""
    p = Path(path)
    if not p.is_file():
        raise MaterializeError(f"{p}: no such file")
    try:
        db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM sipha_meta")}
            if known is not None and known.meta.get("written_at") == meta.get("written_at"):
                return known
            loaded = {(a, c): int(r.split("-")[1], 16)
                      for a, c, r in db.execute("SELECT username, contact, ruid FROM location")}
        finally:
            db.close()
    except (sqlite3.Error, ValueError, IndexError) as exc:
        raise MaterializeError(f"{p}: not a sipha usrloc file: {exc}") from exc
    return Manifest(loaded, meta)


def manifest_for_boot(path: str | Path, boot: int | None, cluster: str | None = None,
                      slack_s: int = 2, known: Manifest | None = None) -> Manifest | None:
    """The manifest if the proxy that booted at ``boot`` (epoch s, whole seconds) started from this file.

    The file is rewritten at every start, just before Kamailio starts, so it was written at most a start
    timeout before the boot and never after it. Anything else (no file, another cluster's, a proxy started
    without the agent) is None: the proxy's table is then treated as empty and fully resynced.
    """
    if boot is None:
        return None
    try:
        m = read_manifest(path, known)
    except MaterializeError as exc:
        log.info("no preload manifest usable (%s): full resync", exc)
        return None
    if cluster is not None and m.meta.get("cluster") not in (None, cluster):
        log.warning("%s was written for cluster %r, not %r: ignored", path, m.meta.get("cluster"), cluster)
        return None
    if not m.written_at - slack_s <= boot + slack_s or boot - m.written_at > BOOT_WINDOW_S:
        log.info("%s (written %.0f) is not what the proxy booted at %s from: full resync", path, m.written_at, boot)
        return None
    return m


def from_store(store: Any, path: str | Path, cluster: str, node: str) -> Written:
    """Snapshot the store (multiRead) and write it; raises StoreUnavailable / MaterializeError."""
    t0 = time.monotonic()
    snap = store.snapshot()
    t_read = time.monotonic() - t0
    w = write(path, snap.contacts, {"cluster": cluster, "node": node, "epoch": snap.epoch,
                                    "read_ms": round(t_read * 1000)})
    return w


def _unread(out: str, why: str) -> int:
    w = write_empty(out, why)
    log.warning("%s: wrote an empty %s (the coordinator resyncs the proxy over RPC)", why, out)
    print(json.dumps({"bindings": 0, "path": w.path, "empty": why}))
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ha.coordinator.materialize",
                                description="Write the store's bindings into the SQLite table Kamailio preloads.")
    p.add_argument("--config", default="/etc/sipha/cluster.yaml", help="cluster.yaml (ZooKeeper members)")
    p.add_argument("--node", default=os.uname().nodename.split(".")[0])
    p.add_argument("--out", default=DEFAULT_DB, help=f"the database file (default {DEFAULT_DB})")
    p.add_argument("--zk-hosts", help="ZooKeeper connect string; overrides the model's members")
    p.add_argument("--timeout", type=float, default=5.0, help="give up on ZooKeeper after this many seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s sipha-materialize[%(process)d] %(levelname)s %(message)s")
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    t0 = time.monotonic()
    from kazoo.exceptions import NoAuthError

    from ha import model
    from ha.coordinator import zkauth
    from ha.coordinator.store import StoreUnavailable, ZkStore
    from ha.coordinator.zkhandler import new_client

    try:
        cluster = model.load(args.config)
    except model.ModelError as exc:
        print(f"materialize: {exc}", file=sys.stderr)
        return 2
    z = cluster.zookeeper
    hosts = args.zk_hosts or ",".join(f"{h.ip}:{z.client_port}" for h in cluster.zk_members)
    try:
        auth = zkauth.client_kwargs(z)
    except zkauth.ZkAuthError as exc:
        return _unread(args.out, f"zookeeper not read: {exc}")
    client = new_client(hosts, timeout=max(args.timeout, 1.0), connection_retry={"max_tries": 0}, **auth)
    try:
        try:
            client.start(timeout=min(args.timeout, 2.0))  # unreachable: give up early, the proxy is waiting
            store = ZkStore(client, cluster.name, args.node, op_timeout_s=args.timeout)
            w = from_store(store, args.out, cluster.name, args.node)
        except (StoreUnavailable, MaterializeError, client.handler.timeout_exception) as exc:
            return _unread(args.out, f"zookeeper not read: {exc}")
        except NoAuthError:
            return _unread(args.out, "zookeeper not read: not allowed (zookeeper.auth_file is not the credential "
                                     "that wrote the store)")
    finally:
        with contextlib.suppress(Exception):
            client.stop()
            client.close()
    took = time.monotonic() - t0
    log.info("wrote %d bindings (%d expired left out) to %s in %.0f ms (sqlite %.0f ms)", w.bindings, w.expired,
             w.path, took * 1000, w.write_s * 1000)
    print(json.dumps({"bindings": w.bindings, "path": w.path, "ms": round(took * 1000)}))  # for the proxy agent
    return 0


if __name__ == "__main__":
    sys.exit(main())
