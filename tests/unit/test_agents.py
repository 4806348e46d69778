"""The OCF agents and the fence agent, run as Pacemaker runs them: a separate process, parameters in the
environment, the exit code as the answer. Real Kamailio in a throwaway network namespace (``sipha-t-<random>``,
always deleted), real ocf-tester on the installed agents, a real unix socket for the fence agent.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from ha.zk_testing import lab_yaml

REPO = Path(__file__).resolve().parent.parent.parent
AGENTS = REPO / "resource_agents"
PROXY = AGENTS / "sipha-proxy"
COORD = AGENTS / "sipha-coordinator"
VIP = AGENTS / "sipha-vip"
FENCE = AGENTS / "fence_sipha_lab"
DTD_DIR = Path("/usr/share/resource-agents")
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
ROOT = os.geteuid() == 0
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "t"}

needs_root = pytest.mark.skipif(not ROOT, reason="network namespaces and /run need root")
needs_kamailio = pytest.mark.skipif(not os.access(KAMAILIO, os.X_OK), reason="kamailio is not installed")

TINY_CFG = """#!KAMAILIO
# Just enough Kamailio to answer OPTIONS: the agent's contract, independent of the rendered template.
children=2
tcp_children=1
auto_aliases=no
dns=no
rev_dns=no
listen=udp:127.0.0.1:{port}
listen=tcp:127.0.0.1:{port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "sl.so"
request_route {{
    if (method == "OPTIONS") {{
        sl_send_reply("200", "OK");
        exit;
    }}
    sl_send_reply("404", "Not Here");
}}
"""


def load_agent(path: Path) -> ModuleType:
    """Import an extension-less agent file to read its PARAMS (the single source of its parameters)."""
    loader = importlib.machinery.SourceFileLoader(f"agent_{path.name.replace('-', '_')}", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # dataclasses look their module up while the class is built
    loader.exec_module(mod)
    return mod


def run(agent: Path | str, action: str, ns: str | None = None, timeout: float = 60, **params: str) -> tuple[int, str]:
    env = dict(BASE_ENV)
    env.update({k if k.startswith(("OCF_", "HA_")) else f"OCF_RESKEY_{k}": v for k, v in params.items()})
    cmd = [str(agent), action]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr + p.stdout


# ---------------------------------------------------------------------------------------------- meta-data


@pytest.mark.parametrize("agent", [PROXY, COORD])
def test_metadata_is_valid_and_lists_every_param(agent: Path) -> None:
    p = subprocess.run([str(agent), "meta-data"], env=BASE_ENV, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    if shutil.which("xmllint") and (DTD_DIR / "ra-api-1.dtd").exists():
        lint = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=p.stdout, cwd=DTD_DIR,
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stderr
    root = ET.fromstring(p.stdout.split("\n", 2)[2])  # after the XML and DOCTYPE declarations
    names = [e.get("name") for e in root.iter("parameter")]
    assert names == [prm.name for prm in load_agent(agent).PARAMS]
    for e in root.iter("parameter"):
        assert e.find("shortdesc").text and e.find("longdesc").text
        assert e.find("content").get("type") in ("string", "integer", "boolean", "time")
    actions = {e.get("name") for e in root.iter("action")}
    assert {"start", "stop", "monitor", "validate-all", "meta-data", "reload", "notify"} <= actions
    assert all(e.get("timeout") for e in root.iter("action"))


def test_fence_metadata() -> None:
    p = subprocess.run([str(FENCE), "-o", "metadata"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    root = ET.fromstring(p.stdout.split("\n", 1)[1])
    assert root.tag == "resource-agent" and root.get("name") == "fence_sipha_lab"
    assert {"action", "plug", "port", "socket"} <= {e.get("name") for e in root.iter("parameter")}
    assert {"on", "off", "reboot", "status", "list", "monitor", "metadata", "validate-all"} <= {
        e.get("name") for e in root.iter("action")
    }


# ---------------------------------------------------------------------------------------------- validate-all


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "kamailio.cfg"
    path.write_text(TINY_CFG.format(port=25060))
    return path


def test_validate_ok(cfg: Path) -> None:
    rc, out = run(PROXY, "validate-all", config=str(cfg), binary=KAMAILIO)
    assert rc == 0, out


@pytest.mark.parametrize(
    ("params", "rc", "why"),
    [
        ({"kind": "asterisk"}, 6, "kind"),
        ({"config": "/nonexistent/kamailio.cfg"}, 6, "does not exist"),
        ({"probe_targets": "udp:70000"}, 6, "probe_targets"),
        ({"probe_targets": "sctp:5060"}, 6, "probe_targets"),
        ({"shm_mb": "lots"}, 6, "shm_mb"),
        ({"binary": "/nonexistent/kamailio"}, 5, "missing"),
        ({"kind": "opensips", "binary": "/nonexistent/opensips"}, 5, "missing"),
    ],
)
def test_validate_errors(cfg: Path, params: dict[str, str], rc: int, why: str) -> None:
    args = {"config": str(cfg), "binary": KAMAILIO, **params}
    got, out = run(PROXY, "validate-all", **args)
    assert got == rc, out
    assert why in out
    assert len([ln for ln in out.splitlines() if "ERROR" in ln]) == 1  # one line says why


def test_validate_listen_port_out_of_range(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text(TINY_CFG.format(port=25060) + "listen=udp:127.0.0.1:99999\n")
    rc, out = run(PROXY, "validate-all", config=str(bad), binary=KAMAILIO)
    assert rc == 6 and "port out of range" in out


@needs_root
def test_validate_nonlocal_listen_needs_nonlocal_bind(tmp_path: Path, netns: str) -> None:
    cfg = tmp_path / "vip.cfg"
    cfg.write_text(TINY_CFG.format(port=25060) + "listen=udp:198.51.100.77:5060\n")
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=0"], check=True)
    rc, out = run(PROXY, "validate-all", ns=netns, config=str(cfg), binary=KAMAILIO)
    assert rc == 6 and "ip_nonlocal_bind" in out
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"], check=True)
    rc, out = run(PROXY, "validate-all", ns=netns, config=str(cfg), binary=KAMAILIO)
    assert rc == 0, out


def test_probe_when_nothing_runs_is_not_running(cfg: Path, tmp_path: Path) -> None:
    for interval in ("0", "10000"):
        rc, out = run(PROXY, "monitor", config=str(cfg), pidfile=str(tmp_path / "none.pid"), binary=KAMAILIO,
                      OCF_RESKEY_CRM_meta_interval=interval)
        assert rc == 7, out
    # a node without the software: the probe must still say "not running", not fail
    rc, out = run(PROXY, "monitor", config="/nonexistent.cfg", binary="/nonexistent/kamailio",
                  pidfile=str(tmp_path / "none.pid"), OCF_RESKEY_CRM_meta_interval="0")
    assert rc == 7, out
    rc, out = run(COORD, "monitor", pidfile=str(tmp_path / "c.pid"), status_socket=str(tmp_path / "c.sock"))
    assert rc == 7, out


def test_stop_when_nothing_runs_succeeds(cfg: Path, tmp_path: Path) -> None:
    rc, out = run(PROXY, "stop", config=str(cfg), pidfile=str(tmp_path / "none.pid"))
    assert rc == 0, out


def test_unimplemented_action(cfg: Path) -> None:
    rc, _ = run(PROXY, "promote", config=str(cfg))
    assert rc == 3


# ------------------------------------------------------------------------------------ real Kamailio in a netns


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway network namespace holding the lab's node1 address and VIP on its loopback; always deleted."""
    if not ROOT or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    ns = f"sipha-t-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for addr in ("198.51.100.11/32", "198.51.100.10/32"):  # /32: the rest of the subnet stays non-local
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", "lo"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


class Proxy:
    """One agent-managed proxy: its parameters, and a cleanup that kills what the agent started (by pid)."""

    def __init__(self, ns: str, params: dict[str, str]) -> None:
        self.ns, self.params = ns, params

    def __call__(self, action: str, **extra: str) -> tuple[int, str]:
        return run(PROXY, action, ns=self.ns, **{**self.params, **extra})

    def pid(self) -> int:
        return int(Path(self.params["pidfile"]).read_text())

    def members(self) -> list[int]:
        """Every live process of this proxy's process group (the daemon's session)."""
        pgid = os.getpgid(self.pid())
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{d}/stat").read_text()
                    fields = stat[stat.rfind(")") + 2 :].split()
                    if int(fields[2]) == pgid and fields[0] != "Z":
                        out.append(int(d))
        return out

    def cleanup(self) -> None:
        rc, _ = self("stop")
        if rc != 0:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(os.getpgid(self.pid()), signal.SIGKILL)


@pytest.fixture
def proxy(netns: str, tmp_path: Path) -> Iterator[Proxy]:
    if not os.access(KAMAILIO, os.X_OK):
        pytest.skip("kamailio is not installed")
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(TINY_CFG.format(port=5060))
    p = Proxy(netns, {
        "config": str(cfg), "pidfile": str(tmp_path / "run" / "kamailio.pid"), "logfile": str(tmp_path / "k.log"),
        "shm_mb": "64", "pkg_mb": "8", "probe_timeout_ms": "500",  # probe targets: from the config
    })
    yield p
    p.cleanup()


def _timed(p: Proxy, action: str) -> tuple[int, float]:
    t0 = time.monotonic()
    rc, _ = p(action)
    return rc, time.monotonic() - t0


def test_kamailio_lifecycle_and_hang_detection(proxy: Proxy) -> None:
    assert proxy("monitor", OCF_RESKEY_CRM_meta_interval="0")[0] == 7
    rc, out = proxy("start")
    assert rc == 0, out
    assert "answers OPTIONS" in out
    assert "udp:127.0.0.1:5060 200" in out and "tcp:127.0.0.1:5060 200" in out  # targets read from the config
    assert proxy("monitor")[0] == 0
    assert proxy("start")[0] == 0  # starting a started resource succeeds

    main = proxy.pid()
    workers = [p for p in proxy.members() if p != main]
    assert workers
    for victim in (main, workers[0]):
        os.kill(victim, signal.SIGSTOP)
        try:
            rc, took = _timed(proxy, "monitor")
            assert rc == 1
            assert took < 2.0, f"hung proxy reported after {took:.2f} s"
        finally:
            os.kill(victim, signal.SIGCONT)
        assert proxy("monitor")[0] == 0

    members = proxy.members()
    os.kill(workers[-1], signal.SIGSTOP)  # a stopped worker must not make stop hang
    rc, took = _timed(proxy, "stop")
    assert rc == 0
    assert all(not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
               for p in members)
    assert proxy("monitor")[0] == 7
    assert proxy("stop")[0] == 0


def test_kamailio_killed_is_not_running(proxy: Proxy) -> None:
    assert proxy("start")[0] == 0
    os.killpg(os.getpgid(proxy.pid()), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and proxy("monitor")[0] != 7:
        time.sleep(0.05)
    assert proxy("monitor")[0] == 7


def test_kamailio_start_failure_is_reported(proxy: Proxy, tmp_path: Path) -> None:
    broken = tmp_path / "broken.cfg"
    broken.write_text(TINY_CFG.format(port=5060).replace('"sl.so"', '"nosuchmodule.so"'))
    t0 = time.monotonic()
    rc, out = proxy("start", config=str(broken))
    took = time.monotonic() - t0
    assert rc == 1, out
    assert "exited" in out and took < 10


def test_kamailio_rendered_config(netns: str, tmp_path: Path) -> None:
    """The real template (engineer B's) under the agent: node1's config with its VIP, every transport."""
    if not os.access(KAMAILIO, os.X_OK) or not (REPO / "templates" / "kamailio.cfg.j2").exists():
        pytest.skip("kamailio or templates/kamailio.cfg.j2 missing")
    from ha import model, render

    cluster = model.load(REPO / "examples" / "lab.yaml")
    files = {o.path: o.text for o in render.render_files(cluster)}
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(files["node1/kamailio.cfg"])
    p = Proxy(netns, {
        "config": str(cfg), "pidfile": str(tmp_path / "run" / "kamailio.pid"), "logfile": str(tmp_path / "k.log"),
        "probe_targets": "udp:5060,udp:198.51.100.10:5060,tcp:198.51.100.11:5060",
    })
    try:
        rc, out = p("start")
        assert rc == 0, out
        assert f'SIPHA_RUN_DIR="{tmp_path / "run"}"' in out  # B's command line, RPC socket beside the pidfile
        assert p("monitor")[0] == 0
        assert p("stop")[0] == 0
        assert p("monitor")[0] == 7
    finally:
        p.cleanup()


# --------------------------------------------------------------------------------------------- coordinator


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_root
def test_coordinator_start_without_its_zookeeper_credential_fails_saying_which_file(tmp_path: Path) -> None:
    """zookeeper.auth_file missing on this node: the start fails at once (not at the start timeout) and what
    Pacemaker logs names the field and the file; nothing is left running."""
    cfg = lab_yaml(tmp_path)
    (tmp_path / "zk-auth").unlink()
    params = {"config": str(cfg), "event_port": str(_free_udp_port()), "pidfile": str(tmp_path / "c.pid"),
              "status_socket": str(tmp_path / "c.sock"), "logfile": str(tmp_path / "c.log")}
    t0 = time.monotonic()
    rc, out = run(COORD, "start", **params)
    assert rc == 1 and time.monotonic() - t0 < 10, (rc, out)
    assert f"zookeeper.auth_file: {tmp_path / 'zk-auth'}: cannot read: No such file or directory" in out, out
    assert run(COORD, "monitor", **params)[0] == 7  # OCF_NOT_RUNNING


@needs_root
def test_coordinator_lifecycle_events_and_hang(tmp_path: Path) -> None:
    port = _free_udp_port()
    params = {"config": str(lab_yaml(tmp_path)), "event_port": str(port),
              "pidfile": str(tmp_path / "c.pid"), "status_socket": str(tmp_path / "c.sock"),
              "logfile": str(tmp_path / "c.log")}
    assert run(COORD, "validate-all", **params)[0] == 0
    rc, out = run(COORD, "start", **params)
    try:
        assert rc == 0, out
        assert run(COORD, "monitor", **params)[0] == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for seq in (1, 2, 5):
                ev = {"seq": seq, "node": "node1", "type": "contact.insert", "aor": "sip:a@x", "contact": "sip:a@y",
                      "expires_at": 2000000000}
                s.sendto(json.dumps(ev).encode(), ("127.0.0.1", port))
            s.sendto(b"not json", ("127.0.0.1", port))
        from ha.coordinator.service import query_status

        deadline = time.monotonic() + 5
        status: dict = {}
        while time.monotonic() < deadline:
            status = query_status(params["status_socket"])
            if status["events"] == 3 and status["rejected"]:
                break
            time.sleep(0.02)
        assert status["events"] == 3 and status["gaps"] == 1 and status["lost"] == 2
        assert status["rejected"] == {"malformed": 1}
        pid = int(Path(params["pidfile"]).read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert run(COORD, "monitor", **params)[0] == 1
            assert time.monotonic() - t0 < 2.0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert run(COORD, "monitor", **params)[0] == 0
    finally:
        assert run(COORD, "stop", **params)[0] == 0
    assert run(COORD, "monitor", **params)[0] == 7
    assert not Path(params["status_socket"]).exists()


def test_coordinator_validate_errors(tmp_path: Path) -> None:
    assert run(COORD, "validate-all", config=str(tmp_path / "none.yaml"))[0] == 6
    assert run(COORD, "validate-all", event_port="70000")[0] == 6
    assert run(COORD, "validate-all", event_port="5090", python="/nonexistent/python")[0] == 5


def test_stop_escalates_to_sigkill_within_the_grace() -> None:
    """A service that ignores SIGTERM is SIGKILLed once the grace is over, well inside the stop deadline."""
    ocfagent = load_agent(AGENTS / "ocfagent.py")
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        logged: list[str] = []
        t0 = time.monotonic()
        gone = ocfagent.terminate(
            child.pid, lambda: [child.pid] if child.poll() is None else [], 0.3, t0 + 5,
            lambda level, msg: logged.append(f"{level}: {msg}"),
        )
        took = time.monotonic() - t0
        assert gone and child.poll() == -signal.SIGKILL
        assert 0.3 <= took < 2.0
        assert any("SIGKILL" in m for m in logged)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


# ----------------------------------------------------------------------------------------------- ocf-tester


@needs_root
@needs_kamailio
@pytest.mark.skipif(not shutil.which("ocf-tester"), reason="ocf-tester (resource-agents) is not installed")
def test_ocf_tester_passes_on_installed_agents(netns: str, tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "install-agents"], cwd=REPO, check=True, capture_output=True, timeout=60)
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(TINY_CFG.format(port=5060))
    _veth(netns)
    for agent, opts in (
        ("/usr/lib/ocf/resource.d/sipha/vip", {"ip": "198.51.100.77", "cidr_netmask": "24", "nic": "v0"}),
        ("/usr/lib/ocf/resource.d/sipha/proxy",
         {"kind": "kamailio", "config": str(cfg), "pidfile": str(tmp_path / "k.pid"),
          "logfile": str(tmp_path / "k.log"), "probe_targets": "udp:5060,tcp:5060", "shm_mb": "64"}),
        ("/usr/lib/ocf/resource.d/sipha/coordinator",
         {"config": str(lab_yaml(tmp_path)), "pidfile": str(tmp_path / "c.pid"),
          "status_socket": str(tmp_path / "c.sock"), "logfile": str(tmp_path / "c.log")}),
    ):
        args = [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]
        p = subprocess.run(["ip", "netns", "exec", netns, "ocf-tester", "-n", "test", *args, agent],
                           env=BASE_ENV, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "passed all tests" in p.stdout + p.stderr


# ------------------------------------------------------------------------------------------------ VIP agent


def _veth(ns: str) -> None:
    """v0 (the VIP's interface) and its peer v1 (where the ARPs arrive) in ``ns``; gone with the namespace."""
    for argv in (["link", "add", "v0", "type", "veth", "peer", "name", "v1"], ["link", "set", "v0", "up"],
                 ["link", "set", "v1", "up"]):  # fmt: skip
        subprocess.run(["ip", "-n", ns, *argv], check=True)


def _addrs(ns: str, dev: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", dev], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


SNIFF_ARP = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("v1", 0))
s.settimeout(0.2)
print("listening", flush=True)
seen, deadline = [], time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        f = s.recv(100)
    except TimeoutError:
        continue
    if f[12:14] == b"\x08\x06" and f[28:32] == f[38:42]:  # gratuitous: sender IP == target IP
        seen.append((int.from_bytes(f[20:22], "big"), socket.inet_ntoa(f[28:32])))
print(seen)
"""


def test_vip_metadata_is_valid() -> None:
    p = subprocess.run([str(VIP), "meta-data"], env=BASE_ENV, capture_output=True, text=True, timeout=10)
    assert p.returncode == 0
    if shutil.which("xmllint") and (DTD_DIR / "ra-api-1.dtd").exists():
        lint = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=p.stdout, cwd=DTD_DIR,
                              capture_output=True, text=True)  # fmt: skip
        assert lint.returncode == 0, lint.stderr
    root = ET.fromstring(p.stdout.split("\n", 2)[2])
    assert [e.get("name") for e in root.iter("parameter")] == ["ip", "cidr_netmask", "nic", "arp_count",
                                                               "arp_interval"]  # fmt: skip
    assert {"start", "stop", "monitor", "meta-data", "validate-all"} <= {e.get("name") for e in root.iter("action")}


@pytest.mark.parametrize(("params", "why"), [
    ({"ip": "198.51.100.300"}, "ip '198.51.100.300' is not an IPv4 address"),
    ({"ip": "198.51.100"}, "ip '198.51.100' is not an IPv4 address"),
    ({"ip": ""}, "ip '' is not an IPv4 address"),
    ({"cidr_netmask": "33"}, "cidr_netmask '33' is not a prefix length (1-32)"),
    ({"nic": ""}, "nic is required"),
    ({"arp_count": "five"}, "arp_count and arp_interval must be whole numbers"),
])  # fmt: skip
def test_vip_validate_names_the_bad_parameter(params: dict[str, str], why: str) -> None:
    rc, out = run(VIP, "validate-all", **{"ip": "198.51.100.77", "nic": "v0", **params})
    assert (rc, out.strip()) == (6, f"ocf-exit-reason:{why}")
    assert run(VIP, "start", **{"ip": "198.51.100.77", "nic": "v0", **params})[0] == 6
    # a failed stop gets the node fenced: an address the parameters cannot describe was never added
    assert run(VIP, "stop", **{"ip": "198.51.100.77", "nic": "v0", **params}) == (0, "")


@needs_root
def test_vip_lifecycle_announces_the_address(netns: str) -> None:
    """Real ip(8) and send_arp in a namespace: start adds the address and its gratuitous ARPs reach the wire (the
    peer end of a veth), start and stop are idempotent, monitor follows the address; a missing nic is named."""
    _veth(netns)
    params = {"ip": "198.51.100.77", "cidr_netmask": "24", "nic": "v0", "arp_count": "3", "arp_interval": "50"}
    assert run(VIP, "monitor", ns=netns, **params)[0] == 7
    sniff = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SNIFF_ARP, "1.5"],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert sniff.stdout is not None and sniff.stdout.readline() == "listening\n"
        assert run(VIP, "start", ns=netns, **params) == (0, "")
        # start did not wait for the ARPs: their sender is still at work
        pid = Path("/run/resource-agents/sipha-vip-send_arp-198.51.100.77").read_text().split()[0]
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "send_arp"
        assert " inet 198.51.100.77/24 " in _addrs(netns, "v0")
        assert run(VIP, "monitor", ns=netns, **params)[0] == 0
        assert run(VIP, "start", ns=netns, **params)[0] == 0  # already there: still a success
        out, _ = sniff.communicate(timeout=10)
    finally:
        if sniff.poll() is None:
            sniff.kill()
    seen = ast.literal_eval(out)
    assert {(1, "198.51.100.77"), (2, "198.51.100.77")} <= set(seen), seen  # ARP request and reply
    assert len(seen) >= 3, seen
    assert run(VIP, "start", ns=netns, **{**params, "arp_count": "50"})[0] == 0  # a sender for 2.5 s ...
    pid = Path("/run/resource-agents/sipha-vip-send_arp-198.51.100.77").read_text().split()[0]
    assert run(VIP, "stop", ns=netns, **params)[0] == 0  # ... which stop ends: it belongs to the address
    for _ in range(50):  # bounded: the kill is immediate, reaping by init is not
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"send_arp {pid} still running after stop")
    assert "198.51.100.77" not in _addrs(netns, "v0")
    assert run(VIP, "stop", ns=netns, **params)[0] == 0
    assert run(VIP, "monitor", ns=netns, **params)[0] == 7
    rc, out = run(VIP, "start", ns=netns, **{**params, "nic": "nosuch0"})
    assert (rc, out.strip()) == (6, "ocf-exit-reason:nic 'nosuch0' does not exist here")
    assert run(VIP, "stop", ns=netns, **{**params, "nic": "nosuch0"})[0] == 0  # nothing there: stopped


# --------------------------------------------------------------------------------------------- fence agent


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], list[dict]]]:
    """A stand-in speaking the lab supervisor's protocol v1 (ha/lab/supervisor.py) on a real unix socket: the
    fence agent's side of the boundary. The real supervisor is exercised in tests/lab."""
    path = str(tmp_path / "sup.sock")
    power = {"node1": "on", "node2": "on", "witness": "on"}
    seen: list[dict] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    srv.settimeout(0.05)
    stop = threading.Event()

    def reply(req: dict) -> dict:
        action, host = req.get("action"), req.get("host")
        if action == "ping":
            return {"ok": True}
        if action == "list":
            return {"ok": True, "hosts": dict(power)}
        if host not in power:
            return {"ok": False, "error": f"unknown host {host!r}"}
        if action in ("off", "on"):
            power[host] = action
        elif action == "reboot":
            power[host] = "on"
        elif action != "status":
            return {"ok": False, "error": f"unknown action {action!r}"}
        return {"ok": True, "status": power[host]}

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                req = json.loads(buf)
                seen.append(req)
                conn.sendall(json.dumps(reply(req)).encode() + b"\n")

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield path, power, seen
    stop.set()
    t.join(2)
    srv.close()


def fence(*args: str, stdin: str | None = None) -> tuple[int, str]:
    p = subprocess.run([str(FENCE), *args], input=stdin, capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout + p.stderr


def test_fence_agent_cli(supervisor: tuple[str, dict[str, str], list[dict]]) -> None:
    sock, power, seen = supervisor
    assert fence("-o", "status", "-n", "node2", "--socket", sock) == (0, "Status: ON\n")
    rc, _ = fence("-o", "off", "-n", "node2", "--socket", sock)
    assert rc == 0 and power["node2"] == "off"
    rc, out = fence("--action=status", "--plug=node2", f"--socket={sock}")
    assert rc == 2 and "OFF" in out
    assert fence("-o", "off", "-n", "node2", "--socket", sock)[0] == 0  # idempotent
    assert fence("-o", "reboot", "-n", "node2", "--socket", sock)[0] == 0 and power["node2"] == "on"
    rc, out = fence("-o", "list", "--socket", sock)
    assert rc == 0 and out.splitlines() == ["node1,", "node2,", "witness,"]
    assert fence("-o", "monitor", "--socket", sock)[0] == 0
    assert fence("-o", "off", "-n", "nosuch", "--socket", sock)[0] == 1
    assert fence("-o", "off", "--socket", sock)[0] == 1  # no plug
    assert seen[0] == {"action": "status", "host": "node2"}


def test_fence_agent_stdin_like_pacemaker(supervisor: tuple[str, dict[str, str], list[dict]]) -> None:
    sock, power, _ = supervisor
    rc, out = fence(stdin=f"action=off\nport=node1\nnodename=node1\nsocket={sock}\npcmk_unknown=1\n")
    assert rc == 0 and power["node1"] == "off"
    assert "ignoring unknown option" in out
    assert fence(stdin=f"action=status\nplug=node1\nsocket={sock}\n")[0] == 2
    assert fence(stdin=f"action=on\nplug=node1\nsocket={sock}\n")[0] == 0 and power["node1"] == "on"
    assert fence(stdin="action=metadata\n")[0] == 0
    assert fence(stdin=f"action=validate-all\nplug=node1\nsocket={sock}\n")[0] == 0


def test_fence_agent_unreachable_supervisor(tmp_path: Path) -> None:
    rc, out = fence("-o", "status", "-n", "node1", "--socket", str(tmp_path / "absent.sock"))
    assert rc == 1 and "absent.sock" in out
    assert fence("-o", "monitor", "--socket", str(tmp_path / "absent.sock"))[0] == 1
