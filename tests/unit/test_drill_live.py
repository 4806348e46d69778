"""The drill's traffic engine against a REAL Kamailio running the rendered lab kamailio.cfg.

Kamailio runs in a throwaway namespace ``sipha-t-<random>`` (``running_proxy`` from ha.kamailio_testing: node1's
address, the VIP, ``ip_nonlocal_bind``; stopped by its own process group, the namespace always deleted). Our
user agents live in the same namespace on the lab client's address 198.51.100.50 (trusted by the lab model's
rate limit, as in the lab). The "fault" is a SIGSTOP of Kamailio's process group for ~1 s (SIGCONT always
follows, by pid): the gap measured from the real samples must be about that long. Timing bounds are loose on
purpose: this checks structure, the benchmark checks numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ha.drill import measure
from ha.drill.traffic import Endpoint, Traffic, TrafficConfig, TrafficRecord, UserAgent
from ha.kamailio_testing import Proxy, ns_socket, running_proxy
from ha.proxy import kamailio

CLIENT = "198.51.100.50"

pytestmark = [
    pytest.mark.validators,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(kamailio.kamailio_binary() is None, reason="kamailio is not installed"),
]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with running_proxy(tmp_path_factory.mktemp("drill-kamailio"), "lab") as p:
        subprocess.run(["ip", "-n", p.ns, "addr", "add", f"{CLIENT}/24", "dev", "v0"], check=True, timeout=10)
        yield p


def factory(p: Proxy) -> Callable[[int], socket.socket]:
    return lambda kind: ns_socket(p.ns, kind)


def kamailio_pid(p: Proxy) -> int:
    return int((p.run_dir / kamailio.PID_NAME).read_text().split()[0])


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP Kamailio's process group (its main process leads it: started in its own session), always CONT."""
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pid, signal.SIGCONT)


def test_registrations_calls_and_a_one_second_hang(proxy: Proxy) -> None:
    cfg = TrafficConfig(vip=proxy.vip, local_ip=CLIENT, registrations=20, calls=5, rate=4.0, request_timeout=6.0)
    pid = kamailio_pid(proxy)
    marks: dict[str, float] = {}

    async def drill() -> TrafficRecord:
        async with Traffic(cfg, factory(proxy)) as t:
            await t.start()
            est = [c for c in t.record.calls if c.phase == "established"]
            assert len(est) == 5 and all(c.set_up for c in est), [(c.setup_status, c.callee) for c in est]
            for c in est:  # the route set is the Record-Route, and it names the VIP (loose routing)
                assert c.route and proxy.vip in c.route[0] and ";lr" in c.route[0], c.route
            # Every callee saw its INVITE and the ACK that came through the route set (the ACK is sent
            # without waiting for anything: give it a moment to cross the proxy).
            for _ in range(50):
                got = {ua.user: {m for _t, m, _c in ua.received} for ua in t.uas}
                if all({"INVITE", "ACK"} <= got[c.callee] for c in est):
                    break
                await asyncio.sleep(0.02)
            assert all({"INVITE", "ACK"} <= got[c.callee] for c in est), got
            await asyncio.sleep(0.6)
            new = asyncio.create_task(t.new_calls(2.0))
            await asyncio.sleep(0.3)
            marks["fault"] = time.monotonic()
            with stopped(pid):
                await asyncio.sleep(1.0)
            marks["resumed"] = time.monotonic()
            await new
            await asyncio.sleep(0.5)
            await t.hangup_established()
            await t.check_reachable()
            return t.record

    rec = asyncio.run(drill())
    assert not rec.errors, rec.errors
    f = measure.figures(rec.samples, rec.registrations, rec.calls, fault_at=marks["fault"], old_node=None)
    print({k: v for k, v in f.items() if k != "details"})
    hang = marks["resumed"] - marks["fault"]
    assert f["recovered"]
    assert hang - 0.1 <= f["gap_ms"] / 1000 <= hang + 0.5, (f["gap_ms"], hang)
    gap = f["details"]["gap"]
    assert marks["fault"] - 0.1 <= gap["start"] <= marks["fault"] + 0.1
    # Queued probes are answered when Kamailio resumes: a probe sent at the start of a ~1 s hang waited
    # ~1 s, so a UDP UAC would have resent once (at +0.5) and nothing would have failed.
    assert 1 <= f["retransmits_max"] <= 2 and f["requests_failed"] == 0  # 2 only if the hang ran past 1.5 s
    assert f["registrations_checked"] == 20 and f["registrations_reachable"] == 20, f["details"]["registrations"]
    assert f["calls_established"] == 5 and f["calls_bye_ok"] == 5, f["details"]["calls"]
    new = f["details"]["calls"]["new"]
    assert sum(v["attempted"] for v in new.values()) == 8  # 2 s at 4/s
    assert sum(v["set_up"] for v in new.values()) == 8  # UDP resends carry the hang's INVITEs through
    assert f["probes_sent"] > 100 and f["split_brain_samples"] == 0


def test_tcp_phones_register_are_reached_and_calls_route(proxy: Proxy) -> None:
    cfg = TrafficConfig(vip=proxy.vip, local_ip=CLIENT, transport="tcp", registrations=3, calls=2, rate=0.0,
                        user_prefix="tcp")  # fmt: skip

    async def drill() -> TrafficRecord:
        async with Traffic(cfg, factory(proxy)) as t:
            await t.start()
            await asyncio.sleep(0.5)
            await t.hangup_established()
            await t.check_reachable()
            return t.record

    rec = asyncio.run(drill())
    assert not rec.errors, rec.errors
    f = measure.figures(rec.samples, rec.registrations, rec.calls, fault_at=None, old_node=None)
    assert f["registrations_reachable"] == 3 and f["calls_bye_ok"] == 2, f["details"]
    assert f["probes_sent"] >= 20 and f["probes_unanswered"] <= 1  # the last may still be in flight
    assert all(";transport=tcp" in c.route[0] or proxy.vip in c.route[0] for c in rec.calls)


def test_engine_closes_every_socket(proxy: Proxy) -> None:
    """After the context, no socket of ours is left open (the drill runs K times in one process)."""
    cfg = TrafficConfig(vip=proxy.vip, local_ip=CLIENT, registrations=2, calls=1, rate=0.0, user_prefix="close")

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def drill() -> int:
        async with Traffic(cfg, factory(proxy)) as t:
            await t.start()
            return len(t.endpoints)

    before = fds()
    opened = asyncio.run(drill())
    assert opened == 4 and fds() <= before


def test_unreachable_vip_gives_a_clean_record(tmp_path: Path) -> None:
    """Nothing listens on loopback port 9 (discard): every probe unanswered, no exception, sockets closed."""
    cfg = TrafficConfig(vip="127.0.0.1", local_ip="127.0.0.1", port=9, registrations=1, calls=0, rate=0.0,
                        request_timeout=0.6)  # fmt: skip

    async def drill() -> TrafficRecord:
        async with Traffic(cfg) as t:
            await t.start()
            await asyncio.sleep(0.2)
            return t.record

    rec = asyncio.run(drill())
    assert rec.samples and all(s.answered is None for s in rec.samples)
    assert rec.registrations[0].status is None and rec.errors == ["only 0/1 REGISTERs got 200 before the fault"]
    gap = measure.longest_gap(rec.samples)
    assert gap is not None and not gap.recovered


def test_phones_unregister_so_repeated_drills_keep_reaching_them(proxy: Proxy) -> None:
    """The same AoRs from new ports, drill after drill: without the un-REGISTER at the end, the 13th run's
    requests went only to dead contacts (Kamailio forks to at most 12 branches). 14 runs here, each must
    reach its phone, and after the last one's un-REGISTER the AoR reaches nobody."""
    cfg = TrafficConfig(vip=proxy.vip, local_ip=CLIENT, registrations=1, calls=0, rate=0.0, user_prefix="again",
                        request_timeout=2.0)  # fmt: skip

    async def drill() -> tuple[TrafficRecord, int, int | None]:
        async with Traffic(cfg, factory(proxy)) as t:
            await t.start()
            await t.check_reachable()
            ok = await t.unregister()
            assert t.caller is not None
            after = await t.caller.message(t.uas[0].user, 2.0)
            return t.record, ok, after

    for i in range(14):
        rec, ok, after = asyncio.run(drill())
        assert rec.registrations[0].reachable, (i, rec.registrations[0])
        assert ok == 1 and not rec.errors, (i, rec.errors)
        assert after is not None and after >= 400, (i, after)  # nobody registered: 404/480, not a 200


def test_a_shed_phone_waits_its_retry_after_and_registers(proxy: Proxy) -> None:
    """While the coordinator has the proxy shed REGISTERs (htable shed=>until), a phone with patience waits the
    503's Retry-After (5-14 s) and registers again once the spell has run out; one without patience, or whose
    patience is shorter than the delay, keeps the 503."""
    kamailio.rpc("htable.seti", "shed", "until", int(time.time()) + 2, sock=proxy.rpc_sock)

    async def register(patience: float) -> tuple[int | None, int, float]:
        ep = Endpoint("udp", CLIENT, (proxy.vip, 5060), factory(proxy))
        await ep.open()
        try:
            ua = UserAgent(f"patient{int(patience)}", proxy.vip, ep)
            t0 = time.monotonic()
            st = await ua.register(60, 2.0, patience)
            if st == 200:
                assert await ua.register(0, 2.0) == 200
            return st, ua.shed, time.monotonic() - t0
        finally:
            await ep.close()

    try:
        assert asyncio.run(register(0))[:2] == (503, 1)
        assert asyncio.run(register(4))[:2] == (503, 1)  # the delay is at least 5 s: not waited
        st, shed, took = asyncio.run(register(30))
        assert (st, shed) == (200, 1) and 5 <= took < 16, (st, shed, took)
    finally:
        kamailio.rpc("htable.delete", "shed", "until", sock=proxy.rpc_sock)
