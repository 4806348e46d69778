"""The apply path end to end on real parts: ZooKeeper ensemble -> watch -> replicator -> JSON-RPC -> a real
Kamailio (the rendered lab config, started in a throwaway ``sipha-t-<rand>`` namespace by the proxy
fixture of ``test_proxy_live``), and the other direction: a real REGISTER -> the proxy's JSON event ->
intake -> store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conftest_zk
import pytest
from conftest_zk import connect, contact, dialog
from kazoo.client import KazooClient
from test_proxy_live import Events, Phone, Proxy, request
from test_proxy_live import proxy as proxy  # the module-scoped real Kamailio in its own namespace

from ha.coordinator.apply import ProxyApplier
from ha.coordinator.events import ContactEvent, Intake, SeqStatus
from ha.coordinator.journal import Journal
from ha.coordinator.replication import Replication
from ha.coordinator.replicator import Replicator
from ha.coordinator.store import ContactRecord, ZkStore
from ha.proxy import kamailio

pytestmark = [
    pytest.mark.validators,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(kamailio.kamailio_binary() is None, reason="kamailio is not installed"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]

zk_ensemble = conftest_zk.zk_ensemble
zk_client = conftest_zk.zk_client


@pytest.fixture
def rpc(proxy: Proxy) -> Iterator[kamailio.Rpc]:
    with kamailio.Rpc(proxy.rpc_sock, timeout=5.0) as client:
        yield client


def bindings(rpc: kamailio.Rpc, aor: str) -> set[str]:
    """Contact URIs the proxy holds for an AoR (ul.lookup answers 404 when there are none)."""
    try:
        res = rpc.call("ul.lookup", "location", aor)
    except kamailio.RpcError as exc:
        if "404" in str(exc) or "not found" in str(exc).lower():
            return set()
        raise
    text = json.dumps(res)
    out = set()
    for part in text.split('"Address": "')[1:]:
        out.add(part.split('"', 1)[0])
    return out


def record(aor: str, uri: str, node: str = "node2", ttl: int = 600) -> ContactRecord:
    return ContactRecord(aor=aor, contact=uri, expires_at=int(time.time()) + ttl, q=500, node=node, epoch=1)


def test_applier_adds_and_removes_pipelined(rpc: kamailio.Rpc) -> None:
    applier = ProxyApplier(rpc)
    recs = [record(f"ap{i}", f"sip:ap{i}@198.51.100.61:5060") for i in range(500)]
    res = applier.apply([*recs, record("old", "sip:old@x", ttl=-5)])
    assert (res.added, res.expired, res.errors) == (500, 1, [])
    assert bindings(rpc, "ap0") == {"sip:ap0@198.51.100.61:5060"}
    assert '"Q": 0.5' in json.dumps(rpc.call("ul.lookup", "location", "ap0")) or bindings(rpc, "ap0")
    # A second phone of the same user stays when the first is removed (ul.rm_contact, not ul.rm).
    applier.apply([record("ap1", "sip:ap1-desk@198.51.100.62:5060")])
    res = applier.apply(removes=[recs[1], recs[2], record("never", "sip:never@x")])
    assert (res.removed, res.absent, res.errors) == (2, 1, [])
    assert bindings(rpc, "ap1") == {"sip:ap1-desk@198.51.100.62:5060"}
    assert bindings(rpc, "ap2") == set()


def wait_for(cond, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_replicator_pushes_peer_writes_and_skips_own(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, rpc: kamailio.Rpc, proxy: Proxy
) -> None:
    cluster = f"r{uuid.uuid4().hex[:8]}"
    peer = ZkStore(zk_client, cluster, "node2")  # the active node, writing its proxy's events
    peer.ensure_layout()
    peer.bump_epoch()
    peer.write([contact(i, f"rp{i}", f"sip:rp{i}@198.51.100.63:5060", node="node2") for i in range(1, 301)])
    own = ZkStore(zk_client, cluster, "node1")
    own.adopt_epoch()
    own.write([contact(1, "mine", "sip:mine@198.51.100.64:5060", node="node1")])

    local_client = connect(zk_ensemble)
    try:
        local = ZkStore(local_client, cluster, "node1")
        own_rpc = kamailio.Rpc(proxy.rpc_sock, timeout=5.0)  # the replicator's thread has its own client
        rep = Replicator(local, ProxyApplier(own_rpc), "node1")
        rep.start()
        try:
            assert rep.synced.wait(20), rep.last_status
            assert rep.stats.added == 300 and rep.stats.skipped_own == 1, rep.last_status
            assert bindings(rpc, "rp300") == {"sip:rp300@198.51.100.63:5060"}
            assert bindings(rpc, "mine") == set()  # own writes are never pushed back

            # Live changes: 100 new, 50 removed, one refreshed to a new expiry, one own write.
            t0 = time.monotonic()
            peer.write(
                [contact(400 + i, f"rn{i}", f"sip:rn{i}@198.51.100.63:5060", node="node2") for i in range(100)]
                + [
                    contact(600 + i, f"rp{i}", f"sip:rp{i}@198.51.100.63:5060", "delete", node="node2")
                    for i in range(1, 51)
                ]
                + [contact(700, "rp60", "sip:rp60@198.51.100.63:5060", "update", ttl=1800, node="node2")]
            )
            own.write([contact(2, "mine2", "sip:mine2@198.51.100.64:5060", node="node1")])
            wait_for(lambda: rep.stats.added >= 401 and rep.stats.removed >= 50)
            latency = time.monotonic() - t0
            assert bindings(rpc, "rn99") == {"sip:rn99@198.51.100.63:5060"}
            assert bindings(rpc, "rp1") == set() and bindings(rpc, "rp50") == set()
            assert bindings(rpc, "rp51") == {"sip:rp51@198.51.100.63:5060"}
            expires = json.dumps(rpc.call("ul.lookup", "location", "rp60"))
            assert '"Expires": 17' in expires or '"Expires": 18' in expires, expires
            wait_for(lambda: rep.stats.skipped_own >= 2)
            assert bindings(rpc, "mine2") == set()
            assert rep.stats.errors == 0, rep.last_status
            print(f"151 live changes written, watched and applied to kamailio in {latency * 1000:.0f} ms")
        finally:
            rep.stop()
            own_rpc.close()
    finally:
        local_client.stop()
        local_client.close()


def test_the_active_applies_a_peers_delete_of_its_own_binding_and_skips_its_own_deletes(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, rpc: kamailio.Rpc, proxy: Proxy
) -> None:
    """A flood with VIP moves: phones whose ARP entry still pointed at the old active un-registered there, and
    its coordinator wrote the deletes. The bindings had last been written by the active, whose replicator
    skipped every delete of its own bindings while active: its proxy kept 60 bindings nobody else had. A
    delete this node did not write itself is a peer's and must reach the proxy; one it wrote must not (the
    phone may have registered again meanwhile: pushing the delete back would remove the new binding)."""
    cluster = f"r{uuid.uuid4().hex[:8]}"
    uri_p, uri_s = "sip:peerdel@198.51.100.65:5060", "sip:selfdel@198.51.100.65:5060"
    local_client = connect(zk_ensemble)
    own_rpc = kamailio.Rpc(proxy.rpc_sock, timeout=5.0)
    try:
        local = ZkStore(local_client, cluster, "node1")  # the active: it wrote both bindings
        local.ensure_layout()
        local.bump_epoch()
        local.write([contact(1, "peerdel", uri_p, node="node1"), contact(2, "selfdel", uri_s, node="node1")])
        applier = ProxyApplier(own_rpc)
        recs = [r for r in local.snapshot().contacts]
        assert applier.apply(recs, []).added == 2  # its proxy holds them (as if registered there)
        rep = Replicator(local, applier, "node1")
        rep.standby = lambda: False
        rep.start()
        try:
            assert rep.synced.wait(20), rep.last_status
            peer = ZkStore(zk_client, cluster, "node2")
            peer.adopt_epoch()
            peer.write([contact(3, "peerdel", uri_p, "delete", node="node2")])  # the un-REGISTER at the peer
            local.write([contact(4, "selfdel", uri_s, "delete", node="node1")])  # this proxy's own
            wait_for(lambda: bindings(rpc, "peerdel") == set())
            assert rep.wait_caught_up(10)
            assert bindings(rpc, "selfdel") == {uri_s}  # not pushed back (here: the "re-registered" binding)
            assert local._own_deletes == {}  # the count was taken by its event
        finally:
            rep.stop()
    finally:
        for aor in ("peerdel", "selfdel"):
            with contextlib.suppress(kamailio.RpcError):
                rpc.call("ul.rm", "location", aor)
        own_rpc.close()
        local_client.stop()
        local_client.close()


def test_real_register_event_goes_through_intake_into_the_store(proxy: Proxy, zk_client: KazooClient) -> None:
    """The template's real event (not a hand-made one) must pass the intake and land in ZooKeeper."""
    store = ZkStore(zk_client, f"e{uuid.uuid4().hex[:8]}", "node1")
    store.ensure_layout()
    store.bump_epoch()
    events, ph = Events(proxy), Phone(proxy, 5072)
    try:
        events.drain()
        aor = f"sip:erin@{proxy.vip}"
        cid = uuid.uuid4().hex
        reg = request(
            "REGISTER",
            f"sip:{proxy.vip}",
            local=ph.addr,
            from_uri=aor,
            to_uri=aor,
            call_id=cid,
            cseq=1,
            user_agent="erin/1",
            headers=(f"Contact: <sip:erin@{ph.addr[0]}:{ph.addr[1]}>;q=0.7", "Expires: 300"),
        )
        assert ph.ask(reg) == "SIP/2.0 200 OK"
        events.sock.settimeout(3)
        intake = Intake()
        verdict = intake.feed(events.sock.recv(65535))
        assert verdict is not None, dict(intake.rejected)
        assert verdict.seq.status in (SeqStatus.FIRST, SeqStatus.NEXT)
        ev = verdict.event
        assert isinstance(ev, ContactEvent) and ev.type == "contact.insert" and ev.q == 700
        store.write([ev])
        (rec,) = store.snapshot().contacts
        assert (rec.aor, rec.contact, rec.callid, rec.received) == (
            "erin",
            f"sip:erin@{proxy.node_ip}:5072",
            cid,
            f"udp:{proxy.node_ip}:5072",
        )
        assert rec.socket == f"udp:{proxy.vip}:5060" and rec.user_agent == "erin/1" and rec.node == "node1"
    finally:
        events.close()
        ph.close()


def test_events_from_the_active_reach_the_standbys_kamailio_and_a_takeover_fences_it(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, rpc: kamailio.Rpc, proxy: Proxy, tmp_path: Path
) -> None:
    """What the service will run: datagrams -> Replication (active node2) -> ZooKeeper -> Replication
    (standby node1) -> ul.add into the real Kamailio; then node1 takes over and node2's next write is fenced."""
    cluster = f"f{uuid.uuid4().hex[:8]}"
    active = Replication(ZkStore(zk_client, cluster, "node2"), "node2", Journal(tmp_path / "a.jsonl"))
    assert "started" in active.start()
    assert "epoch 1" in active.promote()
    standby_client = connect(zk_ensemble)
    standby_rpc = kamailio.Rpc(proxy.rpc_sock, timeout=5.0)
    standby = Replication(
        ZkStore(standby_client, cluster, "node1"), "node1", Journal(tmp_path / "b.jsonl"), ProxyApplier(standby_rpc)
    )
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        standby.start()
        assert standby.replicator is not None and standby.replicator.synced.wait(20)
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        datagrams = [
            json.dumps(contact(i, f"fl{i}", f"sip:fl{i}@198.51.100.65:5060", node="node2").to_json()).encode()
            for i in range(1, 201)
        ]
        datagrams.insert(50, b"not an event")
        for start in range(0, len(datagrams), 20):  # bursts the default socket buffer holds
            for d in datagrams[start : start + 20]:
                tx.sendto(d, rx.getsockname())
            for _ in datagrams[start : start + 20]:
                active.feed(rx.recv(65535), "proxy")
        assert active.flush() == "wrote 200 events"
        wait_for(lambda: standby.replicator is not None and standby.replicator.stats.added >= 200)
        assert bindings(rpc, "fl200") == {"sip:fl200@198.51.100.65:5060"}
        assert active.status()["rejected"] == {"malformed": 1}

        # node1 takes over; node2 (say, partitioned and not yet fenced by Pacemaker) writes on: rejected.
        assert "epoch 2" in standby.promote()
        after = standby.store.takeover_ms() + 1000  # accepted after the takeover (earlier ones are still written)
        active.feed(json.dumps(contact(201, "late", node="node2", ts=after).to_json()).encode())
        assert (active.flush() or "").startswith("FENCED")
        wait_for(lambda: "written unfenced" in (active.tick() or ""))
        assert not active.active and active.status()["fenced"] == 1
        assert "late" not in {r.aor for r in standby.store.snapshot().contacts}
    finally:
        rx.close()
        tx.close()
        standby.close()
        active.close()
        standby_rpc.close()
        standby_client.stop()
        standby_client.close()


def test_real_bye_after_a_failover_closes_the_replicated_dialog(proxy: Proxy, zk_client: KazooClient) -> None:
    """node2 set the call up (its dialog record is in the store); the callee's BYE reaches this proxy, which
    never saw the INVITE: its real dialog.end (known=false) must still yield the CDR with the original times."""
    cluster = f"d{uuid.uuid4().hex[:8]}"
    old_active = ZkStore(zk_client, cluster, "node2")
    old_active.ensure_layout()
    old_active.bump_epoch()
    cid, caller_tag, callee_tag = uuid.uuid4().hex, "c4ll3r", "c4ll33"
    old_active.write([dialog(1, cid, node="node2", from_tag=caller_tag, to_tag=callee_tag, created_ms=1764014460123)])
    new_active = ZkStore(zk_client, cluster, "node1")
    new_active.bump_epoch()
    events, callee, caller = Events(proxy), Phone(proxy, 5076), Phone(proxy, 5078)
    try:
        events.drain()
        target = f"sip:alice@{caller.addr[0]}:{caller.addr[1]}"
        bye = request(
            "BYE", target, local=callee.addr, from_uri=f"sip:bob@{proxy.vip}", to_uri=f"sip:alice@{proxy.vip}",
            call_id=cid, cseq=2, from_tag=callee_tag, to_tag=caller_tag,
            headers=(f"Route: <sip:{proxy.vip};lr;ftag={caller_tag};did=abc.123>",),
        )  # fmt: skip
        callee.send(bye)
        got = caller.recv()
        assert got is not None and got[0] == f"BYE {target} SIP/2.0", got
        events.sock.settimeout(3)
        intake = Intake()
        verdict = None
        while verdict is None or getattr(verdict.event, "callid", None) != cid:
            verdict = intake.feed(events.sock.recv(65535))
        ev = verdict.event
        assert ev.type == "dialog.end" and not getattr(ev, "known", True), ev
        new_active.write([ev])
        assert new_active.snapshot().dialogs == ()
        (cdr,) = new_active.cdrs()
        assert (cdr.callid, cdr.from_tag, cdr.created_ms, cdr.start_ts) == (cid, caller_tag, 1764014460123, 1764014461)
    finally:
        events.close()
        callee.close()
        caller.close()


def test_the_standby_audit_looks_up_what_can_be_wrong_and_reads_the_whole_table_now_and_then(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, rpc: kamailio.Rpc, proxy: Proxy, tmp_path: Path
) -> None:
    """Kamailio 5.6 builds ul.dump's reply in O(n^2): 10.5 s of a core for 26k bindings, every 30 s, on the standby
    during the replication bench. Most audits look up only the view's AoRs and those of deletes since the last
    one; the whole table is read at the first audit, every FULL_AUDIT_EVERY-th and after one that repaired."""
    from ha.coordinator import proxytable
    from ha.coordinator.replicator import FULL_AUDIT_EVERY

    cluster = f"u{uuid.uuid4().hex[:8]}"
    writer = ZkStore(zk_client, cluster, "node2")
    writer.ensure_layout()
    writer.bump_epoch()
    uri = "sip:lk{}@198.51.100.67:5060".format
    old = int(time.time() * 1000) - 60_000
    writer.write([contact(i, f"lk{i}", uri(i), node="node2", ttl=600, ts=old) for i in range(1, 6)])
    reads: list[str] = []

    def dump() -> Any:
        reads.append("whole")
        return proxytable.dump(proxy.rpc_sock)

    def lookup(aors: Any) -> Any:
        reads.append(",".join(sorted(aors)))
        return proxytable.lookup(proxy.rpc_sock, aors)

    sclient = connect(zk_ensemble)
    srpc = kamailio.Rpc(proxy.rpc_sock, timeout=5.0)
    standby = Replication(ZkStore(sclient, cluster, "node1"), "node1", Journal(tmp_path / "s.jsonl"),
                          ProxyApplier(srpc), dump_table=dump, lookup_table=lookup)  # fmt: skip

    def audit() -> str:
        runs, standby._next_audit = standby.audit_runs, 0
        deadline = time.monotonic() + 20
        while standby.audit_runs == runs and time.monotonic() < deadline:
            standby.tick()
            time.sleep(0.05)
        assert standby.audit_runs == runs + 1
        return str(standby.status()["last_audit"])

    try:
        standby.start()
        assert standby.replicator is not None and standby.replicator.synced.wait(20)
        wait_for(lambda: all(bindings(rpc, f"lk{i}") == {uri(i)} for i in range(1, 6)))
        said = audit()  # the first audit: the whole table (it also removes what earlier tests left in this proxy)
        assert reads == ["whole"] and "whole proxy table read in" in said, (reads, said)
        # A peer's un-REGISTER of lk5 that this proxy did not apply (put back behind the watch's back), a binding
        # outside replication (lkghost), and one the proxy lost (lk1).
        writer.write([contact(7, "lk5", uri(5), "delete", node="node2")])
        wait_for(lambda: bindings(rpc, "lk5") == set())
        ProxyApplier(rpc).apply([record("lk5", uri(5)), record("lkghost", "sip:lkghost@198.51.100.67:5060")])
        rpc.call("ul.rm_contact", "location", "lk1", uri(1))
        said = audit()
        assert reads[1] == "lk1,lk2,lk3,lk4,lk5", reads  # the view's AoRs and the deleted one, nothing else
        assert "added 1" in said and "removed 1" in said and "bindings of 5 AoRs" in said, said
        assert bindings(rpc, "lk1") == {uri(1)} and bindings(rpc, "lk5") == set()
        assert bindings(rpc, "lkghost") != set()  # not looked at yet ...
        said = audit()  # ... but an audit that repaired has the next one read everything
        assert reads[2] == "whole" and "removed 1" in said and bindings(rpc, "lkghost") == set(), (reads, said)
        for _ in range(FULL_AUDIT_EVERY):
            audit()
        assert reads[3:] == ["lk1,lk2,lk3,lk4"] * (FULL_AUDIT_EVERY - 1) + ["whole"], reads
    finally:
        standby.close()
        srpc.close()
        sclient.stop()
        sclient.close()


def test_a_due_standby_audit_waits_while_replication_is_busy_but_not_for_ever(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, proxy: Proxy, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The audit's reads (the whole store, the proxy's bindings over its one JSON-RPC worker) made the standby's
    lag p99 ~1 s during load steps: it waits while more than AUDIT_BUSY_PER_S changes/s are applied, at most
    AUDIT_MAX_DEFER_S, and not at all after changes failed to apply."""
    from ha.coordinator import proxytable
    from ha.coordinator import replication as replmod

    cluster = f"u{uuid.uuid4().hex[:8]}"
    ZkStore(zk_client, cluster, "node2").ensure_layout()
    sclient = connect(zk_ensemble)
    srpc = kamailio.Rpc(proxy.rpc_sock, timeout=5.0)
    standby = Replication(ZkStore(sclient, cluster, "node1"), "node1", Journal(tmp_path / "s.jsonl"),
                          ProxyApplier(srpc), dump_table=lambda: proxytable.dump(proxy.rpc_sock))  # fmt: skip
    monkeypatch.setattr(replmod, "AUDIT_MAX_DEFER_S", 5.0)
    try:
        standby.start()
        rep = standby.replicator
        assert rep is not None and rep.synced.wait(20)
        wait_for(lambda: rep.view_complete)
        standby._next_audit = 1e12
        for t in range(100, 106):  # ticks while the watch applies 1000 changes/s
            rep.stats.added += 1000
            assert standby._standby_audit(float(t)) is None
        standby._next_audit = 0
        rep.stats.added += 1000
        said = standby._standby_audit(106.0)
        assert said is not None and said.startswith("standby audit deferred: applying 1000 changes/s"), said
        rep.stats.added += 1000
        assert standby._standby_audit(107.0) is None and standby._audit is None  # still waiting, quietly
        rep.stats.added += 1000
        assert standby._standby_audit(111.5) is None and standby._audit is not None  # waited long enough
        wait_for(lambda: standby._audit is not None and standby._audit.done())
        # it ran (what it found depends on what other tests left in the module's proxy)
        assert (standby._standby_audit(112.0) or "").startswith("standby audit")
        # Changes that could not be applied: the next audit does not wait, however busy.
        rep.audit_soon = True
        rep.stats.added += 1000
        assert standby._standby_audit(113.0) is None and standby._audit is None  # due in AUDIT_SOON_S
        standby._next_audit = 0
        rep.stats.added += 1000
        assert standby._standby_audit(114.0) is None and standby._audit is not None
        wait_for(lambda: standby._audit is not None and standby._audit.done())
    finally:
        standby.close()
        srpc.close()
        sclient.stop()
        sclient.close()


def test_the_standby_audit_repairs_what_replication_missed(
    zk_ensemble: conftest_zk.Ensemble, zk_client: KazooClient, rpc: kamailio.Rpc, proxy: Proxy, tmp_path: Path
) -> None:
    """Nothing retries a change whose ul.add failed (a reply lost under load) and a watch can miss a change: the
    standby's audit compares its real proxy's ul.dump with the view and repairs the difference."""
    from ha.coordinator import proxytable

    cluster = f"u{uuid.uuid4().hex[:8]}"
    writer = ZkStore(zk_client, cluster, "node2")
    writer.ensure_layout()
    writer.bump_epoch()
    uri = "sip:au{}@198.51.100.66:5060".format
    old = int(time.time() * 1000) - 60_000  # settled: a binding written around the audit's dump is the watch's job
    writer.write([contact(i, f"au{i}", uri(i), node="node2", ttl=600, ts=old) for i in range(1, 6)])
    sclient = connect(zk_ensemble)
    srpc = kamailio.Rpc(proxy.rpc_sock, timeout=5.0)
    standby = Replication(ZkStore(sclient, cluster, "node1"), "node1", Journal(tmp_path / "s.jsonl"),
                          ProxyApplier(srpc), dump_table=lambda: proxytable.dump(proxy.rpc_sock))  # fmt: skip
    try:
        standby.start()
        assert standby.replicator is not None and standby.replicator.synced.wait(20)
        wait_for(lambda: all(bindings(rpc, f"au{i}") == {uri(i)} for i in range(1, 6)))
        # Behind replication's back: one binding lost, one left over, one whose expiry drifted.
        rpc.call("ul.rm_contact", "location", "au1", uri(1))
        ProxyApplier(rpc).apply([record("aughost", "sip:aughost@198.51.100.66:5060"), record("au2", uri(2), ttl=20)])
        standby._next_audit = 0
        said = ""
        deadline = time.monotonic() + 20
        while "standby audit repaired" not in said and time.monotonic() < deadline:
            said = standby.tick() or ""
            time.sleep(0.05)
        assert "standby audit repaired the local proxy" in said and "refreshed 1" in said, said
        assert bindings(rpc, "au1") == {uri(1)} and bindings(rpc, "aughost") == set()
        left = json.dumps(rpc.call("ul.lookup", "location", "au2"))
        assert int(left.split('"Expires": ')[1].split(",")[0]) > 500, left
        # In step now: the next audit finds nothing to do.
        standby._next_audit = 0
        deadline = time.monotonic() + 20
        while standby.audit_runs < 2 and time.monotonic() < deadline:
            assert "repaired" not in (standby.tick() or "")
            time.sleep(0.05)
        assert standby.audit_runs == 2 and "store 5: added 0, refreshed 0, removed 0" in standby.status()["last_audit"]
        # A change the watch itself missed (its view lacks au3, and so does the proxy): the proxy-vs-view half
        # cannot see it; two audits running that find the view disagreeing with the store have the watch read it.
        rep = standby.replicator
        watch = rep._watch  # type: ignore[attr-defined]
        watch._records.pop(writer.contact_path("au3", uri(3)))
        rpc.call("ul.rm_contact", "location", "au3", uri(3))
        deadline = time.monotonic() + 30
        while rep.stats.view_repairs == 0 and time.monotonic() < deadline:
            standby._next_audit = 0
            standby.tick()
            time.sleep(0.05)
        assert rep.stats.view_repairs == 1
        wait_for(lambda: bindings(rpc, "au3") == {uri(3)})
        # The freshness guard reads when the binding was last changed (Last-Modified or Last-Keepalive).
        (b,) = [b for k, b in proxytable.dump(proxy.rpc_sock).items() if k == ("au1", uri(1))]
        assert abs(b.record.ts_ms / 1000 - time.time()) < 60, b
    finally:
        standby.close()
        srpc.close()
        sclient.stop()
        sclient.close()
