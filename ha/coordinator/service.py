"""The coordinator service, minimal for now: the local UDP intake for the proxy's events, counted and checked.

What it does today, honestly: bind ``127.0.0.1:<proxy.event_port>``, hand each datagram to
:class:`ha.coordinator.events.Intake` (validation and per-proxy sequence tracking live there, once), count
the verdicts and log every gap (an event the proxy sent and we never saw: reconciliation must repair it) and
every proxy restart. It answers ``status`` on a unix socket so ``ocf:sipha:coordinator`` can tell a live
service from a hung one. What it does not do yet: write to ZooKeeper, watch peers, push into the local proxy
(ha.coordinator.store/replicator/apply exist; wiring them in is the replication issue); those land behind the
same intake and the same status answer.

One loop, one ``selectors`` wait; every branch logs one sentence saying what it just did, so the log alone
explains the service's behaviour (the Patroni habit the design notes ask for).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ha.coordinator.events import Intake, SeqStatus

log = logging.getLogger("sipha.coordinator")

DEFAULT_CONFIG = "/etc/sipha/cluster.yaml"
DEFAULT_PIDFILE = "/run/sipha/coordinator.pid"
DEFAULT_STATUS_SOCKET = "/run/sipha/coordinator.sock"
SUMMARY_EVERY_S = 5.0  # one counters line when they changed, instead of a line per event at 10k events/s


def event_port_from(config: str) -> int:
    """The intake port from the cluster model: read once through ha.model, never re-parsed here."""
    try:
        from ha import model
    except ImportError as exc:  # the system python has no pydantic: the agent then passes --event-port
        raise SystemExit(f"cannot read {config}: ha.model needs pydantic ({exc}); pass --event-port") from None
    try:
        return model.load(config).proxy.event_port
    except model.ModelError as exc:
        raise SystemExit(str(exc)) from None


def query_status(path: str, timeout: float = 1.0) -> dict[str, Any]:
    """Ask a running service for its status (what the OCF agent's monitor does); raises OSError/ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"status\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError("status reply is not a JSON object")
    return reply


class _Stop(Exception):
    """SIGTERM/SIGINT arrived."""


def _raise_stop(*_: object) -> None:
    raise _Stop


class Service:
    def __init__(self, bind: str, port: int, pidfile: str, status_socket: str) -> None:
        self.bind, self.port, self.pidfile, self.status_socket = bind, port, pidfile, status_socket
        self.intake = Intake(log_every=100)
        self._last_summary: dict[str, Any] = {}
        self.started = time.monotonic()

    def _open(self) -> tuple[socket.socket, socket.socket]:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        udp.bind((self.bind, self.port))
        Path(self.status_socket).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.status_socket)  # a stale socket of a dead instance; the agent checked none is alive
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(self.status_socket)
        ctl.listen(8)
        return udp, ctl

    def counters(self) -> dict[str, Any]:
        t = self.intake.tracker
        return {
            "events": self.intake.accepted,
            "rejected": dict(self.intake.rejected),
            "gaps": t.gaps,
            "lost": t.lost,
            "duplicates": t.duplicates,
            "restarts": t.restarts,
        }

    def _receive(self, udp: socket.socket) -> None:
        for _ in range(256):  # drain a burst, bounded so status queries are not starved
            try:
                data, peer = udp.recvfrom(65535, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            got = self.intake.feed(data, f"{peer[0]}:{peer[1]}")
            if got is None:
                continue  # the intake counted and (rate-limited) logged why
            ev, seq = got.event, got.seq
            if seq.status is SeqStatus.FIRST:
                log.info("first event from proxy %s: %s seq %d", ev.node, ev.type, ev.seq)
            else:
                log.debug("event %s from proxy %s seq %d (%s)", ev.type, ev.node, ev.seq, seq.status.value)

    def _summary(self) -> None:
        now = self.counters()
        if now != self._last_summary:
            self._last_summary = now
            log.info("%d events so far: %d gaps (%d lost), %d restarts, rejected %s", now["events"], now["gaps"],
                     now["lost"], now["restarts"], now["rejected"] or "none")

    def _answer(self, ctl: socket.socket) -> None:
        conn, _ = ctl.accept()
        with conn:
            conn.settimeout(0.5)
            with contextlib.suppress(OSError):
                conn.recv(256)  # "status\n"; one request per connection
                body = {
                    "ok": True,
                    "pid": os.getpid(),
                    "intake": f"udp:{self.bind}:{self.port}",
                    "uptime_s": round(time.monotonic() - self.started, 3),
                    "replication": "not yet (events are counted and checked only)",
                    **self.counters(),
                }
                conn.sendall(json.dumps(body).encode() + b"\n")

    def run(self) -> int:
        try:
            udp, ctl = self._open()
        except OSError as exc:
            log.error("cannot bind the intake udp:%s:%s or %s: %s", self.bind, self.port, self.status_socket,
                      exc.strerror or exc)
            return 1
        Path(self.pidfile).parent.mkdir(parents=True, exist_ok=True)
        Path(self.pidfile).write_text(f"{os.getpid()}\n")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise_stop)  # raising (not a flag) interrupts the select at once: fast stop
        sel = selectors.DefaultSelector()
        sel.register(udp, selectors.EVENT_READ, "udp")
        sel.register(ctl, selectors.EVENT_READ, "ctl")
        next_summary = time.monotonic() + SUMMARY_EVERY_S
        log.info("listening for proxy events on udp:%s:%s, status on %s", self.bind, self.port, self.status_socket)
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "udp":
                        self._receive(udp)
                    else:
                        self._answer(ctl)
                if time.monotonic() >= next_summary:
                    self._summary()
                    next_summary = time.monotonic() + SUMMARY_EVERY_S
        except _Stop:
            pass
        finally:
            log.info("stopping after %d events (rejected %s)", self.intake.accepted, dict(self.intake.rejected))
            sel.close()
            udp.close()
            ctl.close()
            with contextlib.suppress(OSError):
                os.unlink(self.status_socket)
            with contextlib.suppress(OSError):
                if Path(self.pidfile).read_text().strip() == str(os.getpid()):
                    os.unlink(self.pidfile)
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ha.coordinator", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="cluster.yaml (for proxy.event_port)")
    p.add_argument("--event-port", type=int, help="intake port; overrides the model's proxy.event_port")
    p.add_argument("--bind", default="127.0.0.1", help="intake address (events come from the local proxy)")
    p.add_argument("--pidfile", default=DEFAULT_PIDFILE)
    p.add_argument("--status-socket", default=DEFAULT_STATUS_SOCKET)
    p.add_argument("--status", action="store_true", help="query a running service and print its status")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s sipha-coordinator[%(process)d] %(levelname)s %(message)s")
    if args.status:
        try:
            print(json.dumps(query_status(args.status_socket), indent=2))
        except (OSError, ValueError) as exc:
            print(f"coordinator at {args.status_socket} does not answer: {exc}", file=sys.stderr)
            return 1
        return 0
    port = args.event_port if args.event_port is not None else event_port_from(args.config)
    if not 1 <= port <= 65535:
        p.error(f"event port {port} out of range 1-65535")
    return Service(args.bind, port, args.pidfile, args.status_socket).run()
