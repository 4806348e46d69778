"""Caller's-eye traffic for drills: our own asyncio SIP user agents, built on :mod:`ha.sip`.

Why our own agents and not sipp: sipp's built-in scenarios carry no Record-Route/Route, and a drill must prove
that in-dialog requests (ACK, BYE) follow the route set (the VIP) across a failover. Everything here speaks
through the VIP only, as a phone would; nothing reads the cluster's own state.

What runs (all from one asyncio loop, every loop bounded in count and time):

* an OPTIONS stream to the VIP every ``interval`` (20 ms): one :class:`Sample` per probe, no retransmits (the
  retransmits a real UAC would have needed are computed afterwards from the samples, in ``measure``);
* ``registrations`` user agents, each on its own socket: REGISTER through the VIP, then answer INVITE, ACK,
  BYE, MESSAGE and OPTIONS (200), honouring Record-Route (the 200 to an INVITE echoes it);
* calls placed from a caller socket: INVITE/200/ACK, the route set taken from the 200's Record-Route
  (reversed, RFC 3261 12.1.2), ACK and BYE sent through it (loose routing), the BYE's final status recorded.

Sockets come from a ``socket_factory(kind)`` so the lab can create them inside the client's network namespace
(sockets stay in the namespace they were created in) while the loop runs in an ordinary thread.

Times are ``time.monotonic()`` seconds throughout; ``measure`` and ``report`` make them relative.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ha import sip

SocketFactory = Callable[[int], socket.socket]
NODE_HEADER = "X-Sipha-Node"  # what a reply would carry to name the node that answered (see node_of)
T2_S = 4.0  # RFC 3261 17.1.2.2: non-INVITE retransmit interval cap
_URI_HOSTPORT = re.compile(r"^sips?:(?:[^@;>]*@)?(?P<host>\[[^\]]+\]|[^:;>]+)(?::(?P<port>\d+))?(?P<params>[^>]*)")


def default_socket_factory(kind: int) -> socket.socket:
    """A plain IPv4 socket in this process's own network namespace (tests on loopback)."""
    return socket.socket(socket.AF_INET, kind)


def node_of(msg: sip.Message) -> str | None:
    """Which node answered, when the reply says so.

    The proxy template does not (yet) name the node in its replies: ``Server`` is Kamailio's version string,
    the same on every node, and the Via ``received`` names us, not it. A reply carrying ``X-Sipha-Node: node1``
    is read here; without it the drill falls back to the VIP-ownership samples (``measure.attribute_nodes``).
    Checked on Kamailio 5.6 with the lab config: ``append_to_reply("X-Sipha-Node: {{ host.name }}\\r\\n");``
    just before ``sl_send_reply("200", "OK")`` in the template's OPTIONS branch puts it in the reply.
    """
    value = msg.header(NODE_HEADER)
    return value.strip() if value else None


def uri_hostport(uri: str) -> tuple[str, int, str]:
    """``<sip:1.2.3.4:5060;lr;transport=tcp>`` -> (host, port, transport) of the hop a request goes to."""
    text = uri.strip()
    if text.startswith("<"):
        text = text[1 : text.index(">")] if ">" in text else text[1:]
    m = _URI_HOSTPORT.match(text)
    if not m:
        raise ValueError(f"not a SIP URI: {uri!r}")
    params = m["params"].lower()
    transport = "tcp" if "transport=tcp" in params else "udp"
    return m["host"].strip("[]"), int(m["port"] or 5060), transport


def _angle(value: str) -> str:
    """The URI inside a name-addr (``"x" <sip:a@b>;tag=1`` -> ``sip:a@b``)."""
    if "<" in value and ">" in value:
        return value[value.index("<") + 1 : value.index(">")]
    return value.split(";", 1)[0].strip()


def _tag(value: str | None) -> str | None:
    if not value:
        return None
    for part in value.split(">", 1)[-1].split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() == "tag":
            return v
    return None


# ---------------------------------------------------------------------------------------------- records


@dataclass
class Sample:
    """One OPTIONS probe of the stream: sent at ``sent``; ``answered`` is when its final reply arrived."""

    seq: int
    sent: float
    answered: float | None = None
    status: int | None = None
    node: str | None = None


@dataclass
class Registration:
    """One user agent's REGISTER through the VIP and, later, whether a request could still reach it."""

    user: str
    contact: str
    registered_at: float | None = None
    status: int | None = None
    reach_sent: float | None = None
    reach_status: int | None = None  # final status the sender got for the MESSAGE/INVITE to the AoR
    reach_received: bool = False  # the UA itself saw that request

    @property
    def reachable(self) -> bool:
        return self.reach_received and self.reach_status == 200


@dataclass
class Call:
    """One call from the caller to a registered UA. ``phase`` is ``established`` (set up before the fault and
    hung up after it) or ``new`` (attempted while the drill runs, hung up at once)."""

    call_id: str
    callee: str
    phase: str
    started: float
    setup_status: int | None = None
    setup_at: float | None = None
    route: list[str] = field(default_factory=list)
    remote_target: str | None = None
    bye_sent: float | None = None
    bye_status: int | None = None
    bye_at: float | None = None
    local_tag: str = ""
    remote_tag: str | None = None
    cseq: int = 1

    @property
    def set_up(self) -> bool:
        return self.setup_status is not None and 200 <= self.setup_status < 300

    @property
    def bye_ok(self) -> bool:
        return self.bye_status == 200

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("local_tag", "remote_tag", "cseq"):
            d.pop(k)
        return d


@dataclass
class TrafficRecord:
    """Everything the traffic saw; pure data, what ``measure`` computes from and ``report`` writes out."""

    samples: list[Sample] = field(default_factory=list)
    registrations: list[Registration] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    stream_reconnects: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": [asdict(s) for s in self.samples],
            "registrations": [asdict(r) for r in self.registrations],
            "calls": [c.public() for c in self.calls],
            "stream_reconnects": self.stream_reconnects,
            "errors": self.errors,
        }


# ---------------------------------------------------------------------------------------------- transport


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = sip.parse(data)
        except sip.SipParseError:
            self.ep.garbage += 1
            return
        self.ep._dispatch(msg, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable while the VIP is nowhere: not fatal
        self.ep.icmp_errors += 1


RequestHandler = Callable[["Endpoint", sip.Message, tuple[str, int]], None]


class Endpoint:
    """One SIP transport address of ours: a UDP socket, or one TCP connection to the proxy.

    Client transactions are matched by Via branch (:meth:`request`); incoming requests go to ``on_request``.
    Over UDP, :meth:`request` retransmits on the RFC 3261 T1 schedule (INVITE: doubling until a provisional;
    non-INVITE: doubling capped at T2); over TCP it does not, as the RFC says, and a lost connection is
    re-opened by :meth:`reconnect` (what a TCP phone must do after a failover).
    """

    def __init__(self, transport: str, local_ip: str, proxy: tuple[str, int], factory: SocketFactory,
                 on_request: RequestHandler | None = None, local_port: int = 0) -> None:  # fmt: skip
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport {transport!r}: udp or tcp")
        self.transport = transport
        self.local_ip = local_ip
        self.local_port = local_port
        self.proxy = proxy
        self.factory = factory
        self.on_request = on_request
        self.local: tuple[str, int] = (local_ip, local_port)
        self.garbage = 0
        self.icmp_errors = 0
        self.retransmits = 0
        self._pending: dict[str, asyncio.Future[sip.Message]] = {}
        self._provisional: set[str] = set()
        self._on_response: dict[str, Callable[[sip.Message], None]] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._responses: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # answered requests, for retransmits
        self.closed = False

    @property
    def connected(self) -> bool:
        if self.transport == "udp":
            return self._udp is not None
        return self._writer is not None and not self._writer.is_closing()

    async def open(self, timeout: float = 2.0) -> None:
        loop = asyncio.get_running_loop()
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        sock = self.factory(kind)
        try:
            sock.setblocking(False)
            if self.transport == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.local_ip, self.local_port))
            self.local = sock.getsockname()[:2]
            self.local_port = self.local[1]  # a reconnect keeps the Contact's port
            if self.transport == "udp":
                self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=sock)
                return
            await asyncio.wait_for(loop.sock_connect(sock, self.proxy), timeout)
            reader, self._writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        self._reader_task = asyncio.create_task(self._read_loop(reader))

    async def reconnect(self, timeout: float = 1.0) -> bool:
        """TCP only: drop a dead connection and open a new one from the same local port; True when up."""
        if self.closed:
            return False
        await self._close_tcp()
        try:
            await self.open(timeout)
        except (OSError, TimeoutError):
            return False
        return True

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        buffer = b""
        peer = self.proxy
        while True:
            try:
                data = await reader.read(65536)
            except (OSError, asyncio.IncompleteReadError):
                data = b""
            if not data:
                break
            try:
                messages, buffer = sip.parse_stream(buffer + data)
            except sip.SipParseError:
                self.garbage += 1
                break
            for msg in messages:
                self._dispatch(msg, peer)
        if self._writer is not None:
            self._writer.close()

    async def _close_tcp(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 1.0)
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
            self._reader_task = None

    async def close(self) -> None:
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await self._close_tcp()

    # -- sending

    def send(self, msg: sip.Message | bytes, dest: tuple[str, int] | None = None) -> bool:
        """Send bytes to ``dest`` (UDP) or on the connection (TCP); False when there is nowhere to send."""
        data = msg if isinstance(msg, bytes) else msg.encode()
        if self.transport == "udp":
            if self._udp is None:
                return False
            self._udp.sendto(data, dest or self.proxy)
            return True
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(data)
        return True

    def reply(self, req: sip.Message, resp: sip.Message, addr: tuple[str, int]) -> None:
        data = resp.encode()
        key = (req.branch or "", (req.cseq or (0, ""))[1])
        self._responses[key] = data
        while len(self._responses) > 512:
            self._responses.popitem(last=False)
        self.send(data, addr)

    def watch(self, branch: str, on_response: Callable[[sip.Message], None]) -> None:
        """Call ``on_response`` for every response with this branch (the OPTIONS stream: no waiting task)."""
        self._on_response[branch] = on_response

    def unwatch(self, branch: str) -> None:
        self._on_response.pop(branch, None)

    async def request(self, msg: sip.Message, dest: tuple[str, int] | None = None, timeout: float = 4.0,
                      retransmit: bool = True) -> sip.Message | None:  # fmt: skip
        """Send a request and wait for its final response (None on timeout or when it could not be sent)."""
        branch = msg.branch or ""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[sip.Message] = loop.create_future()
        self._pending[branch] = fut
        data = msg.encode()
        invite = msg.method == "INVITE"
        try:
            if not self.send(data, dest):
                return None
            deadline = loop.time() + timeout
            interval = sip.T1_S
            next_resend = loop.time() + interval
            while True:
                now = loop.time()
                if now >= deadline:
                    return None
                wait = deadline - now
                resending = self.transport == "udp" and retransmit and branch not in self._provisional
                if resending:
                    wait = min(wait, max(next_resend - now, 0.0))
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), wait)
                except TimeoutError:
                    if resending and loop.time() >= next_resend:
                        self.send(data, dest)
                        self.retransmits += 1
                        interval = interval * 2 if invite else min(interval * 2, T2_S)
                        next_resend = loop.time() + interval
        finally:
            self._pending.pop(branch, None)
            self._provisional.discard(branch)

    # -- receiving

    def _dispatch(self, msg: sip.Message, addr: tuple[str, int]) -> None:
        if msg.is_request:
            key = (msg.branch or "", (msg.cseq or (0, ""))[1])
            cached = self._responses.get(key)
            if cached is not None and msg.method != "ACK":
                self.send(cached, addr)  # a retransmitted request: the same answer again
                return
            if self.on_request is not None:
                self.on_request(self, msg, addr)
            return
        branch = msg.branch or ""
        cb = self._on_response.get(branch)
        if cb is not None:
            cb(msg)
            return
        fut = self._pending.get(branch)
        if fut is None or fut.done():
            return
        if msg.status is not None and msg.status < 200:
            self._provisional.add(branch)
            return
        fut.set_result(msg)


# ---------------------------------------------------------------------------------------------- user agents


class UserAgent:
    """A registered phone: REGISTERs through the VIP and answers what the proxy routes to it."""

    def __init__(self, user: str, domain: str, endpoint: Endpoint) -> None:
        self.user = user
        self.domain = domain
        self.ep = endpoint
        endpoint.on_request = self._on_request
        self.received: list[tuple[float, str, str]] = []  # (time, method, Call-ID)
        self.cseq = itertools.count(1)
        self.call_id = sip.new_call_id(endpoint.local_ip)
        self.from_tag = sip.new_tag()
        self.dialogs: dict[str, list[str]] = {}  # Call-ID -> route set as the INVITE's Record-Route gave it
        self._acked: set[str] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self.shed = 0  # REGISTERs answered 503 (the proxy shedding while its replication is behind)

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        host, port = self.ep.local
        return f"sip:{self.user}@{host}:{port}" + (";transport=tcp" if self.ep.transport == "tcp" else "")

    def register_request(self, expires: int) -> sip.Message:
        host, port = self.ep.local
        return sip.request(
            "REGISTER", f"sip:{self.domain}", via_host=host, via_port=port, transport=self.ep.transport,
            from_uri=self.aor, to_uri=self.aor, call_id=self.call_id, cseq=next(self.cseq), from_tag=self.from_tag,
            headers=(("Contact", f"<{self.contact}>"), ("Expires", str(expires)), ("User-Agent", "sipha-drill")),
        )  # fmt: skip

    async def register(self, expires: int = 600, timeout: float = 4.0, patience: float = 0.0,
                       gate: asyncio.Semaphore | None = None) -> int | None:  # fmt: skip
        """The final status of a REGISTER. ``patience``: how long in all this phone waits out a 503's Retry-After
        and registers again, as phones do (RFC 3261 21.5.4); a proxy whose replication is behind sheds REGISTERs
        so. 0: the first 503 is the answer. Each retry is a new transaction (next CSeq). ``gate`` is held while a
        request is in flight, not while waiting: many phones' bound on in-flight REGISTERs."""
        deadline = time.monotonic() + patience
        while True:
            async with gate or contextlib.nullcontext():
                resp = await self.ep.request(self.register_request(expires), timeout=timeout)
            if resp is None or resp.status != 503:
                return resp.status if resp else None
            self.shed += 1
            wait = resp.retry_after
            if wait is None or time.monotonic() + wait > deadline:
                return 503
            await asyncio.sleep(wait)

    def _resend_2xx(self, call_id: str, data: bytes, addr: tuple[str, int], interval: float, until: float) -> None:
        """RFC 3261 13.3.1.4: over UDP the callee resends its 200 (T1 doubling, capped at T2) until the ACK
        comes, for at most 64*T1; a 200 lost in a failover must not lose the call."""

        def fire() -> None:
            self._timers.discard(handle)
            if call_id in self._acked or self.ep.closed or time.monotonic() >= until:
                return
            self.ep.send(data, addr)
            self._resend_2xx(call_id, data, addr, min(interval * 2, T2_S), until)

        handle = asyncio.get_running_loop().call_later(interval, fire)
        self._timers.add(handle)

    def cancel_timers(self) -> None:
        for h in self._timers:
            h.cancel()
        self._timers.clear()

    def _on_request(self, ep: Endpoint, req: sip.Message, addr: tuple[str, int]) -> None:
        self.received.append((time.monotonic(), req.method or "", req.call_id or ""))
        method = req.method
        if method == "ACK":
            self._acked.add(req.call_id or "")
            return
        if method == "INVITE":
            # RFC 3261 12.1.1: the 200 copies Record-Route; the callee's route set is it, in order.
            rr = req.header_values("Record-Route")
            self.dialogs[req.call_id or ""] = rr
            headers = (*(("Record-Route", r) for r in rr), ("Contact", f"<{self.contact}>"))
            resp = sip.response(req, 200, headers=headers)
            ep.reply(req, resp, addr)
            if ep.transport == "udp":
                self._resend_2xx(req.call_id or "", resp.encode(), addr, sip.T1_S, time.monotonic() + 64 * sip.T1_S)
            return
        elif method in ("BYE", "MESSAGE", "OPTIONS", "CANCEL", "NOTIFY", "INFO", "UPDATE"):
            if method == "BYE":
                self.dialogs.pop(req.call_id or "", None)
            resp = sip.response(req, 200)
        else:
            resp = sip.response(req, 405)
        ep.reply(req, resp, addr)


class Caller:
    """The calling side: places calls (INVITE/200/ACK), hangs them up (BYE through the route set), and sends
    MESSAGEs to AoRs to prove a registration is still reachable."""

    def __init__(self, endpoint: Endpoint, domain: str) -> None:
        self.ep = endpoint
        self.domain = domain
        endpoint.on_request = self._on_request

    @property
    def uri(self) -> str:
        return f"sip:drill-caller@{self.domain}"

    def _on_request(self, ep: Endpoint, req: sip.Message, addr: tuple[str, int]) -> None:
        if req.method != "ACK":
            ep.reply(req, sip.response(req, 200 if req.method in ("BYE", "OPTIONS") else 405), addr)

    def _hop(self, route: list[str], target: str) -> tuple[str, int]:
        """Where an in-dialog request goes (RFC 3261 12.2.1.1, loose routing): the first Route, else the target."""
        host, port, _t = uri_hostport(route[0] if route else target)
        return host, port

    def _contact(self) -> str:
        host, port = self.ep.local
        return f"<sip:drill-caller@{host}:{port}" + (";transport=tcp>" if self.ep.transport == "tcp" else ">")

    async def call(self, callee: str, phase: str, timeout: float = 4.0) -> Call:
        host, port = self.ep.local
        to_uri = f"sip:{callee}@{self.domain}"
        call = Call(call_id=sip.new_call_id(host), callee=callee, phase=phase, started=time.monotonic(),
                    local_tag=sip.new_tag())  # fmt: skip
        inv = sip.request(
            "INVITE", to_uri, via_host=host, via_port=port, transport=self.ep.transport, from_uri=self.uri,
            to_uri=to_uri, call_id=call.call_id, cseq=1, from_tag=call.local_tag,
            headers=(("Contact", self._contact()), ("User-Agent", "sipha-drill")),
        )  # fmt: skip
        resp = await self.ep.request(inv, timeout=timeout)
        call.setup_at = time.monotonic()
        if resp is None:
            return call
        call.setup_status = resp.status
        call.remote_tag = _tag(resp.header("To"))
        if not call.set_up:
            # ACK for a non-2xx is hop-by-hop, same branch (RFC 3261 17.1.1.3): it stops the proxy's resends.
            ack = sip.Message(method="ACK", uri=to_uri, headers=(
                ("Via", inv.header("Via") or ""), ("Max-Forwards", "70"), ("From", inv.header("From") or ""),
                ("To", resp.header("To") or ""), ("Call-ID", call.call_id), ("CSeq", "1 ACK")))  # fmt: skip
            self.ep.send(ack)
            return call
        # RFC 3261 12.1.2: the caller's route set is the 2xx's Record-Route in reverse order.
        call.route = list(reversed(resp.header_values("Record-Route")))
        contact = resp.header("Contact")
        call.remote_target = _angle(contact) if contact else to_uri
        ack = self._in_dialog(call, "ACK", cseq=1)
        self.ep.send(ack, self._hop(call.route, call.remote_target))
        return call

    def _in_dialog(self, call: Call, method: str, cseq: int) -> sip.Message:
        """An in-dialog request: R-URI the remote target, the route set as Route headers, both tags."""
        host, port = self.ep.local
        assert call.remote_target is not None
        msg = sip.request(
            method, call.remote_target, via_host=host, via_port=port, transport=self.ep.transport,
            from_uri=self.uri, to_uri=f"sip:{call.callee}@{self.domain}", call_id=call.call_id, cseq=cseq,
            from_tag=call.local_tag, headers=tuple(("Route", r) for r in call.route),
        )  # fmt: skip
        if not call.remote_tag:
            return msg
        headers = tuple((k, f"{v};tag={call.remote_tag}" if k == "To" else v) for k, v in msg.headers)
        return sip.Message(method=msg.method, uri=msg.uri, headers=headers, body=msg.body)

    async def hangup(self, call: Call, timeout: float = 4.0) -> int | None:
        """BYE through the route set; the status is recorded on the call (None: no final answer)."""
        if not call.set_up or call.remote_target is None:
            return None
        call.cseq += 1
        bye = self._in_dialog(call, "BYE", cseq=call.cseq)
        call.bye_sent = time.monotonic()
        resp = await self.ep.request(bye, dest=self._hop(call.route, call.remote_target), timeout=timeout)
        call.bye_at = time.monotonic()
        call.bye_status = resp.status if resp else None
        return call.bye_status

    async def message(self, user: str, timeout: float = 4.0) -> int | None:
        """A MESSAGE to ``user``'s AoR through the VIP: the proxy must look the binding up to deliver it."""
        host, port = self.ep.local
        to_uri = f"sip:{user}@{self.domain}"
        msg = sip.request(
            "MESSAGE", to_uri, via_host=host, via_port=port, transport=self.ep.transport, from_uri=self.uri,
            to_uri=to_uri, headers=(("Content-Type", "text/plain"),), body=b"sipha drill: are you there?",
        )  # fmt: skip
        resp = await self.ep.request(msg, timeout=timeout)
        return resp.status if resp else None


# ---------------------------------------------------------------------------------------------- the stream


class OptionsStream:
    """One OPTIONS to the VIP every ``interval`` seconds, each recorded as a :class:`Sample`.

    Never retransmits: each probe is one instant's question "does the VIP answer now?". Bounded by
    ``max_samples`` and by :meth:`stop`. Over TCP a lost connection is re-opened before the next probe (the
    probes that find no connection count as unanswered), as a TCP phone reconnects.
    """

    def __init__(self, ep: Endpoint, vip: str, port: int, interval: float = 0.02, max_samples: int = 30000) -> None:
        self.ep = ep
        self.vip = vip
        self.port = port
        self.interval = interval
        self.max_samples = max_samples
        self.samples: list[Sample] = []
        self.reconnects = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, grace: float = 0.3) -> None:
        """Stop sending; wait ``grace`` for late answers (a resumed proxy answers its queued probes)."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await asyncio.sleep(grace)

    def _probe(self, seq: int) -> sip.Message:
        host, port = self.ep.local
        uri = f"sip:{self.vip}:{self.port}" + (";transport=tcp" if self.ep.transport == "tcp" else "")
        return sip.request(
            "OPTIONS", uri, via_host=host, via_port=port, transport=self.ep.transport,
            from_uri=f"sip:drill-probe@{host}", cseq=seq, headers=(("User-Agent", "sipha-drill"),),
        )  # fmt: skip

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for seq in range(1, self.max_samples + 1):
            if self._stop.is_set():
                break
            if self.ep.transport == "tcp" and not self.ep.connected and await self.ep.reconnect(self.interval):
                self.reconnects += 1
            msg = self._probe(seq)
            sample = Sample(seq=seq, sent=time.monotonic())
            self.samples.append(sample)
            branch = msg.branch or ""

            def on_response(resp: sip.Message, s: Sample = sample, b: str = branch) -> None:
                if resp.status is not None and resp.status >= 200 and s.answered is None:
                    s.answered, s.status, s.node = time.monotonic(), resp.status, node_of(resp)
                    self.ep.unwatch(b)

            self.ep.watch(branch, on_response)
            self.ep.send(msg)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, t0 + seq * self.interval - loop.time()))


# ---------------------------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class TrafficConfig:
    """What to send. ``local_ip`` is the caller host's address (in the lab: the client, 198.51.100.50)."""

    vip: str
    local_ip: str
    port: int = 5060
    transport: str = "udp"
    registrations: int = 20
    calls: int = 5
    rate: float = 2.0  # new calls per second while the fault is on
    interval: float = 0.02
    request_timeout: float = 4.0
    max_duration: float = 600.0  # the OPTIONS stream stops by itself after this
    user_prefix: str = "drill"
    expires: int = 600

    def __post_init__(self) -> None:
        if self.transport not in ("udp", "tcp"):
            raise ValueError(f"transport {self.transport!r}: udp or tcp")
        if not 0 <= self.registrations <= 2000 or not 0 <= self.calls <= 1000:
            raise ValueError("registrations must be 0-2000 and calls 0-1000")
        if self.calls and not self.registrations:
            raise ValueError("calls need at least one registration to call")
        if not 0 <= self.rate <= 200 or not 0.005 <= self.interval <= 1.0:
            raise ValueError("rate must be 0-200 calls/s and interval 5 ms-1 s")


class Traffic:
    """The whole caller's-eye load of one drill; use as ``async with Traffic(cfg) as t:``.

    Order in a drill: :meth:`start` (stream, registrations, established calls), the fault,
    :meth:`new_calls` while it lasts, then :meth:`hangup_established` and :meth:`check_reachable`
    after it; leaving the context stops the stream and closes every socket, whatever happened.
    """

    def __init__(self, cfg: TrafficConfig, factory: SocketFactory = default_socket_factory) -> None:
        self.cfg = cfg
        self.factory = factory
        self.record = TrafficRecord()
        self.uas: list[UserAgent] = []
        self.endpoints: list[Endpoint] = []
        self.caller: Caller | None = None
        self.stream: OptionsStream | None = None
        self._call_tasks: list[asyncio.Task[Call]] = []

    def _endpoint(self) -> Endpoint:
        ep = Endpoint(self.cfg.transport, self.cfg.local_ip, (self.cfg.vip, self.cfg.port), self.factory)
        self.endpoints.append(ep)
        return ep

    async def __aenter__(self) -> Traffic:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def start(self, progress: Callable[[str], None] = lambda _m: None) -> None:
        cfg = self.cfg
        sep = self._endpoint()
        await sep.open()
        self.stream = OptionsStream(sep, cfg.vip, cfg.port, cfg.interval, int(cfg.max_duration / cfg.interval) + 1)
        self.record.samples = self.stream.samples
        self.stream.start()
        cep = self._endpoint()
        await cep.open()
        self.caller = Caller(cep, cfg.vip)
        for i in range(cfg.registrations):
            ep = self._endpoint()
            await ep.open()
            self.uas.append(UserAgent(f"{cfg.user_prefix}{i + 1:04d}", cfg.vip, ep))
        progress(f"registering {len(self.uas)} user agents through {cfg.vip}")
        await self._bounded(self._register(ua) for ua in self.uas)
        done = sum(r.status == 200 for r in self.record.registrations)
        if cfg.registrations and done < cfg.registrations:
            self.record.errors.append(f"only {done}/{cfg.registrations} REGISTERs got 200 before the fault")
        if cfg.calls:
            progress(f"setting up {cfg.calls} calls")
            callees = self._callees(cfg.calls)
            calls = await self._bounded(self.caller.call(c, "established", cfg.request_timeout) for c in callees)
            self.record.calls.extend(calls)
            up = sum(c.set_up for c in calls)
            if up < cfg.calls:
                self.record.errors.append(f"only {up}/{cfg.calls} calls were set up before the fault")

    def _callees(self, n: int) -> list[str]:
        ok = [r.user for r in self.record.registrations if r.status == 200] or [ua.user for ua in self.uas]
        return [ok[i % len(ok)] for i in range(n)]

    async def _bounded(self, coros: Any, limit: int = 50) -> list[Any]:
        """Run coroutines at most ``limit`` at a time (the proxy's rate limit and our CPU both matter)."""
        sem = asyncio.Semaphore(limit)

        async def one(c: Awaitable[Any]) -> Any:
            async with sem:
                return await c

        return list(await asyncio.gather(*(one(c) for c in coros)))

    async def _register(self, ua: UserAgent) -> None:
        reg = Registration(user=ua.user, contact=ua.contact)
        self.record.registrations.append(reg)
        reg.status = await ua.register(self.cfg.expires, self.cfg.request_timeout)
        reg.registered_at = time.monotonic()

    async def new_calls(self, duration: float, phase: str = "new") -> list[Call]:
        """Attempt new calls at ``rate`` per second for ``duration`` seconds; each is hung up once set up.

        Attempts start on schedule whether or not earlier ones finished (a caller does not wait for the
        network), so an outage shows as failed or slow set-ups rather than as fewer attempts.
        """
        if self.caller is None or not self.uas or self.cfg.rate <= 0 or duration <= 0:
            return []
        n = max(1, int(duration * self.cfg.rate))
        callees = self._callees(n)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = []
        for i, callee in enumerate(callees):
            await asyncio.sleep(max(0.0, t0 + i / self.cfg.rate - loop.time()))
            tasks.append(asyncio.create_task(self._call_and_hangup(callee, phase)))
        self._call_tasks.extend(tasks)
        calls = list(await asyncio.gather(*tasks))
        self.record.calls.extend(calls)
        return calls

    async def _call_and_hangup(self, callee: str, phase: str) -> Call:
        assert self.caller is not None
        call = await self.caller.call(callee, phase, self.cfg.request_timeout)
        if call.set_up:
            await self.caller.hangup(call, self.cfg.request_timeout)
        return call

    async def hangup_established(self) -> None:
        assert self.caller is not None
        caller = self.caller
        est = [c for c in self.record.calls if c.phase == "established" and c.set_up and c.bye_sent is None]
        await self._bounded(caller.hangup(c, self.cfg.request_timeout) for c in est)

    async def check_reachable(self) -> None:
        """A MESSAGE to every registered AoR (no re-REGISTER first): reachable = the UA got it and said 200."""
        assert self.caller is not None
        caller = self.caller
        by_user = {ua.user: ua for ua in self.uas}

        async def one(reg: Registration) -> None:
            ua = by_user[reg.user]
            before = len(ua.received)
            reg.reach_sent = time.monotonic()
            reg.reach_status = await caller.message(reg.user, self.cfg.request_timeout)
            reg.reach_received = any(m == "MESSAGE" for _t, m, _c in ua.received[before:])

        await self._bounded(one(r) for r in self.record.registrations if r.status == 200)

    async def unregister(self) -> int:
        """REGISTER with Expires: 0 for every phone that registered; returns how many got a 2xx.

        Why: each drill's phones register the same AoRs from new ports, and a contact outlives its drill by
        ``expires`` (600 s). After 12 drills an AoR held more contacts than Kamailio forks to (``max_branches``
        12) and requests went only to dead ones: the 13th run of a --repeat reported every registration lost.
        A phone that goes away unregisters; so do ours, once everything was measured. (Each run also uses its
        own AoRs: in a proxy-crash series the replicated store still grew by 20 bindings per run although every
        un-REGISTER got a 200 -- a coordinator issue, reported -- and a run must not measure its predecessors.)
        """
        regs = {r.user for r in self.record.registrations if r.status == 200}
        statuses = await self._bounded(ua.register(0, self.cfg.request_timeout) for ua in self.uas if ua.user in regs)
        ok = sum(1 for st in statuses if st is not None and 200 <= st < 300)
        if ok < len(statuses):
            self.record.errors.append(f"only {ok}/{len(statuses)} un-REGISTERs (Expires: 0) got 2xx; the "
                                      f"others stay registered until they expire ({self.cfg.expires} s)")  # fmt: skip
        return ok

    async def close(self) -> None:
        """Stop the stream, cancel unfinished calls, close every socket; safe to call twice."""
        if self.stream is not None:
            await self.stream.stop()
            self.record.stream_reconnects = self.stream.reconnects
            self.stream = None
        for t in self._call_tasks:
            t.cancel()
        for t in self._call_tasks:
            with contextlib.suppress(BaseException):
                await t
        self._call_tasks.clear()
        for ua in self.uas:
            ua.cancel_timers()
        for ep in self.endpoints:
            await ep.close()
        self.endpoints.clear()


__all__ = [
    "NODE_HEADER",
    "Call",
    "Caller",
    "Endpoint",
    "OptionsStream",
    "Registration",
    "Sample",
    "Traffic",
    "TrafficConfig",
    "TrafficRecord",
    "UserAgent",
    "default_socket_factory",
    "node_of",
    "uri_hostport",
]
