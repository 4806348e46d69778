"""Resync measurement: N bindings from a real 3-member ensemble into a real Kamailio (not a pass/fail gate).

Heavy (100k bindings written to ZooKeeper first), so it lives here, outside the test suite:
``SIPHA_BENCH_RESYNC=10000,100000 .venv/bin/pytest bench/coordinator_resync.py -s`` (default: 10000). It starts its own
ensemble with a bigger heap (100k znodes do not fit the tests' 128 MB). One run per size, numbers printed:

* write: the active writing N events (batched transactions), for scale;
* multiRead: ``ZkStore.snapshot()``, the whole state in a few multiRead round trips;
* watch resync: what the replicator does today (listing + one getData per binding, each arming a watch);
* ul.add: pushing N bindings into Kamailio over the datagram socket, pipelined (window 8);
* replicator: the real thing, watch resync + ul.add, start to ``synced``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))  # the real-ensemble helpers
from conftest_zk import connect, contact
from test_coordinator_service import fifo_proxy, keys_in_proxy

from ha.coordinator.apply import ProxyApplier
from ha.coordinator.replicator import Replicator
from ha.coordinator.store import ZkStore, _ZkContactWatch
from ha.proxy import kamailio
from ha.zk_testing import Ensemble

SIZES = [int(s) for s in os.environ.get("SIPHA_BENCH_RESYNC", "10000").split(",") if s.strip()]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(kamailio.kamailio_binary() is None, reason="kamailio is not installed"),
]


@pytest.fixture(scope="module")
def big_ensemble() -> Iterator[Ensemble]:
    root = Path(tempfile.mkdtemp(prefix="sipha-zk-bench-"))
    ens = Ensemble(root, tick_ms=500, heap_mb=768)
    try:
        ens.start(timeout=90)
        yield ens
    finally:
        ens.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("n", SIZES or [0])
def test_resync_time(n: int, big_ensemble: Ensemble, tmp_path: Path) -> None:
    client = connect(big_ensemble, timeout_s=10)
    cluster = f"b{uuid.uuid4().hex[:8]}"
    try:
        writer = ZkStore(client, cluster, "node2")
        writer.ensure_layout()
        writer.bump_epoch()
        t0 = time.monotonic()
        for start in range(0, n, 5000):
            writer.write([contact(i, f"u{i}", f"sip:u{i}@198.51.100.80:5060", node="node2")
                          for i in range(start + 1, min(start + 5000, n) + 1)])
        t_write = time.monotonic() - t0
        reader = ZkStore(client, cluster, "node1")
        t0 = time.monotonic()
        snap = reader.snapshot()
        t_multi = time.monotonic() - t0
        assert len(snap.contacts) == n
        got: list[int] = []
        t0 = time.monotonic()
        w = _ZkContactWatch(reader, lambda ch: got.append(len(ch)))
        w.start()
        deadline = time.monotonic() + 300
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        t_watch = time.monotonic() - t0
        w.stop()
        assert got and got[0] == n
        with fifo_proxy(tmp_path) as p, kamailio.Rpc(p.rpc_sock, timeout=5.0) as rpc:
            applier = ProxyApplier(rpc)
            t0 = time.monotonic()
            res = applier.apply(snap.contacts)
            t_add = time.monotonic() - t0
            assert res.added == n and not res.errors, str(res)
            gone = rpc.call_many([("ul.rm", ["location", f"u{i}"]) for i in range(1, n + 1)], 8)
            assert not [g for g in gone if isinstance(g, Exception)]
            rep_rpc = kamailio.Rpc(p.rpc_sock, timeout=5.0)
            rep = Replicator(reader, ProxyApplier(rep_rpc), "node1")
            try:
                t0 = time.monotonic()
                rep.start()
                assert rep.synced.wait(300), rep.last_status
                t_rep = time.monotonic() - t0
            finally:
                rep.stop()
                rep_rpc.close()
            assert rep.resync_count == n
            if n <= 10_000:  # ul.dump of a bigger table does not come back in time (see proxytable)
                assert len(keys_in_proxy(p)) == n
        print(f"\nRESYNC n={n}: write {t_write:.2f} s ({n / t_write:.0f}/s); multiRead snapshot {t_multi:.2f} s; "
              f"watch resync read {t_watch:.2f} s; ul.add {t_add:.2f} s ({n / t_add:.0f}/s); "
              f"replicator start->synced {t_rep:.2f} s")
    finally:
        client.stop()
        client.close()
