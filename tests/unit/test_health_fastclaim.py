"""The fast claim's rule and its reading of votequorum's status (ha.health.fastclaim).

The parser is fed the text layout of Debian 12's corosync-quorumtool 3.1.7 (with a qdevice, as the lab runs
it); the lab's drills cross the real boundary (a real corosync, qnetd and power cuts).
"""

from __future__ import annotations

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


class Rig:
    """A FastClaim whose commands are recorded, not run: no address or ARP leaves this test."""

    def __init__(self, located: bool | None = True) -> None:
        from ha.health.fastclaim import FastClaim

        self.cmds: list[list[str]] = []
        self.events: list[str] = []
        self.garps: list[str] = []
        self.fc = FastClaim("node2", ["node1"], [VIP], healthy=lambda: True, held=self.held,
                            located_here=lambda _r: located, event=lambda e, *_a, **_k: self.events.append(e),
                            run=self.run, hold_s=0.05, confirm_s=0.2, garp=lambda v: self.garps.append(v.ip))

    def held(self) -> set[str]:
        up = [c for c in self.cmds if c[:3] == ["ip", "addr", "add"]]
        down = [c for c in self.cmds if c[:3] == ["ip", "addr", "del"]]
        return {VIP.ip} if len(up) > len(down) else set()

    def run(self, argv: list[str]) -> int:
        self.cmds.append(argv)
        return 0


def wait_until(pred: object, timeout: float = 2.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_a_claim_waits_the_hold_then_adds_the_address_and_sends_garps() -> None:
    rig = Rig()
    rig.fc.apply(both(), alone(True))
    assert rig.cmds == []  # nothing during the hold
    assert wait_until(lambda: rig.cmds)
    assert rig.cmds[0] == ["ip", "addr", "add", "198.51.100.10/24", "dev", "eth0"]
    assert rig.garps == ["198.51.100.10"]
    assert wait_until(lambda: "fast_claim_confirmed" in rig.events)


def test_a_claim_is_dropped_when_the_peer_returns_or_quorum_goes_during_the_hold() -> None:
    for later in (both(), alone(False)):
        rig = Rig()
        rig.fc.apply(both(), alone(True))
        rig.fc.apply(alone(True), later)
        assert wait_until(lambda r=rig: "fast_claim_dropped" in r.events)
        assert [c for c in rig.cmds if c[:3] == ["ip", "addr", "add"]] == []


def test_an_unconfirmed_claim_is_undone() -> None:
    rig = Rig(located=False)
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: "fast_claim_undone" in rig.events)
    assert rig.cmds[-1] == ["ip", "addr", "del", "198.51.100.10/24", "dev", "eth0"]


def test_a_claim_pacemaker_cannot_be_asked_about_is_kept() -> None:
    import time

    rig = Rig(located=None)
    rig.fc.apply(both(), alone(True))
    assert wait_until(lambda: rig.cmds)
    time.sleep(0.4)  # past confirm_s
    assert "fast_claim_undone" not in rig.events and rig.held() == {VIP.ip}
