"""Helpers for the coordinator's lab acceptance tests: many phones on one socket, and the replicated state read
from where it really lives (ZooKeeper through ``sipha registrations|calls --json``, each proxy's ``ul.dump``).

Not a test module. Everything SIP goes from the client namespace (198.51.100.50) to the VIP, through our own UA
code (:mod:`ha.drill.traffic`); the asyncio loop runs in a background thread so the test can block on lab
commands (power off a node, read ZooKeeper) while the phones keep answering.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from ha import sip
from ha.drill.traffic import Caller, Endpoint, UserAgent
from ha.lab import lab as labmod
from ha.lab import node as labnode

T = TypeVar("T")
Binding = tuple[str, str]  # (AoR as usrloc keys it: the user part, contact URI)


class Loop:
    """An asyncio loop in a daemon thread; ``run(coro)`` blocks the caller until it is done (bounded)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="coordlab-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def client_factory(spec: dict[str, Any]) -> Any:
    ns = labmod.client_ns(spec)
    return lambda kind: labnode.in_netns(ns, lambda: socket.socket(socket.AF_INET, kind))


def _user_of(uri: str | None) -> str:
    """``sip:user@host:port;x`` -> ``user`` (the phone a request routed by the proxy is for)."""
    text = (uri or "").split(":", 1)[-1]
    return text.split("@", 1)[0] if "@" in text else ""


class Phones:
    """Many phones (our :class:`UserAgent`) sharing one UDP socket: ``sip:<user>@198.51.100.50:<port>`` each.

    The proxy routes a request to a phone by its Contact, whose user part names it: the socket's handler hands
    each request to that phone's own UserAgent, which answers it as a single phone would (200, Record-Route
    echoed for INVITE). ``seen[(method, user)]`` counts what each phone received; ``byes`` the BYE Call-IDs.
    """

    def __init__(self, spec: dict[str, Any], users: Iterable[str], local_port: int = 0) -> None:
        self.spec = spec
        self.vip = spec["vips"][0]
        self.port = int(spec["sip_port"])
        self.local_ip = labmod.host(spec, "client")["ip"]
        self.ep = Endpoint("udp", self.local_ip, (self.vip, self.port), client_factory(spec), self._on_request,
                           local_port)
        self.uas = {u: UserAgent(u, self.vip, self.ep) for u in users}
        self.ep.on_request = self._on_request  # UserAgent() took it over; requests are dispatched per user
        self.seen: dict[tuple[str, str], int] = {}
        self.byes: set[str] = set()
        self.unknown = 0

    async def open(self) -> None:
        await self.ep.open()

    def _on_request(self, ep: Endpoint, req: sip.Message, addr: tuple[str, int]) -> None:
        user = _user_of(req.uri)
        ua = self.uas.get(user)
        if ua is None:
            self.unknown += 1
            ep.reply(req, sip.response(req, 404), addr)
            return
        key = (req.method or "", user)
        self.seen[key] = self.seen.get(key, 0) + 1
        if req.method == "BYE":
            self.byes.add(req.call_id or "")
        ua._on_request(ep, req, addr)

    def got(self, method: str, user: str) -> int:
        return self.seen.get((method, user), 0)

    async def register(self, users: Iterable[str] | None = None, expires: int = 600, limit: int = 200,
                       timeout: float = 8.0, patience: float = 60.0) -> dict[str, int | None]:  # fmt: skip
        """REGISTER each phone through the VIP, at most ``limit`` in flight; user -> final status. A phone
        answered 503 waits its Retry-After and tries again for up to ``patience`` s, as real phones do: a burst
        faster than replication carries is shed so (``shed`` counts those 503s)."""
        sem = asyncio.Semaphore(limit)
        out: dict[str, int | None] = {}

        async def one(u: str) -> None:
            out[u] = await self.uas[u].register(expires, timeout, patience, sem)

        await asyncio.gather(*(one(u) for u in (self.uas if users is None else users)))
        return out

    def contact(self, user: str) -> str:
        return self.uas[user].contact

    @property
    def shed(self) -> int:
        return sum(ua.shed for ua in self.uas.values())

    async def close(self) -> None:
        for ua in self.uas.values():
            ua.cancel_timers()
        await self.ep.close()


async def open_caller(spec: dict[str, Any]) -> Caller:
    ep = Endpoint("udp", labmod.host(spec, "client")["ip"], (spec["vips"][0], int(spec["sip_port"])),
                  client_factory(spec))  # fmt: skip
    await ep.open()
    return Caller(ep, spec["vips"][0])


async def bounded(coros: Iterable[Awaitable[T]], limit: int = 200) -> list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[T]) -> T:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


# --------------------------------------------------------------------------------------------- reading state



def _py(spec: dict[str, Any], node: str, code: str, timeout: float = 120) -> str:
    env = ["env", f"PYTHONPATH={spec['repo']}"]
    p = labmod.exec_in(spec, node, [*env, sys.executable, "-c", code], timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"on {node}: {p.stderr.strip()[-600:]}")
    return p.stdout


def _sipha(spec: dict[str, Any], node: str, *args: str, timeout: float = 120) -> Any:
    env = ["env", f"PYTHONPATH={spec['repo']}"]
    p = labmod.exec_in(spec, node, [*env, sys.executable, "-m", "ha.cli", *args, "--config",
                                    "/etc/sipha/cluster.yaml", "--timeout", "10", "--json"], timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"sipha {' '.join(args)} on {node}: {p.stderr.strip()[-600:]}")
    return json.loads(p.stdout)


def up_node(spec: dict[str, Any]) -> str:
    for n in ("node1", "node2"):
        if labmod.powered(n):
            return n
    raise AssertionError("no node is powered on")


def zk_bindings(spec: dict[str, Any], prefix: str = "") -> dict[Binding, dict[str, Any]]:
    """What ZooKeeper holds (``sipha registrations --json``), unexpired, AoRs starting with ``prefix``."""
    doc = _sipha(spec, up_node(spec), "registrations")
    now = time.time()
    return {(r["aor"], r["contact"]): r for r in doc["registrations"]
            if r["aor"].startswith(prefix) and r["expires_at"] > now}  # fmt: skip


def zk_calls(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_sipha(spec, up_node(spec), "calls")["calls"])


def zk_cdrs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_sipha(spec, up_node(spec), "calls", "--cdrs")["cdrs"])


_DUMP = """
import json
from ha.coordinator.proxytable import dump
from ha.proxy.kamailio import rpc_socket
t = dump(rpc_socket(), timeout=60)
print(json.dumps([[a, c, b.record.expires_at] for (a, c), b in t.items()]))
"""


def proxy_table(spec: dict[str, Any], node: str, prefix: str = "") -> dict[Binding, int]:
    """The node's proxy's own table (``ul.dump`` over the jsonrpcs FIFO), AoRs starting with ``prefix``:
    binding -> expires_at (epoch s)."""
    rows = json.loads(_py(spec, node, _DUMP))
    return {(a, c): int(e) for a, c, e in rows if a.startswith(prefix)}


def status(spec: dict[str, Any], node: str) -> dict[str, Any]:
    """The node's coordinator status (its status socket)."""
    code = ("import json; from ha.coordinator.service import query_status, DEFAULT_STATUS_SOCKET; "
            "print(json.dumps(query_status(DEFAULT_STATUS_SOCKET)))")
    return dict(json.loads(_py(spec, node, code, timeout=20)))


def describe_diff(name_a: str, a: set[Binding], name_b: str, b: set[Binding], show: int = 5) -> str:
    only_a, only_b = sorted(a - b), sorted(b - a)
    if not only_a and not only_b:
        return ""
    return (f"{name_a} {len(a)} vs {name_b} {len(b)}: {len(only_a)} only in {name_a} (e.g. {only_a[:show]}), "
            f"{len(only_b)} only in {name_b} (e.g. {only_b[:show]})")


# --------------------------------------------------------------------------------------------- power


def power(node: str, on: bool) -> None:
    """The lab's power switch (what the node-crash fault and fencing use): off is a pulled plug."""
    from ha.lab.supervisor import power as sv_power

    sv_power("on" if on else "off", node)


def coordinator_log(spec: dict[str, Any], node: str, tail: int = 40) -> str:
    from pathlib import Path

    f = Path("/var/log/sipha") / f"coordinator-{node}.log"  # the host's /var/log: not private per node
    try:
        return "\n".join(f.read_text(errors="replace").splitlines()[-tail:])
    except OSError as exc:
        return f"({f}: {exc})"


def run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
