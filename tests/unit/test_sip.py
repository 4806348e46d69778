"""ha.sip: parser edge cases and the OPTIONS probe against real local UDP/TCP responders (a real socket boundary)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha import sip

OPTIONS = (
    b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKabc;rport, SIP/2.0/TCP [::1]:5070;branch=z9hG4bKdef\r\n"
    b"f: <sip:a@x>;tag=1\r\n"
    b"t: <sip:b@y>\r\n"
    b"i: call-1@x\r\n"
    b"CSeq: 7 OPTIONS\r\n"
    b"Subject: folded\r\n value\r\n"
    b"l: 4\r\n"
    b"\r\n"
    b"bodyEXTRA"
)


def test_parse_request_compact_forms_folding_and_body() -> None:
    m = sip.parse(OPTIONS)
    assert m.is_request and m.method == "OPTIONS" and m.uri == "sip:127.0.0.1:5060"
    assert m.call_id == "call-1@x"
    assert m.cseq == (7, "OPTIONS")
    assert m.branch == "z9hG4bKabc"
    assert [v.host for v in m.vias] == ["127.0.0.1", "[::1]"]
    assert m.vias[1].port == 5070 and m.vias[1].transport == "TCP"
    assert m.top_via is not None and m.top_via.param("rport") is None
    assert m.header("subject") == "folded value"
    assert m.header("From") == m.header("f") == "<sip:a@x>;tag=1"
    assert m.body == b"body"  # Content-Length wins over trailing bytes


def test_roundtrip_request_and_response() -> None:
    for method in ("OPTIONS", "REGISTER", "INVITE", "BYE", "MESSAGE"):
        req = sip.request(method, "sip:bob@example.org", via_host="127.0.0.1", via_port=5099, body=b"hi")
        back = sip.parse(req.encode())
        assert back == req
        assert back.branch and back.branch.startswith(sip.MAGIC_COOKIE)
        assert back.header("Content-Length") == "2"
        resp = sip.response(back, 200, headers=(("Contact", "<sip:bob@10.0.0.1>"),))
        parsed = sip.parse(resp.encode())
        assert parsed.status == 200 and parsed.reason == "OK"
        assert parsed.branch == back.branch and parsed.call_id == back.call_id
        assert parsed.cseq == (1, method)
        assert ";tag=" in (parsed.header("To") or "")


def test_response_100_has_no_to_tag_and_503_reason() -> None:
    req = sip.parse(OPTIONS)
    assert ";tag=" not in (sip.response(req, 100).header("To") or "")
    assert sip.response(req, 503).reason == "Service Unavailable"


@pytest.mark.parametrize(("value", "want"), [("7", 7), (" 12 (shedding);duration=60", 12), ("5;duration=3", 5),
                                            ("soon", None), ("", None), ("-3", None)])  # fmt: skip
def test_retry_after_seconds(value: str, want: int | None) -> None:
    msg = sip.Message(status=503, reason="Replication Behind", headers=(("Retry-After", value),))
    assert msg.retry_after == want
    assert sip.Message(status=503).retry_after is None


def test_bare_lf_and_leading_crlf_accepted() -> None:
    raw = b"\r\n\r\nSIP/2.0 200 OK\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nCall-ID: x\nCSeq: 1 OPTIONS\n\n"
    m = sip.parse(raw)
    assert m.status == 200 and m.body == b""


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "empty"),
        (b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n", "blank line"),
        (b"HELLO\r\n\r\n", "request line"),
        (b"OPTIONS sip:x SIP/3.0\r\n\r\n", "request line"),
        (b"SIP/2.0 99 Low\r\n\r\n", "status code"),
        (b"SIP/2.0 2000 OK\r\n\r\n", "status code"),
        (b"SIP/2.0 200 OK\r\nno colon here\r\n\r\n", "header line"),
        (b"SIP/2.0 200 OK\r\n folded first\r\n\r\n", "continuation"),
        (b"SIP/2.0 200 OK\r\nContent-Length: 10\r\n\r\nshort", "Content-Length"),
        (b"SIP/2.0 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"SIP/2.0 200 OK\r\nl: 1\r\nl: 2\r\n\r\nxx", "Content-Length"),
        (b"SIP/2.0 200 OK\r\nCSeq: one OPTIONS\r\n\r\n", "CSeq"),
        (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h:99999\r\n\r\n", "port"),
        (b"SIP/2.0 200 OK\r\nVia: garbage\r\n\r\n", "Via"),
        (b"SIP/2.0 200 OK\r\nX: \xff\xfe\r\n\r\n", "UTF-8"),
    ],
)
def test_bad_input_is_a_clear_value_error(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        sip.parse(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_never_crashes(raw: bytes) -> None:
    with contextlib.suppress(sip.SipParseError):
        sip.parse(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_after_valid_head_never_crashes(tail: bytes) -> None:
    with contextlib.suppress(sip.SipParseError):
        sip.parse(OPTIONS[:60] + tail)
    with contextlib.suppress(sip.SipParseError):
        sip.parse_stream(OPTIONS + tail)


def test_parse_stream_frames_partial_and_keepalives() -> None:
    a = sip.request("OPTIONS", "sip:x", via_host="h").encode()
    b = sip.request("BYE", "sip:x", via_host="h", body=b"abc").encode()
    stream = b"\r\n\r\n" + a + b
    msgs, rest = sip.parse_stream(stream[:-2])
    assert [m.method for m in msgs] == ["OPTIONS"] and rest.endswith(b"a")
    msgs, rest = sip.parse_stream(rest + stream[-2:])
    assert [m.method for m in msgs] == ["BYE"] and msgs[0].body == b"abc" and rest == b""
    with pytest.raises(sip.SipParseError, match="without Content-Length"):
        sip.parse_stream(b"SIP/2.0 200 OK\r\n\r\n")


def test_parse_targets() -> None:
    assert sip.parse_targets("udp:5060, tcp:5061") == [("udp", "127.0.0.1", 5060), ("tcp", "127.0.0.1", 5061)]
    assert sip.parse_targets("udp:10.0.0.1:5062") == [("udp", "10.0.0.1", 5062)]
    for bad in ("", "sctp:5060", "udp:0", "udp:x", "udp"):
        with pytest.raises(ValueError):
            sip.parse_targets(bad)


# ------------------------------------------------------------------------------- real local responders

Behaviour = Callable[[sip.Message], list[bytes]]


def answer(*statuses: int) -> Behaviour:
    return lambda req: [sip.response(req, s).encode() for s in statuses]


@pytest.fixture
def udp_responder() -> Iterator[Callable[[Behaviour], int]]:
    socks: list[socket.socket] = []
    stop = threading.Event()

    def start(behave: Behaviour) -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.05)
        socks.append(s)

        def loop() -> None:
            while not stop.is_set():
                try:
                    data, peer = s.recvfrom(65535)
                except (TimeoutError, OSError):
                    continue
                for out in behave(sip.parse(data)):
                    s.sendto(out, peer)

        threading.Thread(target=loop, daemon=True).start()
        return s.getsockname()[1]

    yield start
    stop.set()
    time.sleep(0.1)
    for s in socks:
        s.close()


@pytest.fixture
def tcp_responder() -> Iterator[Callable[[Behaviour], int]]:
    socks: list[socket.socket] = []
    stop = threading.Event()

    def start(behave: Behaviour) -> int:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(0.05)
        socks.append(srv)

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except (TimeoutError, OSError):
                    continue
                with conn:
                    conn.settimeout(2)
                    buf = b""
                    while True:
                        chunk = conn.recv(65535)
                        if not chunk:
                            break
                        msgs, buf = sip.parse_stream(buf + chunk)
                        if msgs:
                            for out in behave(msgs[0]):
                                # split writes: the prober must reassemble a response across reads
                                conn.sendall(out[:10])
                                conn.sendall(out[10:])
                            break

        threading.Thread(target=loop, daemon=True).start()
        return srv.getsockname()[1]

    yield start
    stop.set()
    time.sleep(0.1)
    for s in socks:
        s.close()


def _stale_then(status: int) -> Behaviour:
    """An answer to some other transaction first (must be ignored), then ours."""

    def behave(req: sip.Message) -> list[bytes]:
        other = sip.request("OPTIONS", "sip:x", via_host="127.0.0.1")
        return [sip.response(other, 200).encode(), b"garbage\r\n\r\n", sip.response(req, status).encode()]

    return behave


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_probe_ok(transport: str, udp_responder, tcp_responder) -> None:
    port = (udp_responder if transport == "udp" else tcp_responder)(answer(100, 200))
    r = sip.options_probe("127.0.0.1", port, transport, timeout=1.0)
    assert r.ok and r.status_code == 200 and r.answered, r
    assert r.latency_ms < 1000


def test_probe_ignores_stale_and_garbage(udp_responder) -> None:
    r = sip.options_probe("127.0.0.1", udp_responder(_stale_then(486)), "udp", timeout=1.0)
    assert r.ok and r.status_code == 486


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_probe_503_overloaded_but_answering(transport: str, udp_responder, tcp_responder) -> None:
    port = (udp_responder if transport == "udp" else tcp_responder)(answer(503))
    r = sip.options_probe("127.0.0.1", port, transport, timeout=1.0)
    assert not r.ok and r.status_code == 503 and r.answered
    assert "503" in r.reason


def test_probe_only_trying_is_not_ok(udp_responder) -> None:
    r = sip.options_probe("127.0.0.1", udp_responder(answer(100)), "udp", timeout=0.3)
    assert not r.ok and r.status_code == 100 and not r.answered
    assert "provisional" in r.reason


def test_probe_silence_times_out_in_time(udp_responder) -> None:
    port = udp_responder(lambda req: [])
    t0 = time.monotonic()
    r = sip.options_probe("127.0.0.1", port, "udp", timeout=0.2)
    assert not r.ok and r.status_code is None and "no answer" in r.reason
    assert time.monotonic() - t0 < 0.5


def test_probe_retransmits_over_udp(udp_responder) -> None:
    seen: list[int] = []

    def drop_first(req: sip.Message) -> list[bytes]:
        seen.append(1)
        return [] if len(seen) == 1 else [sip.response(req, 200).encode()]

    r = sip.options_probe("127.0.0.1", udp_responder(drop_first), "udp", timeout=1.5)
    assert r.ok and len(seen) == 2


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_probe_nothing_listening_fails_fast(transport: str) -> None:
    port = _free_port(socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
    r = sip.options_probe("127.0.0.1", port, transport, timeout=2.0)
    assert not r.ok and r.status_code is None
    assert r.latency_ms < 500, r  # ICMP unreachable / RST, not the timeout


def test_probe_tcp_closed_without_answer(tcp_responder) -> None:
    r = sip.options_probe("127.0.0.1", tcp_responder(lambda req: []), "tcp", timeout=1.0)
    assert not r.ok and "closed" in r.reason


def test_probe_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sip.options_probe("127.0.0.1", 5060, "sctp")
    with pytest.raises(ValueError):
        sip.options_probe("127.0.0.1", 0)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_async_probe(transport: str, udp_responder, tcp_responder) -> None:
    port = (udp_responder if transport == "udp" else tcp_responder)(
        _stale_then(200) if transport == "udp" else answer(200)
    )
    silent = udp_responder(lambda req: [])

    async def both() -> tuple[sip.ProbeResult, sip.ProbeResult]:
        return await asyncio.gather(
            sip.options_probe_async("127.0.0.1", port, transport, timeout=1.0),
            sip.options_probe_async("127.0.0.1", silent, "udp", timeout=0.2),
        )

    good, dead = asyncio.run(both())
    assert good.ok and good.status_code == 200, good
    assert not dead.ok and dead.status_code is None


# ------------------------------------------------------------------------------- late answers (async probe only)


def _after(event: threading.Event, status: int = 200) -> Behaviour:
    """A busy proxy: the final response is sent only once ``event`` is set (after the probe has timed out)."""

    def behave(req: sip.Message) -> list[bytes]:
        event.wait(5.0)
        return [sip.response(req, status).encode()]

    return behave


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_async_probe_hands_over_a_late_answer(transport: str, udp_responder, tcp_responder) -> None:
    release = threading.Event()
    port = (udp_responder if transport == "udp" else tcp_responder)(_after(release))
    handed: list[sip.LateListener] = []

    async def probe() -> tuple[sip.ProbeResult, sip.ProbeResult | None]:
        r = await sip.options_probe_async("127.0.0.1", port, transport, timeout=0.2, hand_over=handed.append)
        assert len(handed) == 1 and not handed[0].closed, r  # the socket outlives the probe's timeout
        release.set()  # only now does the "proxy" answer
        return r, await handed[0].wait(5.0)

    timed_out, late = asyncio.run(probe())
    assert not timed_out.ok and timed_out.status_code is None and "no answer within 200 ms" in timed_out.reason
    assert late is not None and late.status_code == 200 and late.answered, late
    assert 200 <= late.latency_ms < 5000, late  # measured from the probe's send
    assert late.transport == transport and handed[0].closed


def test_async_probe_late_window_ends_in_silence_and_closes(udp_responder) -> None:
    port = udp_responder(lambda req: [])
    handed: list[sip.LateListener] = []

    async def probe() -> tuple[sip.ProbeResult | None, float]:
        t0 = time.monotonic()
        await sip.options_probe_async("127.0.0.1", port, "udp", timeout=0.05, hand_over=handed.append)
        return await handed[0].wait(0.3), time.monotonic() - t0

    late, waited = asyncio.run(probe())
    assert late is None and handed[0].closed
    assert 0.3 <= waited < 0.8  # the window runs from the send, not from the hand-over


def test_async_probe_answered_in_time_or_refused_hands_nothing_over(udp_responder) -> None:
    handed: list[sip.LateListener] = []
    ok_port = udp_responder(answer(200))
    gone = _free_port(socket.SOCK_DGRAM)

    async def probes() -> list[sip.ProbeResult]:
        return [await sip.options_probe_async("127.0.0.1", p, "udp", timeout=0.5, hand_over=handed.append)
                for p in (ok_port, gone)]

    ok, refused = asyncio.run(probes())
    assert ok.ok and not refused.ok and "nothing listening" in refused.reason
    assert handed == []


def test_late_listener_cancelled_closes_its_socket(udp_responder) -> None:
    port = udp_responder(lambda req: [])
    handed: list[sip.LateListener] = []

    async def probe() -> None:
        await sip.options_probe_async("127.0.0.1", port, "udp", timeout=0.05, hand_over=handed.append)
        task = asyncio.get_running_loop().create_task(handed[0].wait(5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(probe())
    assert handed[0].closed
