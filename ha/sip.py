"""SIP messages and the OPTIONS probe: the ground floor that agents, the health service and drills share.

Standard library only, on purpose: Pacemaker runs ``ocf:sipha:proxy`` with the system Python and a minimal
environment, and the agent's monitor must be able to import this module there.

Parsing is strict and total: any bytes either become a :class:`Message` or raise :class:`SipParseError` (a
``ValueError``) whose text says what is wrong, because a probe fed garbage by a broken proxy must report that
proxy as broken, not crash the monitor.

The probe sends a real ``OPTIONS`` and waits for the response that matches its own Via branch and Call-ID, so
a stale answer to an earlier probe (UDP can deliver late) is never taken for a live proxy.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 8.1.1.7: branches starting with this are globally unique
SIP_VERSION = "SIP/2.0"
T1_S = 0.5  # RFC 3261 retransmission base over UDP
MAX_DATAGRAM = 65535

# RFC 3261 7.3.3 and later RFCs: compact form -> canonical name.
COMPACT_FORMS = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "n": "Identity-Info",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}
# Canonical spelling of names whose capitalisation is not simply Title-Case.
_CANONICAL = {n.lower(): n for n in (*COMPACT_FORMS.values(), "CSeq", "WWW-Authenticate", "Max-Forwards", "User-Agent")}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")  # RFC 3261 25.1 token
_REASONS = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    500: "Server Internal Error",
    503: "Service Unavailable",
    603: "Decline",
}


class SipParseError(ValueError):
    """Bytes that are not a well-formed SIP message; the text names the first problem found."""


def canonical_name(name: str) -> str:
    """Header name in one spelling (compact forms expanded) so lookups and output never depend on the peer."""
    low = name.strip().lower()
    if low in COMPACT_FORMS:
        return COMPACT_FORMS[low]
    return _CANONICAL.get(low) or "-".join(p.capitalize() for p in low.split("-"))


def new_branch() -> str:
    """A Via branch with the RFC 3261 magic cookie, unique enough to match a response to one probe."""
    return MAGIC_COOKIE + secrets.token_hex(8)


def new_tag() -> str:
    return secrets.token_hex(4)


def new_call_id(host: str = "sipha") -> str:
    return f"{secrets.token_hex(10)}@{host}"


def _split_commas(value: str) -> list[str]:
    """Split a multi-value header at commas outside quotes and angle brackets (``Via: a, b``)."""
    out, cur, quoted, angle = [], [], False, 0
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            angle += 1
        elif not quoted and ch == ">":
            angle = max(0, angle - 1)
        if ch == "," and not quoted and not angle:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [v for v in out if v]


@dataclass(frozen=True)
class Via:
    """One Via value: ``SIP/2.0/UDP host:port;branch=...;rport``."""

    transport: str
    host: str
    port: int | None
    params: tuple[tuple[str, str | None], ...] = ()

    @property
    def branch(self) -> str | None:
        return self.param("branch")

    def param(self, name: str) -> str | None:
        for k, v in self.params:
            if k.lower() == name.lower():
                return v
        return None

    @classmethod
    def parse(cls, value: str) -> Via:
        proto, sep, rest = value.strip().partition(" ")
        parts = [p.strip() for p in proto.split("/")]
        if not sep or len(parts) != 3 or parts[0].upper() != "SIP" or not parts[2]:
            raise SipParseError(f"Via {value!r}: expected 'SIP/2.0/<transport> host[:port]'")
        sent_by, *raw_params = (p.strip() for p in rest.split(";"))
        host, port = _split_hostport(sent_by, f"Via {value!r}")
        params: list[tuple[str, str | None]] = []
        for p in raw_params:
            if not p:
                continue
            k, eq, v = p.partition("=")
            params.append((k.strip(), v.strip() if eq else None))
        return cls(parts[2].upper(), host, port, tuple(params))

    def __str__(self) -> str:
        hostport = f"{self.host}:{self.port}" if self.port else self.host
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)
        return f"{SIP_VERSION}/{self.transport} {hostport}{params}"


def _split_hostport(text: str, what: str) -> tuple[str, int | None]:
    text = text.strip()
    if not text:
        raise SipParseError(f"{what}: empty host")
    if text.startswith("["):  # IPv6 reference
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"{what}: unterminated IPv6 reference")
        host, rest = text[: end + 1], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise SipParseError(f"{what}: junk after IPv6 reference")
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c.isspace() for c in host):
        raise SipParseError(f"{what}: bad host {host!r}")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise SipParseError(f"{what}: bad port {port_text!r}")
    return host, int(port_text)


@dataclass(frozen=True)
class Message:
    """A SIP request (``method`` set) or response (``status`` set); headers keep their order and repeats."""

    method: str | None = None
    uri: str | None = None
    status: int | None = None
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    version: str = SIP_VERSION

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def header(self, name: str) -> str | None:
        """The first value of a header (compact forms and case do not matter), or None."""
        want = canonical_name(name)
        for k, v in self.headers:
            if k == want:
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, comma-separated values split (``Via``, ``Contact`` lists)."""
        want = canonical_name(name)
        out: list[str] = []
        for k, v in self.headers:
            if k == want:
                out.extend(_split_commas(v) if k in ("Via", "Contact", "Route", "Record-Route") else [v])
        return out

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.header_values("Via")]

    @property
    def top_via(self) -> Via | None:
        values = self.header_values("Via")
        return Via.parse(values[0]) if values else None

    @property
    def branch(self) -> str | None:
        via = self.top_via
        return via.branch if via else None

    @property
    def call_id(self) -> str | None:
        return self.header("Call-ID")

    @property
    def retry_after(self) -> int | None:
        """Seconds from ``Retry-After: 5 (comment);duration=60`` (RFC 3261 20.33); None when absent or not a
        number: a sender that gave no delay is not to be repeated at once."""
        value = self.header("Retry-After")
        digits = (value or "").strip().split(";", 1)[0].split("(", 1)[0].strip()
        return int(digits) if digits.isdigit() else None

    @property
    def cseq(self) -> tuple[int, str] | None:
        """``(number, METHOD)`` from CSeq; responses name the method of the request they answer."""
        value = self.header("CSeq")
        if value is None:
            return None
        number, _, method = value.strip().partition(" ")
        if not number.isdigit() or not _TOKEN_RE.match(method.strip()):
            raise SipParseError(f"CSeq {value!r}: expected '<number> <METHOD>'")
        return int(number), method.strip().upper()

    def encode(self) -> bytes:
        """Wire bytes; Content-Length is always written and always matches the body."""
        if self.is_request:
            start = f"{self.method} {self.uri} {self.version}"
        else:
            start = f"{self.version} {self.status} {self.reason}"
        lines = [start]
        lines += [f"{k}: {v}" for k, v in self.headers if k != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def _header_block(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError(f"header bytes are not UTF-8 (offset {exc.start})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    start = lines[0]
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        if not raw:
            continue
        if raw[0] in " \t":  # RFC 3261 7.3.1 line folding: continuation of the previous header
            if not headers:
                raise SipParseError("continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {raw.strip()}")
            continue
        name, colon, value = raw.partition(":")
        name = name.strip()
        if not colon or not name or not _TOKEN_RE.match(name):
            raise SipParseError(f"bad header line {raw[:60]!r}")
        headers.append((canonical_name(name), value.strip()))
    return start, headers


def _split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """Header block and the rest, or None when the blank line ending the headers has not arrived."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = data.find(sep)
        if idx >= 0:
            return data[:idx], data[idx + len(sep) :]
    return None


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    values = [v for k, v in headers if k == "Content-Length"]
    if not values:
        return None
    if len(set(values)) > 1 or not values[0].isdigit():
        raise SipParseError(f"bad Content-Length {values[0] if len(values) == 1 else values!r}")
    return int(values[0])


def _build(start: str, headers: list[tuple[str, str]], body: bytes) -> Message:
    parts = start.split(" ", 2)
    if start.startswith("SIP/"):
        if len(parts) < 2 or parts[0] != SIP_VERSION:
            raise SipParseError(f"bad status line {start[:80]!r}")
        code = parts[1]
        if not (len(code) == 3 and code.isdigit() and 100 <= int(code) <= 699):
            raise SipParseError(f"bad status code {code[:10]!r}")
        msg = Message(status=int(code), reason=parts[2] if len(parts) > 2 else "", headers=tuple(headers), body=body)
    else:
        if len(parts) != 3 or parts[2] != SIP_VERSION or not _TOKEN_RE.match(parts[0]) or not parts[1]:
            raise SipParseError(f"bad request line {start[:80]!r}")
        if " " in parts[1]:
            raise SipParseError(f"bad request URI {parts[1][:80]!r}")
        msg = Message(method=parts[0].upper(), uri=parts[1], headers=tuple(headers), body=body)
    # Fail here, not later in a caller, on the fields every transaction needs.
    msg.cseq  # noqa: B018 - validates
    msg.vias  # noqa: B018 - validates
    return msg


def parse(data: bytes) -> Message:
    """One whole message (a UDP datagram); raises :class:`SipParseError` on anything malformed.

    A Content-Length longer than the body is an error (truncated datagram); a missing one means the body is the
    rest of the datagram, as RFC 3261 18.3 allows over UDP.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SipParseError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data).lstrip(b"\r\n")  # RFC 3261 7.5: ignore empty lines before the start line
    if not data:
        raise SipParseError("empty message")
    split = _split_head(data)
    if split is None:
        raise SipParseError("no blank line ending the headers")
    head, rest = split
    start, headers = _header_block(head)
    length = _content_length(headers)
    if length is None:
        body = rest
    elif length > len(rest):
        raise SipParseError(f"Content-Length {length} but only {len(rest)} body bytes")
    else:
        body = rest[:length]
    return _build(start, headers, body)


def parse_stream(buffer: bytes) -> tuple[list[Message], bytes]:
    """Frame a TCP byte stream: every complete message, and the bytes still waiting for more data.

    Over a stream Content-Length is mandatory (RFC 3261 18.3); without it framing is lost, so that is an error.
    CRLF keep-alives (RFC 5626) between messages are skipped.
    """
    out: list[Message] = []
    while True:
        buffer = buffer.lstrip(b"\r\n")
        split = _split_head(buffer)
        if split is None:
            if len(buffer) > MAX_DATAGRAM:
                raise SipParseError("header block larger than 64 KiB")
            return out, buffer
        head, rest = split
        start, headers = _header_block(head)
        length = _content_length(headers)
        if length is None:
            raise SipParseError("message on a stream without Content-Length")
        if len(rest) < length:
            return out, buffer
        out.append(_build(start, headers, rest[:length]))
        buffer = rest[length:]


def request(
    method: str,
    uri: str,
    *,
    via_host: str,
    via_port: int | None = None,
    transport: str = "UDP",
    from_uri: str = "sip:sipha@localhost",
    to_uri: str | None = None,
    call_id: str | None = None,
    cseq: int = 1,
    branch: str | None = None,
    from_tag: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    max_forwards: int = 70,
) -> Message:
    """A request with every mandatory header (RFC 3261 8.1.1); ``headers`` are appended as given."""
    method = method.upper()
    if not _TOKEN_RE.match(method):
        raise ValueError(f"bad method {method!r}")
    if not 0 <= cseq < 2**31:
        raise ValueError(f"CSeq {cseq} out of range")
    via = Via(transport.upper(), via_host, via_port, (("branch", branch or new_branch()), ("rport", None)))
    base: list[tuple[str, str]] = [
        ("Via", str(via)),
        ("Max-Forwards", str(max_forwards)),
        ("From", f"<{from_uri}>;tag={from_tag or new_tag()}"),
        ("To", f"<{to_uri or uri}>"),
        ("Call-ID", call_id or new_call_id(via_host)),
        ("CSeq", f"{cseq} {method}"),
    ]
    return Message(
        method=method,
        uri=uri,
        headers=(*base, *((canonical_name(k), v) for k, v in headers), ("Content-Length", str(len(body)))),
        body=body,
    )


def response(
    req: Message,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> Message:
    """A response to ``req`` (RFC 3261 8.2.6): Via, From, To, Call-ID and CSeq copied, a To tag added."""
    if not req.is_request:
        raise ValueError("can only respond to a request")
    if not 100 <= status <= 699:
        raise ValueError(f"status {status} out of range")
    copied: list[tuple[str, str]] = []
    for k, v in req.headers:
        if k == "To" and status > 100 and ";tag=" not in v:
            v = f"{v};tag={to_tag or new_tag()}"
        if k in ("Via", "From", "To", "Call-ID", "CSeq"):
            copied.append((k, v))
    return Message(
        status=status,
        reason=reason if reason is not None else _REASONS.get(status, "Unknown"),
        headers=(*copied, *((canonical_name(k), v) for k, v in headers), ("Content-Length", str(len(body)))),
        body=body,
    )


# ---------------------------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class ProbeResult:
    """What one OPTIONS probe saw.

    ``ok`` means a final response arrived in time with a status below 500: the SIP stack is alive and willing.
    A 5xx (e.g. 503 overloaded) still proves the process answers, so ``status_code`` carries it and the caller
    decides (the OCF monitor calls that alive; the health service may call it unhealthy). ``status_code`` is
    None when nothing came back; then ``reason`` says why (refused, timeout, only provisional, garbage).
    """

    ok: bool
    status_code: int | None
    latency_ms: float
    reason: str
    transport: str = "udp"
    target: str = ""

    @property
    def answered(self) -> bool:
        """A final response arrived (any status): the process is alive, maybe unhealthy."""
        return self.status_code is not None and self.status_code >= 200


class _Matcher:
    """Builds the probe and judges each received message against it; shared by the sync and async probes."""

    def __init__(self, host: str, port: int, transport: str, local: tuple[str, int]) -> None:
        self.transport = transport
        self.branch = new_branch()
        self.call_id = new_call_id(local[0])
        uri = f"sip:{_uri_host(host)}:{port}" + (f";transport={transport}" if transport != "udp" else "")
        self.request = request(
            "OPTIONS",
            uri,
            via_host=_uri_host(local[0]),
            via_port=local[1],
            transport=transport,
            from_uri=f"sip:sipha-probe@{_uri_host(local[0])}",
            call_id=self.call_id,
            branch=self.branch,
            headers=(("Accept", "application/sdp"), ("User-Agent", "sipha-probe")),
        ).encode()
        self.provisional: int | None = None
        self.ignored = 0

    def judge(self, msg: Message) -> tuple[bool, int, str] | None:
        """A final verdict for a matching final response, None to keep waiting."""
        try:
            mine = (
                not msg.is_request
                and msg.branch == self.branch
                and msg.call_id == self.call_id
                and (msg.cseq or (0, ""))[1] == "OPTIONS"
            )
        except SipParseError:
            mine = False
        if not mine:
            self.ignored += 1
            return None
        assert msg.status is not None
        if msg.status < 200:
            self.provisional = msg.status
            return None
        return msg.status < 500, msg.status, f"{msg.status} {msg.reason}".strip()

    def timeout_reason(self, timeout: float) -> tuple[int | None, str]:
        if self.provisional is not None:
            return self.provisional, f"only provisional {self.provisional} within {timeout * 1000:.0f} ms (hung?)"
        return None, f"no answer within {timeout * 1000:.0f} ms"


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_args(transport: str, port: int, timeout: float) -> str:
    t = transport.lower()
    if t not in ("udp", "tcp"):
        raise ValueError(f"transport {transport!r}: the probe speaks udp or tcp (the async one tls and ws too)")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    return t


def options_probe(host: str, port: int, transport: str = "udp", timeout: float = 1.0) -> ProbeResult:
    """Send one SIP OPTIONS to ``host:port`` and wait up to ``timeout`` seconds for its final response.

    Never raises for anything the peer does (refused, reset, garbage, silence): that is all a result. Over UDP
    the request is retransmitted at T1 doubling (RFC 3261 17.1.2.2) inside the timeout, so one lost datagram
    does not look like a dead proxy; an ICMP port-unreachable ends the wait at once (nothing listens).
    """
    t = _check_args(transport, port, timeout)
    target = f"{t}:{host}:{port}"
    t0 = time.monotonic()
    deadline = t0 + timeout

    def result(ok: bool, code: int | None, reason: str) -> ProbeResult:
        return ProbeResult(ok, code, (time.monotonic() - t0) * 1000, reason, t, target)

    kind = socket.SOCK_DGRAM if t == "udp" else socket.SOCK_STREAM
    try:
        sock = socket.socket(_family(host), kind)
    except OSError as exc:
        return result(False, None, f"socket: {exc.strerror or exc}")
    with sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect((host, port))
            matcher = _Matcher(host, port, t, sock.getsockname()[:2])
            sock.sendall(matcher.request)
        except ConnectionRefusedError:
            return result(False, None, "connection refused (nothing listening)")
        except TimeoutError:
            return result(False, None, f"connect timed out after {timeout * 1000:.0f} ms")
        except OSError as exc:
            return result(False, None, f"send failed: {exc.strerror or exc}")
        buffer = b""
        next_resend = time.monotonic() + T1_S
        interval = T1_S
        while True:
            now = time.monotonic()
            if now >= deadline:
                code, why = matcher.timeout_reason(timeout)
                return result(False, code, why)
            wait = deadline - now
            if t == "udp":
                wait = min(wait, max(next_resend - now, 0.0005))
            sock.settimeout(wait)
            try:
                data = sock.recv(MAX_DATAGRAM)
            except TimeoutError:
                if t == "udp" and time.monotonic() >= next_resend and matcher.provisional is None:
                    with contextlib.suppress(OSError):
                        sock.send(matcher.request)
                    interval *= 2
                    next_resend = time.monotonic() + interval
                continue
            except ConnectionRefusedError:
                return result(False, None, "port unreachable (nothing listening)")
            except OSError as exc:
                return result(False, None, f"receive failed: {exc.strerror or exc}")
            verdict, buffer, err = _feed(matcher, t, buffer, data)
            if verdict:
                return result(*verdict)
            if err:
                return result(False, None, err)


def _feed(matcher: _Matcher, transport: str, buffer: bytes, data: bytes) -> tuple[tuple | None, bytes, str | None]:
    """Judge received bytes; returns (verdict or None, remaining stream buffer, fatal error or None)."""
    if transport == "udp":
        try:
            return matcher.judge(parse(data)), b"", None
        except SipParseError:
            matcher.ignored += 1  # someone else's garbage on our port is not the proxy's verdict
            return None, b"", None
    if not data:
        return None, buffer, "connection closed by peer before a final response"
    try:
        messages, buffer = parse_stream(buffer + data)
    except SipParseError as exc:
        return None, b"", f"unparseable response: {exc}"
    for msg in messages:
        verdict = matcher.judge(msg)
        if verdict:
            return verdict, buffer, None
    return None, buffer, None


class _AsyncExchange:
    """One sent async probe: its socket, matcher and UDP retransmit timer, and the receive loop over them.

    Kept as an object (not locals of the probe) so a probe that timed out can hand the very same transaction to
    a :class:`LateListener`: a late answer is still matched by this probe's branch and Call-ID.
    """

    def __init__(self, sock: socket.socket, matcher: _Matcher, transport: str, target: str, t0: float) -> None:
        self.sock = sock
        self.matcher = matcher
        self.transport = transport
        self.target = target
        self.t0 = t0
        self.buffer = b""
        self.interval = T1_S
        self.next_resend = time.monotonic() + T1_S

    def result(self, ok: bool, code: int | None, reason: str) -> ProbeResult:
        return ProbeResult(ok, code, (time.monotonic() - self.t0) * 1000, reason, self.transport, self.target)

    async def receive(self, deadline: float) -> tuple[bool, int, str] | str | None:
        """Until ``deadline`` (monotonic): a final verdict, an error text (the wait is over without one), or None
        when the deadline passed first. UDP retransmits at T1 doubling, as the blocking probe does."""
        import asyncio

        loop = asyncio.get_running_loop()
        udp = self.transport == "udp"
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            wait = deadline - now
            if udp:
                wait = min(wait, max(self.next_resend - now, 0.0005))
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, MAX_DATAGRAM), wait)
            except TimeoutError:
                if udp and time.monotonic() >= self.next_resend and self.matcher.provisional is None:
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(self.sock, self.matcher.request)
                    self.interval *= 2
                    self.next_resend = time.monotonic() + self.interval
                continue
            except ConnectionRefusedError:
                return "port unreachable (nothing listening)"
            except OSError as exc:
                return f"receive failed: {exc.strerror or exc}"
            verdict, self.buffer, err = _feed(self.matcher, self.transport, self.buffer, data)
            if verdict:
                return verdict
            if err:
                return err


class LateListener:
    """The socket of an async probe that timed out, still listening for that probe's final response.

    Why: a busy proxy answers after the probe's timeout; the probe then rightly reports no answer *in time*, but
    the late answer still proves the proxy was alive and working when the probe was sent (the health service
    counts it as overloaded, not dead). Whoever receives a listener (``hand_over`` of
    :func:`options_probe_async`) owns its socket: it must await :meth:`wait`, which always closes it, or call
    :meth:`close`.
    """

    def __init__(self, exchange: _AsyncExchange, timeout: float) -> None:
        self._x = exchange
        self.timeout = timeout  # the probe's own timeout, which this answer missed

    @property
    def transport(self) -> str:
        return self._x.transport

    @property
    def target(self) -> str:
        return self._x.target

    @property
    def closed(self) -> bool:
        return self._x.sock.fileno() == -1

    async def wait(self, window_s: float) -> ProbeResult | None:
        """The late final response if it arrives within ``window_s`` of the probe's send, else None (silence,
        an error, or the window already over); the socket is closed when this returns or is cancelled."""
        try:
            outcome = await self._x.receive(self._x.t0 + window_s)
        finally:
            self.close()
        return self._x.result(*outcome) if isinstance(outcome, tuple) else None

    def close(self) -> None:
        self._x.sock.close()


async def options_probe_async(
    host: str,
    port: int,
    transport: str = "udp",
    timeout: float = 1.0,
    *,
    hand_over: Callable[[LateListener], None] | None = None,
) -> ProbeResult:
    """:func:`options_probe` for an asyncio loop: the health service runs one every 100 ms per target.

    Same matching and verdicts; built on non-blocking sockets and the loop's ``sock_*`` calls so it costs no
    thread. UDP retransmits as in the blocking probe.

    ``hand_over``: when the request was sent but no final response came within ``timeout`` (silence or only a
    provisional), the socket is not closed but given to ``hand_over`` as a :class:`LateListener`, which then owns
    it; the returned result is the same "no answer" as without it. Without ``hand_over`` nothing changes.
    """
    import asyncio  # here, not at the top: the OCF monitor imports this module per call and asyncio costs ~25 ms

    if transport.lower() in ("tls", "ws"):  # a connection with a handshake: its own module (no late listener)
        from ha.sip_tls_ws import options_probe_secure

        _check_args("tcp", port, timeout)
        return await options_probe_secure(host, port, transport, timeout)
    t = _check_args(transport, port, timeout)
    target = f"{t}:{host}:{port}"
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    deadline = t0 + timeout

    def result(ok: bool, code: int | None, reason: str) -> ProbeResult:
        return ProbeResult(ok, code, (time.monotonic() - t0) * 1000, reason, t, target)

    kind = socket.SOCK_DGRAM if t == "udp" else socket.SOCK_STREAM
    try:
        sock = socket.socket(_family(host), kind)
    except OSError as exc:
        return result(False, None, f"socket: {exc.strerror or exc}")
    handed = False
    try:
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), max(deadline - time.monotonic(), 0.001))
            matcher = _Matcher(host, port, t, sock.getsockname()[:2])
            await loop.sock_sendall(sock, matcher.request)
        except ConnectionRefusedError:
            return result(False, None, "connection refused (nothing listening)")
        except TimeoutError:
            return result(False, None, f"connect timed out after {timeout * 1000:.0f} ms")
        except OSError as exc:
            return result(False, None, f"send failed: {exc.strerror or exc}")
        exchange = _AsyncExchange(sock, matcher, t, target, t0)
        outcome = await exchange.receive(deadline)
        if isinstance(outcome, tuple):
            return exchange.result(*outcome)
        if isinstance(outcome, str):
            return exchange.result(False, None, outcome)
        code, why = matcher.timeout_reason(timeout)
        timed_out = exchange.result(False, code, why)
        if hand_over is not None:
            hand_over(LateListener(exchange, timeout))  # from here on the listener owns the socket
            handed = True
        return timed_out
    finally:
        if not handed:
            sock.close()


def parse_targets(spec: str, default_host: str = "127.0.0.1") -> list[tuple[str, str, int]]:
    """``"udp:5060,tcp:5060"`` (optionally ``udp:10.0.0.1:5060``) -> [(transport, host, port)].

    The OCF agent and the health service take probe targets in this one spelling; errors are ValueErrors
    naming the bad item so ``validate-all`` can print them.
    """
    out: list[tuple[str, str, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        transport, sep, rest = item.partition(":")
        if not sep or transport.lower() not in ("udp", "tcp"):
            raise ValueError(f"probe target {item!r}: expected udp:PORT or tcp:PORT")
        host, _, port_text = rest.rpartition(":")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"probe target {item!r}: port must be 1-65535")
        out.append((transport.lower(), host.strip("[]") or default_host, int(port_text)))
    if not out:
        raise ValueError("no probe targets given")
    return out


__all__ = [
    "COMPACT_FORMS",
    "MAGIC_COOKIE",
    "LateListener",
    "Message",
    "ProbeResult",
    "SipParseError",
    "Via",
    "canonical_name",
    "new_branch",
    "options_probe",
    "options_probe_async",
    "parse",
    "parse_stream",
    "parse_targets",
    "request",
    "response",
]

if __name__ == "__main__":  # pragma: no cover - `python -m ha.sip HOST PORT [udp|tcp]` for an operator
    import sys

    args = sys.argv[1:]
    r = options_probe(args[0], int(args[1]), args[2] if len(args) > 2 else "udp")
    print(f"{r.target}: ok={r.ok} status={r.status_code} {r.latency_ms:.1f} ms - {r.reason}")
    sys.exit(0 if r.ok else 1)
