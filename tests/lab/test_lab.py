"""Integration tests of the namespace lab: real Corosync, Pacemaker, qnetd, ZooKeeper and Kamailio.

One lab per session (conftest.py); the tests run in file order and the last one takes the lab down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from labhelp import wait_for

from ha.lab import lab as labmod
from ha.lab import node as labnode
from ha.lab.node import LabError
from ha.lab.supervisor import SOCKET_PATH, power, request

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parent.parent.parent


def sipha(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ha.cli", "lab", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def both_online(spec: dict[str, Any]) -> bool:
    st = labmod.crm_status(spec)
    nodes = [h["name"] for h in spec["hosts"] if h["role"] == "node"]
    return all(st["nodes"].get(n) == "online" for n in nodes) and bool(st.get("dc"))


def settled(spec: dict[str, Any]) -> bool:
    """Both nodes online, every proxy clone instance started, the VIP on exactly one node."""
    if not both_online(spec):
        return False
    st = labmod.crm_status(spec)
    nodes = {h["name"] for h in spec["hosts"] if h["role"] == "node"}
    proxies = [r for r in st["resources"] if r["id"] == "proxy"]
    if proxies and {n for r in proxies if r["role"] == "Started" for n in r["nodes"]} != nodes:
        return False
    return labmod.vip_holder(spec) in nodes


def test_up_is_ready_and_fast(lab: dict[str, Any]) -> None:
    assert lab["up_seconds"] < 20, f"lab up took {lab['up_seconds']:.1f} s"
    st = labmod.status(lab)
    assert st["up"]
    for name in ("node1", "node2"):
        assert st["quorum"][name]["quorate"], st["quorum"]
    assert st["pacemaker"].get("dc") in ("node1", "node2")
    assert st["vips"][lab["vips"][0]] in ("node1", "node2")
    assert st["vip_sip"]["answered"], st["vip_sip"]
    assert "leader" in st["zookeeper"].values(), st["zookeeper"]


def test_status_json_cli(lab: dict[str, Any]) -> None:
    p = sipha("status", "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert set(st["hosts"]) == {"node1", "node2", "witness", "client"}
    assert st["hosts"]["node1"]["power"] == "on"


def test_host_has_own_namespaces(lab: dict[str, Any]) -> None:
    p = sipha("exec", "node1", "--", "sh", "-c", "hostname; tr '\\0' ' ' </proc/1/cmdline; ip -o -4 addr show eth0")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "node1"
    assert "ha.lab.init" in lines[1]
    assert "198.51.100.11/24" in p.stdout
    # the host itself has no lab address: the bridge lives in its own namespace
    host_addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    assert "198.51.100." not in host_addrs


def test_second_up_refuses_and_leaves_the_lab(lab: dict[str, Any]) -> None:
    with pytest.raises(LabError, match="already up"):
        labmod.up(REPO / "examples/lab.yaml", echo=lambda _m: None)
    assert request({"action": "ping"})["ok"]
    assert labnode.netns_exists("sipha-node1")


def test_supervisor_protocol(lab: dict[str, Any]) -> None:
    assert request({"action": "list"})["hosts"] == {"node1": "on", "node2": "on", "witness": "on"}
    assert power("status", "node2") == "on"
    bad = request({"action": "off", "host": "nosuch"})
    assert not bad["ok"] and "unknown host" in bad["error"]
    assert not request({"action": "explode", "host": "node1"})["ok"]
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(SOCKET_PATH))
        s.sendall(b"not json\n")
        assert json.loads(s.recv(4096))["ok"] is False
    # the same socket path answers from inside a node (what fence_sipha_lab uses)
    code = "from ha.lab.supervisor import request; print(request({'action': 'ping'}))"
    p = labmod.exec_in(lab, "node1", [sys.executable, "-c", code])
    assert "'ok': True" in p.stdout, p.stderr


def test_partition_and_heal(lab: dict[str, Any]) -> None:
    holder = labmod.vip_holder(lab)
    other = "node2" if holder == "node1" else "node1"
    assert sipha("partition", other).returncode == 0
    try:
        assert labmod.status(lab)["hosts"][other]["partitioned"]
        ok, detail = labmod.sip_options(lab, labmod.host(lab, other)["ip"], timeout=0.3)
        assert not ok, f"partitioned {other} still answers the client: {detail}"
        wait_for(lambda: labmod.crm_status(lab)["nodes"].get(other) != "online", 15, f"{other} seen offline")
        assert labmod.sip_options(lab, lab["vips"][0])[0], "the VIP must keep answering on the majority side"
    finally:
        p = sipha("heal")
    # with stonith on, the majority side may already have fenced (rebooted) the cut-off node: a fresh port
    assert p.returncode == 0 and (other in p.stdout or lab["stonith"]), p.stdout
    assert not labnode.partitioned(lab, labmod.host(lab, other))
    wait_for(lambda: settled(lab), 45, "both nodes online, proxies started, one VIP holder after heal")


def test_kill_moves_vip_then_start_rejoins(lab: dict[str, Any]) -> None:
    wait_for(lambda: settled(lab), 45, "a settled cluster before the kill")
    # 15 s: after a node dies, votequorum waits for the qdevice's vote, and qnetd gives it only once it sees the
    # dead node's connection go: at once when the killed node's FIN got out before its link went down, else after
    # the qdevice heartbeat timeout (quorum.device.timeout 10 s by default). Measured 0.7 s to 5.4 s here.
    res = labmod.failover(lab, interval=0.02, after=15.0, echo=print)
    print("failover:", res)
    assert res["recovered"], res
    assert res["new_holder"] not in ("-", res["killed"]), res
    # with stonith on, Pacemaker fences the dead node through the supervisor (a reboot powers it on again)
    assert power("status", res["killed"]) == "off" or lab["stonith"]
    assert labmod.sip_options(lab, lab["vips"][0])[0]
    p = sipha("start", res["killed"])
    assert p.returncode == 0, p.stderr
    wait_for(lambda: settled(lab), 45, f"{res['killed']} back online with its proxy")
    wait_for(lambda: "leader" in labmod.zk_modes(lab).values() and "down" not in str(labmod.zk_modes(lab)),
             30, "ZooKeeper ensemble complete again")  # fmt: skip


def test_down_leaves_nothing(lab: dict[str, Any]) -> None:
    inits = [labnode.recorded_pids(h["name"])[1] for h in lab["hosts"] if h["init"]]
    sup = int(Path("/run/sipha-lab/supervisor.pid").read_text())
    p = sipha("down")
    assert p.returncode == 0, p.stderr
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ours = {h["ns"] for h in lab["hosts"]} | {lab["bridge_ns"]}
    assert not [n for n in names.split() if n in ours], names
    for pid in [*inits, sup]:
        assert pid is None or not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert " /run/sipha-lab" not in mounts and " /var/tmp/sipha-lab" not in mounts
    assert not [ns for ns in ours if f"/run/netns/{ns} " in mounts]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "v-node" not in links and lab["bridge"] not in links
    assert not Path("/run/sipha-lab").exists() and not Path("/var/tmp/sipha-lab").exists()
    again = sipha("down")
    assert again.returncode == 0 and "no lab" in again.stdout


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(labmod.REQUIRED, "/usr/sbin/no-such-tool", "no-such-package")
    from ha import model

    with pytest.raises(LabError, match="apt-get install no-such-package"):
        labmod.preflight(model.load(REPO / "examples/lab.yaml"))


def test_agents_installed_from_a_removed_checkout_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Agents installed by another checkout that is gone since: every probe died with an ImportError and
    `lab up` waited 60 s for the VIP, then blamed the VIP."""
    from ha import model

    (tmp_path / "sipha").mkdir()
    (tmp_path / "sipha" / "proxy").write_text('#!/usr/bin/python3\nSIPHA_HOME = "/nonexistent/checkout"\n')
    monkeypatch.setattr(labmod, "OCF_ROOT", tmp_path)
    with pytest.raises(LabError, match="/nonexistent/checkout, which is gone: run `make install-agents`"):
        labmod.preflight(model.load(REPO / "examples/lab.yaml"))
    # The bare lab's hosts never run the machine's agents (the playbook installs their own): no reason to refuse
    # (a lab already up may still be one).
    try:
        labmod.preflight(model.load(REPO / "examples/lab.yaml"), host_agents=False)
    except LabError as exc:
        assert "install-agents" not in str(exc), exc
