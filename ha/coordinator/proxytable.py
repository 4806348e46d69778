"""The local proxy's own binding table (``ul.dump``), read over a transport that can carry all of it.

Why not the JSON-RPC datagram socket every other call uses: Kamailio 5.6's jsonrpcs sends a reply as one
datagram from a socket whose send buffer it sets to 64 KiB (the kernel doubles it), so any reply above
~128 KiB is lost: ``ul.dump`` of ~250 bindings already. 5.6's ``ul.dump`` has no paging (its one parameter,
``brief``, only drops fields; the AoR list alone still grows without bound). jsonrpcs' FIFO transport has no
size limit: the request is one line written to ``<run dir>/kamailio-rpc.fifo``, the reply is written to a
FIFO the client creates (``reply_name``, no ``.`` or ``/`` allowed) in the module's ``fifo_reply_dir``.
How :func:`dump` uses it for big tables (jsonrpcs' reply building is O(n^2)) is explained there.

The proxy config must enable it (templates/kamailio.cfg.j2)::

    modparam("jsonrpcs", "transport", 6)                     # FIFO (2) + datagram (4)
    modparam("jsonrpcs", "fifo_name", "kamailio-rpc.fifo")    # relative: under run_dir
    modparam("jsonrpcs", "fifo_reply_dir", SIPHA_RPC_REPLY_DIR)  # "/run/sipha/" (needs the trailing /)

When the FIFO is not there, :func:`dump` falls back to the datagram socket, which is enough for a small table
and fails with a clear :class:`~ha.proxy.kamailio.RpcError` for a big one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ha.coordinator.store import ContactRecord
from ha.proxy import kamailio
from ha.proxy.kamailio import RpcError

FIFO_NAME = "kamailio-rpc.fifo"
NOT_SET = "[not set]"
RPC_CALLID_SUFFIX = "@kamailio.rpc"  # ul.add's invented Call-ID: a binding replication pushed in


class FifoRpc:
    """JSON-RPC over jsonrpcs' FIFO: one call at a time, replies of any size."""

    def __init__(self, fifo: Path | str, reply_dir: Path | str | None = None, timeout: float = 10.0) -> None:
        self.fifo = Path(fifo)
        self.reply_dir = Path(reply_dir) if reply_dir is not None else self.fifo.parent
        self.timeout = timeout
        self._ids = itertools.count(1)

    @property
    def available(self) -> bool:
        return self.fifo.exists()

    def call(self, method: str, *params: Any) -> Any:
        req_id = next(self._ids)
        name = f"sipha_reply_{os.getpid()}_{req_id}_{secrets.token_hex(4)}"  # no '.' or '/': jsonrpcs refuses them
        reply = self.reply_dir / name
        os.mkfifo(reply, 0o600)
        try:
            rfd = os.open(reply, os.O_RDONLY | os.O_NONBLOCK)  # before the request: Kamailio opens it to write
            try:
                req = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params),
                                  "reply_name": name, "id": req_id}) + "\n"
                try:
                    wfd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:  # ENXIO: nobody reads it (Kamailio down); ENOENT: FIFO not configured
                    raise RpcError(f"{method}: cannot reach {self.fifo}: {exc.strerror or exc}") from None
                try:
                    os.write(wfd, req.encode())
                finally:
                    os.close(wfd)
                data = self._read_all(rfd, method)
            finally:
                os.close(rfd)
        finally:
            with contextlib.suppress(OSError):
                reply.unlink()
        return kamailio.result_of(method, kamailio.decode_reply(method, data))

    def _read_all(self, fd: int, method: str) -> bytes:
        """Until the writer closed after writing (Linux reports POLLHUP only once a writer came and went)."""
        chunks: list[bytes] = []
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while (left := deadline - time.monotonic()) > 0:
            events = poller.poll(min(left, 0.5) * 1000)
            if not events:
                continue
            while True:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    if chunks:
                        return b"".join(chunks)
                    time.sleep(0.005)  # POLLHUP before any data: cannot happen with one writer, but no spin
                    break
                chunks.append(chunk)
        raise RpcError(f"{method}: no complete answer on {self.fifo} within {self.timeout} s")


def fifo_for(rpc_socket: Path | str) -> Path:
    """The FIFO next to the datagram socket (both are relative to Kamailio's run_dir)."""
    return Path(rpc_socket).parent / FIFO_NAME


def _last_modified_ms(v: Any) -> int:
    """ul.dump's Last-Modified / Last-Keepalive (epoch seconds) in ms; 0 when absent or unreadable. (``ul.add``
    leaves Last-Modified at 0 and sets Last-Keepalive; a REGISTER sets both.)"""
    try:
        return int(v) * 1000
    except (TypeError, ValueError):
        return 0


def _s(v: Any) -> str:
    return "" if v is None or v == NOT_SET else str(v)


def _received(v: Any) -> str:
    """ul.dump's Received is a URI (``sip:1.2.3.4:5060;transport=tcp``); events carry ``proto:ip:port``."""
    s = _s(v)
    if not s.startswith(("sip:", "sips:")):
        return s
    hostport, _, params = s.split(":", 1)[1].partition(";")
    proto = "udp"
    for p in params.split(";"):
        k, _, val = p.partition("=")
        if k.lower() == "transport" and val:
            proto = val.lower()
    return f"{proto}:{hostport}"


@dataclass(frozen=True, slots=True)
class ProxyBinding:
    """One binding as the proxy holds it. ``pushed``: put there by ``ul.add`` (replication), not a REGISTER."""

    record: ContactRecord
    pushed: bool


def parse_dump(result: Any, now: float | None = None) -> dict[tuple[str, str], ProxyBinding]:
    """``ul.dump`` (full, not brief) -> {(aor, contact): binding}; permanent/deleted bindings are skipped."""
    t = int(time.time() if now is None else now)
    out: dict[tuple[str, str], ProxyBinding] = {}
    for dom in (result or {}).get("Domains", []) or []:
        for aor_entry in (dom.get("Domain", {}).get("AoRs") or []):
            info = aor_entry.get("Info", aor_entry)
            aor = info.get("AoR")
            for c in info.get("Contacts") or []:
                c = c.get("Contact", c)
                expires = c.get("Expires")
                if not isinstance(expires, int) or expires <= 0:
                    continue  # "permanent", "deleted", "expired": nothing a peer should get
                q = c.get("Q", -1)
                callid = _s(c.get("Call-ID"))
                methods = c.get("Methods", -1)
                rec = ContactRecord(
                    aor=str(aor),
                    contact=str(c.get("Address")),
                    expires_at=t + expires,
                    q=round(q * 1000) if isinstance(q, (int, float)) and q >= 0 else -1,
                    path=_s(c.get("Path")),
                    received=_received(c.get("Received")),
                    socket=_s(c.get("Socket")),
                    callid=callid,
                    cseq=int(c.get("CSeq") or 0),
                    user_agent=_s(c.get("User-Agent")),
                    flags=int(c.get("Flags") or 0),
                    cflags=int(c.get("CFlags") or 0),
                    methods=-1 if methods in (None, 4294967295) else int(methods),
                    ts_ms=max(_last_modified_ms(c.get("Last-Modified")), _last_modified_ms(c.get("Last-Keepalive"))),
                )
                out[(rec.aor, rec.contact)] = ProxyBinding(rec, pushed=callid.endswith(RPC_CALLID_SUFFIX))
    return out


def dump(rpc_socket: Path | str, *, fifo: Path | str | None = None, timeout: float = 60.0,
         window: int = 8) -> dict[tuple[str, str], ProxyBinding]:
    """The local proxy's whole table.

    With the FIFO: the AoR list (``ul.dump brief``) over the FIFO, then one ``ul.lookup`` per AoR over the
    datagram socket, pipelined. Why not one full ``ul.dump``: jsonrpcs builds its reply by appending to a
    linked list (O(n^2) in the number of AoRs): measured here, full dumps of 10k/20k/40k bindings took
    1.1/4.5/23 s, while brief 40k took 6 s and 40k lookups 1.8 s (~22k/s). Without the FIFO: one full
    ``ul.dump`` datagram, enough for a small table, a clear error for a big one.
    """
    from ha.proxy.kamailio import Rpc

    f = FifoRpc(fifo or fifo_for(rpc_socket), timeout=timeout)
    with Rpc(rpc_socket, timeout=min(timeout, 5.0)) as r:
        if not f.available:
            try:
                return parse_dump(r.call("ul.dump"))
            except RpcError as exc:
                raise RpcError(f"{exc} (no {f.fifo}: a table above ~128 KiB of JSON needs the FIFO)") from None
        brief = f.call("ul.dump", "brief") or {}
        doms = [d.get("Domain", {}) for d in brief.get("Domains", []) or []]
        tables = [(d.get("Domain", "location"), [a.get("AoR") for a in d.get("AoRs") or []]) for d in doms]
        out: dict[tuple[str, str], ProxyBinding] = {}
        for table, aors in tables:
            out.update(_lookup_many(r, table, aors, window))
        return out


def _lookup_many(r: Any, table: str, aors: list[str], window: int) -> dict[tuple[str, str], ProxyBinding]:
    """``ul.lookup`` of each AoR, pipelined; an AoR the proxy does not hold (404) is simply absent.

    Between chunks it pauses as long as the last chunk took (LOOKUP_PACE): the proxy has one JSON-RPC worker, and
    the replicator's ``ul.add``s queue behind whatever is pipelined there. Unpaced, a 26k-AoR read held them up
    for over a second."""
    out: dict[tuple[str, str], ProxyBinding] = {}
    # "Expires" is seconds left when each lookup ran: a chunk's answers are turned into absolute times with the
    # clock right after that chunk. (One clock read before the whole dump made every binding of a 40k table look
    # seconds short, and reconciliation and the standby audit "refreshed" them all.)
    took = 0.0
    for i in range(0, len(aors), LOOKUP_CHUNK):
        if took:
            time.sleep(min(took * LOOKUP_PACE, 1.0))
        t0 = time.monotonic()
        outs = r.call_many([("ul.lookup", [table, a]) for a in aors[i : i + LOOKUP_CHUNK]], window)
        took = time.monotonic() - t0
        found = [o for o in outs if isinstance(o, dict)]  # an error: the AoR went away meanwhile (404)
        lost = [o for o in outs
                if isinstance(o, RpcError) and "404" not in str(o) and "not found" not in str(o)]  # fmt: skip
        if lost:
            raise RpcError(f"ul.lookup failed for {len(lost)} AoRs (first: {lost[0]})")
        out.update(parse_dump({"Domains": [{"Domain": {"Domain": table, "AoRs": found}}]}, time.time()))
    return out


def lookup(rpc_socket: Path | str, aors: Iterable[str], *, table: str = "location", timeout: float = 5.0,
           window: int = 8) -> dict[tuple[str, str], ProxyBinding]:
    """The bindings the local proxy holds now for these AoRs (reconciliation's second look at what it would
    repair: cheap where a whole dump is seconds)."""
    from ha.proxy.kamailio import Rpc

    with Rpc(rpc_socket, timeout=timeout) as r:
        return _lookup_many(r, table, sorted(set(aors)), window)


LOOKUP_CHUNK = 2000  # ~0.1 s of lookups: the error of a chunk's clock on "Expires"
LOOKUP_PACE = 1.0  # pause after a chunk, in multiples of its time: the worker stays half free for live updates


__all__ = ["FIFO_NAME", "FifoRpc", "ProxyBinding", "dump", "fifo_for", "lookup", "parse_dump"]
