"""The OPTIONS probe over TLS and WebSocket (RFC 7118), for the health service's asyncio loop.

Why a probe per transport: phones reach a proxy on the transports the VIP serves, and a listener can fail alone
(a TLS context that no longer loads after a certificate renewal, a WebSocket handshake route broken by a config
change) while UDP still answers. Each probe opens a fresh connection, so what it checks is what a phone
does: accept, handshake (TLS, then the HTTP upgrade for WS), and a SIP answer.

The certificate is not verified: this is a liveness probe of the node's own listener by address, and the
certificate names the service the phones know, not the node. A handshake that fails is reported with its cause.
Late answers are not listened for (unlike UDP/TCP in :mod:`ha.sip`): a connection that needed a handshake is
closed with the probe.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import time
from typing import Any

from ha.sip import ProbeResult, SipParseError, _feed, _Matcher, parse

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
MAX_FRAME = 65535  # a SIP message over WebSocket is one frame; anything bigger is not a probe's answer
SECURE_TRANSPORTS = ("tls", "ws")


def ws_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer to ``key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID, usedforsecurity=False).digest())  # the RFC's digest


def ws_frame(payload: bytes, mask: bytes | None = None) -> bytes:
    """One final text frame, masked as a client must (RFC 6455 5.3)."""
    mask = mask if mask is not None else os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def ws_message(reader: Any) -> bytes | None:
    """The next data message from the server (fragments joined, pings and pongs skipped); None on a close."""
    parts: list[bytes] = []
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        if n > MAX_FRAME:
            raise ValueError(f"a {n}-byte WebSocket frame (a probe's answer is one SIP message)")
        mask = await reader.readexactly(4) if b1 & 0x80 else b""
        data = await reader.readexactly(n)
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        opcode = b0 & 0x0F
        if opcode == 0x8:
            return None
        if opcode in (0x0, 0x1, 0x2):
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts)


async def _handshake(reader: Any, writer: Any, host: str, port: int, until: float) -> str | None:
    """The HTTP upgrade to a SIP WebSocket; None when it succeeded, else why not."""
    import asyncio

    key = base64.b64encode(os.urandom(16))
    writer.write(
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: sip\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), max(until - time.monotonic(), 0.001))
    lines = head.decode(errors="replace").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 101"):
        return f"WebSocket upgrade refused: {lines[0][:80]!r}"
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if fields.get("sec-websocket-accept", "").encode() != ws_accept(key):
        return "WebSocket upgrade answered with a wrong Sec-WebSocket-Accept"
    return None


_context: Any = None


def _client_context() -> Any:
    """One TLS client context for every probe: ``ssl.create_default_context`` loads the system's CA store, 48 ms
    on the 2-core lab machine, most of a probe's timeout; nothing is verified here, so no store is needed."""
    global _context
    if _context is None:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _context = ctx
    return _context


async def options_probe_secure(host: str, port: int, transport: str, timeout: float) -> ProbeResult:
    """One OPTIONS over a fresh TLS or WebSocket connection, judged as :func:`ha.sip.options_probe_async` does.

    Never raises for anything the peer does (refused, handshake failure, reset, garbage, silence).
    """
    import asyncio
    import ssl

    t = transport.lower()
    if t not in SECURE_TRANSPORTS:
        raise ValueError(f"transport {transport!r}: this probe speaks tls or ws")
    t0 = time.monotonic()
    deadline = t0 + timeout
    target = f"{t}:{host}:{port}"

    def result(ok: bool, code: int | None, reason: str) -> ProbeResult:
        return ProbeResult(ok, code, (time.monotonic() - t0) * 1000, reason, t, target)

    def left() -> float:
        return max(deadline - time.monotonic(), 0.001)

    ctx = _client_context() if t == "tls" else None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), left())
    except ConnectionRefusedError:
        return result(False, None, "connection refused (nothing listening)")
    except TimeoutError:
        what = "connect or TLS handshake" if t == "tls" else "connect"
        return result(False, None, f"{what} timed out after {timeout * 1000:.0f} ms")
    except ssl.SSLError as exc:
        return result(False, None, f"TLS handshake failed: {exc.reason or exc}")
    except OSError as exc:
        return result(False, None, f"connect failed: {exc.strerror or exc}")
    try:
        matcher = _Matcher(host, port, t, writer.get_extra_info("sockname")[:2])
        try:
            if t == "ws":
                refused = await _handshake(reader, writer, host, port, deadline)
                if refused:
                    return result(False, None, refused)
                writer.write(ws_frame(matcher.request))
            else:
                writer.write(matcher.request)
            await writer.drain()
            buffer = b""
            while True:
                if t == "ws":
                    msg = await asyncio.wait_for(ws_message(reader), left())
                    if msg is None:
                        return result(False, None, "WebSocket closed by the proxy before a final response")
                    try:
                        verdict = matcher.judge(parse(msg))
                    except SipParseError as exc:
                        return result(False, None, f"unparseable response: {exc}")
                    err = None
                else:
                    data = await asyncio.wait_for(reader.read(65536), left())
                    verdict, buffer, err = _feed(matcher, "tls", buffer, data)
                if verdict:
                    return result(*verdict)
                if err:
                    return result(False, None, err)
        except TimeoutError:
            code, why = matcher.timeout_reason(timeout)
            return result(False, code, why)
        except asyncio.IncompleteReadError:
            return result(False, None, f"connection closed by the proxy before a final response ({t.upper()})")
        except (asyncio.LimitOverrunError, ValueError) as exc:
            return result(False, None, f"broken {t.upper()} answer: {exc}")
        except OSError as exc:
            return result(False, None, f"{t.upper()} exchange failed: {exc.strerror or exc}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 0.1)


__all__ = ["SECURE_TRANSPORTS", "options_probe_secure", "ws_accept", "ws_frame", "ws_message"]
