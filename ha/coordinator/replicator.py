"""Keep the local (warm standby) proxy in step with the bindings peers write to the store.

The store's watch delivers every binding once at start (a resync) and then each change. The replicator
decides what the local proxy must do with it and hands that to :class:`~ha.coordinator.apply.ProxyApplier`:

* a binding written by **this** node came from this node's own proxy, which already has it; pushing it back
  with ``ul.add`` would even wipe what ``ul.add`` cannot carry (the received address of a NATed phone).
  So this node's own writes are skipped, except on a resync after the local proxy *restarted*
  (``include_own=True``): its table is empty then and needs everything.
* a delete is applied only if the last version of the binding was written by a peer (a binding this
  node's proxy wrote and then removed or let expire is already gone here).

Every pass ends in one sentence (``last_status``) for the service's log, Patroni-style.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ha.coordinator.apply import ApplyResult, ProxyApplier
from ha.coordinator.store import Change, ContactRecord, Store, Watch

log = logging.getLogger(__name__)


@dataclass
class ReplicatorStats:
    passes: int = 0
    added: int = 0
    removed: int = 0
    skipped_own: int = 0
    errors: int = 0


class Replicator:
    """Watch-driven: ``start()`` once; changes are applied on the store's watch thread, in order."""

    def __init__(self, store: Store, applier: ProxyApplier, node: str, *, include_own: bool = False) -> None:
        self.store = store
        self.applier = applier
        self.node = node
        self.include_own = include_own  # for the first resync only (the local proxy just started)
        self.stats = ReplicatorStats()
        self.last_status = "not started"
        self.synced = threading.Event()  # set after the first resync was applied
        self._watch: Watch | None = None

    @property
    def running(self) -> bool:
        return self._watch is not None

    def start(self) -> None:
        self._watch = self.store.watch_contacts(self.on_changes)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def resync_own_next(self) -> None:
        """The local proxy restarted (the intake saw its sequence restart): re-push everything, own included."""
        self.include_own = True
        self.stop()
        self.synced.clear()
        self.start()

    def _wanted(self, rec: ContactRecord, resync: bool) -> bool:
        return rec.node != self.node or (resync and self.include_own)

    def on_changes(self, changes: list[Change]) -> None:
        adds: list[ContactRecord] = []
        removes: list[ContactRecord] = []
        resync = not changes or any(c.resync for c in changes)  # an empty batch is an empty store's resync
        skipped = 0
        for c in changes:
            if not self._wanted(c.record, c.resync):
                skipped += 1
            elif c.kind == "put":
                adds.append(c.record)
            else:
                removes.append(c.record)
        res = self.applier.apply(adds, removes) if adds or removes else ApplyResult()
        self.stats.passes += 1
        self.stats.added += res.added
        self.stats.removed += res.removed
        self.stats.skipped_own += skipped
        self.stats.errors += len(res.errors)
        what = "resync" if resync else "changes"
        self.last_status = f"{what}: {len(changes)} from the store, {res}; {skipped} own skipped"
        (log.warning if res.errors else log.info)("replicator %s", self.last_status)
        if resync:
            self.include_own = False
            self.synced.set()


__all__ = ["Replicator", "ReplicatorStats"]
