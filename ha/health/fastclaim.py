"""Lease-guarded fast claim of the VIPs: take them the moment Corosync's membership shows the holder gone.

Why: Pacemaker moves a VIP only after its scheduler has run on the DC, and on the path after a node loss that
scheduler often sleeps a whole second (it re-asks for the CIB while its own updates are pending; measured in
docs/node-crash-path.md: 1.5-2.9 s gaps for a power cut). Corosync knows at token + consensus. Each node's
health service follows two things, both pushed, not polled:

* the membership, from cmap (``corosync-cmapctl -T runtime.members.``): it changes at the new ring on both
  sides within a few ms, while votequorum's notification (``corosync-quorumtool -m``) waits for the qdevice's
  poll: 0.3-0.4 s on the survivor, ~0.9 s on a cut-off node;
* votequorum's quorate flag, to drop the VIPs when quorum is lost.

And acts on three transitions:

* **claim** -- every other proxy node has just left the membership, this node is healthy (and ready, when the
  readiness gate is on), not known to be inquorate, and the witness grants it the VIP lease
  (ha.health.arbiter): add the address and send gratuitous ARPs, as IPaddr2's start does, no earlier than
  ``hold_s`` after the membership change. Pacemaker's own start a moment later finds the address present.
* **drop on suspicion** -- this node holds a VIP, its peers just left, and its lease is not valid (it could not
  renew it: it may be the cut-off side). It sees the change when the survivor does, and the survivor's claim
  waits ``hold_s`` after it: measured 2-3 ms from drop to the survivor's pending claim, 100 ms before the claim.
* **release** -- this node is no longer quorate and holds a VIP (Pacemaker's no-quorum-policy=stop would,
  after its own scheduler run).

The lease is what makes the claim safe without waiting for the qdevice: a holder that still renews it (the
link between the nodes is cut, not the holder's link to the witness) keeps it, so the other side never
claims and Pacemaker decides as before; a crashed holder stops renewing and the lease lapses before the
survivor sees the membership change (``lease_ms`` < token + consensus, checked by the model); a holder whose
own health service died stopped renewing long before it left, and the witness refuses that claim too. A claim that
Pacemaker does not confirm within ``confirm_s`` (it placed the VIP elsewhere, or nowhere) is undone. Off unless
``failover.fast_claim`` is set in the model; the lab turns it on, and its drills count split-brain samples.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ha.health.arbiter import LeaseClient, PeerWatch, acquire_s

log = logging.getLogger("sipha.health.fastclaim")

SEND_ARP = "/usr/libexec/heartbeat/send_arp"  # resource-agents' GARP sender, the one IPaddr2 uses

_QUORATE = re.compile(r"^\s*Quorate:\s*(Yes|No)\b", re.I)
_RING = re.compile(r"^\s*Ring ID:\s*(\S+)")
_MEMBER = re.compile(r"^\s*(?:0x)?([0-9a-fA-F]+)\s+(\d+)\s+(?:[A-Z,]+\s+)?(\S+?)(?:\s+\(local\))?\s*$")


@dataclass(frozen=True)
class QuorumView:
    """One votequorum status: quorate or not, the ring, and the node names in the membership."""

    quorate: bool
    ring: str
    members: frozenset[str]


def parse_views(lines: Iterable[str]) -> Iterator[QuorumView]:
    """Views from ``corosync-quorumtool -s``/``-m`` output; one per status block, as soon as it is complete.

    A block starts at "Quorum information" and its membership table ends at a blank line, the next block or the
    end of the input. The Qdevice row (node id 0) is not a member.
    """
    quorate: bool | None = None
    ring = ""
    members: set[str] = set()
    in_members = False

    def done() -> QuorumView | None:
        return QuorumView(quorate, ring, frozenset(members)) if quorate is not None and in_members else None

    for raw in lines:
        line = raw.rstrip("\n")
        if "Quorum information" in line:
            view = done()
            if view:
                yield view
            quorate, ring, members, in_members = None, "", set(), False
            continue
        if m := _QUORATE.match(line):
            quorate = m[1].lower() == "yes"
        elif m := _RING.match(line):
            ring = m[1]
        elif "Membership information" in line:
            in_members = True
        elif in_members and not line.strip():
            view = done()
            if view and members:
                yield view
                quorate, members, in_members = None, set(), False
        elif in_members and (m := _MEMBER.match(line)) and m[1].strip("0"):  # node id 0: the Qdevice row
            members.add(m[3])
    view = done()
    if view and members:
        yield view


_MEMBER_STATUS = re.compile(r"runtime\.members\.(\d+)\.status \(str\) = (\w+)")


def parse_member_status(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(node id, "joined"|"left") from ``corosync-cmapctl runtime.members.`` and its ``-T`` tracking output."""
    for line in lines:
        if m := _MEMBER_STATUS.search(line):
            yield int(m[1]), m[2]


@dataclass(frozen=True)
class VipAddr:
    name: str  # the model's VIP name; Pacemaker's resource is vip-<name>
    ip: str
    prefix: int
    interface: str


def peers_left(before: frozenset[str] | None, after: frozenset[str], peers: frozenset[str]) -> bool:
    """Every peer in the membership ``before`` is gone ``after`` (None: nothing known before, not a departure)."""
    return before is not None and bool(before & peers) and not (after & peers)


def decide(prev: QuorumView | None, view: QuorumView, me: str, peers: frozenset[str], healthy: bool,
           held: set[str], vips: Iterable[VipAddr]) -> list[tuple[str, VipAddr]]:  # fmt: skip
    """The actions one notification calls for: ("claim"|"release", vip). Pure, so the rule is testable."""
    vips = list(vips)
    if not view.quorate:
        return [("release", v) for v in vips if v.ip in held]
    if peers_left(prev.members if prev else None, view.members, peers) and me in view.members and healthy:
        return [("claim", v) for v in vips if v.ip not in held]
    return []


Runner = Callable[[list[str]], int]


def _run(argv: list[str]) -> int:
    return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode


def _garp(vip: VipAddr) -> None:
    """Gratuitous ARPs in the background, 5 x 100 ms, as the CIB has IPaddr2 send them."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.Popen([SEND_ARP, "-i", "100", "-r", "5", vip.interface, vip.ip, "auto", "not_used", "not_used"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


class FastClaim:
    """Follows ``corosync-quorumtool -m`` in a thread and claims/releases VIPs by :func:`decide` and the lease.

    ``stdbuf -oL``: into a pipe, the tool's stdio would hold each status block in its buffer. ``hold_s`` is the
    least time from the membership change to a claim: the cut-off holder sees the same change within a few ms
    and drops its VIPs then (its lease has lapsed), so the claim must not beat it. ``distrust_s`` is how long
    after its peers left a holder keeps its VIPs only with a valid lease (the qdevice timeout plus a margin:
    after that, quorum alone is trustworthy again, and a restarting witness no longer takes the VIPs away).
    """

    def __init__(self, me: str, peers: Iterable[str], vips: Iterable[VipAddr], healthy: Callable[[], bool],
                 held: Callable[[], set[str]], located_here: Callable[[str], bool | None],
                 event: Callable[..., None], lease: LeaseClient, run: Runner = _run, confirm_s: float = 20.0,
                 hold_s: float = 0.1, distrust_s: float = 0.6, garp: Callable[[VipAddr], None] = _garp,
                 monitor_argv: tuple[str, ...] = ("stdbuf", "-oL", "corosync-quorumtool", "-m"),
                 node_ids: dict[int, str] | None = None,
                 members_argv: tuple[str, ...] = ("stdbuf", "-oL", "corosync-cmapctl", "-T", "runtime.members."),
                 peer_watch: PeerWatch | None = None, status_argv: tuple[str, ...] = ("corosync-quorumtool", "-s"),
                 refresh_s: float = 2.0) -> None:  # fmt: skip
        self.me, self.peers, self.vips = me, frozenset(peers), tuple(vips)
        self.node_ids, self.members_argv = dict(node_ids or {}), members_argv
        self.healthy, self.held, self.located_here, self.event = healthy, held, located_here, event
        self.run, self.confirm_s, self.monitor_argv, self.hold_s, self.garp = run, confirm_s, monitor_argv, hold_s, garp
        self.lease, self.distrust_s, self.peer_watch = lease, distrust_s, peer_watch
        self.status_argv, self.refresh_s = status_argv, refresh_s
        self._notifications = 0  # votequorum notifications taken (refresh_quorum: was one newer than its read?)
        self._differs: tuple[bool, str, int] | None = None  # what the last status read showed that they did not
        self.acquire_s = acquire_s(lease.lease_s)  # a holder that still renews keeps it: Pacemaker decides then
        self._prev: QuorumView | None = None  # the view before the departure a pending claim answers
        self._latest: QuorumView | None = None
        self._left_at: float | None = None  # when the last view without any peer arrived (None: peers present)
        self._pending = False
        self._watching = False
        self._dropped_at: float | None = None  # when VIPs were last dropped on suspicion (cleared by a reclaim)
        self.reclaim_s = 5.0
        self._mu = threading.Lock()
        self._apply_mu = threading.Lock()
        self._drop_mu = threading.Lock()
        self.claims = 0
        self.releases = 0
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._loop, name="fastclaim", daemon=True)
        self._members_thread = threading.Thread(target=self._loop_members, name="fastclaim-members", daemon=True)
        self._refresh_thread = threading.Thread(target=self._loop_refresh, name="fastclaim-quorum", daemon=True)
        self._members_proc: subprocess.Popen[str] | None = None
        self._totem: frozenset[str] | None = None  # the membership from cmap (None: not read yet)
        self._quorum: QuorumView | None = None  # the latest votequorum notification
        self._combined: QuorumView | None = None

    def start(self) -> None:
        self.lease.start()
        if self.peer_watch:
            self.peer_watch.start()
        self._thread.start()
        self._members_thread.start()
        self._refresh_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.lease.stop()
        if self.peer_watch:
            self.peer_watch.stop()
        for proc in (self._proc, self._members_proc):
            if proc and proc.poll() is None:
                proc.terminate()

    def on_quorum(self, view: QuorumView) -> None:
        """A votequorum notification: its quorate flag and ring; its member list only until cmap's is read."""
        with self._apply_mu:
            self._notifications += 1
            self._quorum = view
            self._combine()

    def refresh_quorum(self) -> QuorumView | None:
        """Read votequorum's status once and take it when the notifications missed a change; returns the view
        taken, or None.

        Why: ``corosync-quorumtool -m`` can miss a change. Seen in a drill: a node powered on again started its
        health service at 16:11:58.850, its ring with the peer formed at .845 and became quorate at .889, and
        the monitor printed only the view before it (ring 1.3b, not quorate), nothing after. The service kept
        "not quorate" and skipped the fast claim of the next node crash, 6 s later (Pacemaker's start came
        0.6 s after the claim would have). Apparently the tool's first status read and its tracking start are
        two steps, and the change fell between them. A notification that arrives while this reads is newer
        than what it read, so the read is then dropped; and a difference is taken only when the next read shows
        it again (a status read can run ahead of a notification on its way: seen once in 20 node crashes)."""
        seen = self._notifications
        view = self._read_status()
        if view is None:
            return None  # corosync not up: the monitor's own restart follows it
        with self._apply_mu:
            q = self._quorum
            if self._notifications != seen or (q is not None and (q.quorate, q.ring) == (view.quorate, view.ring)):
                self._differs = None
                return None
            # The status can be ahead of a notification still on its way (votequorum notifies after the
            # qdevice's vote): only the same difference at the next read, with no notification between, is a
            # missed one.
            if self._differs != (view.quorate, view.ring, seen):
                self._differs = (view.quorate, view.ring, seen)
                return None
            self._differs = None
            self.event("quorum_view_repaired", logging.WARNING, ring=view.ring, quorate=view.quorate,
                       was_ring=q.ring if q else None, was_quorate=q.quorate if q else None)  # fmt: skip
            self._quorum = view
            self._combine()
            return view

    def _read_status(self) -> QuorumView | None:
        """votequorum's status now (``corosync-quorumtool -s``, ~5 ms), or None when it cannot be read."""
        try:
            p = subprocess.run(list(self.status_argv), capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        views = list(parse_views(p.stdout.splitlines()))
        return views[-1] if views else None

    def _loop_refresh(self) -> None:
        for _ in range(100_000_000):  # bounded: ~6 years at one read every 2 s
            if self._stop.wait(self.refresh_s):
                return
            try:
                self.refresh_quorum()
            except Exception as exc:  # never the end of the claim's monitors
                self.event("fast_claim_monitor_error", logging.WARNING, error=repr(exc))

    def on_members(self, members: frozenset[str]) -> None:
        """Corosync's membership as cmap shows it: at the new ring, ~0.3-0.9 s before votequorum's notification
        (which waits for the qdevice's poll, the longest on the cut-off side). Both sides see it within ms."""
        with self._apply_mu:
            if self._totem is None:
                # The first membership read: until now the members came from votequorum's list. A switch of
                # source is not a departure (at a start, cmap may not list a peer votequorum already counted).
                self._combined = None
            left = peers_left(self._totem, members, self.peers)
            self._totem = members
            q, seen = self._quorum, self._notifications
            if not (left and q is not None and not q.quorate):
                self._combine()
                return
        # The peers just left and the last notification said "not quorate": maybe one was missed (refresh_quorum
        # repairs that only within 2-4 s, and in a drill series a node just powered on missed it at nearly every
        # start). Ask votequorum itself, outside the lock: the read is a subprocess (~5 ms, up to its 5 s
        # timeout on a stuck corosync) and the quorum monitor's notifications must not wait behind it. At a
        # departure its flag is still the one from before it (it waits for the qdevice's vote), so this only
        # corrects a stale "not quorate"; the lease still guards the claim.
        now = self._read_status()
        with self._apply_mu:
            if now is not None and now.quorate and self._notifications == seen:  # else a notification is newer
                self.event("quorum_view_repaired", logging.WARNING, ring=now.ring, quorate=True,
                           was_ring=q.ring, was_quorate=False, at="departure")  # fmt: skip
                self._quorum = now
            self._combine()

    def _combine(self) -> None:
        """Apply the view made of the latest quorum flag and the latest membership (caller holds ``_apply_mu``,
        so the two monitors' changes are applied one at a time, in the order they came)."""
        q = self._quorum
        if q is None:
            return
        view = QuorumView(q.quorate, q.ring, self._totem if self._totem is not None else q.members)
        prev, self._combined = self._combined, view
        if prev == view:
            return
        try:
            self.apply(prev, view)
        except Exception as exc:  # an action that failed must not end the monitors
            self.event("fast_claim_error", logging.ERROR, error=repr(exc))

    def apply(self, prev: QuorumView | None, view: QuorumView) -> None:
        self._latest = view
        left = peers_left(prev.members if prev else None, view.members, self.peers)
        if view.members & self.peers:
            self._left_at = None
        elif left:
            self._left_at = time.monotonic()
        healthy, held = self.healthy(), self.held()
        actions = decide(prev, view, self.me, self.peers, healthy, held, self.vips)
        for _action, vip in [a for a in actions if a[0] == "release"]:
            self._release(vip, view)
        self.check_lease()
        with self._mu:
            pending = self._pending
            start = any(a[0] == "claim" for a in actions) and not pending
            self._pending = pending or start
        if left and not start and not held:
            # Why no claim follows a departure (how a missed quorum notification was found: refresh_quorum).
            self.event("fast_claim_skipped", logging.WARNING, ring=view.ring, quorate=view.quorate,
                       healthy=healthy, member=self.me in view.members, pending=pending)  # fmt: skip
        if start:
            self._prev = prev
            threading.Thread(target=self._claim_when_granted, args=(view, self._left_at or time.monotonic()),
                             name="fastclaim-claim", daemon=True).start()  # fmt: skip
            self.event("fast_claim_pending", ring=view.ring, hold_ms=round(self.hold_s * 1000))

    def distrusted(self) -> bool:
        """Within ``distrust_s`` of every peer leaving: the VIPs stay here only with the lease."""
        left = self._left_at
        return left is not None and time.monotonic() - left < self.distrust_s

    def suspect(self) -> bool:
        """We may be the cut-off side: the peers just left the membership, or they all fell silent (the peer
        watch) for at least a lease time and at most a lease time plus ``distrust_s`` ago."""
        if self.distrusted():
            return True
        silent = self.peer_watch.silent_for() if self.peer_watch else None
        return silent is not None and self.lease.lease_s <= silent < self.lease.lease_s + self.distrust_s

    def check_lease(self) -> None:
        """Drop the VIPs when we may be the cut-off side and the lease is not ours.

        Called on every view, every lease renewal and every peer ping; while suspect and holding, a watcher
        also checks every 10 ms, so that a lease lapsing meanwhile is acted on at once.
        """
        if not self.suspect():
            self._maybe_reclaim()
            return
        held = self.held()
        # One more ask before letting go: VIPs Pacemaker just started here have no lease yet (the renewal comes
        # within lease/4), and a node that reaches the witness is not the cut-off side.
        if held and not self.lease.valid() and not self.lease.request("hold", True):
            with self._drop_mu:  # the watcher, the peer pings and the renewals may all get here at once
                held = self.held()
                if held:
                    self._dropped_at = time.monotonic()
                for vip in [v for v in self.vips if v.ip in held]:
                    self._release(vip, self._latest, why="the peers left or went silent and the witness's lease "
                                  f"is not ours (holder: {self.lease.holder or 'unknown'})")  # fmt: skip
        elif held:
            with self._mu:
                start, self._watching = not self._watching, True
            if start:
                threading.Thread(target=self._watch_lease, name="fastclaim-lease", daemon=True).start()

    def _maybe_reclaim(self) -> None:
        """Take back VIPs dropped on a suspicion that proved false: the peers are members and answer again, this
        node is quorate and healthy, and the witness grants it the lease (nobody claimed meanwhile).

        Why: a link that flaps for longer than a lease time makes the holder drop its VIPs, but the membership
        may merge again before anyone claims (lab link-flap drill: 4 of 20 runs had no VIP anywhere for 6.7-21 s,
        until Pacemaker's VIP monitor restarted it). Pacemaker still places the VIP here, so this restores its
        intended state; the lease keeps it exclusive (a peer that claimed holds it, and this node is refused).
        """
        dropped = self._dropped_at
        if dropped is None:
            return
        if time.monotonic() - dropped > self.reclaim_s:
            self._dropped_at = None
            return
        view = self._latest
        if view is None or not view.quorate or not (view.members & self.peers) or not self.healthy():
            return
        if self.held():
            self._dropped_at = None
            return
        if not self.lease.request("hold", False):
            return
        self._dropped_at = None
        for vip in self.vips:
            self._claim(vip, view, what="fast_reclaim")

    def _watch_lease(self) -> None:
        try:
            for _ in range(int((self.distrust_s + self.lease.lease_s) / 0.01) + 2):  # bounded by the window
                if self._stop.wait(0.01) or not self.suspect() or not self.held():
                    return
                if not self.lease.valid():
                    self.check_lease()
                    return
        finally:
            self._watching = False

    def _still_wanted(self) -> bool:
        latest = self._latest
        return latest is not None and latest.quorate and not (latest.members & self.peers) and not self._stop.is_set()

    def _claim_when_granted(self, view: QuorumView, left_at: float) -> None:
        """Ask the witness for the lease, wait out the hold, then claim what the latest view still calls for."""
        try:
            granted = self.lease.acquire(left_at + self.acquire_s, self._still_wanted)
            wait = left_at + self.hold_s - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
            latest = self._latest
            if not self._still_wanted() or latest is None:
                self.event("fast_claim_dropped", ring=view.ring, why="the membership or quorum changed")
                return
            if not granted:
                self.event("fast_claim_dropped", ring=view.ring,
                           why=f"the witness did not grant the lease (holder: {self.lease.holder or 'no answer'})"
                           + (f": {self.lease.why}" if self.lease.why else ""))
                return
            for action, vip in decide(self._prev, latest, self.me, self.peers, self.healthy(), self.held(),
                                      self.vips):  # fmt: skip
                if action == "claim":
                    self._claim(vip, latest)
        finally:
            self._pending = False

    def _claim(self, vip: VipAddr, view: QuorumView, what: str = "fast_claim") -> None:
        rc = self.run(["ip", "addr", "add", f"{vip.ip}/{vip.prefix}", "dev", vip.interface])
        if rc != 0:
            self.event("fast_claim_failed", logging.WARNING, vip=vip.ip, rc=rc, ring=view.ring)
            return
        self.claims += 1
        self.event(what, vip=vip.ip, ring=view.ring, members=",".join(sorted(view.members)))
        self.garp(vip)
        threading.Thread(target=self._confirm, args=(vip,), name=f"fastclaim-confirm-{vip.name}",
                         daemon=True).start()  # fmt: skip

    def _release(self, vip: VipAddr, view: QuorumView | None, why: str = "quorum lost") -> None:
        rc = self.run(["ip", "addr", "del", f"{vip.ip}/{vip.prefix}", "dev", vip.interface])
        self.releases += rc == 0
        self.event("fast_release", logging.WARNING, vip=vip.ip, ring=view.ring if view else "", rc=rc, why=why)

    def _confirm(self, vip: VipAddr) -> None:
        """Undo a claim Pacemaker does not confirm: the VIP must be started here within ``confirm_s``."""
        deadline = time.monotonic() + self.confirm_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.located_here(f"vip-{vip.name}"):
                self.event("fast_claim_confirmed", vip=vip.ip)
                return
            self._stop.wait(0.5)
        # Only a definite "not here" undoes the claim: when Pacemaker cannot be asked, taking the address away
        # could end the very service it was claimed for.
        if vip.ip in self.held() and self.located_here(f"vip-{vip.name}") is False:
            self.run(["ip", "addr", "del", f"{vip.ip}/{vip.prefix}", "dev", vip.interface])
            self.event("fast_claim_undone", logging.WARNING, vip=vip.ip,
                       why=f"Pacemaker did not start vip-{vip.name} here within {self.confirm_s:g} s")

    def _loop(self) -> None:
        backoff = 0.5
        for _ in range(1_000_000):  # bounded; a restart only follows the monitor's exit
            if self._stop.is_set():
                return
            try:
                self._proc = subprocess.Popen(list(self.monitor_argv), stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True, bufsize=1)  # fmt: skip
            except OSError as exc:
                self.event("fast_claim_monitor_error", logging.WARNING, error=str(exc))
                self._stop.wait(backoff)
                continue
            assert self._proc.stdout is not None
            for view in parse_views(self._proc.stdout):
                self.on_quorum(view)
            self._proc.wait()
            self._stop.wait(backoff)  # corosync not up yet or restarted: follow it again

    def _loop_members(self) -> None:
        """Follow ``runtime.members.<id>.status`` in cmap: tracking first, then a snapshot, then the changes."""
        for _ in range(1_000_000):  # bounded; a restart only follows the tracker's exit
            if self._stop.is_set():
                return
            try:
                self._members_proc = proc = subprocess.Popen(
                    list(self.members_argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True, bufsize=1)  # fmt: skip (stdin: it ends on "q" or EOF)
                snap = subprocess.run(["corosync-cmapctl", "runtime.members."], capture_output=True, text=True,
                                      timeout=10, check=False)  # fmt: skip
            except (OSError, subprocess.SubprocessError) as exc:
                self.event("fast_claim_monitor_error", logging.WARNING, error=str(exc))
                self._stop.wait(0.5)
                continue
            status = dict(parse_member_status(snap.stdout.splitlines())) if snap.returncode == 0 else {}
            self.on_members(self._joined(status))
            assert proc.stdout is not None
            for node_id, st in parse_member_status(proc.stdout):
                status[node_id] = st
                self.on_members(self._joined(status))
            proc.wait()
            self._stop.wait(0.5)

    def _joined(self, status: dict[int, str]) -> frozenset[str]:
        return frozenset({self.me} | {self.node_ids[i] for i, st in status.items() if st == "joined"
                                      and i in self.node_ids})  # fmt: skip


def located_here(node: str) -> Callable[[str], bool | None]:
    """A check of whether Pacemaker reports ``rsc`` started on ``node`` (None when it cannot be asked)."""

    def check(rsc: str) -> bool | None:
        try:
            p = subprocess.run(["crm_resource", "--resource", rsc, "--locate"], capture_output=True, text=True,
                               timeout=10, check=False)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        if p.returncode != 0:
            return None
        return bool(re.search(rf"is running on: {re.escape(node)}\b", p.stdout))

    return check


__all__ = ["FastClaim", "QuorumView", "VipAddr", "decide", "located_here", "parse_views", "peers_left"]
