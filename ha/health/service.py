"""The health loop: probe the local proxy, decide with hysteresis, tell Pacemaker, say why in one sentence.

Each cycle (every ``timings.probe_period_ms``) returns a sentence, as Patroni's HA cycle does, so an operator
reading the log knows why the node did what it did. Logging: a steady cycle is logged at DEBUG (at 10 Hz an
INFO line per cycle would drown the log), every *event* at INFO as one structured line (``key=value``, or JSON
with ``json_logs``): a health change, a transport's verdict change, an attribute write, a role change, the
readiness gate opening; and a heartbeat line with the current sentence once a minute.

Side effects never block the loop: ``attrd_updater`` runs as an awaited child process in a background task
(latest value wins, retried with back-off if it fails, re-asserted every 10 s), traps are sent from tasks, peer
probes run beside the local ones at a slower pace. The API reads :meth:`HealthService.snapshot`, a copy taken
under a lock. Late answers (a busy proxy answering after the probe's timeout, see :mod:`ha.health.probe`) are
counted in a metric and summarised in one INFO line (``event=late_answers``) per second at most.

Readiness: when a gate is configured the node never reports healthy before readiness is given, either by the
coordinator calling :meth:`Readiness.give` in-process or by creating the ready file (default
``/run/sipha/ready``) from another process, e.g. when its resync is complete.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ha.health.activity import GroupActivity
from ha.health.cluster import AttrdWriter, VipCheck
from ha.health.metrics import Metrics
from ha.health.probe import (
    HandOver,
    Health,
    HealthState,
    Hysteresis,
    Observation,
    ProbeFn,
    Target,
    TargetProber,
    Verdict,
    cycle_outcome,
    gated,
    late_window,
    targets_for,
)
from ha.health.replication import POLL_S as REPLICATION_POLL_S
from ha.health.replication import ReplicationWatch
from ha.health.snmp import NodeState, TrapSender
from ha.model import Cluster
from ha.sip import ProbeResult, options_probe_async

log = logging.getLogger("sipha.health")
DEFAULT_READY_FILE = Path("/run/sipha/ready")
HISTORY = 100  # transitions kept for /cluster
HEARTBEAT_S = 60.0
ROLE_CHECK_S = 1.0
# attrd keeps the value only while it runs: a Pacemaker restart under a running service would leave the attribute
# undefined (and an undefined attribute does not forbid the VIP), so the value is written again this often.
REASSERT_S = 10.0
PEER_PROBE_S = 1.0
LATE_LOG_S = 1.0  # late answers of the local proxy: one INFO summary line per second at most (DEBUG per answer)
ATTR_BACKOFF_MAX_S = 2.0  # attrd is local: a retry every 2 s at worst (it is down only while Pacemaker starts)


class ProbeDrops:
    """Test-only fault injection: make the next N local UDP probes time out, as if the datagram were lost.

    The lab's kernel has no ``sch_netem`` (``tc qdisc add dev lo root netem`` answers "Specified qdisc kind is
    unknown") and no nftables/iptables, so a single lost probe packet cannot be produced in the network; this is
    the stand-in. Enabled only when the service is started with ``--fault-file PATH`` (the lab does, production
    never does): writing an integer N into PATH makes the next N UDP probes of the local proxy report "no answer"
    after the full probe timeout, without sending; the file is consumed (deleted) when read.
    """

    def __init__(self, path: Path | None, probe: ProbeFn) -> None:
        self.path = path
        self.probe = probe
        self.pending = 0
        self.injected = 0

    def poll(self) -> None:
        if self.path is None:
            return
        try:
            text = self.path.read_text()
        except OSError:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(ValueError):
            self.pending += max(0, min(int(text.strip() or "1"), 1000))

    async def __call__(self, host: str, port: int, transport: str, timeout: float, *,
                       hand_over: HandOver | None = None) -> ProbeResult:
        if self.pending > 0 and transport == "udp":
            self.pending -= 1
            self.injected += 1
            await asyncio.sleep(timeout)  # nothing was sent, so nothing can answer late either
            return ProbeResult(False, None, timeout * 1000, f"no answer within {timeout * 1000:.0f} ms "
                               "(injected drop)", transport, f"{transport}:{host}:{port}")
        return await self.probe(host, port, transport, timeout, hand_over=hand_over)


def kv(**fields: Any) -> str:
    """``key=value`` pairs, values with spaces or quotes double-quoted: one grep-able line per event."""
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        s = f"{v:.2f}" if isinstance(v, float) else str(v)
        if not s or any(c in s for c in ' "=\\'):
            s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)


class Readiness:
    """The gate between "the proxy answers" and "this node may hold the VIP" (state resynced).

    ``required=False`` (no gate): always ready. Otherwise ready once :meth:`give` was called or ``path`` exists.
    """

    def __init__(self, required: bool = False, path: Path | None = DEFAULT_READY_FILE) -> None:
        self.required = required
        self.path = path
        self._given = threading.Event()

    def give(self) -> None:
        """The coordinator's hook: "resync complete"."""
        self._given.set()

    def revoke(self) -> None:
        """Back to not ready (e.g. the coordinator lost its store and must resync again)."""
        self._given.clear()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def is_ready(self) -> bool:
        if not self.required or self._given.is_set():
            return True
        return self.path is not None and self.path.exists()


def iso(t: float) -> str:
    """UTC with milliseconds: transitions a few hundred ms apart must stay distinguishable."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


@dataclass(frozen=True)
class Transition:
    """One change the service saw: ``kind`` health (the local proxy), role (VIP held or not) or shedding (the
    coordinator has the proxy refuse REGISTERs while replication is behind)."""

    at: float
    kind: str
    from_: str
    to: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": iso(self.at), "kind": self.kind, "from": self.from_, "to": self.to, "reason": self.reason}


@dataclass
class PeerStatus:
    name: str
    observations: tuple[Observation, ...] = ()
    state: HealthState = field(default_factory=HealthState)
    checked_at: float | None = None


class HealthService:
    """One node's health service. ``probe``, ``attrd``, ``vip_check`` and ``traps`` are injectable for tests."""

    def __init__(
        self,
        cluster: Cluster,
        node: str,
        *,
        probe: ProbeFn = options_probe_async,
        probe_host: str | None = None,
        slow_ms: float | None = None,
        readiness: Readiness | None = None,
        attrd: AttrdWriter | None = None,
        vip_check: VipCheck | None = None,
        traps: TrapSender | None = None,
        metrics: Metrics | None = None,
        json_logs: bool = False,
        clock: Callable[[], float] = time.time,
        peer_ports: dict[str, int] | None = None,
        fault_file: Path | None = None,
        proxy_pidfile: Path | None = None,
        replication: ReplicationWatch | None = None,
    ) -> None:
        self.cluster = cluster
        self.replication = replication  # the local coordinator's status (None: not asked, e.g. the stock lab)
        self.me = cluster.node(node)  # KeyError for an unknown node: the CLI turns it into a message
        t = cluster.timings
        self.period_s = t.probe_period_ms / 1000
        self.slow_ms = slow_ms if slow_ms is not None else t.probe_timeout_ms / 2
        ports = cluster.proxy.listen.ports()
        self.drops = ProbeDrops(fault_file, probe)
        self.late_window_s = late_window(t.failure_threshold, self.period_s)
        self.local = TargetProber(targets_for(probe_host or self.me.ip, ports), t.probe_timeout_ms / 1000,
                                  self.slow_ms, self.drops if fault_file is not None else probe,
                                  late_window_s=self.late_window_s, on_late=self._late_answer(node),
                                  activity=GroupActivity(proxy_pidfile) if proxy_pidfile is not None else None)
        self.peers = {
            n.name: TargetProber(targets_for(n.ip, peer_ports or ports), t.probe_timeout_ms / 1000, self.slow_ms,
                                 probe, late_window_s=self.late_window_s, on_late=self._late_answer(n.name))
            for n in cluster.nodes if n.name != node
        }
        self.hysteresis = Hysteresis(t.failure_threshold, t.recovery_threshold)
        self.readiness = readiness or Readiness(required=False)
        self.attrd = attrd or AttrdWriter()
        self.vip_check = vip_check or VipCheck(cluster)
        self.traps = traps or TrapSender(cluster.snmp, node)
        self.vip_names = tuple(v.name for v in cluster.vips)
        self.metrics = metrics or Metrics(node, self.vip_names)
        self.json_logs = json_logs
        self.clock = clock

        self._lock = threading.Lock()
        self.raw = HealthState()  # the proxy's own hysteresis, before the readiness gate
        self.state = HealthState()  # what is reported (gated)
        self.observations: tuple[Observation, ...] = ()
        self.sentence = "starting"
        self.since = clock()
        self.role = "unknown"
        self.held: list[str] = []
        self.ready = self.readiness.is_ready()
        self._was_ready = self.ready
        self.history: collections.deque[Transition] = collections.deque(maxlen=HISTORY)
        self.peer_status = {n: PeerStatus(n) for n in self.peers}
        self.attr_wanted: int | None = None
        self.attr_written: int | None = None
        self._attr_rewrite = False  # write the wanted value once more even when it is the written one (re-assert)
        self.attr_error = ""
        self._attr_confirmed: int | None = None  # last value attrd accepted (kept across re-assertions)
        self._attr_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_heartbeat = 0.0
        self._last_role_check = -1e9
        self._last_assert = time.monotonic()
        self._last_peer_probe = -1e9
        self._last_replication_poll = -1e9
        self._replication_task: asyncio.Task[None] | None = None
        self._peer_task: asyncio.Task[None] | None = None
        self.cycles = 0
        self.last_alive = True
        self._late_seen: dict[str, list[float]] = {}  # transport -> [count, max latency ms] since the last summary
        self._last_late_log = -1e9

    # ------------------------------------------------------------------------------------------ logging

    def event(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        fields = {"event": event, "node": self.me.name, **fields}
        log.log(level, json.dumps(fields, default=str) if self.json_logs else kv(**fields))

    def _late_answer(self, node: str) -> Callable[[Target, ProbeResult], None]:
        """Count (and log at DEBUG) every late final response of ``node``'s proxy as it arrives."""

        def seen(target: Target, result: ProbeResult) -> None:
            self.metrics.late(node, target.transport)
            self.event("late_answer", logging.DEBUG, proxy=node, transport=target.transport,
                       latency_ms=result.latency_ms, status=result.status_code)
            if node == self.me.name:
                acc = self._late_seen.setdefault(target.transport, [0, 0.0])
                acc[0] += 1
                acc[1] = max(acc[1], result.latency_ms)

        return seen

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------ one cycle

    async def cycle(self) -> str:
        """Probe, decide, act; returns the sentence that says what happened."""
        self.cycles += 1
        now_mono = time.monotonic()
        self.drops.poll()
        observations = await self.local.cycle()
        for o in observations:
            self.metrics.observe(self.me.name, o)
        previous = {o.transport: o.verdict for o in self.observations}
        for o in observations:
            if previous.get(o.transport, Verdict.OK) is not o.verdict:
                self.event("probe_verdict", transport=o.transport, was=previous.get(o.transport, Verdict.OK),
                           now=o.verdict, reason=o.reason, latency_ms=o.latency_ms, status=o.status_code,
                           late=o.late or None)
        alive, reason = cycle_outcome(observations)
        if not alive and self.raw.health is not Health.UNHEALTHY and any(o.certain for o in observations):
            raw = self.hysteresis.fail_now(self.raw, reason)  # nothing listens: no lost packet says that
        else:
            raw = self.hysteresis.step(self.raw, alive, reason)
        self.last_alive = alive
        ready = self.readiness.is_ready()
        if ready != self.ready:
            self.event("readiness", ready=ready)
            self.metrics.ready.set(1 if ready else 0)
        reported = gated(raw, ready)
        old = self.state.health
        latency = max((o.latency_ms for o in observations), default=0.0)
        with self._lock:
            self.raw, self.observations, self.ready = raw, observations, ready
            self.state = reported
            changed = reported.health is not old
            if changed:
                self.since = self.clock()
                self.history.append(Transition(self.since, "health", str(old), str(reported.health), reported.reason))
        if changed:
            self.metrics.health_changed(reported.health)
            self.event("health_change", was=old, now=reported.health, reason=reported.reason, latency_ms=latency)
            self._spawn(self._trap("health"))
        if reported.health is not Health.UNKNOWN:
            if now_mono - self._last_assert >= REASSERT_S and self._attr_task is None:
                self._last_assert = now_mono
                # Write again even though nothing changed; "written" keeps saying what was last written meanwhile
                # (cleared, /health showed written: null for the length of each re-assert).
                self._attr_rewrite = True
            self._want_attribute(1 if reported.health is Health.HEALTHY else 0)
        if now_mono - self._last_role_check >= ROLE_CHECK_S:
            self._last_role_check = now_mono
            self._spawn(self._check_role())
        if self.replication is not None and now_mono - self._last_replication_poll >= REPLICATION_POLL_S and (
            self._replication_task is None or self._replication_task.done()
        ):
            self._last_replication_poll = now_mono
            self._replication_task = asyncio.get_running_loop().create_task(self._poll_replication())
        if self._late_seen and now_mono - self._last_late_log >= LATE_LOG_S:
            self._last_late_log = now_mono
            seen, self._late_seen = self._late_seen, {}
            self.event("late_answers", count=int(sum(c for c, _ in seen.values())),
                       max_latency_ms=max(m for _, m in seen.values()),
                       transports=",".join(f"{t}:{int(c)}" for t, (c, _) in sorted(seen.items())))
        if self.peers and now_mono - self._last_peer_probe >= max(PEER_PROBE_S, self.period_s) and (
            self._peer_task is None or self._peer_task.done()
        ):
            self._last_peer_probe = now_mono
            self._peer_task = asyncio.get_running_loop().create_task(self._probe_peers())
        if changed and ready and not self._was_ready and raw.health is Health.HEALTHY:
            sentence = f"readiness given (resync complete): became healthy, writing sipha-health=1: {reason}"
        else:
            sentence = self._sentence(raw, reported, alive, reason, changed, ready)
        self._was_ready = ready
        self.sentence = sentence
        if changed or now_mono - self._last_heartbeat >= HEARTBEAT_S:
            self._last_heartbeat = now_mono
            self.event("cycle", health=reported.health, reason=sentence, latency_ms=latency)
        else:
            self.event("cycle", logging.DEBUG, health=reported.health, reason=sentence, latency_ms=latency)
        return sentence

    def _sentence(self, raw: HealthState, reported: HealthState, alive: bool, reason: str, changed: bool,
                  ready: bool) -> str:
        t = self.hysteresis
        if changed and reported.health is Health.UNHEALTHY and raw.health is Health.HEALTHY:
            return f"proxy answers but readiness is not given: reporting unhealthy, sipha-health=0 ({reason})"
        if changed:
            runs = raw.failures if reported.health is Health.UNHEALTHY else raw.successes
            attr = 1 if reported.health is Health.HEALTHY else 0
            return f"became {reported.health} after {runs} consecutive {'good' if alive else 'failed'} cycles, " \
                   f"writing sipha-health={attr}: {reason}"
        if reported.health is Health.UNKNOWN:
            need = f"{raw.successes}/{t.recovery_threshold} good" if alive else \
                f"{raw.failures}/{t.failure_threshold} failed"
            return f"health still unknown ({need} cycles so far): {reason}"
        if not ready and raw.health is Health.HEALTHY:
            return f"waiting for readiness (resync) before reporting healthy: {reason}"
        if alive and raw.failures == 0 and reported.health is Health.UNHEALTHY:
            return f"unhealthy, recovering ({raw.successes}/{t.recovery_threshold} good cycles): {reason}"
        if not alive and reported.health is Health.HEALTHY:
            return f"still healthy, {raw.failures}/{t.failure_threshold} failed cycles: {reason}"
        return f"{reported.health}: {reason}"

    # ------------------------------------------------------------------------------------------ side effects

    def _want_attribute(self, value: int) -> None:
        if value == self.attr_wanted and ((self.attr_written == value and not self._attr_rewrite)
                                          or self._attr_task is not None):
            return
        self.attr_wanted = value
        if self._attr_task is None or self._attr_task.done():
            self._attr_task = asyncio.get_running_loop().create_task(self._push_attribute())

    async def _push_attribute(self) -> None:
        """Write until the written value is the wanted one; only the latest wanted value is ever written."""
        backoff = 0.5
        while self.attr_wanted is not None and (self.attr_wanted != self.attr_written or self._attr_rewrite):
            value = self.attr_wanted
            ok, detail = await self.attrd.write(value)
            level = logging.WARNING if not ok else logging.DEBUG if value == self._attr_confirmed else logging.INFO
            self.event("attribute_write", level, name="sipha-health", value=value, ok=ok,
                       detail=None if ok else detail)
            if ok:
                self.attr_written, self.attr_error, self._attr_confirmed = value, "", value
                self._attr_rewrite = False
                backoff = 0.5
            else:
                self.attr_error = detail
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, ATTR_BACKOFF_MAX_S)
        self._attr_task = None

    def node_state(self, reason: str | None = None) -> NodeState:
        r = self.replication
        shedding = "unknown" if r is None or r.status is None else ("shedding" if r.shedding else "taking")
        with self._lock:
            return NodeState(self.me.name, self.role, str(self.state.health),
                             self.state.reason if reason is None else reason, shedding)  # fmt: skip

    async def _trap(self, kind: str, reason: str | None = None) -> None:
        errors = await self.traps.send(kind, self.node_state(reason))
        for e in errors:
            self.event("trap_failed", logging.WARNING, notification=kind, error=e)

    async def _check_role(self) -> None:
        held = await self.vip_check.held_async()
        role = "active" if held else "standby"
        if self.vip_check.error:
            role = "unknown"
        self.metrics.set_vips(self.vip_names, held)
        with self._lock:
            old, self.role, self.held = self.role, role, held
            if role != old:
                self.history.append(Transition(self.clock(), "role", old, role,
                                               self.vip_check.error or f"holds {', '.join(held) or 'no VIP'}"))
        if role != old:
            self.event("role_change", was=old, now=role, vips=",".join(held) or None,
                       error=self.vip_check.error or None)
            await self._trap("role")

    async def _poll_replication(self) -> None:
        """The coordinator's status, read off the loop; a shedding spell's start and end are events (and history):
        the phones are being refused REGISTERs."""
        assert self.replication is not None
        change = await asyncio.to_thread(self.replication.poll)
        st = self.replication.status
        if st is not None:
            self.metrics.replication(st)
        if change is None:
            return
        what, fields = change
        started = what == "shedding_started"
        reason = (f"replication behind: REGISTERs over {fields.get('shed_limit_per_s')}/s answered 503"
                  if started else "replication caught up: the proxy takes every REGISTER again")
        with self._lock:
            self.history.append(Transition(self.clock(), "shedding", str(not started).lower(), str(started).lower(),
                                           reason))  # fmt: skip
        self.event("replication_" + what, logging.WARNING if started else logging.INFO, reason=reason,
                   shed_spells=fields.get("shed_spells"), pending=fields.get("pending"))
        await self._trap("shedding", reason)

    async def _probe_peers(self) -> None:
        for name, prober in self.peers.items():
            obs = await prober.cycle()
            for o in obs:
                self.metrics.observe(name, o)
            alive, reason = cycle_outcome(obs)
            with self._lock:
                st = self.peer_status[name]
                st.state = self.hysteresis.step(st.state, alive, reason)
                st.observations, st.checked_at = obs, self.clock()
            if st.state.changed:
                self.event("peer_health_change", peer=name, now=st.state.health, reason=reason)

    # ------------------------------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Cycle every probe period until ``stop`` is set; a cycle's own duration is subtracted from the wait."""
        loop = asyncio.get_running_loop()
        self.event("start", period_ms=self.period_s * 1000, targets=",".join(map(str, self.local.targets)),
                   failure_threshold=self.hysteresis.failure_threshold,
                   recovery_threshold=self.hysteresis.recovery_threshold, readiness_gate=self.readiness.required)
        self.metrics.ready.set(1 if self.ready else 0)
        self.traps.start()  # sysUpTime in traps then counts from the service's start
        while not stop.is_set():
            started = loop.time()
            try:
                await self.cycle()
            except Exception as exc:  # one bad cycle must not end the service
                self.event("cycle_error", logging.ERROR, error=repr(exc))
            # After a failed cycle the next one starts at once: a failure has already waited a probe timeout,
            # and the N-in-a-row verdict should not also wait N periods.
            elapsed = loop.time() - started
            counting = not self.last_alive and self.raw.health is not Health.UNHEALTHY
            wait = max(0.0, (self.period_s / 4 if counting else self.period_s) - elapsed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        await self.close()
        self.event("stop", health=self.state.health)

    async def close(self) -> None:
        for t in [*self._tasks, self._attr_task, self._peer_task, self._replication_task]:
            if t is not None and not t.done():
                t.cancel()
        await asyncio.gather(*(t for t in self._tasks if t), return_exceptions=True)
        for prober in (self.local, *self.peers.values()):
            await prober.close()  # late listeners: their sockets close as they are cancelled
        self.traps.close()

    # ------------------------------------------------------------------------------------------ for the API

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of everything the API shows; safe to call from any thread."""
        with self._lock:
            return {
                "node": self.me.name,
                "health": str(self.state.health),
                "healthy": self.state.health is Health.HEALTHY,
                "proxy_health": str(self.raw.health),
                "ready": self.ready,
                "readiness_gate": self.readiness.required,
                "reason": self.state.reason,
                "status": self.sentence,
                "since": iso(self.since),
                "consecutive_failures": self.raw.failures,
                "consecutive_successes": self.raw.successes,
                "transports": [o.as_dict() for o in self.observations],
                "role": self.role,
                "vips_held": list(self.held),
                "attribute": {"name": "sipha-health", "wanted": self.attr_wanted, "written": self.attr_written,
                              "error": self.attr_error or None},
                "peers": {
                    n: {"health": str(p.state.health), "reason": p.state.reason,
                        "transports": [o.as_dict() for o in p.observations],
                        "checked_at": iso(p.checked_at) if p.checked_at else None}
                    for n, p in self.peer_status.items()
                },
                "history": [t.as_dict() for t in self.history],
                "injected_drops": self.drops.injected,
                "late_answers": self.local.late_answers,
                "replication": self.replication.snapshot() if self.replication is not None else None,
            }


__all__ = ["DEFAULT_READY_FILE", "HealthService", "ProbeDrops", "Readiness", "kv"]
