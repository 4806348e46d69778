"""A short drill of every fault kind against the session lab (issue 6): the structural results only.

Each drill runs through ``ha.drill.run`` with the lab's real :class:`~ha.drill.labctl.LabControl` (real
Kamailio, Pacemaker, Corosync, ZooKeeper; SIP over UDP from the client namespace to the VIP) and must show:
the VIP answered again after the fault, every registration made before it is still reachable without a
re-REGISTER, every call established before it could be hung up (BYE through the route set), no instant with
the VIP on two nodes, the fault undone (power, bridge port, link, SIGCONT, no move constraint, no standby),
and the cluster settled again (Pacemaker's view, sipha-health, and every coordinator ready, active on the
VIP's node). No timing thresholds: how long the gap is lives in the benchmark
(``bench/drill_bench.py``, BENCHMARKS.md).

Phases are short to keep the module near three minutes; a node crash and a partition keep the fault for 3 s so
the survivor takes over while the node is still down or cut off (the undo is not what recovers the VIP).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from labhelp import NODES, node_sh, settled, wait_for

from ha.drill import run as drillrun
from ha.drill.faults import KINDS
from ha.drill.labctl import LabControl
from ha.lab import lab as labmod
from ha.lab import node as labnode

pytestmark = pytest.mark.lab

REGISTRATIONS = 5
CALLS = 2
# fault -> (hold_s, after_s). link-flap's inject itself takes ~2.3 s (3 flaps).
PHASES: dict[str, tuple[float, float]] = {
    "node-crash": (3.0, 4.0),
    "proxy-crash": (1.5, 2.5),
    "proxy-hang": (2.0, 2.5),
    "partition": (3.0, 4.0),
    "link-flap": (0.5, 3.0),
    "zk-member-loss": (2.0, 2.5),
    "switchover": (1.0, 2.0),
    "maintenance": (1.0, 2.0),
}
assert set(PHASES) == set(KINDS)
# zk-member-loss last: once (22:21:53 in a run of this module) the active coordinator whose ZooKeeper member was
# stopped kept its session but its contact watch delivered nothing more ("replicator changes" stopped in its
# log); when it next took the VIP over, its reconcile removed 5 bindings its proxy never got ("proxy 35
# bindings, store 40: ... removed 5"), and the following drill (maintenance) found 0/5 registrations. That is
# a coordinator bug (reported, not fixed here); placed last, it cannot pass for another fault kind's failure.
ORDER = (*(k for k in KINDS if k != "zk-member-loss"), "zk-member-loss")


def _wait_settled(lab: dict[str, Any], timeout: float, what: str) -> None:
    wait_for(lambda: settled(lab), timeout, what, 0.5)


def _stopped_processes(lab: dict[str, Any], node: str) -> str:
    """Processes in state T (SIGSTOPped) inside ``node``: none may be left after an undo."""
    p = node_sh(lab, node, "ps -eo stat=,pid=,comm= | awk '$1 ~ /^T/'")
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def _assert_undone(lab: dict[str, Any]) -> None:
    """Nothing a fault did is left: every node powered and on the bridge, links up, nothing SIGSTOPped, no
    move constraint, no standby, all three ZooKeeper members serving."""
    for n in NODES:
        assert labmod.powered(n), f"{n} left powered off"
        h = labmod.host(lab, n)
        assert not labnode.partitioned(lab, h), f"{n} left partitioned"
        link = labnode.run(["ip", "-n", lab["bridge_ns"], "-o", "link", "show", h["veth"]], check=False).stdout
        assert re.search(r"[<,]UP[,>]", link), f"{n}'s link left down: {link}"
        assert _stopped_processes(lab, n) == "", f"stopped processes left on {n}"
    cons = labmod.exec_in(lab, NODES[0], ["cibadmin", "-Q", "-o", "constraints"], timeout=10).stdout
    assert "cli-prefer" not in cons and "cli-ban" not in cons, f"a move constraint was left: {cons}"
    for n in NODES:
        p = labmod.exec_in(lab, NODES[0], ["crm_attribute", "--node", n, "--name", "standby", "--query", "--quiet"],
                           timeout=10)  # fmt: skip
        assert p.stdout.strip() in ("", "off", "false"), f"{n} left in standby: {p.stdout.strip()}"
    wait_for(lambda: sorted(labmod.zk_modes(lab).values()) == ["follower", "follower", "leader"], 30,
             "ZooKeeper ensemble serving on all three members")  # fmt: skip


@pytest.mark.parametrize("kind", ORDER)
def test_short_drill(lab: dict[str, Any], kind: str) -> None:
    _wait_settled(lab, 120, f"settled cluster before the {kind} drill")
    hold_s, after_s = PHASES[kind]
    opts = drillrun.DrillOptions(fault=kind, target="active", registrations=REGISTRATIONS, calls=CALLS, rate=1.0,
                                 before_s=0.5, hold_s=hold_s, after_s=after_s, wait_s=120)  # fmt: skip
    ctl = LabControl(lab)
    try:
        result = drillrun.run(ctl, opts, progress=lambda m: print(f"{kind}: {m}", flush=True))
    finally:
        ctl.close()
    assert result["completed"] == 1, result["stopped"]
    doc = result["runs"][0]
    figs = doc["figures"]
    summary = {k: v for k, v in figs.items() if k != "details"}
    print(kind, summary, "errors:", doc["errors"])
    for e in doc["timeline"]:
        print(f"  {e['t']:8.3f}  {e['event']}" if e["t"] is not None else f"       -  {e['event']}")
    assert doc["error"] is None and not doc["interrupted"], doc["error"]
    assert doc["undo_error"] is None, doc["undo_error"]
    events = [e["event"] for e in doc["timeline"]]
    assert "fault injected" in events and "fault undone" in events, events
    assert doc["old_node"] in NODES and doc["target"] == doc["old_node"]
    # recovered: the VIP answered again after its longest silence (which may be 0 for zk-member-loss)
    assert figs["recovered"], f"the VIP did not answer again after {kind}: {summary}"
    reg = figs["details"]["registrations"]
    assert reg["registered"] == REGISTRATIONS, reg
    assert figs["registrations_checked"] == REGISTRATIONS, reg
    bad = [r for r in doc["registrations"] if not (r["reach_status"] == 200 and r["reach_received"])]
    assert figs["registrations_reachable"] == REGISTRATIONS, f"unreachable after {kind}: {bad}"
    calls = figs["details"]["calls"]
    assert figs["calls_established"] == CALLS, calls
    assert figs["calls_bye_ok"] == CALLS, f"BYE failed after {kind}: {calls['bye_failed']}"
    sb = figs["details"]["split_brain"]
    assert sb["total"] > 0, "the VIP ownership sampler recorded nothing"
    assert figs["split_brain_samples"] == 0, f"the VIP was on two nodes after {kind}: {sb}"
    _assert_undone(lab)
    _wait_settled(lab, 120, f"settled cluster after the {kind} drill")
    ctl = LabControl(lab)
    try:  # the drill's own health check, replication included: the next drill could start
        assert drillrun.wait_healthy(ctl, 60) == []
    finally:
        ctl.close()
