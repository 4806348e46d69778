"""PID 1 of a lab host (run by the supervisor inside ``ip netns exec`` + ``unshare -m -u -i -p -f``).

It makes the host look like its own machine -- private copies of the directories Corosync, Pacemaker and
ZooKeeper keep state in, a private ``/run``, ``/tmp`` and ``/dev/shm`` (libqb names its shm files by pid, and
pids repeat across PID namespaces), its hostname -- then starts the host's services in order, reaps every
zombie (it is PID 1), and on SIGTERM stops its children. A SIGKILL to it is a pulled plug: the kernel kills
every process of the PID namespace at once.

What to mount and start comes from the lab spec (``lab.json``) written by ``sipha lab up``; this file only
executes it, so it stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MS_BIND = 4096
MS_REC = 16384
MS_NOSUID = 2
MS_NODEV = 4

_libc = ctypes.CDLL(None, use_errno=True)


def log(host: str, msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{host} init] {msg}", flush=True)


def mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None)  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {dst}: {os.strerror(err)}")


def setup_mounts(h: dict[str, Any], control_dir: str) -> None:
    # Hold the supervisor's directory open: the private /run below hides the host's copy of it.
    ctl_fd = os.open(control_dir, os.O_RDONLY | os.O_DIRECTORY)
    for src, dst in h["binds"]:
        if Path(src).is_dir():
            Path(dst).mkdir(parents=True, exist_ok=True)
        elif not Path(dst).exists():
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            Path(dst).touch()
        mount(src, dst, None, MS_BIND)
    # A checkout (and its venv) under /tmp, e.g. a clean clone in /tmp/cc, would vanish under the private /tmp:
    # hold it open and bind it back at the same path, so the agents and services it provides still run.
    keep = [(d, os.open(d, os.O_RDONLY | os.O_DIRECTORY)) for d in h.get("keep_tmp", []) if Path(d).is_dir()]
    for dst in ("/run", "/tmp", "/dev/shm"):
        mode = "1777" if dst != "/run" else "755"
        mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=256m")
    for d, fd in keep:
        Path(d).mkdir(parents=True, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)
        os.close(fd)
    for d, owner in h.get("run_dirs", []):
        p = Path(d)
        p.mkdir(parents=True, exist_ok=True)
        if owner:
            user, _, group = owner.partition(":")
            import grp
            import pwd

            os.chown(p, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid if group else -1)
    Path(control_dir).mkdir(parents=True, exist_ok=True)
    mount(f"/proc/self/fd/{ctl_fd}", control_dir, None, MS_BIND)
    os.close(ctl_fd)


def ready(check: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()
        if subprocess.run(check, capture_output=True).returncode == 0:
            return True
        time.sleep(0.05)
    return False


children: dict[int, str] = {}


def reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        name = children.pop(pid, None)
        if name:
            print(f"{time.strftime('%H:%M:%S')} [init] {name} (pid {pid}) exited with status {status}", flush=True)


def start(h: dict[str, Any], svc: dict[str, Any], logs: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root", **svc.get("env", {})}
    out = open(logs / f"{svc['name']}.log", "ab")  # noqa: SIM115 - inherited by the child, closed below
    p = subprocess.Popen(svc["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                         cwd=svc.get("cwd", "/"))  # fmt: skip
    out.close()
    children[p.pid] = svc["name"]
    # Popen would otherwise also try to reap it; we own reaping as PID 1.
    p.returncode = 0
    log(h["name"], f"started {svc['name']} (pid {p.pid}): {' '.join(svc['argv'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--host", required=True)
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    h = next(x for x in spec["hosts"] if x["name"] == args.host)
    logs = Path(spec["state_dir"]) / h["name"] / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    stopping = False

    def on_term(_sig: int, _frm: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    setup_mounts(h, spec["control_dir"])
    socket.sethostname(h["name"])
    Path("/proc/sys/net/ipv4/ip_nonlocal_bind").write_text("1\n")
    log(h["name"], f"pid {os.getpid()}, hostname {h['name']}, mounts ready")

    for svc in h["services"]:
        if stopping:
            break
        if svc.get("after"):
            ok = ready(svc["after"], svc.get("after_timeout", 15))
            log(h["name"], f"{' '.join(svc['after'])}: {'ready' if ok else 'NOT ready, starting anyway'}")
        start(h, svc, logs)

    while not stopping:
        reap()
        time.sleep(0.2)

    log(h["name"], "SIGTERM: stopping children")
    for pid in reversed(list(children)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while children and time.monotonic() < deadline:
        reap()
        time.sleep(0.1)
    return 0  # leaving PID 1 kills whatever is left in the namespace


if __name__ == "__main__":
    sys.exit(main())
