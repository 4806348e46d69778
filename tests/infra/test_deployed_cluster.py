"""A deployed sipha cluster, checked from outside over SSH (testinfra, paramiko backend, verified host keys).

Runs against whatever SIPHA_INVENTORY names -- the namespace lab after the site playbook, the Vagrant VMs, or
production -- and checks what the playbook promises: packages present, agents executable, services running,
the corosync ring and quorum healthy, Pacemaker resources started, the VIP on exactly one node, every
ZooKeeper member serving, the sysctl set. Process checks (not `systemctl`) so the same test holds where there
is no systemd (the lab). See conftest.py for the environment variables; without them everything skips.
"""

from __future__ import annotations

import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

NODE_PACKAGES = ("corosync", "corosync-qdevice", "pacemaker", "pacemaker-cli-utils", "resource-agents",
                 "kamailio", "zookeeper")  # fmt: skip
WITNESS_PACKAGES = ("corosync-qnetd", "zookeeper")
OCF_DIR = "/usr/lib/ocf/resource.d/sipha"


def _running(host: Any, pattern: str) -> bool:
    """A process whose full command line matches ``pattern`` (pgrep -f), in this host's PID namespace."""
    return host.run(f"pgrep -f {pattern!r}").rc == 0


def _crm_mon(host: Any) -> ET.Element:
    out = host.check_output("crm_mon --output-as=xml --inactive")
    root = ET.fromstring(out)
    assert root.find("nodes") is not None, f"crm_mon cannot reach the CIB: {out[-300:]}"
    return root


def _vip_addresses(host: Any) -> list[str]:
    out = host.check_output("cibadmin --query --scope resources")
    root = ET.fromstring(out)
    return [nv.get("value", "") for p in root.iter("primitive") if p.get("type") in ("vip", "IPaddr2")
            for nv in p.iter("nvpair") if nv.get("name") == "ip"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ every host


def test_packages_present(hosts: Any, any_host: str, inventory: Any) -> None:
    host = hosts(any_host)
    group = next(h.group for h in inventory if h.name == any_host)
    for pkg in NODE_PACKAGES if group == "nodes" else WITNESS_PACKAGES:
        assert host.package(pkg).is_installed, f"{any_host}: package {pkg} is not installed"


def test_nonlocal_bind_sysctl(hosts: Any, any_host: str) -> None:
    host = hosts(any_host)
    assert host.sysctl("net.ipv4.ip_nonlocal_bind") == 1
    assert host.file("/etc/sysctl.d/60-sipha.conf").contains("net.ipv4.ip_nonlocal_bind")


def test_sipha_user_and_sshd_hardening(hosts: Any, any_host: str) -> None:
    host = hosts(any_host)
    assert host.user("sipha").exists and host.user("sipha").shell == "/usr/sbin/nologin"
    dropin = host.file("/etc/ssh/sshd_config.d/60-sipha.conf")
    assert dropin.exists and dropin.contains("^PasswordAuthentication no")


def test_zookeeper_member_serving(hosts: Any, any_host: str, inventory: Any) -> None:
    h = next(h for h in inventory if h.name == any_host)
    if "zk_myid" not in h.vars:
        pytest.skip(f"{any_host} is not a ZooKeeper member")
    host = hosts(any_host)
    assert _running(host, "org.apache.zookeeper.server.quorum.QuorumPeerMain")
    zoo = host.file("/etc/sipha/zoo.cfg").content_string
    port = re.search(r"^clientPort=(\d+)", zoo, re.M)
    data_dir = re.search(r"^dataDir=(\S+)", zoo, re.M)
    assert port and data_dir, "clientPort or dataDir missing from /etc/sipha/zoo.cfg"
    probe = (f"import socket; s = socket.create_connection(('127.0.0.1', {port.group(1)}), 2); "
             "s.sendall(b'srvr'); print(s.recv(4096).decode())")  # fmt: skip
    out = host.check_output(f'python3 -c "{probe}"')
    assert re.search(r"^Mode: (leader|follower)$", out, re.M), f"{any_host}: ZooKeeper not serving: {out!r}"
    assert host.file(f"{data_dir.group(1)}/myid").content_string.strip() == h.vars["zk_myid"]


# ------------------------------------------------------------------------------------------------ the nodes


def test_agents_installed_executable(hosts: Any, node: str) -> None:
    host = hosts(node)
    for agent in ("proxy", "coordinator"):
        f = host.file(f"{OCF_DIR}/{agent}")
        assert f.is_file, f"{node}: {OCF_DIR}/{agent} missing"
        assert f.mode == 0o755, f"{node}: {OCF_DIR}/{agent} mode {f.mode:o}, want 755"
        assert f.user == "root"


def test_node_services_running(hosts: Any, node: str, has_witness: bool) -> None:
    host = hosts(node)
    assert _running(host, "^corosync( |$)"), f"{node}: corosync is not running"
    assert _running(host, "pacemakerd"), f"{node}: pacemakerd is not running"
    assert _running(host, "health run"), f"{node}: the sipha health service is not running"
    if has_witness:
        assert _running(host, "corosync-qdevice"), f"{node}: corosync-qdevice is not running"


def test_corosync_ring_and_quorum(hosts: Any, node: str, node_names: list[str]) -> None:
    host = hosts(node)
    links = host.check_output("corosync-cfgtool -s")
    assert "disconnected" not in links and "FAULTY" not in links, links
    quorum = host.check_output("corosync-quorumtool -s")
    assert re.search(r"^Quorate:\s+Yes", quorum, re.M), quorum
    members = host.check_output("corosync-cmapctl -b runtime.members")
    joined = re.findall(r"runtime\.members\.\d+\.status \(str\) = joined", members)
    assert len(joined) == len(node_names), f"{node}: {len(joined)} of {len(node_names)} nodes joined:\n{members}"


def test_witness_vote_counted(hosts: Any, node: str, has_witness: bool) -> None:
    if not has_witness:
        pytest.skip("no witness in the inventory (two_node mode)")
    out = hosts(node).check_output("corosync-quorumtool -s")
    assert re.search(r"Qdevice", out), f"{node}: no Qdevice vote:\n{out}"


def test_pacemaker_resources_started(hosts: Any, node: str, node_names: list[str]) -> None:
    root = _crm_mon(hosts(node))
    online = sorted(n.get("name", "") for n in root.iterfind("nodes/node") if n.get("online") == "true")
    assert online == sorted(node_names), f"online nodes {online}, want {sorted(node_names)}"
    bad = [(r.get("id"), r.get("role"), r.get("failed")) for r in root.iter("resource")
           if r.get("active") != "true" or r.get("failed") == "true"]  # fmt: skip
    assert not bad, f"{node}: resources not started or failed: {bad}"
    proxies = {n.get("name") for r in root.iter("resource") if r.get("resource_agent") == "ocf:sipha:proxy"
               for n in r.iterfind("node")}  # fmt: skip
    assert proxies == set(node_names), f"the proxy clone runs on {sorted(proxies)}, want every node"


# ------------------------------------------------------------------------------------------ the cluster as one


def test_vip_on_exactly_one_node(hosts: Any, node_names: list[str]) -> None:
    vips = _vip_addresses(hosts(node_names[0]))
    assert vips, "no VIP resource (ocf:sipha:vip or IPaddr2) in the CIB"
    for vip in vips:
        holders = []
        for name in node_names:
            addrs = json.loads(hosts(name).check_output("ip -j addr show"))
            if any(a.get("local") == vip for i in addrs for a in i.get("addr_info", [])):
                holders.append(name)
        assert len(holders) == 1, f"VIP {vip} is on {holders or 'no node'}, want exactly one"


_ZK_INTRUDER = (
    "import sys\n"
    "from kazoo.client import KazooClient\n"
    "from kazoo.exceptions import NoAuthError\n"
    "c = KazooClient(hosts=sys.argv[1], timeout=5)\n"
    "c.start(timeout=15)\n"
    "try:\n"
    "    c.get_children(sys.argv[2])\n"
    "    print('allowed')\n"
    "except NoAuthError:\n"
    "    print('refused')\n"
    "c.stop()\n"
)


def test_zookeeper_credential_installed_and_the_tree_closed_without_it(hosts: Any, node_names: list[str]) -> None:
    """zookeeper.auth_file: the same root-only credential on every node, and ZooKeeper refuses a client without
    it (run from a node, sipha's own Python, as any process on the cluster network could)."""
    import yaml

    first = hosts(node_names[0])
    model = yaml.safe_load(first.file("/etc/sipha/cluster.yaml").content_string)
    path = (model.get("zookeeper") or {}).get("auth_file")
    if not path:
        pytest.skip("zookeeper.auth_file is not set in this cluster's model")
    digests = set()
    for name in node_names:
        f = hosts(name).file(path)
        assert f.exists and f.user == "root" and f.mode == 0o600, f"{name}: {path} missing or not root-only 0600"
        digests.add(hosts(name).check_output(f"sha256sum {path}").split()[0])
    assert len(digests) == 1, f"{path} differs between the nodes"
    env = dict(line.split("=", 1) for line in first.file("/etc/sipha/env").content_string.splitlines()
               if "=" in line and not line.startswith("#"))  # fmt: skip
    python = str(Path(env["SIPHA_BIN"]).parent / "python")
    port = (model.get("zookeeper") or {}).get("client_port", 2181)
    out = first.check_output(f"{python} -c {shlex.quote(_ZK_INTRUDER)} 127.0.0.1:{port} /sipha/{model['name']}")
    assert out.strip() == "refused", f"a client without the credential listed /sipha/{model['name']}: {out}"
