"""The coordinator service on real parts: the 3-member ZooKeeper ensemble, a real Kamailio (the rendered lab
config, FIFO transport enabled, in a throwaway ``sipha-t-<rand>`` namespace) and real REGISTERs.

The service runs in-process (its loop in a thread) with its intake socket created inside the proxy's namespace,
so it receives the proxy's real events, and its role check runs ``ip -n <ns>``: the namespace holds the VIP, so
this node is the active one, as on a cluster node that holds the VIP.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import conftest_zk
import pytest
import test_proxy_live as tpl
from click.testing import CliRunner
from conftest_zk import contact, dialog
from kazoo.client import KazooClient
from test_health_api import addresses_in

from ha import model
from ha.coordinator import proxytable
from ha.coordinator.cli import calls, registrations
from ha.coordinator.proxytable import FifoRpc, parse_dump
from ha.coordinator.reconcile import diff
from ha.coordinator.replication import Replication
from ha.coordinator.service import DEFAULT_READY_FILE, Service, vip_check
from ha.coordinator.store import ContactRecord, ZkStore
from ha.kamailio_testing import Proxy, ns_socket, running_proxy
from ha.proxy import kamailio
from ha.zk_testing import lab_yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.validators,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(kamailio.kamailio_binary() is None, reason="kamailio is not installed"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]

zk_ensemble = conftest_zk.zk_ensemble
zk_client = conftest_zk.zk_client


def fifo_proxy(tmp: Path) -> contextlib.AbstractContextManager[Proxy]:
    """The lab's proxy with its FIFO's replies in the test's own run dir."""
    return running_proxy(tmp, "lab", defines={"SIPHA_RPC_REPLY_DIR": f"{tmp / 'run'}/"})


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with fifo_proxy(tmp_path_factory.mktemp("kamailio-fifo")) as p:
        yield p


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.05)


def clear_table(p: Proxy) -> None:
    aors = {aor for aor, _ in proxytable.dump(p.rpc_sock)}
    with kamailio.Rpc(p.rpc_sock, timeout=5.0) as r:
        r.call_many([("ul.rm", ["location", a]) for a in sorted(aors)], 8)
    assert proxytable.dump(p.rpc_sock) == {}


def fill_table(p: Proxy, n: int, prefix: str) -> None:
    with kamailio.Rpc(p.rpc_sock, timeout=5.0) as r:
        calls_ = [("ul.add", ["location", f"{prefix}{i}", f"sip:{prefix}{i}@198.51.100.71:5060", 600, -1, "0", 0,
                              0, -1]) for i in range(n)]
        errors = [o for o in r.call_many(calls_, 8) if isinstance(o, Exception)]
    assert errors == []


@functools.cache
def _lab_yaml() -> Path:
    return lab_yaml(Path(tempfile.mkdtemp(prefix="sipha-lab-yaml-")))


def unique_cluster(name: str) -> model.Cluster:
    """examples/lab.yaml renamed, its ZooKeeper credential the test clients' own (zk_testing.lab_yaml)."""
    c = model.load(_lab_yaml())
    return c.model_copy(update={"name": f"{name}{uuid.uuid4().hex[:8]}"})


# ------------------------------------------------------------------------------------------- the dump transport


def test_fifo_dump_carries_10k_bindings_where_the_datagram_socket_fails(proxy: Proxy) -> None:
    clear_table(proxy)
    fill_table(proxy, 10_000, "big")
    try:
        with kamailio.Rpc(proxy.rpc_sock, timeout=3.0) as r, pytest.raises(kamailio.RpcError):
            r.call("ul.dump")  # ~6 MB of JSON cannot be one datagram (jsonrpcs caps replies at ~128 KiB)
        t0 = time.monotonic()
        raw = FifoRpc(proxytable.fifo_for(proxy.rpc_sock)).call("ul.dump")
        took = time.monotonic() - t0
        table = parse_dump(raw)
        assert len(table) == 10_000
        b = table[("big42", "sip:big42@198.51.100.71:5060")]
        assert b.pushed and 590 <= b.record.expires_at - time.time() <= 601 and b.record.q == -1
        t0 = time.monotonic()
        paged = proxytable.dump(proxy.rpc_sock)  # what reconciliation uses: AoRs over the FIFO, then ul.lookup
        took_paged = time.monotonic() - t0
        assert set(paged) == set(table) and paged[("big42", "sip:big42@198.51.100.71:5060")].pushed
        print(f"10,000 bindings: full ul.dump over the FIFO {took * 1000:.0f} ms, "
              f"brief + pipelined ul.lookup {took_paged * 1000:.0f} ms")
    finally:
        clear_table(proxy)


def test_fifo_errors_are_rpc_errors(proxy: Proxy, tmp_path: Path) -> None:
    f = FifoRpc(proxytable.fifo_for(proxy.rpc_sock), timeout=3.0)
    with pytest.raises(kamailio.RpcError, match=r"nosuch\.method"):
        f.call("nosuch.method")
    with pytest.raises(kamailio.RpcError, match="cannot reach"):
        FifoRpc(tmp_path / "no.fifo", reply_dir=tmp_path).call("core.uptime")
    assert list(proxy.run_dir.glob("sipha_reply_*")) == []  # reply FIFOs are removed


def test_parse_dump_of_a_real_register(proxy: Proxy) -> None:
    clear_table(proxy)
    ph = tpl.Phone(proxy, 5082)
    try:
        assert ph.ask(tpl._register(proxy, ph, "dora", "cid-dora", 7, 300, "dora/2")) == "SIP/2.0 200 OK"
        (b,) = parse_dump_for(proxy).values()
        r = b.record
        assert not b.pushed
        assert (r.aor, r.contact, r.callid, r.cseq, r.user_agent) == (
            "dora", f"sip:dora@{proxy.node_ip}:5082", "cid-dora", 7, "dora/2")
        assert r.socket == f"udp:{proxy.vip}:5060" and r.methods == -1
    finally:
        ph.close()
        clear_table(proxy)


def parse_dump_for(p: Proxy) -> dict[tuple[str, str], proxytable.ProxyBinding]:
    return proxytable.dump(p.rpc_sock)


def test_diff_keeps_what_ul_add_cannot_carry_and_spares_a_peers_fresh_record() -> None:
    now = int(time.time())
    zk = ContactRecord(aor="a", contact="sip:a@x", expires_at=now + 100, received="udp:198.51.100.9:5060",
                       callid="real", node="node2", ts_ms=(now - 60) * 1000)
    pushed = proxytable.ProxyBinding(ContactRecord(aor="a", contact="sip:a@x", expires_at=now + 400,
                                                   callid="x@kamailio.rpc"), pushed=True)
    events, n = diff({("a", "sip:a@x"): pushed}, {("a", "sip:a@x"): zk}, "node1", now * 1000)
    assert n["updated"] == 1
    (ev,) = events
    assert (ev.expires_at, ev.received, ev.callid) == (now + 400, "udp:198.51.100.9:5060", "real")
    fresh = ContactRecord(aor="b", contact="sip:b@x", expires_at=now + 100, node="node2", ts_ms=now * 1000)
    mine = ContactRecord(aor="c", contact="sip:c@x", expires_at=now + 100, node="node1", ts_ms=now * 1000)
    events, n = diff({}, {("b", "sip:b@x"): fresh, ("c", "sip:c@x"): mine}, "node1", now * 1000)
    assert n == {"added": 0, "updated": 0, "removed": 1, "skipped_recent": 1}
    assert [e.aor for e in events] == ["c"] and events[0].type == "contact.delete"
    # A binding an event changed while the dump was being read is the event's business, in both directions.
    events, n = diff({("a", "sip:a@x"): pushed}, {("c", "sip:c@x"): mine}, "node1", now * 1000,
                     exclude={("a", "sip:a@x"), ("c", "sip:c@x")})
    assert events == [] and n["skipped_recent"] == 2


# ------------------------------------------------------------------------------------------------- the service


class Running:
    def __init__(self, svc: Service, thread: threading.Thread, dropping: threading.Event) -> None:
        self.svc, self.thread, self.dropping = svc, thread, dropping

    @property
    def repl(self) -> Replication:
        return self.svc.repl


@contextlib.contextmanager
def running_service(p: Proxy, cluster: model.Cluster, tmp: Path, hosts: str, ready: Path,
                    standby: bool = False, boot: Callable[[], int | None] | None = None) -> Iterator[Running]:
    repl = Replication.from_model(cluster, "node1", journal_path=tmp / "journal.jsonl", rpc_socket=p.rpc_sock,
                                  hosts=hosts)
    repl.reconcile_delay_s = 0.5
    if boot is not None:
        repl.proxy_boot_fn = boot
    dropping = threading.Event()
    real_feed = repl.feed

    def feed(data: bytes, peer: object = None) -> str | None:  # the intake never sees what is "lost in transit"
        return None if dropping.is_set() else real_feed(data, peer)

    repl.feed = feed  # type: ignore[method-assign]
    udp = ns_socket(p.ns)
    udp.bind(("127.0.0.1", cluster.proxy.event_port))
    svc = Service("127.0.0.1", cluster.proxy.event_port, str(tmp / "c.pid"), str(tmp / "c.sock"), repl,
                  ready_file=ready, intake=udp,
                  role=None if standby else vip_check([v.ip for v in cluster.vips], addresses_in(p.ns)))
    t = threading.Thread(target=svc.run, name="coordinator-under-test", daemon=True)
    t.start()
    try:
        yield Running(svc, t, dropping)
    finally:
        svc.stop()
        t.join(20)
        assert not t.is_alive(), "the service loop did not stop"


def keys_in_store(store: ZkStore) -> set[tuple[str, str]]:
    return {(r.aor, r.contact) for r in store.snapshot().contacts}


def keys_in_proxy(p: Proxy) -> set[tuple[str, str]]:
    return set(proxytable.dump(p.rpc_sock))


def register(p: Proxy, ph: tpl.Phone, users: list[str], expires: int = 300) -> None:
    for u in users:
        got = ph.ask(tpl._register(p, ph, u, f"cid-{u}", 1 if expires else 2, expires, "svc-test/1"))
        assert got == "SIP/2.0 200 OK", (u, got)


def test_service_resyncs_before_readiness_writes_live_events_and_reconciles_lost_ones(
    proxy: Proxy, zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    clear_table(proxy)
    cluster = unique_cluster("svc")
    peer = ZkStore(zk_client, cluster.name, "node2")  # the previous active wrote these
    peer.ensure_layout()
    peer.bump_epoch()
    n = 2000
    peer.write([contact(i, f"pre{i}", f"sip:pre{i}@198.51.100.70:5060", node="node2") for i in range(1, n + 1)])
    reader = ZkStore(zk_client, cluster.name, "reader")
    ready = tmp_path / "ready"
    ready.write_text(json.dumps({"proxy_boot": 1}))  # given to a proxy long gone: must not count
    ph = tpl.Phone(proxy, 5084)
    try:
        with running_service(proxy, cluster, tmp_path, zk_ensemble.hosts, ready) as run:
            wait_for(lambda: not ready.exists(), 5, "stale readiness withdrawn")
            wait_for(ready.exists, 30, "readiness given")
            # The gate: at the moment readiness appears, the proxy already holds every replicated binding.
            have = keys_in_proxy(proxy)
            assert {(f"pre{i}", f"sip:pre{i}@198.51.100.70:5060") for i in range(1, n + 1)} <= have
            body = json.loads(ready.read_text())
            assert body["bindings"] == n and body["node"] == "node1" and body["proxy_boot"]
            print(f"resync of {n} bindings before readiness: {body['resync_ms']} ms")

            wait_for(lambda: run.repl.active, 10, "promotion (the VIP is in the namespace)")
            assert run.repl.store.epoch == 2
            wait_for(lambda: run.repl.reconcile_runs >= 1, 10, "reconciliation after the promotion")

            # Live: real REGISTERs -> the proxy's events -> the service -> ZooKeeper.
            register(proxy, ph, [f"live{i}" for i in range(5)])
            wait_for(lambda: {("live4", f"sip:live4@{proxy.node_ip}:5084")} <= keys_in_store(reader), 10,
                     "live registrations in zookeeper")
            assert run.repl.reconcile_runs == 1

            # Lost events: 20 REGISTERs and 2 un-REGISTERs the intake never sees, then one it does: a gap.
            run.dropping.set()
            register(proxy, ph, [f"lost{i}" for i in range(20)])
            register(proxy, ph, ["live0", "live1"], expires=0)
            time.sleep(0.5)  # let the dropped datagrams drain
            run.dropping.clear()
            assert keys_in_store(reader) != keys_in_proxy(proxy)
            register(proxy, ph, ["after"])
            wait_for(lambda: run.repl.intake.tracker.gaps >= 1, 5, "the gap seen")
            wait_for(lambda: keys_in_store(reader) == keys_in_proxy(proxy), 15, "zookeeper == proxy after the gap")
            assert run.repl.reconcile_runs == 2
            assert ("lost19", f"sip:lost19@{proxy.node_ip}:5084") in keys_in_store(reader)
            assert ("live0", f"sip:live0@{proxy.node_ip}:5084") not in keys_in_store(reader)
            st = run.repl.status()
            assert st["gaps"] == 1 and st["active"] and st["ready"], st

        # A coordinator restart on the active node: nothing listens while phones register (events lost) ...
        assert ready.exists(), "an active coordinator's stop must not withdraw readiness (no failover for it)"
        register(proxy, ph, [f"down{i}" for i in range(10)])
        # ... the new one keeps readiness (same proxy), takes over and reconciles what was missed.
        gone: list[float] = []
        with running_service(proxy, cluster, tmp_path, zk_ensemble.hosts, ready) as run:

            def in_step() -> bool:
                if not ready.exists():
                    gone.append(time.monotonic())
                return run.repl.reconcile_runs >= 1 and keys_in_store(reader) == keys_in_proxy(proxy)

            wait_for(in_step, 20, "zookeeper == proxy after the restart")
            assert gone == []
            assert run.repl.store.epoch == 3
            assert ("down9", f"sip:down9@{proxy.node_ip}:5084") in keys_in_store(reader)
    finally:
        ph.close()
        clear_table(proxy)


def test_the_active_gathers_a_few_events_for_the_write_linger_into_one_transaction(
    proxy: Proxy, zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    """Real REGISTERs through the proxy, its events into the service, one ZooKeeper transaction for all of them:
    written write_linger_ms after the first (not one transaction each, as they came), so they share one mzxid."""
    clear_table(proxy)
    c = unique_cluster("linger")
    cluster = c.model_copy(update={"zookeeper": c.zookeeper.model_copy(update={"write_linger_ms": 1000})})
    reader = ZkStore(zk_client, cluster.name, "reader")
    ready = tmp_path / "ready"
    ph = tpl.Phone(proxy, 5086)
    users = [f"lg{i}" for i in range(5)]
    try:
        with running_service(proxy, cluster, tmp_path, zk_ensemble.hosts, ready) as run:
            wait_for(lambda: run.repl.active and run.repl.reconcile_runs >= 1, 20, "promotion and its reconcile")
            t0 = time.monotonic()
            register(proxy, ph, users)  # a few ms: well inside one linger
            sent_s = time.monotonic() - t0
            want = {(u, f"sip:{u}@{proxy.node_ip}:5086") for u in users}
            wait_for(lambda: want <= keys_in_store(reader), 10, "the registrations in zookeeper")
            seen_s = time.monotonic() - t0
            zxids = {zk_client.exists(reader.contact_path(a, u)).mzxid for a, u in want}
            assert sent_s < 0.5, f"the REGISTERs took {sent_s:.2f} s: not one linger's worth, nothing to judge"
            assert seen_s >= 0.9, f"written {seen_s:.2f} s after the first REGISTER: the linger did not hold them"
            assert len(zxids) == 1, f"{len(zxids)} transactions for {len(want)} bindings gathered in one linger"
    finally:
        ph.close()
        clear_table(proxy)


def test_standby_withdraws_readiness_and_retries_a_resync_the_proxy_could_not_take(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    """No proxy answers yet (it is still starting): the resync fails, readiness stays absent, and it is
    retried until the proxy is there; then readiness is given with everything (own bindings included)."""
    cluster = unique_cluster("sby")
    peer = ZkStore(zk_client, cluster.name, "node2")
    peer.ensure_layout()
    peer.bump_epoch()
    peer.write([contact(i, f"s{i}", f"sip:s{i}@198.51.100.72:5060", node="node2") for i in range(1, 301)])
    peer.write([contact(1, "mine", "sip:mine@198.51.100.73:5060", node="node1")])
    ready = tmp_path / "ready"
    ready.write_text("{}")
    run_dir = tmp_path / "late"
    run_dir.mkdir()
    repl = Replication.from_model(cluster, "node1", journal_path=tmp_path / "j.jsonl",
                                  rpc_socket=kamailio.rpc_socket(run_dir / "run"), hosts=zk_ensemble.hosts)
    svc = Service("127.0.0.1", 0, str(tmp_path / "c.pid"), str(tmp_path / "c.sock"), repl, ready_file=ready,
                  role=None)
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: not ready.exists(), 5, "readiness withdrawn on a standby start")
        wait_for(lambda: repl.replicator is not None and repl.replicator.resync_failed, 15, "a failed resync")
        time.sleep(1.5)
        assert not ready.exists() and not svc.ready_given
        with fifo_proxy(run_dir) as p:  # the proxy comes up where the coordinator expects it
            wait_for(ready.exists, 30, "readiness once the proxy answers")
            have = keys_in_proxy(p)
            assert ("s300", "sip:s300@198.51.100.72:5060") in have
            assert ("mine", "sip:mine@198.51.100.73:5060") in have  # its table was new: own bindings too
            assert len(have) == 301 and not repl.active
    finally:
        svc.stop()
        t.join(20)
    assert not ready.exists(), "a standby's coordinator stopping withdraws readiness"


def test_ready_file_default_matches_the_health_service() -> None:
    from ha.health.service import DEFAULT_READY_FILE as HEALTH_READY

    assert Path(DEFAULT_READY_FILE) == HEALTH_READY


# ------------------------------------------------------------------------------------------------- the CLI


def test_cli_lists_registrations_and_calls(zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient,
                                           tmp_path: Path) -> None:
    cluster = unique_cluster("cli")
    cfg = lab_yaml(tmp_path, cluster.name)
    runner = CliRunner()
    base = ["--config", str(cfg), "--zk-hosts", zk_ensemble.hosts]
    res = runner.invoke(registrations, [*base, "--json"])
    assert res.exit_code == 1 and "nothing replicated yet" in res.output
    store = ZkStore(zk_client, cluster.name, "node1")
    store.ensure_layout()
    store.bump_epoch()
    store.write([contact(1, "alice", "sip:alice@198.51.100.50:5062"), contact(2, "bob", "sip:bob@198.51.100.51:5062"),
                 dialog(3, "call-1"), dialog(4, "call-2", from_tag="ft2"), dialog(5, "call-2", "end", from_tag="ft2")])
    res = runner.invoke(registrations, [*base, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["count"] == 2 and doc["epoch"] == 1
    assert [(r["aor"], r["received"], r["node"]) for r in doc["registrations"]] == [
        ("alice", "udp:198.51.100.50:5062", "node1"), ("bob", "udp:198.51.100.50:5062", "node1")]
    res = runner.invoke(registrations, [*base, "--aor", "bob"])
    assert res.exit_code == 0 and "1 registrations" in res.output and "sip:bob@198.51.100.51:5062" in res.output
    res = runner.invoke(calls, [*base, "--json"])
    doc = json.loads(res.output)
    assert [(c["callid"], c["from_tag"], c["start_ts"]) for c in doc["calls"]] == [("call-1", "ft1", 1764014461)]
    res = runner.invoke(calls, base)
    assert res.exit_code == 0 and "1 calls" in res.output and "call-1" in res.output
    res = runner.invoke(calls, [*base, "--cdrs", "--json"])
    (cdr,) = json.loads(res.output)["cdrs"]
    assert (cdr["callid"], cdr["reason"], cdr["created_ms"]) == ("call-2", "end", 1764014460123)
    res = runner.invoke(calls, [*base, "--cdrs"])
    assert res.exit_code == 0 and "1 finished calls" in res.output
    res = runner.invoke(calls, ["--config", str(cfg), "--zk-hosts", "127.0.0.1:1", "--timeout", "1"])
    assert res.exit_code == 1 and "not reachable" in res.output


# ------------------------------------------------------------------------------------------------- the agent


def test_agent_passes_node_run_dir_and_ready_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_agents import COORD, load_agent, run

    ocf = load_agent(COORD)
    meta = run(COORD, "meta-data")[1]
    for name in ("node", "run_dir", "ready_file"):
        assert f'<parameter name="{name}"' in meta
    monkeypatch.setenv("OCF_RESKEY_node", "node2")
    monkeypatch.setenv("OCF_RESKEY_ready_file", "/run/sipha/ready")
    cmd = ocf.Config().command()
    assert cmd[cmd.index("--node") + 1] == "node2"
    assert cmd[cmd.index("--ready-file") + 1] == "/run/sipha/ready"
    assert cmd[cmd.index("--run-dir") + 1] == "/run/sipha"
    monkeypatch.delenv("OCF_RESKEY_node")
    default = ocf.Config().command()
    assert default[default.index("--node") + 1] == ocf.local_node_name()


def test_a_standby_removes_its_own_old_binding_when_the_active_deletes_it(
    proxy: Proxy, zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    """node1 wrote a binding while it was active (its proxy got it from the REGISTER); after a failover the
    phone un-registers through node2. node1, now standby, must drop it from its proxy, or a failback would
    route to a phone that is gone. While node1 is active, its own deletes are not pushed back."""
    clear_table(proxy)
    cluster = unique_cluster("del")
    old = ZkStore(zk_client, cluster.name, "node1")
    old.ensure_layout()
    old.bump_epoch()
    old.write([contact(1, "own1", "sip:own1@198.51.100.74:5060", node="node1")])
    with kamailio.Rpc(proxy.rpc_sock, timeout=5.0) as r:  # what node1's proxy holds from the REGISTER
        r.call("ul.add", "location", "own1", "sip:own1@198.51.100.74:5060", 600, -1, "0", 0, 0, -1)
    client = conftest_zk.connect(zk_ensemble)
    rpc = kamailio.Rpc(proxy.rpc_sock, timeout=5.0)
    from ha.coordinator.apply import ProxyApplier
    from ha.coordinator.journal import Journal

    repl = Replication(ZkStore(client, cluster.name, "node1"), "node1", Journal(tmp_path / "j.jsonl"),
                       ProxyApplier(rpc))
    try:
        repl.start()
        assert repl.replicator is not None and repl.replicator.synced.wait(20)
        assert ("own1", "sip:own1@198.51.100.74:5060") in keys_in_proxy(proxy)
        new = ZkStore(zk_client, cluster.name, "node2")  # the new active
        new.bump_epoch()
        new.write([contact(2, "own1", "sip:own1@198.51.100.74:5060", "delete", node="node2")])
        wait_for(lambda: ("own1", "sip:own1@198.51.100.74:5060") not in keys_in_proxy(proxy), 10,
                 "the standby's proxy dropping its old binding")

        # node1 active again: its own binding and its own delete (from its own proxy) are not pushed back.
        repl.promote()
        repl.store.write([contact(3, "own2", "sip:own2@198.51.100.74:5060", node="node1")])
        with kamailio.Rpc(proxy.rpc_sock, timeout=5.0) as r:  # the phone re-registered already
            r.call("ul.add", "location", "own2", "sip:own2@198.51.100.74:5060", 600, -1, "0", 0, 0, -1)
        rep = repl.replicator
        wait_for(lambda: rep.stats.skipped_own >= 2, 10, f"own put skipped ({rep.stats}, {rep.last_status})")
        removed = rep.stats.removed
        repl.store.write([contact(4, "own2", "sip:own2@198.51.100.74:5060", "delete", node="node1")])
        wait_for(lambda: rep.stats.skipped_own >= 3, 10, f"own delete skipped ({rep.stats}, {rep.last_status})")
        assert rep.stats.removed == removed
        assert ("own2", "sip:own2@198.51.100.74:5060") in keys_in_proxy(proxy)
    finally:
        repl.close()
        rpc.close()
        client.stop()
        client.close()
        clear_table(proxy)


def test_a_proxy_restart_without_events_withdraws_readiness_until_its_new_table_is_loaded(
    proxy: Proxy, zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, tmp_path: Path
) -> None:
    """The proxy restarts (its boot time changes) and nobody registers: no event tells it, the boot poll does.
    Its table is empty, so readiness goes until everything, this node's own bindings included, is back."""
    clear_table(proxy)
    cluster = unique_cluster("rst")
    peer = ZkStore(zk_client, cluster.name, "node2")
    peer.ensure_layout()
    peer.bump_epoch()
    peer.write([contact(i, f"r{i}", f"sip:r{i}@198.51.100.75:5060", node="node2") for i in range(1, 201)])
    peer.write([contact(1, "mine", "sip:mine@198.51.100.76:5060", node="node1")])
    want = {(f"r{i}", f"sip:r{i}@198.51.100.75:5060") for i in range(1, 201)}
    want.add(("mine", "sip:mine@198.51.100.76:5060"))
    boot = [int(time.time()) - 100]
    ready = tmp_path / "ready"
    try:
        with running_service(proxy, cluster, tmp_path, zk_ensemble.hosts, ready, standby=True,
                             boot=lambda: boot[0]) as run:
            wait_for(ready.exists, 20, "readiness")
            assert keys_in_proxy(proxy) == want and json.loads(ready.read_text())["proxy_boot"] == boot[0]
            clear_table(proxy)  # what a restarted proxy holds
            boot[0] += 50
            wait_for(lambda: run.repl.proxy_generation == 1, 10, "the restart noticed")
            wait_for(lambda: run.svc.ready_given and ready.exists(), 20, "readiness given again")
            assert keys_in_proxy(proxy) == want
            assert json.loads(ready.read_text())["proxy_boot"] == boot[0]
        assert not ready.exists()  # a standby's coordinator stopped: nobody keeps the proxy in step
        # Restarted, same proxy: resync without readiness again, but its own bindings are not pushed over
        # what the proxy holds from its REGISTERs (ul.add would drop their received address).
        with running_service(proxy, cluster, tmp_path, zk_ensemble.hosts, ready, standby=True,
                             boot=lambda: boot[0]) as run:
            wait_for(ready.exists, 20, "readiness after the coordinator restart")
            assert run.repl.include_own_first is False
            assert run.repl.replicator is not None and run.repl.replicator.stats.skipped_own == 1
    finally:
        clear_table(proxy)


def test_status_answers_at_once_while_the_loop_is_busy_and_reports_its_age(
    zk_client: KazooClient, tmp_path: Path
) -> None:
    """Under overload a flush or a reconciliation chunk held the loop for seconds, the agent's 1 s monitor failed
    and Pacemaker restarted a coordinator that was only busy. Status is answered by its own thread now, with the
    loop's age, so the agent can still tell a hung loop (see LOOP_STUCK_S in the agent)."""
    from ha.coordinator.journal import Journal
    from ha.coordinator.service import query_status

    repl = Replication(ZkStore(zk_client, unique_cluster("busy").name, "node1"), "node1", Journal(tmp_path / "j"))
    busy, entered = threading.Event(), threading.Event()
    real_tick = repl.tick

    def slow_tick() -> str | None:
        if busy.is_set():
            entered.set()
            time.sleep(3)  # a loop stuck in one long write
        return real_tick()

    repl.tick = slow_tick  # type: ignore[method-assign]
    sock = str(tmp_path / "c.sock")
    svc = Service("127.0.0.1", 0, str(tmp_path / "c.pid"), sock, repl, ready_file=None, role=None)
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: os.path.exists(sock), 10, "the status socket")
        st = os.stat(sock)  # the health service (the run directory's group) may ask for status too
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == os.stat(tmp_path).st_gid, oct(st.st_mode)
        busy.set()
        wait_for(entered.is_set, 5, "a tick holding the loop")
        time.sleep(1.2)  # into its 3 s (the loop's age counts from before the tick)
        t0 = time.monotonic()
        st = query_status(sock, timeout=1.0)
        assert time.monotonic() - t0 < 0.5
        assert st["ok"] and st["pid"] == os.getpid() and st["loop_age_s"] >= 1.0, st
        busy.clear()
        wait_for(lambda: query_status(sock)["loop_age_s"] < 1.5, 10, "the loop turning again")
    finally:
        svc.stop()
        t.join(20)


def test_flush_is_due_a_linger_after_the_first_event_or_at_once_for_a_full_transaction(
    zk_client: KazooClient, tmp_path: Path
) -> None:
    from ha.coordinator.journal import Journal
    from ha.coordinator.replication import LINGER_MAX_EVENTS

    repl = Replication(ZkStore(zk_client, unique_cluster("due").name, "node1"), "node1", Journal(tmp_path / "j"),
                       write_linger_s=0.25)
    assert repl.flush_due() is None
    repl.active = True

    def feed(seq: int) -> None:
        ev = contact(seq, f"due{seq}")
        repl.feed(json.dumps(ev.to_json()).encode())

    t0 = time.monotonic()
    feed(1)
    time.sleep(0.05)
    feed(2)
    due = repl.flush_due()
    assert due is not None and t0 + 0.25 <= due <= t0 + 0.26  # from the first event, not the last
    for seq in range(3, LINGER_MAX_EVENTS + 1):
        feed(seq)
    due = repl.flush_due()
    assert due is not None and due <= time.monotonic()  # a full transaction's worth: now
    repl.active = False
    repl.pending.clear()
    repl._standby_contacts.append(contact(LINGER_MAX_EVENTS + 1, "late"))
    due = repl.flush_due()
    assert due is not None and due <= time.monotonic()  # this proxy's REGISTERs while not the writer: now


def test_pace_sheds_registers_while_the_intake_is_behind_and_stops_once_it_caught_up(
    zk_client: KazooClient, tmp_path: Path
) -> None:
    from ha.coordinator.journal import Journal
    from ha.coordinator.replication import SHED_HOLD_S, SHED_MIN_S

    repl = Replication(ZkStore(zk_client, unique_cluster("pace").name, "node1"), "node1", Journal(tmp_path / "j"))
    calls: list[tuple[int, int]] = []
    repl.shed_fn = lambda until, limit: calls.append((until, limit))
    repl.active = True

    def feed(seq: int, age_s: float) -> None:
        ev = contact(seq, f"pace{seq}", ts=int((time.time() - age_s) * 1000))
        repl.feed(json.dumps(ev.to_json()).encode())

    feed(1, 0.1)
    assert repl.pace() is None and calls == []  # a tenth of a second behind: nothing to do
    feed(2, 2.0)
    repl._drained.append((time.monotonic() - 1.0, repl.intake.accepted - 500))  # 500 events in the last second
    said = repl.pace()
    assert said is not None and "2.0 s behind" in said, said
    until, limit = calls[0]
    assert len(calls) == 1 and time.time() + SHED_HOLD_S - 1 <= until <= time.time() + SHED_HOLD_S
    assert 390 <= limit <= 400 and f"over {limit}/s" in said, (limit, said)  # SHED_TAKE_SHARE of what it drains
    assert repl.status()["shedding"] and repl.status()["shed_spells"] == 1
    assert repl.status()["shed_limit_per_s"] == limit
    feed(3, 0.5)  # under SHED_BEHIND_S but not caught up: the spell goes on, refreshed at most once a second
    assert repl.pace() is None and len(calls) == 1
    repl.intake_empty()
    assert repl.pace() is None and repl.status()["shedding"]  # caught up, but a spell lasts SHED_MIN_S
    repl._shed_started -= SHED_MIN_S
    said = repl.pace()
    assert said is not None and "caught up" in said and calls[-1] == (0, 0), (said, calls)
    assert not repl.status()["shedding"] and repl.status()["shed_limit_per_s"] == 0
    feed(4, 5.0)
    repl.active = False  # a standby writes nothing: nothing to shed for
    assert repl.pace() is None and calls[-1] == (0, 0)


def test_pace_stuck_sheds_everything_while_the_loop_is_held_and_pace_takes_the_spell_over(
    zk_client: KazooClient, tmp_path: Path
) -> None:
    from ha.coordinator.journal import Journal
    from ha.coordinator.replication import SHED_HOLD_S, SHED_MIN_S

    repl = Replication(ZkStore(zk_client, unique_cluster("stuck").name, "node1"), "node1", Journal(tmp_path / "j"))
    calls: list[tuple[int, int]] = []
    repl.shed_fn = lambda until, limit: calls.append((until, limit))
    assert repl.pace_stuck(2.0) is None and calls == []  # a standby writes nothing: nothing to shed for
    repl.active = True
    said = repl.pace_stuck(1.5)
    assert said is not None and "held 1.5 s" in said and "every REGISTER answered 503" in said, said
    (until, limit), = calls
    assert limit == 0 and time.time() + SHED_HOLD_S - 1 <= until <= time.time() + SHED_HOLD_S
    assert repl.pace_stuck(2.0) is None and len(calls) == 1  # refreshed at most once a second
    assert repl.status()["shedding"] and repl.status()["shed_spells"] == 1
    # The loop is back: pace() keeps the spell while the intake is behind, then ends it once caught up.
    repl.feed(json.dumps(contact(1, "stuck1", ts=int((time.time() - 5.0) * 1000)).to_json()).encode())
    repl._shed_until -= SHED_HOLD_S  # a second later: due for a refresh
    assert repl.pace() is None and len(calls) == 2 and calls[-1][0] > 0  # still behind: refreshed, not ended
    repl.intake_empty()
    repl._shed_started -= SHED_MIN_S
    said = repl.pace()
    assert said is not None and "caught up" in said and calls[-1] == (0, 0), (said, calls)


def test_a_held_loop_with_its_intake_filling_sheds_from_the_watchdog(zk_client: KazooClient, tmp_path: Path) -> None:
    """The loop stuck in one long call (a write waiting on a starved ZooKeeper held it 23 s in an overload run)
    while the proxy's events fill the intake's socket: the watchdog thread starts the spell before the buffer
    overflows. Held with a few events waiting (an outage's first seconds at a modest rate, served fail static
    until kazoo gives up and the write is journaled): no spell."""
    import socket

    from ha.coordinator.journal import Journal
    from ha.coordinator.service import STUCK_FILL, intake_fill

    repl = Replication(ZkStore(zk_client, unique_cluster("held").name, "node1"), "node1", Journal(tmp_path / "j"))
    calls: list[tuple[int, int]] = []
    repl.shed_fn = lambda until, limit: calls.append((until, limit))
    hold, held, release = threading.Event(), threading.Event(), threading.Event()
    real_tick = repl.tick

    def slow_tick() -> str | None:
        if hold.is_set():
            hold.clear()
            held.set()
            release.wait(20)  # a loop held by one long call
        return real_tick()

    repl.tick = slow_tick  # type: ignore[method-assign]
    intake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intake.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # small, to fill it in a test
    intake.bind(("127.0.0.1", 0))
    # role: the VIP is "here", so this node takes over and writes
    svc = Service("127.0.0.1", 0, str(tmp_path / "c.pid"), str(tmp_path / "c.sock"), repl, ready_file=None,
                  role=lambda: True, intake=intake)  # fmt: skip
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wait_for(lambda: repl.active, 15, "the coordinator active (it took over)")
        hold.set()
        wait_for(held.is_set, 5, "a tick holding the loop")
        for seq in range(1, 4):
            sender.sendto(json.dumps(contact(seq, f"held{seq}").to_json()).encode(), intake.getsockname())
        time.sleep(1.6)  # held past SHED_BEHIND_S with three events waiting: no spell
        assert 0 < intake_fill(intake) < STUCK_FILL and calls == [], (intake_fill(intake), calls)
        seq = 4
        while intake_fill(intake) < STUCK_FILL and seq < 1000:
            sender.sendto(json.dumps(contact(seq, f"held{seq}").to_json()).encode(), intake.getsockname())
            seq += 1
        wait_for(lambda: calls, 3, "a spell started by the watchdog while the loop is still held")
        assert calls[0][1] == 0 and repl.status()["shed_spells"] == 1 and not release.is_set()
    finally:
        release.set()
        sender.close()
        svc.stop()
        t.join(20)


def test_the_intake_socket_holds_seconds_of_events() -> None:
    """Past rmem_max (root: SO_RCVBUFFORCE): at ~2.3 KB of buffer per datagram, 8 MB held ~1 s of a flood's events
    and every longer stall of the loop lost some (each loss costs a full reconciliation)."""
    import socket

    from ha.coordinator.service import INTAKE_RCVBUF, _deep_receive_buffer

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _deep_receive_buffer(s)
        got = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert got >= INTAKE_RCVBUF if os.geteuid() == 0 else got > 0, got


def test_the_coordinator_hands_the_gil_over_quickly(tmp_path: Path) -> None:
    """CPython's 5 ms switch interval made each blocking call of the watch or the intake wait 5 ms whenever a bulk
    read was parsing on another thread (the standby's watch fell ~2 s behind during each audit); main sets less."""
    import sys

    from ha.coordinator.service import GIL_SWITCH_S, main

    before = sys.getswitchinterval()
    try:
        assert main(["--status", "--status-socket", str(tmp_path / "none.sock")]) == 1  # nobody answers there
        assert abs(sys.getswitchinterval() - GIL_SWITCH_S) < 1e-6 and GIL_SWITCH_S <= 0.001
    finally:
        sys.setswitchinterval(before)


def test_replicator_passes_are_summed_up_for_the_summary_not_logged_one_by_one() -> None:
    """At 1000 REGISTER/s a log line per pass was ~200 lines/s per node; the service's 5 s summary says it once."""
    import time as _time

    from ha.coordinator.apply import ApplyResult
    from ha.coordinator.replicator import _PassWindow

    w = _PassWindow()
    assert w.sentence() is None  # no pass: no line
    w.note(3, ApplyResult(added=2), 1)
    _time.sleep(0.05)
    w.note(7, ApplyResult(added=5, removed=2), 0)
    said = w.sentence() or ""
    assert said.startswith("replicator window: 2 passes, 10 changes, at most 7 in one pass; added 7, removed 2, "
                           "1 own skipped; longest pause between passes "), said
    assert "known from the writes' replies" not in said
    w.note(4, ApplyResult(), 4)
    assert ", 5 own skipped (3 known from the writes' replies, not read back); longest" in (w.sentence(3) or "")
    assert 50 <= int(said.rsplit(" ", 2)[-2]) < 1000  # the 50 ms between the two


def test_the_replication_bench_reads_the_summary_lines_the_service_writes(tmp_path: Path) -> None:
    """The bench's pass figures come from these lines now: the service's sentence and the bench's parse must agree."""
    import importlib.util
    import logging
    import time as _time

    from ha.coordinator.apply import ApplyResult
    from ha.coordinator.replicator import _PassWindow
    from ha.coordinator.service import LOG_FORMAT, SUMMARY_EVERY_S

    path = Path(__file__).resolve().parents[2] / "bench" / "coordinator_replication.py"
    spec = importlib.util.spec_from_file_location("coordinator_replication", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log_file = tmp_path / "coordinator-node2.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    lg = logging.getLogger("sipha.test.summary")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    t0 = _time.time() - bench.SUMMARY_S - 1
    for changes, unread in (((3, 4), 0), ((20, 1), 6)):
        w = _PassWindow()
        for c in changes:
            w.note(c, ApplyResult(added=c), 0)
        lg.info("%s", w.sentence(unread))
    handler.close()
    lg.removeHandler(handler)
    assert bench.SUMMARY_S == SUMMARY_EVERY_S
    got = bench.replicator_passes(log_file, t0, _time.time())
    assert got["passes"] == 4 and got["changes"] == 28 and got["summaries"] == 2, got
    assert got["changes_per_pass_max"] == 20 and got["changes_per_pass_mean"] == 7.0 and got["own_unread"] == 6
    assert got["s_between_passes_max"] is not None and got["s_between_passes_max"] < 1.0


def test_full_garbage_collections_are_counted_with_their_longest_for_the_summary() -> None:
    """A full collection stops every thread of the coordinator; the summary says how many and the longest."""
    import gc

    from ha.coordinator.gcpause import FullCollections

    fc = FullCollections()
    fc.install()
    gc.disable()  # only the collections this test asks for: none set off by another thread's allocations
    try:
        gc.collect(0)  # a young collection: not counted
        assert fc.take() == (0, 0.0)
        gc.collect()
        gc.collect()
        n, longest = fc.take()
        assert n == 2 and 0 < longest < 5
        assert fc.take() == (0, 0.0)  # taken: the next summary starts from none
    finally:
        fc.uninstall()
        gc.enable()
    gc.collect()
    assert fc.take() == (0, 0.0)


def test_the_freezer_hides_survivors_from_full_collections_and_hands_them_back_at_each_thaw() -> None:
    """What a full collection walks after a freeze is only what was made since; a thaw gives everything back (the
    garbage cycles among frozen objects are collected then)."""
    import gc
    import weakref

    from ha.coordinator.gcpause import Freezer

    class Cyclic:
        pass

    gc.unfreeze()
    gc.disable()  # only the collections this test asks for
    try:
        f = Freezer(5.0, 60.0, now=0.0)
        keep = [[i] for i in range(50_000)]  # long-lived, tracked
        f.tick(4.9)
        assert gc.get_freeze_count() == 0 and f.freezes == 0  # not yet
        f.tick(5.0)
        assert gc.get_freeze_count() >= len(keep) and f.freezes == 1
        cycle = Cyclic()
        cycle.me = cycle  # type: ignore[attr-defined]
        alive = weakref.ref(cycle)
        gc.collect()
        gc.freeze()  # the cycle frozen while alive, as the service's ticks do
        del cycle
        gc.collect()
        assert alive() is not None  # a frozen cycle is not found
        f.tick(60.0)
        assert gc.get_freeze_count() == 0 and f.thaws == 1
        gc.collect()
        assert alive() is None  # thawed: the cycle is collected now
        f.tick(64.9)
        assert f.freezes == 1  # the next freeze waits an interval after the thaw
        f.tick(65.0)
        assert f.freezes == 2 and gc.get_freeze_count() >= len(keep)
    finally:
        gc.unfreeze()
        gc.enable()
