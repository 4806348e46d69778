"""Everything between the intake socket and ZooKeeper / the local proxy, as one object the service drives.

``service.py`` owns the sockets and the loop; it calls, from that one loop thread:

* ``feed(datagram, peer)`` for each datagram (validated, sequence-checked, queued when this node writes),
* ``flush()`` when ``flush_due()`` says so: a full transaction's worth at once, else at most
  write_linger_s after the first pending event (one batched, epoch-fenced write; journaled if ZooKeeper has
  no quorum),
* ``tick()`` about once a second (start once ZooKeeper answers, journal replay, a failed resync retried, the
  local proxy's boot time checked for a silent restart, reconciliation from ``ul.dump`` after lost events,
  expired-binding GC on the elected node),
* ``promote()`` when this node takes over (VIP here: bump the epoch, fencing the old active) and
  ``demote()`` when it stops being active,
* ``status()`` for the status socket, ``close()`` at exit; ``ready`` says whether the local proxy holds the
  store's state (the service turns it into the health service's readiness file).

Reconciliation (active node only, :mod:`ha.coordinator.reconcile`): scheduled by a sequence gap, a journal
overflow, a proxy restart and every promotion (events sent before this node knew it was active were not
written), run from ``tick()`` once the journal is empty and the local proxy is synced (an unsynced proxy is
no truth: it lacks bindings).

The replicator runs on the store's watch thread and pushes peers' bindings into the local proxy. Only the
active node writes its proxy's events: the standby's proxy sees no REGISTERs (the VIP is elsewhere), and
its ``contact.expired`` events for replicated bindings are left to the store's GC. Every method returns
the sentence to log (or None when there is nothing worth a line), the Patroni habit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ha.coordinator import proxytable, zkauth
from ha.coordinator.apply import ProxyApplier
from ha.coordinator.events import ContactEvent, DialogEvent, Event, Intake, SeqStatus
from ha.coordinator.journal import BufferedWriter, Journal, JournalFull
from ha.coordinator.proxytable import ProxyBinding
from ha.coordinator.reconcile import ReconcileResult, diff
from ha.coordinator.replicator import ProxyNotAnswering, Replicator
from ha.coordinator.store import StaleEpoch, Store, StoreUnavailable, ZkStore
from ha.coordinator.zkhandler import new_client
from ha.proxy.kamailio import RpcError

log = logging.getLogger(__name__)

DEFAULT_JOURNAL = "/var/lib/sipha/coordinator-journal.jsonl"
MAX_PENDING = 5000  # events per flush; a burst larger than this is written in several flushes
# How long the first of a few pending events may wait for others before they are written (flush_due; the model's
# zookeeper.write_linger_ms). Why: the cost of a write is mostly per transaction, not per binding: the three
# ZooKeeper members, both coordinators (the standby applies each transaction's changes in one pass) and the
# GIL hand-offs between their threads cost the same for 2 bindings as for 40. Written as soon as they came
# (one transaction per ZooKeeper round trip), 500 REGISTER/s made ~200 transactions/s and kept ~1.3 cores of
# the lab's 2 busy (BENCHMARKS.md).
WRITE_LINGER_S = 0.01
# Back-pressure (pace): when the intake is this far behind its proxy's events, the proxy answers REGISTERs 503
# (kamailio.cfg, htable "shed") until it is back under SHED_CAUGHT_UP_S. Why: with the proxy's events cheap, the
# lab's proxy accepted 5.5k REGISTER/s, twice what this path replicates; the intake's buffer filled, tens of
# thousands of events were dropped and the table took a reconciliation of 20 s+ to agree again. A REGISTER
# refused with a Retry-After is one the phone repeats; one accepted and not replicated is lost at a failover.
SHED_BEHIND_S = 1.0
SHED_CAUGHT_UP_S = 0.25
# Each refresh sheds this long: a coordinator that died mid-spell stops it by not refreshing. Not shorter: a
# loop held 12.7 s by one write (a node that took over under a storm, lab) let a 3 s spell run out, the proxy
# took everything, and 83k events overflowed the intake's socket.
SHED_HOLD_S = 10
# A spell lasts at least this long. Why: "behind" is the age of the last event of a receive batch, a noisy
# signal; a spell begun on one old batch and ended on the next (milliseconds later) refused a handful of
# phones for nothing and logged two lines per blip.
SHED_MIN_S = 1.0
# During a spell the proxy still takes this share of what the intake drained in the last second, per second
# (kamailio.cfg: shed=>limit), and sheds only the REGISTERs over it. Why: all-or-nothing spells took a storm at
# 3.5k/s where the path carries 5k/s (the spell lasts while the backlog drains, seconds, and takes nothing); the
# share below 1 is what drains the backlog. 0 = shed every REGISTER.
SHED_TAKE_SHARE = 0.8
LINGER_MAX_EVENTS = 99  # a full transaction's worth (store.BATCH_OPS less the epoch check) is written at once
GAP_LOG_EVERY_S = 5.0  # at most one log line about sequence gaps per interval (the summary counts them all)
# Reconciliation's writes per tick (~0.25 s of ZooKeeper when idle): the loop keeps answering status. Only from
# tick(), not after each intake burst: under overload that made every burst's flush longer, and the agent's 1 s
# status monitor failed more.
REPAIR_CHUNK = 1000
# Dialog events the local proxy sent while this node was not (yet) active, kept for the promotion. Why: the VIP
# is on this node before the once-a-second role check says so, and the calls hung up in that window (the
# BYEs of every call that outlived a failover come at once) were lost with their CDRs; reconciliation repairs
# only bindings (ul.dump), nothing repairs a dialog. Measured in the lab: 200 BYEs 0.1 s after the VIP
# answered, all 200 dialog.end events before the promotion, 0 CDRs. Bounded in count and age.
# The standby's audit (Replicator.audit): every AUDIT_INTERVAL_S (longer for a big table, see _standby_audit), and
# AUDIT_SOON_S after changes could not be applied.
AUDIT_INTERVAL_S = 30.0
AUDIT_SOON_S = 2.0
AUDIT_SUSPECT_S = 5.0  # the next audit, when the view disagreed with the store on some bindings (check_view)
# A due audit waits while the replicator applies more than AUDIT_BUSY_PER_S changes/s (over the last
# AUDIT_BUSY_WINDOW_S), for at most AUDIT_MAX_DEFER_S. Why: the audit reads the whole store (~3.7 s of this
# process's CPU for 27k bindings under load) and the proxy's bindings over its single JSON-RPC worker (13 s for
# 27k paced lookups at 1000 REGISTER/s), the same worker the live ul.adds queue on: in the replication bench each
# audit during a load step made the standby's lag p99 ~1 s. An integrity check can wait for a calmer minute.
AUDIT_BUSY_PER_S = 200.0
AUDIT_BUSY_WINDOW_S = 10.0
AUDIT_MAX_DEFER_S = 600.0
STANDBY_DIALOGS_KEPT = 20000
STANDBY_DIALOG_WINDOW_S = 60.0


FIRST_CONNECT_S = 5.0  # how long after its start ZooKeeper's absence still means "connecting" (materialize_pending)
VERIFY_AFTER_S = 2.0  # when the bindings events changed during a reconciliation are compared again (_reconciled)
# How old a table prepared at the coordinator's start may be when the proxy's start takes it (prepare_preload):
# its rows' expiry was checked then, and the manifest check allows a proxy booted up to BOOT_WINDOW_S after it.
PREPARED_MAX_AGE_S = 30.0
# The first expired-binding collection waits for the first resync, at most this long after the start. Why: a
# collection reads and decodes the whole store on its own thread (100k bindings: ~1 s of JSON), and at a node
# start it ran at once, beside the first read and the pushes that readiness waits for: py-spy on the node-start
# bench found its thread holding the GIL for ~0.7 s per start, and 2000 ul.add took 111-520 ms instead of 25-57.
GC_WAITS_FOR_RESYNC_S = 120.0
# How long a resync for a starting proxy waits for it to answer while its RPC socket is there but silent (see
# uptime_once_loaded).
PROXY_LOAD_WAIT_S = 15.0
SECOND_LOOK_WAIT_S = 10.0  # how long reconciliation's second look waits for the replicator (see _second_look)


def uptime_once_loaded(sock: Path, wait_s: float) -> Any:
    """``core.uptime`` of the local proxy, waiting up to ``wait_s`` while its socket is there but silent.

    Why: with ``wait_worker1_mode`` a starting Kamailio takes requests on its socket and answers them only once
    its preload table is loaded (0.6-1.5 s for 100k). A resync that gave up after one 0.5 s timeout was retried
    from the service's tick, behind the live table's rebuild on the watch thread: readiness came 1.2 s after the
    proxy held everything (a node start, BENCHMARKS.md "Restart resync"). A socket nobody reads (a dead proxy:
    refused at once) or no socket at all still fails at once."""
    from ha.proxy.kamailio import Rpc

    deadline = time.monotonic() + wait_s
    with Rpc(sock, timeout=0.5) as client:
        while True:
            try:
                return client.call("core.uptime")  # a late reply to an earlier try is skipped by its id
            except RpcError as exc:
                if "no answer" not in str(exc) or time.monotonic() >= deadline:
                    raise


def shed_proxy(rpc: Any, until: int, limit: int) -> None:
    """Set the proxy's shedding (kamailio.cfg, htable "shed"): the REGISTERs per second it still takes, then how
    long (epoch s; 0 ends it). The limit first: a spell must not begin with the previous spell's."""
    rpc.call("htable.seti", "shed", "limit", limit)
    rpc.call("htable.seti", "shed", "until", until)


@dataclass(frozen=True)
class _Prepared:
    """A preload table copied from the node cache before the proxy's start asked (Replication.prepare_preload)."""

    path: Path
    written: Any  # materialize.Written
    manifest: Callable[[], Any]  # its manifest from the keys stored with it (NodeCache.to_preload)
    at: float  # monotonic


@dataclass(frozen=True)
class _Diffed:
    """What a reconciliation's worker read and diffed (Replication.start_reconcile)."""

    events: list[ContactEvent]
    counts: dict[str, int]
    proxy: int
    store: int
    read_s: float
    lag: str


def _rate(samples: deque[tuple[float, int]], now: float, total: int, window_s: float) -> float:
    """Per second, over about the last ``window_s``, of a running ``total`` sampled once per call (0 for the
    first second)."""
    samples.append((now, total))
    while len(samples) > 2 and now - samples[1][0] >= window_s:
        samples.popleft()
    t0, n0 = samples[0]
    return (total - n0) / (now - t0) if now - t0 >= 1.0 else 0.0


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
        dump_table: Callable[[], Mapping[tuple[str, str], ProxyBinding]] | None = None,
        proxy_boot: Callable[[], int | None] | None = None,
        reconcile_delay_s: float = 1.0,
        preload: Callable[[], dict[tuple[str, str], int] | None] | None = None,
        lookup_table: Callable[[Collection[str]], Mapping[tuple[str, str], ProxyBinding]] | None = None,
        write_linger_s: float = WRITE_LINGER_S,
    ) -> None:
        self.store = store
        self.write_linger_s = write_linger_s
        self.node = node
        self.intake = Intake()
        self.writer = BufferedWriter(store, journal)
        self.replicator = Replicator(store, applier, node) if applier is not None else None
        if self.replicator is not None:
            self.replicator.standby = lambda: not self.active
        self.active = False
        self.gc_grace_s = gc_grace_s
        # GC reads every binding: at 100k that is a few seconds of ZooKeeper work, so not every tick.
        self.gc_interval_s = gc_interval_s
        self._next_gc = 0.0
        self._gc: Future[int] | None = None  # a GC pass in flight on its own thread (see _collect)
        self.pending: list[Event] = []
        self._pending_since: float | None = None  # when the oldest event in pending was fed (flush_due)
        self._held: deque[tuple[float, DialogEvent]] = deque(maxlen=STANDBY_DIALOGS_KEPT)  # see STANDBY_DIALOGS_KEPT
        self.carried_over = 0  # dialog events held while standby and written at a promotion
        self._closers: list[Callable[[], None]] = []
        self.started = False
        self.dropped = 0  # events lost because the journal was full (reconciliation repairs them)
        self._gap_said = -GAP_LOG_EVERY_S  # monotonic time of the last gap log line
        self.fenced = 0
        self.gc_deleted = 0
        self.last = "not started"
        # Reconciliation (ul.dump vs the store) after events were lost; only the active node runs it.
        self.dump_table = dump_table
        # The proxy's bindings of some AoRs now (reconciliation's second look); default: from a whole dump.
        self.lookup_table = lookup_table
        self.reconcile_delay_s = reconcile_delay_s
        self.reconcile_due: float | None = None  # monotonic time it should run; None: not needed
        self._reconcile_forced = False  # scheduled for more than a sequence gap (see schedule_reconcile)
        self._forgotten_seen = 0
        self.reconciled: ReconcileResult | None = None
        self.reconcile_runs = 0
        self._pool: ThreadPoolExecutor | None = None
        self._write_pool: ThreadPoolExecutor | None = None
        self._gc_pool: ThreadPoolExecutor | None = None
        # The reads of a reconciliation in flight: the proxy's table, then the store's bindings.
        self._dump: Future[_Diffed] | None = None
        self._repairs: list[ContactEvent] = []  # its writes still to do, a chunk per tick (write_repairs)
        self._repair_counts: ReconcileResult | None = None
        self._late: list[tuple[list[Event], Callable[[list[Event]], Any], Future[Any]]] = []  # see _write_late
        self._standby_contacts: list[Event] = []  # this proxy's REGISTERs while not the writer (see feed)
        # The standby's audit of its proxy against the watch's view (Replicator.audit), run off the loop.
        self._audit: Future[Any] | None = None
        self._next_audit = time.monotonic() + AUDIT_INTERVAL_S
        self.audit_runs = 0
        self._applied: deque[tuple[float, int]] = deque()  # (monotonic, changes applied so far), per tick
        self._seen: deque[tuple[float, int]] = deque()  # (monotonic, store changes the watch saw so far), per tick
        self._audit_deferred_since: float | None = None
        self._audit_urgent = False  # changes failed to apply: the next audit runs even while busy
        self.late_written = 0
        self._repair_read_s = 0.0
        self._touched: set[tuple[str, str]] | None = None  # bindings events changed while it is in flight
        self._verify: tuple[float, set[tuple[str, str]]] | None = None  # (when, bindings): see _reconciled
        self._subset: set[tuple[str, str]] | None = None  # the bindings the reconciliation in flight compares
        self._dump_started_ms = 0
        self._dump_t0 = 0.0
        # The local proxy's boot time (epoch s) from its uptime, polled on tick: a restart that sent no event
        # (nobody registered since) must still trigger the full resync of its empty table.
        self.proxy_boot_fn = proxy_boot
        # Back-pressure on the local proxy (pace): sets its shed "until" (epoch s, 0 = off) and the REGISTERs per
        # second it still takes meanwhile; None: no proxy.
        self.shed_fn: Callable[[int, int], None] | None = None
        self._behind_s = 0.0  # how far the intake is behind the proxy: the age of the newest event taken
        self._shed_until = 0
        self.shed_limit = 0  # REGISTERs per second the proxy takes during the spell in force
        self._drained: deque[tuple[float, int]] = deque()  # (monotonic, intake.accepted) per pace(), for _rate
        self._shed_started = 0.0  # time.monotonic() at the spell's start
        self._pace_mu = threading.Lock()  # pace() on the loop, pace_stuck() on the service's watchdog thread
        self.shed_spells = 0
        self.proxy_boot: int | None = None
        self.proxy_generation = 0  # +1 each time the local proxy is found restarted (the service drops readiness)
        self._next_boot_check = 0.0
        self._next_resync_retry = 0.0
        self._retry_boot: int | None = None  # the proxy's boot time at the last resync retry
        self.include_own_first = False  # the first resync also pushes this node's own bindings
        # The restart fast path: what the local proxy loaded from its preload table at start
        # (ha.coordinator.materialize), so a resync pushes only what changed since; None: no fast path.
        if self.replicator is not None:
            self.replicator.preload_source = preload
        self.preload_db: Path | None = None  # where materialize() writes the proxy's preload table
        self.written_manifest: Any = None  # what materialize() last wrote (a Manifest, or a Future of one)
        self.cluster_name = ""
        self.node_cache: Any = None  # ha.coordinator.nodecache.NodeCache: what the next node start begins from
        self._born = time.monotonic()
        # The node cache's table, copied for a proxy start before anyone asked (prepare_preload); taken by the
        # first materialize() of a node start.
        self._prepared: _Prepared | None = None
        self._prepare_tried = False

    @classmethod
    def from_model(
        cls,
        cluster: Any,
        node: str,
        *,
        journal_path: str | Path = DEFAULT_JOURNAL,
        rpc_socket: str | Path | None = None,
        hosts: str | None = None,
    ) -> Replication:
        """Build the real thing from the cluster model: kazoo client on every ZooKeeper member, the journal,
        and the JSON-RPC client of the local Kamailio (``ha.proxy.kamailio.Rpc``)."""
        from ha.proxy.kamailio import Rpc  # only the service needs the adapter
        from ha.proxy.kamailio import rpc_socket as default_socket

        z = cluster.zookeeper
        hosts = hosts or ",".join(f"{h.ip}:{z.client_port}" for h in cluster.zk_members)
        sock = Path(rpc_socket or default_socket())
        retry = {"max_tries": -1, "max_delay": 1}
        auth = zkauth.client_kwargs(z)  # ZkAuthError: the caller says it in one line
        client = new_client(hosts, timeout=z.session_timeout_ms / 1000, connection_retry=retry, **auth)
        client.start_async()  # never block the service's start on a ZooKeeper that is not there yet
        reader = new_client(hosts, timeout=z.session_timeout_ms / 1000, connection_retry=dict(retry), **auth)
        reader.start_async()  # whole-store reads (ZkStore.reader): never in front of this node's writes
        store = ZkStore(client, cluster.name, node, reader=reader)
        loop_rpc = Rpc(sock, timeout=0.3)  # the loop's own client (the applier's runs on the watch thread)

        def proxy_boot() -> int | None:
            try:
                up = loop_rpc.call("core.uptime")
            except (RpcError, OSError):
                return None
            return int(time.time() - float(up["uptime"])) if isinstance(up, dict) and "uptime" in up else None

        apply_rpc = Rpc(sock, timeout=2.0)
        from ha.coordinator import materialize
        from ha.coordinator.nodecache import NodeCache, preloaded_from

        preload_db = sock.parent / materialize.DB_NAME

        def preload() -> dict[tuple[str, str], int] | None:
            """What the proxy answering now loaded at its start (runs on the watch thread: its own socket)."""
            try:
                up = uptime_once_loaded(sock, PROXY_LOAD_WAIT_S)
                boot = int(time.time() - float(up["uptime"]))
            except (RpcError, OSError) as exc:
                raise ProxyNotAnswering(f"the local proxy does not answer ({exc})") from None
            except (KeyError, TypeError, ValueError):
                return None
            known = repl.written_manifest
            if isinstance(known, Future):  # being read back (see materialize)
                try:
                    known = known.result(timeout=10)
                except Exception:  # the read below says why, or gives up on the fast path
                    known = None
            m = materialize.manifest_for_boot(preload_db, boot, cluster.name, known=known)
            if m is None:
                return None
            log.info("the proxy (boot %s) preloaded %d bindings: the resync pushes only what changed since",
                     boot, len(m.loaded))
            return preloaded_from(m, store.identity)

        repl = cls(store, node, Journal(journal_path), ProxyApplier(apply_rpc),
                   dump_table=lambda: proxytable.dump(sock), proxy_boot=proxy_boot, preload=preload,
                   lookup_table=lambda aors: proxytable.lookup(sock, aors), write_linger_s=z.write_linger_ms / 1000)
        repl._closers += [loop_rpc.close, apply_rpc.close, client.stop, client.close, reader.stop, reader.close]
        shed_rpc = Rpc(sock, timeout=0.3)  # its own: pace_stuck() calls it while the loop may use loop_rpc
        repl._closers.append(shed_rpc.close)
        repl.shed_fn = lambda until, limit: shed_proxy(shed_rpc, until, limit)
        repl.preload_db, repl.cluster_name = preload_db, cluster.name
        repl.node_cache = NodeCache(Path(journal_path).parent / "node-cache", cluster.name, lambda: store.identity)
        # Loaded by the first read, while the servers answer it (loaded at once, it slowed the proxy's table down)
        store.view_seed = repl.node_cache.load_view
        if repl.replicator is not None:
            from ha.coordinator.livetable import LiveTable

            repl.replicator.live = LiveTable()
        return repl

    @property
    def materialize_pending(self) -> bool:
        """Whether a materialize() that failed is worth asking again soon: ZooKeeper answers, so the view (and
        then the live table) is on its way; not when ZooKeeper is away (the proxy should not wait for it)."""
        if self.replicator is None:
            return False
        # Just started (a node start: the proxy agent asks at once): ZooKeeper's first connection is on its way.
        return self.store.available or (not self.started and time.monotonic() - self._born < FIRST_CONNECT_S)

    def prepare_preload(self) -> str | None:
        """At the coordinator's first start: copy the node cache's table for the proxy's start now, beside the
        preload table (not over it: a running proxy's manifest is that file), so that the agent's materialize()
        is a rename. Why: on a node start the agent asks while this coordinator's first read of ZooKeeper runs,
        and the copy then took 0.2-0.5 s instead of 0.06 s, every millisecond of it before Kamailio may start
        loading (BENCHMARKS.md, "Restart resync"). Once only; never raises."""
        from ha.coordinator import materialize

        if self._prepare_tried or self.preload_db is None or self.node_cache is None:
            return None
        self._prepare_tried = True
        dst = self.preload_db.with_name(f".{self.preload_db.name}.prepared")
        try:
            w, stored = self.node_cache.to_preload(dst, self._preload_meta("node cache"))
        except materialize.MaterializeError as exc:
            return f"no node cache table to prepare ({exc})"
        self._prepared = _Prepared(dst, w, stored, time.monotonic())
        return f"preload table prepared from the node cache: {w.bindings} bindings in {w.write_s * 1000:.0f} ms"

    def _drop_prepared(self, older_than_s: float | None = None) -> None:
        """Remove the prepared table (25 MB per 100k bindings on /run); with ``older_than_s``, only if older."""
        p = self._prepared
        if p is not None and (older_than_s is None or time.monotonic() - p.at > older_than_s):
            p.path.unlink(missing_ok=True)
            self._prepared = None

    def _take_prepared(self) -> dict[str, Any] | None:
        """The prepared table renamed into place for a starting proxy, or None (none, or too old to be current)."""
        self._drop_prepared(PREPARED_MAX_AGE_S)
        prepared, self._prepared = self._prepared, None
        if prepared is None or self.preload_db is None:
            return None
        try:
            prepared.path.replace(self.preload_db)
        except OSError as exc:
            log.warning("the prepared preload table could not be used (%s): copying again", exc)
            return None
        self._manifest_later(prepared.manifest, str(self.preload_db))
        log.info("preload table for the starting proxy: %d bindings from the node cache, prepared %.1f s ago",
                 prepared.written.bindings, time.monotonic() - prepared.at)
        return {"ok": True, "bindings": prepared.written.bindings, "path": str(self.preload_db), "ms": 0,
                "from": "node cache"}

    def _preload_meta(self, source: str) -> dict[str, Any]:
        return {"cluster": self.cluster_name, "node": self.node, "source": source}

    def _manifest_later(self, stored: Callable[[], Any], path: str) -> None:
        """The manifest of a table copied from the node cache: from the keys stored with it, else from its rows;
        either on a thread, while the proxy loads it."""
        from ha.coordinator import materialize

        self.written_manifest = _in_thread(lambda: stored() or materialize.read_manifest(path))

    def materialize(self) -> dict[str, Any]:
        """Write the proxy's preload table from the watch's current view (the restart fast path, asked by the
        proxy agent's start): no store read, so a restart costs the SQLite write and Kamailio's load only."""
        from ha.coordinator import materialize

        rep = self.replicator
        meta = self._preload_meta("coordinator")
        t0 = time.monotonic()
        if rep is not None and self.preload_db is not None and self.node_cache is not None and (
            not rep.view_complete or (rep.live is not None and not rep.live.complete)
        ):
            # A node start (or a proxy start during a resync): the table this node saved last, at once; the
            # resync then pushes what changed since (every row carries its mzxid).
            taken = self._take_prepared()
            if taken is not None:
                return taken
            try:
                w, stored = self.node_cache.to_preload(self.preload_db, self._preload_meta("node cache"))
            except materialize.MaterializeError as exc:
                log.info("no cached preload table (%s)", exc)
            else:
                self._manifest_later(stored, w.path)
                ms = round((time.monotonic() - t0) * 1000)
                log.info("preload table for the starting proxy: %d bindings from the node cache (%d expired left "
                         "out) in %d ms", w.bindings, w.expired, ms)
                return {"ok": True, "bindings": w.bindings, "path": w.path, "ms": ms, "from": "node cache"}
        if rep is None or self.preload_db is None or not rep.view_complete:
            raise materialize.MaterializeError("no complete view of the store yet")
        if rep.live is not None and not rep.live.complete:
            # Being built from the view just read (~1 s for 100k): worth waiting for, see materialize_pending.
            raise materialize.MaterializeError("the preload table is being built")
        source = "live"
        if rep.live is not None and rep.live.complete:
            w = rep.live.copy_to(self.preload_db, meta)  # kept current on the watch thread: a copy only
        else:
            source = "view"
            view = rep.view()
            if view is None:
                raise materialize.MaterializeError("no complete view of the store yet")
            w = materialize.write(self.preload_db, view.values(), meta)
        self.written_manifest = w.manifest
        ms = round((time.monotonic() - t0) * 1000)
        log.info("preload table for the starting proxy: %d bindings written to %s in %d ms", w.bindings, w.path, ms)
        return {"ok": True, "bindings": w.bindings, "path": w.path, "ms": ms, "from": source}

    # -- the loop's calls ----------------------------------------------------------------------------------

    def start(self) -> str:
        """Create the layout and start replicating peers' bindings into the local proxy."""
        try:
            if isinstance(self.store, ZkStore):
                self.store.ensure_layout()
        except StoreUnavailable as exc:
            return f"replication not started: {exc}; will retry on tick"  # unreachable, or not allowed in
        if self.replicator is not None and not self.replicator.running:
            self.replicator.start(include_own=self.include_own_first)
        self.started = True
        own = " (this node's own included: the proxy's table is new)" if self.include_own_first else ""
        self.last = f"replication started: loading the store's bindings into the local proxy{own}"
        return self.last

    @property
    def ready(self) -> bool:
        """The local proxy holds the store's state: replication started and its last resync was applied."""
        if not self.started:
            return False
        return self.replicator is None or self.replicator.synced.is_set()

    def proxy_restarted(self, why: str) -> str:
        """The local proxy's table is new (empty, or what it preloaded): push everything it lacks, own
        bindings included, then reconcile."""
        self.proxy_generation += 1
        self._retry_boot, self._next_resync_retry = None, 0.0  # a new proxy: retry the moment it answers
        if self.replicator is not None and self.started:
            self.replicator.resync_own_next()
        elif self.replicator is not None:
            self.include_own_first = True
        if self.active:
            self.schedule_reconcile()
        return f"local proxy restarted ({why}): full resync of its table from the store"

    def schedule_reconcile(self, delay: float | None = None, gap: bool = False) -> None:
        """Reconcile soon. ``gap``: only because the event sequence had a hole, which reordering between the
        proxy's SIP workers also makes: at the due time the reconciliation is skipped when every seq the gaps
        counted missing has arrived since (the bench saw ~5-9k gaps per run, all but 0-575 filled by late
        arrivals, and back-to-back reconciliations each reading both whole tables kept the active busy)."""
        due = time.monotonic() + (self.reconcile_delay_s if delay is None else delay)
        self.reconcile_due = due if self.reconcile_due is None else min(self.reconcile_due, due)
        if not gap:
            self._reconcile_forced = True

    def _reconcile_needed(self) -> bool:
        t = self.intake.tracker
        overdue = t.overdue(self.reconcile_delay_s * 0.9)  # missing since about the gap that scheduled this one
        return self._reconcile_forced or overdue > 0 or t.forgotten != self._forgotten_seen

    def reconcile(self) -> str:
        """Diff the local proxy's table against the store and repair the store, synchronously (active node)."""
        self.start_reconcile()
        assert self._dump is not None
        with contextlib.suppress(Exception):
            self._dump.result()
        said = self.finish_reconcile() or "reconcile: nothing"
        while self._repairs:
            said = self.write_repairs() or said
        return said

    def start_reconcile(self, subset: set[tuple[str, str]] | None = None) -> str:
        """Read the proxy's table, then the store, on a worker thread. The loop keeps taking events and answering
        status meanwhile: reading 20k bindings on the loop under overload blocked it for seconds, the agent's 1 s
        status monitor failed and Pacemaker restarted the coordinator in the middle of its repair. Every binding
        an event touches from now on is left out of the repair: the event is newer than anything the dump shows.

        ``subset``: compare only these bindings (their AoRs looked up in the proxy, their znodes read), not the
        whole table; the gap tracker is left alone (a verification, see _reconciled)."""
        if self.dump_table is None:
            raise RpcError("no way to read the proxy's table")
        if self.pending:
            self.flush()  # every event fed before the dump is in the store before the store is read
        if subset is None:
            t = self.intake.tracker
            t.settle()  # what is still missing is this reconciliation's to repair
            self._reconcile_forced, self._forgotten_seen = False, t.forgotten
        self._subset = subset
        self._touched = set()
        self._dump_started_ms = int(time.time() * 1000)
        self._dump_t0 = time.monotonic()
        dump_table, store, touched, started = self.dump_table, self.store, self._touched, self._dump_started_ms

        def read() -> _Diffed:
            if subset is None:
                table = dump_table()
                stored = {(r.aor, r.contact): r for r in store.snapshot().contacts}
            else:
                table = {k: v for k, v in self._look_up({a for a, _ in subset}).items() if k in subset}
                stored = store.read_contacts(subset) if isinstance(store, ZkStore) else {
                    (r.aor, r.contact): r for r in store.snapshot().contacts if (r.aor, r.contact) in subset}
            t_read = time.monotonic() - self._dump_t0
            # set(touched): one C-level copy under the GIL while the loop keeps adding to it.
            events, n = diff(table, stored, self.node, started, exclude=set(touched))
            events, n["unsettled"], lag = self._second_look(events, table)
            return _Diffed(events, n, len(table), len(stored), t_read, lag)

        self._dump = self._worker().submit(read)
        if subset is not None:
            return f"verifying {len(subset)} bindings events changed during the last reconciliation"
        return "reconcile: reading the proxy's table and the store"

    def _look_up(self, aors: set[str]) -> Mapping[tuple[str, str], ProxyBinding]:
        """The proxy's bindings of these AoRs now (ul.lookup; from a whole dump without a lookup function)."""
        if self.lookup_table is not None:
            return self.lookup_table(aors)
        assert self.dump_table is not None
        return {k: v for k, v in self.dump_table().items() if k[0] in aors}

    def _second_look(self, events: list[ContactEvent], table: Mapping[tuple[str, str], ProxyBinding],
                     ) -> tuple[list[ContactEvent], int, str]:
        """Look at the proxy again for the bindings a repair would add to or remove from the store, once the
        replicator has applied every change the store notified so far: a binding whose presence in the proxy
        changed since the dump is left to the next reconciliation.

        Why: the dump is read seconds before the store under load (11 s in a CI run), and the replicator pushes
        peers' changes into this proxy meanwhile. A peer's delete applied after the dump made the dump's stale
        copy look like a binding the store lost: the repair wrote it back, the peer's replicator pushed it into
        the standby proxy, and 59 bindings the phones had removed stayed in ZooKeeper and the standby (never in
        this proxy again) for good. The mirror case, a peer's new binding applied after the dump, was deleted
        from the store: a registration lost. Runs on the worker thread (lookups of those AoRs only)."""
        rep = self.replicator
        if not events:
            return events, 0, ""
        lag = "" if rep is None or rep.wait_caught_up(SECOND_LOOK_WAIT_S) else (
            f"; the watch was still behind after {SECOND_LOOK_WAIT_S:.0f} s")
        now = self._look_up({ev.aor for ev in events})
        keep = [ev for ev in events if ((ev.aor, ev.contact) in table) == ((ev.aor, ev.contact) in now)]
        return keep, len(events) - len(keep), lag

    def finish_reconcile(self) -> str | None:
        """When both reads are in, the difference becomes repairs, written a chunk per tick (raises what the
        store or the dump raised)."""
        fut = self._dump
        if fut is None or not fut.done():
            return None
        self._dump = None
        self._repair_read_s = time.monotonic() - self._dump_t0
        try:
            d = fut.result()  # RpcError/OSError/StoreUnavailable: the caller postpones
        except BaseException:
            self._touched = self._subset = None
            raise
        if not self.active:
            self._touched = self._subset = None
            return "reconcile dropped: no longer active"
        self._repairs = d.events  # write_repairs leaves out what events touched since the copy diff() saw
        self._repair_counts = ReconcileResult(proxy=d.proxy, store=d.store, **d.counts)
        if not d.events:
            return self._reconciled() + d.lag
        return (f"reconcile: {len(d.events)} repairs to write ({d.read_s * 1000:.0f} ms to read the proxy's table "
                f"and the store, {self._repair_read_s * 1000:.0f} ms with a second look{d.lag})")

    def write_repairs(self, limit: int = REPAIR_CHUNK) -> str | None:
        """Write the next chunk of repairs, leaving out bindings an event changed since the dump began (the event
        is newer); the last chunk returns the summary. Raises StoreUnavailable/StaleEpoch like any write."""
        if not self._repairs:
            return None
        touched = self._touched or set()
        chunk, self._repairs = self._repairs[:limit], self._repairs[limit:]
        todo = [ev for ev in chunk if (ev.aor, ev.contact) not in touched]
        if todo:
            self.store.write(todo)
        return None if self._repairs else self._reconciled()

    def _reconciled(self) -> str:
        if self._touched and self._subset is None:
            # Events changed bindings while it ran; those were left to the events, trusting them to be the last
            # word. When one of them is not (an event lost before the dump, whose binding an older, reordered
            # event touched), nothing looks at that binding again until the next gap: under a flood with no
            # losses after it, one binding stayed only in ZooKeeper and the standby (lab). So those bindings are
            # compared once more, alone, VERIFY_AFTER_S later (one level: the verification's own are not).
            keys = set(self._touched) | (self._verify[1] if self._verify else set())
            self._verify = (time.monotonic() + VERIFY_AFTER_S, keys)
        subset, self._subset, self._touched = self._subset, None, None
        if subset is not None:
            return (f"verified {len(subset)} bindings ({self._repair_read_s * 1000:.0f} ms to read): "
                    f"{self._repair_counts}")
        self.reconciled = self._repair_counts
        self.reconcile_runs += 1
        return (f"reconciled ({self._repair_read_s * 1000:.0f} ms to read, "
                f"{(time.monotonic() - self._dump_t0 - self._repair_read_s) * 1000:.0f} ms to repair; bindings "
                f"changed by events meanwhile left to them): {self.reconciled}")

    def _progress_repairs(self) -> str | None:
        """One chunk of repairs; a failed write drops the rest and reconciles again later (it is idempotent)."""
        try:
            return self.write_repairs()
        except StoreUnavailable as exc:
            self._repairs, self._touched, self._subset = [], None, None
            self.schedule_reconcile(2.0)
            return f"reconcile postponed: {exc}"
        except StaleEpoch as exc:
            self._repairs, self._touched, self._subset = [], None, None
            self.active = False
            return f"FENCED while reconciling ({exc})"

    def feed(self, data: bytes, peer: object = None) -> str | None:
        got = self.intake.feed(data, peer)
        if got is None:
            return None  # counted (and rate-limited logging) in the intake
        msg = None
        if got.seq.status is SeqStatus.RESTART:
            b = got.event.boot
            if b and self.proxy_boot is not None and abs(b - self.proxy_boot) <= 2:
                msg = f"proxy {got.event.node} restarted (boot {b}): already seen by the boot check, resync under way"
            else:
                self.proxy_boot = b or self.proxy_boot
                msg = self.proxy_restarted(f"its event seq went back to {got.event.seq}")
        elif got.seq.status is SeqStatus.GAP:
            if self.active:
                self.schedule_reconcile(gap=True)
            now = time.monotonic()
            if now - self._gap_said >= GAP_LOG_EVERY_S:  # one line per interval, not per reordered event
                self._gap_said = now
                msg = (f"proxy {got.event.node}: events missing before seq {got.event.seq} ({self.intake.tracker.gaps}"
                       " gaps so far)" + (": reconciling from ul.dump unless they arrive late" if self.active else ""))
        if got.event.ts:
            self._behind_s = time.time() - got.event.ts / 1000
        if self.active:
            if not self.pending:
                self._pending_since = time.monotonic()
            self.pending.append(got.event)
        elif isinstance(got.event, DialogEvent):
            self._held.append((time.monotonic(), got.event))
        elif got.event.type != "contact.expired":
            # A REGISTER this proxy answered 200 while this node is not the writer: the VIP just moved (ARP caches
            # still send phones here) or is about to. Dropped, those phones were registered nowhere but here (the
            # lab's 10k burst lost 2736 so). Written where nothing newer is stored (flush). Expiries of replicated
            # bindings stay the GC's: a late refresh must not lose to this proxy's clock.
            self._standby_contacts.append(got.event)
        if self._touched is not None and isinstance(got.event, ContactEvent):
            self._touched.add((got.event.aor, got.event.contact))
        return msg

    def intake_empty(self) -> None:
        """The intake socket had nothing more: whatever the last event's age, the intake is not behind now."""
        self._behind_s = 0.0

    def pace(self) -> str | None:
        """Back-pressure: ask the proxy to answer REGISTERs 503 while the intake is SHED_BEHIND_S behind (refreshed
        at most once a second, each time for SHED_HOLD_S), and to take them again once it is back under
        SHED_CAUGHT_UP_S and the spell is SHED_MIN_S old. Only the writer sheds: a standby's intake writes
        nothing. Returns a line to log."""
        if self.shed_fn is None:
            return None
        with self._pace_mu:
            return self._pace()

    def pace_stuck(self, stuck_s: float) -> str | None:
        """Back-pressure while the service's loop is held (a write waiting on a starved ZooKeeper) and the intake's
        socket is filling: called from a watchdog thread, since the loop cannot measure how far behind it is.
        Sheds every REGISTER (limit 0: nothing drains meanwhile), refreshed at most once a second;
        pace() takes the spell over when the loop is back. Why: one write held the loop 23 s under an overload
        on a slow 2-core machine; the spell could only begin after it, by then the proxy had taken 117k
        REGISTERs that the intake was still reading 28 s later, and the copies were not in agreement 19 s after
        the storm."""
        if self.shed_fn is None or not self.active:
            return None
        with self._pace_mu:
            held = self._hold_spell(0)
            if held is None:
                return None
            starting, err = held
            if starting:
                return (f"the loop has been held {stuck_s:.1f} s (a write waiting on ZooKeeper) and the intake is "
                        f"filling up: every REGISTER answered 503 until it is back{err}")
            return f"still shedding REGISTERs: {err}" if err else None

    def _pace(self) -> str | None:
        assert self.shed_fn is not None
        mono = time.monotonic()
        drain_rate = _rate(self._drained, mono, self.intake.accepted, 1.0)  # events the intake took per second
        behind = self._behind_s if self.active else 0.0
        young = self.active and mono - self._shed_started < SHED_MIN_S
        if behind >= SHED_BEHIND_S or (self._shed_until and (behind > SHED_CAUGHT_UP_S or young)):
            held = self._hold_spell(int(SHED_TAKE_SHARE * drain_rate))
            if held is None:
                return None
            starting, err = held
            if starting:
                return (f"intake {behind:.1f} s behind the proxy: its REGISTERs over {self.shed_limit}/s answered 503 "
                        f"until it catches up{err}")
            return f"still shedding REGISTERs: {err}" if err else None
        if self._shed_until:
            self._shed_until = self.shed_limit = 0
            return f"intake caught up: the proxy takes REGISTERs again{self._shed(0, 0)}"
        return None

    def _hold_spell(self, limit: int) -> tuple[bool, str] | None:
        """Begin or refresh a spell with this limit (the caller holds _pace_mu): None when the last refresh is under
        a second old, else (whether the spell begins now, the proxy's refusal or ""). Why one place: pace() and
        pace_stuck() must count spells and time them the same way, or the hand-over between them miscounts."""
        now = time.time()
        if now < self._shed_until - SHED_HOLD_S + 1:
            return None
        starting = not self._shed_until
        self._shed_until, self.shed_limit = int(now) + SHED_HOLD_S, limit
        err = self._shed(self._shed_until, limit)
        if starting:
            self.shed_spells += 1
            self._shed_started = time.monotonic()
        return starting, err

    def _shed(self, until: int, limit: int) -> str:
        assert self.shed_fn is not None
        try:
            self.shed_fn(until, limit)
        except (RpcError, OSError) as exc:
            return f" (the proxy did not take it: {exc})"
        return ""

    def flush_due(self) -> float | None:
        """When the loop should call flush() (a time.monotonic() value; None: nothing is waiting).

        Now for a full transaction's worth and for this proxy's REGISTERs while not the writer; else when the
        oldest pending event has waited write_linger_s."""
        if self._standby_contacts and not self.active:
            return time.monotonic()
        if not self.pending:
            return None
        if len(self.pending) >= LINGER_MAX_EVENTS or self._pending_since is None:
            return time.monotonic()
        return self._pending_since + self.write_linger_s

    def flush(self) -> str | None:
        """Write what feed() queued: one call, batched transactions; journaled when ZooKeeper is away."""
        if self._standby_contacts and not self.active:
            events, self._standby_contacts = self._standby_contacts, []
            self.last = f"not the writer, this proxy's REGISTERs: {self._write_late(events, before_takeover=False)}"
            return self.last
        if not self.pending:
            return None
        batch, self.pending = self.pending[:MAX_PENDING], self.pending[MAX_PENDING:]
        self._pending_since = time.monotonic() if self.pending else None  # what is left is due at once anyway
        try:
            out = self.writer.write(batch)
        except JournalFull as exc:
            self.dropped += len(batch)
            self.schedule_reconcile()
            self.last = f"DROPPED {len(batch)} events: {exc}; reconciliation repairs them"
        except StaleEpoch as exc:
            late, self.pending = batch + self.pending, []
            self.active = False
            self.last = f"FENCED, stopped writing ({exc}); {self._write_late(late)}"
        else:
            self.last = out.message
        return self.last

    def _write_late(self, events: list[Event], before_takeover: bool = True) -> str:
        """Hand the events a newer epoch fenced to ZkStore.write_before_takeover, off the loop (thousands of
        pipelined reads and writes after a burst); tick() reports the outcome."""
        if not events:
            return "no events left unwritten"
        if not isinstance(self.store, ZkStore):
            self.fenced += len(events)
            return f"{len(events)} events not written"
        write = self.store.write_before_takeover if before_takeover else self.store.write_if_newer
        self._late.append((events, write, self._writer().submit(write, events)))
        if not before_takeover:
            return f"{len(events)} events: writing them where nothing newer is stored"
        return f"{len(events)} events: writing those from before the takeover, if nothing newer is stored"

    def _late_outcomes(self) -> list[str]:
        said = []
        while self._late and self._late[0][2].done():
            events, write, fut = self._late.pop(0)
            try:
                res = fut.result()
            except StoreUnavailable as exc:
                self._late.append((events, write, self._writer().submit(self._late_when_back, write, events)))
                said.append(f"unfenced write of this proxy's events: {exc}; trying again when zookeeper answers")
                continue
            except Exception as exc:  # whatever it was, the events are lost: say so
                said.append(f"this proxy's events NOT written ({exc!r}); the active's reconciliation cannot see "
                            "them")
                continue
            self.fenced += res.fenced + res.conflicts
            self.late_written += res.written
            said.append(f"this proxy's events written unfenced: {res}")
        return said

    def _late_when_back(self, write: Callable[[list[Event]], Any], events: list[Event]) -> Any:
        """The unfenced write once ZooKeeper answers again (a bounded wait on the worker thread)."""
        deadline = time.monotonic() + 30
        while not self.store.available and time.monotonic() < deadline:
            time.sleep(0.5)
        return write(events)

    def _worker(self) -> ThreadPoolExecutor:
        """The one thread for the slow reads and writes kept off the loop: reconciliation's reads, the unfenced
        writes, the standby audit. One, so they never race each other for the proxy's RPC worker."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sipha-ul-dump")
        return self._pool

    def _writer(self) -> ThreadPoolExecutor:
        """The thread for the unfenced writes, apart from the slow reads: queued behind a reconciliation's 22 s
        read, this proxy's REGISTERs from a standby spell were written after the phones had un-registered them
        (the delete leaves nothing "newer" behind), and 61 bindings came back in the store and the standby for
        good (lab, 2026-11-25)."""
        if self._write_pool is None:
            self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="sipha-late-write")
        return self._write_pool

    def tick(self) -> str | None:
        """Periodic work: replay the journal when ZooKeeper is back, collect expired bindings if elected."""
        said = self._late_outcomes()
        self._drop_prepared(PREPARED_MAX_AGE_S)  # nobody started the proxy
        if not self.started:
            m = self.prepare_preload()  # before the first read, which slowed the copy down 3-8 times
            if m:
                said.append(m)
            if not self.store.available:
                return "; ".join(said) or None
            said.append(self.start())
        if self.writer.journal and self.store.available:
            try:
                said.append(f"replayed {self.writer.replay()} journaled events")
            except StoreUnavailable as exc:
                said.append(f"journal replay postponed: {exc}")
            except StaleEpoch as exc:
                # Journaled while this node was active and ZooKeeper was away; another node took over since.
                self.active = False
                events = list(self.writer.journal.read())
                self.writer.journal.clear()
                said.append(f"FENCED while replaying the journal ({exc}); {self._write_late(events)}")
        now = time.monotonic()
        rep = self.replicator
        if self.proxy_boot_fn is not None and now >= self._next_boot_check:
            self._next_boot_check = now + 2.0
            boot = self.proxy_boot_fn()
            if boot is not None:
                if self.proxy_boot is not None and abs(boot - self.proxy_boot) > 2:
                    said.append(self.proxy_restarted(f"boot time {self.proxy_boot} -> {boot}"))
                self.proxy_boot = boot
        if rep is not None and rep.resync_failed and rep.running:
            boot = self.proxy_boot_fn() if self.proxy_boot_fn is not None else 0
            # Not while the proxy does not answer; at once for a proxy that was not there at the last try (it
            # just came up: the restart fast path waits for this); else at most every 2 s.
            if boot is not None and (now >= self._next_resync_retry or boot != self._retry_boot):
                self._retry_boot = boot
                if boot:
                    self.proxy_boot = boot
                self._next_resync_retry = now + 2.0
                said.append(f"resync not applied ({rep.last_status}): trying again")
                rep.replay(include_own=rep.include_own)  # from the watch's view when complete: no store read
        if self._repairs:
            m = self._progress_repairs()
            if m:
                said.append(m)
        elif self._dump is not None:
            try:
                m = self.finish_reconcile()
                if m:
                    said.append(m)
            except StoreUnavailable as exc:
                self.schedule_reconcile(2.0)
                said.append(f"reconcile postponed: {exc}")
            except StaleEpoch as exc:
                self.active = False
                said.append(f"FENCED while reconciling ({exc})")
            except (RpcError, OSError) as exc:
                self.schedule_reconcile(2.0)
                said.append(f"reconcile postponed, cannot read the proxy's table: {exc}")
        elif (
            self._verify is not None and now >= self._verify[0] and self.active and self.store.available
            and not self.writer.journal and self.reconcile_due is None
        ):  # fmt: skip
            keys, self._verify = self._verify[1], None
            try:
                said.append(self.start_reconcile(subset=keys))
            except RpcError as exc:
                said.append(f"verification impossible: {exc}")
        elif (
            self.reconcile_due is not None
            and now >= self.reconcile_due
            and not self._repairs
            and self.active
            and self.store.available
            and not self.writer.journal
            and (rep is None or rep.synced.is_set())  # an unsynced proxy is no truth: it lacks bindings
        ):
            self.reconcile_due = None
            if not self._reconcile_needed():
                if self.intake.tracker.outstanding:  # newer gaps, not overdue yet: look again when they are
                    self.schedule_reconcile(gap=True)
                said.append("reconcile not needed: every event the gaps counted missing arrived late (reordered)")
            else:
                try:
                    said.append(self.start_reconcile())
                except RpcError as exc:
                    said.append(f"reconcile impossible: {exc}")
        m = self._standby_audit(now)
        if m:
            said.append(m)
        if self.node_cache is not None and rep is not None and rep.view_complete:
            m = self.node_cache.maybe_save(rep.view, rep.live, rep.stats.passes, now,
                                           _rate(self._seen, now, rep.changes_seen, AUDIT_BUSY_WINDOW_S))
            if m:
                said.append(m)
        said += self._collect()
        return "; ".join(said) or None

    def _collect(self) -> list[str]:
        """Expired-binding GC on a thread of its own (it reads every binding: ~1 s at 20k, every 30 s). On the loop
        it held every event of that second back, a few percent of all events: the replication lag's p99."""
        said: list[str] = []
        fut = self._gc
        if fut is not None and fut.done():
            self._gc = None
            try:
                n = fut.result()
            except StoreUnavailable:
                n = 0
            except Exception as exc:  # a bug must not stop the loop: say it, try again at the next interval
                log.exception("gc failed")
                said.append(f"gc failed: {exc!r}")
                n = 0
            if n:
                self.gc_deleted += n
                said.append(f"collected {n} expired bindings")
        if (
            self._gc is None and self.store.available and time.monotonic() >= self._next_gc
            and (self.ready or time.monotonic() - self._born > GC_WAITS_FOR_RESYNC_S)
        ):  # fmt: skip
            self._next_gc = time.monotonic() + self.gc_interval_s
            if self._gc_pool is None:  # its own thread: a reconciliation's reads must not wait behind it, nor it
                self._gc_pool = ThreadPoolExecutor(1, thread_name_prefix="sipha-gc")
            self._gc = self._gc_pool.submit(self._collect_expired)
        return said

    def _collect_expired(self) -> int:
        """On the GC thread: the view's copy (100k entries) is made there too, not on the loop."""
        rep = self.replicator
        view = rep.view() if rep is not None else None  # None (no complete view): the store is read instead
        return self.store.gc_expired(grace_s=self.gc_grace_s, view=view)

    def _applying_per_s(self, now: float) -> float:
        """Changes/s the replicator applied to the local proxy over about the last AUDIT_BUSY_WINDOW_S."""
        rep = self.replicator
        if rep is None:
            return 0.0
        return _rate(self._applied, now, rep.stats.added + rep.stats.removed, AUDIT_BUSY_WINDOW_S)

    def _standby_audit(self, now: float) -> str | None:
        """On the standby: now and then (and soon after changes failed to apply) compare the local proxy with the
        watch's view and repair it (Replicator.audit). The proxy's table is read off the loop; the interval grows
        with the table (a dump of 100k bindings is seconds of the proxy's RPC worker)."""
        rep = self.replicator
        fut = self._audit
        if fut is not None:
            if not fut.done():
                return None
            self._audit = None
            try:
                res = fut.result()
            except (RpcError, OSError) as exc:
                return f"standby audit postponed, cannot read the proxy's table: {exc}"
            except Exception as exc:  # a bug must not stop the loop: say it, try again at the next interval
                log.exception("standby audit failed")
                return f"standby audit failed: {exc!r}"
            self.audit_runs += 1
            if rep is not None and rep.suspects:
                self._next_audit = min(self._next_audit, now + AUDIT_SUSPECT_S)  # confirm (or clear) them soon
            if res is None:
                return None
            if res.repaired or res.errors:
                return f"standby audit repaired the local proxy: {res}"
            return f"standby audit: the local proxy agrees: {res}"
        if (
            rep is None or self.active or self.dump_table is None or not rep.running or not rep.view_complete
            or not rep.synced.is_set()
        ):  # fmt: skip
            return None
        if rep.audit_soon:  # set on the watch thread; taken here once, as an earlier due time
            rep.audit_soon = False
            self._audit_urgent = True  # changes were not applied: this audit does not wait for a calmer minute
            self._next_audit = min(self._next_audit, now + AUDIT_SOON_S)
        busy = self._applying_per_s(now)  # sampled every tick, so a due audit knows the recent rate
        if now < self._next_audit:
            return None
        if busy > AUDIT_BUSY_PER_S and not self._audit_urgent:
            if self._audit_deferred_since is None:
                self._audit_deferred_since = now
                return f"standby audit deferred: applying {busy:.0f} changes/s (up to {AUDIT_MAX_DEFER_S:.0f} s)"
            if now - self._audit_deferred_since < AUDIT_MAX_DEFER_S:
                return None
        self._audit_deferred_since = None
        self._audit_urgent = False
        size = rep.last_audit.proxy if rep.last_audit else 0
        self._next_audit = now + max(AUDIT_INTERVAL_S, size / 2000)
        dump_table, lookup_table, store = self.dump_table, self.lookup_table, self.store

        def run() -> Any:
            started = int(time.time() * 1000)
            t0 = time.monotonic()
            in_store = None
            if isinstance(store, ZkStore):
                stored = {store.contact_path(r.aor, r.contact): r for r in store.snapshot().contacts}
                rep.check_view(stored, started)
                in_store = {(r.aor, r.contact) for r in stored.values()}
            t1 = time.monotonic()
            scope = rep.audit_scope() if lookup_table is not None else None
            try:
                table = dump_table() if scope is None else lookup_table(scope)
            except BaseException:
                rep.full_audit_due = True  # the AoRs noted for this audit are forgotten: read the whole table
                raise
            t2 = time.monotonic()
            return rep.audit(table, started, lambda: not self.active, in_store=in_store, scope=scope,
                             read_ms=int((t1 - t0) * 1000), dump_ms=int((t2 - t1) * 1000))

        self._audit = self._worker().submit(run)
        return None

    def promote(self) -> str:
        """This node takes over: a new epoch fences every older writer (a partitioned old active included)."""
        epoch = self.store.bump_epoch()
        self.active = True
        # This proxy's REGISTERs seen just before the promotion are ordinary events now (written at this epoch),
        # and so are those whose unfenced write has not started yet: in order, before what the proxy sends next.
        # Written later, unfenced, such a REGISTER could land after the phone's un-REGISTER had deleted it (a
        # delete leaves nothing newer behind) and bring the binding back. A stale reconciliation's repairs are
        # dropped instead: the promotion reconciles anyway, from a fresh dump.
        carried: list[Event] = []
        for events, _write, fut in list(self._late):
            if fut.cancel():
                self._late.remove((events, _write, fut))
                carried += [ev for ev in events if not (isinstance(ev, ContactEvent) and ev.seq == 0)]
        self.pending[:0], self._standby_contacts = carried + self._standby_contacts, []
        # Events the proxy sent before this node knew it was active were not written: bindings are repaired by
        # reconciling against ul.dump; dialog events, which nothing could repair, were held and are written now.
        self.schedule_reconcile()
        cutoff = time.monotonic() - STANDBY_DIALOG_WINDOW_S
        held = [ev for t, ev in self._held if t >= cutoff]
        self._held.clear()
        self.last = f"active at epoch {epoch}: writing this node's proxy events"
        if held:
            self.pending[:0] = held
            self.carried_over += len(held)
            self.last += f"; {len(held)} dialog events from before the promotion: {self.flush()}"
        return self.last

    def demote(self) -> str:
        # What the proxy accepted while the VIP was here is still this node's to write: at the current epoch when
        # the new active has not taken over yet, else through the fenced path in flush().
        flushed = ""
        while self.active and self.pending:
            flushed = f"; last events: {self.flush()}"
        self.active = False
        self.pending.clear()
        self._held.clear()
        if self.replicator is not None:
            # The proxy served the VIP until now: it may hold bindings the store never got (fenced, lost events).
            self.replicator.audit_soon = True
        # Repairs already diffed but not written: the bindings this proxy holds and the store lacks (events lost
        # at the intake) exist nowhere else, and the standby audit would soon remove them from this proxy too (a
        # CI run lost 4 of its 10k phones so). Written where nothing newer is stored, like this proxy's REGISTERs
        # after a demotion; removals are left to the new active.
        touched = self._touched or set()
        kept = [ev for ev in self._repairs if not ev.removed and (ev.aor, ev.contact) not in touched]
        if kept:
            flushed += f"; {len(kept)} reconciliation repairs: {self._write_late(list(kept), before_takeover=False)}"
        # A reconciliation in flight is abandoned: its dump's result must not be diffed after a re-promotion,
        # with the bindings touched meanwhile forgotten (the bench saw 16k live bindings deleted so).
        self._repairs, self._touched, self._dump = [], None, None
        self._verify = self._subset = None
        self.last = "standby: not writing; applying peers' bindings" + flushed
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
            "shedding": bool(self._shed_until),
            "shed_spells": self.shed_spells,
            "shed_limit_per_s": self.shed_limit,
            "journal_bytes": self.writer.journal.size,
            "dropped": self.dropped,
            "carried_over": self.carried_over,
            "fenced": self.fenced,
            "late_written": self.late_written,
            "gc_deleted": self.gc_deleted,
            "replicator": rep.last_status if rep else "off",
            "ready": self.ready,
            "resync_ms": round(rep.resync_s * 1000) if rep and rep.resync_s is not None else None,
            "resync_bindings": rep.resync_count if rep else 0,
            "proxy_boot": self.proxy_boot,
            "reconcile_runs": self.reconcile_runs,
            "reconcile_pending": self.reconcile_due is not None or self._dump is not None or bool(self._repairs),
            "repairs_left": len(self._repairs),
            "last_reconcile": str(self.reconciled) if self.reconciled else None,
            "audit_runs": self.audit_runs,
            "last_audit": str(rep.last_audit) if rep and rep.last_audit else None,
            "last": self.last,
        }

    def close(self) -> None:
        self._drop_prepared()
        rep = self.replicator
        if self.node_cache is not None and rep is not None and (rep.view_complete or rep.synced.is_set()):
            # synced and not complete: a resync just applied, its view still being settled (store._settle)
            m = self.node_cache.save_at_exit(rep.view, rep.live, rep.stats.passes, lambda: rep.view_complete)
            if m:
                log.info("%s", m)
        if self.replicator is not None:
            self.replicator.stop()
        if isinstance(self.store, ZkStore):
            with contextlib.suppress(Exception):  # best effort: the lock's node goes with the session anyway
                self.store.release_gc_lock()
        self.writer.journal.close()
        for pool in (self._pool, self._write_pool, self._gc_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        for close in self._closers:
            close()


def _in_thread(fn: Callable[[], Any]) -> Future[Any]:
    """``fn()`` on a thread of its own, as a Future (one-off work; no pool kept for it)."""
    fut: Future[Any] = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to whoever waits for the result
            fut.set_exception(exc)

    threading.Thread(target=run, name="sipha-oneoff", daemon=True).start()
    return fut


__all__ = ["DEFAULT_JOURNAL", "Replication"]
