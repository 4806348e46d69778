"""Repair ZooKeeper from the active node's proxy after events were lost (a sequence gap, a coordinator down).

The active proxy is the truth: every REGISTER of the cluster went through it, and replication pushed every
peer's binding into it before it took over. :func:`reconcile` diffs its ``ul.dump`` against the store and
writes the difference as ordinary, epoch-fenced events:

* a binding the proxy has and the store lacks (or holds with another expiry) is written from the proxy;
  when the proxy's copy was itself pushed by replication (``ul.add`` cannot carry received/socket/Call-ID),
  the store's richer record is kept and only its expiry taken from the proxy;
* a binding the store has and the proxy lacks is deleted.

Races: the dump is read while the loop keeps writing events; every binding an event touched after the dump
began is excluded (``exclude``: the event is newer than the dump), so this node's other records are judged by
the dump alone. A *peer's* record written shortly before or after the dump began (``ts_ms``
after the dump's start minus ``margin_s``) is left alone in both directions: replication may not have pushed
it into this proxy yet. Events still queued in the intake are applied after the reconciliation, in order, so
they end at the newest state either way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Set
from dataclasses import dataclass

from ha.coordinator.events import ContactEvent
from ha.coordinator.proxytable import ProxyBinding
from ha.coordinator.store import ContactRecord, Store

EXPIRY_SLACK_S = 2  # ul.dump gives whole seconds left; the store holds absolute times


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    proxy: int  # bindings the proxy holds
    store: int  # bindings the store held before
    added: int
    updated: int
    removed: int
    skipped_recent: int
    unsettled: int = 0  # changed in the proxy between the dump and a second look: left to the next reconciliation

    @property
    def repaired(self) -> int:
        return self.added + self.updated + self.removed

    def __str__(self) -> str:
        s = (f"proxy {self.proxy} bindings, store {self.store}: added {self.added}, updated {self.updated}, "
             f"removed {self.removed}")
        s += f" ({self.skipped_recent} written meanwhile, left alone)" if self.skipped_recent else ""
        return s + (f" ({self.unsettled} changed in the proxy since its dump, left)" if self.unsettled else "")


def _event(rec: ContactRecord, kind: str, node: str, ts_ms: int) -> ContactEvent:
    """A contact event carrying a record; seq 0 marks it as made by reconciliation, not by the proxy."""
    left = max(rec.expires_at - ts_ms // 1000, 0)
    return ContactEvent(
        seq=0, node=node, type=f"contact.{kind}", ts=ts_ms, boot=0, aor=rec.aor, contact=rec.contact,
        expires=0 if kind == "delete" else left, expires_at=0 if kind == "delete" else rec.expires_at, q=rec.q,
        received=rec.received, socket=rec.socket, path=rec.path, callid=rec.callid, cseq=rec.cseq,
        user_agent=rec.user_agent, flags=rec.flags, cflags=rec.cflags, methods=rec.methods, ruid="",
    )  # fmt: skip


def diff(
    proxy: Mapping[tuple[str, str], ProxyBinding],
    stored: Mapping[tuple[str, str], ContactRecord],
    node: str,
    started_ms: int,
    margin_s: float = 2.0,
    exclude: Set[tuple[str, str]] = frozenset(),
) -> tuple[list[ContactEvent], dict[str, int]]:
    """The events that make the store equal the proxy, and how many of each kind.

    ``exclude``: bindings an event changed after the dump began (the event is newer than the dump)."""
    fresh_after = started_ms - int(margin_s * 1000)
    events: list[ContactEvent] = []
    n = {"added": 0, "updated": 0, "removed": 0, "skipped_recent": 0}
    for key, pb in proxy.items():
        if key in exclude:
            n["skipped_recent"] += 1
            continue
        zk = stored.get(key)
        if zk is None:
            events.append(_event(pb.record, "insert", node, started_ms))
            n["added"] += 1
        elif abs(zk.expires_at - pb.record.expires_at) > EXPIRY_SLACK_S:
            if zk.node != node and zk.ts_ms >= fresh_after:
                n["skipped_recent"] += 1
                continue
            rec = pb.record
            if pb.pushed:  # keep what ul.add could not carry (received, socket, Call-ID ...)
                rec = ContactRecord(**{**{f: getattr(zk, f) for f in ContactRecord.__slots__ if f != "version"},
                                       "expires_at": pb.record.expires_at})
            events.append(_event(rec, "update", node, started_ms))
            n["updated"] += 1
    for key, zk in stored.items():
        if key in proxy:
            continue
        if key in exclude:
            n["skipped_recent"] += 1
            continue
        if zk.node != node and zk.ts_ms >= fresh_after:
            n["skipped_recent"] += 1
            continue
        events.append(_event(zk, "delete", node, started_ms))
        n["removed"] += 1
    return events, n


def reconcile(store: Store, proxy: Mapping[tuple[str, str], ProxyBinding], node: str,
              started_ms: int | None = None, margin_s: float = 2.0,
              exclude: Set[tuple[str, str]] = frozenset()) -> ReconcileResult:
    """Make the store hold exactly the proxy's bindings; raises StaleEpoch/StoreUnavailable like any write.

    ``started_ms``: when the dump was started (default: now); take it *before* calling ``ul.dump``.
    """
    started = int(time.time() * 1000) if started_ms is None else started_ms
    stored = {(r.aor, r.contact): r for r in store.snapshot().contacts}
    events, n = diff(proxy, stored, node, started, margin_s, exclude)
    if events:
        store.write(events)
    return ReconcileResult(proxy=len(proxy), store=len(stored), **n)


__all__ = ["ReconcileResult", "diff", "reconcile"]
