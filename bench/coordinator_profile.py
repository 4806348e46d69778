"""Where the coordinator's replication CPU goes, without the lab: the active's intake and write path, and the
standby's watch, each against a real 3-member ZooKeeper ensemble on loopback (``ha.zk_testing``).

    .venv/bin/python bench/coordinator_profile.py [N] [--profile active|watch] [--burst 256]

N REGISTER events (distinct AoRs, as the generated kamailio.cfg sends them) are fed to an active
:class:`~ha.coordinator.replication.Replication` as datagram bytes, ``--burst`` at a time followed by one
``flush()`` (what the service's loop does per drained burst). A second client's contact watch (the standby's,
without a proxy behind it) counts the bindings it is delivered. Prints events/s through the active, the time until
the watch had all of them, and the CPU seconds of this process; ``--profile`` adds cProfile's top functions of
that side. Why: the lab's replication bench (``bench/coordinator_replication.py``) shows the whole machine busy
at 500 REGISTER/s; this separates the coordinator's own cost from Kamailio's, ZooKeeper's and the lab's.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from kazoo.client import KazooClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ha.coordinator.journal import Journal
from ha.coordinator.replication import Replication
from ha.coordinator.store import ZkStore
from ha.coordinator.zkhandler import new_client
from ha.zk_testing import Ensemble


def datagram(seq: int, aor: str, now: int) -> bytes:
    return json.dumps({
        "seq": seq, "node": "node1", "type": "contact.insert", "ts": now * 1000, "aor": aor,
        "contact": f"sip:{aor}@198.51.100.50:5062", "expires": 3600, "expires_at": now + 3600, "q": -1,
        "received": "udp:198.51.100.50:5062", "socket": "udp:198.51.100.10:5060", "path": "",
        "callid": f"reg-{aor}", "cseq": 1, "user_agent": "bench 1.0", "flags": 0, "cflags": 0, "methods": -1,
        "ruid": f"uloc-{seq}",
    }).encode()  # fmt: skip


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def top(prof: cProfile.Profile, n: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(n)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=20000)
    ap.add_argument("--burst", type=int, default=256)
    ap.add_argument("--profile", choices=("active", "watch"))
    args = ap.parse_args()
    if not 1 <= args.n <= 500_000:
        raise SystemExit("N: 1-500000")
    root = Path(tempfile.mkdtemp(prefix="sipha-prof-"))
    ens = Ensemble(root, heap_mb=512)
    clients: list[KazooClient] = []
    try:
        ens.start(timeout=90)
        for _ in range(2):
            c = new_client(ens.hosts, timeout=10)  # the service's clients (its poll handler)
            c.start(timeout=20)
            clients.append(c)
        cluster = "prof"
        active = Replication(ZkStore(clients[0], cluster, "node1"), "node1", Journal(root / "journal.jsonl"))
        active.start()
        active.promote()
        seen: set[str] = set()
        done = threading.Event()
        wprof = cProfile.Profile() if args.profile == "watch" else None

        if wprof is not None:  # the watch thread's passes (reads and bookkeeping), not only the callback
            from ha.coordinator import store as storemod

            process = storemod._ZkContactWatch._process

            def profiled(self: object, items: list) -> object:
                wprof.enable()
                try:
                    return process(self, items)  # type: ignore[arg-type]
                finally:
                    wprof.disable()

            storemod._ZkContactWatch._process = profiled  # type: ignore[method-assign,assignment]

        def on_changes(changes: list) -> None:  # the standby's watch thread
            for ch in changes:
                if ch.kind == "put":
                    seen.add(ch.record.aor)
            if len(seen) >= args.n:
                done.set()

        watch = ZkStore(clients[1], cluster, "node2").watch_contacts(on_changes)
        now = int(time.time())
        grams = [datagram(i + 1, f"p{i:06d}", now) for i in range(args.n)]
        aprof = cProfile.Profile() if args.profile == "active" else None
        c0, t0 = cpu_s(), time.monotonic()
        if aprof is not None:
            aprof.enable()
        for s in range(0, len(grams), args.burst):
            for g in grams[s : s + args.burst]:
                active.feed(g, "bench")
            active.flush()
        if aprof is not None:
            aprof.disable()
        t_active, c_active = time.monotonic() - t0, cpu_s() - c0
        done.wait(300)
        t_watch, c_all = time.monotonic() - t0, cpu_s() - c0
        print(f"{args.n} events, bursts of {args.burst}: active {t_active:.2f} s ({args.n / t_active:.0f}/s, "
              f"{c_active / args.n * 1e6:.0f} us CPU/event in this process while feeding, the watch included); "
              f"watch had {len(seen)} after {t_watch:.2f} s; CPU {c_all:.2f} s in all ({c_all / args.n * 1e6:.0f} "
              f"us/event)")  # fmt: skip
        for p in (aprof, wprof):
            if p is not None:
                print(top(p))
        watch.stop()
        active.close()
    finally:
        for c in clients:
            c.stop()
            c.close()
        ens.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
