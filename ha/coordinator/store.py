"""The replicated state store: one abstract :class:`Store`, one ZooKeeper (kazoo) implementation.

Shaped after Patroni's ``dcs``: callers see frozen records and a frozen :class:`ClusterState`, never znodes.

ZooKeeper layout, all under ``/sipha/<cluster>``::

    epoch                          {"epoch": N, "node": "node2", "ts_ms": ...}; N == the znode's version.
                                   Bumped (versioned set) by every takeover.
    contacts/<bb>/<aor>,<ch>       one binding (JSON, ContactRecord): aor, contact, expires_at, q, path,
                                   received, socket, callid, cseq, user_agent, flags, cflags, methods,
                                   node + epoch + seq of the writer, ts_ms
    dialogs/<bb>/<callid>,<fh>     one live dialog (JSON, DialogRecord): both tags, URIs, both route sets,
                                   contacts, created_ms, start_ts (answer), state, writer node + epoch
    cdrs/cdr-<seq10>               one finished call (JSON, CdrRecord), sequential znodes
    gone/<bb>/<aor>,<ch>           a tombstone: the last un-REGISTER of a binding, {"ts_ms", "node", "epoch"};
                                   kept TOMB_KEEP_S, so a fenced writer's older REGISTER cannot bring it back
    gc/                            lock: the one node that deletes expired contacts

``<bb>`` is a 2-hex-digit bucket (first byte of sha1 of the AoR / Call-ID): 256 buckets keep every
children list short (100k AoRs -> ~400 per bucket, far below the 1 MB packet limit) and let a resync list
them in parallel; there is no per-AoR parent znode to create or clean up. ``<aor>``/``<callid>`` are
percent-escaped (``/`` and ``,`` never appear raw), ``<ch>`` is 16 hex digits of sha1(contact URI) and
``<fh>`` 8 hex digits of sha1(from-tag).

Writes are batched in ``transaction()``s of up to :data:`BATCH_OPS` operations whose first operation is a
``check`` of the epoch znode's version against the writer's epoch: after a takeover bumped the epoch, an
old (fenced or partitioned) active's batch fails as a whole, and :class:`StaleEpoch` tells it to stop.
Batches are pipelined (``commit_async``), since one round trip per batch is what limits throughput.

Writes are idempotent (a put carries the whole record, a delete of a missing znode is dropped), so a batch
whose outcome is unknown (connection lost while committing) may simply be written again; that is what
makes the journal's replay safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from kazoo.client import KazooClient, TransactionRequest
from kazoo.exceptions import (
    EXCEPTIONS,
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    RolledBackError,
    SessionExpiredError,
    UnimplementedError,
)
from kazoo.protocol.serialization import Transaction as _Transaction
from kazoo.protocol.serialization import Watch as _WatchEvent
from kazoo.protocol.serialization import int_struct, multiheader_struct, read_buffer, read_string, stat_struct
from kazoo.protocol.states import KazooState, ZnodeStat
from kazoo.security import OPEN_ACL_UNSAFE

from ha.coordinator import zkauth
from ha.coordinator.events import ContactEvent, DialogEvent, Event
from ha.coordinator.gcpause import gc_paused

log = logging.getLogger(__name__)

READ_OPS = 200  # reads per multiRead request (~80 KB replies for bindings; far below the 1 MB limit)
BATCH_OPS = 100  # ops per transaction, the check op included (measured: ~4.4k znodes/s on 3 members)
BUCKETS = 256
OWN_DELETES_KEPT = 200_000  # bindings this node deleted whose watch event has not come yet (ZkStore._deleting)
OWN_DELETE_MEMORY_S = 120.0  # how long such an entry waits for its event (the watch runs seconds behind at most)
# How long an un-REGISTER's tombstone is kept (gone/): longer than a fenced old active's last events can take to
# arrive (seconds after a takeover; a journal replayed after a ZooKeeper outage); an older late event may bring a
# binding back, as before tombstones
TOMB_KEEP_S = 3600
_SAFE = "@+-._~:;=!$&'()*"  # kept raw in znode names; everything else (/ , % space ...) is escaped


class StoreError(Exception):
    """Base of the store's errors."""


class StaleEpoch(StoreError):
    """This writer's epoch is older than the cluster's: another node took over. Stop writing."""


def _ts_of(data: bytes) -> int:
    """A stored record's or tombstone's ``ts_ms``; 0 when unreadable (then whatever is written replaces it)."""
    try:
        return int(json.loads(data).get("ts_ms", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


class StoreUnavailable(StoreError):
    """ZooKeeper cannot be written now (no quorum, no connection): buffer and retry later."""


def _bucket(key: str) -> str:
    return hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:2]


def _h(value: str, n: int) -> str:
    return hashlib.sha1(value.encode(), usedforsecurity=False).hexdigest()[:n]


def contact_name(aor: str, contact: str) -> tuple[str, str]:
    """(bucket, znode name) of one binding."""
    return _bucket(aor), f"{quote(aor, safe=_SAFE)},{_h(contact, 16)}"


def dialog_name(callid: str, from_tag: str) -> tuple[str, str]:
    return _bucket(callid), f"{quote(callid, safe=_SAFE)},{_h(from_tag, 8)}"


def aor_of(name: str) -> str:
    """The AoR from a contact znode name (peers learn deletions by path only)."""
    return unquote(name.rsplit(",", 1)[0])


@dataclass(frozen=True, slots=True)
class ContactRecord:
    aor: str
    contact: str
    expires_at: int  # epoch seconds
    q: int = -1  # q x 1000, -1: none
    path: str = ""
    received: str = ""
    socket: str = ""
    callid: str = ""
    cseq: int = 0
    user_agent: str = ""
    flags: int = 0
    cflags: int = 0
    methods: int = -1
    node: str = ""  # writer
    epoch: int = 0  # writer's epoch
    seq: int = 0  # writer proxy's event seq
    ts_ms: int = 0
    version: int = field(default=-1, compare=False)  # znode version when read; -1 when not read
    # ZooKeeper zxid of the znode's last change when read (0: not read). Unlike the version it never repeats
    # (a binding deleted and created again restarts at version 0): it says "exactly this write" to the
    # restart fast path (ha.coordinator.materialize), which compares what a proxy preloaded with the store.
    mzxid: int = field(default=0, compare=False)

    @classmethod
    def from_event(cls, ev: ContactEvent, epoch: int) -> ContactRecord:
        return cls(
            aor=ev.aor,
            contact=ev.contact,
            expires_at=ev.expires_at,
            q=ev.q,
            path=ev.path,
            received=ev.received,
            socket=ev.socket,
            callid=ev.callid,
            cseq=ev.cseq,
            user_agent=ev.user_agent,
            flags=ev.flags,
            cflags=ev.cflags,
            methods=ev.methods,
            node=ev.node,
            epoch=epoch,
            seq=ev.seq,
            ts_ms=ev.ts,
        )

    @property
    def name(self) -> tuple[str, str]:
        return contact_name(self.aor, self.contact)


@dataclass(frozen=True, slots=True)
class DialogRecord:
    callid: str
    from_tag: str
    to_tag: str = ""
    from_uri: str = ""
    to_uri: str = ""
    from_rs: str = ""
    to_rs: str = ""
    from_contact: str = ""
    to_contact: str = ""
    created_ms: int = 0
    start_ts: int = 0  # answered at (epoch s), 0 if never
    state: int = 0
    node: str = ""
    epoch: int = 0
    ts_ms: int = 0
    version: int = field(default=-1, compare=False)

    @classmethod
    def from_event(cls, ev: DialogEvent, epoch: int) -> DialogRecord:
        return cls(
            callid=ev.callid,
            from_tag=ev.from_tag,
            to_tag=ev.to_tag,
            from_uri=ev.from_uri,
            to_uri=ev.to_uri,
            from_rs=ev.from_rs,
            to_rs=ev.to_rs,
            from_contact=ev.from_contact,
            to_contact=ev.to_contact,
            created_ms=ev.created_ms,
            start_ts=ev.start_ts,
            state=ev.state,
            node=ev.node,
            epoch=epoch,
            ts_ms=ev.ts,
        )


@dataclass(frozen=True, slots=True)
class CdrRecord:
    callid: str
    from_tag: str
    to_tag: str
    from_uri: str
    to_uri: str
    created_ms: int
    start_ts: int
    end_ms: int
    reason: str  # end | failed | timeout
    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ClusterState:
    """Everything a resync needs, read in one pass (not one ZooKeeper transaction: records are independent)."""

    epoch: int
    contacts: tuple[ContactRecord, ...]
    dialogs: tuple[DialogRecord, ...]


@dataclass(frozen=True, slots=True)
class WriteResult:
    events: int
    ops: int
    transactions: int
    retries: int  # batches re-sent after fixing an op (create of an existing znode, ...)


@dataclass(slots=True)
class LateResult:
    """What :meth:`ZkStore.write_before_takeover` did with a fenced writer's events."""

    written: int = 0  # bindings written (created, updated or deleted)
    newer: int = 0  # left alone: the store already held something newer (or nothing to delete)
    fenced: int = 0  # events from after the takeover: not this node's to write any more
    conflicts: int = 0  # still racing a concurrent writer after every round (left to reconciliation)
    dialogs: int = 0  # dialog records written or removed (their CDRs too)
    unregistered: int = 0  # left alone: the binding was un-REGISTERed after the event (its tombstone)

    def __str__(self) -> str:
        return (f"{self.written} bindings written, {self.newer} left to newer data, "
                + (f"{self.unregistered} left un-registered, " if self.unregistered else "")
                + f"{self.dialogs} dialog records, {self.fenced} events from after the takeover not written"
                + (f", {self.conflicts} still conflicting" if self.conflicts else ""))


RECORD_FIELDS = tuple(ContactRecord.__dataclass_fields__)  # all of them, in order: version and mzxid last
assert RECORD_FIELDS[:2] == ("aor", "contact") and RECORD_FIELDS[-1] == "mzxid"  # what a row's places mean


def _row_maker() -> Callable[[Sequence[Any]], ContactRecord]:
    """``row -> ContactRecord(*row[1:])`` (a row: the path, then every field in :data:`RECORD_FIELDS` order) that
    sets the slots through their descriptors. Why: the frozen dataclass's ``__init__`` goes through
    ``object.__setattr__`` for each of 19 fields, 0.29 s for 100k records; this takes 0.19 s. Generated like
    dataclasses' own methods."""
    names = [f"v{i}" for i in range(len(RECORD_FIELDS))]
    body = [f"def make(row):\n    _, {', '.join(names)} = row\n    obj = new(cls)\n"]
    body += [f"    s{i}(obj, v{i})\n" for i in range(len(RECORD_FIELDS))]
    body.append("    return obj\n")
    env: dict[str, Any] = {"new": object.__new__, "cls": ContactRecord}
    env.update({f"s{i}": getattr(ContactRecord, f).__set__ for i, f in enumerate(RECORD_FIELDS)})
    exec("".join(body), env)  # noqa: S102 - fixed text built from the record's own field names
    return env["make"]  # type: ignore[no-any-return]


record_from_row = _row_maker()
# A record's read-only fields, set on a record this node wrote once its transaction's reply tells them (_OwnTxn).
_set_version = ContactRecord.version.__set__  # type: ignore[attr-defined]
_set_mzxid = ContactRecord.mzxid.__set__  # type: ignore[attr-defined]
# What a read may take as already decoded, by path: records, or node cache rows (see ZkStore._read_records).
_Known = Mapping[str, "ContactRecord | tuple[Any, ...]"]


class Change:
    """One binding as a watcher saw it change. ``resync``: part of a full read (start, session lost).

    Not a frozen dataclass: a node start makes 100k of them on its way to readiness, and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__`` (0.11 s per 100k here). A change may also carry
    a node cache row (``row``) instead of a record, built only when ``record`` is first asked for: a node start's
    readiness needs only the key and mzxid of the bindings that did not change while it was away (98k of 100k),
    and building their records before it cost 0.2-0.6 s of the GIL beside the store read (see _ZkContactWatch).
    Nobody changes one."""

    __slots__ = ("_record", "_row", "by_self", "kind", "replay", "resync")

    def __init__(self, kind: str, record: ContactRecord | None = None, resync: bool = False, replay: bool = False,
                 by_self: bool = False, *, row: Sequence[Any] | None = None) -> None:
        if (record is None) == (row is None):
            raise ValueError("a change carries a record or a node cache row")
        self.kind = kind  # put | delete
        self._record = record
        self._row = row
        self.resync = resync
        self.replay = replay  # part of a replay of the watch's own view (Watch.replay): nothing changed in the store
        self.by_self = by_self  # a delete this node wrote (ZkStore tells; see ZkStore._deleting)

    @property
    def record(self) -> ContactRecord:
        rec = self._record
        if rec is None:
            rec = self._record = record_from_row(self._row)  # type: ignore[arg-type]
            self._row = None
        return rec

    @property
    def key(self) -> tuple[str, str]:
        """(aor, contact), without building a record."""
        row = self._row
        return (row[1], row[2]) if row is not None else (self._record.aor, self._record.contact)  # type: ignore[union-attr]

    @property
    def mzxid(self) -> int:
        row = self._row
        return row[-1] if row is not None else self._record.mzxid  # type: ignore[no-any-return,union-attr]

    def _fields(self) -> tuple[Any, ...]:
        return (self.kind, self.record, self.resync, self.replay, self.by_self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Change) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Change({self.kind!r}, {self.record!r}, resync={self.resync}, replay={self.replay}, "
                f"by_self={self.by_self})")


class Watch(ABC):
    received = 0  # change notifications received so far (see _ZkContactWatch)
    own_unread = 0  # this node's writes the view took from their replies, not from reads (see _ZkContactWatch)
    processed = 0  # of those, how many were delivered to on_changes

    @abstractmethod
    def stop(self) -> None:
        """Stop delivering changes."""

    def replay(self) -> bool:
        """Deliver every binding of the current view again, as a resync, without reading the store (a restarted
        local proxy needs them; the view is kept current by the watch). True too when there is no complete view
        but a full read is under way or queued (it delivers everything as a resync). False: neither."""
        return False

    def refetch(self, paths: Iterable[str]) -> None:
        """Read these bindings again and deliver what they are now (a put, or a delete when gone): for an audit
        that found the view disagreeing with the store on them. A watch without a view of its own ignores it."""
        return None

    def records(self) -> dict[str, ContactRecord] | None:
        """A copy of the complete current view (path -> record), None while there is none (before the first
        resync, after a lost connection until the next one)."""
        return None

    @property
    def complete(self) -> bool:
        """Whether the view is the whole store (see records)."""
        return False


_READ_ONLY = ("version", "mzxid")  # known from the znode's stat when read, never stored in its data


_STORED_FIELDS: dict[type, tuple[str, ...]] = {}


def _encode(rec: Any) -> bytes:
    """The record's stored fields as compact JSON. Not ``dataclasses.asdict``: its recursive deep copy was a third
    of the active coordinator's CPU per REGISTER (records hold only str and int fields)."""
    names = _STORED_FIELDS.get(type(rec))
    if names is None:
        names = _STORED_FIELDS[type(rec)] = tuple(f for f in rec.__dataclass_fields__ if f not in _READ_ONLY)
    return json.dumps({k: getattr(rec, k) for k in names}, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class _Layout:
    """How a record class is stored: its stored fields in order, and its read-only fields when they all come
    last (then a record written by :func:`_encode` is rebuilt positionally)."""

    known: frozenset[str]
    stored: tuple[str, ...]
    tail: tuple[str, ...] | None


_LAYOUTS: dict[type, _Layout] = {}


def _layout(cls: type[Any]) -> _Layout:
    lay = _LAYOUTS.get(cls)
    if lay is None:
        fields = tuple(cls.__dataclass_fields__)
        stored = tuple(f for f in fields if f not in _READ_ONLY)
        ro = fields[len(stored):]
        lay = _LAYOUTS[cls] = _Layout(frozenset(fields), stored, ro if fields[: len(stored)] == stored else None)
    return lay


def _decode(cls: type[Any], data: bytes, version: int, mzxid: int = 0) -> Any:
    """Why the positional path: a full read decodes every binding (100k in a node start's resync), and
    keyword construction with per-key filtering cost as much as ``json.loads`` itself (1.37 s -> ~0.8 s)."""
    d = json.loads(data)
    if not isinstance(d, dict):
        raise TypeError(f"a record is a JSON object, not {type(d).__name__}")
    lay = _layout(cls)
    if lay.tail is not None and tuple(d) == lay.stored:
        if lay.tail == _READ_ONLY:
            return cls(*d.values(), version, mzxid)
        return cls(*d.values(), *({"version": version, "mzxid": mzxid}[f] for f in lay.tail))
    kw = {k: v for k, v in d.items() if k in lay.known and k not in _READ_ONLY}
    if "version" in lay.known:
        kw["version"] = version
    if "mzxid" in lay.known:
        kw["mzxid"] = mzxid
    return cls(**kw)


class Store(ABC):
    """What the coordinator needs from a consistent store; the service codes against this only."""

    node: str
    epoch: int

    @abstractmethod
    def current_epoch(self) -> int:
        """The cluster's epoch as stored now."""

    @abstractmethod
    def bump_epoch(self) -> int:
        """Takeover: a new epoch, owned by this node; every older writer is fenced from now on."""

    @abstractmethod
    def adopt_epoch(self) -> int:
        """Write at the current epoch without bumping it (only for the node Pacemaker made active)."""

    @abstractmethod
    def write(self, events: Sequence[Event]) -> WriteResult:
        """Apply events in order; raises StaleEpoch (stop writing) or StoreUnavailable (buffer, retry)."""

    @abstractmethod
    def snapshot(self) -> ClusterState:
        """The whole replicated state, for a resync of a (re)started proxy."""

    @abstractmethod
    def cdrs(self) -> tuple[CdrRecord, ...]:
        """Every stored CDR, oldest first."""

    @abstractmethod
    def gc_expired(self, now: float | None = None, grace_s: int = 30,
                   view: Mapping[str, ContactRecord] | None = None) -> int:
        """If this node holds the GC lock, delete bindings expired for more than grace_s; returns the count.
        ``view``: the watch's complete view (path -> record), to find candidates in without reading the store."""

    @property
    @abstractmethod
    def available(self) -> bool:
        """Whether a write may be attempted now (connected to a member that serves)."""

    tracks_own_deletes = False  # whether its watch marks this node's own deletes (Change.by_self; ZkStore does)

    @abstractmethod
    def watch_contacts(self, on_changes: Callable[[list[Change]], None]) -> Watch:
        """Deliver every binding once (resync), then every change, in batches, from one thread."""


_GET_DATA, _GET_CHILDREN = 4, 8  # ZooKeeper opcodes
_OP_HEAD = struct.Struct(">ibii")  # a multi op's header (type, done, err) and the int after it (a length)
_LEAN_STAT = struct.Struct(">8xq16xi")  # of a znode's stat: mzxid (after czxid), version (after ctime, mtime)
_DELETED_EVENT = 2  # ZooKeeper watch event type NodeDeleted
SLOW_PASS_S = 1.0  # a watch pass longer than this is logged with its split (read / apply)


class _MultiRead:
    """ZooKeeper's ``multiRead`` request (opcode 22, server >= 3.6): many getData/getChildren in one packet.

    Why: a full-state read is otherwise one request per binding, and kazoo spends ~120 us of Python per
    request, so 10k bindings took ~1.5 s. Shaped like kazoo's own request classes (``type``, ``serialize``,
    ``deserialize``); it sets no watches.
    """

    type = 22

    def __init__(self, ops: Sequence[tuple[int, str]], lean: bool = False) -> None:
        self.ops = ops
        # getData results as (data, version, mzxid) instead of (data, ZnodeStat): 0.33-0.43 s instead of
        # 0.56-0.89 s for 100k bindings (bench/coordinator_read_profile.py): a reader that compares mzxids
        self.lean = lean

    def serialize(self) -> bytearray:
        # Each op: its header and the path's length in one pack, the path, the watch flag (none). A node start
        # sends 100k of them: ~0.05 s of the GIL this way, ~0.1 s one field at a time.
        pack = _OP_HEAD.pack
        parts = [pack(op, False, -1, len(raw)) + raw + b"\x00" for op, raw in ((op, p.encode()) for op, p in self.ops)]
        parts.append(multiheader_struct.pack(-1, True, -1))
        return bytearray(b"".join(parts))

    def deserialize(self, buf: bytes, offset: int) -> list[Any]:
        results: list[Any] = []
        if self.lean:
            offset = self._lean_data(buf, offset, results)
        while True:
            op, done, _err = multiheader_struct.unpack_from(buf, offset)
            offset += multiheader_struct.size
            if done:
                return results
            if op == _GET_DATA:
                data, offset = read_buffer(buf, offset)
                if self.lean:
                    mzxid, version = _LEAN_STAT.unpack_from(buf, offset)
                    results.append((data, version, mzxid))
                else:
                    results.append((data, ZnodeStat._make(stat_struct.unpack_from(buf, offset))))
                offset += stat_struct.size
            elif op == _GET_CHILDREN:
                count = int_struct.unpack_from(buf, offset)[0]
                offset += int_struct.size
                children = []
                for _ in range(max(count, 0)):
                    child, offset = read_string(buf, offset)
                    children.append(child)
                results.append(children)
            elif op == -1:
                code = int_struct.unpack_from(buf, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[code]())
            else:
                raise ValueError(f"multiRead: unexpected op {op} in the reply")

    @staticmethod
    def _lean_data(buf: bytes, offset: int, results: list[Any]) -> int:
        """The leading getData results, lean, with one unpack for each one's header and data length (half the
        general loop's time: 100k of them at a node start, on kazoo's reader thread); returns where the first
        other result (or the end) begins, for the general loop."""
        head, stat, append = _OP_HEAD.unpack_from, _LEAN_STAT.unpack_from, results.append
        end = len(buf) - _OP_HEAD.size
        while offset <= end:
            op, done, _err, n = head(buf, offset)
            if done or op != _GET_DATA or n < 0:
                break
            start = offset + _OP_HEAD.size
            offset = start + n
            mzxid, version = stat(buf, offset)
            append((buf[start:offset], version, mzxid))
            offset += stat_struct.size
        return offset


# A binding this node wrote, as its own watch learns it from the write's reply: (path, record, znode version).
OwnWrite = tuple[str, "ContactRecord", int]


class _OwnTxn(_Transaction):
    """kazoo's multi request, whose reply also tells this node's contact watch which bindings it wrote, with the
    transaction's zxid, so the watch need not read them back (_ZkContactWatch, "own").

    Why the reply's parse: it runs on kazoo's connection thread, in the order of the connection's stream, and
    ZooKeeper sends a session the watch events of a transaction before its reply. So when it runs, the watch
    has queued every event of this transaction and none of a later one: whatever it queues now sits right after
    them. A failed transaction changed nothing and reports nothing."""

    def __new__(cls, operations: list[Any], client: KazooClient, own: list[tuple[int, str, ContactRecord]],
                sink: Callable[[list[OwnWrite], int], None]) -> _OwnTxn:
        self = super().__new__(cls, operations)
        self._client, self._own, self._sink = client, own, sink  # type: ignore[attr-defined]
        return self

    def deserialize(self, buf: bytes, offset: int) -> list[Any]:  # type: ignore[override]
        results: list[Any] = _Transaction.deserialize(buf, offset)
        try:
            self._report(results, self._client.last_zxid)  # type: ignore[attr-defined]
        except Exception:  # never into kazoo's connection thread; the watch then reads them back
            log.exception("zookeeper: own writes not reported to the watch")
        return results

    def _report(self, results: list[Any], zxid: int) -> None:
        if zxid <= 0 or any(isinstance(r, Exception) for r in results):
            return
        out: list[OwnWrite] = []
        for j, path, rec in self._own:  # type: ignore[attr-defined]
            r = results[j]
            if isinstance(r, ZnodeStat):
                if r.mzxid != zxid:
                    return  # the reply's zxid is not this transaction's: trust none of it (read back instead)
                out.append((path, rec, r.version))
            else:
                out.append((path, rec, 0))  # created
        self._sink(out, zxid)  # type: ignore[attr-defined]


@dataclass
class _Intent:
    """One znode change derived from an event; re-derivable into ops after a failed batch."""

    kind: str  # put | delete | cdr
    path: str
    data: bytes = b""
    rec: ContactRecord | None = None  # a binding's put: the record encoded in data (see _OwnTxn)


class ZkStore(Store):
    """The kazoo implementation. One instance per coordinator process; thread-safe for one writer thread."""

    tracks_own_deletes = True

    def __init__(
        self,
        client: KazooClient,
        cluster: str,
        node: str,
        *,
        batch_ops: int = BATCH_OPS,
        op_timeout_s: float = 5.0,
        reader: KazooClient | None = None,
    ) -> None:
        self.client = client
        # Whole-store reads (reconciliation, the standby audit, GC) go through their own connection when given:
        # ZooKeeper answers one connection's requests in order, and a 50k-binding read (~250 multiReads, 20 MB)
        # queued the active's writes behind it for ~9 s in the replication bench.
        self.reader = reader
        self.node = node
        self.root = f"/sipha/{cluster}"
        self.epoch_path = f"{self.root}/epoch"
        self.epoch = -1
        self.batch_ops = batch_ops
        self.op_timeout_s = op_timeout_s
        self._known: set[str] | None = None  # paths this writer believes exist (None: not loaded yet)
        self._own_deletes: dict[str, tuple[int, float]] = {}  # path -> (deletes sent, last when); see _deleting
        self._own_lock = threading.Lock()
        self._gc_lock = client.Lock(f"{self.root}/gc", node)
        self._write_lock = threading.Lock()
        self._multiread = True
        # This node's contact watch, told of the bindings this node writes (see _OwnTxn); None: no watch.
        self.own_sink: Callable[[list[OwnWrite], int], None] | None = None
        # Records decoded by an earlier run of this node (ha.coordinator.nodecache), asked for once by the
        # contact watch's first full read, so a node start decodes only what changed while it was away.
        # Rows, not records (see Change): path -> (path, *the record's fields in RECORD_FIELDS order).
        self.view_seed: Callable[[], Mapping[str, tuple[Any, ...]]] | None = None
        # Which store this is, beyond its name: the root znode's creation (czxid, ctime), known after
        # ensure_layout. A rebuilt ensemble numbers its zxids from the start again, so an mzxid read from another
        # store can name another write: caches keyed by mzxid must come from this one (ha.coordinator.nodecache).
        self.identity: str | None = None

    # -- layout and epoch --------------------------------------------------------------------------------

    def contact_path(self, aor: str, contact: str) -> str:
        b, n = contact_name(aor, contact)
        return f"{self.root}/contacts/{b}/{n}"

    def tomb_path(self, aor: str, contact: str) -> str:
        b, n = contact_name(aor, contact)
        return f"{self.root}/gone/{b}/{n}"

    def _tomb_data(self, ev: ContactEvent) -> bytes:
        return json.dumps({"ts_ms": ev.ts, "node": ev.node, "epoch": self.epoch}, separators=(",", ":")).encode()

    def _tomb_of(self, path: str) -> str:
        """The tombstone's path of a binding's path."""
        return f"{self.root}/gone/{path[len(self.root) + len('/contacts/'):]}"

    def dialog_path(self, callid: str, from_tag: str) -> str:
        b, n = dialog_name(callid, from_tag)
        return f"{self.root}/dialogs/{b}/{n}"

    def _buckets(self, kind: str) -> list[str]:
        return [f"{self.root}/{kind}/{b:02x}" for b in range(BUCKETS)]

    def ensure_layout(self) -> None:
        """Create the root, epoch and buckets if missing; safe to run on every node at every start."""
        acl = self.client.default_acl  # zookeeper.auth_file set: this identity's (ha.coordinator.zkauth)
        try:
            if acl:
                self.client.ensure_path(self.root.rsplit("/", 1)[0], acl=OPEN_ACL_UNSAFE)  # shared: see zkauth
            for p in (f"{self.root}/contacts", f"{self.root}/dialogs", f"{self.root}/cdrs", f"{self.root}/gone"):
                self.client.ensure_path(p)
            root = self.client.exists(self.root)
            if root is not None:  # created just above if it was not there
                self.identity = f"{root.czxid:x}-{root.ctime}"
            if not self.client.exists(self.epoch_path):
                with contextlib.suppress(NodeExistsError):
                    self.client.create(self.epoch_path, json.dumps({"epoch": 0, "node": "", "ts_ms": 0}).encode())
            for kind in ("contacts", "dialogs", "gone"):
                have = set(self.client.get_children(f"{self.root}/{kind}"))
                missing = [p for p in self._buckets(kind) if p.rsplit("/", 1)[1] not in have]
                asyncs = [self.client.create_async(p) for p in missing]
                for a in asyncs:
                    with contextlib.suppress(NodeExistsError):
                        a.get(timeout=self.op_timeout_s)
            if acl and not zkauth.same_acl(self.client.get_acls(self.root)[0], acl):
                t0 = time.monotonic()
                n = zkauth.secure_tree(self.client, self.root, acl, timeout=self.op_timeout_s)
                log.warning("zookeeper: %d znodes under %s written before zookeeper.auth_file was set are closed to "
                            "other identities now (%.1f s)", n, self.root, time.monotonic() - t0)
        except self._unavailable_errors() as exc:
            raise StoreUnavailable(f"cannot create the layout: {exc!r}") from exc
        except NoAuthError:
            # Not ready, retried on tick: a node with another credential than the one that closed the tree.
            why = ("zookeeper.auth_file is not the credential the other nodes use" if acl
                   else "it is closed (zookeeper.auth_file is set on other nodes, not on this one)")
            raise StoreUnavailable(f"not allowed into {self.root}: {why}") from None

    def current_epoch(self) -> int:
        try:
            _, stat = self.client.get(self.epoch_path)
        except self._unavailable_errors() as exc:
            raise StoreUnavailable(f"cannot read the epoch: {exc!r}") from exc
        return int(stat.version)

    def bump_epoch(self) -> int:
        while True:
            try:
                _, stat = self.client.get(self.epoch_path)
                new = stat.version + 1
                body = json.dumps({"epoch": new, "node": self.node, "ts_ms": int(time.time() * 1000)}).encode()
                stat = self.client.set(self.epoch_path, body, version=stat.version)
            except BadVersionError:
                continue  # another node bumped at the same moment: bump past it
            except self._unavailable_errors() as exc:
                raise StoreUnavailable(f"cannot bump the epoch: {exc!r}") from exc
            self._set_epoch(int(stat.version))
            return self.epoch

    def adopt_epoch(self) -> int:
        self._set_epoch(self.current_epoch())
        return self.epoch

    def _set_epoch(self, epoch: int) -> None:
        """A new epoch forgets the index of existing znodes: while another node held the epoch it created and
        deleted bindings this index never saw, and a delete of a path it does not list is skipped as a no-op
        (an un-REGISTER after a failover back was lost that way, and the binding stayed in every proxy)."""
        with self._write_lock:
            self.epoch = epoch
            self._known = None

    @property
    def available(self) -> bool:
        return self.client.state == KazooState.CONNECTED

    def _unavailable_errors(self) -> tuple[type[BaseException], ...]:
        return (
            ConnectionLoss,
            SessionExpiredError,
            ConnectionClosedError,
            OperationTimeoutError,
            self.client.handler.timeout_exception,
        )

    # -- writes ------------------------------------------------------------------------------------------

    def _intents(self, events: Iterable[Event]) -> list[_Intent]:
        out: list[_Intent] = []
        for ev in events:
            if isinstance(ev, ContactEvent):
                path = self.contact_path(ev.aor, ev.contact)
                if ev.removed:
                    out.append(_Intent("delete", path))
                    if ev.type == "contact.delete":  # an un-REGISTER; not an expiry, which a late refresh must beat
                        out.append(_Intent("put", self.tomb_path(ev.aor, ev.contact), self._tomb_data(ev)))
                else:
                    rec = ContactRecord.from_event(ev, self.epoch)
                    out.append(_Intent("put", path, _encode(rec), rec))
            else:
                path = self.dialog_path(ev.callid, ev.from_tag)
                rec = DialogRecord.from_event(ev, self.epoch)
                if ev.ended:
                    stored = None if ev.known else self._stored_dialog(ev)
                    if stored is not None:
                        path, orig = stored
                    else:
                        orig = rec
                    cdr = CdrRecord(
                        callid=ev.callid,
                        from_tag=orig.from_tag,
                        to_tag=orig.to_tag,
                        from_uri=orig.from_uri,
                        to_uri=orig.to_uri,
                        created_ms=orig.created_ms,
                        start_ts=orig.start_ts,
                        end_ms=ev.ts,
                        reason=ev.type.split(".", 1)[1],
                        node=ev.node,
                        epoch=self.epoch,
                    )
                    out.append(_Intent("delete", path))
                    out.append(_Intent("cdr", f"{self.root}/cdrs/cdr-", _encode(cdr)))
                else:
                    out.append(_Intent("put", path, _encode(rec)))
        return out

    def _deleting(self, path: str, undo: bool = False) -> None:
        """Count a delete of a binding this node is about to send (before it is sent: its watch event may come
        first), or take the count back when it failed; the watch takes one per delete event (take_own_delete).
        So the watch can tell this node's deletes from a peer's (Replicator._wanted). Counted, not flagged: a journal
        replay deleted, re-created and deleted a binding again in one burst; with one flag the second event
        looked like a peer's and removed the phone's binding from this node's own proxy. Bounded: an entry
        whose events never come (a session lost meanwhile) is dropped after OWN_DELETE_MEMORY_S."""
        now = time.monotonic()
        with self._own_lock:
            own = self._own_deletes
            n = own.get(path, (0, 0.0))[0] + (-1 if undo else 1)
            if n <= 0:
                own.pop(path, None)
                return
            if len(own) >= OWN_DELETES_KEPT and path not in own:
                for p, (_n, t) in list(own.items()):
                    if now - t > OWN_DELETE_MEMORY_S:
                        del own[p]
                if len(own) >= OWN_DELETES_KEPT:
                    own.clear()  # a burst of deletes beyond the bound: forget (the watch then applies them)
            own[path] = (n, now)

    def take_own_delete(self, path: str) -> bool:
        """For the watch, once per delete event: whether this node sent it (and one count less)."""
        with self._own_lock:
            entry = self._own_deletes.get(path)
            if entry is None:
                return False
            n, t = entry
            fresh = time.monotonic() - t <= OWN_DELETE_MEMORY_S
            if n <= 1 or not fresh:
                del self._own_deletes[path]
            else:
                self._own_deletes[path] = (n - 1, t)
            return fresh

    def own_delete_pending(self, path: str) -> bool:
        """Whether this node sent a delete of it whose event has not been taken yet (a read found it gone)."""
        with self._own_lock:
            entry = self._own_deletes.get(path)
        return entry is not None and time.monotonic() - entry[1] <= OWN_DELETE_MEMORY_S

    def _stored_dialog(self, ev: DialogEvent) -> tuple[str, DialogRecord] | None:
        """The dialog record the other node wrote for a call this proxy never saw (BYE after a failover).

        The BYE's From tag is the caller's when the caller hangs up and the callee's otherwise, so both
        tags are tried. Rare (once per call that outlived a failover), so a plain synchronous read.
        """
        for tag in dict.fromkeys((ev.from_tag, ev.to_tag)):
            if not tag:
                continue
            path = self.dialog_path(ev.callid, tag)
            try:
                data, stat = self.client.get(path)
            except NoNodeError:
                continue
            return path, _decode(DialogRecord, data, stat.version)
        return None

    def _load_known(self) -> set[str]:
        """Which znodes exist, so a put becomes create or set without a failed round trip."""
        paths = self._buckets("contacts") + self._buckets("dialogs")
        known: set[str] = set()
        for p, children in zip(paths, self._multi_read([(_GET_CHILDREN, p) for p in paths]), strict=True):
            if not isinstance(children, Exception):
                known.update(f"{p}/{c}" for c in children)
        return known

    def write(self, events: Sequence[Event]) -> WriteResult:
        if self.epoch < 0:
            raise StaleEpoch("no epoch: call bump_epoch() (takeover) or adopt_epoch() before writing")
        with self._write_lock:
            try:
                if self._known is None:
                    self._known = self._load_known()
                return self._write(self._intents(events), len(events))
            except self._unavailable_errors() as exc:
                self._known = None  # the outcome of in-flight batches is unknown: reload before the next write
                raise StoreUnavailable(f"write failed: {exc!r}") from exc

    def _write(self, intents: list[_Intent], n_events: int) -> WriteResult:
        assert self._known is not None
        known = self._known
        per = self.batch_ops - 1
        pos, ops_total, txns, retries = 0, 0, 0, 0
        skip: set[int] = set()  # intent indexes found to be no-ops (delete of a missing znode), or sent alone
        unlisted = 0  # deletes of znodes the index did not list that did delete one (see below)
        while pos < len(intents):
            overlay: dict[str, bool] = {}
            batches: list[tuple[int, list[tuple[int, str]], Any]] = []
            # Deletes of znodes the index does not list, each sent alone (epoch-checked): the index is this
            # writer's belief, and a delete skipped on a wrong belief leaves a binding the phone removed in
            # ZooKeeper and every standby, silently (twice so far: a takeover's stale index, drills; writes made
            # outside this path). Alone, a delete of a znode that is really gone fails only itself.
            alone: list[tuple[int, Any]] = []
            for start in range(pos, len(intents), per):
                t = self.client.transaction()
                t.check(self.epoch_path, self.epoch)
                kinds: list[tuple[int, str]] = []
                for i in range(start, min(start + per, len(intents))):
                    it = intents[i]
                    exists = overlay.get(it.path, it.path in known)
                    if it.kind == "put":
                        if exists:
                            t.set_data(it.path, it.data)
                            kinds.append((i, "set"))
                        else:
                            t.create(it.path, it.data)
                            kinds.append((i, "create"))
                        overlay[it.path] = True
                    elif it.kind == "delete":
                        if exists and i not in skip:
                            self._deleting(it.path)  # before it is sent: its watch event may come first
                            t.delete(it.path)
                            kinds.append((i, "delete"))
                        elif i not in skip and it.path not in overlay:
                            self._deleting(it.path)
                            u = self.client.transaction()
                            u.check(self.epoch_path, self.epoch)
                            u.delete(it.path)
                            alone.append((i, u.commit_async()))
                            skip.add(i)  # a pass sent again after a failed batch does not send it twice
                        overlay[it.path] = False
                    else:
                        t.create(it.path, it.data, sequence=True)
                        kinds.append((i, "cdr"))
                if not kinds:
                    continue
                batches.append((start, kinds, self._commit(t, kinds, intents)))
            for i, a in alone:
                path = intents[i].path
                results = a.get(timeout=self.op_timeout_s)
                if isinstance(results[0], BadVersionError):
                    raise StaleEpoch(f"epoch {self.epoch} is no longer current: another node took over")
                err = next((r for r in results if isinstance(r, Exception) and not isinstance(r, RolledBackError)),
                           None)  # fmt: skip
                if err is None:
                    txns, ops_total, unlisted = txns + 1, ops_total + 1, unlisted + 1
                    continue
                self._deleting(path, undo=True)
                if not isinstance(err, NoNodeError):
                    raise StoreError(f"delete {path}: {err!r}")
            if not batches:
                break
            failed = False
            for start, kinds, a in batches:
                results = a.get(timeout=self.op_timeout_s)
                if any(isinstance(r, Exception) for r in results):  # rolled back: none of its deletes happened
                    for i, kind in kinds:
                        if kind == "delete":
                            self._deleting(intents[i].path, undo=True)
                if failed:
                    continue  # later batches are re-sent from the failed one on, in order
                txns += 1
                ops_total += len(kinds)
                if isinstance(results[0], BadVersionError):
                    raise StaleEpoch(f"epoch {self.epoch} is no longer current: another node took over")
                bad = next(
                    (
                        (j, r)
                        for j, r in enumerate(results)
                        if isinstance(r, Exception) and not isinstance(r, RolledBackError)
                    ),
                    None,
                )
                if bad is None:
                    for i, kind in kinds:
                        if kind in ("create", "set"):
                            known.add(intents[i].path)
                        elif kind == "delete":
                            known.discard(intents[i].path)
                    pos = kinds[-1][0] + 1
                    continue
                failed = True
                retries += 1
                j, err = bad
                if j == 0:
                    raise StoreError(f"epoch znode {self.epoch_path}: {err!r}")
                i, kind = kinds[j - 1]
                path = intents[i].path
                if isinstance(err, NodeExistsError):
                    known.add(path)
                elif isinstance(err, NoNodeError) and kind in ("create", "cdr"):
                    self.client.ensure_path(path.rsplit("/", 1)[0])  # a bucket was missing
                elif isinstance(err, NoNodeError):
                    known.discard(path)
                    if kind == "delete":
                        skip.add(i)
                else:
                    raise StoreError(f"{kind} {path}: {err!r}")
                # Every intent before the failed batch is committed; resume at that batch's first intent.
                pos = start
        if unlisted:
            log.warning("%d deletes of bindings this writer's index did not list were needed: its index was stale",
                        unlisted)
        return WriteResult(events=n_events, ops=ops_total, transactions=txns, retries=retries)

    def _commit(self, t: TransactionRequest, kinds: list[tuple[int, str]], intents: list[_Intent]) -> Any:
        sink = self.own_sink
        own = [(j, intents[i].path, intents[i].rec) for j, (i, kind) in enumerate(kinds, 1)
               if kind != "delete" and intents[i].rec is not None]
        if sink is None or not own:
            return t.commit_async()
        a = self.client.handler.async_result()
        self.client._call(_OwnTxn(t.operations, self.client, own, sink), a)  # what commit_async sends, noted
        return a

    # -- the old active's last events ---------------------------------------------------------------------

    def takeover_ms(self) -> int:
        """When the current epoch was taken (the bump's ``ts_ms`` in the epoch znode); 0 when not recorded."""
        return self._takeover()[0]

    def _takeover(self) -> tuple[int, str]:
        """(when, by which node) the current epoch was taken, from the epoch znode; (0, "") when not recorded."""
        try:
            data, _ = self.client.get(self.epoch_path)
        except self._unavailable_errors() as exc:
            raise StoreUnavailable(f"cannot read the epoch: {exc!r}") from exc
        try:
            doc = json.loads(data or b"{}")
            return int(doc.get("ts_ms", 0)), str(doc.get("node", ""))
        except (ValueError, TypeError, AttributeError):
            return 0, ""

    def write_before_takeover(self, events: Sequence[Event], rounds: int = 4) -> LateResult:
        """Write the events this node's proxy accepted while it still held the VIP, after a newer epoch fenced it.

        Why: a takeover does not wait for the old active's last batch. A VIP moved by Pacemaker (switchover, a
        health flap under load) left the old active with events its proxy had answered 200 for (thousands under
        a REGISTER burst) and the epoch check rejected them, so those phones were registered only on the old
        active's proxy. Events from *before* the takeover (``ts`` < the epoch's ``ts_ms``) are this node's to
        write; later ones stay fenced (a partitioned old active must not write). Without the epoch check, each
        binding is written only if the store holds nothing newer (its ``ts_ms``), conditional on the version
        read: a concurrent writer makes it read and decide again (``rounds``). The new active's watch then
        pushes them into its proxy. A binding the new active deleted on an un-REGISTER after this event is left
        deleted (its tombstone, gone/: see _late_round).
        """
        cutoff, taker = self._takeover()
        if taker == self.node:
            # The current epoch is this node's own: nobody took over since it wrote them (a coordinator restarted
            # with the journal of a ZooKeeper outage, whose replay found no epoch yet). They are all this node's.
            # Taken for a peer's takeover, a lab run dropped 5866 such events ("from after the takeover").
            return self.write_if_newer(events, rounds)
        before = [ev for ev in events if cutoff and ev.ts < cutoff]
        return self.write_if_newer(before, rounds, fenced=len(events) - len(before))

    def write_if_newer(self, late: Sequence[Event], rounds: int = 4, fenced: int = 0) -> LateResult:
        """Write events without the epoch check, each binding only where the store holds nothing newer (see
        write_before_takeover). Also for a standby's own proxy: REGISTERs it answered while the VIP was not (or
        no longer) its own, from phones whose ARP entry still pointed at it; the phone holds a 200, so the binding
        must reach the store, and nothing newer is overwritten."""
        res = LateResult(fenced=fenced)
        contacts: dict[str, ContactEvent] = {}
        for ev in late:
            if isinstance(ev, ContactEvent):
                contacts[self.contact_path(ev.aor, ev.contact)] = ev  # in order: the last event of a binding wins
        dialogs = [ev for ev in late if isinstance(ev, DialogEvent)]
        try:
            todo = dict(contacts)
            for _ in range(rounds):
                if not todo:
                    break
                todo = self._late_round(todo, res)
            res.conflicts = len(todo)
            for intent in self._intents(dialogs):
                self._late_dialog(intent)
                res.dialogs += intent.kind != "cdr"
        except self._unavailable_errors() as exc:
            raise StoreUnavailable(f"late write failed: {exc!r}") from exc
        return res

    def _late_round(self, todo: dict[str, ContactEvent], res: LateResult) -> dict[str, ContactEvent]:
        """One pipelined read-decide-write pass; returns the bindings a concurrent write made it redo.

        A binding whose tombstone (gone/) is as new as the event was un-registered after it: the event is left
        alone (before tombstones it came back, registered, until it expired). A binding created here is created
        in one transaction with a test that no tombstone appeared since the read (create and delete it: that
        fails if it exists), or that the one read is unchanged (check): an un-REGISTER written meanwhile makes
        the round read and decide again."""
        reads = [(p, self.client.get_async(p), self.client.get_async(self._tomb_of(p))) for p in todo]
        ops: list[tuple[str, Any]] = []
        for path, a, ta in reads:
            ev = todo[path]
            stored_ts: int | None = None
            try:
                data, stat = a.get(timeout=self.op_timeout_s)
            except NoNodeError:
                stat = None
            else:
                stored_ts = _ts_of(data)
            try:
                tdata, tstat = ta.get(timeout=self.op_timeout_s)
            except NoNodeError:
                tomb: tuple[int, int] | None = None
            else:
                tomb = (_ts_of(tdata), tstat.version)
            if stored_ts is not None and stored_ts >= ev.ts:
                res.newer += 1
                continue
            if not ev.removed and tomb is not None and tomb[0] >= ev.ts:
                res.unregistered += 1  # un-REGISTERed after this event: it must not come back
                continue
            if ev.removed:
                if stat is None:
                    res.newer += 1  # nothing to delete
                    continue
                self._deleting(path)
                if ev.type != "contact.delete" or (tomb is not None and tomb[0] >= ev.ts):
                    ops.append((path, self.client.delete_async(path, version=stat.version)))  # see _deleting
                    continue
                # A late un-REGISTER leaves its tombstone too, in the same transaction (a concurrent one: again).
                t = self.client.transaction()
                t.delete(path, version=stat.version)
                if tomb is None:
                    t.create(self._tomb_of(path), self._tomb_data(ev))
                else:
                    t.set_data(self._tomb_of(path), self._tomb_data(ev), version=tomb[1])
                ops.append((path, t.commit_async()))
            else:
                data = _encode(ContactRecord.from_event(ev, self.epoch))
                if stat is None:
                    t = self.client.transaction()
                    t.create(path, data)
                    if tomb is None:
                        t.create(self._tomb_of(path), b"")
                        t.delete(self._tomb_of(path))
                    else:
                        t.check(self._tomb_of(path), tomb[1])
                    ops.append((path, t.commit_async()))
                else:
                    ops.append((path, self.client.set_async(path, data, version=stat.version)))
        again: dict[str, ContactEvent] = {}
        for path, a in ops:
            try:
                got = a.get(timeout=self.op_timeout_s)
                if isinstance(got, list) and any(isinstance(r, Exception) for r in got):
                    raise next((r for r in got if not isinstance(r, RolledBackError)), BadVersionError())
            except (NodeExistsError, BadVersionError, NoNodeError):
                if todo[path].removed:
                    self._deleting(path, undo=True)
                again[path] = todo[path]
                continue
            res.written += 1
        return again

    def _gc_tombs(self, now: float) -> int:
        """Delete the tombstones older than TOMB_KEEP_S (the GC lock holder, beside the expired bindings)."""
        limit_ms = (now - TOMB_KEEP_S) * 1000
        old = [(p, v) for p, data, v, _ in self._read_all(("gone",))["gone"] if _ts_of(data) < limit_ms]
        asyncs = [self.client.delete_async(p, version=v) for p, v in old]
        gone = 0
        for a in asyncs:
            with contextlib.suppress(NoNodeError, BadVersionError):  # re-un-REGISTERed meanwhile: kept
                a.get(timeout=self.op_timeout_s)
                gone += 1
        return gone

    def _late_dialog(self, it: _Intent) -> None:
        if it.kind == "cdr":
            self.client.create(it.path, it.data, sequence=True, makepath=True)
        elif it.kind == "delete":
            with contextlib.suppress(NoNodeError):
                self.client.delete(it.path)
        else:
            try:
                self.client.create(it.path, it.data, makepath=True)
            except NodeExistsError:
                self.client.set(it.path, it.data)

    # -- reads -------------------------------------------------------------------------------------------

    def _bulk_client(self) -> KazooClient:
        """The reader connection, brought up to date with the leader (``sync``), when it is connected; else the
        main one. Its reads may then lag the main session's latest writes by nothing that matters: every caller
        leaves what changed during its read to the events (reconciliation) or to the next round (audit, GC)."""
        r = self.reader
        if r is None or r.state != KazooState.CONNECTED:
            return self.client
        try:
            r.sync_async(self.root).get(timeout=self.op_timeout_s)  # bounded: a wedged connection costs one timeout
        except Exception:  # whatever went wrong with the extra connection, the main one still reads
            return self.client
        return r

    def _multi_read(self, ops: Sequence[tuple[int, str]], client: KazooClient | None = None,
                    lean: bool = False, meanwhile: Callable[[], None] | None = None) -> list[Any]:
        """Results of many reads in round trips of :data:`READ_OPS` (ZooKeeper >= 3.6 ``multiRead``).

        Falls back to one pipelined request per read when the server does not know multiRead. ``lean``:
        getData results as (data, version, mzxid), however they were read. ``meanwhile``: run once the
        requests are sent, while the servers answer.
        """
        c = client or self.client
        chunks = [ops[i : i + READ_OPS] for i in range(0, len(ops), READ_OPS)]
        if self._multiread:
            asyncs = []
            for chunk in chunks:
                a = c.handler.async_result()
                # kazoo 2.11 has no multiRead API; _call is how every kazoo request is queued.
                c._call(_MultiRead(chunk, lean), a)
                asyncs.append(a)
            if meanwhile is not None:
                meanwhile()
                meanwhile = None
            out: list[Any] = []
            try:
                for a in asyncs:
                    out.extend(a.get(timeout=self.op_timeout_s))
                return out
            except UnimplementedError:
                log.warning("zookeeper has no multiRead (< 3.6): reading one znode per request")
                self._multiread = False
        singles = [c.get_children_async(p) if op == _GET_CHILDREN else c.get_async(p) for op, p in ops]
        if meanwhile is not None:
            meanwhile()
        results: list[Any] = []
        for (op, _), a in zip(ops, singles, strict=True):
            try:
                res = a.get(timeout=self.op_timeout_s)
            except NoNodeError as exc:
                res = exc
            if lean and op == _GET_DATA and not isinstance(res, Exception):
                res = (res[0], res[1].version, res[1].mzxid)
            results.append(res)
        return results

    def _read_all(self, kinds: Sequence[str]) -> dict[str, list[tuple[str, bytes, int, int]]]:
        """Every child of every bucket, as (path, data, version, mzxid): listings, then data, in multiReads."""
        buckets = [(k, p) for k in kinds for p in self._buckets(k)]
        c = self._bulk_client()
        listed = self._multi_read([(_GET_CHILDREN, p) for _, p in buckets], c)
        paths: list[tuple[str, str]] = []
        for (k, p), children in zip(buckets, listed, strict=True):
            if not isinstance(children, Exception):
                paths.extend((k, f"{p}/{c}") for c in children)
        got = self._multi_read([(_GET_DATA, p) for _, p in paths], c)
        out: dict[str, list[tuple[str, bytes, int, int]]] = {k: [] for k in kinds}
        for (k, path), res in zip(paths, got, strict=True):
            if isinstance(res, Exception):
                continue  # deleted between the listing and the read
            data, stat = res
            out[k].append((path, data, stat.version, stat.mzxid))
        return out

    def snapshot(self) -> ClusterState:
        try:
            epoch = self.current_epoch()
            raw = self._read_all(("contacts", "dialogs"))
        except self._unavailable_errors() as exc:
            raise StoreUnavailable(f"cannot read the state: {exc!r}") from exc
        contacts = tuple(sorted((_decode(ContactRecord, d, v, z) for _, d, v, z in raw["contacts"]),
                                key=lambda r: r.name))
        dialogs = tuple(_decode(DialogRecord, d, v) for _, d, v, _ in raw["dialogs"])
        return ClusterState(epoch=epoch, contacts=contacts, dialogs=dialogs)

    def read_contacts(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], ContactRecord]:
        """The stored bindings among these (aor, contact) keys, read in multiRead round trips (a reconciliation
        of a few bindings must not read all of them). Unreadable ones count as absent (a repair rewrites them)."""
        paths = {self.contact_path(a, c): (a, c) for a, c in keys}
        try:
            recs = self._read_records(list(paths), self._bulk_client())
        except (*self._unavailable_errors(), KazooException) as exc:
            raise StoreUnavailable(f"cannot read bindings: {exc!r}") from exc
        return {paths[p]: r for p, r in recs.items() if r is not None}

    def _read_records(self, paths: Sequence[str], client: KazooClient | None = None,
                      known: _Known | Callable[[], _Known] | None = None,
                      kept: dict[str, Sequence[Any]] | None = None) -> dict[str, ContactRecord | None]:
        """path -> its record, None when it does not exist; unreadable records left out (logged). Raises what a
        read returned other than "no node" (e.g. the connection).

        ``known``: records decoded before, by path (or a function that gives them, called while the servers
        answer). One whose mzxid is the znode's is returned as it is, not decoded again: an mzxid names exactly
        one write, so a stale or foreign ``known`` costs decodes, never correctness. Why: decoding is most of a
        full read (100k bindings: 0.9 s of JSON and records, against 0.4 s of lean multiRead), and a node start
        or a reconnect mostly reads what it had. ``known`` may also hold node cache rows (tuples: the path, then
        the record's fields, :func:`record_from_row`); a row whose mzxid is the znode's goes to ``kept`` as it is
        (built into a record when given none).
        """
        out: dict[str, ContactRecord | None] = {}
        known_map: _Known = {}

        def resolve() -> None:  # _multi_read runs it exactly once, also for no paths
            nonlocal known_map
            known_map = (known() if callable(known) else known) or {}

        got = self._multi_read([(_GET_DATA, p) for p in paths], client, lean=True, meanwhile=resolve)
        for p, res in zip(paths, got, strict=True):
            if isinstance(res, NoNodeError):
                out[p] = None
                continue
            if isinstance(res, Exception):
                raise res
            data, version, mzxid = res
            prior = known_map.get(p)
            if prior is not None:
                if type(prior) is not tuple:
                    if prior.mzxid == mzxid:  # type: ignore[union-attr]
                        out[p] = prior  # type: ignore[assignment]
                        continue
                elif prior[-1] == mzxid:
                    if kept is None:
                        out[p] = record_from_row(prior)
                    else:
                        kept[p] = prior
                    continue
            try:
                out[p] = _decode(ContactRecord, data, version, mzxid)
            except (ValueError, TypeError) as exc:
                log.error("zookeeper: %s holds an unreadable record, skipped: %s", p, exc)
        return out

    def cdrs(self) -> tuple[CdrRecord, ...]:
        try:
            names = sorted(self.client.get_children(f"{self.root}/cdrs"))
            asyncs = [self.client.get_async(f"{self.root}/cdrs/{n}") for n in names]
            return tuple(_decode(CdrRecord, a.get(timeout=self.op_timeout_s)[0], -1) for a in asyncs)
        except self._unavailable_errors() as exc:
            raise StoreUnavailable(f"cannot read the CDRs: {exc!r}") from exc

    # -- garbage collection ------------------------------------------------------------------------------

    def holds_gc_lock(self) -> bool:
        """Take the GC lock if free (non-blocking) and say whether this node holds it.

        Two collectors overlapping for a moment (a lock lost with a session) is harmless: every delete is
        conditional on the version that was read, so a binding refreshed meanwhile is never deleted.
        """
        try:
            lock = self._gc_lock
            if lock.is_acquired and not self.client.exists(f"{lock.path}/{lock.node}"):
                # kazoo's Lock still says "acquired" after its ephemeral node went with a lost session.
                self._gc_lock = self.client.Lock(f"{self.root}/gc", self.node)
            if not self._gc_lock.is_acquired:
                self._gc_lock.acquire(blocking=False)
        except self._unavailable_errors():
            return False
        return bool(self._gc_lock.is_acquired)

    def release_gc_lock(self) -> None:
        if self._gc_lock.is_acquired:
            self._gc_lock.release()

    def gc_expired(self, now: float | None = None, grace_s: int = 30,
                   view: Mapping[str, ContactRecord] | None = None) -> int:
        """With ``view``, the candidates come from it and each delete is conditional on the version the view
        holds: a binding refreshed since is left (BadVersion), one the view lacks waits for the next round. Why:
        reading and JSON-decoding the whole store every 30 s held the GIL ~0.7 s per 100k bindings on the lock
        holder, beside its replication (py-spy on the node-start bench; see GC_WAITS_FOR_RESYNC_S)."""
        if not self.holds_gc_lock():
            return 0
        now = time.time() if now is None else now
        limit = now - grace_s
        try:
            if view is not None:
                doomed = [(p, r.version) for p, r in view.items() if r.expires_at < limit]
            else:
                raw = self._read_all(("contacts",))["contacts"]
                doomed = [(p, v) for p, d, v, _ in raw if json.loads(d).get("expires_at", 0) < limit]
            deleted = 0
            for start in range(0, len(doomed), self.batch_ops):
                chunk = doomed[start : start + self.batch_ops]
                # Individually, not as one transaction: one refreshed binding must not save the others.
                for p, _v in chunk:
                    self._deleting(p)
                asyncs = [(p, self.client.delete_async(p, version=v)) for p, v in chunk]
                for p, a in asyncs:
                    try:
                        a.get(timeout=self.op_timeout_s)
                    except (NoNodeError, BadVersionError):
                        self._deleting(p, undo=True)
                        continue
                    deleted += 1
                    if self._known is not None:
                        self._known.discard(p)  # the writer's index must not claim a deleted binding
            tombs = self._gc_tombs(now)
            if tombs:
                log.info("gc: %d tombstones older than %d s deleted", tombs, TOMB_KEEP_S)
        except self._unavailable_errors() as exc:
            raise StoreUnavailable(f"gc failed: {exc!r}") from exc
        return deleted

    def watch_contacts(self, on_changes: Callable[[list[Change]], None]) -> Watch:
        w = _ZkContactWatch(self, on_changes)
        w.start()
        return w


class _AddWatch:
    """ZooKeeper's ``addWatch`` request (opcode 106, server >= 3.6), which kazoo 2.11 lacks; shaped like
    :class:`_MultiRead`. A persistent recursive watch reports every create, data change and delete under its path
    and stays armed: the standby needs no one-shot watch per binding to re-arm with a read per change."""

    type = 106
    PERSISTENT_RECURSIVE = 1

    def __init__(self, path: str, mode: int = PERSISTENT_RECURSIVE) -> None:
        self.path = path
        self.mode = mode

    def serialize(self) -> bytearray:
        raw = self.path.encode()
        return bytearray(int_struct.pack(len(raw)) + raw + int_struct.pack(self.mode))

    def deserialize(self, buf: bytes, offset: int) -> bool:
        return True  # the reply carries nothing but its header's error code


_SUBTREE_HOOK = "_sipha_subtree_watches"  # on kazoo's connection handler: {path prefix: callback}


def _subtree_watches(client: KazooClient) -> dict[str, Callable[[int, str], None]]:
    """The client's persistent-watch callbacks, hooked once into its connection's event reader.

    kazoo dispatches a watch event only to one-shot watchers registered for that exact path (and pops them), so
    a persistent recursive watch's events for the paths below it would be dropped. The hook sees every event
    first, hands the ones under a registered prefix to its callback (type, path), then lets kazoo go on."""
    conn = client._connection
    hooks: dict[str, Callable[[int, str], None]] | None = getattr(conn, _SUBTREE_HOOK, None)
    if hooks is None:
        hooks = {}
        original = conn._read_watch_event

        def read_watch_event(buffer: bytes, offset: int) -> Any:
            ev, _ = _WatchEvent.deserialize(buffer, offset)
            for prefix, callback in list(hooks.items()):
                if ev.path.startswith(prefix):
                    try:
                        callback(ev.type, ev.path)
                    except Exception:  # never into kazoo's connection thread
                        log.exception("subtree watch callback failed for %s", ev.path)
            return original(buffer, offset)

        conn._read_watch_event = read_watch_event
        setattr(conn, _SUBTREE_HOOK, hooks)
    return hooks


class _ZkContactWatch(Watch):
    """One persistent recursive watch on the contacts subtree; reads with multiRead.

    The watch's events (created, data changed, deleted; kazoo's connection thread) only enqueue; one worker
    thread reads what changed, many bindings per ``multiRead`` request, and hands batches to ``on_changes``.
    Before this a one-shot data watch per binding had to be re-armed by a ``getData`` per change, one kazoo
    request each: ~170 us of Python per change on this machine, most of the standby's CPU under a REGISTER
    stream, and 100k server-side watches per standby.

    The watch is gone after *any* lost connection, not only a lost session (kazoo 2.11 sends no SetWatches on a
    reconnect). So after either the worker adds it again and reads everything, reporting the difference as a
    resync. (Trusting watches across a reconnect left a standby 127 deleted bindings too many and 14 new ones
    short after a ZooKeeper outage.) The watch is added *before* the full read, so a change during the read is
    also an event, read again afterwards: nothing that changed in between is missed.

    A read that finds no node reports the binding deleted, whatever its events said (deleted before the read:
    its delete event may already be processed).
    """

    def __init__(self, store: ZkStore, on_changes: Callable[[list[Change]], None]) -> None:
        self.store = store
        self.client = store.client
        self.on_changes = on_changes
        self.root = f"{store.root}/contacts"
        self._prefix = self.root + "/"
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._records: dict[str, ContactRecord] = {}  # path -> last record seen
        self._stopped = threading.Event()
        self._session_lost = False
        self._complete = False  # _records is the whole store as of the last resync plus every change since
        # Change notifications received (kazoo's reader thread) and handed to on_changes (this watch's thread),
        # in queue order: processed >= a received count read earlier means every change notified before that
        # read has been delivered (Replicator.wait_caught_up, for reconciliation's second look).
        self.received = 0
        self.processed = 0
        self._uncounted = 0  # taken from the queue by a pass that failed: counted when a pass succeeds
        self.seed_reused: int | None = None  # records the first read took from the store's view_seed
        self.own_unread = 0  # bindings this node wrote that the view took from the write's reply (see _own)
        # A delivered resync's bindings still to be built into _records (_settle); None: nothing to settle.
        self._unbuilt: list[tuple[str, Change]] | None = None
        self._settling = threading.Lock()  # _complete and _unbuilt change together (see replay)
        self._thread = threading.Thread(target=self._run, name="sipha-zk-watch", daemon=True)

    def start(self) -> None:
        self.client.add_listener(self._on_state)
        if self.store.client is self.client:  # one session: its replies and events come in one stream
            self.store.own_sink = self._on_own
        self._q.put(("resync", ""))
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.client.remove_listener(self._on_state)
        if self.store.own_sink == self._on_own:
            self.store.own_sink = None
        hooks = _subtree_watches(self.client)
        if hooks.get(self._prefix) == self._on_event:
            del hooks[self._prefix]  # the server-side watch ends with the connection; its events are ignored
        self._q.put(("stop", ""))
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    @property
    def complete(self) -> bool:
        return self._complete

    def records(self) -> dict[str, ContactRecord] | None:
        if not self._complete:
            return None
        return dict(self._records)  # one C-level copy under the GIL: safe against the watch thread's updates

    def replay(self) -> bool:
        with self._settling:
            if not self._complete and self._unbuilt is None:
                # The first read (a node start: the proxy is started while it runs) or a lost connection's: a
                # resync is coming either way. Restarting the watch instead waited for the read in flight, then
                # read again.
                return self._thread.is_alive() and not self._stopped.is_set()
            # Complete, or a resync read and being delivered (its view settles after): replayed after it. (Taken
            # for "a resync is coming", a replay asked while a postponed resync was still being delivered was
            # lost: the restarted proxy got its table only after the next reconnect, from a store that lacked
            # the phones' latest un-REGISTERs; the lab's ZooKeeper outage test.)
            self._q.put(("replay", ""))
            return True

    def refetch(self, paths: Iterable[str]) -> None:
        for p in paths:
            self._q.put(("refetch", p))  # a read like any data event's: put, or delete when it is gone

    # Callbacks on kazoo's threads: never block, never raise.
    def _on_state(self, state: KazooState) -> None:
        if state in (KazooState.LOST, KazooState.SUSPENDED):  # either way the watch is gone (see above)
            self._session_lost = True
            self._complete = False
        elif state == KazooState.CONNECTED and self._session_lost:
            self._session_lost = False
            self._q.put(("resync", ""))

    def _on_own(self, writes: list[OwnWrite], zxid: int) -> None:
        self._q.put(("own", (writes, zxid)))  # after this transaction's events (see _OwnTxn)

    def _on_event(self, etype: int, path: str) -> None:
        if path.count("/") != self._prefix.count("/") + 1:
            return  # a bucket, not a binding
        self.received += 1
        self._q.put(("deleted" if etype == _DELETED_EVENT else "data", path))

    def _run(self) -> None:
        while not self._stopped.is_set():
            items = [self._q.get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < 10000:
                    items.append(self._q.get_nowait())
            if any(kind == "stop" for kind, _ in items):
                return
            notified = sum(kind in ("data", "deleted") for kind, _ in items) + self._uncounted
            self._uncounted = notified  # until this pass has delivered them
            t0 = time.monotonic()
            try:
                changes = self._process(items)
            except self.store._unavailable_errors() as exc:
                # Not connected: the session either survives or is lost; either way the watch must be added
                # again and everything read (the state listener queues that too). Nothing is dropped.
                log.warning("contact watch: zookeeper unavailable (%r); resync queued", exc)
                self._q.put(("resync", ""))
                time.sleep(0.5)
                continue
            except Exception:
                # A bug or an unexpected reply must not end replication silently: log it, read everything.
                log.exception("contact watch: processing %d items failed; resync queued", len(items))
                self._q.put(("resync", ""))
                time.sleep(0.5)
                continue
            # A resync is reported even when empty: the consumer learns it is in step with the store.
            t1 = time.monotonic()
            if changes or any(kind in ("resync", "replay") for kind, _ in items):
                try:
                    self.on_changes(changes)
                except Exception:
                    log.exception("contact watch: on_changes failed for %d changes", len(changes))
            self._settle()
            self.processed += notified
            self._uncounted = 0
            t2 = time.monotonic()
            if t2 - t0 > SLOW_PASS_S:  # where a standby's lag comes from: the store's reads or the proxy's applies
                log.info("contact watch: slow pass: %d events, %.2f s reading the store, %d changes, %.2f s applying "
                         "them", len(items), t1 - t0, len(changes), t2 - t1)

    def _process(self, items: list[tuple[str, str]]) -> list[Change]:
        if any(kind == "resync" for kind, _ in items):
            return self._resync()
        if any(kind == "replay" for kind, _ in items):
            # Everything else queued is applied to the view first and delivered as usual; the replay then
            # carries the resulting view (a restarted proxy's table takes all of it).
            changes = self._process([it for it in items if it[0] != "replay"])
            return changes + [Change("put", r, resync=True, replay=True) for r in self._records.values()]
        changes: list[Change] = []
        fetch: dict[str, None] = {}  # ordered set
        for kind, path in items:
            if kind in ("data", "refetch"):
                fetch[path] = None
            elif kind == "deleted":
                fetch.pop(path, None)  # a create after it in this batch adds it back
                changes.extend(self._gone(path, self.store.take_own_delete(path)))  # one per event, used or not
            elif kind == "own":
                changes.extend(self._own(*path, fetch))
        for path, rec in self._read(list(fetch)).items():
            if rec is None:
                changes.extend(self._gone(path, self.store.own_delete_pending(path)))  # deleted before the read
                continue
            self._records[path] = rec
            changes.append(Change("put", rec))
        return changes

    def _own(self, writes: list[OwnWrite], zxid: int, fetch: dict[str, None]) -> list[Change]:
        """Bindings this node wrote in the transaction ``zxid``, whose events are queued before this (_OwnTxn): a
        path still to be read takes the record written instead. Why: an active coordinator read back every
        binding it wrote only to skip it as its own, as many ZooKeeper reads as the standby's, on a machine
        where the lab's whole pipeline shares two cores (BENCHMARKS.md, "Replication lag").

        Safe because the record is the binding as of ``zxid``: an event of an earlier write is superseded by it,
        and a later write's event comes after this and reads again. Not taken: a path with no event to read
        (read already, or the watch was not armed: its resync reads everything), or one the view holds from
        a later write."""
        out: list[Change] = []
        for path, rec, version in writes:
            if path not in fetch:
                continue
            cur = self._records.get(path)
            if cur is not None and cur.mzxid > zxid:
                continue
            del fetch[path]
            _set_version(rec, version)
            _set_mzxid(rec, zxid)
            self._records[path] = rec
            out.append(Change("put", rec))
        self.own_unread += len(out)
        return out

    def _gone(self, path: str, by_self: bool) -> list[Change]:
        """A binding that no longer exists, however that was learnt: dropped, and its delete if the view had it."""
        rec = self._records.pop(path, None)
        return [] if rec is None else [Change("delete", rec, by_self=by_self)]

    def _add_watch(self) -> None:
        _subtree_watches(self.client)[self._prefix] = self._on_event
        a = self.client.handler.async_result()
        self.client._call(_AddWatch(self.root), a)
        a.get(timeout=self.store.op_timeout_s)

    def _resync(self) -> list[Change]:
        with gc_paused():  # ~300k new objects, no cycles: the collector's passes over the whole heap cost ~20 %
            return self._resync_read()

    def _resync_read(self) -> list[Change]:
        t0 = time.monotonic()
        self._add_watch()  # first: whatever changes from now on is an event, read after this full read
        buckets = self.store._buckets("contacts")
        paths: list[str] = []
        for b, names in zip(buckets, self.store._multi_read([(_GET_CHILDREN, b) for b in buckets]), strict=True):
            if not isinstance(names, Exception):
                paths.extend(f"{b}/{n}" for n in names)
        seed, self.store.view_seed = self.store.view_seed, None
        merged: dict[str, ContactRecord | tuple[Any, ...]] = {}
        t_list = time.monotonic()
        seed_s = 0.0

        def known() -> _Known:
            nonlocal seed_s
            if seed is None:
                return self._records
            ts = time.monotonic()
            try:
                merged.update(seed())  # loaded while the servers answer the read
            except Exception:  # a cache only saves decoding: without it, everything is decoded
                log.exception("contact watch: the cached view could not be loaded; decoding everything")
            merged.update(self._records)
            seed_s = time.monotonic() - ts
            return merged

        kept: dict[str, Sequence[Any]] = {}  # unchanged since the cached view: rows, records built after delivery
        fresh = {p: r for p, r in self._read(paths, known, kept).items() if r is not None}
        t_read = time.monotonic()
        changes = [Change("delete", r, resync=True, by_self=self.store.own_delete_pending(p))
                   for p, r in self._records.items() if p not in fresh and p not in kept]
        changes += [Change("put", r, resync=True) for r in fresh.values()]
        unbuilt = [(p, Change("put", resync=True, row=row)) for p, row in kept.items()]
        changes += [c for _, c in unbuilt]
        if seed is not None:
            reused = self.seed_reused = len(kept)
            log.info("contact watch: first read: %d bindings, %d of them unchanged since the cached view (%d "
                     "cached), %d decoded; listed in %.0f ms, read in %.0f ms (the cached view loaded meanwhile "
                     "in %.0f ms), changes made in %.0f ms", len(fresh) + reused, reused, len(merged), len(fresh),
                     (t_list - t0) * 1000, (t_read - t_list) * 1000, seed_s * 1000,
                     (time.monotonic() - t_read) * 1000)
            merged.clear()
        self._records = fresh
        with self._settling:
            self._unbuilt = unbuilt
            self._complete = False  # until _settle: the view lacks the records of the cached rows until then
        return changes

    def _settle(self) -> None:
        """After a resync was delivered: the view takes the records of the bindings the first read found unchanged
        since the cached view (built by the delivery's pushes and live table, else here) and is complete. Why
        after: readiness needs only their keys and mzxids, and building 100k records beside the store read cost
        0.2-0.6 s of the GIL on a node start's way to readiness (BENCHMARKS.md, "Restart resync")."""
        unbuilt = self._unbuilt
        if unbuilt is None:
            return
        if unbuilt:
            with gc_paused():
                self._records.update((p, c.record) for p, c in unbuilt)
        with self._settling:  # replay() reads both at once
            self._complete = not self._session_lost
            self._unbuilt = None

    def _read(self, paths: Sequence[str], known: _Known | Callable[[], _Known] | None = None,
              kept: dict[str, Sequence[Any]] | None = None) -> dict[str, ContactRecord | None]:
        # A failed read raises: not "gone" (the caller resyncs).
        return self.store._read_records(paths, known=self._records if known is None else known, kept=kept)


__all__ = [
    "BATCH_OPS",
    "CdrRecord",
    "Change",
    "ClusterState",
    "ContactRecord",
    "DialogRecord",
    "LateResult",
    "StaleEpoch",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Watch",
    "WriteResult",
    "ZkStore",
    "aor_of",
    "contact_name",
    "dialog_name",
]
