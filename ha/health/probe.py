"""Probes of a SIP proxy and the hysteresis that turns them into a health verdict.

Two halves, kept apart so the decision can be tested with explicit sequences and no sockets:

* :func:`classify` and :class:`Hysteresis` are pure: a probe result in, a verdict out; a verdict in, a new
  frozen :class:`HealthState` out.
* :class:`TargetProber` does the I/O: one SIP OPTIONS per configured transport per cycle, concurrently, each
  bounded by the per-probe timeout, through :func:`ha.sip.options_probe_async` (the same probe code the OCF
  monitor uses, so the agent and the service never disagree about what "answers" means).

Verdicts per probe:

* ``ok``: a final response below 500 within the slow threshold.
* ``overloaded``: the process answers, but with a 5xx (503 is Kamailio/OpenSIPS's "too busy") or slower than
  the slow threshold. It is *not* a failure for the VIP: moving the VIP to the peer would move the same load
  there, and a proxy that answers still serves most calls. It is reported (metrics, /health body, log).
* ``dead``: no final response (silence, only a provisional, refused, port unreachable, garbage). This is the
  only verdict that counts as a failure. Silence needs N consecutive failed cycles (a datagram may be lost);
  "nothing listening" (port unreachable, connection refused: the proxy's sockets are gone) is certain and makes
  the node unhealthy at once (:meth:`Hysteresis.fail_now`).

A cycle fails when any probed transport is dead: the VIP serves every transport, so a proxy whose TCP listener
died strands every TCP phone even while UDP answers.

Late answers. A probe unanswered within its timeout is a dead observation for that cycle, but its socket keeps
listening in the background for a bounded late window (:class:`ha.sip.LateListener`, at most
``late_max`` per target, always closed). A busy proxy (a REGISTER burst on a 2-core node) answers a 40 ms probe
in 100-300 ms: the final response that arrives late proves the proxy was alive and working when that probe was
sent, so the target's next observation that would be a (non-certain) dead one is ``overloaded`` instead
("late: answered in 180 ms"), which resets the consecutive-failure count. A hung or crashed proxy sends no late
answers, so its detection is exactly as without them; "nothing listening" stays certain and immediate.
The limit: a late answer helps only if it arrives before the N-th dead cycle. After a failed cycle the next
probe goes out at once, so with the lab's 40 ms timeout and N = 3 the flip comes ~120 ms after the first
unanswered probe was sent; an answer later than that cannot stop it (the lab's 10k REGISTER burst: late answers
42-195 ms, most under 100 ms).

Busy, not hung. For the local proxy the service also asks :mod:`ha.health.activity` on an unanswered probe:
when one of the proxy's processes is on the run queue, or they used CPU since the previous unanswered probe
(and none is stopped), the observation is ``overloaded`` ("busy, not hung: ..."). That covers answers queued
longer than the late window can help with (the overload test's flood). Bounded: after ``activity_grace_s`` (5 s)
without a single answer, late ones included, silence counts as dead again, however busy, since a worker looping
forever burns CPU too.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from ha.sip import LateListener, ProbeResult, options_probe_async

PROBED_TRANSPORTS = ("udp", "tcp", "tls", "ws")  # every listener a phone may use (ha.sip, ha.sip_tls_ws)
# Late listeners per target: a probe is sent about every 40 ms while failing, so 16 cover answers up to ~640 ms
# late; when all are busy a new probe is simply not listened to after its timeout (the oldest are the ones
# about to answer). Sockets: at most 16 per target, each for at most the late window.
LATE_MAX_PER_TARGET = 16
LATE_WINDOW_MIN_S = 1.0
LATE_WINDOW_MAX_S = 5.0
# How long a proxy that answers nothing at all (not even late) may still count as overloaded because its
# processes burn CPU (ha.health.activity): a worker looping forever also burns CPU, and must not keep the VIP.
ACTIVITY_GRACE_S = 5.0


def late_window(failure_threshold: int, probe_period_s: float) -> float:
    """How long a timed-out probe keeps listening: long enough to cover a whole failure run, bounded."""
    return min(LATE_WINDOW_MAX_S, max(LATE_WINDOW_MIN_S, failure_threshold * probe_period_s))


class Verdict(enum.StrEnum):
    OK = "ok"
    OVERLOADED = "overloaded"
    DEAD = "dead"


class Health(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class Observation:
    """One classified probe: what an operator needs to read in a log line or the /health body."""

    transport: str
    target: str
    verdict: Verdict
    status_code: int | None
    latency_ms: float
    reason: str
    late: bool = False  # overloaded because an earlier probe's answer came after its timeout

    @property
    def alive(self) -> bool:
        return self.verdict is not Verdict.DEAD

    @property
    def certain(self) -> bool:
        """Dead beyond doubt: nothing listens (ICMP port unreachable, TCP RST). Unlike silence, which a lost
        datagram also produces, no network fault makes the local kernel say this."""
        return self.verdict is Verdict.DEAD and "nothing listening" in self.reason

    def as_dict(self) -> dict[str, object]:
        return {
            "transport": self.transport,
            "target": self.target,
            "verdict": str(self.verdict),
            "status_code": self.status_code,
            "latency_ms": round(self.latency_ms, 2),
            "reason": self.reason,
            "late": self.late,
        }


def late_observation(dead: Observation, late: ProbeResult) -> Observation:
    """A dead observation turned overloaded by a late final response to an earlier probe of the same target."""
    why = f"late: answered in {late.latency_ms:.0f} ms ({late.reason}); this cycle: {dead.reason}"
    return Observation(dead.transport, dead.target, Verdict.OVERLOADED, late.status_code, late.latency_ms, why, True)


def classify(result: ProbeResult, slow_ms: float) -> Observation:
    """Turn one probe result into ok / overloaded / dead (see the module docstring for why)."""
    code = result.status_code
    if code is None or code < 200:
        verdict = Verdict.DEAD
        reason = result.reason
    elif code >= 500:
        verdict = Verdict.OVERLOADED
        reason = f"answers {result.reason}"
    elif result.latency_ms > slow_ms:
        verdict = Verdict.OVERLOADED
        reason = f"slow: {result.latency_ms:.0f} ms > {slow_ms:.0f} ms ({result.reason})"
    else:
        verdict = Verdict.OK
        reason = result.reason
    return Observation(result.transport, result.target, verdict, code, result.latency_ms, reason)


# ---------------------------------------------------------------------------------------------- hysteresis


@dataclass(frozen=True)
class HealthState:
    """Where the hysteresis stands; frozen so a snapshot handed to the API thread can never change under it."""

    health: Health = Health.UNKNOWN
    failures: int = 0  # consecutive failed cycles
    successes: int = 0  # consecutive good cycles
    changed: bool = False  # this step flipped ``health``
    reason: str = "no probe yet"


@dataclass(frozen=True)
class Hysteresis:
    """N consecutive failures make a node unhealthy, M consecutive successes make it healthy.

    It starts ``unknown`` and leaves that state only on a full run of N or M, so a freshly started service never
    claims health (or sickness) from one probe. One lost probe never flips a healthy node: a UDP datagram can be
    dropped under load and a VIP move costs every caller a retransmit.
    """

    failure_threshold: int
    recovery_threshold: int

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.recovery_threshold < 1:
            raise ValueError("thresholds must be >= 1")

    def step(self, state: HealthState, alive: bool, reason: str = "") -> HealthState:
        """The state after one more cycle whose outcome is ``alive``."""
        if alive:
            successes, failures = state.successes + 1, 0
            flip = successes >= self.recovery_threshold and state.health is not Health.HEALTHY
            new = Health.HEALTHY if flip else state.health
        else:
            successes, failures = 0, state.failures + 1
            flip = failures >= self.failure_threshold and state.health is not Health.UNHEALTHY
            new = Health.UNHEALTHY if flip else state.health
        return HealthState(new, failures, successes, flip, reason or state.reason)

    def fail_now(self, state: HealthState, reason: str = "") -> HealthState:
        """A failed cycle whose evidence is certain (nothing listens): unhealthy at once, no run of N needed."""
        failures = max(state.failures + 1, self.failure_threshold)
        flip = state.health is not Health.UNHEALTHY
        return HealthState(Health.UNHEALTHY, failures, 0, flip, reason or state.reason)

    def run(self, outcomes: Sequence[bool], state: HealthState | None = None) -> list[HealthState]:
        """Every state along a sequence of outcomes: how tests and operators replay a history."""
        out, cur = [], state or HealthState()
        for alive in outcomes:
            cur = self.step(cur, alive)
            out.append(cur)
        return out


def gated(state: HealthState, ready: bool) -> HealthState:
    """Apply the readiness gate: a proxy that answers but has not resynced its state must not take the VIP.

    Until readiness is given, a would-be healthy node reads unhealthy (attribute 0), so Pacemaker keeps the VIP
    away even if the node's proxy answers; ``unknown`` stays unknown (nothing is written yet).
    """
    if ready or state.health is not Health.HEALTHY:
        return state
    return replace(state, health=Health.UNHEALTHY, reason="answers, but readiness not given yet (resync pending)")


# ---------------------------------------------------------------------------------------------- the I/O half

HandOver = Callable[[LateListener], None]


class ProbeFn(Protocol):
    """The probe's shape (:func:`ha.sip.options_probe_async`); ``hand_over`` receives a timed-out probe's socket."""

    def __call__(self, host: str, port: int, transport: str, timeout: float, *,
                 hand_over: HandOver | None = None) -> Awaitable[ProbeResult]: ...


@dataclass(frozen=True)
class Target:
    """One SIP listener to probe: the local proxy or a peer's, on one transport."""

    host: str
    port: int
    transport: str

    def __str__(self) -> str:
        return f"{self.transport}:{self.host}:{self.port}"


def targets_for(host: str, ports: dict[str, int]) -> tuple[Target, ...]:
    """The probe targets for a proxy listening on ``ports`` (transport -> port)."""
    return tuple(Target(host, port, t) for t, port in ports.items() if t in PROBED_TRANSPORTS)


class TargetProber:
    """Probes a set of targets concurrently, each bounded by ``timeout_s``; ``probe`` is injectable.

    The default probe is :func:`ha.sip.options_probe_async`; tests pass it too, against real local responders.
    With ``late_window_s`` > 0 a timed-out probe keeps listening that long (from its send) in a background task,
    at most ``late_max`` per target; a late final response is kept until the target's next observation, which
    it turns from dead into overloaded (see the module docstring). ``on_late`` is told of every late answer
    (metrics). :meth:`close` cancels the listeners and closes their sockets.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        timeout_s: float,
        slow_ms: float,
        probe: ProbeFn = options_probe_async,
        *,
        late_window_s: float = 0.0,
        late_max: int = LATE_MAX_PER_TARGET,
        on_late: Callable[[Target, ProbeResult], None] | None = None,
        activity: Callable[[], str | None] | None = None,
        activity_grace_s: float = ACTIVITY_GRACE_S,
    ) -> None:
        if not targets:
            raise ValueError("nothing to probe: no udp/tcp listener configured")
        self.targets = tuple(targets)
        self.timeout_s = timeout_s
        self.slow_ms = slow_ms
        self.probe = probe
        self.late_window_s = late_window_s
        self.late_max = late_max
        self.on_late = on_late
        self.listening: dict[Target, set[asyncio.Task[None]]] = {t: set() for t in self.targets}
        self.late: dict[Target, ProbeResult] = {}  # the latest late answer not yet used by an observation
        self.late_answers = 0  # every late final response received, used or not
        self.activity = activity  # the local proxy's "busy, not hung" reason on an unanswered probe (or None)
        self.activity_grace_s = activity_grace_s
        self._silent_since: dict[Target, float] = {}  # first unanswered probe since the target last answered

    def _hand_over(self, target: Target) -> HandOver | None:
        if self.late_window_s <= 0 or len(self.listening[target]) >= self.late_max:
            return None

        def take(listener: LateListener) -> None:
            tasks = self.listening[target]
            if len(tasks) >= self.late_max:  # filled up while this probe was waiting
                listener.close()
                return
            task = asyncio.get_running_loop().create_task(self._listen(target, listener))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return take

    async def _listen(self, target: Target, listener: LateListener) -> None:
        result = await listener.wait(self.late_window_s)  # closes the socket whatever happens
        if result is None or not result.answered:
            return
        self.late[target] = result
        self.late_answers += 1
        if self.on_late is not None:
            self.on_late(target, result)

    async def _one(self, target: Target) -> Observation:
        try:
            # Belt and braces: the probe honours its timeout, wait_for guarantees the cycle does too.
            result = await asyncio.wait_for(
                self.probe(target.host, target.port, target.transport, self.timeout_s,
                           hand_over=self._hand_over(target)),
                self.timeout_s + 0.05,
            )
        except TimeoutError:
            result = ProbeResult(False, None, self.timeout_s * 1000, "probe overran its timeout",
                                 target.transport, str(target))
        obs = classify(result, self.slow_ms)
        late = self.late.pop(target, None)  # used at most once, and only by the next observation
        if obs.verdict is not Verdict.DEAD or obs.certain or late is not None:
            self._silent_since.pop(target, None)
            if late is not None and obs.verdict is Verdict.DEAD and not obs.certain:
                return late_observation(obs, late)
            return obs
        if self.activity is None:
            return obs
        now = asyncio.get_running_loop().time()
        if now - self._silent_since.setdefault(target, now) > self.activity_grace_s:
            return obs  # silent too long, however busy: a looping worker burns CPU too
        why = self.activity()
        if why is None:
            return obs
        return Observation(obs.transport, obs.target, Verdict.OVERLOADED, None, obs.latency_ms,
                           f"busy, not hung: {why}; this cycle: {obs.reason}")

    async def cycle(self) -> tuple[Observation, ...]:
        """One observation per target, all probed at once (a cycle lasts one timeout at most)."""
        return tuple(await asyncio.gather(*(self._one(t) for t in self.targets)))

    def outstanding(self) -> int:
        """Late listeners still open, over all targets."""
        return sum(len(tasks) for tasks in self.listening.values())

    async def close(self) -> None:
        """Cancel every late listener; each closes its socket as it ends."""
        tasks = [t for tasks in self.listening.values() for t in tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def cycle_outcome(observations: Sequence[Observation]) -> tuple[bool, str]:
    """A cycle is alive when no transport is dead; the reason names the worst transport."""
    dead = [o for o in observations if o.verdict is Verdict.DEAD]
    if dead:
        return False, "; ".join(f"{o.transport} dead: {o.reason}" for o in dead)
    slow = [o for o in observations if o.verdict is Verdict.OVERLOADED]
    if slow:
        return True, "; ".join(f"{o.transport} overloaded: {o.reason}" for o in slow)
    return True, "all transports answer: " + ", ".join(
        f"{o.transport} {o.status_code} in {o.latency_ms:.1f} ms" for o in observations
    )


__all__ = [
    "LATE_MAX_PER_TARGET",
    "HandOver",
    "Health",
    "HealthState",
    "Hysteresis",
    "Observation",
    "Target",
    "TargetProber",
    "Verdict",
    "classify",
    "cycle_outcome",
    "gated",
    "late_observation",
    "late_window",
    "targets_for",
]
