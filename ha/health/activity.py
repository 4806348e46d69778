"""Whether an unanswering local proxy is working (overloaded) or stuck (hung): the CPU its processes used.

Why: under a REGISTER flood on a 2-core node the proxy's UDP queue holds thousands of requests ahead of a
probe, so probes go unanswered for hundreds of milliseconds while every SIP worker is busy. Three such cycles
made the node unhealthy and the VIP moved, taking the flood (and a coordinator's replication backlog) to the
peer; in the lab's overload test it moved 2-6 times in 30 s. A late answer (ha.sip.LateListener) helps only up
to the third cycle. The kernel knows better: a proxy whose processes keep burning CPU is alive; one that is
SIGSTOPped (state T), crashed (no processes) or deadlocked (asleep on a lock: no CPU) is not.

:class:`GroupActivity` reads ``/proc`` only when asked, i.e. on an unanswered probe, never on the healthy path.
The proxy is the process group of the pid in its pidfile (Kamailio and OpenSIPS daemonize into their own
session; the pidfile names the main process, whose group is the session's). CPU time is in clock ticks
(10 ms on Debian), so the threshold is a few ticks between two unanswered probes that are at most
``max_gap_s`` apart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

MIN_TICKS = 2  # CPU ticks (20 ms at 100 Hz) the group must have used since the previous unanswered probe
MAX_GAP_S = 1.0  # an older sample says nothing about now
MIN_GAP_S = 0.02  # calls closer than this (one cycle's several transports) share one sample and one answer
PF_EXITING = 0x4  # linux/sched.h: the process is in do_exit (field 9 of /proc/<pid>/stat)
SIGKILL_BIT = 1 << 8  # signal 9 in /proc/<pid>/status's SigPnd/ShdPnd masks


def group_cpu(pgid: int, proc: Path = Path("/proc")) -> tuple[int, int, bool]:
    """(processes, utime+stime ticks summed, any of them stopped) over the processes in group ``pgid``."""
    g = group_sample(pgid, proc)
    return g[0], g[1], g[2]


def group_sample(pgid: int, proc: Path = Path("/proc")) -> tuple[int, int, bool, int]:
    """(processes, utime+stime ticks summed, any of them stopped, how many are running or runnable now) over
    the live processes in group ``pgid``.

    Dying ones are not counted: a SIGKILLed process is in state R until it reaches do_exit (SIGKILL pending),
    and while the kernel tears down its memory (PF_EXITING); it closes its sockets only after that, so probes
    meet silence, not "port unreachable". Counted as running, Kamailio's 24 dying processes (each unmapping the
    shared memory) read "busy, not hung" and held a proxy crash's failover back: 0.8-0.97 s in 3 of 20 lab
    drills, against ~0.2 s."""
    n, ticks, stopped, running = 0, 0, False, 0
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_bytes()
        except OSError:  # exited meanwhile
            continue
        f = raw[raw.rfind(b")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session tty tpgid flags ...
        if len(f) < 13 or int(f[2]) != pgid:
            continue
        if f[0] in (b"Z", b"X") or int(f[6]) & PF_EXITING or (f[0] == b"R" and _kill_pending(d)):
            continue
        n += 1
        ticks += int(f[11]) + int(f[12])
        stopped = stopped or f[0] in (b"T", b"t")
        running += f[0] == b"R"
    return n, ticks, stopped, running


def _kill_pending(d: Path) -> bool:
    """A SIGKILL delivered, not acted on yet: the process is runnable only to die (on a 2-core node two dozen
    killed processes wait their turn for the CPU this way before they even reach do_exit)."""
    try:
        status = (d / "status").read_text()
    except OSError:
        return False  # gone meanwhile: counted once, the next unanswered probe looks again
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_BIT:
            return True
    return False


def process_group(pid: int, proc: Path = Path("/proc")) -> int:
    """The process group of ``pid``. Not the pid itself: Kamailio daemonizes with a double fork, so its pidfile
    names the second child while the group is the first's (the lab's nodes: pid 156, group 155; taking the pid
    for the group found no process, and "busy, not hung" never applied there). Raises OSError when it is gone."""
    raw = (proc / str(pid) / "stat").read_bytes()
    return int(raw[raw.rfind(b")") + 2 :].split()[2])


class GroupActivity:
    """Called on an unanswered probe: a reason ("busy, not hung") when the proxy's processes used CPU since
    the previous call, else None (no verdict change). The first call after a quiet spell only takes a sample."""

    def __init__(self, pidfile: Path, min_ticks: int = MIN_TICKS, max_gap_s: float = MAX_GAP_S,
                 proc: Path = Path("/proc"), clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.pidfile = pidfile
        self.min_ticks = min_ticks
        self.max_gap_s = max_gap_s
        self.proc = proc
        self.clock = clock
        self._last: tuple[int, int, float] | None = None  # pgid, ticks, when
        self._said: str | None = None  # the last call's answer, reused within MIN_GAP_S
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __call__(self) -> str | None:
        if self._last is not None and self.clock() - self._last[2] < MIN_GAP_S:
            return self._said
        self._said = self._sample()
        return self._said

    def _sample(self) -> str | None:
        try:
            pgid = process_group(int(self.pidfile.read_text().split()[0]), self.proc)
        except (OSError, ValueError, IndexError):
            self._last = None
            return None
        n, ticks, stopped, running = group_sample(pgid, self.proc)
        now = self.clock()
        last, self._last = self._last, (pgid, ticks, now)
        if n == 0 or stopped:
            return None
        if running:
            # On the run queue right now: working. Why not ticks alone: the three failed cycles that make a node
            # unhealthy come ~40 ms apart, and a flooded proxy on a 2-core node used ~22 % of a core (60 ms in
            # 268 ms): under the 2-tick threshold per cycle, so the VIP still moved under the flood (lab).
            return f"no answer, but {running} of its {n} processes are running"
        if last is None or last[0] != pgid or now - last[2] > self.max_gap_s:
            return None
        used = ticks - last[1]
        if used < self.min_ticks:
            return None
        ms = used * 1000 / self.hz
        return f"no answer, but its {n} processes used {ms:.0f} ms of CPU in the last {(now - last[2]) * 1000:.0f} ms"
