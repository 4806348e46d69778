"""Where a whole-store read of N bindings goes (the node-start resync's first step): listing, multiRead with
the store's parse, the JSON decode into records; beside a lean multiRead parse (data bytes + mzxid only) and
``json.loads`` alone. Not a pass/fail gate: it prints the figures.

``flock /run/lock/sipha-lab.lock .venv/bin/python bench/coordinator_read_profile.py 100000 [--reads 3]``

A 3-member ensemble on loopback (``ha.zk_testing``), N bindings written in 5000-binding transactions, then
``--reads`` timed reads on a second session. Why the lean parse: if the proxy's table were kept on local disk
with each row's mzxid, a node start would need only the mzxids (and the data of rows that changed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

from conftest_zk import connect, contact  # noqa: E402

from ha.coordinator.store import _GET_CHILDREN, _GET_DATA, ContactRecord, ZkStore, _decode, _MultiRead  # noqa: E402
from ha.zk_testing import Ensemble  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=100_000)
    ap.add_argument("--reads", type=int, default=3)
    args = ap.parse_args()
    ens = Ensemble(Path(tempfile.mkdtemp(prefix="sipha-readprof-")) / "zk", tick_ms=500, heap_mb=768)
    ens.start(timeout=90)
    try:
        w = ZkStore(connect(ens, timeout_s=10), f"rp{uuid.uuid4().hex[:6]}", "node2")
        w.ensure_layout()
        w.bump_epoch()
        t0 = time.monotonic()
        for s in range(0, args.n, 5000):
            w.write([contact(i, f"u{i}", f"sip:u{i}@198.51.100.80:5060", node="node2")
                     for i in range(s + 1, min(s + 5000, args.n) + 1)])  # fmt: skip
        print(f"wrote {args.n} bindings in {time.monotonic() - t0:.1f} s", flush=True)
        r = ZkStore(connect(ens, timeout_s=10), w.root.split("/")[-1], "node1")
        c = r.client
        for k in range(args.reads):
            t0 = time.monotonic()
            buckets = r._buckets("contacts")
            listed = r._multi_read([(_GET_CHILDREN, p) for p in buckets], c)
            paths = [f"{p}/{x}" for p, ch in zip(buckets, listed, strict=True) for x in ch]
            t1 = time.monotonic()
            got = r._multi_read([(_GET_DATA, p) for p in paths], c)
            t2 = time.monotonic()
            recs = [_decode(ContactRecord, d, st.version, st.mzxid) for d, st in got]
            t3 = time.monotonic()
            asyncs = []
            for i in range(0, len(paths), 200):
                a = c.handler.async_result()
                c._call(_MultiRead([(_GET_DATA, p) for p in paths[i : i + 200]], lean=True), a)
                asyncs.append(a)
            lean = [x for a in asyncs for x in a.get(timeout=60)]
            t4 = time.monotonic()
            _ = [json.loads(d) for d, _v, _z in lean]
            t5 = time.monotonic()
            assert len(recs) == len(lean) == args.n
            print(f"read {k + 1}: list {t1 - t0:.2f} s ({len(paths)} znodes), multiRead + parse {t2 - t1:.2f} s, "
                  f"decode to records {t3 - t2:.2f} s | lean multiRead {t4 - t3:.2f} s, json.loads alone "
                  f"{t5 - t4:.2f} s", flush=True)  # fmt: skip
    finally:
        ens.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
