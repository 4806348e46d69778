"""The restart fast path (ha/coordinator/materialize.py) on real parts: the 3-member ZooKeeper ensemble, the
materializer's own command line, and a real Kamailio (the rendered lab config) started with the preload define.

What must hold: a proxy that starts from the table comes up holding the snapshot's bindings with what
``ul.add`` cannot carry (received, socket, Call-ID), and once the coordinator's resync is done it holds exactly
what ZooKeeper holds, including what changed between the snapshot and the proxy's start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conftest_zk
import pytest
import test_agents
from conftest_zk import contact
from kazoo.client import KazooClient
from test_coordinator_service import keys_in_store, unique_cluster, wait_for

from ha import model
from ha.coordinator import materialize, proxytable
from ha.coordinator.livetable import LiveTable
from ha.coordinator.replication import Replication
from ha.coordinator.replicator import ProxyNotAnswering
from ha.coordinator.service import Service
from ha.coordinator.store import ContactRecord, ZkStore
from ha.kamailio_testing import running_proxy
from ha.proxy import kamailio
from ha.unixline import exchange
from ha.zk_testing import lab_yaml

ROOT = Path(__file__).resolve().parents[2]

zk_ensemble = conftest_zk.zk_ensemble
zk_client = conftest_zk.zk_client

HAS_DB_SQLITE = bool(list(Path("/usr/lib").glob("*/kamailio/modules/db_sqlite.so")))
_REAL_PROXY = (
    pytest.mark.validators,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(kamailio.kamailio_binary() is None, reason="kamailio is not installed"),
    pytest.mark.skipif(not HAS_DB_SQLITE, reason="kamailio-sqlite-modules is not installed (make apt)"),
)


def real_proxy(fn: Any) -> Any:
    """For a test that starts a real Kamailio with the preload (root, kamailio, db_sqlite)."""
    for mark in _REAL_PROXY:
        fn = mark(fn)
    return fn


# ------------------------------------------------------------------------------------------ the file alone


def test_received_uri_is_what_usrloc_keeps() -> None:
    assert materialize.received_uri("udp:198.51.100.50:5062") == "sip:198.51.100.50:5062"
    assert materialize.received_uri("tcp:198.51.100.50:40000") == "sip:198.51.100.50:40000;transport=tcp"
    assert materialize.received_uri("udp:2001:db8::1:5060") == "sip:[2001:db8::1]:5060"
    assert materialize.received_uri("nonsense") is None
    assert materialize.received_uri("udp:host:port") is None


def test_write_leaves_out_expired_and_reads_back(tmp_path: Path) -> None:
    now = 1_800_000_000
    recs = [
        ContactRecord(aor="a", contact="sip:a@x", expires_at=now + 60, q=500, received="udp:198.51.100.9:5060",
                      socket="udp:198.51.100.10:5060", callid="c-a", cseq=7, mzxid=11),
        ContactRecord(aor="b", contact="sip:b@x", expires_at=now - 1, mzxid=12),  # expired: not loaded
    ]
    db = tmp_path / "u.sqlite"
    w = materialize.write(db, recs, {"cluster": "c1"}, now=now)
    assert (w.bindings, w.expired) == (1, 1)
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT username, received, socket, q, callid, cseq, expires FROM location").fetchone()
        version = con.execute("SELECT table_version FROM version WHERE table_name='location'").fetchone()
    assert row[:6] == ("a", "sip:198.51.100.9:5060", "udp:198.51.100.10:5060", 0.5, "c-a", 7)
    assert round((row[6] - 2440587.5) * 86400) == now + 60  # a Julian day, as db_sqlite reads DATETIME
    assert int(version[0]) == materialize.LOCATION_VERSION
    m = materialize.read_manifest(db)
    assert m.loaded == {("a", "sip:a@x"): 11} and m.meta["cluster"] == "c1" and m.written_at == now
    assert list(tmp_path.iterdir()) == [db]  # the temp file was renamed, nothing left behind
    assert w.manifest is not None and w.manifest.loaded == m.loaded
    assert materialize.read_manifest(db, known=w.manifest) is w.manifest  # the writer need not read it back
    w2 = materialize.write(db, recs[:1], {"cluster": "c1"}, now=now + 1)
    assert materialize.read_manifest(db, known=w.manifest).written_at == now + 1 != w.manifest.written_at
    assert w2.manifest is not None


def test_live_table_follows_changes_and_copies_what_write_would_write(tmp_path: Path) -> None:
    now = time.time()
    recs = [ContactRecord(aor=f"a{i}", contact=f"sip:a{i}@x", expires_at=int(now) + 600, received="udp:1.2.3.4:5",
                          socket="udp:198.51.100.10:5060", callid=f"c{i}", cseq=i, mzxid=100 + i) for i in range(5)]
    live = LiveTable()
    with pytest.raises(materialize.MaterializeError):
        live.copy_to(tmp_path / "x.sqlite", {})  # nothing complete yet
    live.apply(recs, [], resync=True)
    newer = ContactRecord(aor="a1", contact="sip:a1@x", expires_at=int(now) + 900, mzxid=200)
    old = ContactRecord(aor="old", contact="sip:old@x", expires_at=int(now) - 5, mzxid=201)  # expired
    live.apply([newer, old], [recs[2]], resync=False)
    w = live.copy_to(tmp_path / "live.sqlite", {"cluster": "c1"})
    want = [newer, recs[0], recs[3], recs[4]]
    ref = materialize.write(tmp_path / "ref.sqlite", want, {"cluster": "c1"}, now=now)
    assert w.manifest is not None and w.manifest.loaded == ref.manifest.loaded == materialize.read_manifest(
        tmp_path / "live.sqlite").loaded
    assert (w.bindings, w.expired) == (4, 1)
    cols = "username, contact, received, path, expires, q, callid, cseq, flags, cflags, user_agent, socket, methods"

    def rows(p: Path) -> list[tuple[object, ...]]:
        with sqlite3.connect(p) as con:
            return sorted(con.execute(f"SELECT {cols} FROM location"))

    assert rows(tmp_path / "live.sqlite") == rows(tmp_path / "ref.sqlite")
    live.apply([], [], resync=True)  # an empty store's resync empties it
    assert live.copy_to(tmp_path / "e.sqlite", {}).bindings == 0


def test_manifest_only_for_the_proxy_that_booted_from_it(tmp_path: Path) -> None:
    db = tmp_path / "u.sqlite"
    assert materialize.manifest_for_boot(db, 100, "c1") is None  # no file
    materialize.write(db, [], {"cluster": "c1"}, now=1000.0)
    assert materialize.manifest_for_boot(db, 1001, "c1") is not None
    assert materialize.manifest_for_boot(db, 1000 + materialize.BOOT_WINDOW_S + 1, "c1") is None  # later start
    assert materialize.manifest_for_boot(db, 990, "c1") is None  # booted before the file was written
    assert materialize.manifest_for_boot(db, 1001, "other") is None
    assert materialize.manifest_for_boot(db, None, "c1") is None
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(materialize.MaterializeError):
        materialize.read_manifest(tmp_path / "junk.sqlite")


# --------------------------------------------------------------------------------------------- real parts


def stored_cluster(prefix: str, zk_client: KazooClient, tmp_path: Path, n: int, uri: str,
                   ) -> tuple[model.Cluster, ZkStore, ZkStore, Path, Path]:
    """A new cluster whose store holds n bindings written by node2 (``uri`` with ``{}`` for the index, its user
    part the AoR): the cluster, node2's store, node1's reader, node1's proxy run dir and its kamailio.cfg."""
    from ha import render

    cluster = unique_cluster(prefix)
    peer = ZkStore(zk_client, cluster.name, "node2")
    peer.ensure_layout()
    peer.bump_epoch()
    user = [uri.format(i).split(":")[1].split("@")[0] for i in range(1, n + 1)]  # the AoR: the URI's user part
    peer.write([contact(i, user[i - 1], uri.format(i), node="node2") for i in range(1, n + 1)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(render._env().get_template("kamailio.cfg.j2").render(cluster=cluster, host=cluster.nodes[0],
                                                                        is_node=True))
    return cluster, peer, ZkStore(zk_client, cluster.name, "node1"), run_dir, cfg


def _cluster_yaml(tmp: Path, name: str) -> Path:
    return lab_yaml(tmp, name)  # with a ZooKeeper credential, as in the lab


def test_materialize_command_line_reads_the_ensemble(zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient,
                                                     tmp_path: Path) -> None:
    cluster = unique_cluster("mat")
    w = ZkStore(zk_client, cluster.name, "node2")
    w.ensure_layout()
    w.bump_epoch()
    w.write([contact(i, f"m{i}", node="node2") for i in range(1, 51)])
    out = tmp_path / "run" / "usrloc.sqlite"
    argv = [sys.executable, "-m", "ha.coordinator.materialize", "--config", str(_cluster_yaml(tmp_path, cluster.name)),
            "--zk-hosts", zk_ensemble.hosts, "--out", str(out)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["bindings"] == 50
    assert len(materialize.read_manifest(out).loaded) == 50
    # ZooKeeper out of reach: an empty table (the proxy still starts), exit 1, one line saying why.
    p = subprocess.run([*argv[:-4], "--zk-hosts", "127.0.0.1:1", "--timeout", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1 and "zookeeper not read" in p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["bindings"] == 0 and materialize.read_manifest(out).loaded == {}


@real_proxy
def test_restarted_proxy_comes_up_with_the_store_and_the_window_is_replayed(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    cluster = unique_cluster("pre")
    peer = ZkStore(zk_client, cluster.name, "node2")
    peer.ensure_layout()
    peer.bump_epoch()
    n = 200
    uri = "sip:p{}@198.51.100.74:5060"
    peer.write([contact(i, f"p{i}", uri.format(i), node="node2") for i in range(1, n + 1)])
    peer.write([contact(n + 1, "mine", "sip:mine@198.51.100.75:5060", node="node1")])  # this node's own
    reader = ZkStore(zk_client, cluster.name, "node1")
    db = tmp_path / "usrloc.sqlite"
    w = materialize.from_store(reader, db, cluster.name, "node1")
    assert w.bindings == n + 1
    assert len(materialize.read_manifest(db).loaded) == n + 1

    # The window: changes after the snapshot, before the proxy starts.
    peer.write([contact(n + 2, "p1", uri.format(1), kind="delete", node="node2"),
                contact(n + 3, "p2", uri.format(2), kind="delete", node="node2"),
                contact(n + 4, "p3", uri.format(3), ttl=900, node="node2"),  # refreshed: a new mzxid
                contact(n + 5, "new1", "sip:new1@198.51.100.74:5060", node="node2"),
                contact(n + 6, "new2", "sip:new2@198.51.100.74:5060", node="node2")])

    ready = tmp_path / "ready"
    run_dir = tmp_path / "late"
    run_dir.mkdir()
    repl = Replication.from_model(cluster, "node1", journal_path=tmp_path / "j.jsonl",
                                  rpc_socket=kamailio.rpc_socket(run_dir / "run"), hosts=zk_ensemble.hosts)

    def preload() -> dict[tuple[str, str], int] | None:  # as from_model's, for a table outside the run dir
        try:
            up = kamailio.rpc("core.uptime", sock=kamailio.rpc_socket(run_dir / "run"), timeout=0.5)
        except (kamailio.RpcError, OSError) as exc:
            raise ProxyNotAnswering(str(exc)) from None
        m = materialize.manifest_for_boot(db, int(time.time() - up["uptime"]), cluster.name)
        return None if m is None else m.loaded

    assert repl.replicator is not None
    repl.replicator.preload_source = preload
    svc = Service("127.0.0.1", 0, str(tmp_path / "c.pid"), str(tmp_path / "c.sock"), repl, ready_file=ready,
                  role=None)
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: repl.replicator is not None and repl.replicator.resync_failed, 15, "no proxy yet")
        defines = {"SIPHA_RPC_REPLY_DIR": f"{run_dir / 'run'}/", "SIPHA_USRLOC_PRELOAD": f"sqlite:///{db}"}
        with running_proxy(run_dir, "lab", defines=defines) as p:  # where the coordinator expects it
            t0 = time.monotonic()
            wait_for(ready.exists, 30, "readiness once the proxy's table is in step")
            took = time.monotonic() - t0
            assert not repl.replicator.resync_failed if repl.replicator else False
            want = keys_in_store(reader)
            have = proxytable.dump(p.rpc_sock)
            assert set(have) == want  # exactly the store: deleted gone, new ones there, own included
            assert ("p1", uri.format(1)) not in have and ("new2", "sip:new2@198.51.100.74:5060") in have
            assert ("mine", "sip:mine@198.51.100.75:5060") in have
            kept = have[("p9", uri.format(9))]  # preloaded, never pushed: what ul.add cannot carry is there
            assert not kept.pushed
            assert (kept.record.received, kept.record.socket, kept.record.callid) == (
                "udp:198.51.100.50:5062", "udp:198.51.100.10:5060", "reg-p9")
            assert have[("new1", "sip:new1@198.51.100.74:5060")].pushed  # came in over RPC
            assert 890 <= have[("p3", uri.format(3))].record.expires_at - time.time() <= 900  # the refresh won
            st = repl.replicator.stats if repl.replicator else None
            assert st is not None and st.preloaded == n + 1 - 3 and st.removed == 2 and st.added == 3, st
            print(f"\npreloaded proxy in step {took * 1000:.0f} ms after it answered: {repl.replicator.last_status}")
    finally:
        svc.stop()
        t.join(20)


@contextlib.contextmanager
def kamailio_in(ns: str, cfg: Path, cluster: model.Cluster, run_dir: Path, preload: Path) -> Iterator[Path]:
    """Kamailio on the rendered config with the preload define, in ``ns``, run dir given (it may already hold
    the table); yields its RPC socket once it answers (with wait_worker1_mode: once the table is loaded)."""
    defines = {"SIPHA_RPC_REPLY_DIR": f"{run_dir}/", "SIPHA_USRLOC_PRELOAD": f"sqlite:///{preload}"}
    cmd = [*kamailio.kamailio_command(cfg, cluster, run_dir=run_dir, foreground=True, defines=defines), "-x", "tlsf"]
    sock = kamailio.rpc_socket(run_dir)
    with (run_dir / "kamailio.log").open("ab") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and _answers(sock), 20, "kamailio answering")
        yield sock
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        wait_for(lambda: not _group_alive(proc.pid), 10, "kamailio's workers gone")


def _answers(sock: Path) -> bool:
    try:
        kamailio.rpc("core.uptime", sock=sock, timeout=0.2)
    except (kamailio.RpcError, OSError):
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@real_proxy
def test_coordinator_writes_the_table_and_a_proxy_restart_is_resynced_from_its_view(
    netns: str, zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    """What a node restart does: the coordinator runs first; the proxy agent's start asks it for the table
    (``materialize`` on its status socket: written from its watched view, no store read) and withdraws
    readiness; Kamailio preloads the table; the coordinator pushes only what changed since, then gives
    readiness. Twice: the second start is a restart of a proxy that was ready."""
    n = 300
    uri = "sip:q{}@198.51.100.76:5060"
    cluster, peer, reader, run_dir, cfg = stored_cluster("prc", zk_client, tmp_path, n, uri)
    ready = tmp_path / "ready"
    repl = Replication.from_model(cluster, "node1", journal_path=tmp_path / "j.jsonl",
                                  rpc_socket=kamailio.rpc_socket(run_dir), hosts=zk_ensemble.hosts)
    db = run_dir / materialize.DB_NAME
    assert repl.preload_db == db
    status = tmp_path / "c.sock"
    svc = Service("127.0.0.1", 0, str(tmp_path / "c.pid"), str(status), repl, ready_file=ready, role=None)
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: repl.replicator is not None and repl.replicator.view() is not None, 15, "a complete view")
        for round_ in (1, 2):
            ready.unlink(missing_ok=True)  # what the agent's start does first
            deadline = time.monotonic() + 15
            while not (reply := json.loads(exchange(status, b"materialize\n", 10.0)))["ok"]:
                assert reply["pending"] and time.monotonic() < deadline, reply  # as the agent: ask again
                time.sleep(0.2)
            assert reply["bindings"] == len(keys_in_store(reader)) and Path(reply["path"]) == db
            assert reply["from"] == "live"  # copied from the table kept current, not written row by row
            # The window, after the table was written and before the proxy is up:
            peer.write([contact(1000 * round_ + 1, f"q{round_}", uri.format(round_), kind="delete", node="node2"),
                        contact(1000 * round_ + 2, f"w{round_}", f"sip:w{round_}@198.51.100.76:5060", node="node2")])
            before = repl.replicator.stats.preloaded if repl.replicator else 0
            with kamailio_in(netns, cfg, cluster, run_dir, db) as sock:
                t0 = time.monotonic()
                wait_for(ready.exists, 20, f"readiness (round {round_})")
                took = time.monotonic() - t0
                have = proxytable.dump(sock)
                assert set(have) == keys_in_store(reader), f"round {round_}"
                assert (f"q{round_}", uri.format(round_)) not in have
                assert have[(f"w{round_}", f"sip:w{round_}@198.51.100.76:5060")].pushed
                assert not have[("q10", uri.format(10))].pushed  # preloaded, with its received/socket/Call-ID
                assert have[("q10", uri.format(10))].record.received == "udp:198.51.100.50:5062"
                st = repl.replicator.stats if repl.replicator else None
                assert st is not None and st.preloaded - before == reply["bindings"] - 1, st
                boot = int(time.time() - kamailio.rpc("core.uptime", sock=sock)["uptime"])
                assert abs(json.loads(ready.read_text())["proxy_boot"] - boot) <= 2  # names the proxy it vouches for
                print(f"\nround {round_}: {reply['bindings']} bindings written by the coordinator in {reply['ms']} ms;"
                      f" ready {took * 1000:.0f} ms after the proxy answered ({repl.replicator.last_status})")
    finally:
        svc.stop()
        t.join(20)


# ------------------------------------------------------------------------------------ the proxy agent's start

netns = test_agents.netns


@real_proxy
def test_agent_start_preloads_or_falls_back(netns: str, tmp_path: Path) -> None:
    """ZooKeeper out of reach from the node: the agent still starts the proxy, with an empty preload table
    (Kamailio needs one once the define is given) within its budget; preload=false: no table, no define."""
    from ha import model, render

    cluster = model.load(ROOT / "examples" / "lab.yaml")
    files = {o.path: o.text for o in render.render_files(cluster)}
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(files["node1/kamailio.cfg"])
    run_dir = tmp_path / "run"
    params = {"config": str(cfg), "pidfile": str(run_dir / "kamailio.pid"), "logfile": str(tmp_path / "k.log"),
              "probe_targets": "udp:5060", "cluster_config": str(_cluster_yaml(tmp_path, "agentpre")),
              "preload_timeout": "2", "python": sys.executable}
    try:
        t0 = time.monotonic()
        rc, out = test_agents.run(test_agents.PROXY, "start", ns=netns, **params)
        took = time.monotonic() - t0
        assert rc == 0, out
        assert "preload table empty" in out and "SIPHA_USRLOC_PRELOAD" in out and "-x tlsf" in out, out
        assert took < 10, f"start took {took:.1f} s with ZooKeeper away"
        assert materialize.read_manifest(run_dir / materialize.DB_NAME).loaded == {}
        up = kamailio.rpc("stats.get_statistics", "usrloc:", sock=run_dir / "kamailio-rpc.sock")
        assert "usrloc:location_contacts = 0" in up, up
        assert test_agents.run(test_agents.PROXY, "stop", ns=netns, **params)[0] == 0
        rc, out = test_agents.run(test_agents.PROXY, "start", ns=netns, **{**params, "preload": "false"})
        assert rc == 0, out
        assert "SIPHA_USRLOC_PRELOAD" not in out and not (run_dir / materialize.DB_NAME).exists()
        rc, out = test_agents.run(test_agents.PROXY, "validate-all", **{**params, "preload": "maybe"})
        assert rc == 6 and "preload" in out, out
        assert test_agents.run(test_agents.PROXY, "stop", ns=netns, **params)[0] == 0

        # A coordinator runs here: it writes the table (from its view) and the agent waits for nothing else;
        # one that has no complete view yet (ZooKeeper not there) makes the agent start at once, without.
        # One still reading the store (a node start) is asked again until it has the table.
        for answers in (["ok"], ["no view"], ["pending", "pending", "ok"]):
            (run_dir / "ready").write_text("{}")
            with fake_coordinator(run_dir / "coordinator.sock", run_dir / materialize.DB_NAME, answers) as asked:
                t0 = time.monotonic()
                rc, out = test_agents.run(test_agents.PROXY, "start", ns=netns, **params)
                took = time.monotonic() - t0
            assert rc == 0, out
            assert asked == [b"materialize"] * len(answers) and not (run_dir / "ready").exists()  # withdrawn
            if answers[-1] == "ok":
                assert "by the coordinator" in out and "SIPHA_USRLOC_PRELOAD" in out, out
            else:
                assert "the coordinator has no table" in out and "SIPHA_USRLOC_PRELOAD" not in out, out
                assert took < 3, f"start took {took:.1f} s"
            assert test_agents.run(test_agents.PROXY, "stop", ns=netns, **params)[0] == 0
    finally:
        test_agents.run(test_agents.PROXY, "stop", ns=netns, **params)


@contextlib.contextmanager
def fake_coordinator(path: Path, db: Path, answers: list[str]) -> Iterator[list[bytes]]:
    """The coordinator's side of ``materialize``, one answer per request: writes an empty table and says so
    ("ok"), has none and none coming ("no view"), or is still reading the store ("pending")."""
    import socket

    asked: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        for answer in answers:
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                with conn:
                    asked.append(conn.recv(256).strip())
                    if answer == "ok":
                        materialize.write(db, [], {"cluster": "agentpre"})
                        reply = {"ok": True, "bindings": 0, "path": str(db), "ms": 1}
                    else:
                        reply = {"ok": False, "error": "no complete view of the store yet",
                                 "pending": answer == "pending"}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield asked
    finally:
        srv.close()
        t.join(5)
        path.unlink(missing_ok=True)
