"""One lab host: its network namespace, its veth on the lab bridge, and its init (PID 1 of its own namespaces).

Everything here acts on names recorded in the lab spec (``/run/sipha-lab/lab.json``), never on guesses, so
``sipha lab down`` removes exactly what ``sipha lab up`` made.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ha.lab.supervisor import CONTROL_DIR

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """A lab step failed; one line saying which and why."""


def run(argv: list[str], check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:300]}")
    return p


def netns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


# ------------------------------------------------------------------------------------------ the network


def create_bridge(spec: dict[str, Any]) -> None:
    """The bridge lives in its own namespace, so the host itself gets no lab address or route."""
    ns, br = spec["bridge_ns"], spec["bridge"]
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
    run(["ip", "-n", ns, "link", "set", br, "up"])


def create_host_net(spec: dict[str, Any], h: dict[str, Any]) -> None:
    """The host's namespace and a veth pair: ``eth0`` inside, ``h['veth']`` on the bridge."""
    ns, brns = h["ns"], spec["bridge_ns"]
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", h["veth"], "netns", brns])
    run(["ip", "-n", ns, "addr", "add", f"{h['ip']}/{h['prefix']}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", brns, "link", "set", h["veth"], "master", spec["bridge"]])
    run(["ip", "-n", brns, "link", "set", h["veth"], "up"])
    # The node's own sysctls live in its netns: the proxy binds the VIP before the VIP is there.
    run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1"])


def delete_host_net(spec: dict[str, Any], h: dict[str, Any]) -> None:
    brns = spec["bridge_ns"]
    if netns_exists(brns):
        run(["ip", "-n", brns, "link", "del", h["veth"]], check=False)  # takes eth0 (and a VIP) with it
    if netns_exists(h["ns"]):
        run(["ip", "netns", "del", h["ns"]], check=False)


def recreate_netns(spec: dict[str, Any], h: dict[str, Any]) -> None:
    """A killed node's namespace still holds the VIP: start again from a fresh namespace and veth."""
    delete_host_net(spec, h)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            create_host_net(spec, h)
            return
        except LabError:
            delete_host_net(spec, h)  # the kernel may still be tearing down the old pair
            time.sleep(0.1)
    create_host_net(spec, h)


def link(spec: dict[str, Any], h: dict[str, Any], up: bool, missing_ok: bool = False) -> None:
    p = run(["ip", "-n", spec["bridge_ns"], "link", "set", h["veth"], "up" if up else "down"], check=False)
    if p.returncode and not missing_ok:
        raise LabError(f"link {'up' if up else 'down'} {h['veth']}: {p.stderr.strip()}")


def partition(spec: dict[str, Any], h: dict[str, Any], cut: bool) -> None:
    """Cut the host off the bridge while its carrier stays up (a switch dropping its frames, not a pulled
    cable): the bridge port goes to STP state ``disabled`` (no forwarding either way); healing sets it back to
    ``forwarding``. STP is off on the lab bridge, so nothing else changes port states. A power cycle (``on``)
    gives the host a fresh port, which also heals it."""
    state = "0" if cut else "3"
    run(["bridge", "-n", spec["bridge_ns"], "link", "set", "dev", h["veth"], "state", state])


def partitioned(spec: dict[str, Any], h: dict[str, Any]) -> bool:
    p = run(["bridge", "-n", spec["bridge_ns"], "link", "show", "dev", h["veth"]], check=False)
    return "state disabled" in p.stdout


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread switched into network namespace ``ns``; sockets it creates stay in ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, Any] = {}

    def body() -> None:
        fds: list[int] = []
        try:  # a namespace that does not exist is a FileNotFoundError for the caller, not a thread's traceback
            fds.append(own := os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY))
            fds.append(target := os.open(str(NETNS_DIR / ns), os.O_RDONLY))
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
            try:
                out["value"] = fn()
            finally:
                libc.setns(own, CLONE_NEWNET)
        except BaseException as exc:
            out["error"] = exc
        finally:
            for fd in fds:
                os.close(fd)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# --------------------------------------------------------------------------------------- processes


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d.name))
    return out


def init_pid_of(unshare_pid: int, timeout: float = 0.0) -> int | None:
    """``unshare -f`` forks once: its child is the host's init (PID 1 inside)."""
    deadline = time.monotonic() + timeout
    while True:
        kids = children_of(unshare_pid)
        if kids:
            return kids[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def pids_in_netns(ns: str) -> list[int]:
    try:
        target = os.stat(NETNS_DIR / ns).st_ino
    except OSError:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.stat(d / "ns" / "net").st_ino == target:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def wait_namespace_empty(h: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pids_in_netns(h["ns"]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def pid_file(name: str) -> Path:
    return CONTROL_DIR / f"{name}.pids"


def recorded_pids(name: str) -> tuple[int | None, int | None]:
    """(unshare pid, init pid) as recorded when the host was powered on."""
    try:
        a, b = pid_file(name).read_text().split()
        return int(a), (int(b) if b != "-" else None)
    except (OSError, ValueError):
        return None, None


def start_init(spec: dict[str, Any], h: dict[str, Any]) -> subprocess.Popen[bytes]:
    """``ip netns exec`` + ``unshare`` (mount, UTS, IPC, PID) + our init as PID 1."""
    log = Path(spec["state_dir"]) / h["name"] / "init.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        "ip", "netns", "exec", h["ns"],
        "unshare", "-m", "-u", "-i", "-p", "-f", "--mount-proc", "--propagation", "private",
        spec["python"], "-m", "ha.lab.init", "--spec", str(CONTROL_DIR / "lab.json"), "--host", h["name"],
    ]  # fmt: skip
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": spec["repo"], "LANG": "C.UTF-8"}
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd="/",
                             start_new_session=True)  # fmt: skip
    init = init_pid_of(p.pid, timeout=3)
    pid_file(h["name"]).write_text(f"{p.pid} {init or '-'}\n")
    return p
