"""The coordinator service: proxy events in, ZooKeeper out, peers' bindings into the local proxy.

One loop, one ``selectors`` wait (1 s at most), from one thread (the status socket has its own, see
``_serve_status``):

* the local UDP intake (``127.0.0.1:<proxy.event_port>``): each datagram goes to
  :meth:`Replication.feed` (validated, sequence-checked, queued when this node is active); when
  :meth:`Replication.flush_due` says so (a full transaction's worth, or zookeeper.write_linger_ms after the first
  event) one :meth:`Replication.flush` writes the batch to ZooKeeper (journaled while it has no quorum);
* once a second :meth:`Replication.tick` (start once ZooKeeper answers, journal replay, resync retries,
  reconciliation after a gap, GC) and the role check (below);
* ``status`` on a unix socket, so ``ocf:sipha:coordinator`` can tell a live service from a hung one; and
  ``materialize`` on the same socket, from ``ocf:sipha:proxy``'s start: the proxy's preload table written from
  the coordinator's view (the restart fast path, :mod:`ha.coordinator.materialize`), answered with JSON
  (``ok``, ``bindings``, ``path``; or ``error`` and ``pending``: ask again shortly, the store is being read).

Every branch logs one sentence saying what it just did, so the log alone explains the service (Patroni).

Role: **a node is active while one of the model's VIPs is on one of its interfaces** (a netlink dump,
``ha.netaddr``, once a second). Why the VIP and not a command from an agent: the VIP is exactly where the phones'
REGISTERs arrive, so "the node whose proxy sees the REGISTERs writes them" holds by construction, with no
CIB change, no extra resource and no ordering between agents to get wrong; a node that loses the VIP stops
writing within a second, and one that was partitioned but still holds it is fenced by the epoch the new
active bumped. Promotion bumps the epoch and schedules a reconciliation (events the proxy sent before the
promotion were not written).

Readiness (the gate of ``ha.health``: the file ``/run/sipha/ready``): absent while the local proxy is not
known to hold the store's state. At start the file is removed and the full state loaded into the proxy
(resync) before it is written again, with one exception: on the **active** node whose proxy has not
restarted since the file was written (its boot time, recorded in the file, is unchanged), the proxy still
holds everything, and removing readiness there would make Pacemaker move the VIP away for nothing on a mere
coordinator restart. A proxy restart seen later (its event sequence restarts, or its boot time changes)
removes the file until the resync of its new, empty table completes. On a clean stop of a standby the file is
removed too: nobody keeps that proxy in step any more. The proxy agent's start removes the file too (the
restart fast path): a readiness file that disappears while it was given is read as "the proxy is being
restarted", which is noticed on the next pass instead of by the 2 s boot-time poll.

While readiness is withheld the loop ticks every :data:`FAST_TICK_S` instead of every second, so readiness
follows the resync's completion (and a resync retry follows the proxy's first answer) within ~0.1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ha.coordinator.gcpause import Freezer, FullCollections
from ha.coordinator.replication import DEFAULT_JOURNAL, SHED_BEHIND_S, Replication
from ha.coordinator.store import StaleEpoch, StoreUnavailable
from ha.netaddr import ipv4_addresses
from ha.unixline import exchange

log = logging.getLogger("sipha.coordinator")

DEFAULT_CONFIG = "/etc/sipha/cluster.yaml"
DEFAULT_PIDFILE = "/run/sipha/coordinator.pid"
DEFAULT_STATUS_SOCKET = "/run/sipha/coordinator.sock"
DEFAULT_READY_FILE = "/run/sipha/ready"  # ha.health.service.DEFAULT_READY_FILE (a test keeps them equal)
DEFAULT_RUN_DIR = "/run/sipha"
# Its log lines (the replication bench reads the summaries from the log file: bench/coordinator_replication.py)
LOG_FORMAT = "%(asctime)s sipha-coordinator[%(process)d] %(levelname)s %(message)s"
GC_FREEZE_EVERY_S = 5.0  # see ha.coordinator.gcpause.Freezer
GC_THAW_EVERY_S = 3600.0
SUMMARY_EVERY_S = 5.0  # one counters line when they changed, instead of a line per event at 10k events/s
TICK_S = 1.0
FAST_TICK_S = 0.1  # while readiness is withheld: the moment the proxy answers and the resync is done counts
BOOT_SLACK_S = 2  # the proxy's boot time is derived from whole seconds of uptime
STUCK_CHECK_S = 0.25  # how often the watchdog looks at a loop that is not waiting in select (Service._watch_stuck)
# How full the intake's receive buffer may get while the loop is held before the watchdog sheds. Why the fill and
# not the hold alone: a write waits the same way on a ZooKeeper starved of CPU (a storm: shed, or the buffer
# overflows and events are lost) and on one that stopped answering (an outage, served fail static: kazoo gives
# up after up to ~13 s in the lab and the events are journaled). At the lab's outage test rate (200/s) 13 s of
# events fill ~6 MB of the 64 MB; a storm fills a quarter in 2-3 s.
STUCK_FILL = 0.25
SO_MEMINFO = 55  # Linux getsockopt: rmem_alloc, rcvbuf, then 7 more counters (the last: drops)


def intake_fill(sock: socket.socket) -> float:
    """How full ``sock``'s receive buffer is (0-1; 0 when the kernel cannot tell)."""
    import struct

    try:
        rmem, rcvbuf = struct.unpack_from("2I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))
    except (OSError, struct.error):
        return 0.0
    return rmem / rcvbuf if rcvbuf else 0.0


def vip_check(vips: Iterable[str], addresses: Callable[[], set[str]] = ipv4_addresses) -> Callable[[], bool | None]:
    """A role check: True while a VIP is local, False when none is, None when it cannot tell (keep the role).
    Asked every second on the loop: a netlink dump (``ha.netaddr``), not ``ip -j addr``, whose fork and exec held
    every event of that moment back for 5-30 ms under load. ``addresses`` raises OSError when it cannot tell."""
    wanted = set(vips)

    def check() -> bool | None:
        try:
            return bool(wanted & addresses())
        except OSError:
            return None

    return check


def query_status(path: str, timeout: float = 1.0) -> dict[str, Any]:
    """Ask a running service for its status (what the OCF agent's monitor does); raises OSError/ValueError."""
    buf = exchange(path, b"status\n", timeout)
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError("status reply is not a JSON object")
    return reply


INTAKE_RCVBUF = 64 * 1024 * 1024
SLOW_TICK_S = 0.2
SLOW_FLUSH_S = 1.0  # a write that holds the loop this long is logged (back-pressure reads the intake's age)


def _deep_receive_buffer(udp: socket.socket) -> None:
    """A receive buffer that holds seconds of events, not one: a datagram costs ~2.3 KB of buffer (its skb), so
    the 4 MB rmem_max allows (8 MB after the kernel's doubling) held ~1 s of a flood's events; every longer
    stall of the loop (a flush waiting on ZooKeeper, the CPU shared with a flooded proxy) lost events, and each
    loss cost a full reconciliation (the lab's overload: 600-35,000 events lost per run). SO_RCVBUFFORCE (root,
    as the service runs) passes rmem_max; the memory is taken only while a backlog is queued."""
    try:  # Python does not name it; Linux's value is 33 on every architecture but parisc/sparc/alpha/mips
        udp.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), INTAKE_RCVBUF // 2)  # doubled
    except OSError:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, INTAKE_RCVBUF // 2)


class _Stop(BaseException):
    """SIGTERM/SIGINT arrived. A BaseException: the handler raises it wherever the loop is, and the loop's
    ``except Exception`` guards around tick/role work must not swallow it (a stop during a long reconcile was
    logged as "tick failed" and ignored until Pacemaker's SIGKILL)."""


def _raise_stop(*_: object) -> None:
    raise _Stop


class Service:
    def __init__(
        self,
        bind: str,
        port: int,
        pidfile: str,
        status_socket: str,
        repl: Replication,
        *,
        ready_file: str | Path | None = DEFAULT_READY_FILE,
        role: Callable[[], bool | None] | None = None,
        intake: socket.socket | None = None,
    ) -> None:
        self.bind, self.port, self.pidfile, self.status_socket = bind, port, pidfile, status_socket
        self.repl = repl
        self.ready_file = Path(ready_file) if ready_file else None
        self.role = role  # None: never active (a node without VIPs, or --active never)
        self._udp_given = intake  # a pre-made intake socket (tests create it inside a network namespace)
        self.ready_given = False
        self._generation = 0
        self._last_summary: dict[str, Any] = {}
        self.started = time.monotonic()
        self._wake_r, self._wake_w = socket.socketpair()
        self._materialize_q: queue.Queue[socket.socket] = queue.Queue()  # from the status thread to the loop
        self._loop_seen = time.monotonic()  # the loop's last pass (the status thread reports its age)
        self._busy_since: float | None = None  # when the loop left select (None: waiting in it); _watch_stuck
        self._flush_at: float | None = None  # when pending events are due to be written (Replication.flush_due)
        self._serving = threading.Event()
        self._full_gcs = FullCollections()  # installed while run() runs
        self._freezer: Freezer | None = None  # made by run()
        if repl.replicator is not None:
            repl.replicator.on_synced = self._wake

    # -- readiness -------------------------------------------------------------------------------------------

    @property
    def _loaded_file(self) -> Path | None:
        """Which proxy instance (boot time) was last fully loaded; outlives a withdrawn readiness file, so a
        restarted standby coordinator knows its proxy still holds its own bindings (no ul.add over them)."""
        return self.ready_file.with_name(self.ready_file.name + ".loaded") if self.ready_file else None

    def _loaded_boot(self) -> int | None:
        for f in (self._loaded_file, self.ready_file):
            if f is None:
                continue
            try:
                d = json.loads(f.read_text() or "{}")
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and isinstance(d.get("proxy_boot"), int):
                return int(d["proxy_boot"])
        return None

    def _drop_ready(self, why: str) -> None:
        if self.ready_file is not None and self.ready_file.exists():
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
            log.info("readiness withdrawn (%s removed): %s", self.ready_file, why)
        self.ready_given = False

    def _give_ready(self) -> None:
        self.ready_given = True
        if self.ready_file is None:
            return
        if self.repl.proxy_boot is None and self.repl.proxy_boot_fn is not None:
            # A signalled restart cleared it and the resync did not need the retry that sets it: the file must
            # name the proxy it vouches for (a coordinator restart compares it with the running one).
            self.repl.proxy_boot = self.repl.proxy_boot_fn()
        st = self.repl.status()
        body = {"node": self.repl.node, "proxy_boot": self.repl.proxy_boot, "resync_ms": st["resync_ms"],
                "bindings": st["resync_bindings"], "ts": int(time.time())}
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ready_file.with_name(f".{self.ready_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(body) + "\n")
        if self._loaded_file is not None:
            with contextlib.suppress(OSError):
                self._loaded_file.write_text(json.dumps(body) + "\n")
        tmp.replace(self.ready_file)  # atomic: the health service never sees a half-written file
        log.info("resync complete (%s bindings in %s ms): readiness given, %s written", body["bindings"],
                 body["resync_ms"], self.ready_file)

    def _startup_readiness(self) -> None:
        """Keep readiness only on the active node whose proxy has not restarted since it was given (see top)."""
        boot = self.repl.proxy_boot_fn() if self.repl.proxy_boot_fn else None
        self.repl.proxy_boot = boot
        prev = self._loaded_boot()
        had_ready = self.ready_file is not None and self.ready_file.exists()
        same_proxy = prev is not None and boot is not None and abs(prev - boot) <= BOOT_SLACK_S
        active = bool(self.role and self.role())
        # A proxy that restarted since (or is not up yet) has an empty table: it needs this node's bindings too.
        self.repl.include_own_first = not same_proxy
        if same_proxy and active and had_ready:
            self.ready_given = True
            log.info("active node, proxy unchanged since readiness was given (boot %s): readiness kept while "
                     "peers' changes are resynced", boot)
        else:
            why = "proxy not answering yet" if boot is None else (
                "proxy restarted since its last resync" if not same_proxy else "standby start")
            self._drop_ready(f"resync first ({why})")
            if not had_ready:
                log.info("readiness absent until the resync completes (%s)", why)

    def _readiness(self) -> None:
        if self.ready_given and self.ready_file is not None and not self.ready_file.exists():
            # Removed by someone else: the proxy agent's start (the proxy is being restarted). Its new table is
            # resynced once it answers.
            self._proxy_starting("readiness file removed: the proxy is (re)starting")
            return
        if self.repl.proxy_generation != self._generation:
            self._generation = self.repl.proxy_generation
            self._drop_ready("the local proxy restarted: its table is resynced first")
        if not self.ready_given and self.repl.ready:
            self._give_ready()

    # -- role ------------------------------------------------------------------------------------------------

    def _check_role(self) -> None:
        if not self.repl.started:
            return
        want = self.role() if self.role else False
        if want is None:
            return
        try:
            if want and not self.repl.active:
                log.info("a VIP is local: taking over; %s", self.repl.promote())
            elif not want and self.repl.active:
                log.info("no VIP is local any more: %s", self.repl.demote())
        except StoreUnavailable as exc:
            log.warning("a VIP is local but the epoch cannot be bumped yet (%s): retrying next second", exc)

    # -- the loop --------------------------------------------------------------------------------------------

    def _open(self) -> tuple[socket.socket, socket.socket]:
        if self._udp_given is not None:
            udp = self._udp_given
        else:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            _deep_receive_buffer(udp)
            udp.bind((self.bind, self.port))
        Path(self.status_socket).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.status_socket)  # a stale socket of a dead instance; the agent checked none is alive
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound beside its path, given its owner and mode, then renamed into place: it never appears with the
        # umask's mode (a test saw 0755 between bind and chmod).
        staging = f"{self.status_socket}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        ctl.bind(staging)
        # Readable by the run directory's group: the health service (a sipha user when installed from source, its
        # systemd RuntimeDirectory's group) reads the replication status here; connecting needs write permission.
        with contextlib.suppress(OSError):
            os.chown(staging, -1, os.stat(Path(self.status_socket).parent).st_gid)
        os.chmod(staging, 0o660)
        ctl.listen(8)
        os.replace(staging, self.status_socket)
        return udp, ctl

    def counters(self) -> dict[str, Any]:
        intake = self.repl.intake
        t = intake.tracker
        return {
            "events": intake.accepted,
            "rejected": dict(intake.rejected),
            "gaps": t.gaps,
            "lost": t.lost,
            "duplicates": t.duplicates,
            "restarts": t.restarts,
        }

    def _receive(self, udp: socket.socket) -> None:
        got = 0
        for _ in range(1024):  # drain a burst (one batched write each), bounded so the loop still ticks
            try:
                data, peer = udp.recvfrom(65535, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.repl.intake_empty()  # caught up: whatever the age of what it just took
                break
            got += 1
            m = self.repl.feed(data, f"{peer[0]}:{peer[1]}")
            if m is not None:
                log.warning("%s", m)
        if got:
            self._flush_due()
        self._pace()

    def _pace(self) -> None:
        m = self.repl.pace()
        if m is not None:
            (log.info if m.startswith("intake caught up") else log.warning)("%s", m)

    def _flush_due(self) -> None:
        """Flush when Replication.flush_due says so; otherwise remember when (the loop's select wakes for it)."""
        due = self.repl.flush_due()
        if due is not None and due <= time.monotonic():
            n, t0 = len(self.repl.pending), time.monotonic()
            m = self.repl.flush()
            if m is not None:
                (log.warning if m.startswith(("FENCED", "DROPPED", "zookeeper")) else log.debug)("%s", m)
            took = time.monotonic() - t0
            if took > SLOW_FLUSH_S:  # the loop takes no events meanwhile, and the proxy's pile up in the socket
                log.warning("slow write: %.0f ms on the loop for %d events", took * 1000, n)
            due = self.repl.flush_due()
        self._flush_at = due

    def _summary(self) -> None:
        if self.repl.replicator is not None:
            said = self.repl.replicator.window()
            if said:
                log.info("%s", said)
        n, longest = self._full_gcs.take()
        if n:
            log.info("garbage collector: %d full collection%s, the longest %.0f ms", n, "s" if n > 1 else "",
                     longest * 1000)
        now = {**self.counters(), "active": self.repl.active, "ready": self.ready_given}
        if now != self._last_summary:
            self._last_summary = now
            late = self.repl.intake.late_age_ms
            log.info("%d events so far: %d gaps (%d lost), %d restarts, rejected %s; %s%s, %s", now["events"],
                     now["gaps"], now["lost"], now["restarts"], now["rejected"] or "none",
                     f"the most late a reordered event came: {late} ms; " if late else "",
                     "active" if now["active"] else "standby", "ready" if now["ready"] else "NOT ready")

    def _materialize(self) -> dict[str, Any]:
        """The proxy agent is about to start the proxy: write its preload table, and treat it as the proxy's
        restart at once (readiness withdrawn, its resync applied as soon as it answers)."""
        from ha.coordinator.materialize import MaterializeError

        try:
            out = self.repl.materialize()
        except MaterializeError as exc:
            return {"ok": False, "error": str(exc), "pending": self.repl.materialize_pending}
        self._proxy_starting("the proxy agent is starting the proxy (preload table written)")
        return out

    def _proxy_starting(self, why: str) -> None:
        self.repl.proxy_boot = None  # the boot check must not count this restart a second time
        log.info("%s", self.repl.proxy_restarted(why))
        self._generation = self.repl.proxy_generation
        self._drop_ready(why)

    def _serve_status(self, ctl: socket.socket) -> None:
        """The status socket's own thread. Why not the loop: under overload the loop spends seconds in a flush or
        a reconciliation chunk, the agent's 1 s monitor failed, and Pacemaker restarted a coordinator that was
        only busy, losing its events. Here ``status`` is answered at once, with ``loop_age_s`` (the loop's last
        pass) so the agent still tells a hung loop from a busy one. ``materialize`` changes the loop's state:
        the connection is handed to the loop."""
        ctl.settimeout(0.5)
        while self._serving.is_set():
            try:
                conn, _ = ctl.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed: the service is stopping
            try:
                conn.settimeout(0.5)
                req = conn.recv(256)  # "status\n" or "materialize\n"; one request per connection
                if req.strip() == b"materialize":  # the proxy agent's start: write the preload table
                    self._materialize_q.put(conn)
                    self._wake_w.send(b"m")
                    continue  # the loop answers and closes it
                conn.sendall(json.dumps(self._status_body()).encode() + b"\n")
            except OSError:
                pass
            except Exception:  # a bug must not end the thread: the monitor would fail and restart us
                log.exception("status request failed")
            conn.close()

    def _status_body(self) -> dict[str, Any]:
        for _ in range(5):  # read from another thread: a dict the loop changes meanwhile raises RuntimeError
            try:
                return {
                    "ok": True,
                    "pid": os.getpid(),
                    "node": self.repl.node,
                    "intake": f"udp:{self.bind}:{self.port}",
                    "uptime_s": round(time.monotonic() - self.started, 3),
                    "loop_age_s": round(time.monotonic() - self._loop_seen, 3),
                    "ready": self.ready_given,
                    "ready_file": str(self.ready_file) if self.ready_file else None,
                    "replication": self.repl.status(),
                    **self.counters(),
                }
            except RuntimeError:
                time.sleep(0.001)
        raise RuntimeError("status changed under every read")

    def _answer_materialize(self) -> None:
        while True:
            try:
                conn = self._materialize_q.get_nowait()
            except queue.Empty:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(json.dumps(self._materialize()).encode() + b"\n")

    def _tick(self) -> None:
        t0 = time.monotonic()
        try:
            m = self.repl.tick()
        except StaleEpoch as exc:  # belt and braces: tick absorbs it, a fenced writer must never crash the loop
            m = f"FENCED: {exc}"
        except Exception:  # a bug or an unexpected ZooKeeper reply: log it, keep taking events, try next second
            log.exception("tick failed; trying again in %.0f s", TICK_S)
            m = None
        if m:
            log.info("%s", m)
        took = time.monotonic() - t0
        if took > SLOW_TICK_S:  # every event waits meanwhile: where a replication lag tail comes from
            log.info("slow tick: %.0f ms on the loop", took * 1000)
        try:
            self._check_role()
        except Exception:
            log.exception("role check failed; trying again in %.0f s", TICK_S)
        self._readiness()

    def _wake(self) -> None:
        """From the watch thread: a resync completed; the loop gives readiness without waiting for a tick."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"r")

    def _watch_stuck(self, udp: socket.socket, stop: threading.Event) -> None:
        """Shed while the loop is held (not in select) for SHED_BEHIND_S and the intake's buffer is STUCK_FILL full
        (Replication.pace_stuck). Bounded: ends with the loop (``stop``), or after ~25 years of checks."""
        for _ in range(int(25 * 365 * 86400 / STUCK_CHECK_S)):
            if stop.wait(STUCK_CHECK_S):
                return
            since = self._busy_since
            if since is None or time.monotonic() - since < SHED_BEHIND_S or intake_fill(udp) < STUCK_FILL:
                continue
            try:
                m = self.repl.pace_stuck(time.monotonic() - since)
            except Exception as exc:  # the watchdog must outlive any one failure
                log.error("stuck-loop watchdog: %r", exc)
                continue
            if m is not None:
                log.warning("%s", m)

    def stop(self) -> None:
        """Ask a running loop (in another thread) to end."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> int:
        try:
            udp, ctl = self._open()
        except OSError as exc:
            log.error("cannot bind the intake udp:%s:%s or %s: %s", self.bind, self.port, self.status_socket,
                      exc.strerror or exc)
            return 1
        Path(self.pidfile).parent.mkdir(parents=True, exist_ok=True)
        Path(self.pidfile).write_text(f"{os.getpid()}\n")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, _raise_stop)  # raising (not a flag) interrupts the select at once: fast stop
        sel = selectors.DefaultSelector()
        sel.register(udp, selectors.EVENT_READ, "udp")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        self._serving.set()
        status_thread = threading.Thread(target=self._serve_status, args=(ctl,), name="sipha-status", daemon=True)
        status_thread.start()
        stuck_stop = threading.Event()
        threading.Thread(target=self._watch_stuck, args=(udp, stuck_stop), name="sipha-stuck", daemon=True).start()
        log.info("node %s: listening for proxy events on udp:%s:%s, status on %s, readiness file %s",
                 self.repl.node, self.bind, self.port, self.status_socket, self.ready_file)
        try:
            self._startup_readiness()
            self._full_gcs.install()
            freezer = self._freezer = Freezer(GC_FREEZE_EVERY_S, GC_THAW_EVERY_S, time.monotonic())
            next_summary = time.monotonic() + SUMMARY_EVERY_S
            last_tick = -TICK_S
            while True:
                next_tick = last_tick + (TICK_S if self.ready_given else FAST_TICK_S)  # readiness can change any time
                wake = next_tick if self._flush_at is None else min(next_tick, self._flush_at)
                self._busy_since = None
                ready = sel.select(timeout=max(0.0, wake - time.monotonic()))
                self._busy_since = time.monotonic()
                for key, _ in ready:
                    if key.data == "udp":
                        self._receive(udp)
                    else:
                        woke = self._wake_r.recv(64)  # x: stop; m: a materialize request; r: a resync completed
                        if b"x" in woke:
                            raise _Stop
                        self._answer_materialize()
                self._loop_seen = time.monotonic()
                if self._flush_at is not None and self._loop_seen >= self._flush_at:
                    self._flush_due()
                if not self.ready_given:
                    self._readiness()  # at once, not at the next tick: readiness is what a restart waits for
                now = time.monotonic()
                if now >= last_tick + (TICK_S if self.ready_given else FAST_TICK_S):
                    last_tick = now
                    self._tick()
                    self._flush_due()  # a promotion may have queued events (carried over) without new ones
                    self._pace()  # a spell ends here when nothing comes in at all
                if now >= next_summary:
                    self._summary()
                    next_summary = now + SUMMARY_EVERY_S
                freezer.tick(now)
        except _Stop:
            pass
        finally:
            stuck_stop.set()
            self._full_gcs.uninstall()
            if self._freezer is not None:
                self._freezer.stop()
            log.info("stopping after %d events (rejected %s)", self.repl.intake.accepted,
                     dict(self.repl.intake.rejected))
            with contextlib.suppress(Exception):
                m = self.repl.flush()
                if m:
                    log.info("last flush: %s", m)
            if not self.repl.active:
                self._drop_ready("standby coordinator stopping: nobody keeps this proxy in step")
            self._serving.clear()
            status_thread.join(2)
            self.repl.close()
            sel.close()
            udp.close()
            ctl.close()
            self._wake_r.close()
            self._wake_w.close()
            with contextlib.suppress(OSError):
                os.unlink(self.status_socket)
            with contextlib.suppress(OSError):
                if Path(self.pidfile).read_text().strip() == str(os.getpid()):
                    os.unlink(self.pidfile)
        return 0


# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms). The coordinator's
# latency-bound threads (intake, writer, the watch: send a request, wait, take the reply) share it with bulk
# readers (the standby audit, GC, reconciliation: MBs of ZooKeeper replies and JSON parsed). Every blocking call
# of the former then waited for a whole interval to get the GIL back: a UDP round trip took 5.25 ms instead of
# 0.014 ms next to a parsing thread (0.23 ms at 0.5 ms). In the replication bench the standby's watch fell ~2 s
# behind during each audit (lag p99 0.9 s at 1000/s).
GIL_SWITCH_S = 0.0005


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ha.coordinator", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="cluster.yaml (ZooKeeper members, VIPs, event port)")
    p.add_argument("--node", default=os.uname().nodename.split(".")[0],
                   help="this node's name in the model (default: the short hostname, as crm_node -n)")
    p.add_argument("--event-port", type=int, help="intake port; overrides the model's proxy.event_port")
    p.add_argument("--bind", default="127.0.0.1", help="intake address (events come from the local proxy)")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="Kamailio's run dir (its JSON-RPC socket and FIFO)")
    p.add_argument("--journal", default=DEFAULT_JOURNAL, help="on-disk journal for events ZooKeeper cannot take")
    p.add_argument("--ready-file", default=DEFAULT_READY_FILE, help="readiness file the health service waits on")
    p.add_argument("--zk-hosts", help="ZooKeeper connect string; overrides the model's members")
    p.add_argument("--active", choices=("auto", "always", "never"), default="auto",
                   help="auto: active while a VIP of the model is local (default)")
    p.add_argument("--pidfile", default=DEFAULT_PIDFILE)
    p.add_argument("--status-socket", default=DEFAULT_STATUS_SOCKET)
    p.add_argument("--status", action="store_true", help="query a running service and print its status")
    args = p.parse_args(argv)
    sys.setswitchinterval(GIL_SWITCH_S)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    if args.status:
        try:
            print(json.dumps(query_status(args.status_socket), indent=2))
        except (OSError, ValueError) as exc:
            print(f"coordinator at {args.status_socket} does not answer: {exc}", file=sys.stderr)
            return 1
        return 0
    from ha import model
    from ha.proxy import kamailio

    try:
        cluster = model.load(args.config)
    except model.ModelError as exc:
        raise SystemExit(str(exc)) from None
    names = [n.name for n in cluster.nodes]
    if args.node not in names:  # not fatal: the name only stamps this node's writes; but say it loudly
        log.warning("--node %r is not a node of %s (%s): its writes are stamped with that name anyway",
                    args.node, cluster.name, ", ".join(names))
    port = args.event_port if args.event_port is not None else cluster.proxy.event_port
    if not 1 <= port <= 65535:
        p.error(f"event port {port} out of range 1-65535")
    role: Callable[[], bool | None] | None
    if args.active == "auto":
        role = vip_check(v.ip for v in cluster.vips)
    else:
        role = (lambda: True) if args.active == "always" else None
    from ha.coordinator.zkauth import ZkAuthError

    try:
        repl = Replication.from_model(cluster, args.node, journal_path=args.journal,
                                      rpc_socket=kamailio.rpc_socket(args.run_dir), hosts=args.zk_hosts)
    except ZkAuthError as exc:
        raise SystemExit(str(exc)) from None
    return Service(args.bind, port, args.pidfile, args.status_socket, repl, ready_file=args.ready_file,
                   role=role).run()
