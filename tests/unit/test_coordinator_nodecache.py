"""The node cache (ha/coordinator/nodecache.py) and what it feeds: the watch's first read reuses cached records
whose mzxid is the znode's, and a node start hands the proxy the cached table at once.

Real parts where they matter: the 3-member ZooKeeper ensemble for the read; a real Kamailio (the rendered lab
config) for the node start. The file-level tests need neither.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import conftest_zk
import pytest
from conftest_zk import contact
from kazoo.client import KazooClient
from test_coordinator_preload import kamailio_in, netns, real_proxy, stored_cluster
from test_coordinator_service import keys_in_store, unique_cluster, wait_for

from ha.coordinator import materialize, proxytable
from ha.coordinator.livetable import LiveTable
from ha.coordinator.nodecache import NodeCache, preloaded_from, view_rows
from ha.coordinator.replication import Replication
from ha.coordinator.service import Service
from ha.coordinator.store import Change, ContactRecord, ZkStore, _decode, _encode, _ZkContactWatch, record_from_row
from ha.proxy import kamailio
from ha.unixline import exchange

zk_ensemble = conftest_zk.zk_ensemble
zk_client = conftest_zk.zk_client
__all__ = ["netns"]  # the fixture, imported for the node-start test


def _rec(i: int, ttl: int = 600, **kw: object) -> ContactRecord:
    return ContactRecord(aor=f"a{i}", contact=f"sip:a{i}@198.51.100.7", expires_at=int(time.time()) + ttl,
                         received="udp:198.51.100.7:5060", callid=f"c{i}", cseq=i, mzxid=100 + i, version=i,
                         **kw)  # type: ignore[arg-type]


def test_decode_takes_the_writers_layout_positionally_and_anything_else_by_name() -> None:
    r = _rec(1, node="node2", epoch=3)
    assert _decode(ContactRecord, _encode(r), 5, 77) == r
    got = _decode(ContactRecord, _encode(r), 5, 77)
    assert (got.version, got.mzxid) == (5, 77)
    d = json.loads(_encode(r))
    del d["ts_ms"]  # an older writer's record: one field fewer
    d["future_field"] = 1  # a newer writer's: one more
    old = _decode(ContactRecord, json.dumps(d).encode(), 2, 9)
    assert (old.aor, old.node, old.ts_ms, old.version, old.mzxid) == ("a1", "node2", 0, 2, 9)
    with pytest.raises(TypeError):
        _decode(ContactRecord, b"[1, 2]", 0, 0)


def test_view_round_trips_and_a_foreign_or_broken_file_is_ignored(tmp_path: Path) -> None:
    view = {f"/p/{i}": _rec(i) for i in range(50)}
    store = ["s1"]
    cache = NodeCache(tmp_path / "nc", "c1", lambda: store[0])
    assert cache.load_view() == {}  # nothing saved yet
    cache.save(view, None)
    got = {p: record_from_row(row) for p, row in cache.load_view().items()}
    assert got == view and all(got[p].mzxid == r.mzxid and got[p].version == r.version for p, r in view.items())
    assert NodeCache(tmp_path / "nc", "other", lambda: "s1").load_view() == {}  # another cluster's
    store[0] = "s2"  # the ensemble was rebuilt: its zxids start again, the same mzxid may be another write
    assert cache.load_view() == {}
    with pytest.raises(ValueError, match="identity"):
        NodeCache(tmp_path / "nc", "c1", lambda: None).save(view, None)  # never a cache of an unknown store
    store[0] = "s1"
    cache.view_path.write_bytes(b"\x00garbage")
    assert cache.load_view() == {}
    assert sorted(p.name for p in (tmp_path / "nc").iterdir()) == ["view.marshal"]  # no temp files left


def test_cached_table_goes_to_a_starting_proxy_as_if_written_now(tmp_path: Path) -> None:
    live = LiveTable()
    live.apply([_rec(1), _rec(2), _rec(3, ttl=2)], [], resync=True)
    cache = NodeCache(tmp_path / "nc", "c1", lambda: "s1")
    cache.save({}, live)
    dst = tmp_path / "run" / "usrloc.sqlite"
    time.sleep(2.1)  # a3 expires while the node is away
    w, stored = cache.to_preload(dst, {"cluster": "c1", "node": "node1"})
    assert (w.bindings, w.expired) == (2, 1)
    m = materialize.read_manifest(dst)
    assert m.loaded == {("a1", "sip:a1@198.51.100.7"): 101, ("a2", "sip:a2@198.51.100.7"): 102}
    kept = stored()  # kept with the table: nothing read back
    assert kept is not None and kept.loaded == m.loaded and materialize.read_manifest(dst, known=kept) is kept
    assert preloaded_from(kept, "s1") == kept.loaded
    # Booted from a table of another store (before the ensemble was rebuilt): no mzxid of it may match here.
    assert preloaded_from(kept, "s2") == dict.fromkeys(kept.loaded, -1)
    assert abs(m.written_at - time.time()) < 5 and m.meta["cached_at"] < m.written_at  # the agent's boot check
    with sqlite3.connect(dst) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "sipha_keys" not in tables and "location" in tables
    with pytest.raises(materialize.MaterializeError, match="cluster"):
        NodeCache(tmp_path / "nc", "c2", lambda: "s1").to_preload(tmp_path / "x.sqlite", {})
    cache.save({}, None)  # no live table: the cached one would be older than the view, so it goes
    with pytest.raises(materialize.MaterializeError, match="no cached table"):
        cache.to_preload(dst, {})


def test_a_node_start_prepares_the_cached_table_and_the_proxy_start_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy for the proxy is made at the coordinator's first tick, beside the preload table (a running
    proxy's manifest is that file), and the agent's materialize() renames it into place; an old one is not used."""
    from test_coordinator_service import unique_cluster

    from ha.coordinator import replication

    cl = unique_cluster("prep")
    # No ZooKeeper member answers on this port: the prepared table must not wait for the store.
    repl = Replication.from_model(cl, "node1", journal_path=tmp_path / "state" / "j.jsonl",
                                  rpc_socket=tmp_path / "run" / kamailio.RPC_SOCKET_NAME, hosts="127.0.0.1:1")
    try:
        live = LiveTable()
        live.apply([_rec(1), _rec(2)], [], resync=True)
        live.copy_to(repl.node_cache.table_path, {"cluster": cl.name, "store": "s1"}, with_keys=True)
        assert repl.preload_db is not None
        prepared = repl.preload_db.with_name(f".{repl.preload_db.name}.prepared")
        said = repl.tick() or ""
        assert "prepared from the node cache: 2 bindings" in said and prepared.is_file()
        assert not repl.preload_db.exists()  # nothing over a running proxy's file before a start asks
        assert "prepared" not in (repl.tick() or "")  # once only
        reply = repl.materialize()
        assert reply["from"] == "node cache" and reply["bindings"] == 2 and reply["ms"] == 0
        assert repl.preload_db.is_file() and not prepared.exists()
        m = repl.written_manifest.result(5)
        assert m.loaded == {("a1", "sip:a1@198.51.100.7"): 101, ("a2", "sip:a2@198.51.100.7"): 102}
        assert m.meta["cluster"] == cl.name and m.meta["source"] == "node cache"
        # Prepared too long before the proxy starts: copied again at the ask, and the old copy removed by the tick.
        repl._prepare_tried = False
        repl.preload_db.unlink()
        repl.tick()
        monkeypatch.setattr(replication, "PREPARED_MAX_AGE_S", 0.0)
        repl.tick()
        assert not prepared.exists()
        reply = repl.materialize()
        assert reply["from"] == "node cache" and reply["bindings"] == 2 and repl.preload_db.is_file()
    finally:
        repl.close()


def test_first_read_decodes_only_what_changed_since_the_cached_view(zk_client: KazooClient, cluster: str) -> None:
    peer = ZkStore(zk_client, cluster, "node2")
    peer.ensure_layout()
    peer.bump_epoch()
    peer.write([contact(i, f"s{i}", node="node2") for i in range(1, 21)])
    first = _ZkContactWatch(ZkStore(zk_client, cluster, "node1"), lambda _c: None)
    first._resync()
    first._settle()
    cached = first.records() or {}
    assert len(cached) == 20
    peer.write([contact(30, "s1", node="node2", ttl=900), contact(31, "s2", kind="delete", node="node2"),
                contact(32, "s99", node="node2")])  # while the node was away: a refresh, a delete, a new one
    store = ZkStore(zk_client, cluster, "node1")
    rows = {row[0]: row for row in view_rows(cached)}
    store.view_seed = lambda: rows
    w = _ZkContactWatch(store, lambda _c: None)
    changes = w._resync()
    assert w.seed_reused == 18  # s1 (new mzxid) and s99 (new) decoded; s2 gone
    assert not w.complete and w.records() is None  # until delivered: the 18 kept rows are no records yet
    s3 = store.contact_path("s3", "sip:s3@198.51.100.50:5062")
    by_aor = {c.key[0]: c for c in changes}
    assert (by_aor["s3"].key, by_aor["s3"].mzxid) == (("s3", "sip:s3@198.51.100.50:5062"), cached[s3].mzxid)
    assert by_aor["s3"]._record is None  # its record is built only when asked for
    got = {c.record.aor: c.record for c in changes}
    assert set(got) == {f"s{i}" for i in range(1, 21) if i != 2} | {"s99"}
    assert got["s3"] == cached[s3] and got["s3"].mzxid == cached[s3].mzxid
    assert (got["s1"].seq, cached[store.contact_path("s1", "sip:s1@198.51.100.50:5062")].seq) == (30, 1)
    assert store.view_seed is None  # asked for once
    w._settle()
    view = w.records()
    assert view is not None and view[s3] is got["s3"] and set(view) == {store.contact_path(a, r.contact)
                                                                        for a, r in got.items()}
    # A cache that lies (same path, another mzxid) is not trusted: decoded from the store instead.
    p = store.contact_path("s4", "sip:s4@198.51.100.50:5062")
    lie = ContactRecord(aor="s4", contact="bogus", expires_at=1, mzxid=cached[p].mzxid + 1)
    store.view_seed = lambda: {row[0]: row for row in view_rows({p: lie})}
    w2 = _ZkContactWatch(store, lambda _c: None)
    recs = {c.record.aor: c.record for c in w2._resync()}
    assert recs["s4"] == cached[p] and w2.seed_reused == 0
    with pytest.raises(ValueError, match="record or a node cache row"):
        Change("put")
    assert Change("put", row=view_rows({p: cached[p]})[0]) == Change("put", cached[p])  # built, then compared


@pytest.fixture
def cluster() -> str:
    return unique_cluster("nc").name


@real_proxy
def test_node_start_gives_the_proxy_the_cached_table_and_resyncs_what_changed_while_away(
    netns: str, zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    """A whole node restart: the coordinator saved its cache at its clean stop; while the node is away the store
    changes; at the next start the proxy agent gets the cached table before the coordinator has read anything,
    Kamailio preloads it, and readiness comes only once the proxy holds exactly what ZooKeeper holds."""
    n = 200
    uri = "sip:n{}@198.51.100.77:5060"
    cl, peer, reader, run_dir, cfg = stored_cluster("ncs", zk_client, tmp_path, n, uri)
    ready = tmp_path / "ready"

    def service(hold: threading.Event | None = None) -> tuple[Replication, Service, threading.Thread]:
        repl = Replication.from_model(cl, "node1", journal_path=tmp_path / "state" / "j.jsonl",
                                      rpc_socket=kamailio.rpc_socket(run_dir), hosts=zk_ensemble.hosts)
        load = repl.store.view_seed
        if hold is not None and isinstance(repl.store, ZkStore) and load is not None:

            def held_seed() -> object:
                # The first read waits here until the agent has its table: with 200 bindings the read would
                # otherwise be done, and the live table built, before the agent asks (then a fresher table is
                # given, rightly).
                hold.wait(20)
                return load()

            repl.store.view_seed = held_seed  # type: ignore[assignment]
        svc = Service("127.0.0.1", 0, str(tmp_path / "c.pid"), str(tmp_path / "c.sock"), repl, ready_file=ready,
                      role=None)
        t = threading.Thread(target=svc.run, daemon=True)
        t.start()
        return repl, svc, t

    repl, svc, t = service()
    try:
        wait_for(lambda: repl.replicator is not None and repl.replicator.live is not None
                 and repl.replicator.live.complete, 20, "a complete view and live table")
    finally:
        svc.stop()
        t.join(30)
    cache_dir = tmp_path / "state" / "node-cache"
    assert (cache_dir / "view.marshal").is_file() and (cache_dir / "usrloc.sqlite").is_file()  # saved at the stop
    # Away: one binding refreshed (new mzxid), one un-registered, one new phone.
    peer.write([contact(n + 1, "n1", uri.format(1), node="node2", ttl=900),
                contact(n + 2, "n2", uri.format(2), kind="delete", node="node2"),
                contact(n + 3, "new1", "sip:new1@198.51.100.77:5060", node="node2")])
    ready.unlink(missing_ok=True)
    asked = threading.Event()
    repl, svc, t = service(hold=asked)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = json.loads(exchange(tmp_path / "c.sock", b"materialize\n", 10.0))
            except OSError:
                reply = {"ok": False, "pending": True}  # the socket is not there yet
            if reply["ok"]:
                break
            assert reply["pending"] and time.monotonic() < deadline, reply
            time.sleep(0.05)
        assert reply["from"] == "node cache" and reply["bindings"] == n  # as it was at the stop
        asked.set()
        with kamailio_in(netns, cfg, cl, run_dir, run_dir / materialize.DB_NAME) as sock:
            wait_for(ready.exists, 30, "readiness")
            have = proxytable.dump(sock)
            assert set(have) == keys_in_store(reader)
            assert ("n2", uri.format(2)) not in have and have[("new1", "sip:new1@198.51.100.77:5060")].pushed
            assert have[("n1", uri.format(1))].pushed  # changed while away: pushed over the preloaded row
            assert not have[("n10", uri.format(10))].pushed  # from the cached table, received/socket kept
            assert have[("n10", uri.format(10))].record.received == "udp:198.51.100.50:5062"
            rep = repl.replicator
            assert rep is not None and rep.stats.preloaded == n - 2, rep.stats
            w = rep._watch
            assert isinstance(w, _ZkContactWatch) and w.seed_reused == n - 2  # decoded: n1 and new1 only
    finally:
        svc.stop()
        t.join(30)
    # And the warm start saved its own view at its stop, the bindings it built after readiness included.
    again = NodeCache(cache_dir.parent / "node-cache", cl.name, lambda: repl.store.identity).load_view()
    assert {row[1] for row in again.values()} == {f"n{i}" for i in range(1, n + 1) if i != 2} | {"new1"}


def test_gc_pause_restores_the_collector_as_it_found_it() -> None:
    import gc

    from ha.coordinator.gcpause import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # a pause inside a pause (another step, another thread) leaves it off
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with gc_paused(False):  # a small batch: nothing paused
        assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed step")
    assert gc.isenabled()


def test_first_read_of_an_empty_store_asks_for_the_cached_view_once(zk_client: KazooClient, cluster: str) -> None:
    store = ZkStore(zk_client, cluster, "node1")
    store.ensure_layout()
    asked: list[int] = []
    store.view_seed = lambda: asked.append(1) or {}  # type: ignore[func-returns-value]
    w = _ZkContactWatch(store, lambda _c: None)
    assert w._resync() == [] and asked == [1] and w.seed_reused == 0


def test_a_background_save_packs_the_view_and_the_keys_in_chunks_with_pauses_between(tmp_path: Path) -> None:
    """Built and packed in one go, a save held the GIL long enough to stall the watch's passes (the replication
    bench's slowest markers came together, in a save's second): the view and the table's keys are packed a chunk
    at a time, the caller's pause between chunks, and both read back whole."""
    from ha.coordinator import livetable, nodecache

    view = {f"/p/{i}": _rec(i) for i in range(2 * nodecache.CHUNK_ROWS + 7)}
    live = LiveTable()
    live.apply(view.values(), [], resync=True)
    pauses: list[float] = []
    cache = NodeCache(tmp_path / "nc", "c1", lambda: "s1")
    old = livetable.KEYS_CHUNK
    livetable.KEYS_CHUNK = 400  # 3 chunks of keys for 1007 bindings
    try:
        cache.save(view, live, pause=lambda: pauses.append(time.monotonic()))
    finally:
        livetable.KEYS_CHUNK = old
    assert len(pauses) == 2 + 2  # between 3 chunks of rows, and between 3 chunks of keys
    got = cache.load_view()
    assert {p: record_from_row(r) for p, r in got.items()} == view
    _, manifest = cache.to_preload(tmp_path / "pre.sqlite", {})
    m = manifest()
    assert m is not None and m.loaded == {(r.aor, r.contact): r.mzxid for r in view.values()}


def test_a_due_save_waits_while_the_store_changes_fast_and_not_longer_than_its_bound(tmp_path: Path) -> None:
    """A busy store (over SAVE_BUSY_PER_S changes/s) holds a due save back, said once, at most SAVE_MAX_DEFER_S;
    a calm one saves at once, as before."""
    from ha.coordinator import nodecache

    view = {f"/p/{i}": _rec(i) for i in range(10)}
    cache = NodeCache(tmp_path / "nc", "c1", lambda: "s1")
    t = cache._next_save
    busy = nodecache.SAVE_BUSY_PER_S + 1
    said = cache.maybe_save(lambda: view, None, 1, t, busy)
    assert said == "node cache save deferred: the store changes 201 times/s (up to 60 s)", said
    assert cache.maybe_save(lambda: view, None, 1, t + nodecache.SAVE_MAX_DEFER_S - 1, busy) is None
    assert cache._saving is None and cache.saves == 0  # still waiting, silently
    cache.maybe_save(lambda: view, None, 1, t + nodecache.SAVE_MAX_DEFER_S, busy)  # waited long enough
    assert cache._saving is not None
    cache._saving.join(10)
    assert cache.saves == 1 and set(cache.load_view()) == set(view)

    calm = NodeCache(tmp_path / "nc2", "c1", lambda: "s1")
    calm.maybe_save(lambda: view, None, 1, calm._next_save, nodecache.SAVE_BUSY_PER_S)  # at the bound: not busy
    assert calm._saving is not None
    calm._saving.join(10)
    assert calm.saves == 1
