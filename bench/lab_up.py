"""Bench: how long `sipha lab up` takes, and the caller's-eye gap of a hard kill of the VIP's node.

Each run: lab up (timed) -> a 20 ms OPTIONS prober on the client host aimed at the VIP -> power off the node
holding the VIP -> longest unanswered gap -> lab down (always). Prints one line per run and the medians.

    sudo .venv/bin/python bench/lab_up.py                 # sipha's model (examples/lab.yaml), 3 runs
    sudo .venv/bin/python bench/lab_up.py --stock         # baseline: token 3000, IPaddr2 + kamailio group
    sudo .venv/bin/python bench/lab_up.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ha.lab import lab as labmod  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cluster_yaml", nargs="?", default=str(REPO / "examples/lab.yaml"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stock", action="store_true")
    ap.add_argument("--interval-ms", type=int, default=20)
    ap.add_argument("--after-s", type=float, default=None, help="probe this long after the kill")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait after up before the kill")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    variant = "stock" if args.stock else "model"
    after = args.after_s if args.after_s is not None else (14.0 if args.stock else 6.0)
    runs = []
    for i in range(1, max(1, min(args.runs, 20)) + 1):
        with labmod.lab_up(args.cluster_yaml, echo=lambda _m: None, variant=variant) as up_s:
            time.sleep(args.settle_s)
            spec = labmod.load_spec()
            res = labmod.failover(spec, interval=args.interval_ms / 1000, after=after, echo=lambda _m: None)
        run = {"run": i, "up_s": round(up_s, 2), **res}
        runs.append(run)
        print(f"run {i}: lab up {up_s:.2f} s; killed {res['killed']} -> VIP on {res['new_holder']}; "
              f"longest gap {res['longest_gap_ms']:.0f} ms; {res['answered']}/{res['sent']} answered"
              f"{'' if res['recovered'] else '; NOT RECOVERED'}", flush=True)  # fmt: skip
    ups = [r["up_s"] for r in runs]
    gaps = [r["longest_gap_ms"] for r in runs if r["recovered"]]
    summary = {
        "variant": variant,
        "runs": len(runs),
        "lab_up_median_s": round(statistics.median(ups), 2),
        "lab_up_max_s": max(ups),
        "gap_median_ms": round(statistics.median(gaps), 1) if gaps else None,
        "gap_min_ms": min(gaps, default=None),
        "gap_max_ms": max(gaps, default=None),
        "not_recovered": sum(not r["recovered"] for r in runs),
    }
    print(f"{variant}: lab up median {summary['lab_up_median_s']} s (max {summary['lab_up_max_s']} s); "
          f"hard-kill gap median {summary['gap_median_ms']} ms (min {summary['gap_min_ms']}, "
          f"max {summary['gap_max_ms']}); not recovered: {summary['not_recovered']}")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0 if not summary["not_recovered"] else 1


if __name__ == "__main__":
    sys.exit(main())
