"""Shared parts of the replication benchmark (bench/coordinator_replication.py): a REGISTER sender in its own
process, a sampler of contact counts, a marker tracker that times when a binding first shows up on the standby.

Why a separate sender process: at 10-15k REGISTER/s the sender's own Python would otherwise share the GIL with
the sampler and the marker poller, and the markers' 200 OK times (taken by the sender's receive thread) would
be late by whatever the poller was doing. The sender is forked before any thread of the bench starts.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the machine), so a marker's
200 OK time taken in the sender process and its first sighting taken in the bench process compare directly.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ha.proxy import kamailio

MARK = "mk"  # marker AoRs: mk<step>x<n>; their Call-ID is c-<aor>


# ------------------------------------------------------------------------------------------------ sender


def register(user: str, domain: str, me: tuple[str, int], cseq: int = 1, expires: int = 3600) -> bytes:
    """One REGISTER for ``user``, one binding ``sip:user@me``; no authentication (neither proxy asks)."""
    host = f"{me[0]}:{me[1]}"
    return (f"REGISTER sip:{domain} SIP/2.0\r\nVia: SIP/2.0/UDP {host};branch=z9hG4bK{user}c{cseq};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{user}@{domain}>;tag={user}\r\nTo: <sip:{user}@{domain}>\r\n"
            f"Call-ID: c-{user}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{user}@{host}>\r\n"
            f"Expires: {expires}\r\nUser-Agent: sipha-replbench\r\nContent-Length: 0\r\n\r\n").encode()


def _marker_of(data: bytes) -> str | None:
    i = data.find(b"Call-ID: c-" + MARK.encode())
    if i < 0:
        return None
    j = data.find(b"\r\n", i)
    return data[i + len(b"Call-ID: c-"):j].decode(errors="replace")


def _sender_main(conn: Connection, markers: Any, local: tuple[str, int], target: tuple[str, int],
                 domain: str) -> None:  # fmt: skip
    """The sender process: one UDP socket; a receive thread counts 200s and reports markers' 200 OK times."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind(local)
    sock.settimeout(0.2)
    me = sock.getsockname()
    counts = {"ok": 0, "other": 0}
    codes: dict[str, int] = {}  # status codes other than 1xx and 200, over the process's life
    stop = threading.Event()

    def rx() -> None:
        while not stop.is_set():
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            t = time.monotonic()
            if data.startswith(b"SIP/2.0 200"):
                counts["ok"] += 1
                m = _marker_of(data)
                if m is not None:
                    markers.put((m, t))
            elif not data.startswith(b"SIP/2.0 1"):
                counts["other"] += 1
                code = data[8:11].decode(errors="replace")
                codes[code] = codes.get(code, 0) + 1

    th = threading.Thread(target=rx, daemon=True)
    th.start()
    try:
        while True:
            msg = conn.recv()
            if msg[0] != "step":
                break
            _tag, prefix, rate, seconds, marker_rate, mprefix, max_sends = msg
            ok0, other0 = counts["ok"], counts["other"]
            sent = msent = 0
            t0 = time.monotonic()
            deadline = t0 + seconds
            next_m = t0 + (1 / marker_rate if marker_rate else math.inf)
            t_last = t0
            while True:
                now = time.monotonic()
                if now >= deadline or sent >= max_sends:
                    break
                due = min(max_sends, int((now - t0) * rate) + 1)
                while sent < due:
                    sock.sendto(register(f"{prefix}{sent:06d}", domain, me), target)
                    sent += 1
                while next_m <= now:
                    sock.sendto(register(f"{mprefix}{msent:05d}", domain, me), target)
                    msent += 1
                    next_m += 1 / marker_rate
                t_last = time.monotonic()
                time.sleep(0.001)
            time.sleep(1.0)  # answers still on their way
            conn.send({"sent": sent, "markers_sent": msent, "t0": t0, "t_last": t_last, "local": list(me),
                       "ok": counts["ok"] - ok0, "other": counts["other"] - other0, "other_codes": dict(codes)})
    finally:
        stop.set()
        th.join(2)
        sock.close()
        conn.close()


class Sender:
    """REGISTERs from one UDP socket at a fixed rate, distinct AoRs (``<prefix><n>``), never waiting for
    answers; plus markers at ``marker_rate``/s whose 200 OK times go to :attr:`markers` as (aor, monotonic).
    Fork it before any thread starts (see the module's docstring)."""

    def __init__(self, local: tuple[str, int], target: tuple[str, int], domain: str) -> None:
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.markers: Any = ctx.Queue()
        self.proc = ctx.Process(target=_sender_main, args=(child, self.markers, local, target, domain), daemon=True)
        self.proc.start()
        child.close()

    def step(self, prefix: str, rate: float, seconds: float, marker_rate: float, mprefix: str,
             max_sends: int) -> dict[str, Any]:  # fmt: skip
        """Blocks for the step (+1 s for the last answers); what was sent and answered."""
        self._conn.send(("step", prefix, rate, seconds, marker_rate, mprefix, max_sends))
        if not self._conn.poll(seconds + 30):
            raise RuntimeError("the sender process did not report its step")
        return dict(self._conn.recv())

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(("quit",))
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()  # our own child, by its pid
            self.proc.join(5)


# ------------------------------------------------------------------------------------------------ reading


def rpc_tmpdir(base: str = "/var/tmp") -> str:
    """A reply directory for JSON-RPC clients that a lab node's Kamailio can also see.

    Kamailio answers a datagram to the client's socket *path*, resolved in its own mount namespace; a lab node
    has a private /tmp, so ``Rpc``'s default temp dir (under /tmp) would never get an answer. /var/tmp is
    shared. Returns the directory; the caller points ``tempfile.tempdir`` at it and removes it at the end."""
    import tempfile

    return tempfile.mkdtemp(prefix="sipha-replbench-", dir=base)


def location_contacts(rpc: kamailio.Rpc) -> int:
    for s in rpc.call("stats.get_statistics", "usrloc:"):
        if s.startswith("usrloc:location_contacts = "):
            return int(s.rsplit(" ", 1)[1])
    return -1


def shm_used(rpc: kamailio.Rpc) -> int:
    """Kamailio's shared memory in use (``core.shmmem`` real_used: with the allocator's overhead), bytes."""
    return int(rpc.call("core.shmmem")["real_used"])


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration, ValueError):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += int(next(ln for ln in status if ln.startswith("VmRSS")).split()[1])
    return total


def pids_matching(needle: str, netns: str | None = None) -> list[int]:
    """Processes whose command line contains ``needle`` (and, if given, in network namespace ``netns``)."""
    ino = os.stat(f"/run/netns/{netns}").st_ino if netns else None
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle.encode() not in Path(f"/proc/{d}/cmdline").read_bytes():
                continue
            if ino is not None and os.stat(f"/proc/{d}/ns/net").st_ino != ino:
                continue
            out.append(int(d))
    return out


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads), so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / tick


@dataclass
class Sample:
    t: float
    values: dict[str, int | None]


class Sampler:
    """Reads each probe (a count) every ``every`` seconds in a thread; ``samples`` keeps them all (bounded)."""

    def __init__(self, probes: dict[str, Callable[[], int]], every: float = 0.2, limit: int = 20000) -> None:
        self.probes = probes
        self.every = every
        self.limit = limit
        self.samples: list[Sample] = []
        self.errors: dict[str, str] = {}
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._th.start()

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set() and len(self.samples) < self.limit:
            t = time.monotonic()
            vals: dict[str, int | None] = {}
            for name, fn in self.probes.items():
                try:
                    vals[name] = fn()
                except Exception as exc:  # a busy proxy may time out once: a gap in the series, noted
                    vals[name] = None
                    self.errors[name] = repr(exc)[:200]
            self.samples.append(Sample(t, vals))
            nxt += self.every
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def at(self, t: float) -> Sample | None:
        """The last sample taken at or before ``t``."""
        best = None
        for s in self.samples:
            if s.t > t:
                break
            best = s
        return best

    def series(self, t0: float, every: float = 1.0) -> list[list[Any]]:
        """Downsampled: one row per ``every`` s from ``t0``, [seconds, value of each probe ...]."""
        out: list[list[Any]] = []
        nxt = t0
        for s in self.samples:
            if s.t >= nxt:
                out.append([round(s.t - t0, 1), *(s.values.get(k) for k in self.probes)])
                nxt = s.t + every
        return out

    def stop(self) -> None:
        self._stop.set()
        self._th.join(10)


@dataclass
class MarkerResult:
    aor: str
    lag_s: float
    mid_s: float | None  # to the intermediate store (sipha: ZooKeeper), when one is checked
    first_poll: bool  # already there at the first lookup (the lag is then at most one poll)
    queued_s: float  # from the 200 OK to the poller having it (the sender process's queue): the floor
    ok_at: float = 0.0  # the 200 OK's time (time.monotonic): whether the slowest markers came together


@dataclass
class Markers:
    """Times each marker from its 200 OK (sender) to its first ``ul.lookup`` hit on the standby.

    The oldest ``window`` outstanding markers are looked up every ``every`` s (one pipelined burst), all of them
    every ``every_all`` s; both intervals grow with the oldest marker's age (see ``_run``). When the standby is
    seconds behind, hundreds are outstanding, and looking all of them up every 5 ms would take the standby's one
    JSON-RPC worker (which also takes sipha's ``ul.add``) and this machine's CPU away from what is measured.

    ``mid``, when given, says for a list of marker AoRs which are already in the intermediate store (sipha:
    ZooKeeper); it is asked in the same cycles for the markers not seen there yet, which splits each lag in two.
    """

    rpc: kamailio.Rpc
    source: Any  # the sender's marker queue
    every: float = 0.005
    every_all: float = 0.1
    window: int = 8
    give_up_s: float = 60.0
    results: list[MarkerResult] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    polls: int = 0
    mid: Callable[[list[str]], list[bool]] | None = None
    _mid_seen: dict[str, float] = field(default_factory=dict)  # aor -> lag to the intermediate store
    _out: dict[str, tuple[float, bool]] = field(default_factory=dict)  # aor -> (200 OK time, looked up yet)
    _queued: dict[str, float] = field(default_factory=dict)  # aor -> how long it took to reach the poller
    _stop: threading.Event = field(default_factory=threading.Event)
    _th: threading.Thread | None = None

    def start(self) -> None:
        self._th = threading.Thread(target=self._run, name="markers", daemon=True)
        self._th.start()

    @property
    def outstanding(self) -> int:
        return len(self._out)

    def _run(self) -> None:
        last_all = 0.0
        every = self.every
        while not self._stop.is_set():
            t_cycle = time.monotonic()
            while True:
                try:
                    aor, t_ok = self.source.get_nowait()
                except queue.Empty:
                    break
                self._out[aor] = (t_ok, False)
                self._queued[aor] = time.monotonic() - t_ok
            every = self.every
            if self._out:
                # The resolution follows the lag: 5 ms while the oldest is young, up to 50 ms (and the sweep of all
                # of them up to 0.5 s) when the standby is seconds behind; ~5 % of the lag either way.
                age = t_cycle - min(t for t, _ in self._out.values())
                every = max(self.every, min(0.05, age / 20))
                every_one = t_cycle - last_all >= max(self.every_all, min(0.5, age / 10))
                if every_one:
                    last_all = t_cycle
                todo = list(self._out) if every_one else list(self._out)[: self.window]
                if self.mid is not None:
                    self._check_mid([a for a in todo if a not in self._mid_seen])
                try:
                    outs = self.rpc.call_many([("ul.lookup", ["location", a]) for a in todo], self.window)
                except kamailio.RpcError:
                    outs = [None] * len(todo)
                t_seen = time.monotonic()
                self.polls += 1
                for aor, out in zip(todo, outs, strict=True):
                    t_ok, looked = self._out[aor]
                    if out is not None and not isinstance(out, Exception):
                        self.results.append(MarkerResult(aor, t_seen - t_ok, self._mid_seen.pop(aor, None), not looked,
                                                         self._queued.pop(aor, 0.0), t_ok))
                        del self._out[aor]
                    elif t_seen - t_ok > self.give_up_s:
                        self.missed.append(aor)
                        del self._out[aor]
                        self._mid_seen.pop(aor, None)
                    else:
                        self._out[aor] = (t_ok, True)
            self._stop.wait(max(0.0, t_cycle + every - time.monotonic()))

    def _check_mid(self, aors: list[str]) -> None:
        if not aors or self.mid is None:
            return
        try:
            there = self.mid(aors)
        except Exception:  # the intermediate figure is extra: a failed check is simply tried again
            return
        t = time.monotonic()
        for aor, yes in zip(aors, there, strict=True):
            if yes:
                self._mid_seen[aor] = t - self._out[aor][0]

    def wait_done(self, limit_s: float) -> None:
        t0 = time.monotonic()
        while (self._out or not self.source.empty()) and time.monotonic() - t0 < limit_s:
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._th is not None:
            self._th.join(10)


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def lag_summary(results: list[MarkerResult], missed: int = 0) -> dict[str, Any]:
    lags = [r.lag_s * 1000 for r in results]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {"n": len(lags), "missed": missed, "p50_ms": ms(pct(lags, 50)), "p99_ms": ms(pct(lags, 99)),
            "max_ms": ms(max(lags) if lags else None), "at_first_poll": sum(r.first_poll for r in results),
            "queued_p50_ms": ms(pct([r.queued_s * 1000 for r in results], 50)),
            # The slowest five: when (s after the step's first marker's 200 OK), lag and to-the-store ms. Spread
            # over the step, the tail is the machine's; together, one stall was.
            "slowest": [[round(r.ok_at - t0, 2), ms(r.lag_s * 1000), ms(None if r.mid_s is None else r.mid_s * 1000)]
                        for r in sorted(results, key=lambda r: r.lag_s)[-5:]]
            if results and (t0 := min(r.ok_at for r in results)) else [],
            **({"to_store_p50_ms": ms(pct(mids, 50)), "to_store_p99_ms": ms(pct(mids, 99)), "to_store_n": len(mids)}
               if (mids := [r.mid_s * 1000 for r in results if r.mid_s is not None]) else {})}


__all__ = ["MARK", "MarkerResult", "Markers", "Sample", "Sampler", "Sender", "cpu_s", "lag_summary",
           "location_contacts", "pct", "pids_matching", "register", "rpc_tmpdir", "rss_kb", "shm_used"]
