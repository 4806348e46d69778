"""The sipha agents inside a lab node: where Pacemaker really runs them (own PID, mount, UTS and network
namespaces, a bare environment), beside the cluster's own proxy and coordinator without disturbing them.

Uses the session lab of conftest.py. ``make install-agents`` runs first, so the lab's CIB keeps the
ocf:sipha resources and the fence devices instead of its stand-ins.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from ha.lab import lab as labmod

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parent.parent.parent
OCF = "/usr/lib/ocf/resource.d/sipha"
BARE = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "OCF_ROOT=/usr/lib/ocf"]
TINY_CFG = """#!KAMAILIO
children=1
tcp_children=1
auto_aliases=no
dns=no
rev_dns=no
listen=udp:127.0.0.1:25060
listen=tcp:127.0.0.1:25060
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "sl.so"
request_route {
    if (method == "OPTIONS") { sl_send_reply("200", "OK"); exit; }
    sl_send_reply("404", "Not Here");
}
"""


@pytest.fixture(scope="module")
def installed() -> None:
    p = subprocess.run(["make", "-s", "install-agents"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def node_lab(installed: None, lab: dict[str, Any]) -> dict[str, Any]:
    return lab


def in_node(lab: dict[str, Any], node: str, argv: list[str], timeout: float = 120) -> tuple[int, str]:
    p = labmod.exec_in(lab, node, [*BARE, *argv], timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_ocf_tester_in_a_lab_node(node_lab: dict[str, Any]) -> None:
    """A second, private instance (own config, port, pidfile) so the cluster's proxy is never touched."""
    d = "/run/sipha-agents-test"  # the node's own /run (its /tmp is private too): written from inside
    p = subprocess.run([*labmod.nsenter_argv(node_lab, "node1"), "sh", "-c", f"mkdir -p {d} && cat > {d}/tiny.cfg"],
                       input=TINY_CFG, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    proxy = ["-o", "kind=kamailio", "-o", f"config={d}/tiny.cfg", "-o", f"pidfile={d}/k.pid",
             "-o", f"logfile={d}/k.log", "-o", "probe_targets=udp:25060,tcp:25060", "-o", "shm_mb=64"]
    rc, out = in_node(node_lab, "node1", ["ocf-tester", "-n", "agents-test", *proxy, f"{OCF}/proxy"])
    assert rc == 0 and "passed all tests" in out, out
    coord = ["-o", "event_port=25091", "-o", "pidfile=/run/sipha-agents-test/c.pid",
             "-o", "status_socket=/run/sipha-agents-test/c.sock", "-o", "logfile=/run/sipha-agents-test/c.log"]
    rc, out = in_node(node_lab, "node1", ["ocf-tester", "-n", "agents-test", *coord, f"{OCF}/coordinator"])
    assert rc == 0 and "passed all tests" in out, out


def test_cluster_proxy_healthy_by_our_monitor(node_lab: dict[str, Any]) -> None:
    """The proxy Pacemaker started from the rendered config answers our monitor on every node."""
    for node in ("node1", "node2"):
        rc, out = in_node(node_lab, node, ["OCF_RESKEY_kind=kamailio", "OCF_RESKEY_CRM_meta_interval=0",
                                           f"{OCF}/proxy", "monitor"], timeout=30)
        assert rc == 0, f"{node}: {out}"


def test_the_vip_is_ours_and_its_monitor_agrees_with_pacemaker(node_lab: dict[str, Any]) -> None:
    """The cluster's VIP runs on ocf:sipha:vip (not IPaddr2), and the agent's monitor, run in each node as
    Pacemaker runs it, finds the address exactly where Pacemaker says it is."""
    import xml.etree.ElementTree as ET

    from ha import model

    rc, out = in_node(node_lab, "node1", ["crm_mon", "-1", "--output-as=xml"], timeout=30)
    assert rc == 0, out
    vip = model.load(REPO / "examples" / "lab.yaml").vips[0]
    (res,) = [r for r in ET.fromstring(out).iter("resource") if r.get("id") == f"vip-{vip.name}"]
    assert (res.get("resource_agent"), res.get("active")) == ("ocf:sipha:vip", "true"), ET.tostring(res)
    (holder,) = [n.get("name") for n in res.iter("node")]
    params = [f"OCF_RESKEY_ip={vip.ip}", f"OCF_RESKEY_nic={vip.interface}", f"OCF_RESKEY_cidr_netmask={vip.prefix}"]
    for node in ("node1", "node2"):
        rc, out = in_node(node_lab, node, [*params, f"{OCF}/vip", "monitor"], timeout=30)
        assert rc == (0 if node == holder else 7), f"{node} (holder {holder}): rc {rc} {out}"


def test_fence_agent_speaks_to_the_real_supervisor(node_lab: dict[str, Any]) -> None:
    rc, out = in_node(node_lab, "node1", ["fence_sipha_lab", "-o", "list"], timeout=30)
    assert rc == 0, out
    assert {"node1,", "node2,", "witness,"} <= set(out.split())
    rc, out = in_node(node_lab, "node1", ["fence_sipha_lab", "-o", "status", "-n", "node2"], timeout=30)
    assert rc == 0 and "Status: ON" in out, out
    rc, out = in_node(node_lab, "node1", ["fence_sipha_lab", "-o", "monitor"], timeout=30)
    assert rc == 0, out
