"""Proxy events in: one JSON datagram from the proxy becomes one frozen, validated event.

The proxy (templates/kamailio.cfg.j2, "Events to the coordinator") sends one JSON object per UDP datagram
for every binding change (``contact.insert|update|delete|expired``) and every dialog change
(``dialog.start|end|failed|timeout``; ``dialog.confirmed`` is accepted as an alias of start for other
proxies). Anything that is not such an object raises :class:`EventError` with a short ``reason`` that the
service counts per reason and logs: an event from the network must never crash the coordinator.

Loss is expected (UDP, a coordinator restart, a full socket buffer) and must be *seen*, so every event
carries a per-proxy ``seq``. :class:`SequenceTracker` tells, per proxy node, whether an event is the next
one, a gap (how many were lost: the service then reconciles from ``ul.dump``), a duplicate/late one, or the
first event of a restarted proxy. A restart is recognised by ``boot`` (the proxy's start time, ``$Tb`` in
Kamailio) changing; when the proxy does not send ``boot``, by ``seq`` going back to 1.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 8192  # far above any real event (~600 bytes); bigger is garbage or an attack

CONTACT_TYPES = ("contact.insert", "contact.update", "contact.delete", "contact.expired")
DIALOG_TYPES = ("dialog.start", "dialog.confirmed", "dialog.end", "dialog.failed", "dialog.timeout")
DIALOG_ENDS = ("dialog.end", "dialog.failed", "dialog.timeout")
_MAX_INT = 2**63 - 1


class EventError(ValueError):
    """An event the coordinator refuses; ``reason`` is a stable counter label, the text says why."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


@dataclass(frozen=True, slots=True)
class _Common:
    seq: int
    node: str
    type: str
    ts: int  # ms since the epoch when the proxy emitted it
    boot: int  # the proxy's start time (s); 0 when the proxy does not send it

    REQUIRED_STR: ClassVar[tuple[str, ...]] = ()
    REQUIRED_INT: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        """The event as the proxy sent it (for the journal): parse_event(to_json()) round-trips."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class ContactEvent(_Common):
    """One binding changed. ``q`` is q x 1000 as usrloc keeps it (-1: none given)."""

    aor: str
    contact: str
    expires: int
    expires_at: int
    q: int
    received: str
    socket: str
    path: str
    callid: str
    cseq: int
    user_agent: str
    flags: int
    cflags: int
    methods: int
    ruid: str

    REQUIRED_STR: ClassVar[tuple[str, ...]] = ("aor", "contact")
    REQUIRED_INT: ClassVar[tuple[str, ...]] = ("expires_at",)

    @property
    def removed(self) -> bool:
        return self.type in ("contact.delete", "contact.expired")


@dataclass(frozen=True, slots=True)
class DialogEvent(_Common):
    """One dialog changed; the record a peer needs to close the call and write the CDR after a takeover."""

    callid: str
    from_tag: str
    to_tag: str
    from_uri: str
    to_uri: str
    from_rs: str
    to_rs: str
    from_contact: str
    to_contact: str
    h_entry: int
    h_id: int
    created_ms: int
    start_ts: int
    state: int
    # False: a dialog.end the proxy made from a BYE of a dialog it never saw (set up on the other node
    # before a failover); its tags are as the BYE carries them (swapped when the callee hangs up) and its
    # times are 0: the store takes them from the replicated dialog record.
    known: bool = True

    REQUIRED_STR: ClassVar[tuple[str, ...]] = ("callid", "from_tag")
    REQUIRED_INT: ClassVar[tuple[str, ...]] = ()

    @property
    def ended(self) -> bool:
        return self.type in DIALOG_ENDS


Event = ContactEvent | DialogEvent

_COMMON = ("seq", "node", "type", "ts", "boot")


def _field_kinds(cls: type[_Common]) -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(cls) if f.name not in _COMMON}


_KINDS = {ContactEvent: _field_kinds(ContactEvent), DialogEvent: _field_kinds(DialogEvent)}


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    v = obj.get(key, default)
    # bool is an int in Python; a JSON true is not a sequence number.
    if isinstance(v, bool) or not isinstance(v, int):
        if key in obj or default is None:
            raise EventError("bad-field", f"{key!r} must be an integer, got {type(v).__name__}")
        return default
    if not -_MAX_INT <= v <= _MAX_INT:
        raise EventError("bad-field", f"{key!r} out of range")
    return v


def _bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise EventError("bad-field", f"{key!r} must be true or false, got {type(v).__name__}")
    return v


def _str(obj: dict[str, Any], key: str, default: str | None = None) -> str:
    v = obj.get(key, default)
    if not isinstance(v, str):
        if v is None and default is None:
            raise EventError("missing-field", f"{key!r} is required")
        raise EventError("bad-field", f"{key!r} must be a string, got {type(v).__name__}")
    return v


# Per field kind: the exact type, the default, and the check that takes the default or raises.
_FIELD_RULES: dict[str, tuple[type, Any, Callable[[dict[str, Any], str, Any], Any]]] = {
    "int": (int, 0, _int), "bool": (bool, True, _bool), "str": (str, "", _str)}
# Per class, its own fields in declaration order as (key, exact type, default, check): from_dict's fast path.
_SPECS = {cls: tuple((k, *_FIELD_RULES[t]) for k, t in kinds.items()) for cls, kinds in _KINDS.items()}


def from_dict(obj: Any) -> Event:
    """Validate an already-decoded event; unknown extra keys are ignored (a newer proxy config may add some)."""
    if not isinstance(obj, dict):
        raise EventError("malformed", f"an event is a JSON object, got {type(obj).__name__}")
    for key in ("seq", "node", "type"):
        if key not in obj:
            raise EventError("missing-field", f"{key!r} is required")
    kind = _str(obj, "type")
    cls: type[ContactEvent] | type[DialogEvent]
    if kind in CONTACT_TYPES:
        cls = ContactEvent
    elif kind in DIALOG_TYPES:
        cls = DialogEvent
    else:
        raise EventError("unknown-type", f"type {kind[:40]!r} is not one of {', '.join(CONTACT_TYPES + DIALOG_TYPES)}")
    seq = _int(obj, "seq")
    if seq < 1:
        raise EventError("bad-field", f"seq must be >= 1, got {seq}")
    node = _str(obj, "node")
    if not node:
        raise EventError("bad-field", "node is empty")
    values: dict[str, Any] = {
        "seq": seq,
        "node": node,
        "type": kind,
        "ts": _int(obj, "ts", 0),
        "boot": _int(obj, "boot", 0),
    }
    for key in cls.REQUIRED_STR + cls.REQUIRED_INT:
        if key not in obj:
            raise EventError("missing-field", f"{key!r} is required for {kind}")
    # Each value of the exact type (and an int in range) is taken as it is; anything else goes through the
    # checks above, which take the default or raise. Why: every REGISTER is one event, and one call per field
    # (19 for a contact) was the largest share of the active coordinator's parsing.
    for key, typ, default, check in _SPECS[cls]:
        v = obj.get(key, default)
        if v.__class__ is not typ or (typ is int and not -_MAX_INT <= v <= _MAX_INT):
            v = check(obj, key, default)
        values[key] = v
    for key in cls.REQUIRED_STR:
        if not values[key]:
            raise EventError("bad-field", f"{key!r} is empty")
    return cls(*values.values())


def parse_event(data: bytes | str) -> Event:
    """One datagram to one event, or :class:`EventError` (reasons: oversized, malformed, missing-field, ...)."""
    if len(data) > MAX_EVENT_BYTES:
        raise EventError("oversized", f"{len(data)} bytes > {MAX_EVENT_BYTES}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EventError("malformed", f"not JSON: {exc}") from None
    return from_dict(obj)


class SeqStatus(Enum):
    FIRST = "first"  # first event seen from this proxy (coordinator just started): no judgement possible
    NEXT = "next"
    GAP = "gap"  # events were lost: reconcile from the proxy's own table
    LATE = "late"  # a seq a gap counted missing, arriving after all (reordering between senders): apply it
    DUPLICATE = "duplicate"  # seq already seen (UDP duplicate): drop it
    RESTART = "restart"  # the proxy restarted: its table is empty, it needs a full resync from the store


@dataclass(frozen=True, slots=True)
class SeqResult:
    status: SeqStatus
    missing: int = 0  # for GAP: how many events were lost

    @property
    def accept(self) -> bool:
        """Whether the event should be applied (everything but a duplicate)."""
        return self.status is not SeqStatus.DUPLICATE


class SequenceTracker:
    """Per-proxy-node sequence bookkeeping; not thread-safe (one intake loop owns it).

    Kamailio's SIP workers send events concurrently, so on a burst seq 7 can arrive before seq 6 (seen in the lab:
    20 phones registering at once). A gap therefore remembers which seqs it counted missing, and one of them
    arriving later is applied (LATE), not dropped: dropping it lost those registrations when the node died before
    the gap's reconciliation ran. The memory is bounded; older missing seqs stay lost (reconciliation repairs).
    """

    MISSING_KEPT = 4096  # per proxy node

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}  # node -> (boot, last seq)
        self._missing: dict[str, dict[int, float]] = {}  # node -> {seq a gap counted lost: when (monotonic)}
        self._settled: dict[str, set[int]] = {}  # node -> missing seqs a reconciliation took over (see settle)
        self.gaps = 0
        self.lost = 0
        self.duplicates = 0
        self.restarts = 0
        self.forgotten = 0  # missing seqs dropped from memory (MISSING_KEPT) without arriving: lost for good

    @property
    def outstanding(self) -> int:
        """Seqs a gap counted missing that have not arrived (yet), over every proxy node."""
        return sum(len(m) for m in self._missing.values())

    def overdue(self, age_s: float) -> int:
        """Of those, how many have been missing for at least ``age_s``. Why not ``outstanding``: under a steady
        load some seq is almost always missing for a few ms (the proxy's workers reorder constantly), so a
        reconciliation due 1 s after one gap found the next gap's seqs outstanding and ran for nothing (the
        bench: 1 "lost" event, arrived 269 ms late at most, and a 12 s read of the whole table)."""
        cutoff = time.monotonic() - age_s
        return sum(1 for m in self._missing.values() for t in m.values() if t <= cutoff)

    def settle(self) -> None:
        """What is still missing is a reconciliation's to repair now: no longer outstanding. A late arrival of one
        of them is still applied (LATE), not dropped as a duplicate: the runs' few "lost" events were exactly as
        many as their duplicates, i.e. late, and written only by the next reconciliation (or never, when their
        binding was one an event touched during this one)."""
        for node, missing in self._missing.items():
            settled = self._settled.setdefault(node, set())
            settled.update(missing)
            if len(settled) > self.MISSING_KEPT:
                for old_seq in sorted(settled)[: len(settled) - self.MISSING_KEPT]:
                    settled.discard(old_seq)
        self._missing.clear()

    def observe(self, ev: Event) -> SeqResult:
        prev = self._last.get(ev.node)
        if prev is None:
            self._last[ev.node] = (ev.boot, ev.seq)
            return SeqResult(SeqStatus.FIRST)
        boot, last = prev
        # boot changes on a restart; without boot (or a restart within the same second) seq falls back to 1.
        restarted = (ev.boot != boot and ev.boot != 0 and boot != 0) or (ev.seq == 1 and last != 1)
        if restarted:
            self.restarts += 1
            self._last[ev.node] = (ev.boot, ev.seq)
            self._missing.pop(ev.node, None)
            self._settled.pop(ev.node, None)
            # When the first event seen after a restart is not seq 1, the ones before it were lost too.
            return SeqResult(SeqStatus.RESTART, missing=ev.seq - 1)
        if ev.seq <= last:
            missing = self._missing.get(ev.node)
            if missing and ev.seq in missing:
                del missing[ev.seq]
                self.lost -= 1
                return SeqResult(SeqStatus.LATE)
            settled = self._settled.get(ev.node)
            if settled and ev.seq in settled:
                settled.discard(ev.seq)
                self.lost -= 1
                return SeqResult(SeqStatus.LATE)
            self.duplicates += 1
            return SeqResult(SeqStatus.DUPLICATE)
        self._last[ev.node] = (boot, ev.seq)
        if ev.seq == last + 1:
            return SeqResult(SeqStatus.NEXT)
        self.gaps += 1
        self.lost += ev.seq - last - 1
        missing = self._missing.setdefault(ev.node, {})
        now = time.monotonic()
        missing.update(dict.fromkeys(range(max(last + 1, ev.seq - self.MISSING_KEPT), ev.seq), now))
        if len(missing) > self.MISSING_KEPT:
            for old_seq in sorted(missing)[: len(missing) - self.MISSING_KEPT]:
                del missing[old_seq]
                self.forgotten += 1
        return SeqResult(SeqStatus.GAP, missing=ev.seq - last - 1)


@dataclass(frozen=True, slots=True)
class Accepted:
    event: Event
    seq: SeqResult


class Intake:
    """Datagram in, verdict out: the one call the service's UDP loop makes per datagram.

    Never raises for bad input: a rejected datagram is counted under its reason (``rejected``) and logged
    at most once per ``log_every`` rejections of that reason, so a flood of garbage cannot flood the log.
    """

    def __init__(self, log_every: int = 1000) -> None:
        self.tracker = SequenceTracker()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.log_every = log_every
        self.late_age_ms = 0  # the most any reordered event was behind: its ts to its arrival

    def feed(self, data: bytes, source: object = None) -> Accepted | None:
        try:
            ev = parse_event(data)
        except EventError as exc:
            self.rejected[exc.reason] += 1
            if self.rejected[exc.reason] % self.log_every == 1 or self.log_every == 1:
                log.warning(
                    "event from %s rejected (%d so far for %s): %s",
                    source,
                    self.rejected[exc.reason],
                    exc.reason,
                    str(exc)[:200],
                )
            return None
        result = self.tracker.observe(ev)
        if result.status is SeqStatus.DUPLICATE:
            self.rejected["duplicate"] += 1
            return None
        # Gaps and late arrivals are counted, not logged one by one: Kamailio's SIP workers reorder thousands of
        # events a second under load, and a log line each (three, once) cost the coordinator more CPU than the
        # events themselves, putting it seconds behind its proxy. The service's periodic summary reports them.
        if result.status is SeqStatus.GAP:
            log.debug("proxy %s: %d events missing before seq %d", ev.node, result.missing, ev.seq)
        elif result.status is SeqStatus.RESTART:
            log.warning("proxy %s restarted (seq %d, boot %d): its table needs a full resync", ev.node, ev.seq, ev.boot)
        elif result.status is SeqStatus.LATE:
            self.late_age_ms = max(self.late_age_ms, int(time.time() * 1000) - ev.ts)
            log.debug("proxy %s: seq %d arrived late (reordered); %d still missing", ev.node, ev.seq, self.tracker.lost)
        self.accepted += 1
        return Accepted(ev, result)


__all__ = [
    "CONTACT_TYPES",
    "DIALOG_TYPES",
    "MAX_EVENT_BYTES",
    "Accepted",
    "ContactEvent",
    "DialogEvent",
    "Event",
    "EventError",
    "Intake",
    "SeqResult",
    "SeqStatus",
    "SequenceTracker",
    "from_dict",
    "parse_event",
]
