"""ha.drill.faults: refusal rules, targets, and each fault's inject/undo against a recording control.

Nothing here touches a lab: the control records what it was asked to do and answers from a script.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any

import pytest

from ha.drill import faults
from ha.drill.faults import ClusterState, DrillError

HEALTHY = ClusterState(
    nodes=("node1", "node2"),
    vip="198.51.100.10",
    powered={"node1": True, "node2": True},
    quorate={"node1": True, "node2": True},
    vip_holders=("node1",),
    vip_answers=True,
    proxies={"node1": (True, "200 OK"), "node2": (True, "200 OK")},
)


class Recorder:
    """A ClusterControl that records every call; ``answers`` maps a command's first words to (rc, output)."""

    nodes = ("node1", "node2")
    vip = "198.51.100.10"
    sip_port = 5060
    client_ip = "198.51.100.50"
    variant = "model"

    def __init__(self, answers: dict[str, tuple[int, str]] | None = None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.answers = answers or {}

    def status(self) -> ClusterState:
        return HEALTHY

    def vip_owners(self) -> dict[str, bool]:
        return {"node1": True, "node2": False}

    def exec(self, node: str, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        self.log.append(("exec", node, *argv))
        for prefix, answer in self.answers.items():
            if " ".join(argv).startswith(prefix):
                return answer
        if argv[:2] == ["crmadmin", "--dc_lookup"]:
            return 0, "node2\n"
        if argv[:2] == ["crmadmin", "--status"]:
            return 0, "S_IDLE\n"
        return 0, ""

    def power(self, node: str, on: bool) -> None:
        self.log.append(("power", node, on))

    def partition(self, node: str, cut: bool) -> None:
        self.log.append(("partition", node, cut))

    def link(self, node: str, up: bool) -> None:
        self.log.append(("link", node, up))

    def socket_factory(self) -> Any:
        return lambda kind: socket.socket(socket.AF_INET, kind)

    def pacemaker_command(self, what: str, node: str, on: bool = True) -> list[str]:
        return ["pcmk", what, node, "on" if on else "off"]


def test_healthy_cluster_has_no_problems() -> None:
    assert faults.health_problems(HEALTHY) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"quorate": {"node1": False, "node2": False}}, ["no quorum on any node"]),
        ({"quorate": {"node1": True, "node2": False}}, ["node2 has no quorum"]),
        ({"vip_holders": (), "vip_answers": False}, ["VIP 198.51.100.10 is nowhere"]),
        ({"vip_holders": ("node1", "node2")}, ["VIP 198.51.100.10 is on 2 nodes (node1, node2)"]),
        ({"vip_answers": False, "vip_detail": "timeout"}, ["VIP 198.51.100.10 does not answer SIP OPTIONS (timeout)"]),
        ({"proxies": {"node1": (True, "ok"), "node2": (False, "refused")}},
         ["the proxy on node2 is not started (no answer to SIP OPTIONS: refused)"]),
        ({"powered": {"node1": True, "node2": False}, "quorate": {"node1": True, "node2": False},
          "proxies": {"node1": (True, "ok")}}, ["node2 is powered off"]),
        ({"partitioned": ("node2",)}, ["node2 is partitioned"]),
        ({"failed_resources": ("proxy on node2",)}, ["resource proxy on node2 failed"]),
        ({"replication": {"node1": (True, "ready, active"), "node2": (False, "coordinator not ready: resync pending")}},
         ["replication on node2 is not ready (coordinator not ready: resync pending)"]),
        ({"replication": {"node1": (True, "ok")}}, []),  # a node the control did not ask is not held against it
        # stock: one proxy, grouped with the VIP; the standby has none and that is not a problem
        ({"standby_proxies": False, "proxies": {"node1": (True, "ok")}}, []),
        ({"standby_proxies": False, "proxies": {"node1": (False, "timeout")}},
         ["the proxy on node1 is not started (no answer to SIP OPTIONS: timeout)"]),
    ],
)  # fmt: skip
def test_unhealthy_cluster_says_why(change: dict[str, Any], expected: list[str]) -> None:
    assert faults.health_problems(replace(HEALTHY, **change)) == expected


def test_targets() -> None:
    assert faults.resolve_target("active", HEALTHY) == "node1"
    assert faults.resolve_target("standby", HEALTHY) == "node2"
    assert faults.resolve_target("node2", HEALTHY) == "node2"
    with pytest.raises(DrillError, match=r"^unknown node 'node9'; one of node1, node2, active, standby$"):
        faults.resolve_target("node9", HEALTHY)
    with pytest.raises(DrillError, match="not on exactly one node"):
        faults.resolve_target("active", replace(HEALTHY, vip_holders=()))


def test_unknown_fault_is_one_line() -> None:
    with pytest.raises(DrillError, match=r"^unknown fault 'meteor'; one of node-crash, proxy-crash"):
        faults.make_fault("meteor", "node1", Recorder())


def test_node_crash_powers_off_then_on() -> None:
    r = Recorder()
    f = faults.make_fault("node-crash", "node1", r)
    f.inject()
    f.undo()
    assert r.log == [("power", "node1", False), ("power", "node1", True)] and f.injected


def test_proxy_crash_kills_the_whole_group_then_cleans_up_from_the_other_node() -> None:
    r = Recorder({"sh -c": (0, "4242 9\n")})
    f = faults.make_fault("proxy-crash", "node1", r)
    assert f.inject() == "kamailio process group 4242 on node1 (9 processes) killed (SIGKILL)"
    f.undo()
    assert len(r.log) == 2  # nothing to undo: Pacemaker restarts it; the cleanup waits for the restore
    assert r.log[0][:3] == ("exec", "node1", "sh") and "ps -C kamailio" in r.log[0][-1]
    assert r.log[1] == ("exec", "node1", "kill", "-KILL", "--", "-4242")
    assert f.restore() == "failures on node1 cleaned up"
    # Pacemaker's own recovery first (bounded), then the cleanup, both from the other node
    assert r.log[2] == ("exec", "node2", "crm_resource", "--wait", "--timeout=90s")
    assert r.log[3] == ("exec", "node2", "pcmk", "cleanup", "node1", "on")
    # then until the DC's controller is idle for three polls running
    assert r.log[4:] == [("exec", "node2", "crmadmin", "--dc_lookup", "--quiet"),
                         ("exec", "node2", "crmadmin", "--status", "node2", "--quiet")] * 3  # fmt: skip


def test_the_next_drill_waits_for_the_dc_to_be_idle() -> None:
    """A cleanup leaves the DC in its one-second "Re-asking for the CIB" sleeps for a while (S_POLICY_ENGINE):
    a fault then waits for them, and the drill measures Pacemaker's backlog, not the failover."""
    states = iter(["S_POLICY_ENGINE", "S_TRANSITION_ENGINE", "S_IDLE", "S_POLICY_ENGINE", "S_IDLE", "S_IDLE",
                   "S_IDLE"])  # fmt: skip

    class Busy(Recorder):
        def exec(self, node: str, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
            if argv[:2] == ["crmadmin", "--status"]:
                self.log.append(("exec", node, *argv))
                return 0, next(states) + "\n"
            return super().exec(node, argv, timeout)

    slept: list[float] = []
    assert faults.wait_dc_idle(Busy(), "node2", 30, sleep=slept.append)
    assert len(slept) == 6  # idle only from the 5th poll on, three in a row needed
    gone = Recorder({"crmadmin --dc_lookup": (102, "no DC: not connected")})
    assert not faults.wait_dc_idle(gone, "node2", 1.0, sleep=lambda _s: None)  # bounded, even with no wait


def test_cleanup_still_runs_when_pacemaker_does_not_settle() -> None:
    r = Recorder({"sh -c": (0, "4242 9"), "crm_resource --wait": (124, "timed out")})
    f = faults.make_fault("proxy-hang", "node1", r)
    f.inject()
    assert f.undo() == "kamailio on node1 continued (SIGCONT)"
    assert f.restore() == "failures on node1 cleaned up (Pacemaker not idle after 90 s)"
    assert ("exec", "node2", "pcmk", "cleanup", "node1", "on") in r.log


def test_proxy_crash_without_a_proxy_injects_nothing() -> None:
    r = Recorder({"sh -c": (1, "no kamailio running\n")})
    f = faults.make_fault("proxy-crash", "node1", r)
    with pytest.raises(DrillError, match="the proxy's process group on node1: exit 1: no kamailio running"):
        f.inject()
    assert not f.injected and len(r.log) == 1


def test_proxy_group_script_picks_the_largest_live_group() -> None:
    """The shell pipeline itself, on a fake ``ps``: zombies do not count, the biggest group wins."""
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        fake = Path(d) / "ps"
        fake.write_text("#!/bin/sh\nprintf '  7 S\\n 50 S\\n 50 S\\n 50 Z\\n 50 Z\\n 50 Z\\n 60 S\\n'\n")
        fake.chmod(0o755)
        p = subprocess.run(["sh", "-c", faults.PROXY_GROUP_SCRIPT], capture_output=True, text=True,
                           env={"PATH": f"{d}:/usr/bin:/bin"})  # fmt: skip
        assert (p.returncode, p.stdout) == (0, "50 2\n")
        fake.write_text("#!/bin/sh\nexit 1\n")
        p = subprocess.run(["sh", "-c", faults.PROXY_GROUP_SCRIPT], capture_output=True, text=True,
                           env={"PATH": f"{d}:/usr/bin:/bin"})  # fmt: skip
        assert (p.returncode, p.stderr) == (1, "no kamailio running\n")


def test_proxy_hang_stops_and_continues_the_same_group() -> None:
    r = Recorder({"sh -c": (0, "4242 7")})
    f = faults.make_fault("proxy-hang", "node2", r)
    assert f.inject() == "kamailio process group 4242 on node2 (7 processes) stopped (SIGSTOP)"
    f.undo()
    cmds = [e[2:] for e in r.log if e[0] == "exec"]
    assert ("kill", "-STOP", "--", "-4242") in cmds and ("kill", "-CONT", "--", "-4242") in cmds
    assert cmds.index(("kill", "-STOP", "--", "-4242")) < cmds.index(("kill", "-CONT", "--", "-4242"))


@pytest.mark.parametrize("kind", ["proxy-hang", "proxy-crash"])
def test_proxy_faults_refuse_init_group(kind: str) -> None:
    r = Recorder({"sh -c": (0, "1 3")})
    with pytest.raises(DrillError, match="process group"):
        faults.make_fault(kind, "node1", r).inject()
    assert not any("-STOP" in e or "-KILL" in e for e in r.log)


def test_partition_link_flap_zk() -> None:
    r = Recorder()
    p = faults.make_fault("partition", "node2", r)
    p.inject()
    p.undo()
    assert r.log == [("partition", "node2", True), ("partition", "node2", False)]
    r = Recorder()
    lf = faults.make_fault("link-flap", "node1", r)
    slept: list[float] = []
    lf.sleep = slept.append  # type: ignore[method-assign]
    lf.inject()
    lf.undo()
    assert r.log == [("link", "node1", False), ("link", "node1", True)] * 3 + [("link", "node1", True)]
    assert slept == [0.3, 0.7, 0.3, 0.7, 0.3]
    r = Recorder({"pgrep": (0, "99\n")})
    z = faults.make_fault("zk-member-loss", "node2", r)
    z.inject()
    z.undo()
    assert r.log[1:] == [("exec", "node2", "kill", "-STOP", "99"), ("exec", "node2", "kill", "-CONT", "99")]


def test_planned_faults_move_and_clear() -> None:
    r = Recorder()
    s = faults.make_fault("switchover", "node1", r)
    s.inject()
    s.undo()
    assert r.log == [
        ("exec", "node2", "pcmk", "move", "node2", "on"),
        ("exec", "node2", "pcmk", "clear", "node1", "on"),
    ]
    r = Recorder()
    m = faults.make_fault("maintenance", "node1", r)
    m.inject()
    m.undo()
    assert [e[3:] for e in r.log] == [("standby", "node1", "on"), ("standby", "node1", "off")]


def test_every_kind_is_registered() -> None:
    assert set(faults.FAULTS) == set(faults.KINDS) and len(faults.KINDS) == 8


def test_link_flap_stops_when_the_fenced_node_lost_its_link() -> None:
    """A fence power-cycles the flapping node: its link is replaced; that ends the flapping, it is no error."""

    class Gone(Recorder):
        def link(self, node: str, up: bool) -> None:
            self.log.append(("link", node, up))
            if len(self.log) >= 3:
                raise DrillError('link down v-node1: Cannot find device "v-node1"')

    r = Gone()
    lf = faults.make_fault("link-flap", "node1", r)
    lf.sleep = lambda _s: None  # type: ignore[method-assign]
    assert lf.inject().startswith("node1 link flapped 1 x, then its link was gone")
    assert lf.notes and "fenced mid-flap" in lf.notes[0]
    assert lf.undo().startswith("node1 link not set up")
