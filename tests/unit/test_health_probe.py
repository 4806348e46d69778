"""ha.health.probe and ha.health.service: hysteresis by explicit sequences, and probes of a real local SIP
responder (UDP and TCP sockets on 127.0.0.1) that answers 200, 503, slowly, or not at all."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from pathlib import Path

import pytest

from ha import model, sip
from ha.health.cluster import attrd_command
from ha.health.probe import (
    Health,
    HealthState,
    Hysteresis,
    Target,
    TargetProber,
    Verdict,
    classify,
    cycle_outcome,
    gated,
)
from ha.health.service import HealthService, Readiness, kv

# ---------------------------------------------------------------------------------------------- hysteresis

H = Hysteresis(failure_threshold=3, recovery_threshold=2)


def healths(seq: str, start: HealthState | None = None) -> str:
    """'+' good cycle, '-' failed cycle -> one letter per resulting state: U(nknown) H(ealthy) X (unhealthy)."""
    letter = {Health.UNKNOWN: "U", Health.HEALTHY: "H", Health.UNHEALTHY: "X"}
    return "".join(letter[s.health] for s in H.run([c == "+" for c in seq], start))


def test_starts_unknown_and_needs_a_full_run_either_way() -> None:
    assert HealthState().health is Health.UNKNOWN
    assert healths("+") == "U"
    assert healths("++") == "UH"
    assert healths("--") == "UU"
    assert healths("---") == "UUX"
    assert healths("+-+-+-") == "UUUUUU"  # alternating never leaves unknown


def test_one_lost_probe_never_flips_healthy() -> None:
    assert healths("++-+-+--+") == "UHHHHHHHH"


def test_n_consecutive_failures_flip_and_m_successes_recover() -> None:
    assert healths("++---") == "UHHHX"
    assert healths("++---+") == "UHHHXX"
    assert healths("++---++") == "UHHHXXH"
    assert healths("++---+-++") == "UHHHXXXXH"  # a failure resets the recovery count


def test_certain_death_flips_at_once_silence_does_not() -> None:
    from ha.health.probe import Observation

    healthy = H.run([True, True])[-1]
    refused = Observation("tcp", "tcp:x", Verdict.DEAD, None, 0.5, "connection refused (nothing listening)")
    silent = Observation("udp", "udp:x", Verdict.DEAD, None, 80, "no answer within 80 ms")
    assert refused.certain and not silent.certain
    st = H.fail_now(healthy, refused.reason)
    assert st.health is Health.UNHEALTHY and st.changed and st.failures == 3
    again = H.fail_now(st)
    assert not again.changed and H.step(again, True).health is Health.UNHEALTHY  # recovery still needs M


def test_changed_is_true_only_on_the_flip() -> None:
    states = H.run([True, True, True, False, False, False, False])
    assert [s.changed for s in states] == [False, True, False, False, False, True, False]


def test_thresholds_of_one_follow_every_probe() -> None:
    one = Hysteresis(1, 1)
    assert [s.health for s in one.run([False, True, False])] == [Health.UNHEALTHY, Health.HEALTHY, Health.UNHEALTHY]
    with pytest.raises(ValueError):
        Hysteresis(0, 1)


def test_readiness_gate_hides_healthy_only() -> None:
    healthy = H.run([True, True])[-1]
    assert gated(healthy, ready=False).health is Health.UNHEALTHY
    assert "readiness" in gated(healthy, ready=False).reason
    assert gated(healthy, ready=True).health is Health.HEALTHY
    assert gated(HealthState(), ready=False).health is Health.UNKNOWN


def _result(code: int | None, ms: float, reason: str = "x") -> sip.ProbeResult:
    return sip.ProbeResult(code is not None and code < 500, code, ms, reason, "udp", "udp:127.0.0.1:5060")


def test_classify() -> None:
    assert classify(_result(200, 1), 40).verdict is Verdict.OK
    assert classify(_result(404, 1), 40).verdict is Verdict.OK  # answers: alive
    assert classify(_result(503, 1, "503 Service Unavailable"), 40).verdict is Verdict.OVERLOADED
    assert classify(_result(200, 60), 40).verdict is Verdict.OVERLOADED
    assert classify(_result(None, 80, "no answer within 80 ms"), 40).verdict is Verdict.DEAD
    assert classify(_result(100, 80, "only provisional"), 40).verdict is Verdict.DEAD
    alive, why = cycle_outcome([classify(_result(200, 1), 40), classify(_result(None, 80, "refused"), 40)])
    assert not alive and "dead: refused" in why
    assert cycle_outcome([classify(_result(503, 1), 40)])[0]  # overloaded is not a failure


# ---------------------------------------------------------------------------------------------- a real responder


class SipResponder:
    """A stand-in proxy on 127.0.0.1: UDP and TCP listeners answering OPTIONS per ``mode``.

    Modes: ``200``, ``503``, ``slow`` (200 after ``delay`` s), ``silent`` (reads, never answers).
    """

    def __init__(self) -> None:
        self.mode = "200"
        self.delay = 0.3
        self.udp_port = 0
        self.tcp_port = 0
        self.requests = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def _answer(self, data: bytes) -> bytes | None:
        self.requests += 1
        req = sip.parse(data)
        if self.mode == "silent":
            return None
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        status = 503 if self.mode == "503" else 200
        return sip.response(req, status).encode()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        outer = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                async def reply() -> None:
                    out = await outer._answer(data)
                    if out:
                        self.t.sendto(out, addr)  # type: ignore[attr-defined]

                task = loop.create_task(reply())
                outer.tasks.add(task)
                task.add_done_callback(outer.tasks.discard)

        transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
        self._udp = transport  # type: ignore[assignment]
        self.udp_port = transport.get_extra_info("sockname")[1]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            buf = b""
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while data := await reader.read(65535):
                    msgs, buf = sip.parse_stream(buf + data)
                    for m in msgs:
                        out = await self._answer(m.encode())
                        if out:
                            writer.write(out)
                            await writer.drain()
            writer.close()

        self._tcp = await asyncio.start_server(tcp, "127.0.0.1", 0)
        self.tcp_port = self._tcp.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()
            await self._tcp.wait_closed()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _with_responder(body):  # type: ignore[no-untyped-def]
    r = SipResponder()
    await r.start()
    try:
        return await body(r)
    finally:
        await r.stop()


def _prober(r: SipResponder, timeout: float = 0.5, slow_ms: float = 150) -> TargetProber:
    return TargetProber(
        [Target("127.0.0.1", r.udp_port, "udp"), Target("127.0.0.1", r.tcp_port, "tcp")], timeout, slow_ms
    )


@pytest.mark.parametrize(
    ("mode", "verdict"),
    [("200", Verdict.OK), ("503", Verdict.OVERLOADED), ("slow", Verdict.OVERLOADED), ("silent", Verdict.DEAD)],
)
def test_probe_verdicts_against_real_responder(mode: str, verdict: Verdict) -> None:
    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        r.mode = mode
        return await _prober(r).cycle()

    obs = run(_with_responder(body))
    assert [o.transport for o in obs] == ["udp", "tcp"]
    assert all(o.verdict is verdict for o in obs), obs
    if mode == "503":
        assert all(o.status_code == 503 for o in obs)
    if mode == "slow":
        assert all("slow" in o.reason for o in obs)
    if mode == "silent":
        assert all(o.status_code is None and o.latency_ms >= 450 for o in obs)


def test_probe_refused_is_dead() -> None:
    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        udp, tcp = r.udp_port, r.tcp_port
        await r.stop()  # nothing listens any more: ICMP port unreachable / RST
        return await TargetProber([Target("127.0.0.1", udp, "udp"), Target("127.0.0.1", tcp, "tcp")], 0.5,
                                  150).cycle()

    obs = run(_with_responder(body))
    assert all(o.verdict is Verdict.DEAD for o in obs)
    assert all("unreachable" in o.reason or "refused" in o.reason for o in obs), obs


# ---------------------------------------------------------------------------------------------- the service


def _cluster(r: SipResponder, tmp: Path) -> model.Cluster:
    return model.parse(
        {
            "name": "t",
            "nodes": [{"name": "node1", "address": "127.0.0.1/8"}, {"name": "node2", "address": "127.0.0.2/8"}],
            "witness": {"name": "witness", "address": "127.0.0.3/8"},
            "vips": [{"name": "vip", "address": "127.0.0.10/8", "transports": ["udp", "tcp"]}],
            "proxy": {"listen": {"udp": r.udp_port, "tcp": r.tcp_port}},
            "timings": {"probe_period_ms": 100, "probe_timeout_ms": 80, "failure_threshold": 3,
                        "recovery_threshold": 2},
        },
        "test",
        tmp,
    )


class RecordingAttrd:
    """Stands in for attrd_updater (a real attrd needs a running cluster: the lab test crosses that)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    async def write(self, value: int) -> tuple[bool, str]:
        self.values.append(value)
        return True, ""


class NoVip:
    error = ""

    async def held_async(self) -> list[str]:
        return []

    def held(self) -> list[str]:
        return []


def test_attrd_command_built() -> None:
    assert attrd_command(1) == ["attrd_updater", "-n", "sipha-health", "-U", "1"]
    assert attrd_command(0, 2000) == ["attrd_updater", "-n", "sipha-health", "-U", "0", "-d", "2000ms"]
    with pytest.raises(ValueError):
        attrd_command(2)


def test_service_cycles_write_attribute_on_change_and_say_why(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="sipha.health")

    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        attrd = RecordingAttrd()
        svc = HealthService(_cluster(r, tmp_path), "node1", probe_host="127.0.0.1", attrd=attrd,
                            vip_check=NoVip(), slow_ms=60)  # type: ignore[arg-type]
        svc.peers = {}  # the peer (127.0.0.2) is probed in the lab, not here
        sentences = [await svc.cycle() for _ in range(3)]
        await asyncio.sleep(0.05)
        written_healthy = list(attrd.values)
        r.mode = "503"
        sentences.append(await svc.cycle())
        r.mode = "silent"
        sentences += [await svc.cycle() for _ in range(3)]
        await asyncio.sleep(0.05)
        snap = svc.snapshot()
        await svc.close()
        return sentences, written_healthy, list(attrd.values), snap

    sentences, written_healthy, written, snap = run(_with_responder(body))
    assert "still unknown" in sentences[0]
    assert sentences[1].startswith("became healthy") and "sipha-health=1" in sentences[1]
    assert written_healthy == [1]
    assert "overloaded" in sentences[3] and sentences[3].startswith("healthy")  # 503 keeps the VIP
    assert "still healthy, 1/3 failed" in sentences[4]
    assert sentences[6].startswith("became unhealthy") and "sipha-health=0" in sentences[6]
    assert written == [1, 0]  # once per change, never per cycle
    assert snap["health"] == "unhealthy" and snap["consecutive_failures"] == 3
    assert [h["to"] for h in snap["history"] if h["kind"] == "health"] == ["healthy", "unhealthy"]
    events = [m for m in caplog.messages if "event=health_change" in m]
    assert len(events) == 2 and "node=node1" in events[1] and "latency_ms=" in events[1]


class SlowAttrd(RecordingAttrd):
    """attrd_updater taking 0.2 s, as on a busy node."""

    async def write(self, value: int) -> tuple[bool, str]:
        await asyncio.sleep(0.2)
        return await super().write(value)


def test_reassert_writes_again_and_written_stays_meanwhile(tmp_path: Path) -> None:
    """Every REASSERT_S the attribute is written again (attrd loses it with a Pacemaker restart); meanwhile
    /health's attribute.written still says what was last written, never null."""
    from ha.health.service import REASSERT_S

    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        attrd = SlowAttrd()
        svc = HealthService(_cluster(r, tmp_path), "node1", probe_host="127.0.0.1", attrd=attrd,
                            vip_check=NoVip())  # type: ignore[arg-type]
        svc.peers = {}
        for _ in range(3):
            await svc.cycle()
        await asyncio.sleep(0.3)
        first = (list(attrd.values), svc.snapshot()["attribute"]["written"])
        svc._last_assert -= REASSERT_S + 1
        await svc.cycle()
        await asyncio.sleep(0.05)
        during = (list(attrd.values), svc.snapshot()["attribute"]["written"])
        await asyncio.sleep(0.3)
        after = list(attrd.values)
        await svc.close()
        return first, during, after

    first, during, after = run(_with_responder(body))
    assert first == ([1], 1)
    assert during == ([1], 1), "attribute.written must keep the last written value while it is written again"
    assert after == [1, 1]


def test_readiness_gate_holds_healthy_until_given(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"

    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        attrd = RecordingAttrd()
        svc = HealthService(_cluster(r, tmp_path), "node1", probe_host="127.0.0.1", attrd=attrd, vip_check=NoVip(),
                            readiness=Readiness(required=True, path=ready_file))  # type: ignore[arg-type]
        svc.peers = {}
        out = [await svc.cycle() for _ in range(3)]
        ready_file.touch()  # the coordinator: "resync complete"
        out.append(await svc.cycle())
        await asyncio.sleep(0.05)
        await svc.close()
        return out, attrd.values

    sentences, written = run(_with_responder(body))
    assert "readiness is not given" in sentences[1]
    assert "waiting for readiness" in sentences[2]
    assert sentences[3].startswith("readiness given (resync complete): became healthy")
    assert written == [0, 1]


def test_readiness_callable_and_no_gate(tmp_path: Path) -> None:
    r = Readiness(required=True, path=tmp_path / "nope")
    assert not r.is_ready()
    r.give()
    assert r.is_ready()
    r.revoke()
    assert not r.is_ready()
    assert Readiness(required=False, path=None).is_ready()


def test_kv_quotes_what_needs_it() -> None:
    assert kv(event="x", node="node1", reason='no answer "x"', n=None, ms=1.234) == (
        'event=x node=node1 reason="no answer \\"x\\"" ms=1.23'
    )


# ---------------------------------------------------------------------------------------------- late answers


def test_late_window_bounds() -> None:
    from ha.health.probe import late_window

    assert late_window(3, 0.05) == 1.0  # the lab: 3 x 50 ms is shorter than the 1 s floor
    assert late_window(5, 0.5) == 2.5
    assert late_window(10, 1.0) == 5.0  # capped


class Recorder:
    """The real async probe, with every late listener it hands over also kept here (to check they get closed)."""

    def __init__(self) -> None:
        self.listeners: list[sip.LateListener] = []

    async def __call__(self, host: str, port: int, transport: str, timeout: float, *,
                      hand_over=None) -> sip.ProbeResult:  # type: ignore[no-untyped-def]
        def keep(listener: sip.LateListener) -> None:
            self.listeners.append(listener)
            hand_over(listener)

        return await sip.options_probe_async(host, port, transport, timeout,
                                             hand_over=keep if hand_over else None)


def test_late_answers_turn_dead_cycles_into_overloaded_and_reset_failures() -> None:
    """A proxy answering every probe 120 ms late (timeout 50 ms): without late answers 3 cycles flip it."""

    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        r.mode, r.delay = "slow", 0.12
        rec = Recorder()
        seen: list[tuple[str, float]] = []
        prober = TargetProber([Target("127.0.0.1", r.udp_port, "udp"), Target("127.0.0.1", r.tcp_port, "tcp")],
                              0.05, 30, rec, late_window_s=1.0, on_late=lambda t, res: seen.append(
                                  (t.transport, res.latency_ms)))
        state, cycles = H.run([True, True])[-1], []
        for _ in range(10):
            obs = await prober.cycle()
            state = H.step(state, *cycle_outcome(obs))
            cycles.append((obs, state))
        await asyncio.sleep(0.2)
        await prober.close()
        return cycles, seen, rec.listeners, prober

    cycles, seen, listeners, prober = run(_with_responder(body))
    assert cycles[0][0][0].verdict is Verdict.DEAD  # nothing late yet: the first cycle is dead as before
    assert all(st.health is Health.HEALTHY and st.failures < 3 for _, st in cycles), [c[1] for c in cycles]
    late = [o for obs, _ in cycles for o in obs if o.late]
    assert {o.transport for o in late} == {"udp", "tcp"}
    assert all(o.verdict is Verdict.OVERLOADED and o.reason.startswith("late: answered in") for o in late)
    assert all(110 <= o.latency_ms < 1000 and o.status_code == 200 for o in late), late
    # a late answer resets the run: a cycle after a failed one, its own probes unanswered, counts 0 failures
    assert any(prev.failures >= 1 and st.failures == 0 and all(o.late for o in obs)
               for (_, prev), (obs, st) in itertools.pairwise(cycles))
    assert len(seen) >= len(late) and prober.late_answers == len(seen)
    assert listeners and all(li.closed for li in listeners) and prober.outstanding() == 0


def test_silence_flips_after_exactly_the_threshold_and_listeners_are_bounded_and_closed() -> None:
    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        r.mode = "silent"
        rec = Recorder()
        prober = TargetProber([Target("127.0.0.1", r.udp_port, "udp"), Target("127.0.0.1", r.tcp_port, "tcp")],
                              0.03, 30, rec, late_window_s=0.5, late_max=4)
        state, states = H.run([True, True])[-1], []
        for _ in range(6):
            state = H.step(state, *cycle_outcome(await prober.cycle()))
            states.append(state)
        open_now = prober.outstanding()
        handed = len(rec.listeners)
        await asyncio.sleep(0.6)  # the late window (0.5 s from each send) is over: every listener has closed
        expired = prober.outstanding(), all(li.closed for li in rec.listeners)
        for _ in range(2):  # listeners again, then closed by close() before their window ends
            await prober.cycle()
        again = prober.outstanding()
        await prober.close()
        return states, open_now, handed, expired, again, prober.outstanding(), rec.listeners

    states, open_now, handed, expired, again, after_close, listeners = run(_with_responder(body))
    assert [s.health for s in states] == [Health.HEALTHY] * 2 + [Health.UNHEALTHY] * 4  # 3rd failure flips
    assert states[2].changed and states[2].failures == 3
    assert open_now == handed == 8  # 4 per target, although 6 probes per target timed out
    assert expired == (0, True)
    assert again == 4 and after_close == 0 and all(li.closed for li in listeners)


def test_certain_death_is_not_masked_by_a_late_answer() -> None:
    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        r.mode, r.delay = "slow", 0.06
        prober = TargetProber([Target("127.0.0.1", r.udp_port, "udp"), Target("127.0.0.1", r.tcp_port, "tcp")],
                              0.03, 30, late_window_s=1.0)
        first = await prober.cycle()
        await asyncio.sleep(0.1)  # both late answers are in
        await r.stop()  # and now nothing listens: port unreachable / connection refused
        after = await prober.cycle()
        await prober.close()
        return first, after, prober.late_answers

    first, after, late_answers = run(_with_responder(body))
    assert all(o.verdict is Verdict.DEAD and not o.certain for o in first)
    assert late_answers == 2
    assert all(o.verdict is Verdict.DEAD and o.certain and not o.late for o in after), after


def test_service_reports_late_answers_as_overloaded(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The service end to end: metric, /health body, probe_verdict event; silence after it flips after 3."""
    from prometheus_client.parser import text_string_to_metric_families

    caplog.set_level(logging.INFO, logger="sipha.health")

    async def body(r: SipResponder):  # type: ignore[no-untyped-def]
        svc = HealthService(_cluster(r, tmp_path), "node1", probe_host="127.0.0.1", attrd=RecordingAttrd(),
                            vip_check=NoVip(), slow_ms=60)  # type: ignore[arg-type]
        svc.peers = {}
        assert svc.late_window_s == 1.0  # max(1 s, 3 x 100 ms)
        for _ in range(2):
            await svc.cycle()
        r.mode, r.delay = "slow", 0.13  # the probe times out after 80 ms
        busy = []
        for _ in range(8):
            await svc.cycle()
            busy.append(svc.snapshot())
        r.mode = "silent"
        await asyncio.sleep(0.3)  # the busy answers still in flight land
        silent = [await svc.cycle() for _ in range(4)]
        snap = svc.snapshot()
        metrics = svc.metrics.render().decode()
        await svc.close()
        return busy, silent, snap, metrics, svc.local.outstanding()

    busy, silent, snap, metrics, outstanding = run(_with_responder(body))
    assert all(s["health"] == "healthy" and s["consecutive_failures"] < 3 for s in busy), busy
    late = [t for s in busy for t in s["transports"] if t["late"]]
    assert late and all(t["verdict"] == "overloaded" and t["latency_ms"] >= 120 for t in late), late
    assert busy[-1]["late_answers"] >= len(late)
    # the last busy answer is used by the first silent cycle; then exactly 3 dead cycles flip the node
    assert "overloaded" in silent[0] and "late: answered in" in silent[0]
    assert "still healthy, 1/3" in silent[1] and "still healthy, 2/3" in silent[2]
    assert silent[3].startswith("became unhealthy after 3 consecutive failed cycles"), silent
    assert snap["health"] == "unhealthy" and outstanding == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples[("sipha_probe_late_answers_total", (("node", "node1"), ("transport", "udp")))] >= 1
    assert samples[("sipha_probe_late_answers_total", (("node", "node1"), ("transport", "tcp")))] >= 1
    verdicts = [m for m in caplog.messages if "event=probe_verdict" in m and "now=overloaded" in m]
    assert any("late=True" in m and "late: answered in" in m and "latency_ms=" in m for m in verdicts), verdicts
    summaries = [m for m in caplog.messages if "event=late_answers" in m]
    assert summaries and all("max_latency_ms=" in m and "transports=" in m for m in summaries), summaries
