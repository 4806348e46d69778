"""Helpers the lab tests (and bench/failover.py) share: waiting, cluster state, the health API, proxy processes.

Not a test module (no ``test_`` prefix); importable because pytest puts tests/lab on sys.path for conftest.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

from ha.lab import lab as labmod

NODES = ("node1", "node2")


def wait_for(pred: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")


def node_sh(spec: dict[str, Any], node: str, cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return labmod.exec_in(spec, node, ["sh", "-c", cmd], timeout=timeout)


def health_attrs(spec: dict[str, Any]) -> dict[str, str]:
    """sipha-health per node, as attrd holds it (asked on the first node that answers)."""
    for n in NODES:
        try:
            p = labmod.exec_in(spec, n, ["attrd_updater", "-Q", "-A", "-n", "sipha-health"], timeout=5)
        except Exception:  # a powered-off node: ask the other
            continue
        if p.returncode == 0:
            return dict(re.findall(r'host="([^"]+)" value="([^"]*)"', p.stdout))
    return {}


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


def settled(spec: dict[str, Any], health: bool = True) -> bool:
    """Both nodes online, proxy and coordinator clones started on both, the VIP on exactly one node, no failed
    resource, and (``health``) sipha-health=1 on both nodes."""
    st = labmod.crm_status(spec)
    if not all(st["nodes"].get(n) == "online" for n in NODES) or not st.get("dc"):
        return False
    for rid in ("proxy", "coordinator"):
        started = {n for r in st["resources"] if r["id"] == rid and r["role"] == "Started" for n in r["nodes"]}
        if started != set(NODES):
            return False
    if any(r["failed"] for r in st["resources"]):
        return False
    if labmod.vip_holder(spec) not in NODES:
        return False
    return not health or health_attrs(spec) == {n: "1" for n in NODES}


def wait_settled(spec: dict[str, Any], timeout: float = 45) -> None:
    wait_for(lambda: settled(spec), timeout, "settled cluster (clones started on both, one VIP, sipha-health=1)", 0.3)


def cleanup(spec: dict[str, Any]) -> None:
    """Forget failed actions (a test that breaks a proxy leaves one) so the next test starts clean."""
    for n in NODES:
        if labmod.powered(n):
            labmod.exec_in(spec, n, ["crm_resource", "--cleanup", "--quiet"], timeout=20)
            return


def proxy_pid(spec: dict[str, Any], node: str) -> int:
    """The proxy's main pid inside ``node`` (its own PID namespace): the agent's pidfile."""
    p = node_sh(spec, node, "cat /run/sipha/kamailio.pid")
    assert p.returncode == 0 and p.stdout.strip().isdigit(), p.stderr
    return int(p.stdout)


def signal_proxy(spec: dict[str, Any], node: str, sig: str, pgid: int | None = None) -> int:
    """Send ``sig`` to the proxy's whole process group (main and workers: Kamailio daemonizes into its own
    session, so the group is exactly the proxy). Returns the pgid."""
    if pgid is None:
        pid = proxy_pid(spec, node)
        p = node_sh(spec, node, f"ps -o pgid= -p {pid}")
        assert p.returncode == 0 and p.stdout.strip().isdigit(), p.stdout + p.stderr
        pgid = int(p.stdout)
    # -SIG, not -s SIG: procps-ng 4.0.2's kill reads "-s SIG -- -93" as bad usage for a group below 99 (a
    # Kamailio's pgid in a fresh node namespace often is); the drill's faults use this form too.
    p = node_sh(spec, node, f"/bin/kill -{sig} -- -{pgid}")
    assert p.returncode == 0 or sig == "CONT", p.stderr
    return pgid


def api(spec: dict[str, Any], node: str, method: str, path: str, token: str | None = None,
        body: dict[str, Any] | None = None, timeout: float = 40) -> tuple[int, str]:  # fmt: skip
    """One call to the node's health API on its loopback listener, made from inside the node."""
    code = f"""
import json, sys, urllib.request, urllib.error
req = urllib.request.Request({spec['rest'] + path!r}, method={method!r},
                             data={json.dumps(body).encode() if body is not None else None!r})
if {token!r}:
    req.add_header("Authorization", "Bearer " + {token!r})
if {body is not None!r}:
    req.add_header("Content-Type", "application/json")
try:
    with urllib.request.urlopen(req, timeout={timeout - 2}) as r:
        print(r.status); sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); sys.stdout.write(e.read().decode())
"""
    p = labmod.exec_in(spec, node, [sys.executable, "-c", code], timeout=timeout)
    assert p.returncode == 0, p.stderr
    status, _, text = p.stdout.partition("\n")
    return int(status), text


def token(spec: dict[str, Any], node: str = "node1") -> str:
    p = node_sh(spec, node, f"cat {spec['api_token_file']}")
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def health(spec: dict[str, Any], node: str) -> dict[str, Any]:
    _status, text = api(spec, node, "GET", "/health", timeout=10)
    return json.loads(text)


def pcmk_log(spec: dict[str, Any], node: str) -> str:
    from pathlib import Path

    return (Path(spec["state_dir"]) / node / "root/var/log/pacemaker/pacemaker.log").read_text(errors="replace")
