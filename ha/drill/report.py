"""A drill's report: one JSON document with every figure and the timeline, a rich table, a PNG timeline.

Everything renders from the JSON document alone (:func:`document`), so a report saved during an incident
review can be re-drawn later, and the table, the JSON and the plot can never disagree. Times in the document
are seconds relative to the first probe sent (``t0``); the wall-clock start is recorded once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ha.drill import measure
from ha.drill.traffic import TrafficRecord

VERSION = 1

# (figure, label, unit) in the order an operator reads them.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("gap_ms", "longest gap with no answer at the VIP", "ms"),
    ("recovered", "service answered again", ""),
    ("recovery_ms", "fault -> first answer after the gap", "ms"),
    ("first_answer_new_node_ms", "fault -> first answer from another node", "ms"),
    ("retransmits_max", "UDP retransmits a caller needed (worst)", ""),
    ("requests_failed", "requests that would have timed out", ""),
    ("registrations_reachable", "registrations reachable after (no re-REGISTER)", ""),
    ("calls_bye_ok", "established calls whose BYE completed", ""),
    ("new_calls_during_ok", "new calls set up during the fault", ""),
    ("split_brain_samples", "split-brain samples (VIP on two nodes)", ""),
)
_OF = {"registrations_reachable": "registrations_checked", "calls_bye_ok": "calls_established",
       "new_calls_during_ok": "new_calls_during"}  # fmt: skip


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 4)


def document(record: TrafficRecord, figures: Mapping[str, Any], *, fault: str, target: str | None,
             old_node: str | None, marks: Mapping[str, float], ownership: measure.Ownership = (),
             cluster_events: Sequence[tuple[float, str]] = (), extra: Mapping[str, Any] | None = None,
             ) -> dict[str, Any]:  # fmt: skip
    """The JSON document of one drill. ``marks`` are named instants (fault, undo, ...) on the monotonic clock;
    ``cluster_events`` the cluster's own timeline (membership change, fence, VIP start) on the same clock."""
    t0 = min((s.sent for s in record.samples), default=min(marks.values(), default=0.0))
    # A reply that does not name its node is credited to the VIP holder of the moment, as in the figures.
    samples = measure.attribute_nodes(record.samples, ownership) if ownership else record.samples
    timeline = [{"t": _rel(t, t0), "event": name} for name, t in marks.items()]
    timeline += [{"t": _rel(t, t0), "event": what} for t, what in cluster_events]
    gap = (figures.get("details") or {}).get("gap") or {}
    for key, what in (("start", "last answer before the gap"), ("end", "first answer after the gap")):
        if gap.get(key) is not None:
            timeline.append({"t": _rel(gap[key], t0), "event": what})
    timeline.sort(key=lambda e: e["t"] if e["t"] is not None else float("inf"))
    raw = record.to_json()
    details = dict(figures.get("details") or {})
    if details.get("gap"):
        details["gap"] = {k: (_rel(v, t0) if k in ("start", "end") else v) for k, v in details["gap"].items()}
    if details.get("split_brain", {}).get("first_at") is not None:
        details["split_brain"] = {**details["split_brain"], "first_at": _rel(details["split_brain"]["first_at"], t0)}
    return {
        "version": VERSION,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - t0))),
        "fault": fault,
        "target": target,
        "old_node": old_node,
        **dict(extra or {}),
        "figures": {**{k: v for k, v in figures.items() if k != "details"}, "details": details},
        "timeline": timeline,
        "samples": [[_rel(s.sent, t0), _rel(s.answered, t0), s.status, s.node] for s in samples],
        "ownership": [[_rel(t, t0), dict(own)] for t, own in ownership],
        "registrations": [_shift(r, ("registered_at", "reach_sent"), t0) for r in raw["registrations"]],
        "calls": [_shift(c, ("started", "setup_at", "bye_sent", "bye_at"), t0) for c in raw["calls"]],
        "stream_reconnects": record.stream_reconnects,
        "errors": list(record.errors),
    }


def _shift(d: Mapping[str, Any], keys: Sequence[str], t0: float) -> dict[str, Any]:
    return {**d, **{k: _rel(d[k], t0) for k in keys}}


def write_json(doc: Mapping[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return p


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- tables


def _fmt(key: str, value: Any, figs: Mapping[str, Any]) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if key in _OF:
        return f"{value} / {figs.get(_OF[key], '?')}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def summary_table(doc: Mapping[str, Any]) -> Table:
    figs = doc["figures"]
    title = f"drill {doc['fault']}" + (f" on {doc['target']}" if doc.get("target") else "")
    if doc.get("old_node"):
        title += f" (VIP was on {doc['old_node']})"
    t = Table(title=title, title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("unit")
    for key, label, unit in ROWS:
        if key in figs:
            t.add_row(label, _fmt(key, figs[key], figs), unit)
    return t


def repeat_table(agg: Mapping[str, Mapping[str, Any]], fault: str, k: int) -> Table:
    t = Table(title=f"drill {fault} x {k}: per figure over the repeats (nearest rank)", title_justify="left")
    for col in ("figure", "p50", "p95", "p99", "max", "n"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for key, label, _unit in ROWS:
        a = agg.get(key)
        if not a:
            continue
        if "true" in a:
            t.add_row(label, f"{a['true']}/{a['n']} yes", "", "", "", str(a["n"]))
            continue
        cells = [_fmt(key, a.get(p), {}) if key not in _OF else _num(a.get(p)) for p in ("p50", "p95", "p99", "max")]
        t.add_row(label, *cells, str(a["n"]))
    return t


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def print_report(doc: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(doc))
    for e in doc.get("errors", []):
        console.print(f"[yellow]note:[/] {e}")
    undo = doc.get("undo_error")
    if undo:
        console.print(f"[red]undo failed:[/] {undo}")


# ---------------------------------------------------------------------------------------------- the plot


def plot(doc: Mapping[str, Any], path: str | Path) -> Path:
    """A PNG an operator can paste into an incident review: every probe's answer time (by node), the
    unanswered ones, the gap shaded, fault/undo/recovery marked, and which node held the VIP below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = doc["samples"]
    figs = doc["figures"]
    own = doc.get("ownership") or []
    nodes = sorted({n for _t, o in own for n in o} | {s[3] for s in samples if s[3]})
    fig, axes = plt.subplots(2 if own else 1, 1, figsize=(11, 5.5 if own else 4), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]} if own else None)  # fmt: skip
    ax = axes[0][0]
    colors = {n: f"C{i}" for i, n in enumerate(nodes)}
    answered = [s for s in samples if s[1] is not None]
    for node in [*nodes, None]:
        pts = [s for s in answered if s[3] == node]
        if pts:
            ax.scatter([s[0] for s in pts], [(s[1] - s[0]) * 1000 for s in pts], s=6,
                       color=colors.get(node, "grey"), label=f"answered by {node or 'unknown node'}")  # fmt: skip
    lost = [s[0] for s in samples if s[1] is None]
    top = max([(s[1] - s[0]) * 1000 for s in answered] or [1.0]) * 1.15 + 5
    if lost:
        ax.scatter(lost, [top] * len(lost), marker="x", s=12, color="red", label=f"no answer ({len(lost)})")
    gap = figs.get("details", {}).get("gap") or {}
    if gap.get("start") is not None:
        end = gap["end"] if gap.get("end") is not None else max(s[0] for s in samples)
        ax.axvspan(gap["start"], end, color="red", alpha=0.12, label=f"gap {figs.get('gap_ms')} ms")
    for e in doc.get("timeline", []):
        if e["t"] is None or e["event"].startswith(("last answer", "first answer")):
            continue
        cluster = ": " in e["event"]  # "node2: pacemaker: ..." lines from the cluster's own logs
        ax.axvline(e["t"], color="grey" if cluster else "black", linestyle=":" if cluster else "--", linewidth=0.8)
        ax.annotate(e["event"], (e["t"], top), rotation=90, fontsize=6 if cluster else 7, va="top", ha="right",
                    color="dimgrey" if cluster else "black")  # fmt: skip
    ax.set_ylabel("answer time (ms)")
    ax.set_ylim(0, top * 1.08)
    ax.legend(loc="upper right", fontsize=7)
    title = f"sipha drill {doc['fault']}" + (f" on {doc['target']}" if doc.get("target") else "")
    title += f" - {doc.get('started', '')}: gap {figs.get('gap_ms')} ms"
    rr, rc = figs.get("registrations_reachable"), figs.get("registrations_checked")
    if rc:
        title += f", registrations {rr}/{rc}"
    if figs.get("calls_established"):
        title += f", BYE {figs.get('calls_bye_ok')}/{figs.get('calls_established')}"
    ax.set_title(title, fontsize=9)
    if own:
        ax2 = axes[1][0]
        for i, node in enumerate(nodes):
            ts = [o[0] for o in own]
            ys = [i + 0.8 * bool(o[1].get(node)) for o in own]
            ax2.fill_between(ts, i, ys, step="post", color=colors[node], alpha=0.7)
        ax2.set_yticks([i + 0.4 for i in range(len(nodes))], [f"VIP on {n}" for n in nodes], fontsize=7)
        ax2.set_xlabel("seconds since the first probe")
    else:
        ax.set_xlabel("seconds since the first probe")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["ROWS", "document", "plot", "print_report", "read_json", "repeat_table", "summary_table", "write_json"]
