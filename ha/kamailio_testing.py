"""The rendered kamailio.cfg of a node, started for real in a throwaway network namespace (tests, benches).

Why a namespace: the config listens on the node's address and the VIP, which the host does not have; a
namespace ``sipha-t-<random>`` holds them on a veth pair, with ``ip_nonlocal_bind`` set as on a cluster
node, and nothing here touches the host's network. Callers create their sockets inside it with
``ns_socket`` (``setns`` on the creating thread only). Kamailio is stopped by its own process group and the
namespace deleted on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2

from ha import model, render, sip
from ha.lab.node import in_netns
from ha.proxy import kamailio

ROOT = Path(__file__).resolve().parents[1]
FLOODER = "198.51.100.77"  # an extra address in the namespace: an untrusted source for the rate limit


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def ns_socket(ns: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket that lives in namespace ``ns`` (made by a thread switched into it: ``ha.lab.node.in_netns``)."""
    return in_netns(ns, lambda: socket.socket(socket.AF_INET, kind))


@dataclass
class Proxy:
    ns: str
    cluster: model.Cluster
    run_dir: Path
    log: Path
    vip: str
    node_ip: str
    pid: int

    @property
    def rpc_sock(self) -> Path:
        return kamailio.rpc_socket(self.run_dir)


def stop_group(proc: subprocess.Popen[bytes], wait_s: float = 10.0) -> None:
    """Stop a Kamailio started in its own session (``start_new_session``): its group, never a name."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    # Workers may outlive the main process by a moment; the group is ours alone.
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def running_proxy(
    tmp: Path, example: str, defines: dict[str, str] | None = None, template: str | None = None
) -> Iterator[Proxy]:
    """The first node of ``examples/<example>.yaml`` running its kamailio.cfg in a new namespace.

    ``template`` is the text of another kamailio.cfg.j2 to render instead of the repo's (a bench compares
    an earlier revision's config in the same run).
    """
    cluster = model.load(ROOT / f"examples/{example}.yaml")
    node = cluster.nodes[0]
    env = render._env()
    tpl = env.from_string(template) if template is not None else env.get_template("kamailio.cfg.j2")
    cfg = tmp / "kamailio.cfg"
    try:
        cfg.write_text(tpl.render(cluster=cluster, host=node, is_node=True))
    except jinja2.TemplateError as e:
        raise RuntimeError(f"kamailio.cfg.j2 does not render: {e}") from e
    run_dir = tmp / "run"
    run_dir.mkdir()
    log = tmp / "kamailio.log"
    ns = f"sipha-t-{secrets.token_hex(4)}"
    proc: subprocess.Popen[bytes] | None = None
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", ns, "link", "set", "v1", "up")
        _ip("-n", ns, "link", "set", "v0", "up")
        for address in (node.address, *(v.address for v in cluster.vips), f"{FLOODER}/24"):
            _ip("-n", ns, "addr", "add", address, "dev", "v0")
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"], check=True)
        cmd = kamailio.kamailio_command(cfg, cluster, run_dir=run_dir, foreground=True, defines=defines)
        with log.open("wb") as out:
            # ip netns exec execs kamailio in place, so proc.pid is Kamailio's main process; its own session
            # makes the workers one process group we can stop without touching anything else.
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        p = Proxy(ns, cluster, run_dir, log, cluster.vips[0].ip, node.ip, proc.pid)
        deadline = time.monotonic() + 15
        while not p.rpc_sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kamailio did not start (rc={proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        # ... and answering SIP, not only its control socket: on a loaded machine a test's first OPTIONS (one
        # send, 2 s) came before the SIP workers and got nothing.
        udp = cluster.proxy.listen.udp
        while udp is not None and not in_netns(ns, lambda: sip.options_probe("127.0.0.1", udp, "udp", 0.5)).ok:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kamailio does not answer SIP (rc={proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.05)  # a refused probe returns at once
        yield p
    finally:
        if proc is not None:
            stop_group(proc)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)
