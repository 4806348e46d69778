"""The lab supervisor: the lab's stand-in for a hypervisor (what libvirt is to ``fence_virsh``).

It runs on the host (started by ``sipha lab up`` as a daemon, pid in ``/run/sipha-lab/supervisor.pid``), owns the
init process of every lab host, and powers hosts off and on when asked.

Protocol (version 1) -- what ``fence_sipha_lab`` and ``sipha lab kill/start`` speak
---------------------------------------------------------------------------------------
* Socket: ``/run/sipha-lab/supervisor.sock``, ``AF_UNIX`` ``SOCK_STREAM``. The directory ``/run/sipha-lab`` is
  bind-mounted into every lab host, so the path is the same on the host and inside node1, node2 and the witness.
* One request per connection. The client sends ONE line of UTF-8 JSON ending in ``\\n``; the supervisor answers
  with ONE line of JSON ending in ``\\n`` and closes the connection. Clients should allow 10 s.
* Request: ``{"action": ACTION, "host": NAME}``; ``host`` is not needed for ``list`` and ``ping``.
  ACTION is one of:

  ``off``     power the host off: SIGKILL its init (PID 1 of its own PID namespace, so everything in the host
              dies at once, like pulling the plug) and take its link down (the bridge-side veth). Returns once the
              processes are gone. Idempotent: ``off`` on an off host succeeds.
  ``on``      power the host on: clean its network namespace (a killed node's namespace still holds the VIP, so
              it is deleted and recreated with a fresh veth), then start its init. Returns as soon as the init runs,
              not when the cluster services are up. Idempotent: ``on`` on a running host succeeds.
  ``reboot``  ``off`` then ``on``.
  ``status``  the host's power state.
  ``list``    every host the supervisor can power (the nodes and the witness; the client host has no init).
  ``ping``    liveness of the supervisor itself.

* Reply on success: ``{"ok": true, "status": "on"|"off"}`` (off/on/reboot/status),
  ``{"ok": true, "hosts": {"node1": "on", "node2": "off", "witness": "on"}}`` (list), ``{"ok": true}`` (ping).
  On failure: ``{"ok": false, "error": "one line saying why"}`` (unknown host or action, malformed request, a
  power operation that failed).
* A fence agent maps: ``off``/``on``/``reboot`` ok -> exit 0; ``status`` "on" -> 0, "off" -> 2; ``list`` -> one
  plug per host name; any ``ok: false`` or a refused connection -> exit 1.

Example (from a shell on node1)::

    printf '{"action":"status","host":"node2"}\\n' | socat - UNIX-CONNECT:/run/sipha-lab/supervisor.sock
    python3 -c 'from ha.lab.supervisor import request; print(request({"action":"list"}))'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ha.unixline import exchange

CONTROL_DIR = Path("/run/sipha-lab")
SOCKET_PATH = CONTROL_DIR / "supervisor.sock"
PID_FILE = CONTROL_DIR / "supervisor.pid"
ACTIONS = ("off", "on", "reboot", "status", "list", "ping")


class SupervisorError(RuntimeError):
    """The supervisor could not be reached or refused a request; one line."""


def request(req: dict[str, Any], path: str | Path = SOCKET_PATH, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request, return the reply (raises SupervisorError when unreachable or malformed)."""
    try:
        buf = exchange(path, json.dumps(req).encode() + b"\n", timeout)
    except OSError as exc:
        raise SupervisorError(f"lab supervisor at {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise SupervisorError(f"lab supervisor at {path}: malformed reply {buf[:200]!r}") from None
    if not isinstance(reply, dict):
        raise SupervisorError(f"lab supervisor at {path}: malformed reply {buf[:200]!r}")
    return reply


def power(action: str, host: str, path: str | Path = SOCKET_PATH) -> str:
    """``off``/``on``/``reboot``/``status`` of one host; returns the power state or raises SupervisorError."""
    reply = request({"action": action, "host": host}, path)
    if not reply.get("ok"):
        raise SupervisorError(f"{action} {host}: {reply.get('error', 'failed')}")
    return str(reply.get("status", ""))


# --------------------------------------------------------------------------------------------- the daemon


class Supervisor:
    """Owns the hosts' init processes; every power operation is serialised per host."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from ha.lab import node as labnode

        self.node = labnode
        self.spec = spec
        self.hosts: dict[str, dict[str, Any]] = {h["name"]: h for h in spec["hosts"] if h.get("init", True)}
        self.procs: dict[str, Any] = {}
        self.locks = {name: threading.Lock() for name in self.hosts}
        self.stopping = False

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    def state(self, name: str) -> str:
        p = self.procs.get(name)
        return "on" if p is not None and p.poll() is None else "off"

    def off(self, name: str) -> str:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            init_pid = self.node.init_pid_of(p.pid)
            # The link first, as a power cut does: killed first, the host's processes would close their TCP
            # connections on a live link, and qnetd (and ZooKeeper) would learn of the death from the FIN at once,
            # which no real power cut tells them. Measured: the kill-first order hid ~0.5-1.5 s of a power cut.
            self.node.link(self.spec, self.hosts[name], up=False)
            # SIGKILL to PID 1 of the host's PID namespace kills every process in it.
            for pid in (init_pid, p.pid):
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
            self.node.wait_namespace_empty(self.hosts[name], timeout=5)
            self.log(f"{name}: powered off (init {init_pid} killed, link down)")
        else:
            self.node.link(self.spec, self.hosts[name], up=False, missing_ok=True)
        return self.state(name)

    def on(self, name: str) -> str:
        if self.state(name) == "on":
            return "on"
        h = self.hosts[name]
        self.node.recreate_netns(self.spec, h)
        self.procs[name] = self.node.start_init(self.spec, h)
        self.log(f"{name}: powered on (pid {self.procs[name].pid})")
        return self.state(name)

    def handle(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        action = req.get("action")
        if action not in ACTIONS:
            return {"ok": False, "error": f"unknown action {action!r}; one of {', '.join(ACTIONS)}"}
        if action == "ping":
            return {"ok": True}
        if action == "list":
            return {"ok": True, "hosts": {n: self.state(n) for n in self.hosts}}
        name = req.get("host")
        if name not in self.hosts:
            return {"ok": False, "error": f"unknown host {name!r}; one of {', '.join(self.hosts)}"}
        if action == "status":
            return {"ok": True, "status": self.state(name)}
        with self.locks[name]:
            try:
                if action in ("off", "reboot"):
                    status = self.off(name)
                if action in ("on", "reboot"):
                    status = self.on(name)
            except Exception as exc:
                self.log(f"{name}: {action} failed: {exc!r}")
                return {"ok": False, "error": f"{action} {name}: {exc}"}
        self.log(f"{name}: {action} -> {status}")
        return {"ok": True, "status": status}

    def serve_one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            buf = b""
            try:
                while not buf.endswith(b"\n") and len(buf) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                try:
                    req = json.loads(buf)
                except ValueError:
                    reply = {"ok": False, "error": "malformed request: one JSON object per line expected"}
                else:
                    reply = self.handle(req)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def run(self, sock_path: Path) -> None:
        sock_path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(sock_path))
        os.chmod(sock_path, 0o600)
        srv.listen(16)

        def stop(_sig: int, _frm: Any) -> None:
            self.stopping = True
            srv.close()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.log(f"supervisor listening on {sock_path}, hosts: {', '.join(self.hosts)}")
        for name in self.spec.get("power_on", []):
            reply = self.handle({"action": "on", "host": name})
            if not reply.get("ok"):
                self.log(f"{name}: power on at start failed: {reply.get('error')}")
        while not self.stopping:
            try:
                conn, _ = srv.accept()
            except OSError:
                break
            threading.Thread(target=self.serve_one, args=(conn,), daemon=True).start()
        self.log("supervisor stopping: killing every host init it started")
        for name in list(self.procs):
            try:
                self.off(name)
            except Exception as exc:
                self.log(f"{name}: off at stop failed: {exc!r}")
        sock_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="sipha lab supervisor (started by `sipha lab up`)")
    ap.add_argument("--spec", required=True, help="the lab's lab.json")
    ap.add_argument("--socket", default=str(SOCKET_PATH))
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    Supervisor(spec).run(Path(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
