"""Fencing end to end (issue 4): node1, holding the VIP, is cut off; node2 (quorate through the witness) fences it
through fence_sipha_lab (the lab supervisor powers it off and on), and starts the VIP only after that succeeded.
The same cut of a holder whose health service is dead: no fast claim over it (the witness refuses the lease),
and the address is never on both nodes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from labhelp import api, cleanup, node_sh, token, wait_for, wait_settled

from ha import model
from ha.drill.labctl import LabControl
from ha.drill.ownership import OwnershipSampler
from ha.health.arbiter import claim_window_s
from ha.lab import lab as labmod
from ha.lab import node as labnode

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parent.parent.parent


def sipha(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ha.cli", "lab", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip


def _vip_on_node1(lab: dict[str, Any]) -> None:
    wait_settled(lab, 60)
    if labmod.vip_holder(lab) != "node1":
        status, text = api(lab, "node2", "POST", "/switchover", token=token(lab, "node2"), body={"to": "node1"})
        assert status == 200, text
    wait_settled(lab, 30)


def _settled_after_the_fence(lab: dict[str, Any]) -> None:
    """The fenced node1 was powered on again by the reboot and rejoins: leave a settled cluster."""
    wait_for(lambda: labmod.powered("node1"), 30, "node1 powered on again")
    try:
        wait_settled(lab, 90)
    except AssertionError:
        cleanup(lab)
        wait_settled(lab, 60)


def test_partitioned_vip_holder_is_fenced_before_the_vip_moves(lab: dict[str, Any]) -> None:
    if not lab["stonith"]:
        pytest.skip("fence_sipha_lab not installed: the lab runs with stonith-enabled=false")
    _vip_on_node1(lab)
    log_path = Path(lab["state_dir"]) / "node2/root/var/log/pacemaker/pacemaker.log"
    offset = log_path.stat().st_size

    def successes() -> set[str]:
        p = node_sh(lab, "node2", "stonith_admin --history node1 --verbose")
        return {ln for ln in p.stdout.splitlines() if re.search(r"(reboot|off) of node1 successful", ln)}

    # Earlier tests' fences of node1 are in the history too: only a new one counts. (Before the fast claim the
    # VIP moved only after the fence, so waiting for the VIP hid this; with it, the VIP moves first.)
    before = successes()
    assert sipha("partition", "node1").returncode == 0
    try:
        def fenced() -> str:
            return "\n".join(sorted(successes() - before))

        history = wait_for(fenced, 60, "node2 fenced node1 (stonith_admin --history)", 0.5)
        print(history)
        assert "fence-node1" in history or "fence_sipha_lab" in history or "delegate=node2" in history, history
        wait_for(lambda: labmod.vip_holder(lab) == "node2", 30, "VIP on node2")
    finally:
        sipha("heal")
    with open(log_path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    fence_ok = [i for i, ln in enumerate(lines)
                if re.search(r"Operation '?(reboot|off)'? (\[\d+\] )?(targeting|for) node1.*(OK|ok)", ln)]  # fmt: skip
    vip_start = [i for i, ln in enumerate(lines) if re.search(r"Result of start operation for vip-\S+ on node2", ln)]
    print("\n".join(lines[i] for i in sorted(fence_ok + vip_start)))
    assert fence_ok, "no successful fence of node1 in node2's pacemaker.log"
    # the device that did it: fence-node1, a stonith:fence_sipha_lab resource
    assert any("fence-node1" in ln for ln in lines), "fence-node1 (fence_sipha_lab) not named in node2's log"
    assert vip_start, "no VIP start on node2 in node2's pacemaker.log"
    assert fence_ok[0] < vip_start[0], "the VIP started on node2 before node1 was fenced"
    _settled_after_the_fence(lab)


def _health_pid(lab: dict[str, Any], node: str) -> int:
    """The host pid of the health service the lab's init started in ``node`` (its argv, in that node's netns)."""
    ns = next(h["ns"] for h in lab["hosts"] if h["name"] == node)
    for pid in labnode.pids_in_netns(ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ha.cli" in argv and b"health" in argv and b"run" in argv:
            return pid
    raise AssertionError(f"no health service process in {node}'s namespace")


def _log_since(lab: dict[str, Any], host: str, name: str, offset: int) -> str:
    with open(Path(lab["state_dir"]) / host / "logs" / f"{name}.log", "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_a_cut_off_holder_with_a_dead_health_service_is_fenced_not_claimed_over(lab: dict[str, Any]) -> None:
    """node1 holds the VIP and its health service dies (it neither renews the lease nor could drop the VIP on a
    cut); then node1 is cut off. Before the witness refused such claims, node2's fast claim put the address on
    node2 ~0.8 s after the cut while node1 still had it (until its Pacemaker stopped it for lost quorum, or the
    fence): samples with the VIP on both nodes. Now node2's claim is refused with the reason, and Pacemaker
    fences node1 before it starts the VIP on node2. Without the refusal (checked by hand, 2026-11-26): 35 samples
    (350 ms) with the VIP on both nodes."""
    cluster = model.load(lab["cluster_yaml"])
    if not lab["stonith"] or not cluster.failover.fast_claim:
        pytest.skip("needs fence_sipha_lab and failover.fast_claim (examples/lab.yaml)")
    _vip_on_node1(lab)
    logs = {(h, n): (Path(lab["state_dir"]) / h / "logs" / f"{n}.log").stat().st_size
            for h, n in (("node2", "sipha-health"), ("witness", "sipha-arbiter"))}  # fmt: skip
    os.kill(_health_pid(lab, "node1"), signal.SIGKILL)  # the lab's init started it; it does not restart it
    t = cluster.timings
    time.sleep(claim_window_s(t.token_ms, t.consensus_ms, cluster.failover.lease_ms) + 1.0)
    ctl = LabControl(lab)
    sampler = OwnershipSampler(ctl.vip_owners)
    sampler.start()
    assert sipha("partition", "node1").returncode == 0
    try:
        wait_for(lambda: labmod.vip_holder(lab) == "node2", 60, "VIP on node2 (after node1's fence)")
        time.sleep(1.0)
    finally:
        sipha("heal")
        sampler.stop()
    both = [(round(ts, 3), o) for ts, o in sampler.samples if sum(o.values()) > 1]
    assert len(sampler.samples) > 100, f"only {len(sampler.samples)} ownership samples"
    assert not both, f"{len(both)} samples with the VIP on both nodes (10 ms apart), first {both[:3]}"
    claims = _log_since(lab, "node2", "sipha-health", logs[("node2", "sipha-health")])
    refused = _log_since(lab, "witness", "sipha-arbiter", logs[("witness", "sipha-arbiter")])
    assert "arbiter_claim_refused node=node2 holder=node1" in refused and "lease lapsed" in refused, refused[-2000:]
    assert "fast_claim_dropped" in claims and "lease lapsed" in claims, claims[-2000:]
    assert not re.search(r"fast_claim(?![_\w])", claims), claims[-2000:]  # no claim event at all
    _settled_after_the_fence(lab)  # its init restarted the health service too
