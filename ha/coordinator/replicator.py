"""Keep the local (warm standby) proxy in step with the bindings peers write to the store.

The store's watch delivers every binding once at start (a resync) and then each change. The replicator
decides what the local proxy must do with it and hands that to :class:`~ha.coordinator.apply.ProxyApplier`:

* a binding written by **this** node came from this node's own proxy, which already has it; pushing it back
  with ``ul.add`` would even wipe what ``ul.add`` cannot carry (the received address of a NATed phone).
  So this node's own writes are skipped, except on a resync after the local proxy *restarted*
  (``include_own=True``): its table is empty then and needs everything.
* a delete is applied if the last version of the binding was written by a peer, or, while this node is
  standby, by this node (it wrote it while it was active; the new active's phone un-registered it). While
  active, its own deletes are skipped: they came from its own proxy, where the binding is already gone.

A proxy that started from a preloaded table (:mod:`ha.coordinator.materialize`, the restart fast path) already
holds the bindings of the snapshot it loaded: ``preloaded`` (binding -> the ``mzxid`` it loaded) makes the next
resync push only the difference: bindings changed or created since the snapshot are added, bindings deleted
since are removed, the rest (all of them, usually) are left alone.

Every pass ends in one sentence (``last_status``) for the service's log, Patroni-style.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass

from ha.coordinator.apply import ApplyResult, ProxyApplier
from ha.coordinator.gcpause import gc_paused
from ha.coordinator.livetable import LiveTable
from ha.coordinator.proxytable import ProxyBinding
from ha.coordinator.store import Change, ContactRecord, Store, Watch

log = logging.getLogger(__name__)

BIG_BATCH = 10_000  # changes in one batch beyond which applying them runs with the cyclic GC off (on_changes)


class ProxyNotAnswering(Exception):
    """Raised by a preload source: the local proxy does not answer, so what it holds cannot be known yet."""


@dataclass
class ReplicatorStats:
    passes: int = 0
    added: int = 0
    removed: int = 0
    skipped_own: int = 0
    preloaded: int = 0  # bindings a resync found already loaded by the proxy at start (fast path)
    errors: int = 0
    view_repairs: int = 0  # bindings check_view had the watch read again


class Replicator:
    """Watch-driven: ``start()`` once; changes are applied on the store's watch thread, in order."""

    def __init__(self, store: Store, applier: ProxyApplier, node: str, *, include_own: bool = False) -> None:
        self.store = store
        self.applier = applier
        self.node = node
        self.include_own = include_own  # for the first resync only (the local proxy just started)
        self.standby: Callable[[], bool] = lambda: True  # Replication points it at "not active"
        self.stats = ReplicatorStats()
        self.last_status = "not started"
        self.synced = threading.Event()  # set after a resync was applied without an error
        self.resync_failed = False  # the last resync could not be applied (proxy not answering): retry it
        self.resync_started = 0.0  # monotonic, when the current resync was asked for
        self.resync_s: float | None = None  # how long the last complete resync took (read + apply)
        self.resync_count = 0  # bindings the last complete resync delivered
        # What the local proxy loaded at start, {(aor, contact): mzxid}; used by the next resync only.
        self.preloaded: dict[tuple[str, str], int] | None = None
        # Asked when a resync for a restarted proxy is about to be applied (so it describes the proxy that takes
        # the pushes, not the one there when the resync was scheduled): what that proxy preloaded, or None.
        self.preload_source: Callable[[], dict[tuple[str, str], int] | None] | None = None
        # The preload table kept current with every change the watch delivers (ha.coordinator.livetable).
        self.live: LiveTable | None = None
        self.on_synced: Callable[[], None] | None = None  # called (watch thread) when a resync completed
        # Held while the proxy is changed: by the watch thread's applies and by an audit's repairs, so an audit
        # pushes the view as it is, never a state the watch thread is about to replace.
        self._apply_lock = threading.Lock()
        self.audit_soon = False  # changes could not be applied: an audit should find out what the proxy lacks
        self.last_audit: AuditResult | None = None
        self._suspects: set[str] = set()  # bindings the last check_view found the view disagreeing on
        # What the next audit must look at (see audit_scope): the AoRs of every delete since the last audit, and
        # whether only a whole-table read will do.
        self._gone_aors: set[str] = set()
        self.full_audit_due = True
        self._audits_since_full = 0
        self._watch: Watch | None = None
        self._replays = 0  # replay() calls so far: a resync applied across one is not the one asked for
        self._window = _PassWindow()  # passes since the last window() (the watch thread notes, the loop takes)
        self._window_lock = threading.Lock()
        self._unread_seen = (None, 0)  # (watch, its own_unread) at the last window()

    @property
    def running(self) -> bool:
        return self._watch is not None

    def window(self) -> str | None:
        """What the passes since the last call did, in one sentence for the service's summary; None: no pass."""
        with self._window_lock:
            w, self._window = self._window, _PassWindow(last=self._window.last)
        watch, seen = self._unread_seen
        now = self._watch.own_unread if self._watch is not None else 0
        self._unread_seen = (self._watch, now)
        return w.sentence(now - seen if watch is self._watch else now)

    def start(self, include_own: bool | None = None) -> None:
        if include_own is not None:
            self.include_own = include_own
        self.resync_failed = False
        self.resync_started = time.monotonic()
        self._watch = self.store.watch_contacts(self.on_changes)

    def restart(self, include_own: bool) -> None:
        """Read and apply everything again (a failed resync, or the local proxy restarted)."""
        self.stop()
        self.synced.clear()
        self.start(include_own)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def resync_own_next(self) -> None:
        """The local proxy restarted (the intake saw its sequence restart): re-push everything, own included.

        From the watch's own view when it has a complete one (no store read: the view is current, later changes
        follow as usual), else by reading the store again."""
        self.replay(include_own=True)

    def replay(self, include_own: bool) -> None:
        """A resync from the watch's current view (see resync_own_next); a full restart when there is none."""
        if self._watch is None:
            self.start(include_own)
            return
        self._replays += 1  # a resync being applied now was read for the proxy before: it must not count
        self.synced.clear()
        self.include_own = include_own
        self.resync_failed = False
        self.resync_started = time.monotonic()
        if not self._watch.replay():
            self.restart(include_own)

    def wait_caught_up(self, timeout: float) -> bool:
        """Wait until every store change notified before this call has been applied to the local proxy (or the
        timeout). Reconciliation asks it between reading the store and its second look at the proxy: a peer's
        change already in the store but still queued here (the watch runs seconds behind under load) would
        otherwise look like a difference to repair."""
        w = self._watch
        if w is None:
            return False
        mark, deadline = w.received, time.monotonic() + timeout
        while w.processed < mark:
            if time.monotonic() >= deadline or self._watch is not w:
                return False
            time.sleep(0.02)
        return True

    def view(self) -> dict[str, ContactRecord] | None:
        """The watch's complete current view (path -> record), or None (see Watch.records)."""
        return None if self._watch is None else self._watch.records()

    def _wanted(self, c: Change) -> bool:
        if c.resync and self.include_own:
            return True
        if c.kind == "delete":
            # A delete this node wrote came from its own proxy (already gone there; pushed back, it could even
            # remove a binding the phone re-registered meanwhile). Any other delete is a peer's, whoever wrote
            # the binding last: while this node is active too. (Skipping every delete of a binding this node
            # had written left, under a flood with VIP moves, the un-REGISTERs that reached the peer's proxy
            # undone in the active's: 60 bindings only there. A store that cannot tell: the old rule.)
            if c.by_self:
                return False
            return c.record.node != self.node or self.standby() or self.store.tracks_own_deletes
        return c.record.node != self.node

    @staticmethod
    def _against_preload(
        changes: list[Change], puts: list[Change], removes: list[ContactRecord], preloaded: dict[tuple[str, str], int],
    ) -> tuple[list[ContactRecord], list[ContactRecord], int]:
        """A resync's puts/removes minus what the proxy loaded at start; plus removals of what it loaded that the
        store no longer has (deleted between the snapshot and now). By key and mzxid only: a node start's 98k
        unchanged bindings need no record before readiness (Change)."""
        left = dict(preloaded)  # what the proxy loaded that the store no longer has, once the puts are taken out
        pop = left.pop
        todo = []
        for c in puts:  # one pass, one key each: 100k at a node start (three passes took ~0.2 s under load)
            z = c.mzxid
            if pop(c.key, None) != z or not z:
                todo.append(c.record)
        if len(puts) != sum(c.kind == "put" for c in changes):  # some puts not wanted: still in the store
            for c in changes:
                if c.kind == "put":
                    pop(c.key, None)
        gone = [ContactRecord(aor=a, contact=c, expires_at=0) for (a, c) in left]
        return todo, removes + gone, len(puts) - len(todo)

    def on_changes(self, changes: list[Change]) -> None:
        # A resync's 100k changes, sets and lists of them: no cycles, but each of the collector's passes over the
        # whole heap (the view's records and these) cost more than the diff itself (0.39 s -> 0.06 s).
        with gc_paused(len(changes) > BIG_BATCH):
            try:
                with self._apply_lock:
                    self._on_changes(changes)
            finally:
                # After the proxy was served (a full rebuild of 100k rows takes ~1 s); a replay's records are
                # already there (only the changes delivered with it are new).
                if self.live is not None:
                    real = [c for c in changes if not c.replay]
                    try:
                        if real or not changes:
                            self.live.apply((c.record for c in real if c.kind == "put"),
                                            (c.record for c in real if c.kind == "delete"),
                                            resync=not changes or any(c.resync for c in real))
                    except Exception:  # only the fast path suffers: the next proxy start writes from the view
                        log.exception("replicator: the live preload table could not follow; dropped")
                        self.live = None

    @property
    def changes_seen(self) -> int:
        """Store changes (events) the watch received so far: how fast the store changes, in either role."""
        return self._watch.received if self._watch is not None else 0

    @property
    def view_complete(self) -> bool:
        return self._watch is not None and self._watch.complete

    def _on_changes(self, changes: list[Change]) -> None:
        t_in = time.monotonic()
        replays = self._replays
        puts: list[Change] = []
        removes: list[ContactRecord] = []
        resync = not changes or any(c.resync for c in changes)  # an empty batch is an empty store's resync
        skipped = 0
        if resync and self.include_own:  # a new proxy's table: every change is wanted (100k at a node start)
            puts = [c for c in changes if c.kind == "put"]
            removes = [c.record for c in changes if c.kind != "put"]
            for r in removes:
                self._note_gone(r.aor)
        else:
            for c in changes:
                if c.kind == "delete":
                    self._note_gone(c.record.aor)
                if not self._wanted(c):
                    skipped += 1
                elif c.kind == "put":
                    puts.append(c)
                else:
                    removes.append(c.record)
        if resync:
            self.full_audit_due = True  # a new table, or a replayed view: the proxy may hold anything
        wanted = len(puts)
        preloaded = self.preloaded if resync else None
        t_manifest = time.monotonic()
        if resync and preloaded is None and self.include_own and self.preload_source is not None:
            try:
                preloaded = self.preload_source()
            except ProxyNotAnswering as exc:
                # Maybe a proxy still loading its table: pushing now would race its load (and push everything
                # it is about to have). Not in step: Replication.tick() retries the moment it answers.
                self.stats.passes += 1
                self.last_status = f"resync postponed: {exc}"
                log.info("replicator %s", self.last_status)
                self.resync_failed = True
                return
            except Exception:  # an unreadable manifest only costs the fast path: everything is pushed
                log.exception("replicator: the proxy's preload manifest is unreadable; pushing everything")
        already = 0
        t_diff = time.monotonic()
        if preloaded is not None:
            adds, removes, already = self._against_preload(changes, puts, removes, preloaded)
        else:
            adds = [c.record for c in puts]
        t_apply = time.monotonic()
        res = self.applier.apply(adds, removes) if adds or removes else ApplyResult()
        t_done = time.monotonic()
        self.stats.passes += 1
        self.stats.added += res.added
        self.stats.removed += res.removed
        self.stats.skipped_own += skipped
        self.stats.preloaded += already
        self.stats.errors += len(res.errors)
        what = "resync" if resync else "changes"
        self.last_status = f"{what}: {len(changes)} from the store, {res}; {skipped} own skipped"
        if preloaded is not None:
            self.last_status += (
                f"; {already} already preloaded by the proxy ({len(preloaded)} loaded at its start; sorted in "
                f"{(t_manifest - t_in) * 1000:.0f} ms, its manifest in {(t_diff - t_manifest) * 1000:.0f} ms, diffed "
                f"in {(t_apply - t_diff) * 1000:.0f} ms, pushed in {(t_done - t_apply) * 1000:.0f} ms)")
        with self._window_lock:
            self._window.note(len(changes), res, skipped)
        # One line per pass was ~200 lines/s per node at 1000 REGISTER/s (250 MB of log a day at an ordinary 30/s):
        # ordinary passes are summed up in window() for the service's 5 s summary; resyncs and errors say so now.
        (log.warning if res.errors else log.info if resync else log.debug)("replicator %s", self.last_status)
        if res.errors and not resync:
            self.audit_soon = True  # nothing retries single changes: the audit compares the proxy with the view
        if resync and skipped:
            # This node's own bindings were taken on trust (the proxy made them). After a coordinator restart, or
            # when the store changed while nobody watched, that trust is unchecked: check it at once.
            self.audit_soon = True
        if resync:
            if replays != self._replays:
                # The proxy was restarted while this resync was applied (its flags were read before): the new
                # proxy may lack what was skipped. Not in step; tick() replays for it.
                self.resync_failed = True
                self.last_status += "; the local proxy restarted meanwhile: again"
                return
            if res.errors:
                # Not in step: readiness must not be given; Replication.tick() asks for the resync again
                # (include_own stays as it was: a restarted proxy still needs its own bindings).
                self.resync_failed = True
                return
            self.resync_s = time.monotonic() - self.resync_started
            self.resync_count = wanted
            self.preloaded = None  # used once: from now on the proxy's table is what this replicator made it
            self.last_status += f"; resync complete in {self.resync_s * 1000:.0f} ms"
            self.include_own = False
            self.resync_failed = False
            self.synced.set()
            if self.on_synced is not None:
                self.on_synced()


    @property
    def suspects(self) -> int:
        """Bindings the last check_view found the view disagreeing on (read again if the next one agrees)."""
        return len(self._suspects)

    def check_view(self, stored: Mapping[str, ContactRecord], started_ms: int) -> int:
        """Compare the watch's view with a fresh read of the store (path -> record); a binding that disagrees in
        two checks running is read again by the watch, which delivers what it is now. Returns how many.

        Why two: the watch runs behind the store by its backlog (seconds under load), so one disagreement is no
        proof. Only bindings settled for AUDIT_FRESH_S are judged. The proxy-vs-view half of the audit cannot see
        a change the watch itself missed (seen in the lab: a standby short of 6-14 bindings after a ZooKeeper
        outage, for good); this half can."""
        view = self.view()
        if view is None:
            self._suspects = set()
            return 0
        settled_before = started_ms - AUDIT_FRESH_S * 1000
        suspects: set[str] = set()
        for path in stored.keys() | view.keys():
            s, v = stored.get(path), view.get(path)
            if s is not None and (v is None or (s.mzxid > v.mzxid and v.mzxid)):
                if s.ts_ms < settled_before:
                    suspects.add(path)  # the store has it (or a newer write of it) and the view does not
            elif v is not None and s is None and v.ts_ms < settled_before:
                suspects.add(path)  # the view holds what the store no longer has
        confirmed, self._suspects = suspects & self._suspects, suspects
        if confirmed and self._watch is not None:
            log.warning("replicator: the view disagreed with the store twice on %d bindings; reading them again",
                        len(confirmed))
            self._watch.refetch(sorted(confirmed))
            self.stats.view_repairs += len(confirmed)
        return len(confirmed)

    def _note_gone(self, aor: str) -> None:
        if len(self._gone_aors) >= GONE_AORS_MAX:
            self.full_audit_due = True  # too many to look up one by one: the whole table is cheaper
            self._gone_aors.clear()
        elif not self.full_audit_due:
            self._gone_aors.add(aor)

    def audit_scope(self) -> set[str] | None:
        """The AoRs the next audit needs to look up in the proxy, or None when it must read the whole table.

        Why not always the whole table: Kamailio 5.6 builds ``ul.dump``'s reply in O(n^2) (10.5 s of a core for
        26k bindings, measured during the replication bench, and it would run every 30-50 s), while a standby
        proxy can only hold a binding the view lacks where a delete was not applied (its AoR is noted here), or
        where something outside replication wrote it: the whole table every FULL_AUDIT_EVERY-th audit, and after
        an audit that had to repair anything, catches those."""
        with self._apply_lock:
            view = self.view()
            full = self.full_audit_due or self._audits_since_full + 1 >= FULL_AUDIT_EVERY or view is None
            gone, self._gone_aors = self._gone_aors, set()
            self.full_audit_due = False
            if full:
                self._audits_since_full = 0
                return None
            self._audits_since_full += 1
            return gone | {r.aor for r in view.values()}

    def audit(self, table: Mapping[tuple[str, str], ProxyBinding], started_ms: int,
              standby: Callable[[], bool], in_store: Set[tuple[str, str]] | None = None,
              scope: Set[str] | None = None, read_ms: int = 0, dump_ms: int = 0) -> AuditResult | None:
        """Make the local (standby) proxy hold exactly the watch's view: what it lacks or holds with another expiry
        is added again, what the store no longer has is removed. None when there is no complete view.

        Why: replication is event-driven, and an event that was not applied (an ``ul.add`` whose reply was lost
        under load, a watch that missed a change) was otherwise never retried; the standby stayed silently out of
        step until a failover showed it. ``table`` is the proxy's ``ul.dump``, read before this is called.

        Left alone: bindings the proxy got from a REGISTER of its own in the last :data:`AUDIT_FRESH_S` (the VIP
        may have just moved here, before this node's promotion writes them), and all of it once this node is no
        longer standby; and what the store held when read just before the dump (``in_store``): the view runs behind
        the store under load, and this node's own bindings, written unfenced after a demotion, were removed from
        its proxy before the view had them (the watch then skips them as this node's own). Runs under the apply
        lock, so what it pushes is the view as it is now. ``scope``: the AoRs ``table`` was looked up for (see
        audit_scope); None when it is the whole table. ``read_ms``/``dump_ms``: how long the caller's reads took,
        for the result.
        """
        with self._apply_lock:
            view = self.view()
            if view is None or not standby():
                return None
            now = time.time()
            want = {(r.aor, r.contact): r for r in view.values()
                    if r.expires_at > now + 1 and (scope is None or r.aor in scope)}  # fmt: skip
            adds, refreshed = [], 0
            settled_before = started_ms - AUDIT_FRESH_S * 1000
            for key, rec in want.items():
                if rec.ts_ms >= settled_before:
                    continue  # written around the dump: the watch's to push (a backlog under load is not a loss)
                have = table.get(key)
                if have is None:
                    adds.append(rec)
                elif abs(have.record.expires_at - rec.expires_at) > AUDIT_EXPIRY_SLACK_S:
                    adds.append(rec)
                    refreshed += 1
            held = in_store or frozenset()
            removes = [pb.record for key, pb in table.items()
                       if key not in want and key not in held
                       and (pb.pushed or pb.record.ts_ms < settled_before)]  # fmt: skip
            res = self.applier.apply(adds, removes) if adds or removes else ApplyResult()
        if res.errors:
            self.audit_soon = True  # the loop takes the flag when it schedules an audit
        if (adds or removes) and scope is not None:
            self.full_audit_due = True  # something was off where we looked: look everywhere next time
        out = AuditResult(proxy=len(table), view=len(want), added=len(adds) - refreshed, refreshed=refreshed,
                          removed=len(removes), errors=len(res.errors),
                          looked_up=None if scope is None else len(scope), read_ms=read_ms,
                          dump_ms=dump_ms)  # fmt: skip
        self.last_audit = out
        return out


class _PassWindow:
    """Passes summed up between two summaries: counts, the biggest pass, and the longest pause between two passes'
    ends (where a standby's lag tail shows; the replication bench reads it from the summary line)."""

    def __init__(self, last: float | None = None) -> None:
        self.passes = self.changes = self.biggest = self.added = self.removed = self.skipped = 0
        self.pause = 0.0
        self.last = last

    def note(self, changes: int, res: ApplyResult, skipped: int) -> None:
        now = time.monotonic()
        if self.last is not None:
            self.pause = max(self.pause, now - self.last)
        self.last = now
        self.passes += 1
        self.changes += changes
        self.biggest = max(self.biggest, changes)
        self.added += res.added
        self.removed += res.removed
        self.skipped += skipped

    def sentence(self, own_unread: int = 0) -> str | None:
        if not self.passes:
            return None
        unread = f" ({own_unread} known from the writes' replies, not read back)" if own_unread else ""
        return (f"replicator window: {self.passes} passes, {self.changes} changes, at most {self.biggest} in one "
                f"pass; added {self.added}, removed {self.removed}, {self.skipped} own skipped{unread}; longest "
                f"pause between passes {self.pause * 1000:.0f} ms")


AUDIT_EXPIRY_SLACK_S = 5  # ul.dump gives whole seconds left, ul.add takes whole seconds: a few seconds is no drift
AUDIT_FRESH_S = 10  # a REGISTER-made binding younger than this may belong to a promotion under way
FULL_AUDIT_EVERY = 10  # every 10th standby audit reads the whole proxy table (see audit_scope)
GONE_AORS_MAX = 50_000  # deleted AoRs noted for the next audit; past it, the next audit reads the whole table


@dataclass(frozen=True)
class AuditResult:
    proxy: int
    view: int
    added: int
    refreshed: int
    removed: int
    errors: int
    read_ms: int = 0  # the store read before it (check_view's half)
    dump_ms: int = 0  # the proxy's table read
    looked_up: int | None = None  # AoRs looked up; None: the whole table was read

    @property
    def repaired(self) -> int:
        return self.added + self.refreshed + self.removed

    def __str__(self) -> str:
        s = (f"proxy {self.proxy} bindings, store {self.view}: added {self.added}, refreshed {self.refreshed}, "
             f"removed {self.removed}")
        s += f", {self.errors} errors" if self.errors else ""
        what = "whole proxy table" if self.looked_up is None else f"proxy's bindings of {self.looked_up} AoRs"
        return s + f" (store read {self.read_ms} ms, {what} read in {self.dump_ms} ms)"


__all__ = ["AuditResult", "ProxyNotAnswering", "Replicator", "ReplicatorStats"]
