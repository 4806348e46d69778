"""What a fault cost the callers, computed from what the traffic recorded: pure functions, no I/O.

Kept apart from the traffic so every figure can be checked by hand against an explicit sample sequence (the
unit tests do exactly that), and so a report can be recomputed later from a saved JSON.

Definitions (times are seconds on one monotonic clock):

* **gap**: the longest time with no answer at the VIP, i.e. the longest interval between two consecutive answer
  *arrivals* of the OPTIONS stream. Arrival, not send time: a hung proxy (SIGSTOP) answers its queued probes
  when it resumes, so every probe is "answered", yet the caller heard nothing for the whole hang. If probes
  were sent after the last answer and never answered, the trailing interval counts and ``recovered`` is False.
* **retransmits**: a UDP UAC (RFC 3261 17.1.2.2, T1 = 500 ms) resends a request at +0.5, +1.5, +3.5, +7.5 s…
  (non-INVITE: doubling capped at T2 = 4 s, so +11.5, +15.5 …; INVITE: doubling, up to 64·T1). For a probe
  answered at ``a``: the resends it would have made before ``a``. For a probe never answered: the resends before
  the service answered again (the next answer arrival after it was sent), plus the first one at or after that
  moment, which is the one that gets through. ``None`` when even the last resend came too early (the
  transaction would have timed out: a failed request).
* **split brain**: an instant (one ownership sample, every 10 ms) at which two or more nodes hold the VIP.
* **percentiles** (``--repeat``): nearest rank, so every reported value is one that was measured.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ha.drill.traffic import Call, Registration, Sample

T1_S = 0.5
T2_S = 4.0
TIMER_B_S = 64 * T1_S  # 32 s: a transaction gives up after this (Timer B for INVITE, F for non-INVITE)

Ownership = Sequence[tuple[float, Mapping[str, bool]]]  # (time, {node: holds the VIP}) every 10 ms


@dataclass(frozen=True)
class Gap:
    """The longest silence: ``start`` is the last answer before it, ``end`` the first after (None: never)."""

    start: float
    end: float | None
    length: float
    recovered: bool


def answer_times(samples: Iterable[Sample]) -> list[float]:
    return sorted(s.answered for s in samples if s.answered is not None)


def longest_gap(samples: Sequence[Sample], since: float | None = None) -> Gap | None:
    """The longest interval without an answer (see the module docstring); None without any sample.

    ``since`` ignores silences that ended before it (e.g. before the fault, while the stream was starting).
    """
    if not samples:
        return None
    arrivals = answer_times(samples)
    last_sent = max(s.sent for s in samples)
    if not arrivals:
        first = min(s.sent for s in samples)
        return Gap(first, None, last_sent - first, False)
    best: Gap | None = None
    for a, b in itertools.pairwise(arrivals):
        if since is not None and b < since:
            continue
        if best is None or b - a > best.length:
            best = Gap(a, b, b - a, True)
    unanswered_after = any(s.answered is None and s.sent > arrivals[-1] for s in samples)
    trailing = last_sent - arrivals[-1]
    if unanswered_after and (best is None or trailing > best.length):
        best = Gap(arrivals[-1], None, trailing, False)
    if best is None:  # a single answer and nothing unanswered after it
        best = Gap(arrivals[-1], arrivals[-1], 0.0, True)
    return best


def retransmit_offsets(invite: bool = False, timeout: float = TIMER_B_S) -> list[float]:
    """Offsets after the first send at which a UDP UAC resends: [0.5, 1.5, 3.5, 7.5, 11.5, ...] (non-INVITE)."""
    out, t, interval = [], 0.0, T1_S
    while True:
        t += interval
        if t >= timeout:
            return out
        out.append(t)
        interval = interval * 2 if invite else min(interval * 2, T2_S)


def retransmits_needed(sent: float, answered: float | None, recovered_at: float | None,
                       offsets: Sequence[float]) -> int | None:  # fmt: skip
    """Resends one request needed (see the module docstring); None if it would have failed."""
    if answered is not None:
        return sum(1 for o in offsets if sent + o < answered)
    if recovered_at is None:
        return None
    n = sum(1 for o in offsets if sent + o < recovered_at)
    return n + 1 if n < len(offsets) else None


def retransmits(samples: Sequence[Sample], invite: bool = False) -> dict[str, Any]:
    """Per probe, the resends a UDP UAC would have needed: the worst, a histogram, and how many would fail."""
    offsets = retransmit_offsets(invite)
    arrivals = answer_times(samples)
    per: list[int | None] = []
    for s in samples:
        rec = None
        if s.answered is None:
            i = bisect.bisect_right(arrivals, s.sent)
            rec = arrivals[i] if i < len(arrivals) else None
        per.append(retransmits_needed(s.sent, s.answered, rec, offsets))
    counted = [n for n in per if n is not None]
    return {
        "max": max(counted, default=0),
        "histogram": {str(k): v for k, v in sorted(Counter(counted).items())},
        "failed": sum(1 for n in per if n is None),
        "schedule_s": offsets[:4],
    }


def holder_at(ownership: Ownership, t: float) -> str | None:
    """The single node holding the VIP at the last ownership sample at or before ``t`` (None: none or two)."""
    times = [o[0] for o in ownership]
    i = bisect.bisect_right(times, t) - 1
    if i < 0:
        return None
    owners = [n for n, held in ownership[i][1].items() if held]
    return owners[0] if len(owners) == 1 else None


def attribute_nodes(samples: Sequence[Sample], ownership: Ownership) -> list[Sample]:
    """Samples whose reply did not name its node get the VIP holder at answer time (copies; input unchanged)."""
    out = []
    for s in samples:
        if s.node is None and s.answered is not None:
            s = replace(s, node=holder_at(ownership, s.answered))
        out.append(s)
    return out


def first_answer_from(samples: Sequence[Sample], since: float, not_node: str | None) -> float | None:
    """Seconds from ``since`` to the first answer arriving after it from a node other than ``not_node``."""
    times = [s.answered for s in samples if s.answered is not None and s.answered > since
             and s.node is not None and s.node != not_node]  # fmt: skip
    return min(times) - since if times else None


def registrations(regs: Sequence[Registration]) -> dict[str, Any]:
    ok = [r for r in regs if r.status == 200]
    checked = [r for r in ok if r.reach_sent is not None]
    return {
        "attempted": len(regs),
        "registered": len(ok),
        "checked": len(checked),
        "reachable": sum(r.reachable for r in checked),
        "unreachable": [r.user for r in checked if not r.reachable],
    }


def _ratio(ok: int, n: int) -> float | None:
    return round(ok / n, 4) if n else None


def _new_calls(cs: Sequence[Call]) -> dict[str, Any]:
    ok = sum(c.set_up for c in cs)
    return {"attempted": len(cs), "set_up": ok, "ratio": _ratio(ok, len(cs))}


def calls(cs: Sequence[Call], fault_at: float | None, recovered_at: float | None) -> dict[str, Any]:
    """Established calls (BYE completed?) and new-call set-up success before, during and after the fault.

    "during" is from the fault to the recovery (the end of the gap); without a recovery everything after the
    fault is "during".
    """
    est = [c for c in cs if c.phase == "established"]
    up = [c for c in est if c.set_up]
    new: dict[str, list[Call]] = {"before": [], "during": [], "after": []}
    for c in cs:
        if c.phase != "new":
            continue
        if fault_at is None or c.started < fault_at:
            new["before"].append(c)
        elif recovered_at is None or c.started < recovered_at:
            new["during"].append(c)
        else:
            new["after"].append(c)
    return {
        "established": len(up),
        "attempted_before_fault": len(est),
        "bye_ok": sum(c.bye_ok for c in up),
        "bye_failed": [c.call_id for c in up if not c.bye_ok],
        "new": {k: _new_calls(v) for k, v in new.items()},
    }


def split_brain(ownership: Ownership, interval: float = 0.01) -> dict[str, Any]:
    """Instants at which two or more nodes held the VIP, and at which none did."""
    both = [t for t, own in ownership if sum(bool(v) for v in own.values()) >= 2]
    none = sum(1 for _t, own in ownership if not any(own.values()))
    longest = run = 0
    for _t, own in ownership:
        run = run + 1 if sum(bool(v) for v in own.values()) >= 2 else 0
        longest = max(longest, run)
    return {
        "samples": len(both),
        "total": len(ownership),
        "first_at": both[0] if both else None,
        "longest_ms": round(longest * interval * 1000, 1),
        "vip_nowhere_samples": none,
    }


def figures(samples: Sequence[Sample], regs: Sequence[Registration], cs: Sequence[Call], *,
            fault_at: float | None, old_node: str | None, ownership: Ownership = ()) -> dict[str, Any]:  # fmt: skip
    """Every figure of one drill, flat where a repeat aggregates it (``*_ms``, counts), nested details after."""
    samples = attribute_nodes(samples, ownership) if ownership else list(samples)
    gap = longest_gap(samples, since=fault_at)
    recovered_at = gap.end if gap else None
    rtx = retransmits(samples)
    first_new = first_answer_from(samples, fault_at, old_node) if fault_at is not None else None
    reg = registrations(regs)
    call = calls(cs, fault_at, recovered_at)
    sb = split_brain(ownership)
    during = call["new"]["during"]
    recovery = recovered_at - fault_at if recovered_at is not None and fault_at is not None else None
    return {
        "gap_ms": round(gap.length * 1000, 1) if gap else None,
        "recovered": bool(gap and gap.recovered),
        "recovery_ms": round(recovery * 1000, 1) if recovery is not None else None,
        "first_answer_new_node_ms": round(first_new * 1000, 1) if first_new is not None else None,
        "retransmits_max": rtx["max"],
        "requests_failed": rtx["failed"],
        "probes_sent": len(samples),
        "probes_unanswered": sum(1 for s in samples if s.answered is None),
        "registrations_reachable": reg["reachable"],
        "registrations_checked": reg["checked"],
        "calls_bye_ok": call["bye_ok"],
        "calls_established": call["established"],
        "new_calls_during_ok": during["set_up"],
        "new_calls_during": during["attempted"],
        "split_brain_samples": sb["samples"],
        "details": {
            "gap": None if gap is None else {"start": gap.start, "end": gap.end, "recovered": gap.recovered},
            "retransmits": rtx,
            "registrations": reg,
            "calls": call,
            "split_brain": sb,
            "answers_by_node": dict(Counter(s.node or "?" for s in samples if s.answered is not None)),
        },
    }


# ---------------------------------------------------------------------------------------------- --repeat


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (the smallest value with at least p % of the values at or below it)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} outside (0, 100]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """p50/p95/p99/max per numeric figure over repeated drills; runs that lack a figure count as missing."""
    keys = [k for k in (runs[0] if runs else {}) if k != "details"]
    out: dict[str, dict[str, Any]] = {}
    for k in keys:
        raw = [r.get(k) for r in runs]
        if all(isinstance(v, bool) for v in raw if v is not None):
            out[k] = {"n": len(raw), "true": sum(1 for v in raw if v), "false": sum(1 for v in raw if v is False)}
            continue
        vals = [float(v) for v in raw if isinstance(v, int | float) and not isinstance(v, bool)]
        entry: dict[str, Any] = {"n": len(vals), "missing": len(raw) - len(vals)}
        if vals:
            entry |= {f"p{p}": percentile(vals, p) for p in (50, 95, 99)} | {"max": max(vals)}
        out[k] = entry
    return out


__all__ = [
    "Gap",
    "aggregate",
    "answer_times",
    "attribute_nodes",
    "calls",
    "figures",
    "first_answer_from",
    "holder_at",
    "longest_gap",
    "percentile",
    "registrations",
    "retransmit_offsets",
    "retransmits",
    "retransmits_needed",
    "split_brain",
]
