"""Quorum-guarded fast claim of the VIPs: take them the moment Corosync's quorum says the holder is gone.

Why: Pacemaker moves a VIP only after its scheduler has run on the DC, and on the path after a node loss that
scheduler often sleeps a whole second (it re-asks for the CIB while its own updates are pending; measured in
docs/node-crash-path.md: 1.5-2.9 s gaps for a power cut). Corosync knows ~token + consensus after the loss.
So each node's health service follows votequorum's notifications (``corosync-quorumtool -m``, pushed, not
polled) and acts on two transitions only:

* **claim** -- this node is quorate, healthy (and ready, when the readiness gate is on), every other proxy node
  has just left the membership, and a VIP is not here: add the address and send gratuitous ARPs, as IPaddr2's
  start does. Pacemaker's own start of the VIP a moment later finds the address present and succeeds.
* **release** -- this node is no longer quorate and holds a VIP: remove it at once (Pacemaker's
  no-quorum-policy=stop would, after its own scheduler run).

Safety rests on quorum: with a witness (qdevice), at most one side of a split is quorate -- eventually. Measured
in the lab's partition drill, the cut-off side still read quorate ~200 ms after the other side had its quorum
confirmed (its qdevice had not yet given up on qnetd): claiming at once gave 19-20 split-brain samples (10 ms
apart) per partition. So a claim waits ``hold_s`` (the qdevice timeout plus a margin: the longest the other
side can keep counting the witness's vote) and is made only if the membership, quorum and health still call
for it then. A node crash pays the same wait: it cannot be told from a partition in time. A claim that
Pacemaker does not confirm within ``confirm_s`` (it placed the VIP elsewhere, or nowhere) is undone. Off unless
``failover.fast_claim`` is set in the model; its split-brain samples are measured by the partition drill.
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


@dataclass(frozen=True)
class VipAddr:
    name: str  # the model's VIP name; Pacemaker's resource is vip-<name>
    ip: str
    prefix: int
    interface: str


def decide(prev: QuorumView | None, view: QuorumView, me: str, peers: frozenset[str], healthy: bool,
           held: set[str], vips: Iterable[VipAddr]) -> list[tuple[str, VipAddr]]:  # fmt: skip
    """The actions one notification calls for: ("claim"|"release", vip). Pure, so the rule is testable."""
    vips = list(vips)
    if not view.quorate:
        return [("release", v) for v in vips if v.ip in held]
    peers_left = prev is not None and bool(prev.members & peers) and not (view.members & peers)
    if peers_left and me in view.members and healthy:
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
    """Follows ``corosync-quorumtool -m`` in a thread and claims/releases VIPs by :func:`decide`.

    ``stdbuf -oL``: into a pipe, the tool's stdio would hold each status block in its buffer.
    """

    def __init__(self, me: str, peers: Iterable[str], vips: Iterable[VipAddr], healthy: Callable[[], bool],
                 held: Callable[[], set[str]], located_here: Callable[[str], bool | None],
                 event: Callable[..., None], run: Runner = _run, confirm_s: float = 20.0, hold_s: float = 0.6,
                 garp: Callable[[VipAddr], None] = _garp,
                 monitor_argv: tuple[str, ...] = ("stdbuf", "-oL", "corosync-quorumtool", "-m")) -> None:  # fmt: skip
        self.me, self.peers, self.vips = me, frozenset(peers), tuple(vips)
        self.healthy, self.held, self.located_here, self.event = healthy, held, located_here, event
        self.run, self.confirm_s, self.monitor_argv, self.hold_s, self.garp = run, confirm_s, monitor_argv, hold_s, garp
        self._prev: QuorumView | None = None  # the view before the departure a pending claim answers
        self._latest: QuorumView | None = None
        self._pending: threading.Timer | None = None
        self.claims = 0
        self.releases = 0
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._loop, name="fastclaim", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._pending is not None:
            self._pending.cancel()
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()

    def apply(self, prev: QuorumView | None, view: QuorumView) -> None:
        self._latest = view
        actions = decide(prev, view, self.me, self.peers, self.healthy(), self.held(), self.vips)
        for _action, vip in [a for a in actions if a[0] == "release"]:
            self._release(vip, view)
        if any(a[0] == "claim" for a in actions) and self._pending is None:
            self._prev = prev
            self._pending = threading.Timer(self.hold_s, self._claim_after_hold, args=(view,))
            self._pending.daemon = True
            self._pending.start()
            self.event("fast_claim_pending", ring=view.ring, hold_ms=round(self.hold_s * 1000))

    def _claim_after_hold(self, view: QuorumView) -> None:
        """The hold is over: claim what the latest view still calls for (same departure, still quorate)."""
        self._pending = None
        latest = self._latest
        if latest is None or latest.members & self.peers or not latest.quorate:
            self.event("fast_claim_dropped", ring=view.ring, why="the membership or quorum changed during the hold")
            return
        for action, vip in decide(self._prev, latest, self.me, self.peers, self.healthy(), self.held(),
                                  self.vips):  # fmt: skip
            if action == "claim":
                self._claim(vip, latest)

    def _claim(self, vip: VipAddr, view: QuorumView) -> None:
        rc = self.run(["ip", "addr", "add", f"{vip.ip}/{vip.prefix}", "dev", vip.interface])
        if rc != 0:
            self.event("fast_claim_failed", logging.WARNING, vip=vip.ip, rc=rc, ring=view.ring)
            return
        self.claims += 1
        self.event("fast_claim", vip=vip.ip, ring=view.ring, members=",".join(sorted(view.members)))
        self.garp(vip)
        threading.Thread(target=self._confirm, args=(vip,), name=f"fastclaim-confirm-{vip.name}",
                         daemon=True).start()  # fmt: skip

    def _release(self, vip: VipAddr, view: QuorumView) -> None:
        rc = self.run(["ip", "addr", "del", f"{vip.ip}/{vip.prefix}", "dev", vip.interface])
        self.releases += rc == 0
        self.event("fast_release", vip=vip.ip, ring=view.ring, rc=rc)

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
            prev: QuorumView | None = None
            assert self._proc.stdout is not None
            for view in parse_views(self._proc.stdout):
                if prev is None or view != prev:
                    try:
                        self.apply(prev, view)
                    except Exception as exc:  # an action that failed must not end the monitor
                        self.event("fast_claim_error", logging.ERROR, error=repr(exc))
                prev = view
            self._proc.wait()
            self._stop.wait(backoff)  # corosync not up yet or restarted: follow it again


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


__all__ = ["FastClaim", "QuorumView", "VipAddr", "decide", "located_here", "parse_views"]
