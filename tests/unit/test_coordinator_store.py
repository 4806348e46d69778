"""ha.coordinator.store and .journal against a real 3-member ZooKeeper ensemble on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import conftest_zk
import pytest
from conftest_zk import connect, contact, dialog, fold
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from ha.coordinator.events import Event
from ha.coordinator.journal import BufferedWriter, Journal, JournalFull
from ha.coordinator.replication import Replication
from ha.coordinator.store import Change, StaleEpoch, ZkStore
from ha.zk_testing import Ensemble, credential_kwargs

zk_ensemble = conftest_zk.zk_ensemble
zk_client = conftest_zk.zk_client


@pytest.fixture
def cluster() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(zk_client: KazooClient, cluster: str) -> Iterator[ZkStore]:
    s = ZkStore(zk_client, cluster, "node1")
    s.ensure_layout()
    s.bump_epoch()
    yield s
    s.release_gc_lock()


def state_of(s: ZkStore) -> dict[tuple[str, str], tuple[int, str, int]]:
    return {(r.aor, r.contact): (r.expires_at, r.callid, r.cseq) for r in s.snapshot().contacts}


def test_batched_writes_land_and_are_stamped(store: ZkStore) -> None:
    events: list[Event] = [contact(i, f"user{i}") for i in range(1, 1001)]
    result = store.write(events)
    assert result.transactions == 11  # 99 changes + the epoch check per transaction
    snap = store.snapshot()
    assert len(snap.contacts) == 1000 and snap.epoch == store.epoch == 1
    assert state_of(store) == fold(events)
    assert {(r.node, r.epoch) for r in snap.contacts} == {("node1", 1)}
    store._multiread = False  # the one-request-per-znode path (servers before 3.6) reads the same state
    assert store.snapshot() == snap


def test_insert_update_delete_in_one_batch_and_replay_is_idempotent(store: ZkStore) -> None:
    events: list[Event] = [
        contact(1, "alice", "sip:alice@a"),
        contact(2, "alice", "sip:alice@b"),
        contact(3, "alice", "sip:alice@a", "update", ttl=60),
        contact(4, "alice", "sip:alice@b", "delete"),
        contact(5, "bob/with,odd%chars", "sip:bob@c"),
        contact(6, "carol", "sip:carol@d", "delete"),  # delete of a binding never stored: a no-op
    ]
    store.write(events)
    assert state_of(store) == fold(events)
    # A journal replay writes the same events again (an unknown outcome is retried): same state, no error.
    store._known = set()  # a writer that lost its index (e.g. reconnected): every put starts as a create
    again = store.write(events)
    assert again.retries >= 1
    assert state_of(store) == fold(events)
    assert {r.aor for r in store.snapshot().contacts} == {"alice", "bob/with,odd%chars"}


def test_stale_epoch_writer_is_rejected_atomically(zk_client: KazooClient, store: ZkStore, cluster: str) -> None:
    store.write([contact(1, "before")])
    other = ZkStore(zk_client, cluster, "node2")
    assert other.bump_epoch() == store.epoch + 1  # node2 takes over
    doomed: list[Event] = [contact(i, f"stale{i}") for i in range(2, 300)]  # three transactions
    with pytest.raises(StaleEpoch):
        store.write(doomed)
    assert state_of(store) == fold([contact(1, "before")])  # not one of the old active's writes landed
    other.write([contact(1, "after", node="node2")])
    assert {r.aor: r.epoch for r in other.snapshot().contacts} == {"before": 1, "after": 2}


def test_a_takeover_forgets_the_writer_index_so_peer_writes_can_be_deleted(
    zk_client: KazooClient, store: ZkStore, cluster: str
) -> None:
    """Bug A of the drills: node2 had written once (its index of existing znodes loaded), node1 then took over
    and stored new bindings, node2 took over again and an un-REGISTER's delete was skipped as "not there"."""
    other = ZkStore(zk_client, cluster, "node2")
    other.bump_epoch()
    other.write([contact(1, "early", node="node2")])  # node2's index: {early}
    store.bump_epoch()
    store.write([contact(1, "phone"), dialog(2, "call-9@x")])  # made by node1, unknown to node2's index
    other.bump_epoch()
    other.write([contact(2, "phone", kind="delete", node="node2"), dialog(3, "call-9@x", "end", node="node2")])
    assert {r.aor for r in store.snapshot().contacts} == {"early"}
    assert store.snapshot().dialogs == ()
    assert [c.callid for c in store.cdrs()] == ["call-9@x"]
    store.adopt_epoch()  # adopting (a standby following the epoch) forgets the index too
    assert store._known is None


def test_a_delete_is_sent_even_when_the_writer_index_does_not_list_the_binding(store: ZkStore) -> None:
    """The index of existing znodes is a belief: a binding written outside it (here the late-write path, which
    does not maintain it) must still be deleted by the un-REGISTER, not skipped as "not there"."""
    store.write([contact(1, "listed")])  # the index is loaded
    late = store.write_if_newer([contact(2, "phone")])
    assert late.written == 1 and store._known is not None
    assert store.contact_path("phone", "sip:phone@198.51.100.50:5062") not in store._known
    res = store.write([contact(3, "phone", kind="delete"), contact(4, "never", kind="delete")])
    assert {r.aor for r in store.snapshot().contacts} == {"listed"}
    assert res.transactions == 2  # each delete of an unlisted znode alone; the one really gone fails only itself
    store.write([contact(5, "listed", kind="delete")])
    assert store.snapshot().contacts == ()


def test_dialog_start_then_end_leaves_a_cdr(store: ZkStore) -> None:
    store.write([dialog(1, "call-1@x"), dialog(2, "call-2@x", "start")])
    assert {d.callid for d in store.snapshot().dialogs} == {"call-1@x", "call-2@x"}
    store.write([dialog(3, "call-1@x", "end"), dialog(4, "call-3@x", "failed", start_ts=0, to_tag="")])
    assert {d.callid for d in store.snapshot().dialogs} == {"call-2@x"}
    cdrs = store.cdrs()
    assert [(c.callid, c.reason) for c in cdrs] == [("call-1@x", "end"), ("call-3@x", "failed")]
    assert cdrs[0].created_ms == 1764014460123 and cdrs[0].start_ts == 1764014461


def test_gc_from_the_watchs_view_deletes_only_what_it_saw_expired(store: ZkStore) -> None:
    now = int(time.time())
    store.write([contact(1, "live", ttl=3600), contact(2, "dead", expires_at=now - 120),
                 contact(3, "refreshed", expires_at=now - 120), contact(4, "unseen", expires_at=now - 120)])
    paths = [store.contact_path(a, f"sip:{a}@198.51.100.50:5062") for a in ("live", "dead", "refreshed")]
    view = {p: r for p, r in store._read_records(paths).items() if r is not None}
    assert len(view) == 3, view  # the watch had not seen "unseen" yet
    store.write([contact(5, "refreshed", kind="update", ttl=3600)])  # the phone re-registered since the view
    assert store.gc_expired(view=view) == 1  # "dead" only: "refreshed" changed version, "unseen" waits
    assert {r.aor for r in store.snapshot().contacts} == {"live", "refreshed", "unseen"}
    assert store.gc_expired() == 1  # without a view the store is read: "unseen" goes


def test_gc_removes_expired_only_on_the_lock_holder(zk_ensemble: Ensemble, store: ZkStore, cluster: str) -> None:
    now = int(time.time())
    store.write(
        [
            contact(1, "live", ttl=3600),
            contact(2, "dead1", expires_at=now - 120),
            contact(3, "dead2", expires_at=now - 90),
        ]
    )
    other_client = connect(zk_ensemble)
    try:
        other = ZkStore(other_client, cluster, "node2")
        assert store.gc_expired() == 2  # node1 takes the lock first
        store.write([contact(4, "dead3", expires_at=now - 100)])
        assert other.gc_expired() == 0  # node2 does not hold the lock
        assert store.gc_expired() == 1
        assert {r.aor for r in store.snapshot().contacts} == {"live"}
        # A write after GC must not trust the deleted paths: an update re-creates the binding.
        store.write([contact(5, "dead1", kind="update")])
        assert {r.aor for r in store.snapshot().contacts} == {"live", "dead1"}
    finally:
        other_client.stop()
        other_client.close()


def test_journal_is_bounded_and_round_trips(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl", max_bytes=4000, fsync="always")
    evs: list[Event] = [contact(i, f"u{i}") for i in range(1, 6)]
    j.append(evs)
    assert list(j.read()) == evs and len(j) == 5
    with pytest.raises(JournalFull, match="not buffered"):
        j.append([contact(i, f"v{i}") for i in range(6, 20)])
    assert len(j) == 5  # all or none
    with (tmp_path / "j.jsonl").open("ab") as f:
        f.write(b'{"seq": 99, "node"')  # a crash mid-append leaves a torn line
    assert list(j.read()) == evs
    j.clear()
    assert not j and list(j.read()) == []


def test_journal_buffers_while_quorum_is_lost_then_replays(zk_ensemble: Ensemble, tmp_path: Path, cluster: str) -> None:
    client = connect(zk_ensemble)
    try:
        s = ZkStore(client, cluster, "node1", op_timeout_s=3.0)
        s.ensure_layout()
        s.bump_epoch()
        writer = BufferedWriter(s, Journal(tmp_path / "journal.jsonl", fsync="always"))
        all_events: list[Event] = []

        def send(evs: list[Event]) -> str:
            all_events.extend(evs)
            return writer.write(evs).message

        seq = iter(range(1, 100000))
        assert send([contact(next(seq), f"a{i}") for i in range(300)]).startswith("wrote 300")
        # Lose quorum: kill two of three members (by pid); the survivor stops serving clients.
        zk_ensemble.stop_member(1)
        zk_ensemble.stop_member(2)
        try:
            batches = [
                [contact(next(seq), f"b{i}") for i in range(200)],
                [contact(next(seq), f"a{i}", kind="delete") for i in range(0, 300, 3)],
                [contact(next(seq), f"a{i}", kind="update", ttl=120) for i in range(1, 300, 3)],
                [contact(next(seq), f"b{i}", kind="delete") for i in range(0, 200, 2)],
            ]
            messages = [send(b) for b in batches]
            assert all("journaled" in m for m in messages), messages
            assert len(writer.journal) == sum(len(b) for b in batches)
        finally:
            zk_ensemble.start_member(1)
            zk_ensemble.start_member(2)
        zk_ensemble.wait_serving(90)
        deadline = time.monotonic() + 30
        while not s.available and time.monotonic() < deadline:
            time.sleep(0.1)
        msg = send([contact(next(seq), "c-after")])
        assert f"after replaying {sum(len(b) for b in batches)} from the journal" in msg, msg
        assert not writer.journal
        assert state_of(s) == fold(all_events)  # nothing lost, nothing resurrected
        assert len(fold(all_events)) == 300 - 100 + 200 - 100 + 1
    finally:
        client.stop()
        client.close()


def test_watch_reports_changes_and_resyncs_after_a_lost_session(
    zk_ensemble: Ensemble, store: ZkStore, cluster: str
) -> None:
    store.write([contact(i, f"w{i}") for i in range(1, 51)])
    client = connect(zk_ensemble)
    seen: list[Change] = []
    lock = threading.Lock()

    def on_changes(changes: list[Change]) -> None:
        with lock:
            seen.extend(changes)

    def wait(pred: Callable[[list[Change]], bool]) -> list[Change]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if pred(seen):
                    return list(seen)
            time.sleep(0.05)
        raise AssertionError(f"watch saw {len(seen)} changes")

    watch = ZkStore(client, cluster, "node2").watch_contacts(on_changes)
    try:
        first = wait(lambda s: len(s) >= 50)
        assert {(c.kind, c.resync) for c in first} == {("put", True)}
        seen.clear()
        store.write([contact(60, "w1", kind="update", ttl=99), contact(61, "w2", kind="delete"), contact(62, "new")])
        live = wait(lambda s: len(s) >= 3)
        assert sorted((c.kind, c.record.aor, c.resync) for c in live) == [
            ("delete", "w2", False),
            ("put", "new", False),
            ("put", "w1", False),
        ]
        # Expire the watcher's session (a second client with the same session id closes it), change the
        # store meanwhile: the watcher must notice on the new session by reading everything again.
        seen.clear()
        twin = KazooClient(hosts=zk_ensemble.hosts, client_id=client.client_id, **credential_kwargs())
        twin.start(10)
        twin.stop()
        twin.close()
        store.write([contact(70, "w3", kind="delete"), contact(71, "during")])
        resynced = wait(lambda s: any(c.record.aor == "during" for c in s) and any(c.record.aor == "w3" for c in s))
        assert all(c.resync for c in resynced)
        assert ("delete", "w3") in {(c.kind, c.record.aor) for c in resynced}
    finally:
        watch.stop()
        client.stop()
        client.close()


def _tick_until(r: Replication, text: str, timeout: float = 10.0) -> str:
    """Tick until a tick says ``text`` (the GC runs on the worker thread: its outcome comes a tick later)."""
    deadline, said = time.monotonic() + timeout, ""
    while text not in said and time.monotonic() < deadline:
        said = r.tick() or ""
        if text not in said:
            time.sleep(0.05)
    return said


class _ProxyDown:
    """The local proxy's RPC, not answering (so the first resync cannot complete)."""

    def call_many(self, calls: list[tuple[str, list[object]]], window: int = 64) -> list[object]:
        raise RuntimeError("proxy down")


def test_the_first_collection_waits_for_the_first_resync(
    zk_ensemble: Ensemble, tmp_path: Path, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node start's resync is what readiness waits for; the collection's whole-store read must not compete."""
    from ha.coordinator import replication
    from ha.coordinator.apply import ProxyApplier

    client = connect(zk_ensemble)
    writer = ZkStore(client, cluster, "node2")
    writer.ensure_layout()
    writer.bump_epoch()
    # An expired binding to collect, and a peer's live one for the resync to push (it cannot: the proxy is down).
    writer.write([contact(1, "dead", expires_at=int(time.time()) - 100), contact(2, "live", node="node2")])
    r = Replication(ZkStore(client, cluster, "node1"), "node1", Journal(tmp_path / "j.jsonl"),
                    ProxyApplier(_ProxyDown()), gc_interval_s=0)  # type: ignore[arg-type]
    try:
        r.start()
        assert r.replicator is not None
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            said = r.tick() or ""
            assert "collected" not in said, (r.ready, r.replicator.last_status, r.replicator.synced.is_set())
            time.sleep(0.05)
        assert not r.ready and r.gc_deleted == 0
        r.replicator.synced.set()  # the resync completed
        assert "collected 1 expired bindings" in _tick_until(r, "collected")
        # Without a resync ever completing, only until GC_WAITS_FOR_RESYNC_S after the start.
        r.replicator.synced.clear()
        writer.write([contact(3, "dead2", expires_at=int(time.time()) - 100)])
        monkeypatch.setattr(replication, "GC_WAITS_FOR_RESYNC_S", 0.0)
        assert "collected 1 expired bindings" in _tick_until(r, "collected")
    finally:
        r.close()
        client.stop()
        client.close()


def test_replication_journals_drops_when_full_replays_on_tick_and_collects(
    zk_ensemble: Ensemble, tmp_path: Path, cluster: str
) -> None:
    client = connect(zk_ensemble)
    r = Replication(
        ZkStore(client, cluster, "node1"), "node1", Journal(tmp_path / "j.jsonl", max_bytes=30000), gc_interval_s=0
    )
    try:
        r.start()
        r.promote()
        now = int(time.time())
        for ev in (contact(1, "live"), contact(2, "dead", expires_at=now - 100)):
            assert r.feed(json.dumps(ev.to_json()).encode()) is None
        assert r.flush() == "wrote 2 events"
        assert "collected 1 expired bindings" in _tick_until(r, "collected")
        client.stop()  # ZooKeeper out of reach, as far as this node can tell
        for seq in range(3, 23):
            r.feed(json.dumps(contact(seq, f"j{seq}").to_json()).encode())
        assert "journaled 20 events" in (r.flush() or "")
        for seq in range(23, 223):  # ~100 KB more than the journal may hold: dropped, counted, no crash
            r.feed(json.dumps(contact(seq, f"k{seq}").to_json()).encode())
        assert (r.flush() or "").startswith("DROPPED 200 events")
        assert r.status()["dropped"] == 200 and r.status()["zookeeper"] == "unavailable"
        client.start(timeout=20)
        assert "replayed 20 journaled events" in (r.tick() or "")
        assert {x.aor for x in r.store.snapshot().contacts} == {"live"} | {f"j{s}" for s in range(3, 23)}
        # The GC lock's ephemeral node went with the old session: this node must take it again, not just
        # believe it still holds it (and leave it to a second collector).
        r.feed(json.dumps(contact(300, "dead2", expires_at=now - 100).to_json()).encode())
        r.flush()
        assert "collected 1 expired bindings" in _tick_until(r, "collected")
        other_client = connect(zk_ensemble)
        try:
            assert not ZkStore(other_client, cluster, "node2").holds_gc_lock()
        finally:
            other_client.stop()
            other_client.close()
    finally:
        r.close()
        client.stop()
        client.close()


def test_bye_after_a_failover_closes_the_replicated_dialog_with_its_original_times(
    zk_client: KazooClient, store: ZkStore, cluster: str
) -> None:
    store.write([dialog(1, "call-fo@x", from_tag="caller", to_tag="callee", created_ms=1764014460123)])
    new_active = ZkStore(zk_client, cluster, "node2")
    new_active.bump_epoch()
    # The callee hangs up on node2, which never saw the INVITE: tags swapped, no times (template: known=false).
    bye = dialog(
        5, "call-fo@x", "end", node="node2", known=False, from_tag="callee", to_tag="caller", created_ms=0, start_ts=0
    )
    new_active.write([bye])
    assert new_active.snapshot().dialogs == ()
    (cdr,) = new_active.cdrs()
    assert (cdr.from_tag, cdr.to_tag, cdr.created_ms, cdr.start_ts) == ("caller", "callee", 1764014460123, 1764014461)
    assert (cdr.node, cdr.epoch, cdr.reason) == ("node2", 2, "end")


def test_watch_resync_misses_nothing_changed_while_its_watches_are_armed(
    zk_ensemble: Ensemble, store: ZkStore, cluster: str
) -> None:
    """The resync reads without watches (multiRead) and arms them afterwards, in chunks: what changes in
    between (refreshed, deleted, deleted and re-created) must still reach the watcher."""
    store.write([contact(i, f"arm{i}", ttl=600) for i in range(1, 6001)])
    first = threading.Event()
    seen: list[Change] = []

    def on_changes(changes: list[Change]) -> None:
        seen.extend(changes)
        first.set()

    client = connect(zk_ensemble)
    w = ZkStore(client, cluster, "node2").watch_contacts(on_changes)
    try:
        assert first.wait(30) and len(seen) == 6000
        # Straight after the resync was delivered, while (most) data watches are not armed yet:
        store.write(
            [contact(7000 + i, f"arm{i}", ttl=1200) for i in range(5990, 6001)]  # refreshed
            + [contact(8000 + i, f"arm{i}", kind="delete") for i in range(5980, 5990)]  # deleted
            + [contact(9000, "arm5979", kind="delete"), contact(9001, "arm5979", ttl=1800)]  # re-created
        )
        want = {(r.aor, r.contact): r.expires_at for r in store.snapshot().contacts}

        def view() -> dict[tuple[str, str], int]:
            return {(r.aor, r.contact): r.expires_at for r in w.records().values()}  # type: ignore[attr-defined]

        deadline = time.monotonic() + 30
        while view() != want and time.monotonic() < deadline:
            time.sleep(0.1)
        assert view() == want
        assert len(want) == 5990
    finally:
        w.stop()
        client.stop()
        client.close()


def test_watch_reports_a_binding_deleted_before_its_changed_data_was_read(
    zk_client: KazooClient, store: ZkStore, cluster: str
) -> None:
    """A data-changed event (a refresh) is processed after the binding was deleted, and the delete event comes
    after it: the read finds no node and must report the delete itself. Seen in the lab after a ZooKeeper
    outage (with per-binding watches then): the standby kept 25 deleted bindings and missed 19 re-created ones.
    Driven step by step (no worker thread) so the interleaving is exactly that one, against the real ensemble."""
    from ha.coordinator.store import _ZkContactWatch

    store.write([contact(1, "gone"), contact(2, "back"), contact(3, "stays")])
    w = _ZkContactWatch(ZkStore(zk_client, cluster, "node2"), lambda _c: None)
    assert {c.record.aor for c in w._process([("resync", "")])} == {"gone", "back", "stays"}
    gone, back = store.contact_path("gone", "sip:gone@198.51.100.50:5062"), store.contact_path(
        "back", "sip:back@198.51.100.50:5062")
    store.write([contact(4, "gone", kind="delete"), contact(5, "back", kind="delete")])
    # The refreshes' data events are processed only now, after the deletes.
    changes = w._process([("data", gone), ("data", back)])
    assert sorted((c.kind, c.record.aor) for c in changes) == [("delete", "back"), ("delete", "gone")]
    assert w._process([("deleted", gone), ("deleted", back)]) == []  # the late delete events: nothing more
    store.write([contact(6, "back", ttl=900)])  # re-registered: the same path again
    changes = w._process([("data", back)])  # its created event
    assert [(c.kind, c.record.aor) for c in changes] == [("put", "back")]
    # Deleted and created again within one batch of events: the binding as it is now.
    stays = store.contact_path("stays", "sip:stays@198.51.100.50:5062")
    assert [(c.kind, c.record.aor) for c in w._process([("deleted", stays), ("data", stays)])] == [
        ("delete", "stays"), ("put", "stays")]
    assert {r.aor for r in w._records.values()} == {"back", "stays"}


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_watch_delivers_changes_through_the_persistent_recursive_watch(
    zk_client: KazooClient, store: ZkStore, cluster: str
) -> None:
    """The real worker thread on the real ensemble: one addWatch on the subtree, then creates, refreshes and
    deletes written by another client arrive as changes, without a watch per binding."""
    got: list[Change] = []
    w = ZkStore(zk_client, cluster, "node2").watch_contacts(got.extend)
    try:
        store.write([contact(1, "a"), contact(2, "b")])
        wait_for(lambda: {c.record.aor for c in got if c.kind == "put"} >= {"a", "b"})
        got.clear()
        store.write([contact(3, "a", ttl=900), contact(4, "b", kind="delete"), contact(5, "c")])
        wait_for(lambda: {(c.kind, c.record.aor) for c in got} >= {("put", "a"), ("delete", "b"), ("put", "c")})
        assert next(c.record for c in got if c.kind == "put" and c.record.aor == "a").expires_at - time.time() < 1000
        records = w.records()
        assert records is not None and {r.aor for r in records.values()} == {"a", "c"}
        # Every notification counted and, once delivered, counted as processed (reconciliation waits on them):
        # 2 creates, then a refresh, a delete and a create.
        wait_for(lambda: w.processed == w.received)
        assert w.received >= 5, w.received
    finally:
        w.stop()


def test_watch_resync_forgets_a_binding_deleted_between_its_listing_and_its_read(
    zk_client: KazooClient, store: ZkStore, cluster: str
) -> None:
    """The resync lists the buckets, then reads the bindings: one un-registered in between and registered again
    under the same path must still read as new (seen in the lab's ZooKeeper outage: the standby missed 10
    bindings while the active replayed its journal). The interleaving is injected around the real read."""
    from ha.coordinator.store import _ZkContactWatch

    store.write([contact(1, "flip"), contact(2, "other")])
    w = _ZkContactWatch(ZkStore(zk_client, cluster, "node2"), lambda _c: None)
    real = w._read

    def racing(paths: list[str], known: object = None, kept: object = None) -> dict[str, object]:
        store.write([contact(3, "flip", kind="delete")])  # the un-REGISTER lands between listing and reading
        return real(paths, known, kept)  # type: ignore[arg-type,return-value]

    w._read = racing  # type: ignore[assignment,method-assign]
    assert {c.record.aor for c in w._process([("resync", "")])} == {"other"}
    w._read = real  # type: ignore[method-assign]
    store.write([contact(4, "flip")])  # and the REGISTER again, same path: its created event
    flip = store.contact_path("flip", "sip:flip@198.51.100.50:5062")
    assert [(c.kind, c.record.aor) for c in w._process([("data", flip)])] == [("put", "flip")]


def test_whole_store_reads_use_the_reader_connection_synced_and_fall_back_to_the_main_one(
    zk_ensemble: Ensemble, zk_client: KazooClient, cluster: str
) -> None:
    """Reconciliation, audit and GC read everything through ZkStore.reader (so the writes on the main connection
    do not queue behind ~250 multiReads); synced first, so a write just made on the main session is seen; and
    the main connection when the reader is not connected."""
    reader = connect(zk_ensemble)
    s = ZkStore(zk_client, cluster, "node1", reader=reader)
    s.ensure_layout()
    s.bump_epoch()
    calls: list[KazooClient] = []
    real = s._multi_read

    def spy(ops: list[tuple[int, str]], client: KazooClient | None = None) -> list[object]:
        calls.append(client or s.client)
        return real(ops, client)

    s._multi_read = spy  # type: ignore[assignment,method-assign]
    try:
        s.write([contact(1, "r1"), contact(2, "r2")])
        calls.clear()  # the writer's own index of znodes is read on the main session: only the snapshot here
        assert {r.aor for r in s.snapshot().contacts} == {"r1", "r2"}  # the main session's writes, seen at once
        assert calls and all(c is reader for c in calls)
        calls.clear()
        reader.stop()
        s.write([contact(3, "r3")])
        calls.clear()
        assert {r.aor for r in s.snapshot().contacts} == {"r1", "r2", "r3"}
        assert calls and all(c is zk_client for c in calls)
    finally:
        reader.stop()
        reader.close()


def test_the_watch_marks_this_nodes_own_deletes_one_per_delete_sent(
    zk_client: KazooClient, store: ZkStore, cluster: str
) -> None:
    """Deletes this node sends are counted, and each delete event takes one count: a replay that deleted,
    re-created and deleted a binding again must have both deletes seen as its own (a flag took the first and let
    the second look like a peer's, which removed the live binding from the node's own proxy). A peer's delete
    is not marked; a failed delete gives its count back."""
    got: list[Change] = []
    w = store.watch_contacts(got.extend)  # this node's own watch: it sees its own deletes
    peer = ZkStore(zk_client, cluster, "node2")
    peer.adopt_epoch()
    try:
        store.write([contact(1, "twice"), contact(2, "peers")])
        wait_for(lambda: {c.record.aor for c in got if c.kind == "put"} >= {"twice", "peers"})
        store.write([contact(3, "twice", kind="delete"), contact(4, "twice"), contact(5, "twice", kind="delete")])
        peer.write([contact(6, "peers", kind="delete", node="node2")])
        wait_for(lambda: w.processed == w.received and {c.record.aor for c in got if c.kind == "delete"} >=
                 {"twice", "peers"})  # fmt: skip
        deletes = {c.record.aor: c.by_self for c in got if c.kind == "delete"}
        assert deletes == {"twice": True, "peers": False}, deletes
        assert store._own_deletes == {}  # both counts taken by their events, none left to mislabel a later one
        path = store.contact_path("gone", "sip:gone@198.51.100.50:5062")
        store._deleting(path)
        store._deleting(path)
        assert [store.take_own_delete(path) for _ in range(3)] == [True, True, False]  # one per delete sent
        store._deleting(path)
        store._deleting(path, undo=True)  # the delete failed: nothing to wait for
        assert store._own_deletes == {} and not store.own_delete_pending(path)
    finally:
        w.stop()


def test_a_lean_multiread_gives_each_binding_its_data_and_mzxid(store: ZkStore) -> None:
    """The lean parse (data, version and mzxid, for a reader that compares mzxids) reads what the full one reads."""
    from ha.coordinator.store import _GET_DATA, _MultiRead

    store.write([contact(i, f"lean{i}") for i in range(1, 6)])
    store.write([contact(9, "lean3", kind="update")])  # one binding changed since: a newer mzxid
    paths = [store.contact_path(f"lean{i}", f"sip:lean{i}@198.51.100.50:5062") for i in range(1, 6)]
    full = store._multi_read([(_GET_DATA, p) for p in paths])
    a = store.client.handler.async_result()
    store.client._call(_MultiRead([(_GET_DATA, p) for p in paths], lean=True), a)
    lean = a.get(timeout=10)
    assert [(d, st.version, st.mzxid) for d, st in full] == lean
    assert lean[2][2] == max(z for *_, z in lean) and len({z for *_, z in lean}) == 2  # lean3's write is newer
    assert [v for _, v, _ in lean] == [0, 0, 1, 0, 0]
    # A binding gone between listing and reading: its error in the middle, and the reads after it still parsed.
    gone = store.contact_path("lean-gone", "sip:x@198.51.100.50:5062")
    a = store.client.handler.async_result()
    store.client._call(_MultiRead([(_GET_DATA, p) for p in [*paths[:2], gone, *paths[2:]]], lean=True), a)
    mixed = a.get(timeout=10)
    assert isinstance(mixed[2], NoNodeError) and mixed[:2] + mixed[3:] == lean


def test_an_unregister_after_the_takeover_is_not_undone_by_the_old_actives_late_register(
    store: ZkStore, zk_client: KazooClient, cluster: str
) -> None:
    """Before tombstones: the old active's last REGISTER (accepted before the takeover, written after it) created
    the binding again when the new active had deleted it on the phone's un-REGISTER; it then stayed registered in
    the store and both proxies until it expired. An expiry leaves no tombstone: a late refresh must beat it."""
    now = int(time.time() * 1000)
    store.write([contact(1, "unreg", ts=now - 9000), contact(2, "expires", ts=now - 9000)])
    old = ZkStore(zk_client, cluster, "node1")
    old.adopt_epoch()
    store.node = "node2"
    store.bump_epoch()  # the takeover
    t = store.takeover_ms()
    store.write([contact(3, "unreg", kind="delete", node="node2", ts=t + 100),
                 contact(4, "expires", kind="expired", node="node2", ts=t + 100)])  # fmt: skip
    tomb = json.loads(zk_client.get(store.tomb_path("unreg", "sip:unreg@198.51.100.50:5062"))[0])
    assert tomb["ts_ms"] == t + 100 and tomb["node"] == "node2"
    assert zk_client.exists(store.tomb_path("expires", "sip:expires@198.51.100.50:5062")) is None
    res = old.write_before_takeover([contact(5, "unreg", ts=t - 200), contact(6, "expires", ts=t - 200),
                                     contact(7, "fresh", ts=t - 200)])  # fmt: skip
    assert (res.unregistered, res.written) == (1, 2), str(res)
    assert "1 left un-registered" in str(res)
    assert set(state_of(store)) == {("expires", "sip:expires@198.51.100.50:5062"),
                                    ("fresh", "sip:fresh@198.51.100.50:5062")}  # fmt: skip
    # A REGISTER newer than the tombstone is a registration again (the standby's own proxy, unfenced).
    assert old.write_if_newer([contact(8, "unreg", ts=t + 200)]).written == 1
    assert ("unreg", "sip:unreg@198.51.100.50:5062") in state_of(store)
    # And the phone un-registers again: the tombstone is rewritten (it exists: create, then set).
    store.write([contact(9, "unreg", kind="delete", node="node2", ts=t + 300)])
    assert json.loads(zk_client.get(store.tomb_path("unreg", "sip:unreg@198.51.100.50:5062"))[0])["ts_ms"] == t + 300
    assert old.write_if_newer([contact(10, "unreg", ts=t + 250)]).unregistered == 1


def test_events_after_this_nodes_own_takeover_are_its_own_to_write(
    store: ZkStore, zk_client: KazooClient, cluster: str
) -> None:
    """A coordinator restarted with the journal of a ZooKeeper outage replays it before it has an epoch, which
    sends the events through write_before_takeover. When the current epoch is this node's own, nobody took over
    since: they are all its own to write (a lab run dropped 5866 of them as "from after the takeover")."""
    t = store.takeover_ms()  # node1's own epoch (the fixture's bump)
    restarted = ZkStore(zk_client, cluster, "node1")  # the same node's next coordinator: no epoch yet
    res = restarted.write_before_takeover([contact(1, "journaled", ts=t + 500)])
    assert (res.written, res.fenced) == (1, 0), str(res)
    assert ("journaled", "sip:journaled@198.51.100.50:5062") in state_of(store)
    peer = ZkStore(zk_client, cluster, "node2")
    peer.bump_epoch()  # a peer's takeover since: events after it stay fenced
    res = restarted.write_before_takeover([contact(2, "after", ts=peer.takeover_ms() + 500)])
    assert (res.written, res.fenced) == (0, 1), str(res)


def test_an_unregister_landing_between_the_late_read_and_its_write_wins(
    store: ZkStore, zk_client: KazooClient, cluster: str
) -> None:
    """The late write's create is one transaction with a test that no tombstone appeared since its read: the
    un-REGISTER written in between makes the round read again, and then it leaves the binding deleted."""
    now = int(time.time() * 1000)
    old = ZkStore(zk_client, cluster, "node1")
    old.adopt_epoch()
    uri = "sip:race@198.51.100.50:5062"
    real = old.client.transaction
    raced: list[int] = []

    def transaction() -> object:
        if not raced:  # the new active: the phone's REGISTER, then its un-REGISTER, both after the late read
            raced.append(1)
            store.write([contact(2, "race", uri, node="node2", ts=now + 10)])
            store.write([contact(3, "race", uri, kind="delete", node="node2", ts=now + 20)])
        return real()

    old.client.transaction = transaction  # type: ignore[method-assign]
    try:
        res = old.write_if_newer([contact(1, "race", uri, ts=now)])
    finally:
        old.client.transaction = real  # type: ignore[method-assign]
    assert raced and (res.written, res.unregistered) == (0, 1), str(res)
    assert ("race", uri) not in state_of(store)


def test_the_collector_deletes_tombstones_older_than_their_keep(store: ZkStore, zk_client: KazooClient) -> None:
    from ha.coordinator.store import TOMB_KEEP_S

    now = time.time()
    store.write([contact(1, "t-old", kind="delete", ts=int((now - TOMB_KEEP_S - 60) * 1000)),
                 contact(2, "t-young", kind="delete", ts=int((now - 60) * 1000))])  # fmt: skip
    assert store.gc_expired(now=now) == 0  # no bindings expired; the old tombstone goes
    assert zk_client.exists(store.tomb_path("t-old", "sip:t-old@198.51.100.50:5062")) is None
    assert zk_client.exists(store.tomb_path("t-young", "sip:t-young@198.51.100.50:5062")) is not None


def test_a_late_unregister_leaves_its_tombstone_too(store: ZkStore, zk_client: KazooClient, cluster: str) -> None:
    """The old active's un-REGISTER, written late, deletes the binding and leaves a tombstone as an ordinary one
    does; a still older late REGISTER of the same binding then stays out."""
    now = int(time.time() * 1000)
    uri = "sip:late-unreg@198.51.100.50:5062"
    store.write([contact(1, "late-unreg", uri, ts=now - 5000)])
    old = ZkStore(zk_client, cluster, "node1")
    old.adopt_epoch()
    res = old.write_if_newer([contact(2, "late-unreg", uri, kind="delete", ts=now - 1000)])
    assert res.written == 1 and ("late-unreg", uri) not in state_of(store)
    assert json.loads(zk_client.get(store.tomb_path("late-unreg", uri))[0])["ts_ms"] == now - 1000
    assert old.write_if_newer([contact(3, "late-unreg", uri, ts=now - 2000)]).unregistered == 1
    assert ("late-unreg", uri) not in state_of(store)


def test_a_replay_asked_while_a_resync_is_being_delivered_is_not_lost(
    store: ZkStore, zk_client: KazooClient, cluster: str
) -> None:
    """The lab's ZooKeeper outage test (stop 18): the tick retried a postponed resync for a restarted proxy while
    that resync was still being delivered (its view not settled yet); the replay was taken for "a resync is
    coming" and dropped, and the proxy got its table only after the next reconnect, from a stale store."""
    from ha.coordinator.store import _ZkContactWatch

    store.write([contact(1, "rp1"), contact(2, "rp2")])
    got: list[list[tuple[str, bool, bool]]] = []
    asked: list[bool] = []

    def on_changes(changes: list[Change]) -> None:
        got.append([(c.kind, c.resync, c.replay) for c in changes])
        if not asked:
            asked.append(w.replay())  # the tick's retry, while this resync is still being delivered

    w = _ZkContactWatch(ZkStore(zk_client, cluster, "node2"), on_changes)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert asked == [True] and len(got) == 2, got
        assert got[1] == [("put", True, True)] * 2  # the settled view, replayed
    finally:
        w.stop()


def test_the_active_watch_takes_its_own_writes_from_their_replies_not_from_reads(
    store: ZkStore, zk_client: KazooClient, cluster: str
) -> None:
    """This node's watch learns the bindings it wrote (creates and refreshes) from the transactions' replies and
    reads none of them back; its view is what a read gives, mzxid and version included. A peer's write to one of
    them afterwards is read as usual and wins.

    The watch's worker is held while the writes are made, so its one pass sees every event and reply in the order
    kazoo queued them. Unheld, a pass that starts between a transaction's events and its reply reads those events
    (correct, only not skipped): CI once counted 138 of 150 taken from replies."""
    read: list[str] = []
    real = store._read_records

    def spy(paths: Sequence[str], *a: Any, **kw: Any) -> dict[str, Any]:
        read.extend(paths)
        return real(paths, *a, **kw)

    store._read_records = spy  # type: ignore[method-assign]
    w = store.watch_contacts(lambda _c: None)
    peer = ZkStore(zk_client, cluster, "node2")
    peer.adopt_epoch()
    try:
        wait_for(lambda: w.complete)
        read.clear()
        gate = threading.Event()

        class Held(queue.Queue[tuple[str, Any]]):
            def get(self, block: bool = True, timeout: float | None = None) -> tuple[str, Any]:
                gate.wait(20)
                return super().get(block, timeout)

        idle, w._q = w._q, Held()
        idle.put(("own", ([], 0)))  # a no-op that moves the worker on to the held queue
        store.write([contact(i + 1, f"own{i}") for i in range(150)])  # creates
        store.write([contact(200 + i, f"own{i}", ttl=900) for i in range(0, 150, 3)])  # refreshes: setData
        gate.set()  # every reply is queued: store.write returns after its transactions' replies are parsed
        wait_for(lambda: w.processed == w.received and len(w.records() or {}) == 150)
        assert (w.received, w.own_unread, read) == (200, 200, []), (w.received, w.own_unread, len(read))
        view = w.records() or {}
        for path, rec in view.items():
            data, stat = zk_client.get(path)
            assert (rec.mzxid, rec.version, rec.expires_at) == (stat.mzxid, stat.version,
                                                               json.loads(data)["expires_at"]), path
        peer.write([contact(300, "own3", ttl=60, node="node2")])
        wait_for(lambda: w.processed == w.received)
        rec = (w.records() or {})[store.contact_path("own3", "sip:own3@198.51.100.50:5062")]
        assert (rec.node, rec.expires_at - time.time() < 100) == ("node2", True)
    finally:
        w.stop()
    assert store.own_sink is None


def test_an_own_write_stands_in_only_for_the_events_queued_before_its_reply(
    store: ZkStore, zk_client: KazooClient, cluster: str
) -> None:
    """The watch's queue order decides (the real worker's _process on a real store): a write's record replaces
    the read of events queued before its reply; an event after it is read; a view holding a later write keeps
    it; a path with no event queued is not touched."""
    from ha.coordinator.store import _ZkContactWatch

    store.write([contact(1, "q1"), contact(2, "q2")])
    w = _ZkContactWatch(ZkStore(zk_client, cluster, "node2"), lambda _c: None)
    w._process([("resync", "")])
    p1 = store.contact_path("q1", "sip:q1@198.51.100.50:5062")
    p2 = store.contact_path("q2", "sip:q2@198.51.100.50:5062")
    stored = w._records[p1]
    mine = dataclasses.replace(stored, expires_at=stored.expires_at + 7, version=-1, mzxid=0)
    zxid = stored.mzxid + 1_000_000  # later than anything in the store

    got = w._process([("data", p1), ("own", ([(p1, mine, 4)], zxid))])
    assert [c.record for c in got] == [mine] and (mine.version, mine.mzxid) == (4, zxid)
    assert w._records[p1] is mine and w.own_unread == 1
    got = w._process([("own", ([(p2, dataclasses.replace(mine), 1)], zxid)), ("data", p2)])
    assert [c.record.aor for c in got] == ["q2"] and w._records[p2].mzxid < zxid  # read from the store
    old = dataclasses.replace(stored, expires_at=1, version=-1, mzxid=0)
    got = w._process([("data", p1), ("own", ([(p1, old, 0)], stored.mzxid - 1))])  # older than the view
    assert [c.record.expires_at for c in got] == [stored.expires_at] != [old.expires_at]  # not taken: p1 read
    assert w._records[p1].mzxid == stored.mzxid
    assert w._process([("own", ([(p1, old, 0)], zxid + 1))]) == []  # no event queued: nothing to stand in for
    assert w._records[p1].expires_at == stored.expires_at and w.own_unread == 1
