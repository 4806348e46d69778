"""One drill, and ``--repeat`` of them: check health, start the traffic, inject, undo, measure, report.

The order of one run (times from :class:`DrillOptions`):

    health check -> traffic (stream, REGISTERs, established calls) -> ``before_s`` -> INJECT, new calls at
    ``rate`` -> ``hold_s`` -> UNDO -> ``after_s`` -> BYE the established calls -> MESSAGE every AoR ->
    un-REGISTER -> stop

Undo always runs once the fault was (even partly) injected: normally in sequence, else in a ``finally`` --
after an exception, and after Ctrl-C, when what was measured so far is still returned (``interrupted``).
The fault's ``restore`` (e.g. a Pacemaker cleanup) follows, after the measurement.
Between repeats the cluster must be healthy again (the same check as before the first run), or the repeats
stop there and say why.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ha.drill import measure, report, timeline
from ha.drill.faults import (
    KINDS,
    ClusterControl,
    DrillError,
    Fault,
    describe,
    health_problems,
    make_fault,
    wait_dc_idle,
)
from ha.drill.ownership import OwnershipSampler
from ha.drill.traffic import Traffic, TrafficConfig

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DrillOptions:
    fault: str
    target: str = "active"
    registrations: int = 20
    calls: int = 5
    rate: float = 2.0
    transport: str = "udp"
    before_s: float = 1.0
    hold_s: float = 3.0
    after_s: float = 4.0
    repeat: int = 1
    settle_timeout_s: float = 120.0
    baseline: bool = False
    wait_s: float = 0.0  # before the first run: wait up to this long for a healthy cluster, then refuse

    def check(self) -> None:
        """Bad input is one line, before anything is touched."""
        if self.fault not in KINDS:
            raise DrillError(f"unknown fault {self.fault!r}; one of {', '.join(KINDS)}")
        if not 1 <= self.repeat <= 1000:
            raise DrillError(f"--repeat {self.repeat}: 1-1000")
        if min(self.before_s, self.hold_s, self.after_s) < 0 or self.before_s + self.hold_s + self.after_s > 600:
            raise DrillError("drill phases must be >= 0 s and last at most 600 s together")
        if not 0 <= self.wait_s <= 600:
            raise DrillError(f"--wait {self.wait_s:g}: 0-600 s")
        try:
            self._traffic_config("192.0.2.1", "192.0.2.2", 5060)
        except ValueError as exc:
            raise DrillError(str(exc)) from None

    def _traffic_config(self, vip: str, local_ip: str, port: int) -> TrafficConfig:
        # Phones of each run get their own AoRs (drill-<random>-0001...): a run must not depend on what earlier
        # runs left in the location table (a binding whose un-REGISTER did not stick, see Traffic.unregister).
        return TrafficConfig(vip=vip, local_ip=local_ip, port=port, transport=self.transport,
                             registrations=self.registrations, calls=self.calls, rate=self.rate,
                             max_duration=self.before_s + self.hold_s + self.after_s + 120,
                             user_prefix=f"drill-{secrets.token_hex(3)}-")  # fmt: skip


def refuse_if_unhealthy(ctl: ClusterControl) -> Any:
    st = ctl.status()
    problems = health_problems(st)
    if problems:
        raise DrillError("the cluster is not healthy, not starting a drill: " + "; ".join(problems))
    return st


def wait_healthy(ctl: ClusterControl, timeout: float, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = 1.0) -> list[str]:  # fmt: skip
    """Poll until the health check passes; the remaining problems (empty: healthy) when time runs out."""
    deadline = time.monotonic() + timeout
    problems: list[str] = ["not checked"]
    for _ in range(max(1, int(timeout / poll_s) + 1)):
        problems = health_problems(ctl.status())
        if not problems or time.monotonic() >= deadline:
            return problems
        sleep(poll_s)
    return problems


REPLICATION_WAIT_S = 30.0  # how long a drill waits for its registrations to reach the standby proxies


def wait_replicated(holds: Callable[[str, list[str]], set[str] | str], peers: list[str], aors: list[str],
                    timeout: float = REPLICATION_WAIT_S, poll_s: float = 0.1,
                    sleep: Callable[[float], None] = time.sleep) -> tuple[bool, str]:  # fmt: skip
    """Wait until every peer's proxy holds every AoR; (all there, what happened). Why: phones in the field
    registered long before a failure; a fault injected while the drill's own REGISTERs are still on their way
    to the standby measures replication lag, not the failover (a busy active coordinator once held them
    seconds behind, and the drill reported them lost)."""
    t0 = time.monotonic()
    missing: dict[str, set[str] | str] = {}
    for _ in range(max(1, int(timeout / max(poll_s, 0.01)) + 1)):  # bounded in count, and in time below
        missing = {}
        for n in peers:
            got = holds(n, aors)
            missing[n] = got if isinstance(got, str) else set(aors) - got
        if not any(missing.values()) or time.monotonic() - t0 >= timeout:
            break
        sleep(poll_s)
    took = time.monotonic() - t0
    if not any(missing.values()):
        return True, f"{len(aors)} registrations on the standby proxies ({', '.join(peers)}) after {took:.2f} s"
    why = "; ".join(f"{n}: {m if isinstance(m, str) else f'{len(m)} of {len(aors)} missing'}"
                    for n, m in missing.items() if m)  # fmt: skip
    return False, f"registrations NOT all on the standby proxies after {took:.1f} s ({why}); injecting anyway"


async def _drive(traffic: Traffic, fault: Fault, opts: DrillOptions, marks: dict[str, float],
                 progress: Progress, replicated: Callable[[list[str]], tuple[bool, str]] | None = None) -> None:
    try:
        await traffic.start(progress)
        if replicated is not None:
            aors = [r.user for r in traffic.record.registrations if r.status == 200]
            if aors:
                ok, said = await asyncio.to_thread(replicated, aors)
                progress(said)
                if ok:
                    marks["registrations on the standby"] = time.monotonic()
        await asyncio.sleep(opts.before_s)
        new = asyncio.create_task(traffic.new_calls(opts.hold_s + opts.after_s))
        marks["fault injected"] = time.monotonic()
        progress(await asyncio.to_thread(fault.inject))
        await asyncio.sleep(opts.hold_s)
        marks["undo started"] = time.monotonic()
        progress(await asyncio.to_thread(fault.undo))
        marks["fault undone"] = time.monotonic()
        progress(f"observing {opts.after_s:g} s more")
        await asyncio.sleep(opts.after_s)
        await new
        progress("hanging up the established calls (BYE through the route set), reaching every registration")
        await traffic.hangup_established()
        await traffic.check_reachable()
        await traffic.unregister()
    finally:
        await traffic.close()


def _cluster_events(ctl: ClusterControl, wall_start: float, wall_minus_mono: float) -> list[tuple[float, str]]:
    """The cluster's own log lines of this drill, on the drill's clock (controls without logs give none)."""
    read = getattr(ctl, "log_lines", None)
    if read is None:
        return []
    evs: list[tuple[float, str]] = []
    for n in ctl.nodes:
        try:
            evs += timeline.events(read(n), wall_start - 1.0, time.time() + 1.0, node=n)
        except OSError:
            continue
    return timeline.to_monotonic(sorted(evs, key=lambda e: e[0]), wall_minus_mono)


def run_once(ctl: ClusterControl, opts: DrillOptions, progress: Progress = lambda _m: None,
             fault_factory: Callable[[str, str, ClusterControl], Fault] = make_fault) -> dict[str, Any]:  # fmt: skip
    """One drill; returns its report document (``interrupted`` True after Ctrl-C, with what was measured)."""
    from ha.drill.faults import resolve_target

    st = refuse_if_unhealthy(ctl)
    node = resolve_target(opts.target, st)
    fault = fault_factory(opts.fault, node, ctl)
    old = st.holder
    progress(f"{opts.fault} on {node} (VIP {ctl.vip} on {old}); {opts.registrations} registrations, "
             f"{opts.calls} calls, {opts.rate:g} new calls/s, {opts.transport}")  # fmt: skip
    traffic = Traffic(opts._traffic_config(ctl.vip, ctl.client_ip, ctl.sip_port), ctl.socket_factory())
    sampler = OwnershipSampler(ctl.vip_owners)
    holds = getattr(ctl, "proxy_holds", None)
    peers = [n for n in ctl.nodes if n != old and st.powered.get(n)]
    replicated = None
    if holds is not None and st.replication and peers:  # a stock cluster replicates nothing: nothing to wait for
        replicated = lambda aors: wait_replicated(holds, peers, aors)  # noqa: E731
    marks: dict[str, float] = {}
    interrupted, undo_error, error = False, None, None
    wall_minus_mono = time.time() - time.monotonic()
    wall_start = time.time()
    sampler.start()
    try:
        asyncio.run(_drive(traffic, fault, opts, marks, progress, replicated))
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: undoing the fault, then reporting what was measured")
    except (DrillError, OSError) as exc:  # e.g. the traffic's sockets could not be opened: still undo, report
        error = str(exc)
        progress(f"drill failed: {error}")
    finally:
        sampler.stop()
        if fault.injected and "fault undone" not in marks:
            try:
                progress(fault.undo())
                marks["fault undone"] = time.monotonic()
            except Exception as exc:
                undo_error = f"{type(exc).__name__}: {exc}"
        if fault.injected and undo_error is None:
            try:
                done = fault.restore()
                if done:
                    progress(done)
            except Exception as exc:
                undo_error = f"restore: {type(exc).__name__}: {exc}"
    rec = traffic.record
    cluster_events = _cluster_events(ctl, wall_start, wall_minus_mono)
    figs = measure.figures(rec.samples, rec.registrations, rec.calls, fault_at=marks.get("fault injected"),
                           old_node=old, ownership=sampler.samples)  # fmt: skip
    extra = {"variant": ctl.variant, "transport": opts.transport, "options": asdict(opts),
             "fault_detail": describe(fault), "interrupted": interrupted, "undo_error": undo_error, "error": error}
    return report.document(rec, figs, fault=opts.fault, target=node, old_node=old, marks=marks,
                           ownership=sampler.samples, cluster_events=cluster_events, extra=extra)


def run(ctl: ClusterControl, opts: DrillOptions, progress: Progress = lambda _m: None,
        fault_factory: Callable[[str, str, ClusterControl], Fault] = make_fault,
        sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:  # fmt: skip
    """``opts.repeat`` drills; ``aggregate`` holds p50/p95/p99/max per figure over the completed ones."""
    opts.check()
    if opts.baseline and ctl.variant != "stock":
        raise DrillError("--baseline runs against the stock lab: `sipha lab down && sipha lab up --stock`, "
                         "then the same drill again (the lab now is the sipha variant)")  # fmt: skip
    runs: list[dict[str, Any]] = []
    stopped = None
    if opts.wait_s > 0 and wait_healthy(ctl, opts.wait_s, sleep):
        progress(f"the cluster is still not healthy after {opts.wait_s:g} s")  # run_once refuses, saying why
    for k in range(opts.repeat):
        if k:
            progress(f"waiting for the cluster to be healthy again (up to {opts.settle_timeout_s:g} s)")
            problems = wait_healthy(ctl, opts.settle_timeout_s, sleep)
            if problems:
                stopped = f"after run {k}: the cluster did not recover: {'; '.join(problems)}"
                break
            if not wait_dc_idle(ctl, ctl.nodes[0], opts.settle_timeout_s, sleep=sleep):
                progress("Pacemaker's DC is still busy; starting anyway")
        progress(f"run {k + 1}/{opts.repeat}")
        try:
            doc = run_once(ctl, opts, progress, fault_factory)
        except Exception as exc:  # after a completed run, a failure must not throw away what was measured
            if not runs:
                raise  # nothing measured: the caller reports it (a refusal is exit 2 at the CLI)
            stopped = f"run {k + 1}: {type(exc).__name__}: {exc}"
            break
        runs.append(doc)
        if doc["interrupted"] or doc["undo_error"]:
            stopped = "interrupted" if doc["interrupted"] else f"undo failed: {doc['undo_error']}"
            break
    return {
        "fault": opts.fault,
        "variant": ctl.variant,
        "repeat": opts.repeat,
        "completed": len(runs),
        "stopped": stopped,
        "aggregate": measure.aggregate([r["figures"] for r in runs]),
        "runs": runs,
    }


__all__ = ["DrillOptions", "refuse_if_unhealthy", "run", "run_once", "wait_healthy"]
