"""The numbers for BENCHMARKS.md: fault kinds x K repeats each, on the lab that is up now.

    sudo .venv/bin/python bench/drill_bench.py --repeat 20 --faults node-crash --out /tmp/drill-model
    sudo .venv/bin/python bench/drill_bench.py --repeat 20 --faults node-crash --out /tmp/drill-stock --baseline

The lab is shared and a machine-wide singleton: run one fault kind per lock hold, e.g.
``flock /run/lock/sipha-lab.lock bash -c 'sipha lab up examples/lab.yaml && python bench/drill_bench.py
--faults KIND ...; sipha lab down'``.

Writes ``<out>/<fault>.json`` (every run's full document and the aggregate: large) and
``<out>/<fault>.summary.json`` (options, load, per-run figures without samples, the aggregate: small enough to
keep in the repo), and prints per fault: p50/p99/max gap, how many runs recovered, how many of those only
after the fault's undo (the cluster never took over within ``--hold-s``: the gap is the fault's length, not
a failover), registrations and calls survived (totals over the runs), split-brain samples (max).
Each fault kind starts only once the cluster is healthy (``--wait``). Nothing here is measured in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ha.drill import faults, run
from ha.drill.labctl import LabControl

# Kinds whose undo can itself bring the service back (power on, SIGCONT, heal, link up): a gap that ends only
# after their undo started was ended by the undo, not by a failover. (proxy-crash's undo does nothing; the
# planned kinds' undo, --clear and standby off, moves nothing back; SIP never waits for a ZooKeeper member.)
UNDO_RESTORES = {"node-crash", "proxy-hang", "partition", "link-flap"}


def _event_t(doc: dict[str, Any], name: str) -> float | None:
    return next((e["t"] for e in doc["timeline"] if e["event"] == name and e["t"] is not None), None)


def run_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """One run, small: the flat figures, when the gap ended relative to the undo, the fault's own words."""
    figs = {k: v for k, v in doc["figures"].items() if k != "details"}
    gap = doc["figures"]["details"].get("gap") or {}
    undo = _event_t(doc, "undo started")
    end = gap.get("end")
    after_undo = doc["fault"] in UNDO_RESTORES and end is not None and undo is not None and end >= undo
    return {
        "started": doc["started"],
        "target": doc["target"],
        "old_node": doc["old_node"],
        "figures": figs,
        "gap_start_s": gap.get("start"),
        "gap_end_s": end,
        "undo_started_s": undo,
        # recovered only once the fault was undone: the cluster did not take over by itself within hold_s
        "recovered_after_undo": after_undo,
        "answers_by_node": doc["figures"]["details"].get("answers_by_node"),
        "unreachable": doc["figures"]["details"]["registrations"]["unreachable"],
        "bye_failed": doc["figures"]["details"]["calls"]["bye_failed"],
        "error": doc.get("error"),
        "undo_error": doc.get("undo_error"),
    }


def totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    f = [r["figures"] for r in runs]
    return {
        "runs": len(runs),
        "recovered": sum(1 for x in f if x["recovered"]),
        "recovered_after_undo": sum(1 for r in runs if r["recovered_after_undo"]),
        "registrations_reachable": sum(x["registrations_reachable"] for x in f),
        "registrations_checked": sum(x["registrations_checked"] for x in f),
        "calls_bye_ok": sum(x["calls_bye_ok"] for x in f),
        "calls_established": sum(x["calls_established"] for x in f),
        "split_brain_max": max((x["split_brain_samples"] for x in f), default=0),
        "requests_failed": sum(x["requests_failed"] for x in f),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--faults", default=",".join(faults.KINDS), help="comma-separated fault kinds")
    ap.add_argument("--target", default="active")
    ap.add_argument("--registrations", type=int, default=20)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--before-s", type=float, default=1.0, help="traffic before the fault")
    ap.add_argument("--hold-s", type=float, default=3.0, help="between inject and undo")
    ap.add_argument("--after-s", type=float, default=4.0, help="observed after the undo")
    ap.add_argument("--wait", type=float, default=180.0, help="seconds to wait for a healthy cluster")
    ap.add_argument("--baseline", action="store_true", help="the lab is the stock variant (lab up --stock)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    bad = [k for k in kinds if k not in faults.KINDS]
    if bad:
        print(f"unknown fault(s) {', '.join(bad)}; one of {', '.join(faults.KINDS)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ctl = LabControl()
    t0 = time.monotonic()
    rows = []
    try:
        for kind in kinds:
            opts = run.DrillOptions(fault=kind, target=args.target, registrations=args.registrations,
                                    calls=args.calls, rate=args.rate, before_s=args.before_s, hold_s=args.hold_s,
                                    after_s=args.after_s, repeat=args.repeat, baseline=args.baseline,
                                    wait_s=args.wait, settle_timeout_s=args.wait)  # fmt: skip
            load0 = os.getloadavg()[0]
            res = run.run(ctl, opts, lambda m, k=kind: print(f"[{time.monotonic() - t0:8.1f}s] {k}: {m}",
                                                              file=sys.stderr, flush=True))  # fmt: skip
            load1 = os.getloadavg()[0]
            (args.out / f"{kind}.json").write_text(json.dumps(res, indent=1))
            runs = [run_summary(d) for d in res["runs"]]
            summary = {
                "fault": kind,
                "variant": res["variant"],
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cores": os.cpu_count(),
                "load_1min": [round(load0, 2), round(load1, 2)],
                "argv": sys.argv,
                "options": res["runs"][0]["options"] if res["runs"] else None,
                "completed": res["completed"],
                "stopped": res["stopped"],
                "totals": totals(runs),
                "aggregate": res["aggregate"],
                "runs": runs,
            }
            (args.out / f"{kind}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            rows.append((kind, summary))
            if res["stopped"] == "interrupted":
                break
    finally:
        ctl.close()
    print(f"{'fault':<16}{'n':>4}{'gap p50':>10}{'gap p99':>10}{'gap max':>10}{'rec':>5}{'undo':>6}{'regs':>10}"
          f"{'BYE':>9}{'split':>7}")  # fmt: skip
    for kind, s in rows:
        gap, t = s["aggregate"].get("gap_ms", {}), s["totals"]
        print(f"{kind:<16}{s['completed']:>4}{gap.get('p50', '-'):>10}{gap.get('p99', '-'):>10}"
              f"{gap.get('max', '-'):>10}{t['recovered']:>5}{t['recovered_after_undo']:>6}"
              f"{t['registrations_reachable']:>5}/{t['registrations_checked']:<4}{t['calls_bye_ok']:>4}/"
              f"{t['calls_established']:<4}{t['split_brain_max']:>7}")  # fmt: skip
        if s["stopped"]:
            print(f"  stopped: {s['stopped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
