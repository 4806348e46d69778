"""ha.coordinator.events: parsing, rejection counting through a real UDP socket, sequence tracking."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from conftest_zk import contact, dialog

from ha.coordinator.events import (
    MAX_EVENT_BYTES,
    ContactEvent,
    DialogEvent,
    EventError,
    Intake,
    SeqStatus,
    SequenceTracker,
    parse_event,
)

# The example event from templates/kamailio.cfg.j2's header, byte for byte in shape.
TEMPLATE_EXAMPLE = (
    '{"seq":7,"boot":1764010000,"node":"node1","type":"contact.insert","ts":1764014460123,"aor":"alice",'
    '"contact":"sip:alice@198.51.100.50:5062","expires":3600,"expires_at":1764018060,"q":-1,'
    '"received":"udp:198.51.100.50:5062","socket":"udp:198.51.100.10:5060","path":"",'
    '"callid":"a84b4c76e66710","cseq":1,"user_agent":"phone 1.0","flags":0,"cflags":0,"methods":-1,'
    '"ruid":"uloc-5f2a-1"}'
)


def test_template_example_parses() -> None:
    ev = parse_event(TEMPLATE_EXAMPLE.encode())
    assert isinstance(ev, ContactEvent)
    assert (ev.seq, ev.node, ev.aor, ev.expires_at, ev.q, ev.boot) == (7, "node1", "alice", 1764018060, -1, 1764010000)
    assert not ev.removed
    assert parse_event(json.dumps(ev.to_json())) == ev  # the journal's round trip


def test_dialog_event_and_unknown_extra_keys() -> None:
    d = dialog(3, "c@x", "timeout").to_json() | {"future_field": [1, 2]}
    ev = parse_event(json.dumps(d))
    assert isinstance(ev, DialogEvent) and ev.ended and ev.created_ms == 1764014460123 and ev.known
    unknown = parse_event(json.dumps(d | {"known": False}))
    assert isinstance(unknown, DialogEvent) and not unknown.known


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe not json", "malformed"),
        (b"[1,2]", "malformed"),
        (b'{"seq":1,"node":"n"}', "missing-field"),
        (b'{"seq":1,"node":"n","type":"contact.teleport"}', "unknown-type"),
        (b'{"seq":"1","node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1}', "bad-field"),
        (b'{"seq":true,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1}', "bad-field"),
        (b'{"seq":0,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1}', "bad-field"),
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"a","expires_at":1}', "missing-field"),
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"","contact":"c","expires_at":1}', "bad-field"),
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1,"q":1e999}', "bad-field"),
        (b'{"seq":1,"node":"n","type":"dialog.end","from_tag":"x"}', "missing-field"),
        (b'{"seq":99999999999999999999999,"node":"n","type":"dialog.end"}', "bad-field"),
        (b'{"seq":1,"node":"n","type":"dialog.end","callid":"c","from_tag":"f","known":"no"}', "bad-field"),
        # a binding's own fields (from_dict's fast path hands anything not of the exact type to the checks)
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1,"cseq":true}',
         "bad-field"),
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1,'
         b'"cseq":99999999999999999999999}', "bad-field"),
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":"1"}', "bad-field"),
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1,"path":5}', "bad-field"),
        (b'{"seq":1,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":1,"path":null}',
         "bad-field"),
        (b'{"seq":1,"node":"n","type":"dialog.end","callid":"c","from_tag":"f","known":1}', "bad-field"),
        (b" " * (MAX_EVENT_BYTES + 1), "oversized"),
    ],
)
def test_bad_events_raise_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(data)
    assert info.value.reason == reason


def test_fields_left_out_take_their_defaults_and_present_ones_their_values() -> None:
    ev = parse_event(b'{"seq":7,"node":"n","type":"contact.insert","aor":"a","contact":"c","expires_at":9,'
                     b'"cseq":3,"user_agent":"ua","q":-1}')
    assert isinstance(ev, ContactEvent)
    assert (ev.seq, ev.ts, ev.boot, ev.expires_at, ev.cseq, ev.user_agent, ev.q) == (7, 0, 0, 9, 3, "ua", -1)
    assert (ev.expires, ev.path, ev.flags, ev.methods, ev.ruid) == (0, "", 0, 0, "")
    d = parse_event(b'{"seq":1,"node":"n","type":"dialog.end","callid":"c","from_tag":"f"}')
    assert isinstance(d, DialogEvent) and d.known is True and d.state == 0 and d.to_tag == ""
    assert parse_event(json.dumps(ev.to_json())) == ev


def test_intake_counts_rejections_over_a_real_socket_and_keeps_going() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        good = [contact(i, f"u{i}").to_json() for i in range(1, 4)]
        datagrams: list[Any] = [
            json.dumps(good[0]).encode(),
            b"garbage",
            b"{" + b'"x":"' + b"A" * 9000 + b'"}',
            json.dumps(good[1]).encode(),
            json.dumps(good[1]).encode(),  # UDP duplicate
            b'{"seq":4,"node":"node1","type":"nope"}',
            json.dumps(good[2]).encode(),
        ]
        for d in datagrams:
            tx.sendto(d, rx.getsockname())
        intake = Intake(log_every=1)
        verdicts = [intake.feed(rx.recv(65535)) for _ in datagrams]
        assert [v.event.seq for v in verdicts if v] == [1, 2, 3]
        assert intake.accepted == 3
        assert dict(intake.rejected) == {"malformed": 1, "oversized": 1, "duplicate": 1, "unknown-type": 1}
    finally:
        rx.close()
        tx.close()


def test_sequence_gap_duplicate_and_restart() -> None:
    t = SequenceTracker()
    statuses = [
        t.observe(contact(seq, "a", boot=boot, node=node)).status
        for seq, boot, node in [
            (5, 100, "node1"),  # first seen: no judgement
            (6, 100, "node1"),
            (9, 100, "node1"),  # 7 and 8 lost
            (8, 100, "node1"),  # late (reordered between Kamailio workers): counted lost, now applied
            (8, 100, "node1"),  # the same again: a real duplicate
            (1, 100, "node2"),  # another proxy has its own sequence
            (2, 100, "node2"),
            (1, 200, "node1"),  # node1 restarted (boot changed)
            (3, 300, "node1"),  # restarted again, seq 1 and 2 of the new run lost
            (1, 300, "node2"),  # no boot change, but seq back to 1: restart
        ]
    ]
    S = SeqStatus
    assert statuses == [S.FIRST, S.NEXT, S.GAP, S.LATE, S.DUPLICATE, S.FIRST, S.NEXT, S.RESTART, S.RESTART,
                        S.RESTART]
    assert (t.gaps, t.lost, t.duplicates, t.restarts) == (1, 1, 1, 3)


def test_a_reordered_burst_loses_nothing() -> None:
    """20 phones registering at once through 4 Kamailio workers: seqs arrive shuffled, every event is applied."""
    intake = Intake()
    order = [1, 2, 4, 3, 7, 5, 6, 10, 8, 9, 11, 15, 12, 14, 13, 16, 20, 17, 19, 18]
    got = [intake.feed(json.dumps(contact(seq, f"u{seq}").to_json()).encode()) for seq in order]
    assert all(g is not None for g in got)
    assert intake.accepted == 20 and intake.tracker.lost == 0 and intake.tracker.duplicates == 0


def test_an_event_later_than_its_reconciliation_is_still_applied() -> None:
    """A reconciliation takes over what a gap counted missing (settle); one of those arriving afterwards was
    dropped as a duplicate. The runs' few "lost" events were exactly as many as their duplicates: late, not
    lost, and written by nobody when their binding was one an event touched during that reconciliation."""
    intake = Intake()
    feed = [intake.feed(json.dumps(contact(seq, f"s{seq}").to_json()).encode()) for seq in (1, 2, 4)]
    assert intake.tracker.outstanding == 1 and intake.tracker.lost == 1
    intake.tracker.settle()  # a reconciliation started: 3 is its to repair, no longer outstanding
    assert intake.tracker.outstanding == 0
    late = intake.feed(json.dumps(contact(3, "s3").to_json()).encode())
    assert late is not None and late.seq.status is SeqStatus.LATE, late
    assert intake.tracker.lost == 0 and intake.tracker.duplicates == 0 and intake.late_age_ms >= 0
    again = intake.feed(json.dumps(contact(3, "s3").to_json()).encode())
    assert again is None and intake.tracker.duplicates == 1  # a second copy is a real duplicate
    assert all(f is not None for f in feed)


def test_sequence_without_boot_field() -> None:
    t = SequenceTracker()
    seqs = [1, 2, 3, 1, 2, 5]
    res = [t.observe(contact(s, "a")) for s in seqs]
    assert [r.status for r in res] == [
        SeqStatus.FIRST,
        SeqStatus.NEXT,
        SeqStatus.NEXT,
        SeqStatus.RESTART,
        SeqStatus.NEXT,
        SeqStatus.GAP,
    ]
    assert res[-1].missing == 2


def test_only_seqs_missing_for_a_while_are_overdue() -> None:
    """A reconciliation due 1 s after a gap must not run for a newer gap's seqs, missing for a few ms: under a
    steady load the proxy's workers reorder all the time, and one was always outstanding."""
    import time

    t = SequenceTracker()
    for seq in (1, 3):
        t.observe(contact(seq, "a"))
    assert t.outstanding == 1 and t.overdue(0.0) == 1 and t.overdue(0.2) == 0
    time.sleep(0.25)
    t.observe(contact(5, "a"))  # a newer gap: 4 is missing since now
    assert t.outstanding == 2 and t.overdue(0.2) == 1  # only 2 has been missing for 0.2 s
    t.observe(contact(2, "a"))
    assert t.overdue(0.2) == 0 and t.outstanding == 1
