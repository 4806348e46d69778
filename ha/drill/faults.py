"""Fault kinds a drill can inject, the health check before one, and target resolution.

Every fault has ``inject()`` and ``undo()``; the drill runs undo in a ``finally`` (also on Ctrl-C), so undo is
idempotent and safe after a partial inject. ``restore()`` runs after the measurement: housekeeping that must
not land inside the measured window, and waits for Pacemaker's own recovery first (a cleanup in the middle of
it re-probes the resource; the lab tests once saw that leave a clone instance stopped).

Faults act only through a :class:`ClusterControl` -- the lab's implementation (``ha.drill.labctl``) is a thin
layer over ``ha.lab``; a real cluster over SSH comes later -- so everything here is tested with a recording
stand-in.

Kinds (the target is the node the fault hits; ``active`` = the VIP's node, ``standby`` = another node):

* ``node-crash``   power off through the lab supervisor (what the fence path does); undo: power on.
* ``proxy-crash``  ``SIGKILL`` to Kamailio's process group inside the node (main process and every worker,
                   as when the proxy crashes); undo: nothing (Pacemaker restarts the proxy by itself); restore:
                   once Pacemaker is idle, ``crm_resource --cleanup`` on the node forgets the failure. Not the
                   main pid alone: Kamailio's workers outlive a killed main process and keep answering SIP.
* ``proxy-hang``   ``SIGSTOP`` to Kamailio's process group (alive, silent: only a SIP probe notices);
                   undo: ``SIGCONT`` to the same group; restore: the same cleanup.
* ``partition``    the node's bridge port stops forwarding (carrier stays up); undo: heal.
* ``link-flap``    the node's link down/up ``flaps`` times (bounded); undo: link up.
* ``zk-member-loss`` ``SIGSTOP`` of the node's ZooKeeper server: the ensemble loses a member (sessions
                   time out, leader election if it led) without losing its data; undo: ``SIGCONT``.
* ``switchover``   planned: ``crm_resource --move`` of the VIP away from the target, then always ``--clear``.
* ``maintenance``  the target goes to standby (``crm_attribute ... standby on``); undo: standby off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ha.drill.traffic import SocketFactory

KINDS = ("node-crash", "proxy-crash", "proxy-hang", "partition", "link-flap", "zk-member-loss", "switchover",
         "maintenance")  # fmt: skip
# The proxy's process group inside a node, for either agent (sipha's or resource-agents' kamailio): the group
# with the most live (not zombie) kamailio processes, printed as "PGID COUNT". Kamailio daemonizes into its own
# session, so that group is exactly the proxy; a pid file is not used because it can name a main process that
# is gone while its workers still run.
PROXY_GROUP_SCRIPT = ("ps -C kamailio -o pgid=,stat= | awk '$2 !~ /Z/ {print $1}' | sort | uniq -c | sort -rn"
                      " | awk 'NR==1 {print $2, $1; found=1}"
                      " END {if (!found) {print \"no kamailio running\" > \"/dev/stderr\"; exit 1}}'")  # fmt: skip


class DrillError(RuntimeError):
    """Bad input or a cluster a drill must not run against; always one line for the operator."""


@dataclass(frozen=True)
class ClusterState:
    """What the health check reads: plain data, so the refusal rules are tested without a cluster."""

    nodes: tuple[str, ...]
    vip: str
    powered: Mapping[str, bool]
    quorate: Mapping[str, bool]
    vip_holders: tuple[str, ...]
    vip_answers: bool
    vip_detail: str = ""
    proxies: Mapping[str, tuple[bool, str]] = field(default_factory=dict)  # node -> (answers OPTIONS, detail)
    # node -> (its coordinator is ready for a drill, detail); empty where the cluster replicates nothing (stock)
    replication: Mapping[str, tuple[bool, str]] = field(default_factory=dict)
    # sipha runs a warm proxy on every node; stock runs one, in a group with the VIP, on the VIP's node only
    standby_proxies: bool = True
    partitioned: tuple[str, ...] = ()
    failed_resources: tuple[str, ...] = ()

    @property
    def holder(self) -> str | None:
        return self.vip_holders[0] if len(self.vip_holders) == 1 else None


class ClusterControl(Protocol):
    """What a drill needs from the cluster it breaks (the lab: ``ha.drill.labctl.LabControl``)."""

    nodes: tuple[str, ...]
    vip: str
    sip_port: int
    client_ip: str
    variant: str

    def status(self) -> ClusterState: ...

    def vip_owners(self) -> dict[str, bool]: ...

    def exec(self, node: str, argv: list[str], timeout: float = 10.0) -> tuple[int, str]: ...

    def power(self, node: str, on: bool) -> None: ...

    def partition(self, node: str, cut: bool) -> None: ...

    def link(self, node: str, up: bool) -> None: ...

    def socket_factory(self) -> SocketFactory: ...

    def pacemaker_command(self, what: str, node: str, on: bool = True) -> list[str]: ...


def health_problems(st: ClusterState) -> list[str]:
    """Why a drill must not start (empty: healthy). A drill on a broken cluster measures the breakage."""
    out: list[str] = []
    for n in st.nodes:
        if not st.powered.get(n):
            out.append(f"{n} is powered off")
    up = [n for n in st.nodes if st.powered.get(n)]
    if up and not any(st.quorate.get(n) for n in up):
        out.append("no quorum on any node")
    else:
        out += [f"{n} has no quorum" for n in up if not st.quorate.get(n)]
    out += [f"{n} is partitioned" for n in st.partitioned]
    if not st.vip_holders:
        out.append(f"VIP {st.vip} is nowhere")
    elif len(st.vip_holders) > 1:
        out.append(f"VIP {st.vip} is on {len(st.vip_holders)} nodes ({', '.join(st.vip_holders)})")
    if st.vip_holders and not st.vip_answers:
        out.append(f"VIP {st.vip} does not answer SIP OPTIONS ({st.vip_detail or 'no answer'})")
    for n in up if st.standby_proxies else [n for n in up if n in st.vip_holders]:
        ok, detail = st.proxies.get(n, (False, "not probed"))
        if not ok:
            out.append(f"the proxy on {n} is not started (no answer to SIP OPTIONS: {detail})")
    for n in up:
        ok, detail = st.replication.get(n, (True, ""))
        if not ok:
            out.append(f"replication on {n} is not ready ({detail})")
    out += [f"resource {r} failed" for r in st.failed_resources]
    return out


def resolve_target(target: str, st: ClusterState) -> str:
    """``NODE``, ``active`` (the VIP's node) or ``standby`` (the first other node) -> a node name."""
    if target == "active":
        if st.holder is None:
            raise DrillError(f"--target active: VIP {st.vip} is not on exactly one node")
        return st.holder
    if target == "standby":
        others = [n for n in st.nodes if n != st.holder]
        if st.holder is None or not others:
            raise DrillError("--target standby: no node other than the VIP's")
        return others[0]
    if target not in st.nodes:
        raise DrillError(f"unknown node {target!r}; one of {', '.join(st.nodes)}, active, standby")
    return target


# ---------------------------------------------------------------------------------------------- faults


def _check(rc_out: tuple[int, str], what: str) -> str:
    rc, out = rc_out
    if rc != 0:
        raise DrillError(f"{what}: exit {rc}: {out.strip().splitlines()[-1] if out.strip() else 'no output'}")
    return out.strip()


@dataclass
class Fault:
    """One fault on one node; ``injected`` says whether undo has anything to do."""

    kind: ClassVar[str] = ""
    planned: ClassVar[bool] = False  # planned operations (switchover, maintenance) are undone at once
    node: str
    ctl: ClusterControl
    injected: bool = False
    notes: list[str] = field(default_factory=list)

    def inject(self) -> str:
        raise NotImplementedError

    def undo(self) -> str:
        raise NotImplementedError

    def restore(self) -> str:
        """After the measurement: what the next drill needs besides the undo (nothing, for most kinds)."""
        return ""

    def other_node(self) -> str:
        """A node other than the target, to run cluster commands on (it stays reachable)."""
        others = [n for n in self.ctl.nodes if n != self.node]
        if not others:
            raise DrillError("the cluster has a single node")
        return others[0]


class NodeCrash(Fault):
    kind = "node-crash"

    def inject(self) -> str:
        self.injected = True
        self.ctl.power(self.node, on=False)
        return f"{self.node} powered off"

    def undo(self) -> str:
        self.ctl.power(self.node, on=True)
        return f"{self.node} powered on (it rejoins the cluster by itself)"


def _proxy_group(f: Fault) -> tuple[str, str]:
    """(pgid, how many processes) of the proxy on ``f.node``; never init's group or the node's own."""
    out = _check(f.ctl.exec(f.node, ["sh", "-c", PROXY_GROUP_SCRIPT]), f"the proxy's process group on {f.node}")
    pgid, _, count = out.partition(" ")
    if not pgid.isdigit() or pgid in ("0", "1"):
        raise DrillError(f"the proxy's process group on {f.node}: {out!r}")
    return pgid, count or "?"


class ProxyCrash(Fault):
    kind = "proxy-crash"

    def inject(self) -> str:
        pgid, count = _proxy_group(self)
        self.injected = True
        _check(self.ctl.exec(self.node, ["kill", "-KILL", "--", f"-{pgid}"]), f"SIGKILL -{pgid} on {self.node}")
        return f"kamailio process group {pgid} on {self.node} ({count} processes) killed (SIGKILL)"

    def undo(self) -> str:
        return "nothing to undo: Pacemaker restarts the proxy"

    def restore(self) -> str:
        return _cleanup(self)


def _cleanup(f: Fault, settle_s: int = 90) -> str:
    """Forget the failure so the next drill starts clean, once Pacemaker finished its own recovery (a cleanup
    in the middle of it re-probes and can leave the proxy stopped). The wait is bounded; a cluster that does
    not settle in time still gets the cleanup, and the next drill's health check says what is wrong."""
    other = f.other_node()
    rc, _out = f.ctl.exec(other, ["crm_resource", "--wait", f"--timeout={settle_s}s"], timeout=settle_s + 10)
    _check(f.ctl.exec(other, f.ctl.pacemaker_command("cleanup", f.node)), f"cleanup on {f.node}")
    idle = wait_dc_idle(f.ctl, other, settle_s)
    late = "" if rc == 0 and idle else f" (Pacemaker not idle after {settle_s} s)"
    return f"failures on {f.node} cleaned up{late}"


def wait_dc_idle(ctl: ClusterControl, node: str, timeout_s: float, settled_polls: int = 3, poll_s: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep) -> bool:  # fmt: skip
    """Wait until the DC's controller has been S_IDLE for ``settled_polls`` polls running (bounded; False on
    timeout). Why: a cleanup's CIB updates keep the DC in its "Re-asking for the CIB" one-second sleeps for up to
    ~2 s after ``crm_resource --wait`` returns; a fault injected then waits for them (a proxy crash measured
    557-680 ms instead of ~150 ms in 3 of 20 drills, each 1.5 s after the previous drill's cleanup)."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    for _ in range(max(1, int(timeout_s / poll_s) + 1)):
        rc, dc = ctl.exec(node, ["crmadmin", "--dc_lookup", "--quiet"])
        state = ctl.exec(node, ["crmadmin", "--status", dc.strip(), "--quiet"])[1].strip() if rc == 0 else ""
        streak = streak + 1 if state == "S_IDLE" else 0
        if streak >= settled_polls:
            return True
        if time.monotonic() >= deadline:
            return False
        sleep(poll_s)
    return False


class ProxyHang(Fault):
    kind = "proxy-hang"
    pgid: str | None = None

    def inject(self) -> str:
        pgid, count = _proxy_group(self)
        self.pgid = pgid
        self.injected = True
        _check(self.ctl.exec(self.node, ["kill", "-STOP", "--", f"-{pgid}"]), f"SIGSTOP -{pgid}")
        return f"kamailio process group {pgid} on {self.node} ({count} processes) stopped (SIGSTOP)"

    def undo(self) -> str:
        if self.pgid:
            # The group may be gone (the agent killed a hung proxy): that is not an undo failure.
            self.ctl.exec(self.node, ["kill", "-CONT", "--", f"-{self.pgid}"])
        return f"kamailio on {self.node} continued (SIGCONT)"

    def restore(self) -> str:
        return _cleanup(self)


class Partition(Fault):
    kind = "partition"

    def inject(self) -> str:
        self.injected = True
        self.ctl.partition(self.node, cut=True)
        return f"{self.node} cut off the cluster network"

    def undo(self) -> str:
        self.ctl.partition(self.node, cut=False)
        return f"{self.node} healed"


class LinkFlap(Fault):
    kind = "link-flap"
    flaps: ClassVar[int] = 3
    down_s: ClassVar[float] = 0.3
    up_s: ClassVar[float] = 0.7
    sleep: ClassVar[Callable[[float], None]] = staticmethod(time.sleep)

    def inject(self) -> str:
        self.injected = True
        down, up = self.down_s * 1000, self.up_s * 1000
        for i in range(self.flaps):
            try:
                self.ctl.link(self.node, up=False)
                self.sleep(self.down_s)
                self.ctl.link(self.node, up=True)
            except DrillError as exc:
                # The flapping node was fenced: its power cycle replaced the link we were toggling. That is
                # the cluster's answer to the fault, not a failed drill; stop flapping, say so.
                self.notes.append(f"flap {i + 1}: {exc} (fenced mid-flap?); flapping stopped")
                return f"{self.node} link flapped {i} x, then its link was gone ({exc})"
            if i + 1 < self.flaps:
                self.sleep(self.up_s)
        return f"{self.node} link flapped {self.flaps} x ({down:.0f} ms down, {up:.0f} ms up)"

    def undo(self) -> str:
        try:
            self.ctl.link(self.node, up=True)
        except DrillError as exc:  # a power cycle made a fresh link, which is up
            return f"{self.node} link not set up: {exc}"
        return f"{self.node} link up"


class ZkMemberLoss(Fault):
    kind = "zk-member-loss"
    pid: str | None = None

    def inject(self) -> str:
        # pgrep runs inside the node's own PID namespace: it sees that node's processes only.
        out = _check(self.ctl.exec(self.node, ["pgrep", "-o", "-f", "QuorumPeerMain"]), f"ZooKeeper on {self.node}")
        if not out.isdigit():
            raise DrillError(f"ZooKeeper pid on {self.node}: {out!r}")
        self.pid = out
        self.injected = True
        _check(self.ctl.exec(self.node, ["kill", "-STOP", out]), f"SIGSTOP ZooKeeper {out}")
        return f"ZooKeeper {out} on {self.node} stopped (SIGSTOP)"

    def undo(self) -> str:
        if self.pid:
            self.ctl.exec(self.node, ["kill", "-CONT", self.pid])
        return f"ZooKeeper on {self.node} continued"


class Switchover(Fault):
    kind = "switchover"
    planned = True

    def inject(self) -> str:
        to = self.other_node()
        self.injected = True
        _check(self.ctl.exec(to, self.ctl.pacemaker_command("move", to)), f"move the VIP to {to}")
        return f"VIP moved away from {self.node} to {to} (crm_resource --move)"

    def undo(self) -> str:
        _check(self.ctl.exec(self.other_node(), self.ctl.pacemaker_command("clear", self.node)), "clear the move")
        return "move constraint cleared (crm_resource --clear)"


class Maintenance(Fault):
    kind = "maintenance"
    planned = True

    def inject(self) -> str:
        self.injected = True
        _check(self.ctl.exec(self.other_node(), self.ctl.pacemaker_command("standby", self.node, True)), "standby on")
        return f"{self.node} in standby (its resources move away)"

    def undo(self) -> str:
        _check(self.ctl.exec(self.other_node(), self.ctl.pacemaker_command("standby", self.node, False)),
               "standby off")  # fmt: skip
        return f"{self.node} out of standby"


FAULTS: dict[str, type[Fault]] = {f.kind: f for f in (NodeCrash, ProxyCrash, ProxyHang, Partition, LinkFlap,
                                                       ZkMemberLoss, Switchover, Maintenance)}  # fmt: skip
assert tuple(FAULTS) == KINDS


def make_fault(kind: str, node: str, ctl: ClusterControl) -> Fault:
    if kind not in FAULTS:
        raise DrillError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")
    return FAULTS[kind](node=node, ctl=ctl)


def describe(f: Fault) -> dict[str, Any]:
    return {"kind": f.kind, "node": f.node, "planned": f.planned, "notes": list(f.notes)}


__all__ = [
    "FAULTS",
    "KINDS",
    "ClusterControl",
    "ClusterState",
    "DrillError",
    "Fault",
    "health_problems",
    "make_fault",
    "resolve_target",
]
