"""The numbers for BENCHMARKS.md: every fault kind, K repeats each, on the lab that is up now.

    sudo .venv/bin/python bench/drill_bench.py --repeat 20 --out /tmp/drill-model        # sipha's lab
    sudo .venv/bin/python bench/drill_bench.py --repeat 20 --out /tmp/drill-stock --baseline  # lab up --stock

Writes ``<out>/<fault>.json`` (every run's document and the aggregate) and prints p50/p99 gap, retransmits,
registrations and calls survived, split-brain samples per fault. It needs the lab up and healthy; each fault
kind starts only once the cluster is healthy again after the previous one. Nothing here is measured in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ha.drill import faults, run
from ha.drill.labctl import LabControl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--faults", default=",".join(faults.KINDS), help="comma-separated fault kinds")
    ap.add_argument("--registrations", type=int, default=20)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rate", type=float, default=2.0)
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
            opts = run.DrillOptions(fault=kind, registrations=args.registrations, calls=args.calls, rate=args.rate,
                                    repeat=args.repeat, baseline=args.baseline)  # fmt: skip
            problems = run.wait_healthy(ctl, opts.settle_timeout_s)
            if problems:
                print(f"{kind}: skipped, the cluster is not healthy: {'; '.join(problems)}", file=sys.stderr)
                continue
            res = run.run(ctl, opts, lambda m, k=kind: print(f"[{time.monotonic() - t0:8.1f}s] {k}: {m}",
                                                              file=sys.stderr))  # fmt: skip
            (args.out / f"{kind}.json").write_text(json.dumps(res, indent=1))
            a = res["aggregate"]
            rows.append((kind, res["completed"], a.get("gap_ms", {}), a.get("retransmits_max", {}),
                         a.get("registrations_reachable", {}), a.get("calls_bye_ok", {}),
                         a.get("split_brain_samples", {})))  # fmt: skip
            if res["stopped"] == "interrupted":
                break
    finally:
        ctl.close()
    print(f"{'fault':<16}{'n':>4}{'gap p50':>10}{'gap p99':>10}{'rtx max':>9}{'reg p50':>9}{'bye p50':>9}"
          f"{'split max':>10}")
    for kind, n, gap, rtx, reg, bye, sb in rows:
        print(f"{kind:<16}{n:>4}{gap.get('p50', '-'):>10}{gap.get('p99', '-'):>10}{rtx.get('max', '-'):>9}"
              f"{reg.get('p50', '-'):>9}{bye.get('p50', '-'):>9}{sb.get('max', '-'):>10}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
