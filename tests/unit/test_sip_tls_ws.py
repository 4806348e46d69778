"""The health probe over TLS and WebSocket (ha.sip_tls_ws) against the production config's real Kamailio.

The proxy runs in a throwaway namespace (``ha.kamailio_testing``) with the TLS and WS listeners of
``examples/production.yaml``; the probes run in a thread switched into it, through the same entry point the
health service uses (``ha.sip.options_probe_async``). The frame helpers are checked against RFC 6455's example.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ha.health.probe import targets_for
from ha.kamailio_testing import Proxy, running_proxy
from ha.lab.node import in_netns
from ha.proxy import kamailio
from ha.sip import ProbeResult, options_probe_async
from ha.sip_tls_ws import ws_accept, ws_frame

ROOT = Path(__file__).resolve().parents[2]

live = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(kamailio.kamailio_binary() is None, reason="kamailio is not installed"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]


def test_the_websocket_helpers_follow_rfc_6455() -> None:
    assert ws_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    frame = ws_frame(b"Hello", mask=b"\x37\xfa\x21\x3d")  # RFC 6455 5.7, "a single-frame masked text message"
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")
    assert ws_frame(b"x" * 300, mask=b"\0\0\0\0")[:4] == bytes([0x81, 0xFE, 0x01, 0x2C])


def test_the_health_service_probes_every_transport_a_phone_may_use() -> None:
    ports = {"udp": 5060, "tcp": 5060, "tls": 5061, "ws": 8080}
    assert [str(t) for t in targets_for("198.51.100.11", ports)] == [
        "udp:198.51.100.11:5060", "tcp:198.51.100.11:5060", "tls:198.51.100.11:5061", "ws:198.51.100.11:8080",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    for mark in live:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    tmp = tmp_path_factory.mktemp("kamailio-tls-ws")
    tls_cfg = tmp / "tls.cfg"
    tls_cfg.write_text(
        "[server:default]\nmethod = TLSv1.2+\n"
        f"certificate = {ROOT / 'examples/tls/api.crt'}\nprivate_key = {ROOT / 'examples/tls/api.key'}\n"
    )
    with running_proxy(tmp, "production", {"SIPHA_TLS_CFG": str(tls_cfg)}) as p:
        # running_proxy waits for the RPC socket; the TCP-based listeners may come a moment later, and the first
        # TLS connection after a start takes ~0.3-0.5 s here (each later one 4-9 ms).
        for _ in range(50):
            if probe(p, "tls").ok and probe(p, "ws").ok:
                break
            time.sleep(0.2)
        yield p


def probe(p: Proxy, transport: str, port: int | None = None, host: str | None = None) -> ProbeResult:
    ports = p.cluster.proxy.listen.ports()
    return in_netns(p.ns, lambda: asyncio.run(
        options_probe_async(host or p.node_ip, port or ports[transport], transport, timeout=2.0)))  # fmt: skip


def test_tls_and_ws_listeners_answer_the_probe(proxy: Proxy) -> None:
    for transport in ("tls", "ws"):
        r = probe(proxy, transport)
        assert r.ok and r.status_code == 200 and r.transport == transport, r
        assert r.target == f"{transport}:{proxy.node_ip}:{proxy.cluster.proxy.listen.ports()[transport]}"
    vip = next(v for v in proxy.cluster.vips if "tls" in v.transports)
    assert probe(proxy, "tls", host=vip.ip).ok  # the VIP's listener too


def test_a_broken_listener_is_reported_with_its_cause(proxy: Proxy) -> None:
    ports = proxy.cluster.proxy.listen.ports()
    plain = probe(proxy, "tls", port=ports["tcp"])  # a plain SIP/TCP listener waits for SIP, not a ClientHello
    assert not plain.ok and plain.reason == "connect or TLS handshake timed out after 2000 ms", plain
    not_ws = probe(proxy, "ws", port=ports["tcp"])  # the config's xhttp route forbids HTTP off the WS port
    assert not not_ws.ok and not_ws.reason == "WebSocket upgrade refused: 'HTTP/1.1 403 Forbidden'", not_ws
    tls_port = probe(proxy, "ws", port=ports["tls"])
    assert not tls_port.ok and tls_port.reason.startswith("connection closed by the proxy"), tls_port
    closed = probe(proxy, "tls", port=5999)
    assert not closed.ok and closed.reason == "connection refused (nothing listening)", closed

