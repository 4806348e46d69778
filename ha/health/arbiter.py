"""The witness's VIP lease: one holder at a time, so that a fast claim never overlaps the old holder.

Why: the fast claim (ha.health.fastclaim) acts on Corosync's membership ~650 ms after a node is lost, but a
node cut off from everybody cannot tell that from its peer's death and kept reading "quorate" ~200 ms longer
than the survivor needed to claim (its qdevice had not given up on qnetd yet): a fixed hold of the qdevice
timeout closed most of that overlap but cost every node crash the same 600 ms. A lease served by the witness
tells the two cases apart at once, by reachability:

* the holder of a VIP renews the lease every quarter of ``lease_s``; the node that wants to claim must be
  granted it, which happens only once the holder has stopped renewing for ``lease_s``;
* a holder whose peers just left the membership, or fell silent (:class:`PeerWatch`), keeps its VIPs only
  while its lease is valid, counted from when it *sent* the granted request (so it always lapses before the
  witness's copy does). A crashed peer leaves the lease with the holder: no gap on a standby's crash. A
  holder cut off from the witness loses it and drops its VIPs before the survivor can first ask.

The lease is one for all VIPs (they fail over together). The wire format is one UDP datagram each way: 32 hex
digits of HMAC-SHA256 over the JSON body, a space, the body; the key (``failover.lease_key_file``) is derived
from the cluster's Corosync authkey (:func:`lease_key_of`), so only the cluster's hosts can take or hold the
lease.

A lease that lapsed is granted to a claiming peer only within :func:`claim_window_s` of the lapse: a holder that
crashed or was cut off stopped renewing just before the survivor saw it leave the membership. A holder whose
health service died stopped renewing long before, and may still have its VIPs; a claim then would put the
address on both nodes until Pacemaker fences the cut-off one, so it is refused and Pacemaker decides (fence
first). For the same reason a restarted arbiter grants claims only once it has seen a holder (a live holder
renews within a quarter lease time; nodes that already have the VIPs are always granted a free lease).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ha.netaddr import ipv4_addresses

log = logging.getLogger("sipha.health.arbiter")

MAX_SKEW_S = 30.0  # a request stamped further from the arbiter's clock is a replay (or a broken clock)
MAX_DATAGRAM = 1024


def fresh(ts: object) -> bool:
    """A request's timestamp is close enough to this clock (a replayed datagram is not)."""
    return isinstance(ts, (int, float)) and not isinstance(ts, bool) and abs(ts - time.time()) <= MAX_SKEW_S


class BadMessage(ValueError):
    """A datagram that is not a well-formed, authenticated lease message."""


def lease_key_of(authkey: bytes) -> bytes:
    """The lease key written from the cluster's Corosync authkey: SHA-256 (hex) of its base64 text, which is
    what the playbook's ``hash('sha256')`` of the slurped authkey gives. Text, and it reveals nothing of the
    authkey, so it may be readable by the health service's group."""
    return hashlib.sha256(base64.b64encode(authkey)).hexdigest().encode() + b"\n"


def load_key(path: str | Path) -> bytes:
    """The shared secret every cluster host has (``failover.lease_key_file``; read once, at start)."""
    data = Path(path).read_bytes()
    if len(data) < 16:
        raise ValueError(f"{path}: the lease key must be at least 16 bytes, got {len(data)}")
    return data


def pack(key: bytes, msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()[:32].encode() + b" " + body


def unpack(key: bytes, data: bytes) -> dict[str, Any]:
    if len(data) > MAX_DATAGRAM:
        raise BadMessage(f"oversized datagram ({len(data)} bytes)")
    mac, sep, body = data.partition(b" ")
    if not sep or len(mac) != 32:
        raise BadMessage("no MAC")
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).hexdigest()[:32].encode()):
        raise BadMessage("bad MAC (another cluster's key, or a forged datagram)")
    try:
        msg = json.loads(body)
    except ValueError as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise BadMessage("not a JSON object")
    return msg


def acquire_s(lease_s: float) -> float:
    """How long after its peers left a node keeps asking for the lease (ha.health.fastclaim): two lease times
    and a margin. A holder that still renews keeps it that long, and Pacemaker decides then."""
    return 2 * lease_s + 0.5


def claim_window_s(token_ms: int, consensus_ms: int, lease_ms: int) -> float:
    """How long after a lease lapsed a peer's claim may still be granted it.

    A crashed or cut-off holder's lease lapses at most a lease time after its last renewal; the survivor sees it
    leave token + consensus after that contact and asks for up to :func:`acquire_s`. Doubled for a loaded machine
    (a later claim is only refused: Pacemaker then fences and starts, seconds slower, never unsafe). The lab's
    timings give 3.9 s.
    """
    return 2 * ((token_ms + consensus_ms) / 1000 + acquire_s(lease_ms / 1000))


DEFAULT_CLAIM_WINDOW_S = claim_window_s(300, 360, 400)  # the model's default timings


@dataclass
class Decision:
    granted: bool
    holder: str | None
    remaining_ms: int
    why: str = ""  # why a free lease was refused (empty when granted, or held by another node)


class Lease:
    """The arbiter's rule, with time passed in so that it is testable without waiting."""

    def __init__(self, lease_s: float, claim_window: float = DEFAULT_CLAIM_WINDOW_S) -> None:
        self.lease_s, self.claim_window = lease_s, claim_window
        self.holder: str | None = None  # the last holder, kept after its lease lapsed (None: released, or unknown)
        self.expires = 0.0
        self.released = False  # the last holder let go (a release), rather than falling silent

    def hold(self, node: str, has_vips: bool, now: float) -> Decision:
        free = self.holder is None or now >= self.expires
        if not free and self.holder != node:
            return Decision(False, self.holder, max(0, round((self.expires - now) * 1000)))
        why = "" if self.holder == node or has_vips else self.unclaimable(now)
        if why:
            return Decision(False, self.holder, 0, why)
        self.holder, self.expires, self.released = node, now + self.lease_s, False
        return Decision(True, node, round(self.lease_s * 1000))

    def unclaimable(self, now: float) -> str:
        """Why a free lease may not go to a node that does not have the VIPs yet ("" when it may)."""
        if self.holder is None:
            return "" if self.released else ("no holder has renewed since the witness's arbiter started: the "
                                             "node with the VIPs may have no health service; Pacemaker decides")
        lapsed = now - self.expires
        if lapsed <= self.claim_window:
            return ""
        return (f"{self.holder}'s lease lapsed {lapsed:.1f} s before this claim (more than {self.claim_window:.1f} s): "
                f"its health service stopped renewing while it may still have the VIPs; Pacemaker decides")

    def release(self, node: str) -> bool:
        if self.holder != node:
            return False
        self.holder, self.expires, self.released = None, 0.0, True
        return True


class ArbiterServer:
    """The witness's side: answers hold/release datagrams from the cluster's nodes."""

    def __init__(self, bind: tuple[str, int], key: bytes, lease_s: float, nodes: set[str],
                 clock: Callable[[], float] = time.monotonic,
                 claim_window: float = DEFAULT_CLAIM_WINDOW_S) -> None:  # fmt: skip
        self.key, self.nodes, self.clock = key, nodes, clock
        self.lease = Lease(lease_s, claim_window)
        self._refusal = ""  # the last refusal of a free lease that was logged (one line per episode, not per ask)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(bind)
        self.sock.settimeout(0.5)
        self.counts = {"requests": 0, "granted": 0, "refused": 0, "refused_lapsed": 0, "released": 0, "bad": 0}

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def handle(self, data: bytes) -> bytes | None:
        """The reply to one datagram, or None for one that gets no answer (counted and logged)."""
        try:
            msg = unpack(self.key, data)
            op, node, rid = msg.get("op"), msg.get("node"), msg.get("id")
            if node not in self.nodes:
                raise BadMessage(f"unknown node {node!r}")
            if not isinstance(rid, int) or isinstance(rid, bool):
                raise BadMessage("id must be an integer")
            if not fresh(msg.get("ts")):
                raise BadMessage(f"ts {msg.get('ts')!r} is more than {MAX_SKEW_S:g} s from this clock (a replay?)")
        except BadMessage as exc:
            self.counts["bad"] += 1
            log.warning("arbiter_bad_request why=%r", str(exc))
            return None
        self.counts["requests"] += 1
        before = self.lease.holder if self.clock() < self.lease.expires else None
        if op == "hold":
            d = self.lease.hold(node, bool(msg.get("has_vips")), self.clock())
            self.counts["granted" if d.granted else "refused"] += 1
            if d.granted and before != node:
                log.info("arbiter_lease_taken node=%s previous=%s", node, before)
            reply = {"id": rid, "granted": d.granted, "holder": d.holder, "remaining_ms": d.remaining_ms}
            if d.why:
                self.counts["refused_lapsed"] += 1
                reply["why"] = d.why
                if self._refusal != f"{node}/{d.holder}":
                    self._refusal = f"{node}/{d.holder}"
                    log.warning("arbiter_claim_refused node=%s holder=%s why=%r", node, d.holder, d.why)
            elif d.granted:
                self._refusal = ""
            return pack(self.key, reply)
        if op == "release":
            if self.lease.release(node):
                self.counts["released"] += 1
                log.info("arbiter_lease_released node=%s", node)
            return pack(self.key, {"id": rid, "granted": False, "holder": None, "remaining_ms": 0})
        self.counts["bad"] += 1
        log.warning("arbiter_bad_request why=%r", f"unknown op {op!r}")
        return None

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                data, peer = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError as exc:
                log.warning("arbiter_receive_error error=%r", exc)
                stop.wait(0.1)
                continue
            reply = self.handle(data)
            if reply is not None:
                try:
                    self.sock.sendto(reply, peer)
                except OSError as exc:
                    log.warning("arbiter_send_error peer=%s error=%r", peer, exc)

    def close(self) -> None:
        self.sock.close()


class LeaseClient:
    """A node's side: renews the lease while this node has a VIP, and asks for it before a claim.

    ``has_vips`` must be cheap (it is asked every renewal period). Validity is counted from the send time of
    the granted request, minus a margin for the two clocks' rates, so it ends before the arbiter's.
    """

    def __init__(self, node: str, source_ip: str, arbiter: tuple[str, int], key: bytes, lease_s: float,
                 has_vips: Callable[[], bool], on_tick: Callable[[], None] = lambda: None,
                 reply_timeout_s: float = 0.05) -> None:  # fmt: skip
        self.node, self.key, self.lease_s = node, key, lease_s
        self.has_vips, self.on_tick, self.reply_timeout_s = has_vips, on_tick, reply_timeout_s
        self.period_s = lease_s / 4
        self.valid_until = 0.0
        self.holder: str | None = None  # the last holder the arbiter named
        self.why = ""  # why the arbiter last refused a free lease (its words), "" otherwise
        self._ids = 0
        self._lock = threading.Lock()
        self._had_vips = False
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source_ip, 0))
        self.sock.connect(arbiter)
        self._thread = threading.Thread(target=self._loop, name="vip-lease", daemon=True)

    def valid(self) -> bool:
        return time.monotonic() < self.valid_until

    def request(self, op: str, has_vips: bool) -> bool:
        """One exchange; True when the lease is (now) this node's. No answer leaves the validity as it was."""
        with self._lock:
            self._ids += 1
            rid, sent = self._ids, time.monotonic()
            msg = {"op": op, "node": self.node, "id": rid, "ts": time.time(), "has_vips": has_vips}
            try:
                self.sock.send(pack(self.key, msg))
            except OSError:
                return False
            deadline = sent + self.reply_timeout_s
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    reply = unpack(self.key, self.sock.recv(MAX_DATAGRAM + 1))
                except (TimeoutError, BadMessage, OSError):
                    # ConnectionRefused (nothing listening) is an OSError too: the same as no answer
                    return False
                if reply.get("id") != rid:
                    continue  # a late answer to an earlier request
                self.holder = reply.get("holder")
                self.why = reply.get("why") if isinstance(reply.get("why"), str) else ""
                if op == "hold" and reply.get("granted") is True:
                    self.valid_until = sent + self.lease_s - max(0.02, self.lease_s * 0.05)
                    return True
                self.valid_until = 0.0
                return False
            return False

    def acquire(self, until: float, still_wanted: Callable[[], bool], retry_s: float = 0.025) -> bool:
        """Ask until granted, ``until`` (monotonic) passes, or the claim is no longer wanted."""
        for _ in range(100_000):  # bounded; the deadline ends it long before
            if time.monotonic() >= until or not still_wanted():
                return False
            if self.request("hold", self.has_vips()):
                return True
            self._stop.wait(retry_s)
        return False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                has = self.has_vips()
                if has:
                    self.request("hold", True)
                elif self._had_vips:
                    self.request("release", False)
                    self.valid_until = 0.0
                self._had_vips = has
                self.on_tick()
            except Exception as exc:  # the lease thread must outlive any one failure
                log.error("vip_lease_error error=%r", exc)
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - start)))
        self.sock.close()


class PeerWatch:
    """Pings the other proxy nodes' health services and answers theirs: when did any peer last answer?

    Why: a holder that cannot renew its lease must drop the VIPs before the survivor may claim them, and waiting
    for Corosync's membership is not enough: under a flapping link the two sides formed their new rings 350 ms
    apart (the survivor first), and the survivor claimed while the holder still had the VIPs (lab link-flap
    drill: 20-25 samples with the VIP on both nodes). A holder that hears neither the witness nor any peer for a
    lease time drops the VIPs on its own, before the survivor's ring can even form (token + consensus > lease).
    A pong counts only if it echoes one of this watch's recent pings (a replayed pong proves nothing).
    """

    def __init__(self, node: str, bind: tuple[str, int], peers: dict[str, tuple[str, int]], key: bytes,
                 period_s: float = 0.05, on_tick: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.node, self.peers, self.key, self.period_s = node, dict(peers), key, period_s
        self.on_tick = on_tick
        self.by_addr = {addr[0]: name for name, addr in self.peers.items()}
        self.last_heard: dict[str, float] = {}  # peer -> monotonic time of its last valid pong
        self._sent: dict[int, float] = {}  # ping id -> when sent (the last second's)
        self._ids = 0
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(bind)
        self._thread = threading.Thread(target=self._loop, name="peer-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def silent_for(self) -> float | None:
        """Seconds since any peer last answered; None before any ever did (nothing to compare with)."""
        if not self.last_heard:
            return None
        return time.monotonic() - max(self.last_heard.values())

    def _loop(self) -> None:
        next_ping = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_ping:
                self._ids += 1
                self._sent = {i: t for i, t in self._sent.items() if now - t < 1.0}
                self._sent[self._ids] = now
                msg = pack(self.key, {"op": "ping", "node": self.node, "id": self._ids, "ts": time.time()})
                for addr in self.peers.values():
                    with contextlib.suppress(OSError):
                        self.sock.sendto(msg, addr)
                next_ping = now + self.period_s
                try:
                    self.on_tick()
                except Exception as exc:  # the watch must outlive any one failure
                    log.error("peer_watch_error error=%r", exc)
            self.sock.settimeout(max(0.001, next_ping - time.monotonic()))
            try:
                data, src = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError:
                self._stop.wait(self.period_s)
                continue
            self._handle(data, src)
        self.sock.close()

    def _handle(self, data: bytes, src: tuple[str, int]) -> None:
        try:
            msg = unpack(self.key, data)
        except BadMessage:
            return
        peer = self.by_addr.get(src[0])
        if peer is None or msg.get("node") != peer:
            return
        if msg.get("op") == "ping":
            if fresh(msg.get("ts")):
                with contextlib.suppress(OSError):
                    self.sock.sendto(pack(self.key, {"op": "pong", "node": self.node, "re": msg.get("id")}), src)
        elif msg.get("op") == "pong" and isinstance(msg.get("re"), int) and msg["re"] in self._sent:
            self.last_heard[peer] = time.monotonic()


def local_addresses() -> set[str]:
    """This host's (namespace's) IPv4 interface addresses (:func:`ha.netaddr.ipv4_addresses`); empty when the
    kernel cannot be asked."""
    try:
        return ipv4_addresses()
    except OSError:
        return set()


__all__ = ["DEFAULT_CLAIM_WINDOW_S", "ArbiterServer", "BadMessage", "Lease", "LeaseClient", "PeerWatch", "acquire_s",
           "claim_window_s", "fresh", "lease_key_of", "load_key", "local_addresses", "pack", "unpack"]
