"""ha.health.activity against real processes (a busy loop, a sleeper, SIGSTOP), and the prober's use of it
against a real silent SIP responder: busy means overloaded, stopped or idle means dead, and busy silence ends
after the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_health_probe import H, SipResponder, _with_responder, run

from ha.health.activity import GroupActivity, group_cpu
from ha.health.probe import Health, Target, TargetProber, Verdict, cycle_outcome

BUSY = "import time\nwhile True:\n    time.time()\n"
IDLE = "import time\ntime.sleep(60)\n"


def _group(code: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)  # its own group, like a daemon
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text(f"{p.pid}\n")
    if code == IDLE:  # past the interpreter's start-up (20-50 ms of CPU): asleep for good, bounded wait
        before = -1
        for _ in range(40):
            time.sleep(0.1)
            now = group_cpu(p.pid)[1]
            if now == before:
                break
            before = now
    try:
        yield p, pidfile
    finally:
        p.kill()
        p.wait(5)


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    yield from _group(BUSY, tmp_path)


@pytest.fixture
def idle(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    yield from _group(IDLE, tmp_path)


def _twice(act: GroupActivity, gap: float = 0.1) -> str | None:
    act()
    time.sleep(gap)
    return act()


def test_a_busy_group_is_busy_until_stopped_or_gone(busy: tuple[subprocess.Popen[bytes], Path]) -> None:
    p, pidfile = busy
    time.sleep(0.1)
    n, ticks, stopped = group_cpu(p.pid)
    assert n == 1 and ticks >= 1 and not stopped
    act = GroupActivity(pidfile)
    why = act()  # on the run queue now: no earlier sample needed
    assert why is not None and "1 of its 1 processes are running" in why, why
    os.kill(p.pid, signal.SIGSTOP)  # the drills' proxy-hang
    try:
        time.sleep(0.05)
        assert group_cpu(p.pid)[2] and _twice(act) is None
    finally:
        os.kill(p.pid, signal.SIGCONT)
    p.kill()
    p.wait(5)
    assert _twice(act) is None  # crashed: no process in the group


def test_an_idle_group_or_a_missing_pidfile_says_nothing(idle: tuple[subprocess.Popen[bytes], Path],
                                                         tmp_path: Path) -> None:  # fmt: skip
    _, pidfile = idle
    assert _twice(GroupActivity(pidfile)) is None  # asleep (a deadlock looks like this): hung, not busy
    assert _twice(GroupActivity(tmp_path / "absent.pid")) is None
    assert _twice(GroupActivity(pidfile), gap=1.2) is None  # the previous sample is too old to compare


def test_prober_counts_a_silent_busy_proxy_overloaded_within_the_grace(busy: tuple[subprocess.Popen[bytes], Path]) \
        -> None:  # fmt: skip
    """A responder that never answers; its 'processes' are the busy group. Overloaded (no flip) while the grace
    lasts, dead after it: a worker looping forever also burns CPU and must not keep the VIP."""
    _, pidfile = busy

    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        r.mode = "silent"
        prober = TargetProber([Target("127.0.0.1", r.udp_port, "udp"), Target("127.0.0.1", r.tcp_port, "tcp")],
                              0.05, 30, activity=GroupActivity(pidfile), activity_grace_s=0.6)
        state, seen = H.run([True, True])[-1], []
        t0 = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - t0 < 1.2:  # bounded: ~1.2 s of 50 ms cycles
            obs = await prober.cycle()
            state = H.step(state, *cycle_outcome(obs))
            seen.append((asyncio.get_running_loop().time() - t0, obs, state))
        await prober.close()
        return seen

    seen = run(_with_responder(body))
    early = [(t, obs, st) for t, obs, st in seen if t < 0.5]
    assert all(st.health is Health.HEALTHY for _, _, st in early), [(t, st) for t, _, st in early]
    busy_obs = [o for _, obs, _ in early for o in obs]  # from the first unanswered probe: it is running
    assert busy_obs and all(o.verdict is Verdict.OVERLOADED and o.reason.startswith("busy, not hung") for o in busy_obs)
    assert seen[-1][2].health is Health.UNHEALTHY  # silent past the grace: dead cycles count again


def test_prober_without_activity_or_with_an_idle_proxy_flips_as_before(idle: tuple[subprocess.Popen[bytes], Path]) \
        -> None:  # fmt: skip
    _, pidfile = idle

    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        r.mode = "silent"
        out = []
        for act in (None, GroupActivity(pidfile)):
            prober = TargetProber([Target("127.0.0.1", r.udp_port, "udp")], 0.03, 30, activity=act)
            state = H.run([True, True])[-1]
            for _ in range(3):
                state = H.step(state, *cycle_outcome(await prober.cycle()))
            await prober.close()
            out.append(state)
        return out

    assert [s.health for s in run(_with_responder(body))] == [Health.UNHEALTHY, Health.UNHEALTHY]


DAEMON = """
import os, sys, time
pid = os.fork()
if pid == 0:
    while True:
        time.time()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{pid}\\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
os.waitpid(pid, 0)
"""


def test_the_group_of_a_proxy_whose_pidfile_names_a_forked_child_is_found(tmp_path: Path) -> None:
    """Kamailio daemonizes with a double fork: its pidfile names the main process, whose group is the (gone)
    first child's, so pid != group. Taking the pid for the group found no process in the lab, and "busy, not
    hung" never applied: the VIP still moved under the overload test's flood."""
    from ha.health.activity import process_group

    pidfile = tmp_path / "kamailio.pid"
    p = subprocess.Popen([sys.executable, "-c", DAEMON, str(pidfile)], start_new_session=True)
    child = 0
    try:
        for _ in range(50):  # bounded: the launcher writes the pidfile at once
            if pidfile.exists():
                break
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert child != p.pid and process_group(child) == p.pid
        why = _twice(GroupActivity(pidfile))
        assert why is not None and "1 of its 2 processes are running" in why, why  # the busy child
    finally:
        if child:
            os.kill(child, signal.SIGKILL)  # the launcher reaps it and exits
        p.wait(5)


def _stat(proc: Path, pid: int, pgid: int, state: str, ticks: int) -> None:
    d = proc / str(pid)
    d.mkdir(exist_ok=True)
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    (d / "stat").write_text(f"{pid} (kamailio) {state} 1 {pgid} {pgid} 0 -1 0 0 0 0 0 {ticks} 0 0 0\n")


def test_a_group_asleep_now_but_busy_since_the_last_sample_is_busy(tmp_path: Path) -> None:
    """The ticks half, with a /proc laid out by hand (the real-process tests above cross the real one): a group
    whose processes are all asleep at the sample but used CPU since the previous unanswered probe is busy; one
    that used none is not; one on the run queue is busy at once."""
    proc, pidfile = tmp_path / "proc", tmp_path / "k.pid"
    proc.mkdir()
    pidfile.write_text("156\n")
    now = [100.0]
    act = GroupActivity(pidfile, proc=proc, clock=lambda: now[0])
    _stat(proc, 155, 155, "S", 0)  # the group leader's slot: the first fork, still there here
    _stat(proc, 156, 155, "S", 1000)
    _stat(proc, 157, 155, "S", 500)
    assert act() is None  # asleep, and nothing to compare with yet
    now[0] += 0.05
    _stat(proc, 157, 155, "S", 503)
    why = act()
    assert why is not None and "its 3 processes used 30 ms of CPU in the last 50 ms" in why, why
    now[0] += 0.05
    assert act() is None  # asleep, no CPU since: hung (a deadlock)
    now[0] += 0.05
    _stat(proc, 158, 155, "R", 0)
    assert act() == "no answer, but 1 of its 4 processes are running"
    _stat(proc, 158, 155, "T", 0)
    now[0] += 0.05
    assert act() is None  # one stopped: the drills' proxy-hang


DYING = """
import mmap, os, sys, time
m = mmap.mmap(-1, 256 << 20, flags=mmap.MAP_SHARED)  # like Kamailio's shared memory, touched by every process
for i in range(0, len(m), 4096):
    m[i] = 1
for _ in range(6):
    if os.fork() == 0:
        for i in range(0, len(m), 4096):
            m[i] = 2
        time.sleep(60)
        os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_group_still_tearing_down_its_memory_is_not_busy(tmp_path: Path) -> None:
    """After SIGKILL each process stays in state R while the kernel unmaps its memory, and closes its sockets
    only after that: probes get silence, not "port unreachable". Those dying processes must not read as a busy
    proxy (they held a proxy crash's failover back by up to 0.8 s in the lab's drills)."""
    from ha.health.activity import PF_EXITING, group_sample

    seen_dying = False
    for _ in range(3):  # the dying window is tens of ms: try again if a sample never fell into it
        p = subprocess.Popen([sys.executable, "-c", DYING], start_new_session=True, stdout=subprocess.PIPE)
        try:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
            pidfile = tmp_path / "proxy.pid"
            pidfile.write_text(f"{p.pid}\n")
            members = [d for d in Path("/proc").iterdir() if d.name.isdigit() and _pgrp(d) == p.pid]
            assert len(members) == 7, members
            for _ in range(100):  # bounded: the children touch the mapping, then sleep
                if group_sample(p.pid)[3] == 0:
                    break
                time.sleep(0.05)
            act = GroupActivity(pidfile)
            assert act() is None  # asleep: not busy
            time.sleep(0.05)  # past MIN_GAP_S, so the next call samples again
            os.killpg(p.pid, signal.SIGKILL)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                states = [s for s in (_state(d) for d in members) if s is not None]
                sample = group_sample(p.pid)
                assert sample[3] == 0, (sample, states)  # every one of them is dying: none counts as running
                assert act() is None
                seen_dying = seen_dying or any(s[0] == "R" and s[1] & PF_EXITING for s in states)
                if not any(s[0] not in "ZX" for s in states):
                    break
                time.sleep(0.001)
        finally:
            with_kill = p.poll() is None
            if with_kill:
                p.kill()
            p.wait(5)
        if seen_dying:
            break
    assert seen_dying, "never caught a process of the killed group tearing down its memory"


def _pgrp(d: Path) -> int:
    from ha.health.activity import process_group

    try:
        return process_group(int(d.name))
    except OSError:  # gone meanwhile
        return -1


def _state(d: Path) -> tuple[str, int] | None:
    try:
        raw = (d / "stat").read_bytes()
    except OSError:
        return None
    f = raw[raw.rfind(b")") + 2 :].split()
    return f[0].decode(), int(f[6])
