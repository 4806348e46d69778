"""The fast claim's rule and its reading of votequorum's status (ha.health.fastclaim).

The parser is fed the text layout of Debian 12's corosync-quorumtool 3.1.7 (with a qdevice, as the lab runs
it); the lab's drills cross the real boundary (a real corosync, qnetd and power cuts).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ha.health.arbiter import PeerWatch
from ha.health.fastclaim import QuorumView, VipAddr, decide, parse_views

BLOCK = """Quorum information
------------------
Date:             Tue Nov 24 23:10:01 2026
Quorum provider:  corosync_votequorum
Nodes:            {n}
Node ID:          2
Ring ID:          {ring}
Quorate:          {q}

Votequorum information
----------------------
Expected votes:   3
Highest expected: 3
Total votes:      {n}
Quorum:           2
Flags:            Quorate Qdevice

Membership information
----------------------
    Nodeid      Votes    Qdevice Name
{rows}
         0          1            Qdevice

"""
ROW1 = "         1          1    A,V,NMW node1"
ROW2 = "         2          1    A,V,NMW node2 (local)"
VIP = VipAddr("vip", "198.51.100.10", 24, "eth0")


def test_parse_views_reads_each_status_block_as_it_completes() -> None:
    text = BLOCK.format(n=2, ring="1.12", q="Yes", rows=f"{ROW1}\n{ROW2}") + BLOCK.format(
        n=1, ring="2.13", q="Yes", rows=ROW2) + BLOCK.format(n=1, ring="2.14", q="No", rows=ROW2)
    views = list(parse_views(text.splitlines(keepends=True)))
    assert views == [QuorumView(True, "1.12", frozenset({"node1", "node2"})),
                     QuorumView(True, "2.13", frozenset({"node2"})),
                     QuorumView(False, "2.14", frozenset({"node2"}))]


def test_parse_views_hex_node_ids_and_no_qdevice_column() -> None:
    rows = "0x00000001          1 node1\n0x0000000a          1 node2 (local)"
    text = BLOCK.format(n=2, ring="1.5", q="Yes", rows=rows)
    (view,) = parse_views(text.splitlines())
    assert view.members == frozenset({"node1", "node2"})


def test_parse_views_ignores_a_block_cut_short() -> None:
    assert list(parse_views(["Quorum information\n", "Quorate:          Yes\n"])) == []


def both(q: bool = True) -> QuorumView:
    return QuorumView(q, "1.1", frozenset({"node1", "node2"}))


def alone(q: bool) -> QuorumView:
    return QuorumView(q, "2.2", frozenset({"node2"}))


def test_claims_when_the_peer_left_and_quorum_stayed() -> None:
    assert decide(both(), alone(True), "node2", frozenset({"node1"}), True, set(), [VIP]) == [("claim", VIP)]


def test_no_claim_when_unhealthy_already_held_or_not_a_departure() -> None:
    peers = frozenset({"node1"})
    assert decide(both(), alone(True), "node2", peers, False, set(), [VIP]) == []
    assert decide(both(), alone(True), "node2", peers, True, {VIP.ip}, [VIP]) == []
    assert decide(None, alone(True), "node2", peers, True, set(), [VIP]) == []  # first view: nothing left
    assert decide(alone(True), alone(True), "node2", peers, True, set(), [VIP]) == []


def test_no_claim_without_quorum_and_release_on_losing_it() -> None:
    peers = frozenset({"node1"})
    assert decide(both(), alone(False), "node2", peers, True, set(), [VIP]) == []
    assert decide(both(), alone(False), "node2", peers, True, {VIP.ip}, [VIP]) == [("release", VIP)]


KEY = b"test-lease-key-0123456789abcdef"


class Rig:
    """A FastClaim whose address commands are recorded, not run (no address or ARP leaves this test), with a
    real arbiter and lease on loopback; ``peer`` is node1's lease client, renewing while ``peer_has`` says so."""

    def __init__(self, located: bool | None = True, held: bool = False, peer_has: bool = False,
                 lease_s: float = 0.2, distrust_s: float = 0.6) -> None:  # fmt: skip
        import threading

        from ha.health.arbiter import ArbiterServer, LeaseClient
        from ha.health.fastclaim import FastClaim

        self.cmds: list[list[str]] = [["ip", "addr", "add", "held at start"]] if held else []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.garps: list[str] = []
        self.server = ArbiterServer(("127.0.0.1", 0), KEY, lease_s, {"node1", "node2"})
        self.server.lease.released = True  # a holder let it go: free to claim (a restarted arbiter is not)
        self.stop = threading.Event()
        threading.Thread(target=self.server.serve, args=(self.stop,), daemon=True).start()
        self.peer_has = peer_has
        self.watches: list[PeerWatch] = []  # stopped by close()
        self.peer = LeaseClient("node1", "127.0.0.1", self.server.address, KEY, lease_s,
                                has_vips=lambda: self.peer_has)  # fmt: skip
        lease = LeaseClient("node2", "127.0.0.1", self.server.address, KEY, lease_s,
                            has_vips=lambda: bool(self.held()), on_tick=lambda: self.fc.check_lease())  # fmt: skip
        self.fc = FastClaim("node2", ["node1"], [VIP], healthy=lambda: True, held=self.held,
                            located_here=lambda _r: located, event=self.event, lease=lease, run=self.run,
                            hold_s=0.05, distrust_s=distrust_s, confirm_s=0.2,
                            garp=lambda v: self.garps.append(v.ip))  # fmt: skip
        self.peer.start()
        lease.start()  # what FastClaim.start does, without the quorum monitor

    def event(self, name: str, *_a: object, **kw: object) -> None:
        self.events.append((name, kw))

    def named(self, name: str) -> list[dict[str, object]]:
        return [kw for e, kw in self.events if e == name]

    def held(self) -> set[str]:
        up = [c for c in self.cmds if c[:3] == ["ip", "addr", "add"]]
        down = [c for c in self.cmds if c[:3] == ["ip", "addr", "del"]]
        return {VIP.ip} if len(up) > len(down) else set()

    def run(self, argv: list[str]) -> int:
        self.cmds.append(argv)
        return 0

    def close(self) -> None:
        for w in self.watches:
            w.stop()
        self.fc.stop()
        self.peer.stop()
        self.stop.set()


def wait_until(pred: object, timeout: float = 3.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        r.close()


def test_a_claim_is_granted_by_the_witness_then_adds_the_address_and_sends_garps(rigs: list[Rig]) -> None:
    rig = Rig()
    rigs.append(rig)
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: rig.cmds)
    assert rig.cmds[0] == ["ip", "addr", "add", "198.51.100.10/24", "dev", "eth0"]
    assert rig.garps == ["198.51.100.10"]
    assert rig.server.lease.holder == "node2"
    assert wait_until(lambda: rig.named("fast_claim_confirmed"))


def test_no_claim_while_the_holder_still_renews_its_lease(rigs: list[Rig]) -> None:
    """The old holder reaches the witness (only the link between the nodes is cut): Pacemaker decides."""
    rig = Rig(peer_has=True)
    rigs.append(rig)
    assert wait_until(lambda: rig.server.lease.holder == "node1")
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: rig.named("fast_claim_dropped"), timeout=3.0)
    assert "holder: node1" in str(rig.named("fast_claim_dropped")[0]["why"])
    assert [c for c in rig.cmds if c[:3] == ["ip", "addr", "add"]] == []


def test_a_claim_waits_until_the_old_holders_lease_lapses(rigs: list[Rig]) -> None:
    rig = Rig(peer_has=True)
    rigs.append(rig)
    assert wait_until(lambda: rig.server.lease.holder == "node1")
    rig.peer.stop()  # node1 dies: its renewals stop
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: rig.cmds)
    assert rig.server.lease.holder == "node2" and rig.named("fast_claim_dropped") == []


def test_no_claim_over_a_holder_whose_lease_lapsed_long_before_it_left(rigs: list[Rig]) -> None:
    """node1's health service died (its renewals stopped, nothing released) and node1 kept the VIPs; when it
    later leaves the membership, the witness refuses the claim and says why: Pacemaker decides (fence first)."""
    import time

    rig = Rig(peer_has=True)
    rigs.append(rig)
    assert wait_until(lambda: rig.server.lease.holder == "node1")
    rig.server.lease.claim_window = 0.3
    rig.peer.stop()  # the health service dies; node1 itself lives on
    time.sleep(0.2 + 0.3 + 0.2)  # its lease lapses (0.2 s), then the window passes
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: rig.named("fast_claim_dropped"), timeout=3.0)
    why = str(rig.named("fast_claim_dropped")[0]["why"])
    assert "holder: node1" in why and "node1's lease lapsed" in why and "Pacemaker decides" in why, why
    assert [c for c in rig.cmds if c[:3] == ["ip", "addr", "add"]] == [] and rig.server.lease.holder == "node1"
    assert rig.server.counts["refused_lapsed"] >= 1


def test_a_claim_is_dropped_when_the_peer_returns_or_quorum_goes(rigs: list[Rig]) -> None:
    for later in (both(), alone(False)):
        rig = Rig(peer_has=True)  # refused until the peer's lease lapses: time for the change to arrive
        rigs.append(rig)
        rig.fc.apply(both(), alone(True))
        rig.fc.apply(alone(True), later)
        assert wait_until(lambda r=rig: r.named("fast_claim_dropped"))
        assert [c for c in rig.cmds if c[:3] == ["ip", "addr", "add"]] == []


def test_the_cut_off_holder_drops_its_vips_when_its_peer_leaves(rigs: list[Rig]) -> None:
    """The holder's renewals go unanswered (it is cut off) and node1 took the lease: drop at the change."""
    rig = Rig(held=True)
    rigs.append(rig)
    assert wait_until(lambda: rig.server.lease.holder == "node2")
    rig.server.lease.holder, rig.server.lease.expires = "node1", 1e12  # node1 was granted it meanwhile
    assert wait_until(lambda: not rig.fc.lease.valid())
    rig.fc.apply(both(), alone(True))  # still "quorate": its qdevice has not given up yet
    assert rig.held() == set()
    (rel,) = rig.named("fast_release")
    assert "lease is not ours (holder: node1)" in str(rel["why"])


def test_a_holder_whose_peer_crashed_keeps_its_vips(rigs: list[Rig]) -> None:
    rig = Rig(held=True)
    rigs.append(rig)
    assert wait_until(lambda: rig.fc.lease.valid())
    rig.fc.apply(both(), alone(True))
    import time

    time.sleep(0.8)  # past the distrust window, renewing all along
    assert rig.held() == {VIP.ip} and rig.named("fast_release") == []


def test_a_lease_lapsing_inside_the_window_drops_the_vips_at_once(rigs: list[Rig]) -> None:
    rig = Rig(held=True, lease_s=0.3, distrust_s=1.0)
    rigs.append(rig)
    assert wait_until(lambda: rig.fc.lease.valid())
    rig.fc.apply(both(), alone(True))
    rig.stop.set()  # the witness goes silent
    assert wait_until(lambda: rig.named("fast_release"), timeout=2.0)
    assert rig.held() == set()


def test_after_the_window_only_quorum_takes_the_vips_away(rigs: list[Rig]) -> None:
    """A restarting witness must not empty a node that has been running alone for a while."""
    import time

    rig = Rig(held=True, distrust_s=0.2)
    rigs.append(rig)
    assert wait_until(lambda: rig.fc.lease.valid())
    rig.fc.apply(both(), alone(True))
    time.sleep(0.3)
    rig.stop.set()
    time.sleep(0.5)  # the lease lapsed, the renewal ticks ran
    assert rig.held() == {VIP.ip} and rig.named("fast_release") == []
    rig.fc.apply(alone(True), alone(False))
    assert rig.held() == set()


def test_an_unconfirmed_claim_is_undone(rigs: list[Rig]) -> None:
    rig = Rig(located=False)
    rigs.append(rig)
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: rig.named("fast_claim_undone"))
    assert rig.cmds[-1] == ["ip", "addr", "del", "198.51.100.10/24", "dev", "eth0"]


def test_a_claim_pacemaker_cannot_be_asked_about_is_kept(rigs: list[Rig]) -> None:
    import time

    rig = Rig(located=None)
    rigs.append(rig)
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: rig.cmds)
    time.sleep(0.4)  # past confirm_s
    assert rig.named("fast_claim_undone") == [] and rig.held() == {VIP.ip}


def test_the_first_membership_read_is_not_a_departure(rigs: list[Rig]) -> None:
    """At a start votequorum may list a peer that cmap does not yet: only a change seen in cmap is a departure."""
    import time

    rig = Rig()
    rigs.append(rig)
    rig.fc.on_quorum(both())
    rig.fc.on_members(frozenset({"node2"}))  # cmap read for the first time
    time.sleep(0.3)
    assert rig.cmds == [] and rig.named("fast_claim_pending") == []
    rig.fc.on_members(frozenset({"node1", "node2"}))
    rig.fc.on_members(frozenset({"node2"}))  # a departure seen in cmap; votequorum has not spoken yet
    assert wait_until(lambda: rig.cmds)
    assert rig.cmds[0][:3] == ["ip", "addr", "add"]


def test_parse_member_status_reads_the_snapshot_and_the_tracking_lines() -> None:
    from ha.health.fastclaim import parse_member_status

    lines = ["runtime.members.1.status (str) = joined", "runtime.members.1.ip (str) = r(0) ip(198.51.100.11)",
             'Type "q" to finish', "modify> runtime.members.2.status (str) = left",
             "modify> runtime.members.2.join_count (u32) = 2"]
    assert list(parse_member_status(lines)) == [(1, "joined"), (2, "left")]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _watch(rig: Rig, me: str, port: int) -> PeerWatch:
    """A started peer watch: node2 (the rig's node, feeding its checks) on 127.0.0.1, node1 on 127.0.0.2."""
    ips = {"node2": "127.0.0.1", "node1": "127.0.0.2"}
    other = "node1" if me == "node2" else "node2"
    w = PeerWatch(me, (ips[me], port), {other: (ips[other], port)}, KEY, period_s=0.02,
                  on_tick=rig.fc.check_lease if me == "node2" else lambda: None)  # fmt: skip
    if me == "node2":
        rig.fc.peer_watch = w
    rig.watches.append(w)
    w.start()
    return w


def _holder_hearing_its_peer(rigs: list[Rig]) -> tuple[Rig, int, PeerWatch]:
    """node2 holds the VIP with a valid lease and hears node1's pings; both are members."""
    rig = Rig(held=True, lease_s=0.2, distrust_s=1.0)
    rigs.append(rig)
    port = _free_port()
    peer, mine = _watch(rig, "node1", port), _watch(rig, "node2", port)
    assert wait_until(lambda: mine.silent_for() is not None and rig.fc.lease.valid())
    rig.fc.apply(None, both())
    return rig, port, peer


def test_a_holder_that_hears_neither_witness_nor_peer_drops_before_any_membership_change(rigs: list[Rig]) -> None:
    """A flapping link: the rings may form hundreds of ms apart, so silence alone must make the holder let go."""
    rig, _port, peer = _holder_hearing_its_peer(rigs)
    rig.stop.set()  # the witness goes silent...
    import time

    time.sleep(0.4)
    assert rig.held() == {VIP.ip}  # ...but the peer still answers: keep the VIPs
    peer.stop()  # and now the peer too
    assert wait_until(lambda: rig.named("fast_release"), timeout=2.0)
    assert rig.held() == set() and "went silent" in str(rig.named("fast_release")[0]["why"])


def test_vips_dropped_on_a_false_suspicion_are_taken_back(rigs: list[Rig]) -> None:
    """The flap ended before any ring changed: nobody claimed, so the holder takes its VIPs back."""
    import time

    rig, port, peer = _holder_hearing_its_peer(rigs)
    rig.server.lease.holder, rig.server.lease.expires = "nobody", 1e12  # the witness is "unreachable"
    peer.stop()
    assert wait_until(lambda: rig.named("fast_release"), timeout=2.0)
    time.sleep(0.2)
    assert rig.held() == set() and rig.named("fast_reclaim") == []  # still silent: no reclaim
    rig.server.lease.holder, rig.server.lease.expires = "node2", 0.0  # the witness answers again (node2's, lapsed)...
    peer = _watch(rig, "node1", port)  # ...and so does the peer; the membership never changed
    assert wait_until(lambda: rig.named("fast_reclaim"), timeout=2.0)
    assert rig.held() == {VIP.ip} and rig.server.lease.holder == "node2"


def test_no_reclaim_when_the_peer_claimed_meanwhile(rigs: list[Rig]) -> None:
    rig = Rig(held=True, lease_s=0.2, distrust_s=0.3)
    rigs.append(rig)
    assert wait_until(lambda: rig.fc.lease.valid())
    rig.fc.apply(None, both())
    rig.fc.apply(both(), alone(True))
    rig.server.lease.holder, rig.server.lease.expires = "node1", 1e12  # node1 was granted it and claimed
    assert wait_until(lambda: rig.named("fast_release"), timeout=2.0)
    rig.fc.apply(alone(True), both())  # the rings merge again
    import time

    time.sleep(0.6)
    assert rig.held() == set() and rig.named("fast_reclaim") == []


def test_a_departure_that_starts_no_claim_says_why(rigs: list[Rig]) -> None:
    rig = Rig()
    rigs.append(rig)
    rig.fc.healthy = lambda: False  # e.g. its proxy is overloaded at that moment
    rig.fc.apply(both(), alone(True))
    (skipped,) = rig.named("fast_claim_skipped")
    assert skipped["healthy"] is False and skipped["quorate"] is True and rig.named("fast_claim_pending") == []


def _status_cmd(tmp_path: object, text: str, delay_s: float = 0.0) -> tuple[str, ...]:
    """A stand-in for ``corosync-quorumtool -s``: prints ``text`` (after ``delay_s``)."""
    from pathlib import Path

    f = Path(str(tmp_path)) / "status.txt"
    f.write_text(text)
    return ("sh", "-c", f"sleep {delay_s}; cat {f}")


def test_a_missed_quorum_notification_is_repaired_and_the_next_departure_claims(rigs: list[Rig],
                                                                                tmp_path: object) -> None:
    rig = Rig()
    rigs.append(rig)
    # The monitor's last word: the ring before the peer joined, not quorate (the drill's case); then cmap shows
    # both members. A departure now would be skipped.
    rig.fc.on_quorum(QuorumView(False, "1.3b", frozenset({"node2"})))
    rig.fc.on_members(frozenset({"node1", "node2"}))
    rig.fc.status_argv = _status_cmd(tmp_path, BLOCK.format(n=2, ring="1.3f", q="Yes", rows=f"{ROW1}\n{ROW2}"))
    assert rig.fc.refresh_quorum() is None  # once could be a notification on its way
    view = rig.fc.refresh_quorum()  # the same difference again, nothing notified between: missed
    assert view is not None and view.quorate and view.ring == "1.3f"
    (repaired,) = rig.named("quorum_view_repaired")
    assert repaired["was_quorate"] is False and repaired["quorate"] is True
    assert rig.fc.refresh_quorum() is None  # nothing missed any more: nothing taken, nothing said
    rig.fc.on_members(frozenset({"node2"}))  # the peer crashed
    assert wait_until(lambda: rig.held() == {VIP.ip}), rig.events
    assert rig.named("fast_claim_skipped") == []


def test_a_notification_during_the_read_wins_over_it(rigs: list[Rig], tmp_path: object) -> None:
    import threading

    rig = Rig()
    rigs.append(rig)
    rig.fc.on_quorum(QuorumView(True, "1.5", frozenset({"node1", "node2"})))
    # The read says quorate on an old ring; meanwhile votequorum notifies the loss of quorum: the read is older.
    rig.fc.status_argv = _status_cmd(tmp_path, BLOCK.format(n=2, ring="1.4", q="Yes", rows=f"{ROW1}\n{ROW2}"),
                                     delay_s=0.3)
    later = threading.Timer(0.1, rig.fc.on_quorum, args=(QuorumView(False, "1.6", frozenset({"node2"})),))
    rig.fc.refresh_quorum()  # the first sighting of a difference is only noted
    later.start()
    assert rig.fc.refresh_quorum() is None
    later.join()
    assert rig.fc._quorum == QuorumView(False, "1.6", frozenset({"node2"}))
    assert rig.named("quorum_view_repaired") == []


def test_a_difference_that_a_notification_catches_up_with_is_not_taken(rigs: list[Rig], tmp_path: object) -> None:
    rig = Rig()
    rigs.append(rig)
    rig.fc.on_quorum(QuorumView(True, "1.7e", frozenset({"node1", "node2"})))
    # The status read shows the new ring before votequorum's notification of it arrives.
    rig.fc.status_argv = _status_cmd(tmp_path, BLOCK.format(n=1, ring="2.7e", q="Yes", rows=ROW2))
    assert rig.fc.refresh_quorum() is None
    rig.fc.on_quorum(QuorumView(True, "2.7e", frozenset({"node2"})))  # ... and here it is
    assert rig.fc.refresh_quorum() is None and rig.named("quorum_view_repaired") == []


def test_a_departure_seen_as_not_quorate_asks_votequorum_at_once(rigs: list[Rig], tmp_path: object) -> None:
    rig = Rig()
    rigs.append(rig)
    rig.fc.status_argv = _status_cmd(tmp_path, BLOCK.format(n=2, ring="1.6c", q="Yes", rows=f"{ROW1}\n{ROW2}"))
    rig.fc.on_quorum(QuorumView(False, "1.68", frozenset({"node2"})))  # the start's view; "quorate" was missed
    rig.fc.on_members(frozenset({"node1", "node2"}))
    rig.fc.on_members(frozenset({"node2"}))  # the peer crashes before any periodic read repaired it
    assert wait_until(lambda: rig.held() == {VIP.ip}), rig.events
    (repaired,) = rig.named("quorum_view_repaired")
    assert repaired["at"] == "departure" and repaired["was_quorate"] is False
    assert rig.named("fast_claim_skipped") == []


def test_a_notification_during_the_departure_read_neither_waits_nor_loses(rigs: list[Rig], tmp_path: object) -> None:
    """The departure's votequorum read runs outside the apply lock: a notification that comes meanwhile is
    applied at once (not after the read), and the older read is then dropped."""
    import threading
    import time

    rig = Rig()
    rigs.append(rig)
    rig.fc.status_argv = _status_cmd(tmp_path, BLOCK.format(n=2, ring="1.6c", q="Yes", rows=f"{ROW1}\n{ROW2}"),
                                     delay_s=0.5)
    rig.fc.on_quorum(QuorumView(False, "1.68", frozenset({"node2"})))
    rig.fc.on_members(frozenset({"node1", "node2"}))
    newer = QuorumView(False, "1.70", frozenset({"node2"}))
    took: list[float] = []

    def notify() -> None:
        t0 = time.monotonic()
        rig.fc.on_quorum(newer)
        took.append(time.monotonic() - t0)

    later = threading.Timer(0.1, notify)
    later.start()
    t0 = time.monotonic()
    rig.fc.on_members(frozenset({"node2"}))  # the peer crashes; the read takes 0.5 s
    assert time.monotonic() - t0 >= 0.5
    later.join()
    assert took and took[0] < 0.3, f"the notification waited {took} s behind the read"
    assert rig.fc._quorum == newer and rig.named("quorum_view_repaired") == []
    time.sleep(0.3)
    assert rig.held() == set(), rig.events


def test_a_departure_without_quorum_stays_without_a_claim(rigs: list[Rig], tmp_path: object) -> None:
    import time

    rig = Rig()
    rigs.append(rig)
    rig.fc.status_argv = _status_cmd(tmp_path, BLOCK.format(n=1, ring="1.70", q="No", rows=ROW2))
    rig.fc.on_quorum(QuorumView(False, "1.68", frozenset({"node2"})))
    rig.fc.on_members(frozenset({"node1", "node2"}))
    rig.fc.on_members(frozenset({"node2"}))
    time.sleep(0.4)
    assert rig.held() == set() and rig.named("quorum_view_repaired") == []
    (skipped,) = rig.named("fast_claim_skipped")
    assert skipped["quorate"] is False
