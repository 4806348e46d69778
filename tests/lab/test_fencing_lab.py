"""Fencing end to end (issue 4): node1, holding the VIP, is cut off; node2 (quorate through the witness) fences it
through fence_sipha_lab (the lab supervisor powers it off and on), and starts the VIP only after that succeeded.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from labhelp import api, cleanup, node_sh, token, wait_for, wait_settled

from ha.lab import lab as labmod

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parent.parent.parent


def sipha(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ha.cli", "lab", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip


def test_partitioned_vip_holder_is_fenced_before_the_vip_moves(lab: dict[str, Any]) -> None:
    if not lab["stonith"]:
        pytest.skip("fence_sipha_lab not installed: the lab runs with stonith-enabled=false")
    wait_settled(lab, 60)
    if labmod.vip_holder(lab) != "node1":
        status, text = api(lab, "node2", "POST", "/switchover", token=token(lab, "node2"), body={"to": "node1"})
        assert status == 200, text
    wait_settled(lab, 30)
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
    # the fenced node1 was powered on again by the reboot and rejoins; leave a settled cluster
    wait_for(lambda: labmod.powered("node1"), 30, "node1 powered on again")
    try:
        wait_settled(lab, 60)
    except AssertionError:
        cleanup(lab)
        wait_settled(lab, 60)
