"""Compact a ``drill_bench.py`` summary the way ``bench/results/drill/*.json`` are kept in the repo.

``python bench/compact_drill.py <out>/<kind>.summary.json bench/results/drill/<variant>-<kind>.json`` (``-`` for
stdout). Why: the lists of unreachable AoRs and failed BYEs are what a reader of a bad run wants in /tmp, but
only their counts belong in the repo, and no whitespace keeps 20 runs' figures small enough to review.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def compact(src: Path) -> str:
    doc = json.loads(src.read_text())
    for run in doc["runs"]:
        for key in ("unreachable", "bye_failed"):
            if isinstance(run.get(key), list):
                run[key] = len(run[key])
    return json.dumps(doc, separators=(",", ":")) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: compact_drill.py SUMMARY.json OUT.json|-", file=sys.stderr)
        return 2
    out = compact(Path(argv[0]))
    if argv[1] == "-":
        sys.stdout.write(out)
    else:
        Path(argv[1]).write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
