"""The witness's VIP lease (ha.health.arbiter): its rule, its wire format, and a real exchange on loopback.

The lab's partition and node-crash drills cross the real boundary (the arbiter on the witness's namespace, the
nodes' health services asking it across the lab's bridge).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ha.health.arbiter import ArbiterServer, BadMessage, Lease, LeaseClient, local_addresses, pack, unpack

KEY = b"0123456789abcdef0123456789abcdef"


def test_the_rule_one_holder_until_its_lease_lapses() -> None:
    lease = Lease(0.4, claim_window=3.0)
    assert lease.hold("node1", True, 0.1).granted  # a node that has the VIPs takes a free lease
    refused = lease.hold("node2", False, 0.3)
    assert not refused.granted and refused.holder == "node1" and refused.remaining_ms == 200 and not refused.why
    assert lease.hold("node1", True, 0.45).granted  # a renewal
    assert not lease.hold("node2", False, 0.80).granted
    took = lease.hold("node2", False, 0.86)  # node1's last renewal was at 0.45: lapsed at 0.85
    assert took.granted and took.holder == "node2"
    assert not lease.release("node1") and lease.release("node2") and lease.holder is None
    assert lease.hold("node1", False, 100.0).granted  # released, not fallen silent: free to claim at any time


def test_a_lease_that_lapsed_long_before_the_claim_is_refused() -> None:
    """The holder's health service died (no renewals, no release) but its node kept the VIPs; later it is cut
    off and the survivor asks: granting would put the address on both nodes until the fence. Refused, with a
    reason, and only that: the holder itself and a node that already has the VIPs are still granted."""
    lease = Lease(0.4, claim_window=3.0)
    assert lease.hold("node1", True, 0.0).granted  # expires at 0.4
    assert lease.hold("node2", False, 3.4).granted  # lapsed 3.0 s before: a crash seen late, still granted
    assert lease.hold("node2", True, 3.5).granted  # node2 renews (expires at 3.9)
    late = lease.hold("node1", False, 3.9 + 3.01)
    assert not late.granted and late.holder == "node2" and late.remaining_ms == 0
    assert "node2's lease lapsed 3.0 s before this claim" in late.why and "Pacemaker decides" in late.why
    assert lease.hold("node2", False, 10.0).granted  # its own lease, taken back (a reclaim after a flap)
    assert lease.hold("node1", True, 20.0).granted  # Pacemaker put the VIPs on node1: its renewals are granted


def test_a_restarted_arbiter_grants_a_claim_only_once_it_has_seen_a_holder() -> None:
    lease = Lease(0.4)
    first = lease.hold("node2", False, 10.1)  # node1 may hold the VIPs with its health service down
    assert not first.granted and first.holder is None and "since the witness's arbiter started" in first.why
    assert not lease.hold("node2", False, 60.0).granted  # and time alone does not change that
    assert lease.hold("node1", True, 60.1).granted  # node1 renews: now the rule is the usual one
    assert lease.hold("node2", False, 60.6).granted


def test_the_wire_format_refuses_forgeries_and_junk() -> None:
    msg = {"op": "hold", "node": "node1", "id": 7}
    assert unpack(KEY, pack(KEY, msg)) == msg
    for bad, why in [
        (pack(b"another-cluster-key-0123456789ab", msg), "bad MAC"),
        (b"{}", "no MAC"),
        (b"x" * 2000, "oversized"),
        (pack(KEY, msg).replace(b'"node1"', b'"node2"'), "bad MAC"),
    ]:
        with pytest.raises(BadMessage, match=why):
            unpack(KEY, bad)


@pytest.fixture
def server() -> Iterator[ArbiterServer]:
    srv = ArbiterServer(("127.0.0.1", 0), KEY, 0.3, {"node1", "node2"})
    stop = threading.Event()
    t = threading.Thread(target=srv.serve, args=(stop,), daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join(2)
    srv.close()


def _ask(srv: ArbiterServer, raw: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(raw, srv.address)
        try:
            return s.recv(2048)
        except TimeoutError:
            return None


def test_bad_requests_get_no_answer_and_are_counted(server: ArbiterServer) -> None:
    now = time.time()
    bad = [
        pack(b"another-cluster-key-0123456789ab", {"op": "hold", "node": "node1", "id": 1, "ts": now}),
        pack(KEY, {"op": "hold", "node": "intruder", "id": 1, "ts": now}),
        pack(KEY, {"op": "hold", "node": "node1", "id": 1, "ts": now - 3600}),  # a replay
        pack(KEY, {"op": "hold", "node": "node1", "id": "1", "ts": now}),
        pack(KEY, {"op": "steal", "node": "node1", "id": 1, "ts": now}),
        b"not even close",
    ]
    assert [_ask(server, b) for b in bad] == [None] * len(bad)
    assert server.counts["bad"] == len(bad) and server.lease.holder is None
    ok = _ask(server, pack(KEY, {"op": "hold", "node": "node1", "id": 9, "ts": now, "has_vips": True}))
    assert ok is not None and json.loads(ok.partition(b" ")[2]) == {
        "id": 9,
        "granted": True,
        "holder": "node1",
        "remaining_ms": 300,
    }


def test_the_client_lease_ends_before_the_arbiters(server: ArbiterServer) -> None:
    c = LeaseClient("node1", "127.0.0.1", server.address, KEY, 0.3, has_vips=lambda: True)
    before = time.monotonic()
    assert c.request("hold", True)
    assert c.valid() and c.valid_until <= before + 0.3 - 0.02 + 0.01
    assert c.valid_until < server.lease.expires
    other = LeaseClient("node2", "127.0.0.1", server.address, KEY, 0.3, has_vips=lambda: False)
    assert not other.request("hold", False) and other.holder == "node1" and not other.valid()


def test_a_holder_that_lets_go_releases_at_once(server: ArbiterServer) -> None:
    has = {"v": True}
    c = LeaseClient("node1", "127.0.0.1", server.address, KEY, 0.2, has_vips=lambda: has["v"])
    c.start()
    try:
        deadline = time.monotonic() + 2
        while server.lease.holder != "node1" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.lease.holder == "node1"
        has["v"] = False  # Pacemaker moved the VIPs away (a switchover)
        deadline = time.monotonic() + 2
        while (server.lease.holder is not None or c.valid()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.lease.holder is None and server.counts["released"] == 1 and not c.valid()
    finally:
        c.stop()


def test_no_arbiter_is_no_lease() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        silent = s.getsockname()  # bound, never answers
        c = LeaseClient("node1", "127.0.0.1", silent, KEY, 0.3, has_vips=lambda: True)
        assert not c.request("hold", True) and not c.valid()
        assert not c.acquire(time.monotonic() + 0.2, lambda: True)


def test_local_addresses_keeps_an_address_whose_link_is_down() -> None:
    """A real namespace: an address is "held" while it is configured, whatever its link's state."""
    import os
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    ns = f"sipha-t-arb-{os.getpid()}"
    probe = [sys.executable, "-c", "from ha.health.arbiter import local_addresses; print(sorted(local_addresses()))"]

    def sh(*argv: str) -> str:
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=20).stdout

    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")  # (no dummy module here)
        sh("ip", "-n", ns, "link", "set", "d1", "up")
        sh("ip", "-n", ns, "addr", "add", "198.51.100.77/24", "dev", "d0")
        sh("ip", "-n", ns, "link", "set", "d0", "up")
        assert sh("ip", "netns", "exec", ns, *probe).strip() == "['198.51.100.77']"
        # The coordinator's role check reads the same dump (it asked `ip -j addr` every second before).
        role = [sys.executable, "-c", "from ha.coordinator.service import vip_check; "
                "print(vip_check(['198.51.100.77'])(), vip_check(['198.51.100.78', '127.0.0.1'])())"]
        assert sh("ip", "netns", "exec", ns, *role).split() == ["True", "False"]  # lo is down in a new namespace
        sh("ip", "-n", ns, "link", "set", "d0", "down")
        assert sh("ip", "netns", "exec", ns, *probe).strip() == "['198.51.100.77']"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20)
    assert "127.0.0.1" in local_addresses()


def _free_udp_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def test_peer_watch_hears_a_live_peer_and_notices_its_silence() -> None:
    from ha.health.arbiter import PeerWatch

    port = _free_udp_port("127.0.0.1")
    a = PeerWatch("node1", ("127.0.0.1", port), {"node2": ("127.0.0.2", port)}, KEY, period_s=0.02)
    b = PeerWatch("node2", ("127.0.0.2", port), {"node1": ("127.0.0.1", port)}, KEY, period_s=0.02)
    assert a.silent_for() is None  # never heard: nothing to compare with
    a.start()
    b.start()
    try:
        deadline = time.monotonic() + 2
        while (a.silent_for() is None or b.silent_for() is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.silent_for() is not None and a.silent_for() < 0.2 and b.silent_for() is not None
        b.stop()
        time.sleep(0.3)
        assert a.silent_for() >= 0.2  # type: ignore[operator]
    finally:
        a.stop()
        b.stop()


def test_peer_watch_ignores_forged_and_unsolicited_pongs() -> None:
    from ha.health.arbiter import PeerWatch

    port = _free_udp_port("127.0.0.1")
    a = PeerWatch("node1", ("127.0.0.1", port), {"node2": ("127.0.0.2", port)}, KEY, period_s=0.02)
    a.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
            for _ in range(20):
                s.sendto(pack(KEY, {"op": "pong", "node": "node2", "re": 999_999}), ("127.0.0.1", port))  # not ours
                s.sendto(pack(b"another-cluster-key-0123456789ab", {"op": "pong", "node": "node2", "re": 1}),
                         ("127.0.0.1", port))  # fmt: skip
                time.sleep(0.01)
        assert a.silent_for() is None
    finally:
        a.stop()


def test_the_lab_derives_the_lease_key_as_the_playbook_does() -> None:
    """roles/sipha/tasks/lease_key.yml writes ``slurp(authkey).content | hash('sha256')`` and a newline; this
    digest is what ansible 2.14 printed for the base64 of bytes 0..31 (so a lab and a deployed host agree)."""
    from ha.health.arbiter import lease_key_of

    assert lease_key_of(bytes(range(32))) == b"905f28def18eaac05ae6f12b2c3452744afaf626da1343d57b395b544e0519b6\n"
