"""What a node's coordinator does with its proxy's events before it knows it is active (real 3-member ensemble).

The VIP lands on the new active before its once-a-second role check promotes it; the BYEs of the calls that
outlived the failover arrive in that window (seen in the lab: 200 BYEs 0.1 s after the VIP answered). Those
dialog events are held and written at the promotion; nothing else could bring their CDRs back (reconciliation
repairs bindings only).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import conftest_zk
import pytest
from conftest_zk import connect, contact, dialog
from kazoo.client import KazooClient

from ha.coordinator.events import ContactEvent
from ha.coordinator.journal import Journal
from ha.coordinator.replication import Replication
from ha.coordinator.store import ZkStore

zk_ensemble = conftest_zk.zk_ensemble
zk_client = conftest_zk.zk_client


def _close(r: Replication, *clients: KazooClient) -> None:
    r.close()
    for c in clients:
        c.stop()
        c.close()


def test_a_bye_before_the_promotion_is_billed_at_it(zk_ensemble: conftest_zk.Ensemble, tmp_path: Path) -> None:
    cluster = f"t{uuid.uuid4().hex[:8]}"
    client = connect(zk_ensemble)
    r = Replication(ZkStore(client, cluster, "node2"), "node2", Journal(tmp_path / "j.jsonl"))
    try:
        old = ZkStore(client, cluster, "node1")  # the old active wrote the confirmed call
        old.ensure_layout()
        old.bump_epoch()
        old.write([dialog(1, "held@x", from_tag="caller", to_tag="callee", created_ms=1764014460123)])
        r.start()
        # node2 is not active yet: its proxy relays the BYE of a dialog it never saw (the template's known=false).
        bye = dialog(1, "held@x", "end", node="node2", known=False, from_tag="callee", to_tag="caller",
                     created_ms=0, start_ts=0)  # fmt: skip
        reg = contact(2, "late", node="node2")  # a binding: written where nothing newer is (see the test below)
        for ev in (bye, reg):
            r.feed(json.dumps(ev.to_json()).encode())
        assert "not the writer" in (r.flush() or "") and r.store.cdrs() == ()
        said = r.promote()
        assert "1 dialog events from before the promotion" in said, said
        (cdr,) = r.store.cdrs()
        assert (cdr.callid, cdr.created_ms, cdr.start_ts, cdr.reason) == ("held@x", 1764014460123, 1764014461, "end")
        assert r.store.snapshot().dialogs == ()
        assert r.status()["carried_over"] == 1 and r.reconcile_due is not None
        # Once active, nothing is held: a second promotion writes nothing again.
        r.demote()
        assert "from before the promotion" not in r.promote()
        assert len(r.store.cdrs()) == 1
    finally:
        r.close()
        client.stop()
        client.close()


@contextlib.contextmanager
def active_node1(zk_ensemble: conftest_zk.Ensemble, tmp_path: Path) -> Iterator[Replication]:
    """node1's replication in a fresh cluster, started and promoted (epoch 1); closed afterwards."""
    client = connect(zk_ensemble)
    r = Replication(ZkStore(client, f"t{uuid.uuid4().hex[:8]}", "node1"), "node1", Journal(tmp_path / "j.jsonl"))
    try:
        r.start()
        r.promote()
        yield r
    finally:
        r.close()
        client.stop()
        client.close()


def _wait_said(r: Replication, what: str, timeout: float = 20.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        said = r.tick() or ""
        if what in said:
            return said
        time.sleep(0.05)
    raise AssertionError(f"never said {what!r}")


def test_a_fenced_active_still_writes_what_its_proxy_accepted_before_the_takeover(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path
) -> None:
    """The lab's 10k case: the VIP moved during a REGISTER burst and the old active's unwritten events (its proxy
    had answered 200) were rejected by the new epoch; those phones were registered on the old proxy only."""
    with active_node1(zk_ensemble, tmp_path) as old:
        import time

        early = int(time.time() * 1000) - 5000  # well before the takeover below
        for i, aor in enumerate(("refreshed", "unreg"), 1):
            old.feed(json.dumps(contact(i, aor, ts=early).to_json()).encode())
        old.flush()
        new = ZkStore(old.store.client, old.store.root.removeprefix("/sipha/"), "node2")
        new.bump_epoch()  # the takeover, at T
        t = new.takeover_ms()
        assert t > 0
        new.write([contact(1, "refreshed", node="node2", ts=t + 1000, cseq=99)])  # the phone re-registered there
        before, after = t - 500, t + 500
        events = [
            contact(3, "burst1", ts=before), contact(4, "burst2", ts=before),
            contact(5, "refreshed", "sip:refreshed@198.51.100.50:5062", "update", ts=before, cseq=50),
            contact(6, "unreg", kind="delete", ts=before),
            contact(7, "after", ts=after),  # accepted after the takeover: stays fenced
        ]  # fmt: skip
        for ev in events:
            old.feed(json.dumps(ev.to_json()).encode())
        assert "FENCED" in (old.flush() or "")
        said = _wait_said(old, "written unfenced")
        assert "3 bindings written" in said and "1 events from after the takeover not written" in said, said
        got = {r.aor: (r.node, r.cseq) for r in new.snapshot().contacts}
        assert got == {"burst1": ("node1", 3), "burst2": ("node1", 4), "refreshed": ("node2", 99)}
        assert old.status()["late_written"] == 3 and old.status()["fenced"] == 1


def test_a_demoted_active_writes_its_pending_events_before_it_stops(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path
) -> None:
    with active_node1(zk_ensemble, tmp_path) as r:
        r.feed(json.dumps(contact(1, "pending").to_json()).encode())  # fed, not flushed yet
        said = r.demote()
        assert "last events: wrote 1 events" in said, said
        assert [c.aor for c in r.store.snapshot().contacts] == ["pending"]


def test_a_standbys_own_registers_reach_the_store_where_nothing_newer_is(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path
) -> None:
    """The VIP left node2 but phones' ARP entries still sent REGISTERs there for a moment; its proxy answered them
    200 and the coordinator, no longer the writer, dropped them (2736 phones of the lab's 10k burst)."""
    import time

    with active_node1(zk_ensemble, tmp_path) as active:
        cluster = active.store.root.removeprefix("/sipha/")
        now = int(time.time() * 1000)
        active.store.write([contact(1, "fresh", node="node1", ts=now + 5000)])  # newer than node2's below
        client = connect(zk_ensemble)
        standby = Replication(ZkStore(client, cluster, "node2"), "node2", Journal(tmp_path / "s.jsonl"))
        try:
            standby.start()
            for ev in [
                contact(1, "late1", node="node2", ts=now), contact(2, "late2", node="node2", ts=now),
                contact(3, "fresh", node="node2", ts=now),  # older than the store's: left alone
                contact(4, "gone", "sip:gone@198.51.100.50:5062", "expired", node="node2", ts=now),  # the GC's
            ]:  # fmt: skip
                standby.feed(json.dumps(ev.to_json()).encode())
            assert "not the writer" in (standby.flush() or "")
            said = _wait_said(standby, "written unfenced")
            assert "2 bindings written, 1 left to newer data" in said, said
            got = {r.aor: r.node for r in active.store.snapshot().contacts}
            assert got == {"late1": "node2", "late2": "node2", "fresh": "node1"}
        finally:
            standby.close()
            client.stop()
            client.close()


def test_reordered_events_do_not_reconcile_and_a_demotion_abandons_a_reconciliation_in_flight(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path
) -> None:
    """Two findings of the replication bench: (1) every reordering between the proxy's SIP workers counted as a
    gap and scheduled a full reconciliation, which ran back to back under load; (2) a reconciliation whose dump
    was in flight across a demotion and re-promotion was diffed with the bindings touched meanwhile forgotten,
    and deleted 16k live bindings from the store. The proxy's table is a counted stand-in here; the lab tests
    reconcile against the real one."""
    import threading
    import time

    from ha.coordinator.proxytable import ProxyBinding

    dumps: list[float] = []
    release = threading.Event()

    def dump_table() -> dict[tuple[str, str], ProxyBinding]:
        dumps.append(time.monotonic())
        if len(dumps) == 1:
            release.wait(10)
            return {}  # the stale read: diffed after the re-promotion, it would delete every binding
        return {(rec.aor, rec.contact): ProxyBinding(rec, pushed=False) for rec in r.store.snapshot().contacts}

    client = connect(zk_ensemble)
    r = Replication(ZkStore(client, f"t{uuid.uuid4().hex[:8]}", "node1"), "node1", Journal(tmp_path / "j.jsonl"),
                    dump_table=dump_table, reconcile_delay_s=0.0)  # fmt: skip
    try:
        r.start()
        r.promote()
        r.reconcile_due = None  # the promotion's own reconciliation is not what this test is about
        r._reconcile_forced = False
        for seq in (1, 3, 2):  # 2 arrives after 3: a gap, then filled
            r.feed(json.dumps(contact(seq, f"ro{seq}").to_json()).encode())
        r.flush()
        assert "reconcile not needed" in (r.tick() or "") and dumps == []
        r.feed(json.dumps(contact(5, "ro5").to_json()).encode())  # 4 never comes
        r.flush()
        assert "reconcile: reading" in (r.tick() or "") and len(dumps) == 1
        r.demote()
        r.promote()  # re-promoted while the dump is still being read
        release.set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # at no moment may the stale read remove what the proxy holds
            r.tick()
            assert {c.aor for c in r.store.snapshot().contacts} >= {"ro1", "ro2", "ro3", "ro5"}
            time.sleep(0.02)
        assert r.reconcile_runs >= 1  # the re-promotion's own reconciliation ran, from a fresh read
    finally:
        release.set()
        r.close()
        client.stop()
        client.close()


def test_a_demotion_writes_the_reconciliations_additions_it_had_not_written_yet(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path
) -> None:
    """A clean-clone CI run: the active's reconciliation found 4 bindings its proxy held and the store lacked
    (events lost at the intake), the VIP moved before it wrote them, the demotion dropped the repairs, and the
    standby audit then removed them from that proxy too: 4 of 10k phones gone. The additions must be written
    (where nothing newer is stored) at the demotion."""
    import time

    from ha.coordinator.proxytable import ProxyBinding
    from ha.coordinator.store import ContactRecord

    cluster = f"t{uuid.uuid4().hex[:8]}"
    lost = ContactRecord.from_event(contact(9, "lost1"), 0)
    client, other = connect(zk_ensemble), connect(zk_ensemble)
    r = Replication(ZkStore(client, cluster, "node1"), "node1", Journal(tmp_path / "j.jsonl"),
                    dump_table=lambda: {(lost.aor, lost.contact): ProxyBinding(lost, pushed=False)},
                    reconcile_delay_s=0.0)  # fmt: skip
    try:
        r.start()
        r.promote()
        deadline = time.monotonic() + 10
        while "repairs to write" not in (r.tick() or "") and time.monotonic() < deadline:  # bounded
            time.sleep(0.05)
        assert r.status()["repairs_left"] == 1, r.status()
        new_active = ZkStore(other, cluster, "node2")
        new_active.bump_epoch()  # node2 takes over before node1 wrote its repair
        said = r.demote()
        assert "1 reconciliation repairs" in said, said
        while "lost1" not in {c.aor for c in new_active.snapshot().contacts} and time.monotonic() < deadline:
            r.tick()
            time.sleep(0.05)
        assert "lost1" in {c.aor for c in new_active.snapshot().contacts}
    finally:
        _close(r, client, other)


def test_a_reconciliation_leaves_what_changed_in_the_proxy_since_its_dump(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path
) -> None:
    """A clean-clone CI run's overload: the active's dump was read 11 s before the store; meanwhile the replicator
    applied a peer's deletes to the proxy (phones un-registered at the peer while the VIP was there). Diffed
    against the newer store, the dump's stale copies looked like bindings the store had lost: written back, they
    stayed in ZooKeeper and the standby and never came back to the active proxy (59 bindings, for good). The
    mirror case deleted a peer's new binding from the store. A second look at those AoRs, after the dump, must
    leave both alone."""
    import time

    from ha.coordinator.proxytable import ProxyBinding
    from ha.coordinator.store import ContactRecord

    cluster = f"t{uuid.uuid4().hex[:8]}"
    old_ms = (int(time.time()) - 60) * 1000  # written long before the dump: not spared as "recent"
    gone = ContactRecord.from_event(contact(7, "unregd", node="node2", ts=old_ms), 0)  # the peer deleted it
    fresh = ContactRecord.from_event(contact(8, "newreg", node="node2", ts=old_ms), 0)  # the peer registered it
    kept = ContactRecord.from_event(contact(9, "lostev", ts=old_ms), 0)  # its event was lost: a real repair
    first = {(r.aor, r.contact): ProxyBinding(r, pushed=r is gone) for r in (gone, kept)}
    second = {(r.aor, r.contact): ProxyBinding(r, pushed=r is fresh) for r in (fresh, kept)}
    looked: list[set[str]] = []

    def lookup(aors: object) -> dict[tuple[str, str], ProxyBinding]:
        looked.append(set(aors))  # type: ignore[call-overload]
        return {k: v for k, v in second.items() if k[0] in looked[-1]}

    client, peer_client = connect(zk_ensemble), connect(zk_ensemble)
    r = Replication(ZkStore(client, cluster, "node1"), "node1", Journal(tmp_path / "j.jsonl"),
                    dump_table=lambda: first, lookup_table=lookup, reconcile_delay_s=0.0)  # fmt: skip
    try:
        peer = ZkStore(peer_client, cluster, "node2")
        peer.ensure_layout()
        peer.bump_epoch()
        peer.write([contact(8, "newreg", node="node2", ts=old_ms)])
        r.start()
        r.promote()
        deadline = time.monotonic() + 10
        said = ""
        while "reconciled" not in said and time.monotonic() < deadline:  # bounded
            said = r.tick() or ""
            time.sleep(0.05)
        assert "2 changed in the proxy since its dump" in said, said
        assert looked == [{"unregd", "newreg", "lostev"}]
        assert {c.aor for c in r.store.snapshot().contacts} == {"newreg", "lostev"}
    finally:
        _close(r, client, peer_client)


def test_a_promotion_takes_over_this_proxys_unfenced_writes_not_started_yet(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path
) -> None:
    """A lab overload with 3 VIP moves: a REGISTER this proxy answered while standby waited 30 s for its unfenced
    write (queued behind a reconciliation's reads); meanwhile the node was promoted again and the phone's
    un-REGISTER deleted the binding. The late write then found nothing newer and brought it back: 61 bindings
    in ZooKeeper and the standby that no proxy of the phones' choosing held. At the promotion, writes not started
    yet are taken over as ordinary events, in order, before what the proxy sends next."""
    import threading

    client = connect(zk_ensemble)
    r = Replication(ZkStore(client, f"t{uuid.uuid4().hex[:8]}", "node1"), "node1", Journal(tmp_path / "j.jsonl"))
    busy = threading.Event()
    try:
        r.start()
        r.store.bump_epoch()  # another node is active (this one is not)
        r._writer().submit(busy.wait, 10)  # the write thread is busy: what follows waits its turn
        r.feed(json.dumps(contact(1, "standbyreg", node="node1").to_json()).encode())
        assert "not the writer" in (r.flush() or "")
        r.promote()
        assert [ev.aor for ev in r.pending if isinstance(ev, ContactEvent)] == ["standbyreg"]
        r.feed(json.dumps(contact(2, "standbyreg", kind="delete", node="node1").to_json()).encode())
        r.flush()
        busy.set()
        assert r.store.snapshot().contacts == ()  # the un-REGISTER is the last word
        assert r._late == []
    finally:
        busy.set()
        r.close()
        client.stop()
        client.close()


def test_bindings_events_changed_during_a_reconciliation_are_verified_after_it(
    zk_ensemble: conftest_zk.Ensemble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lab overload without a single VIP move ended with one binding in ZooKeeper and the standby but not in
    the active proxy, for good: a reconciliation leaves the bindings events change while it runs to those events,
    and when an event of such a binding was lost, nothing compared it again. Now they are compared alone (their
    AoRs looked up, their znodes read) a moment after. Here the proxy never held the binding its event wrote (its
    un-REGISTER's event was lost), and the stand-in proxy answers dump and lookups alike."""
    import threading
    import time

    import ha.coordinator.replication as replication
    from ha.coordinator.proxytable import ProxyBinding

    monkeypatch.setattr(replication, "VERIFY_AFTER_S", 0.2)
    release = threading.Event()
    dumps: list[int] = []

    def dump_table() -> dict[tuple[str, str], ProxyBinding]:
        dumps.append(1)
        release.wait(10)
        return {}

    looked: list[set[str]] = []

    def lookup(aors: object) -> dict[tuple[str, str], ProxyBinding]:
        looked.append(set(aors))  # type: ignore[call-overload]
        return {}

    client = connect(zk_ensemble)
    r = Replication(ZkStore(client, f"t{uuid.uuid4().hex[:8]}", "node1"), "node1", Journal(tmp_path / "j.jsonl"),
                    dump_table=dump_table, lookup_table=lookup, reconcile_delay_s=0.0)  # fmt: skip
    try:
        r.start()
        r.promote()
        deadline = time.monotonic() + 10
        while not dumps and time.monotonic() < deadline:  # bounded: the promotion's reconciliation starts
            r.tick()
            time.sleep(0.02)
        r.feed(json.dumps(contact(1, "ghost").to_json()).encode())  # during the dump: left to this event
        r.flush()
        assert {c.aor for c in r.store.snapshot().contacts} == {"ghost"}
        release.set()
        said = ""
        while "verified" not in said and time.monotonic() < deadline:
            said = r.tick() or ""
            time.sleep(0.02)
        assert "verified 1 bindings" in said, said
        while "removed 1" not in said and r.store.snapshot().contacts and time.monotonic() < deadline:
            said = r.tick() or said
            time.sleep(0.02)
        assert r.store.snapshot().contacts == () and looked == [{"ghost"}, {"ghost"}]  # the read, the second look
    finally:
        release.set()
        r.close()
        client.stop()
        client.close()
