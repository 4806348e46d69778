"""``sipha lab``: bring the namespace lab up, look at it, break it, take it down.

Layout on the host:

* ``/run/sipha-lab/`` (the control dir, bind-mounted into every lab host at the same path): ``lab.json`` (the
  spec: every name the lab made), ``supervisor.sock``/``.pid``/``.log``, ``<host>.pids``.
* ``/var/tmp/sipha-lab/<host>/``: the host's private copies of /etc/corosync, /var/lib/pacemaker, ... (see
  :func:`_host_binds`), its ``logs/`` and ``init.log``; ``/var/tmp/sipha-lab/render/``: the rendered configs.
* ``lab up --bare`` (:mod:`ha.lab.bare`): the same hosts running only sshd; ``/var/tmp/sipha-lab/ssh/`` holds
  their host keys, the client key and ``known_hosts`` (the spec's ``ssh`` entry names them).
* Network namespaces ``sipha-<host>`` (eth0 inside) and ``sipha-br`` (the bridge and the peer veths).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ha import model, render
from ha.health.arbiter import lease_key_of
from ha.lab import bare as labbare
from ha.lab import node as labnode
from ha.lab.node import LabError, run
from ha.lab.supervisor import CONTROL_DIR, PID_FILE, SOCKET_PATH, SupervisorError, power, request

REPO = Path(__file__).resolve().parent.parent.parent
STATE_DIR = Path("/var/tmp/sipha-lab")
# Test-only control of the lab's health services (see ha.health.service.ProbeDrops): inside a node, an integer N
# written here makes the next N local UDP probes time out (this kernel has no sch_netem to drop a real packet).
HEALTH_FAULT_FILE = "/run/sipha/health-drop-probes"
# Heartbeats below qnetd's and qdevice's 1000 ms default minimum, so timings.qdevice_timeout_ms may go down to 500
# (ha.model): a power-cut node's vote is then withdrawn ~0.6 s after its last heartbeat instead of ~1.5 s.
QNETD_S = ["-S", "heartbeat_interval_min=200"]
QDEVICE_S = ["-S", "net_heartbeat_interval_min=200"]
SPEC_FILE = CONTROL_DIR / "lab.json"
PREFIX = "sipha-"
BRIDGE_NS = "sipha-br"
OCF_ROOT = Path("/usr/lib/ocf/resource.d")
ZK_JARS = ("zookeeper.jar", "zookeeper-jute.jar", "slf4j-api.jar", "slf4j-log4j12.jar", "log4j-1.2.jar",
           "netty-resolver.jar", "netty-codec.jar", "netty-transport-native-unix-common.jar")  # fmt: skip

# What the lab runs, and the Debian package that brings it.
REQUIRED = {
    "/usr/sbin/ip": "iproute2",
    "/usr/sbin/bridge": "iproute2",
    "/usr/bin/unshare": "util-linux",
    "/usr/bin/nsenter": "util-linux",
    "/usr/sbin/corosync": "corosync",
    "/usr/sbin/corosync-qdevice": "corosync-qdevice",
    "/usr/bin/corosync-qnetd": "corosync-qnetd",
    "/usr/sbin/pacemakerd": "pacemaker",
    "/usr/sbin/crm_mon": "pacemaker-cli-utils",
    "/usr/sbin/kamailio": "kamailio",
    "/usr/bin/java": "default-jre-headless",
    "/usr/share/java/zookeeper.jar": "zookeeper",
    "/usr/share/java/slf4j-log4j12.jar": "libslf4j-java",
    "/usr/share/java/log4j-1.2.jar": "liblog4j1.2-java",
    "/usr/lib/ocf/resource.d/heartbeat/IPaddr2": "resource-agents",
}


class Step:
    """Progress: one line per step with the elapsed time since ``lab up`` started."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.t0 = time.monotonic()
        self.echo = echo

    def __call__(self, msg: str) -> None:
        self.echo(f"[{time.monotonic() - self.t0:6.2f}s] {msg}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def load_spec() -> dict[str, Any] | None:
    try:
        return json.loads(SPEC_FILE.read_text())
    except (OSError, ValueError):
        return None


def _lab_namespaces(cluster: model.Cluster) -> list[str]:
    """The namespace names a lab of this model uses (other tools' ``sipha-*`` namespaces are not ours)."""
    names = [h.name for h in cluster.hosts] + ["client"]
    return [BRIDGE_NS] + [PREFIX + n for n in names]


LAB_SUBNET = ipaddress.IPv4Network("198.51.100.0/24")  # TEST-NET-2: documentation only, never routed


def preflight(cluster: model.Cluster, host_agents: bool = True) -> None:
    """Refuse, with the cause, a lab that cannot come up. ``host_agents``: the hosts run the machine's installed
    OCF agents (not the bare variant: its hosts get empty private copies that the playbook fills)."""
    addrs = {h.name: h.ip for h in cluster.hosts} | {"lab.client": cluster.lab.client_ip}
    addrs |= {f"VIP {v.name}": v.ip for v in cluster.vips}
    outside = [f"{k} {ip}" for k, ip in addrs.items() if ipaddress.IPv4Address(ip) not in LAB_SUBNET]
    if outside:
        raise LabError(f"the lab only builds clusters on {LAB_SUBNET}; outside it: {', '.join(outside)}")
    zk_auth = cluster.zookeeper.auth_file
    if zk_auth and not zk_auth.startswith("/etc/sipha/"):
        raise LabError(f"zookeeper.auth_file {zk_auth}: the lab writes it into each host's private /etc/sipha; "
                       "give a path there")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network, PID and mount namespaces): run it with sudo")
    missing = sorted({pkg for path, pkg in REQUIRED.items() if not Path(path).exists()})
    if missing:
        raise LabError(f"missing package(s): {' '.join(missing)}; install with: apt-get install {' '.join(missing)}")
    homes = _agents_homes() if host_agents else []
    stale = [str(h) for h in homes if not (h / "resource_agents" / "ocfagent.py").exists()]
    if stale:  # else every probe fails with an ImportError and `lab up` waits 60 s for a VIP that never starts
        raise LabError(f"the installed OCF agents import sipha from {', '.join(sorted(set(stale)))}, which is "
                       "gone: run `make install-agents` in this checkout")  # fmt: skip
    present = [ns for ns in _lab_namespaces(cluster) if labnode.netns_exists(ns)]
    if SPEC_FILE.exists() or present:
        left = ", ".join(present) or str(SPEC_FILE)
        raise LabError(f"a lab is already up ({left}); look at it with `sipha lab status`, "
                       "remove it with `sipha lab down`")  # fmt: skip


# ------------------------------------------------------------------------------------------ configs


def _render(cluster: model.Cluster, out: Path, step: Step) -> dict[str, str]:
    """Render with the project's templates; returns {relative path: text}."""
    import jinja2

    try:
        files = render.write(cluster, out)
    except jinja2.TemplateNotFound as exc:
        if not str(exc).endswith(".cfg.j2"):
            raise LabError(f"cannot render: template {exc} is missing") from None
        # The proxy template is not there yet: render the rest, the lab falls back to a minimal proxy config.
        step(f"  template {exc} missing: rendering the rest, Kamailio gets the lab's minimal config")
        env = render._env()
        files = []
        for template, target, who in render.PLAN:
            if who == "cluster":
                files.append(render.Output(target, env.get_template(template).render(cluster=cluster)))
            elif who == "zk":
                for h in cluster.zk_members:
                    text = env.get_template(template).render(cluster=cluster, host=h)
                    files.append(render.Output(target.format(host=h.name), text))
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            (out / f.path).parent.mkdir(parents=True, exist_ok=True)
            (out / f.path).write_text(f.text)
    return {f.path: f.text for f in files}


def _agent_installed(provider: str, agent: str) -> bool:
    return (OCF_ROOT / provider / agent).exists()


def _fence_agent_installed(agent: str) -> bool:
    return any((Path(d) / agent).exists() for d in ("/usr/sbin", "/usr/bin", "/sbin"))


def _lab_cib(cib_text: str, cluster: model.Cluster, step: Step) -> tuple[str, bool]:
    """The rendered CIB, adapted only for what is not installed on this machine yet.

    Returns (cib xml, kamailio started by the lab itself). A primitive of ``ocf:sipha:*`` whose agent is not
    installed is removed (with its clone and constraints) and the lab starts Kamailio directly; without the
    fence agent, stonith is disabled (a killed node would otherwise never be recovered from).
    """
    root = ET.fromstring(cib_text)  # noqa: S314 - our own render
    resources = root.find("configuration/resources")
    constraints = root.find("configuration/constraints")
    assert resources is not None and constraints is not None
    removed: set[str] = set()
    for p in resources.iter("primitive"):  # the VIP has a stand-in with the same parameters: IPaddr2
        if (p.get("provider"), p.get("type")) == ("sipha", "vip") and not _agent_installed("sipha", "vip"):
            step(f"  ocf:sipha:vip not installed (make install-agents): {p.get('id')} runs ocf:heartbeat:IPaddr2")
            p.set("provider", "heartbeat")
            p.set("type", "IPaddr2")
    for top in list(resources):
        prims = [top] if top.tag == "primitive" else top.findall(".//primitive")
        for p in prims:
            if p.get("class") == "ocf" and not _agent_installed(p.get("provider", ""), p.get("type", "")):
                removed |= {top.get("id", ""), p.get("id", "")}
                step(f"  ocf:{p.get('provider')}:{p.get('type')} not installed (make install-agents): "
                     f"{top.get('id')} left out of the lab CIB")  # fmt: skip
                resources.remove(top)
                break
    for c in list(constraints):
        refs = {c.get(k) for k in ("rsc", "with-rsc", "first", "then")}
        if refs & removed:
            constraints.remove(c)
    fencing_off = not _fence_agent_installed(cluster.fencing.agent)
    if fencing_off:
        step(f"  {cluster.fencing.agent} not installed: stonith-enabled=false in the lab CIB")
        for p in list(resources):
            if p.get("class") == "stonith":
                resources.remove(p)
                for c in list(constraints):
                    if c.get("rsc") == p.get("id"):
                        constraints.remove(c)
        for nv in root.iter("nvpair"):
            if nv.get("name") == "stonith-enabled":
                nv.set("value", "false")
    proxy_by_lab = "proxy-clone" in removed or "proxy" in removed
    return ET.tostring(root, encoding="unicode"), proxy_by_lab


FALLBACK_KAMAILIO = """#!KAMAILIO
# Lab-only stand-in used while templates/kamailio.cfg.j2 is not there: answers OPTIONS, nothing else.
debug=2
log_stderror=yes
fork=yes
children=2
auto_aliases=no
listen=udp:{ip}:5060
listen=udp:{vip}:5060
loadmodule "sl.so"
loadmodule "xlog.so"
request_route {{
    if (is_method("OPTIONS")) {{ sl_send_reply("200", "OK"); exit; }}
    sl_send_reply("501", "Not Implemented");
}}
"""


def _host_binds(cluster: model.Cluster, root: Path) -> list[tuple[str, str]]:
    # /var/lib/sipha: the coordinator's journal (ZooKeeper outages) is each node's own; shared, node2 replayed
    # node1's journal (and a previous lab's) and was fenced by the epoch check.
    dirs = ["/etc/corosync", "/var/lib/corosync", "/var/lib/pacemaker", "/var/log/pacemaker", "/var/log/corosync",
            "/etc/sipha", "/var/lib/sipha", "/var/log/zookeeper", cluster.zookeeper.data_dir]  # fmt: skip
    binds = [(str(root / d.lstrip("/")), d) for d in dirs]
    binds.append((str(root / "etc/hosts"), "/etc/hosts"))
    return binds


def _under_tmp(*paths: Path) -> list[str]:
    """Of these paths, the ones under /tmp (each node mounts a private /tmp over it), outermost first."""
    out: list[str] = []
    for p in sorted({str(x.resolve()) if x.exists() else str(x) for x in paths}, key=len):
        if (p + "/").startswith("/tmp/") and not any((p + "/").startswith(o + "/") for o in out):
            out.append(p)
    return out


def _agents_homes() -> list[Path]:
    """The checkouts the installed agents import ``ha`` from (``SIPHA_HOME`` written by make install-agents)."""
    import re

    homes = []
    for f in (OCF_ROOT / "sipha" / "proxy", OCF_ROOT / "sipha" / "coordinator", Path("/usr/sbin/fence_sipha_lab")):
        with contextlib.suppress(OSError):
            m = re.search(r'^SIPHA_HOME = "([^"]+)"', f.read_text(errors="replace"), re.M)
            if m:
                homes.append(Path(m.group(1)))
    return homes


def _chown(path: Path, user: str, group: str) -> None:
    shutil.chown(path, user, group)


def _zk_argv() -> list[str]:
    cp = ":".join(["/etc/zookeeper/conf", *(f"/usr/share/java/{j}" for j in ZK_JARS)])
    # nice: on a small machine the three JVM start-ups would otherwise slow Pacemaker's own start
    # -Xlog:gc,gc+cpu: each collection's pause, with the wall time and the CPU it took, in the member's log (a
    # write's tail that lines up with a pause of the leader's is ZooKeeper's; see BENCHMARKS.md, "Replication lag").
    # -Xms = -Xmx: grown from 32 MB, the heap grew by full collections (30-150 ms each, every few seconds while
    # bindings were added), the replication bench's slowest writes; the pages are still touched only when used.
    # fsync.warningthresholdms: a write-ahead-log fsync slower than 50 ms is logged (stock: 1 s), so a write's
    # tail can be told from a disk's.
    return ["nice", "-n", "10", "java", "-Xms256m", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Xshare:auto", "-Xlog:gc,gc+cpu:stdout:time", "-Dzookeeper.fsync.warningthresholdms=50",
            "-Dzookeeper.log.dir=/var/log/zookeeper", "-Dzookeeper.root.logger=INFO,CONSOLE",
            "-Dlog4j.configuration=file:/etc/zookeeper/conf/log4j.properties",
            "-Dzookeeper.admin.enableServer=false", "-cp", cp,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain", "/etc/sipha/zoo.cfg"]  # fmt: skip


def _prepare_host(cluster: model.Cluster, h: dict[str, Any], rendered: dict[str, str], cfg: dict[str, Any],
                  yaml_text: str) -> None:  # fmt: skip
    root = STATE_DIR / h["name"] / "root"
    for src, dst in h["binds"]:
        p = Path(src)
        if dst == labbare.SSHD_CONFIG:
            continue  # a file, written by labbare.prepare
        if dst == "/etc/hosts":
            p.parent.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost"] + [f"{x.ip} {x.name}" for x in cluster.hosts]
            lines.append(f"{cluster.lab.client_ip} client")
            p.write_text("\n".join(lines) + "\n")
        else:
            p.mkdir(parents=True, exist_ok=True)
    pcmk = root / "var/lib/pacemaker"
    for sub in ("cib", "pengine", "blackbox", "cores"):
        (pcmk / sub).mkdir(exist_ok=True)
        _chown(pcmk / sub, "hacluster", "haclient")
        os.chmod(pcmk / sub, 0o750)  # noqa: S103 - Pacemaker's own modes
    _chown(root / "var/log/pacemaker", "hacluster", "haclient")
    os.chmod(root / "var/log/pacemaker", 0o775)  # noqa: S103
    if cfg["variant"] == "bare":
        return  # what a freshly installed machine has: the packages' directories, none of the cluster's files
    etc = root / "etc/corosync"
    (etc / "corosync.conf").write_text(cfg["corosync_conf"])
    (etc / "authkey").write_bytes(cfg["authkey"])
    os.chmod(etc / "authkey", 0o400)
    sipha = root / "etc/sipha"
    (sipha / "cluster.yaml").write_text(yaml_text)
    # the REST API's bearer token (rest.token_file), one per lab, 256 random bits
    token = root / (cluster.rest.token_file if cluster.rest.token_file.startswith("/etc/sipha/")
                    else "/etc/sipha/api-token").lstrip("/")  # fmt: skip
    token.write_text(cfg["api_token"] + "\n")
    os.chmod(token, 0o600)
    (sipha / "zoo.cfg").write_text(rendered["zoo.cfg"])
    if cluster.zookeeper.auth_file:  # under /etc/sipha (preflight); one credential per lab
        auth = root / cluster.zookeeper.auth_file.lstrip("/")
        auth.parent.mkdir(parents=True, exist_ok=True)
        auth.write_text(f"sipha:{cfg['zk_password']}\n")
        os.chmod(auth, 0o600)
    if cluster.failover.fast_claim:
        key = root / cluster.failover.lease_key_file.lstrip("/")
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(lease_key_of(cfg["authkey"]))  # the fast claim's, derived as the playbook derives it
        os.chmod(key, 0o600)
    myid = rendered.get(f"{h['name']}/zookeeper-myid")
    if myid is not None:
        (root / cluster.zookeeper.data_dir.lstrip("/") / "myid").write_text(myid)
    kam = rendered.get(f"{h['name']}/kamailio.cfg")
    if h["role"] == "node":
        (sipha / "kamailio.cfg").write_text(kam or cfg["fallback_kamailio"].format(ip=h["ip"], vip=cluster.vips[0].ip))
        cib = pcmk / "cib" / "cib.xml"
        cib.write_text(cfg["cib"])  # pre-seeded: no .sig, which Pacemaker accepts ("No on-disk digest")
        _chown(cib, "hacluster", "haclient")
        os.chmod(cib, 0o600)


def _services(cluster: model.Cluster, h: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    zk_member = any(m.name == h["name"] for m in cluster.zk_members)
    svcs: list[dict[str, Any]] = []
    if h["role"] == "witness":
        svcs.append({"name": "corosync-qnetd", "argv": ["corosync-qnetd", "-f", "-s", "off", *QNETD_S]})
        if cluster.failover.fast_claim and cfg["variant"] != "stock":
            # the VIP lease the nodes' fast claim asks for (ha.health.arbiter)
            svcs.append({"name": "sipha-arbiter", "argv": [sys.executable, "-m", "ha.cli", "health", "arbiter",
                         "/etc/sipha/cluster.yaml"], "env": {"PYTHONPATH": str(REPO)}})  # fmt: skip
    else:
        svcs.append({"name": "corosync", "argv": ["corosync", "-f"]})
        corosync_up = ["corosync-cfgtool", "-s"]
        if cluster.witness:
            svcs.append({"name": "corosync-qdevice", "argv": ["corosync-qdevice", "-f", *QDEVICE_S],
                         "after": corosync_up})
        pcmk_env = {"PCMK_logfile": "/var/log/pacemaker/pacemaker.log", "PCMK_logfacility": "none",
                    "PCMK_logpriority": "info", "HA_logfacility": "none"}  # fmt: skip
        svcs.append({"name": "pacemakerd", "argv": ["pacemakerd"], "env": pcmk_env, "after": corosync_up})
        if cfg["kamailio_by_lab"]:
            p = cluster.proxy
            svcs.append({"name": "kamailio", "argv": ["kamailio", "-DD", "-E", "-f", "/etc/sipha/kamailio.cfg",
                         "-m", str(p.shm_mb), "-M", str(p.pkg_mb)]})  # fmt: skip
        if cfg["variant"] != "stock":
            # The health service: SIP probes of the local proxy -> attribute sipha-health, which the CIB's location
            # rule reads to keep the VIP off an unhealthy proxy. attrd is not up yet when it starts: it retries.
            svcs.append({"name": "sipha-health", "argv": [
                sys.executable, "-m", "ha.cli", "health", "run", "/etc/sipha/cluster.yaml", "--node", h["name"],
                "--fault-file", HEALTH_FAULT_FILE], "env": {"PYTHONPATH": str(REPO)}})  # fmt: skip
    if zk_member:
        svcs.append({"name": "zookeeper", "argv": _zk_argv(), "cwd": cluster.zookeeper.data_dir})
    return svcs


def build_spec(cluster: model.Cluster, yaml_path: Path, rendered: dict[str, str],
               cfg: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    hosts: list[dict[str, Any]] = []
    entries: list[tuple[str, str, Any]] = [(n.name, "node", n.address) for n in cluster.nodes]
    if cluster.witness:
        entries.append((cluster.witness.name, "witness", cluster.witness.address))
    entries.append(("client", "client", cluster.lab.client))
    for i, (name, role, address) in enumerate(entries):
        if PREFIX + name == BRIDGE_NS:
            raise LabError(f"host name {name!r} clashes with the lab's bridge namespace {BRIDGE_NS}")
        ip, prefix = address.split("/")
        veth = f"v-{name}" if len(name) <= 13 else f"v{i}-{name}"[:15]
        h = {"name": name, "role": role, "ns": PREFIX + name, "ip": ip, "prefix": int(prefix), "veth": veth,
             "init": role != "client"}  # fmt: skip
        if h["init"]:
            root = STATE_DIR / name / "root"
            h["binds"] = _host_binds(cluster, root)
            h["run_dirs"] = [("/run/corosync-qdevice", ""), ("/run/corosync-qnetd", ""), ("/run/kamailio", ""),
                             ("/run/crm", "hacluster:haclient"), ("/run/lock", ""), ("/run/sipha", "")]  # fmt: skip
            if cfg["variant"] == "bare":
                h["binds"] += [b for b in labbare.binds(root) if b[1] not in {d for _s, d in h["binds"]}]
                h["run_dirs"].append(("/run/sshd", ""))  # sshd's privilege separation directory
                h["services"] = labbare.services()
            else:
                h["services"] = _services(cluster, h, cfg)
            h["keep_tmp"] = _under_tmp(REPO, Path(sys.prefix), Path(sys.executable).parent, *_agents_homes())
        hosts.append(h)
    return {
        "version": 1,
        "cluster": cluster.name,
        "cluster_yaml": str(yaml_path.resolve()),
        "variant": cfg["variant"],
        "bridge_ns": BRIDGE_NS,
        "bridge": cluster.lab.bridge,
        "state_dir": str(STATE_DIR),
        "control_dir": str(CONTROL_DIR),
        "python": sys.executable,
        "repo": str(REPO),
        "vips": [v.ip for v in cluster.vips],
        "sip_port": cluster.proxy.listen.udp or 5060,
        "zk_client_port": cluster.zookeeper.client_port,
        "kamailio_by_lab": cfg["kamailio_by_lab"],
        "stonith": 'name="stonith-enabled" value="true"' in cfg["cib"],
        "api_token_file": cluster.rest.token_file if cluster.rest.token_file.startswith("/etc/sipha/")
        else "/etc/sipha/api-token",
        "rest": f"http://{cluster.rest.bind}:{cluster.rest.port}",
        "zk_auth_file": cluster.zookeeper.auth_file,
        "hosts": hosts,
        "power_on": [h["name"] for h in hosts if h["init"]],
        **({"ssh": labbare.ssh_paths(STATE_DIR)} if cfg["variant"] == "bare" else {}),
    }


def zk_client_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """KazooClient arguments for a tool outside the nodes (the benches): the lab's ZooKeeper credential, read
    from a node's private /etc/sipha; {} when the lab's ZooKeeper is open."""
    from ha.coordinator import zkauth

    f = spec.get("zk_auth_file")
    if not f:
        return {}
    node = next(h["name"] for h in spec["hosts"] if h["role"] == "node")
    return zkauth.read(STATE_DIR / node / "root" / f.lstrip("/")).client_kwargs()


# ------------------------------------------------------------------------------------------ up / down


def start_supervisor(spec: dict[str, Any]) -> int:
    log = open(CONTROL_DIR / "supervisor.log", "ab")  # noqa: SIM115 - handed to the daemon
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": spec["repo"], "LANG": "C.UTF-8"}
    p = subprocess.Popen([spec["python"], "-m", "ha.lab.supervisor", "--spec", str(SPEC_FILE)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/",
                         start_new_session=True)  # fmt: skip
    log.close()
    PID_FILE.write_text(f"{p.pid}\n")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise LabError(f"the lab supervisor exited ({p.returncode}); see {CONTROL_DIR / 'supervisor.log'}")
        if SOCKET_PATH.exists():
            try:
                if request({"action": "list"}, timeout=2).get("ok"):
                    return p.pid
            except SupervisorError:
                pass
        time.sleep(0.05)
    raise LabError("the lab supervisor did not answer within 15 s")


def up(cluster_yaml: str | Path, echo: Callable[[str], None] = print, variant: str = "model",
       timeout: float = 60) -> float:  # fmt: skip
    """Bring the lab up; returns the seconds it took. On any failure the lab is torn down again.

    ``variant``: ``model`` (the cluster as rendered), ``stock`` (the stock comparison, ha.lab.stock) or ``bare``
    (the same hosts with only sshd, to be provisioned over SSH: ha.lab.bare)."""
    if variant not in ("model", "stock", "bare"):
        raise LabError(f"unknown lab variant {variant!r}: model, stock or bare")
    step = Step(echo)
    yaml_path = Path(cluster_yaml)
    try:
        cluster = model.load(yaml_path)
    except model.ModelError as exc:
        raise LabError(str(exc)) from None
    preflight(cluster, host_agents=variant != "bare")
    CONTROL_DIR.mkdir(parents=True, exist_ok=True)
    try:  # claims the lab atomically: a second (even concurrent) `lab up` now refuses
        with open(SPEC_FILE, "x") as f:
            f.write("{}")
    except FileExistsError:
        raise LabError("a lab is already being brought up (/run/sipha-lab/lab.json exists); "
                       "`sipha lab down` removes it") from None  # fmt: skip
    try:
        _up(cluster, yaml_path, step, variant, timeout)
    except BaseException as exc:
        step(f"lab up failed: {exc}; tearing down what it made")
        _keep_logs(step)
        down(echo=lambda m: step("  " + m))
        raise
    return step.elapsed


FAILED_LOGS = Path("/var/tmp/sipha-lab-failed")


def _keep_logs(step: Step) -> None:
    """A failed `lab up` removes the lab; its logs are kept (one copy, replaced by the next failure)."""
    if copy_logs(FAILED_LOGS):
        step(f"  logs of the failed start kept in {FAILED_LOGS}")


def copy_logs(dest: Path) -> bool:
    """Copy every host's logs (services, init, Pacemaker, Corosync) to ``dest``, replacing what it held: `lab
    down` removes them with the lab, and a drill's or a test's rare tail is explained only by them."""
    shutil.rmtree(dest, ignore_errors=True)
    if not STATE_DIR.exists():
        return False
    for host_dir in STATE_DIR.iterdir():
        for rel in ("logs", "init.log", "root/var/log/pacemaker", "root/var/log/corosync"):
            src = host_dir / rel
            dst = dest / host_dir.name / rel.replace("root/var/log/", "")
            with contextlib.suppress(OSError):
                if src.is_dir():
                    shutil.copytree(src, dst)
                elif src.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
    return True


def _up(cluster: model.Cluster, yaml_path: Path, step: Step, variant: str, timeout: float) -> None:
    if variant == "stock":
        from ha.lab import stock

        cluster = stock.cluster(cluster)
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir(parents=True)
    rendered = _render(cluster, STATE_DIR / "render", step)
    step(f"rendered {len(rendered)} files for {cluster.name} ({variant}) into {STATE_DIR / 'render'}")
    if variant == "bare":
        _up_bare(cluster, yaml_path, rendered, step, timeout)
        return
    if variant == "stock":
        fence = _fence_agent_installed(cluster.fencing.agent)
        cib, kamailio_by_lab = stock.cib(cluster, rendered["cib.xml"], fence, step), False
        rendered = {k: stock.kamailio_cfg(v) if k.endswith("kamailio.cfg") else v for k, v in rendered.items()}
    else:
        cib, kamailio_by_lab = _lab_cib(rendered["cib.xml"], cluster, step)
    cfg = {"authkey": secrets.token_bytes(128), "cib": cib, "kamailio_by_lab": kamailio_by_lab,
           "corosync_conf": rendered["corosync.conf"],
           "fallback_kamailio": FALLBACK_KAMAILIO, "variant": variant,
           "api_token": secrets.token_urlsafe(32), "zk_password": secrets.token_urlsafe(24)}  # fmt: skip
    if not any(p.endswith("kamailio.cfg") for p in rendered) and not kamailio_by_lab:
        raise LabError("no kamailio.cfg rendered (templates/kamailio.cfg.j2 missing)")
    spec = build_spec(cluster, yaml_path, rendered, cfg)
    yaml_text = yaml_path.read_text()
    for h in spec["hosts"]:
        if h["init"]:
            _prepare_host(cluster, h, rendered, cfg, yaml_text)
    SPEC_FILE.write_text(json.dumps(spec, indent=1))
    step("private /etc, /var/lib, /var/log trees, authkey, pre-seeded CIB ready")
    _wire(spec, step)
    wait_ready(spec, step, timeout)


def _wire(spec: dict[str, Any], step: Step, powered_note: str = "") -> None:
    """The bridge, each host's veth and the supervisor that powers the hosts on: what both lab kinds share once
    their hosts' trees are written."""
    labnode.create_bridge(spec)
    for h in spec["hosts"]:
        labnode.create_host_net(spec, h)
    step(f"network: bridge {spec['bridge']} in netns {BRIDGE_NS}, " +
         ", ".join(f"{h['ns']} {h['ip']}" for h in spec["hosts"]))  # fmt: skip
    pid = start_supervisor(spec)
    step(f"supervisor {pid} on {SOCKET_PATH}; powered on {', '.join(spec['power_on'])}{powered_note}")


def _up_bare(cluster: model.Cluster, yaml_path: Path, rendered: dict[str, str], step: Step, timeout: float) -> None:
    """The hosts, network and supervisor of the normal lab; each host's init starts only its sshd."""
    missing = sorted({pkg for path, pkg in labbare.REQUIRED.items() if not Path(path).exists()})
    if missing:
        raise LabError(f"missing package(s): {' '.join(missing)}; install with: apt-get install {' '.join(missing)}")
    cfg = {"variant": "bare", "kamailio_by_lab": False, "cib": ""}
    spec = build_spec(cluster, yaml_path, rendered, cfg)
    for h in spec["hosts"]:
        if h["init"]:
            _prepare_host(cluster, h, rendered, cfg, "")
    labbare.prepare(cluster, spec)
    SPEC_FILE.write_text(json.dumps(spec, indent=1))
    step(f"empty private /etc, /var/lib, /var/log, /usr/local, /opt trees; ssh keys in {spec['ssh']['dir']}")
    _wire(spec, step, " (sshd only)")
    labbare.wait_ready(spec, step, timeout)


def wait_ready(spec: dict[str, Any], step: Step, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    nodes = [h for h in spec["hosts"] if h["role"] == "node"]
    want = {"quorum": False, "zookeeper": False, "vip": False}
    last_err = ""
    while time.monotonic() < deadline:
        if not want["quorum"]:
            q = quorum(nodes[0]["name"])
            if q.get("quorate"):
                want["quorum"] = True
                step(f"quorate: {q.get('summary', '')}")
        if not want["zookeeper"]:
            modes = zk_modes(spec)
            if "leader" in modes.values():
                want["zookeeper"] = True
                step("ZooKeeper ensemble: " + ", ".join(f"{k} {v}" for k, v in modes.items()))
        if want["quorum"] and not want["vip"]:
            ok, detail = sip_options(spec, spec["vips"][0], timeout=0.3)
            if ok:
                want["vip"] = True
                where = vip_holder(spec)
                step(f"VIP {spec['vips'][0]} answers SIP OPTIONS from the client ({detail}), on {where}")
            else:
                last_err = detail
        if all(want.values()):
            step("lab is up")
            return
        for h in spec["hosts"]:
            if h["init"]:
                try:
                    if power("status", h["name"]) != "on":
                        raise LabError(f"{h['name']} died during start; see {STATE_DIR / h['name'] / 'logs'}")
                except SupervisorError as exc:
                    raise LabError(str(exc)) from None
        time.sleep(0.1)
    missing = ", ".join(k for k, v in want.items() if not v)
    raise LabError(f"not ready after {timeout:.0f} s: {missing} (last SIP probe: {last_err or 'not tried'}); "
                   f"logs in {STATE_DIR}/<host>/logs")  # fmt: skip


def _kill_pid(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def down(echo: Callable[[str], None] = print, keep_logs: Path | None = None) -> list[str]:
    """Remove everything the lab made, by the names and pids it recorded. Safe to run twice. ``keep_logs``:
    a directory the hosts' logs are copied to first (taken after the processes stop, so complete)."""
    done: list[str] = []
    spec = load_spec() or {}
    hosts = spec.get("hosts", [])
    # 1. the supervisor (it kills the inits it owns on SIGTERM; we kill them again below regardless)
    try:
        sup = int(PID_FILE.read_text())
    except (OSError, ValueError):
        sup = None
    if sup and _pid_alive(sup) and _cmdline_has(sup, "ha.lab.supervisor"):
        os.kill(sup, signal.SIGTERM)
        for _ in range(50):
            if not _pid_alive(sup):
                break
            time.sleep(0.1)
        _kill_pid(sup if _pid_alive(sup) else None)
        done.append(f"stopped supervisor {sup}")
    # 2. each host's init (SIGKILL to PID 1 of its namespace takes everything in it) and any straggler
    for h in hosts:
        unshare_pid, init_pid = labnode.recorded_pids(h["name"])
        for pid in (init_pid, unshare_pid):
            if pid and _pid_alive(pid) and _cmdline_has(pid, "ha.lab.init", "unshare"):
                _kill_pid(pid)
                done.append(f"killed {h['name']} pid {pid}")
        for pid in labnode.pids_in_netns(h["ns"]):
            _kill_pid(pid)
            done.append(f"killed {h['name']} straggler pid {pid}")
    # 3. namespaces (ours by recorded name, and any sipha-* left by a crashed `lab up` before it wrote a spec)
    names = {h["ns"] for h in hosts}
    if spec.get("bridge_ns"):
        names.add(spec["bridge_ns"])
    for ns in sorted(names):
        for _ in range(20):
            for pid in labnode.pids_in_netns(ns):
                _kill_pid(pid)
            if not labnode.pids_in_netns(ns):
                break
            time.sleep(0.05)
        if labnode.netns_exists(ns):
            run(["ip", "netns", "del", ns], check=False)
            done.append(f"deleted netns {ns}")
    # 4. files
    if keep_logs is not None and copy_logs(keep_logs):
        done.append(f"kept the logs in {keep_logs}")
    for d in (CONTROL_DIR, STATE_DIR):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed {d}")
    for m in done:
        echo(m)
    if not done:
        echo("no lab to take down")
    return done


def _cmdline_has(pid: int, *needles: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(n in cmd for n in needles)


# ------------------------------------------------------------------------------------------ looking


def host(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for h in spec["hosts"]:
        if h["name"] == name:
            return h
    raise LabError(f"no lab host {name!r}; hosts: {', '.join(h['name'] for h in spec['hosts'])}")


def nsenter_argv(spec: dict[str, Any], name: str) -> list[str]:
    h = host(spec, name)
    if not h["init"]:
        return ["ip", "netns", "exec", h["ns"]]
    _unshare, init = labnode.recorded_pids(name)
    if not init or not _pid_alive(init):
        raise LabError(f"{name} is powered off (start it with `sipha lab start {name}`)")
    return ["nsenter", "-t", str(init), "-m", "-u", "-i", "-n", "-p", "--"]


def exec_in(spec: dict[str, Any], name: str, argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*nsenter_argv(spec, name), *argv], capture_output=True, text=True, timeout=timeout)


def quorum(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = spec or load_spec() or {}
    try:
        p = exec_in(spec, name, ["corosync-quorumtool", "-s"], timeout=5)
    except (LabError, subprocess.TimeoutExpired) as exc:
        return {"quorate": False, "summary": str(exc)}
    out = p.stdout
    info: dict[str, Any] = {"quorate": "Quorate:          Yes" in out}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in ("Total votes", "Expected votes", "Quorum"):
            info[k.strip().lower().replace(" ", "_")] = v.strip().split()[0] if v.strip() else ""
    info["summary"] = f"votes {info.get('total_votes', '?')}/{info.get('expected_votes', '?')}"
    return info


def zk_mode(spec: dict[str, Any], h: dict[str, Any]) -> str:
    import socket as _s

    def ask() -> str:
        with _s.create_connection((h["ip"], spec["zk_client_port"]), timeout=0.5) as s:
            s.sendall(b"srvr")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return "no mode (" + data.decode(errors="replace").strip()[:60] + ")"

    try:
        return labnode.in_netns(h["ns"], ask)
    except OSError as exc:
        return f"down ({exc.strerror or exc})"


def zk_modes(spec: dict[str, Any]) -> dict[str, str]:
    out = {}
    for h in spec["hosts"]:
        if h["init"] and any(s["name"] == "zookeeper" for s in h.get("services", [])):
            out[h["name"]] = zk_mode(spec, h) if labnode.netns_exists(h["ns"]) else "down"
    return out


def client_ns(spec: dict[str, Any]) -> str:
    return host(spec, "client")["ns"]


def sip_options(spec: dict[str, Any], target: str, timeout: float = 0.5) -> tuple[bool, str]:
    """One SIP OPTIONS from the client host to ``target``; (answered, detail)."""
    from ha.lab.prober import options_once

    port = spec["sip_port"]
    try:
        return labnode.in_netns(client_ns(spec), lambda: options_once(target, port, timeout))
    except OSError as exc:
        return False, str(exc)


def powered(name: str) -> bool:
    """The host's init is alive (a powered-off node's namespace may still hold a stale VIP)."""
    _unshare, init = labnode.recorded_pids(name)
    return bool(init) and _pid_alive(init)


def vip_holder(spec: dict[str, Any], vip: str | None = None) -> str:
    """Which running node's eth0 carries the VIP (by looking, not by asking Pacemaker); '-' if none."""
    vip = vip or spec["vips"][0]
    holders = []
    for h in spec["hosts"]:
        if h["role"] == "node" and labnode.netns_exists(h["ns"]) and powered(h["name"]):
            p = run(["ip", "-n", h["ns"], "-o", "-4", "addr", "show", "dev", "eth0"], check=False)
            if f" {vip}/" in p.stdout:
                holders.append(h["name"])
    return ",".join(holders) or "-"


def crm_status(spec: dict[str, Any]) -> dict[str, Any]:
    """Cluster view from crm_mon --as-xml on the first node that answers."""
    for h in spec["hosts"]:
        if h["role"] != "node":
            continue
        try:
            p = exec_in(spec, h["name"], ["crm_mon", "--as-xml", "-1"], timeout=5)
        except (LabError, subprocess.TimeoutExpired):
            continue
        if p.returncode not in (0,) or not p.stdout.strip().startswith("<"):
            continue
        root = ET.fromstring(p.stdout)  # noqa: S314 - crm_mon of our own lab
        out: dict[str, Any] = {"from": h["name"], "nodes": {}, "resources": []}
        summ = root.find("summary")
        if summ is not None:
            dc = summ.find("current_dc")
            if dc is not None:
                out["dc"] = dc.get("name") if dc.get("present") == "true" else None
                out["quorum"] = dc.get("with_quorum") == "true"
        for n in root.iter("node"):
            if n.get("online") is not None:
                out["nodes"][n.get("name")] = "online" if n.get("online") == "true" else (
                    "unclean" if n.get("unclean") == "true" else "offline")  # fmt: skip
        res = root.find("resources")
        if res is not None:
            for r in res.iter("resource"):
                nodes = [x.get("name") for x in r.findall("node")]
                out["resources"].append({"id": r.get("id"), "agent": r.get("resource_agent"), "role": r.get("role"),
                                         "active": r.get("active") == "true", "failed": r.get("failed") == "true",
                                         "nodes": nodes})  # fmt: skip
        return out
    return {"from": None, "nodes": {}, "resources": [], "error": "no node answered crm_mon"}


def status(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = spec or load_spec()
    if not spec or not spec.get("hosts"):
        return {"up": False}
    try:
        power_state = request({"action": "list"}, timeout=3).get("hosts", {})
    except SupervisorError as exc:
        power_state = {"error": str(exc)}
    hosts = {}
    for h in spec["hosts"]:
        entry = {"ip": h["ip"], "ns": h["ns"], "role": h["role"]}
        if h["init"]:
            entry["power"] = power_state.get(h["name"], "unknown")
        entry["partitioned"] = labnode.netns_exists(spec["bridge_ns"]) and labnode.partitioned(spec, h)
        hosts[h["name"]] = entry
    nodes = [h for h in spec["hosts"] if h["role"] == "node"]
    q = {}
    for n in nodes:
        if power_state.get(n["name"]) == "on":
            q[n["name"]] = quorum(n["name"], spec)
    vips = {v: vip_holder(spec, v) for v in spec["vips"]}
    answered, detail = sip_options(spec, spec["vips"][0], timeout=0.5)
    return {
        "up": True,
        "cluster": spec["cluster"],
        "variant": spec.get("variant", "model"),
        "hosts": hosts,
        "quorum": {k: {"quorate": v.get("quorate"), "summary": v.get("summary")} for k, v in q.items()},
        "pacemaker": crm_status(spec),
        "vips": vips,
        "vip_sip": {"answered": answered, "detail": detail},
        "zookeeper": zk_modes(spec),
    }


@contextlib.contextmanager
def lab_up(cluster_yaml: str | Path, **kw: Any) -> Iterator[float]:
    """Context manager for tests and benches: up, yield the up time, ALWAYS down."""
    try:
        t = up(cluster_yaml, **kw)
        yield t
    finally:
        down(echo=lambda _m: None)


def failover(spec: dict[str, Any], interval: float = 0.02, after: float = 4.0, before: float = 1.0,
             echo: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Hard-kill the node holding the VIP while the client probes it every ``interval`` s."""
    from ha.lab.prober import Prober

    vip = spec["vips"][0]
    holder = vip_holder(spec, vip)
    if holder in ("-", "") or "," in holder:
        raise LabError(f"VIP {vip} is on {holder!r}: need exactly one holder to fail over from")
    prober = labnode.in_netns(client_ns(spec), lambda: Prober(vip, spec["sip_port"], interval))
    prober.start(before + after)
    time.sleep(before)
    power("off", holder)
    t_kill = time.monotonic()  # the node is dead once the supervisor answers
    echo(f"killed {holder} (VIP holder) at +{before:.1f} s; probing {after:.1f} s more")
    prober.wait()
    rep = prober.report()
    answered_after = [prober.sent[c] for c in prober.order if c in prober.answered and prober.sent[c] > t_kill]
    new_holder = vip_holder(spec, vip)
    return {"killed": holder, "new_holder": new_holder, "recovered": bool(answered_after),
            "first_answer_after_kill_ms": round((answered_after[0] - t_kill) * 1000, 1) if answered_after else None,
            **rep}  # fmt: skip


def probed(spec: dict[str, Any], fault: Callable[[], Any], interval: float = 0.02, before: float = 1.0,
           after: float = 4.0, until: Callable[[], bool] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``fault()`` while the client probes the VIP every ``interval`` s; the caller's-eye view of it.

    ``first_answer_after_fault_ms``: from the moment ``fault()`` returned (the signal delivered, the command
    done) to the send time of the first probe sent after it that was answered. ``longest_gap_ms``: the longest
    time between the sends of two consecutive answered probes. Probing stops ``after`` s after the fault, or
    earlier once ``until()`` holds and a probe sent after the fault was answered (checked every 0.1 s).
    """
    from ha.lab.prober import Prober

    vip = spec["vips"][0]
    prober = labnode.in_netns(client_ns(spec), lambda: Prober(vip, spec["sip_port"], interval))
    prober.start(before + after)
    time.sleep(before)
    t0 = time.monotonic()
    result = fault()
    t_fault = time.monotonic()
    while time.monotonic() - t_fault < after:
        if until is not None and until() and any(
            prober.sent[c] > t_fault for c in list(prober.answered)
        ):
            time.sleep(0.3)
            break
        time.sleep(0.1)
    prober.stop()
    prober.wait(grace=0.3)
    rep = prober.report()
    after_fault = sorted(prober.sent[c] for c in prober.order if c in prober.answered and prober.sent[c] > t_fault)
    return {"fault_result": result, "fault_call_ms": round((t_fault - t0) * 1000, 1),
            "first_answer_after_fault_ms": round((after_fault[0] - t_fault) * 1000, 1) if after_fault else None,
            **rep}  # fmt: skip
