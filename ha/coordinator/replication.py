"""Everything between the intake socket and ZooKeeper / the local proxy, as one object the service drives.

``service.py`` owns the sockets and the loop; it calls, from that one loop thread:

* ``feed(datagram, peer)`` for each datagram (validated, sequence-checked, queued when this node writes),
* ``flush()`` after each drained burst (one batched, epoch-fenced write; journaled if ZooKeeper has no
  quorum),
* ``tick()`` about once a second (journal replay once ZooKeeper is back, expired-binding GC on the elected
  node),
* ``promote()`` when this node takes over (VIP here: bump the epoch, fencing the old active) and
  ``demote()`` when it stops being active,
* ``status()`` for the status socket, ``close()`` at exit.

The replicator runs on the store's watch thread and pushes peers' bindings into the local proxy. Only the
active node writes its proxy's events: the standby's proxy sees no REGISTERs (the VIP is elsewhere), and
its ``contact.expired`` events for replicated bindings are left to the store's GC. Every method returns
the sentence to log (or None when there is nothing worth a line), the Patroni habit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient

from ha.coordinator.apply import ProxyApplier
from ha.coordinator.events import Event, Intake, SeqStatus
from ha.coordinator.journal import BufferedWriter, Journal, JournalFull
from ha.coordinator.replicator import Replicator
from ha.coordinator.store import StaleEpoch, Store, StoreUnavailable, ZkStore

log = logging.getLogger(__name__)

DEFAULT_JOURNAL = "/var/lib/sipha/coordinator-journal.jsonl"
MAX_PENDING = 5000  # events per flush; a burst larger than this is written in several flushes


class Replication:
    def __init__(
        self,
        store: Store,
        node: str,
        journal: Journal,
        applier: ProxyApplier | None = None,
        *,
        gc_grace_s: int = 30,
        gc_interval_s: float = 30.0,
    ) -> None:
        self.store = store
        self.node = node
        self.intake = Intake()
        self.writer = BufferedWriter(store, journal)
        self.replicator = Replicator(store, applier, node) if applier is not None else None
        self.active = False
        self.gc_grace_s = gc_grace_s
        # GC reads every binding: at 100k that is a few seconds of ZooKeeper work, so not every tick.
        self.gc_interval_s = gc_interval_s
        self._next_gc = 0.0
        self.pending: list[Event] = []
        self.started = False
        self.dropped = 0  # events lost because the journal was full (reconciliation repairs them)
        self.fenced = 0
        self.gc_deleted = 0
        self.last = "not started"

    @classmethod
    def from_model(
        cls,
        cluster: Any,
        node: str,
        *,
        journal_path: str | Path = DEFAULT_JOURNAL,
        rpc_socket: str | Path | None = None,
    ) -> Replication:
        """Build the real thing from the cluster model: kazoo client on every ZooKeeper member, the journal,
        and the JSON-RPC client of the local Kamailio (``ha.proxy.kamailio.Rpc``)."""
        from ha.proxy.kamailio import Rpc  # imported here: only the service needs the proxy adapter

        z = cluster.zookeeper
        hosts = ",".join(f"{h.ip}:{z.client_port}" for h in cluster.zk_members)
        client = KazooClient(
            hosts=hosts, timeout=z.session_timeout_ms / 1000, connection_retry={"max_tries": -1, "max_delay": 1}
        )
        client.start_async()  # never block the service's start on a ZooKeeper that is not there yet
        store = ZkStore(client, cluster.name, node)
        return cls(store, node, Journal(journal_path), ProxyApplier(Rpc(rpc_socket, timeout=2.0)))

    # -- the loop's calls ----------------------------------------------------------------------------------

    def start(self) -> str:
        """Create the layout and start replicating peers' bindings into the local proxy."""
        try:
            if isinstance(self.store, ZkStore):
                self.store.ensure_layout()
        except StoreUnavailable as exc:
            return f"zookeeper not reachable yet ({exc}); will retry on tick"
        if self.replicator is not None and not self.replicator.running:
            self.replicator.start()
        self.started = True
        self.last = "replication started: watching the store for peers' bindings"
        return self.last

    def feed(self, data: bytes, peer: object = None) -> str | None:
        got = self.intake.feed(data, peer)
        if got is None:
            return None  # counted (and rate-limited logging) in the intake
        msg = None
        if got.seq.status is SeqStatus.RESTART:
            msg = f"proxy {got.event.node} restarted: full resync of its table from the store"
            if self.replicator is not None:
                self.replicator.resync_own_next()
        elif got.seq.status is SeqStatus.GAP:
            msg = f"proxy {got.event.node}: {got.seq.missing} events lost before seq {got.event.seq}"
        if self.active:
            self.pending.append(got.event)
        return msg

    def flush(self) -> str | None:
        """Write what feed() queued: one call, batched transactions; journaled when ZooKeeper is away."""
        if not self.pending:
            return None
        batch, self.pending = self.pending[:MAX_PENDING], self.pending[MAX_PENDING:]
        try:
            out = self.writer.write(batch)
        except JournalFull as exc:
            self.dropped += len(batch)
            self.last = f"DROPPED {len(batch)} events: {exc}"
        except StaleEpoch as exc:
            self.fenced += len(batch)
            self.active = False
            self.pending.clear()
            self.last = f"FENCED, stopped writing ({exc}); {len(batch)} events not written"
        else:
            self.last = out.message
        return self.last

    def tick(self) -> str | None:
        """Periodic work: replay the journal when ZooKeeper is back, collect expired bindings if elected."""
        said = []
        if not self.started:
            if not self.store.available:
                return None
            said.append(self.start())
        if self.writer.journal and self.store.available:
            try:
                said.append(f"replayed {self.writer.replay()} journaled events")
            except StoreUnavailable as exc:
                said.append(f"journal replay postponed: {exc}")
            except StaleEpoch as exc:
                self.active = False
                said.append(f"FENCED while replaying the journal ({exc}); journal kept at {self.writer.journal.path}")
        if self.store.available and time.monotonic() >= self._next_gc:
            self._next_gc = time.monotonic() + self.gc_interval_s
            try:
                n = self.store.gc_expired(grace_s=self.gc_grace_s)
            except StoreUnavailable:
                n = 0
            if n:
                self.gc_deleted += n
                said.append(f"collected {n} expired bindings")
        return "; ".join(said) or None

    def promote(self) -> str:
        """This node takes over: a new epoch fences every older writer (a partitioned old active included)."""
        epoch = self.store.bump_epoch()
        self.active = True
        self.last = f"active at epoch {epoch}: writing this node's proxy events"
        return self.last

    def demote(self) -> str:
        self.active = False
        self.pending.clear()
        self.last = "standby: not writing; applying peers' bindings"
        return self.last

    def status(self) -> dict[str, Any]:
        rep = self.replicator
        return {
            "active": self.active,
            "epoch": self.store.epoch,
            "zookeeper": "connected" if self.store.available else "unavailable",
            "accepted": self.intake.accepted,
            "rejected": dict(self.intake.rejected),
            "gaps": self.intake.tracker.gaps,
            "lost": self.intake.tracker.lost,
            "proxy_restarts": self.intake.tracker.restarts,
            "pending": len(self.pending),
            "journal_bytes": self.writer.journal.size,
            "dropped": self.dropped,
            "fenced": self.fenced,
            "gc_deleted": self.gc_deleted,
            "replicator": rep.last_status if rep else "off",
            "last": self.last,
        }

    def close(self) -> None:
        if self.replicator is not None:
            self.replicator.stop()
        if isinstance(self.store, ZkStore):
            self.store.release_gc_lock()
        self.writer.journal.close()


__all__ = ["DEFAULT_JOURNAL", "Replication"]
