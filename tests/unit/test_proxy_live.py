"""The rendered lab kamailio.cfg, started for real in a throwaway network namespace (``ha.kamailio_testing``).

The namespace holds node1's address and the VIP; the test's sockets are created inside it, so nothing here
touches the host's network.

SIP bytes are built here on purpose: this test must not depend on ``ha/sip.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ha.coordinator.replication import shed_proxy
from ha.kamailio_testing import FLOODER, Proxy, ns_socket, running_proxy
from ha.proxy import kamailio

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.validators,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(kamailio.kamailio_binary() is None, reason="kamailio is not installed"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with running_proxy(tmp_path_factory.mktemp("kamailio-live"), "lab") as p:
        yield p


# ---- a few SIP messages, built by hand ---------------------------------------------------------------


def _tag() -> str:
    return secrets.token_hex(4)


def request(
    method: str,
    ruri: str,
    *,
    local: tuple[str, int],
    from_uri: str,
    to_uri: str,
    call_id: str | None = None,
    cseq: int = 1,
    from_tag: str | None = None,
    to_tag: str | None = None,
    user_agent: str = "sipha-test/1.0",
    display: str | None = None,
    headers: tuple[str, ...] = (),
) -> bytes:
    host, port = local
    name = f'"{display}" ' if display else ""
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70",
        f"From: {name}<{from_uri}>;tag={from_tag or _tag()}",
        f"To: <{to_uri}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id or uuid.uuid4().hex}",
        f"CSeq: {cseq} {method}",
        f"User-Agent: {user_agent}",
        *headers,
        "Content-Length: 0",
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


def parse(data: bytes) -> tuple[str, dict[str, list[str]]]:
    head = data.decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
    hdrs: dict[str, list[str]] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        hdrs.setdefault(name.strip().lower(), []).append(value.strip())
    return head[0], hdrs


class Phone:
    """One UDP endpoint inside the namespace, talking to the VIP."""

    def __init__(self, p: Proxy, port: int) -> None:
        self.p, self.addr = p, (p.node_ip, port)
        self.sock = ns_socket(p.ns)
        self.sock.bind(self.addr)
        self.sock.settimeout(2.0)

    def send(self, data: bytes, to: tuple[str, int] | None = None) -> None:
        self.sock.sendto(data, to or (self.p.vip, 5060))

    def recv(self, timeout: float = 2.0) -> tuple[str, dict[str, list[str]]] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65535)
        except TimeoutError:
            return None
        return parse(data)

    def ask(self, data: bytes, timeout: float = 2.0) -> str | None:
        """Send a request, return the first final reply's status line (None when nothing came)."""
        self.send(data)
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            got = self.recv(left)
            if got is None:
                return None
            if not got[0].startswith("SIP/2.0 1"):
                return got[0]
        return None

    def close(self) -> None:
        self.sock.close()


class Events:
    """The coordinator's side: UDP on 127.0.0.1:event_port inside the namespace."""

    def __init__(self, p: Proxy) -> None:
        self.sock = ns_socket(p.ns)
        self.sock.bind(("127.0.0.1", p.cluster.proxy.event_port))

    def take(self, n: int, timeout: float = 3.0) -> list[dict]:
        out: list[dict] = []
        end = time.monotonic() + timeout
        while len(out) < n and (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                out.append(json.loads(self.sock.recv(65535)))
            except TimeoutError:
                break
        return out

    def drain(self) -> None:
        self.sock.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            while True:
                self.sock.recv(65535)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def events(proxy: Proxy) -> Iterator[Events]:
    ev = Events(proxy)
    try:
        yield ev
    finally:
        ev.close()


@pytest.fixture
def phone(proxy: Proxy) -> Iterator[Phone]:
    ph = Phone(proxy, 5062)
    try:
        yield ph
    finally:
        ph.close()


def _options(p: Proxy, ph: Phone, **kw: str) -> bytes:
    return request(
        "OPTIONS", f"sip:{p.vip}", local=ph.addr, from_uri=f"sip:probe@{p.node_ip}", to_uri=f"sip:{p.vip}", **kw
    )


# ---- the tests -----------------------------------------------------------------------------------------


def test_options_to_the_vip_is_answered_200(proxy: Proxy, phone: Phone) -> None:
    assert phone.ask(_options(proxy, phone)) == "SIP/2.0 200 OK"


def test_options_to_loopback_is_answered_for_local_probes(proxy: Proxy) -> None:
    ph = Phone(proxy, 5070)
    try:
        ph.send(_options(proxy, ph), ("127.0.0.1", 5060))
        got = ph.recv()
        assert got is not None and got[0] == "SIP/2.0 200 OK"
        assert got[1]["x-sipha-node"] == ["node1"]  # drills credit each answer to the node that gave it
    finally:
        ph.close()


@pytest.mark.parametrize(
    "kw",
    [{"user_agent": "friendly-scanner"}, {"user_agent": "Friendly-Scanner 2.1"}, {"display": "sipvicious"}],
    ids=["ua", "ua-case", "from-name"],
)
def test_scanners_get_no_reply(proxy: Proxy, phone: Phone, kw: dict[str, str]) -> None:
    assert phone.ask(_options(proxy, phone, **kw), timeout=1.0) is None
    # ... while the proxy is alive and answers the same probe without the scanner's mark.
    assert phone.ask(_options(proxy, phone)) == "SIP/2.0 200 OK"


def _register(p: Proxy, ph: Phone, user: str, call_id: str, cseq: int, expires: int, ua: str) -> bytes:
    aor = f"sip:{user}@{p.vip}"
    return request(
        "REGISTER",
        f"sip:{p.vip}",
        local=ph.addr,
        from_uri=aor,
        to_uri=aor,
        call_id=call_id,
        cseq=cseq,
        user_agent=ua,
        headers=(f"Contact: <sip:{user}@{ph.addr[0]}:{ph.addr[1]}>", f"Expires: {expires}"),
    )


def test_register_emits_contact_events_in_order(proxy: Proxy, phone: Phone, events: Events) -> None:
    events.drain()
    cid = uuid.uuid4().hex
    ua = 'O\'Brien "desk" phone\\1.0'  # quotes and a backslash: the JSON must still be valid
    assert phone.ask(_register(proxy, phone, "alice", cid, 1, 300, ua)) == "SIP/2.0 200 OK"
    assert phone.ask(_register(proxy, phone, "alice", cid, 2, 600, ua)) == "SIP/2.0 200 OK"
    assert phone.ask(_register(proxy, phone, "alice", cid, 3, 0, ua)) == "SIP/2.0 200 OK"
    got = events.take(3)
    assert [e["type"] for e in got] == ["contact.insert", "contact.update", "contact.delete"], got
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and all(isinstance(s, int) for s in seqs)
    ins = got[0]
    assert ins["node"] == "node1"
    assert {e["boot"] for e in got} == {ins["boot"]} and abs(ins["boot"] - time.time()) < 600
    assert ins["aor"] == "alice"
    assert ins["contact"] == f"sip:alice@{proxy.node_ip}:5062"
    assert 295 <= ins["expires"] <= 300
    assert ins["callid"] == cid and ins["cseq"] == 1
    assert ins["user_agent"] == ua
    assert ins["received"] == f"udp:{proxy.node_ip}:5062"
    assert ins["socket"] == f"udp:{proxy.vip}:5060"
    assert abs(ins["ts"] / 1000 - time.time()) < 10
    assert got[1]["cseq"] == 2 and 595 <= got[1]["expires"] <= 600
    assert got[2]["expires"] == 0 and got[2]["cseq"] == 3
    for key in ("q", "flags", "cflags", "methods", "expires_at", "path", "ruid"):
        assert key in ins


def test_rpc_reaches_usrloc(proxy: Proxy, phone: Phone, events: Events) -> None:
    cid = uuid.uuid4().hex
    assert phone.ask(_register(proxy, phone, "carol", cid, 1, 300, "t")) == "SIP/2.0 200 OK"
    dump = kamailio.rpc("ul.dump", sock=proxy.rpc_sock)
    assert "carol" in json.dumps(dump)
    # ul.add is how a peer's bindings arrive on this proxy (positional parameters, see the design notes).
    kamailio.rpc(
        "ul.add", "location", "dave", f"sip:dave@{proxy.node_ip}:5099", 300, 1.0, "0", 0, 0, -1, sock=proxy.rpc_sock
    )
    assert "sip:dave@" in json.dumps(kamailio.rpc("ul.lookup", "location", "dave", sock=proxy.rpc_sock))
    with pytest.raises(kamailio.RpcError):
        kamailio.rpc("no.such.method", sock=proxy.rpc_sock)


def test_registers_are_shed_with_a_spread_retry_after_while_replication_is_behind(
    proxy: Proxy, phone: Phone, events: Events
) -> None:
    """The coordinator's back-pressure (htable shed=>until, epoch seconds): REGISTERs get 503 + Retry-After 5-14 s
    and change nothing (no event); with shed=>limit, that many a second are still taken; once "until" has
    passed, or is cleared, they are all taken again."""
    events.drain()
    kamailio.rpc("htable.seti", "shed", "until", int(time.time()) + 30, sock=proxy.rpc_sock)
    try:
        retries = set()
        for i in range(12):
            phone.send(_register(proxy, phone, f"shed{i}", uuid.uuid4().hex, 1, 300, "t"))
            got = phone.recv()
            assert got is not None and got[0] == "SIP/2.0 503 Replication Behind", got
            retries.add(int(got[1]["retry-after"][0]))
        assert retries <= set(range(5, 15)) and len(retries) > 1, retries
        assert "shed0" not in json.dumps(kamailio.rpc("ul.dump", sock=proxy.rpc_sock))
        assert events.take(1, timeout=0.5) == []
        # A spell with a limit: 3 REGISTERs a second taken, the rest shed (10 sent early in one second).
        with kamailio.Rpc(proxy.rpc_sock) as rpc:
            shed_proxy(rpc, int(time.time()) + 30, 3)  # what the coordinator's pace sets
        time.sleep(1.02 - time.time() % 1)
        answers = [phone.ask(_register(proxy, phone, f"lim{i}", uuid.uuid4().hex, 1, 300, "t")) for i in range(10)]
        assert answers == ["SIP/2.0 200 OK"] * 3 + ["SIP/2.0 503 Replication Behind"] * 7, answers
        kamailio.rpc("htable.seti", "shed", "until", int(time.time()) - 1, sock=proxy.rpc_sock)  # a spell run out
        assert phone.ask(_register(proxy, phone, "shed0", uuid.uuid4().hex, 1, 300, "t")) == "SIP/2.0 200 OK"
    finally:
        kamailio.rpc("htable.delete", "shed", "until", sock=proxy.rpc_sock)
        kamailio.rpc("htable.delete", "shed", "limit", sock=proxy.rpc_sock)


def test_rpc_pipelined_ul_add(proxy: Proxy) -> None:
    """The coordinator's apply path: many ul.add through one client, pipelined, in order."""
    n = 2000
    calls = [
        ("ul.add", ["location", f"bulk{i}", f"sip:bulk{i}@198.51.100.60:5060", 600, 1.0, "0", 0, 0, -1])
        for i in range(n)
    ]
    with kamailio.Rpc(proxy.rpc_sock) as client:
        t0 = time.monotonic()
        results = client.call_many(calls)
        rate = n / (time.monotonic() - t0)
        assert not [r for r in results if isinstance(r, kamailio.RpcError)]
        for i in (0, n - 1):
            assert f"sip:bulk{i}@" in json.dumps(client.call("ul.lookup", "location", f"bulk{i}"))
    print(f"ul.add pipelined over the datagram socket: {rate:.0f}/s")
    assert rate > 500


def test_call_routes_through_the_vip_and_emits_dialog_events(proxy: Proxy, events: Events) -> None:
    """alice calls bob: INVITE, 200, ACK and BYE through the proxy; Record-Route names the VIP."""
    alice, bob = Phone(proxy, 5064), Phone(proxy, 5066)
    try:
        assert bob.ask(_register(proxy, bob, "bob", uuid.uuid4().hex, 1, 300, "bob")) == "SIP/2.0 200 OK"
        events.drain()
        cid, ftag = uuid.uuid4().hex, _tag()
        a_uri, b_uri = f"sip:alice@{proxy.vip}", f"sip:bob@{proxy.vip}"
        a_contact = f"Contact: <sip:alice@{alice.addr[0]}:{alice.addr[1]}>"
        alice.send(
            request(
                "INVITE",
                b_uri,
                local=alice.addr,
                from_uri=a_uri,
                to_uri=b_uri,
                call_id=cid,
                from_tag=ftag,
                headers=(a_contact,),
            )
        )
        # bob gets the INVITE with our Record-Route, and answers 200 echoing it.
        got = bob.recv()
        assert got is not None and got[0].startswith("INVITE sip:bob@"), got
        inv = got[1]
        rr = inv.get("record-route", [])
        assert rr and proxy.vip in rr[0] and ";lr" in rr[0], rr
        ttag = _tag()
        reply = "\r\n".join(
            [
                "SIP/2.0 200 OK",
                *[f"Via: {v}" for v in inv["via"]],
                *[f"Record-Route: {r}" for r in rr],
                f"From: {inv['from'][0]}",
                f"To: {inv['to'][0]};tag={ttag}",
                f"Call-ID: {cid}",
                f"CSeq: {inv['cseq'][0]}",
                f"Contact: <sip:bob@{bob.addr[0]}:{bob.addr[1]}>",
                "Content-Length: 0",
                "",
                "",
            ]
        ).encode()
        # Vias are stacked one per header line by Kamailio; the top one is the proxy's.
        bob.send(reply, (proxy.vip, 5060))
        final = None
        end = time.monotonic() + 3
        while final is None and time.monotonic() < end:
            r = alice.recv(1.0)
            if r and not r[0].startswith("SIP/2.0 1"):
                final = r
        assert final is not None and final[0] == "SIP/2.0 200 OK", final
        route = [f"Route: {r}" for r in final[1].get("record-route", [])]
        assert route and proxy.vip in route[0]
        b_target = f"sip:bob@{bob.addr[0]}:{bob.addr[1]}"
        alice.send(
            request(
                "ACK",
                b_target,
                local=alice.addr,
                from_uri=a_uri,
                to_uri=b_uri,
                call_id=cid,
                from_tag=ftag,
                to_tag=ttag,
                headers=tuple(route),
            ),
            (proxy.vip, 5060),
        )
        got = bob.recv()
        assert got is not None and got[0].startswith("ACK "), got
        alice.send(
            request(
                "BYE",
                b_target,
                local=alice.addr,
                from_uri=a_uri,
                to_uri=b_uri,
                call_id=cid,
                cseq=2,
                from_tag=ftag,
                to_tag=ttag,
                headers=tuple(route),
            ),
            (proxy.vip, 5060),
        )
        got = bob.recv()
        assert got is not None and got[0].startswith("BYE "), got
        bye = got[1]
        bob.send(
            "\r\n".join(
                [
                    "SIP/2.0 200 OK",
                    *[f"Via: {v}" for v in bye["via"]],
                    f"From: {bye['from'][0]}",
                    f"To: {bye['to'][0]}",
                    f"Call-ID: {cid}",
                    f"CSeq: {bye['cseq'][0]}",
                    "Content-Length: 0",
                    "",
                    "",
                ]
            ).encode(),
            (proxy.vip, 5060),
        )
        evs = [e for e in events.take(2) if e.get("callid") == cid]
        assert [e["type"] for e in evs] == ["dialog.start", "dialog.end"], evs
        start = evs[0]
        assert start["from_tag"] == ftag and start["to_tag"] == ttag, evs
        assert start["start_ts"] > 0 and abs(start["created_ms"] / 1000 - time.time()) < 10
        assert evs[1]["seq"] > start["seq"]
    finally:
        alice.close()
        bob.close()


def test_expired_contact_emits_an_event(proxy: Proxy, events: Events) -> None:
    """A binding added over JSON-RPC with a 1 s lifetime is expired by usrloc's timer (every 10 s)."""
    events.drain()
    kamailio.rpc(
        "ul.add", "location", "erin", f"sip:erin@{proxy.node_ip}:5098", 1, 1.0, "0", 0, 0, -1, sock=proxy.rpc_sock
    )
    got = [e for e in events.take(1, timeout=15) if e.get("aor") == "erin"]
    assert got and got[0]["type"] == "contact.expired" and got[0]["contact"] == f"sip:erin@{proxy.node_ip}:5098"


def test_flooding_source_is_blocked_silently_and_trusted_ones_are_not(proxy: Proxy, phone: Phone) -> None:
    """More than max_requests per window from one untrusted source: it is dropped for block_s."""
    rl = proxy.cluster.proxy.rate_limit
    flood = ns_socket(proxy.ns)
    try:
        flood.bind((FLOODER, 5080))
        probe = request(
            "OPTIONS", f"sip:{proxy.vip}", local=(FLOODER, 5080), from_uri=f"sip:f@{FLOODER}", to_uri=f"sip:{proxy.vip}"
        )
        flood.settimeout(1.0)
        flood.sendto(probe, (proxy.vip, 5060))
        assert parse(flood.recv(65535))[0] == "SIP/2.0 200 OK"  # not blocked before the flood
        flood.setblocking(False)
        # pike trips between 1x and 3x the density; 4x within one window is well past it.
        for _ in range(4 * rl.max_requests):
            flood.sendto(probe, (proxy.vip, 5060))
            with contextlib.suppress(BlockingIOError):
                while True:
                    flood.recv(65535)
        time.sleep(0.3)
        with contextlib.suppress(BlockingIOError):
            while True:
                flood.recv(65535)
        flood.settimeout(1.0)
        flood.sendto(probe, (proxy.vip, 5060))
        with pytest.raises(TimeoutError):
            flood.recv(65535)
    finally:
        flood.close()
    # The cluster's own addresses are exempt: node1's phone still gets its answer.
    assert phone.ask(_options(proxy, phone)) == "SIP/2.0 200 OK"


def test_production_config_starts_with_tls_and_websocket(tmp_path: Path) -> None:
    """TLS and WebSocket only fail at start-up (kamailio -c reads no tls.cfg): start the production node."""
    tls_cfg = tmp_path / "tls.cfg"
    tls_cfg.write_text(
        "[server:default]\nmethod = TLSv1.2+\n"
        f"certificate = {ROOT / 'examples/tls/api.crt'}\nprivate_key = {ROOT / 'examples/tls/api.key'}\n"
    )
    with running_proxy(tmp_path, "production", {"SIPHA_TLS_CFG": str(tls_cfg)}) as p:
        c = p.cluster
        sips = next(v for v in c.vips if "tls" in v.transports)
        ports = c.proxy.listen.ports()
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the example certificate is self-signed
        raw = ns_socket(p.ns, socket.SOCK_STREAM)
        raw.settimeout(3)
        raw.connect((sips.ip, ports["tls"]))
        with ctx.wrap_socket(raw) as tls:
            # A probe naming the VIP without the TLS port is still "us".
            tls.sendall(
                request(
                    "OPTIONS",
                    f"sip:{sips.ip}",
                    local=(p.node_ip, 5555),
                    from_uri=f"sip:probe@{p.node_ip}",
                    to_uri=f"sip:{sips.ip}",
                ).replace(b"SIP/2.0/UDP", b"SIP/2.0/TLS")
            )
            assert tls.recv(4096).split(b"\r\n", 1)[0] == b"SIP/2.0 200 OK"
        ws = ns_socket(p.ns, socket.SOCK_STREAM)
        try:
            ws.settimeout(3)
            ws.connect((sips.ip, ports["ws"]))
            ws.sendall(
                f"GET / HTTP/1.1\r\nHost: {sips.ip}:{ports['ws']}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: sip\r\n\r\n".encode()
            )
            assert ws.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 101 Switching Protocols"
        finally:
            ws.close()


def test_bye_for_a_dialog_set_up_elsewhere_is_reported(proxy: Proxy, events: Events) -> None:
    """After a failover the BYE arrives at a proxy that never saw the INVITE: it still routes, and says so."""
    bob = Phone(proxy, 5068)
    try:
        events.drain()
        cid, ftag, ttag = uuid.uuid4().hex, _tag(), _tag()
        target = f"sip:bob@{bob.addr[0]}:{bob.addr[1]}"
        bye = request(
            "BYE", target, local=(proxy.node_ip, 5064), from_uri=f"sip:alice@{proxy.vip}",
            to_uri=f"sip:bob@{proxy.vip}", call_id=cid, cseq=5, from_tag=ftag, to_tag=ttag,
            headers=(f"Route: <sip:{proxy.vip};lr;ftag={ftag};did=abc.123>",),
        )  # fmt: skip
        caller = Phone(proxy, 5064)
        try:
            caller.send(bye)
            got = bob.recv()
            assert got is not None and got[0] == f"BYE {target} SIP/2.0", got
        finally:
            caller.close()
        evs = [e for e in events.take(1) if e.get("callid") == cid]
        assert evs and evs[0]["type"] == "dialog.end" and evs[0]["known"] is False, evs
        assert evs[0]["from_tag"] == ftag and evs[0]["to_tag"] == ttag and evs[0]["h_id"] == 0
    finally:
        bob.close()


def test_unregister_all_contacts_reports_each(proxy: Proxy, events: Events) -> None:
    a, b = Phone(proxy, 5072), Phone(proxy, 5074)
    try:
        assert a.ask(_register(proxy, a, "frank", uuid.uuid4().hex, 1, 300, "a")) == "SIP/2.0 200 OK"
        assert b.ask(_register(proxy, b, "frank", uuid.uuid4().hex, 1, 300, "b")) == "SIP/2.0 200 OK"
        events.drain()
        aor = f"sip:frank@{proxy.vip}"
        star = request("REGISTER", f"sip:{proxy.vip}", local=a.addr, from_uri=aor, to_uri=aor, cseq=9,
                       headers=("Contact: *", "Expires: 0"))  # fmt: skip
        assert a.ask(star) == "SIP/2.0 200 OK"
        got = events.take(2)
        assert sorted((e["type"], e["contact"]) for e in got) == [
            ("contact.delete", f"sip:frank@{proxy.node_ip}:5072"),
            ("contact.delete", f"sip:frank@{proxy.node_ip}:5074"),
        ], got
    finally:
        a.close()
        b.close()
