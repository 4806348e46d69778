"""ha.drill.measure against explicit sample sequences; every expectation is computed by hand in a comment."""

from __future__ import annotations

import pytest

from ha.drill import measure
from ha.drill.traffic import Call, Registration, Sample


def stream(pattern: str, interval: float = 0.1, latency: float = 0.01, t0: float = 100.0) -> list[Sample]:
    """One sample per character every ``interval``: '.' answered after ``latency``, 'x' never answered."""
    out = []
    for i, ch in enumerate(pattern):
        sent = round(t0 + i * interval, 6)
        out.append(Sample(i + 1, sent, round(sent + latency, 6) if ch == "." else None, 200 if ch == "." else None))
    return out


def test_gap_between_answer_arrivals() -> None:
    # sent 100.0 .. 100.9; answered at 100.01, 100.11, 100.21, then x x x x, then 100.71, 100.81, 100.91
    s = stream("...xxxx...")
    gap = measure.longest_gap(s)
    assert gap is not None and gap.recovered
    assert gap.start == pytest.approx(100.21) and gap.end == pytest.approx(100.71)
    assert gap.length == pytest.approx(0.5)  # 100.71 - 100.21


def test_gap_counts_a_hang_whose_probes_are_answered_late() -> None:
    # Every probe is answered, but the 4 sent during a hang (100.3 .. 100.6) all arrive at 101.2.
    s = stream("..........")
    for smp in s[3:7]:
        smp.answered = 101.2
    gap = measure.longest_gap(s)
    assert gap is not None and gap.recovered
    # Probe 8 (sent 100.7) is answered at 100.71, before the queued ones: sorted arrivals are
    # ..., 100.21, 100.71, 100.81, 100.91, 101.2 x4 -> longest = 100.71 - 100.21 = 0.5
    assert gap.length == pytest.approx(0.5)


def test_gap_of_a_hang_where_later_probes_queue_too() -> None:
    # A real hang queues everything: probes 4..8 (sent 100.3..100.7) are all answered at 100.75 when the
    # proxy resumes; probe 9 (sent 100.8) at 100.81. Longest silence: 100.21 -> 100.75.
    s = stream("..........")
    for smp in s[3:8]:
        smp.answered = 100.75
    gap = measure.longest_gap(s)
    assert gap is not None and gap.recovered and gap.length == pytest.approx(0.54)
    # The queued probes waited 0.45 .. 0.05 s for their answers, all under T1: no UAC would have resent.
    assert measure.retransmits(s)["max"] == 0


def test_gap_not_recovered_when_the_end_is_silent() -> None:
    s = stream("..xxxxx")  # answers at 100.01, 100.11; last sent 100.6
    gap = measure.longest_gap(s)
    assert gap is not None and not gap.recovered and gap.end is None
    assert gap.length == pytest.approx(0.49)  # 100.6 - 100.11


def test_gap_edge_cases() -> None:
    assert measure.longest_gap([]) is None
    nothing = measure.longest_gap(stream("xxx"))
    assert nothing is not None and not nothing.recovered and nothing.length == pytest.approx(0.2)
    one = measure.longest_gap(stream("."))
    assert one is not None and one.recovered and one.length == 0.0


def test_gap_since_ignores_silences_before_the_fault() -> None:
    # a 0.4 s silence at the start (answers 100.01 then 100.51), a 0.3 s one later (100.81 -> 101.11)
    s = stream(".xxxx..xx..")
    assert measure.longest_gap(s).length == pytest.approx(0.5)  # 100.01 -> 100.51
    later = measure.longest_gap(s, since=100.7)
    assert later is not None and later.length == pytest.approx(0.3) and later.start == pytest.approx(100.61)


def test_retransmit_schedule_is_rfc3261() -> None:
    assert measure.retransmit_offsets()[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]  # non-INVITE, capped at T2=4
    assert measure.retransmit_offsets(invite=True) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # < 64*T1 = 32 s


@pytest.mark.parametrize(
    ("sent", "answered", "recovered", "expected"),
    [
        (0.0, 0.002, None, 0),  # answered at once
        (0.0, 0.9, None, 1),  # answered late (a hang): one resend went out at 0.5 before the answer
        (0.0, 2.0, None, 2),  # resends at 0.5 and 1.5 before the 2.0 answer
        (0.0, None, 0.3, 1),  # lost, service back at 0.3: the resend at 0.5 gets through
        (0.0, None, 0.5, 1),  # back exactly at 0.5: 0.5 is not before 0.5, so that resend is the first after
        (0.0, None, 1.2, 2),  # 0.5 too early, 1.5 gets through
        (0.2, None, 1.2, 2),  # resend at 0.7 is before 1.2 (too early), the one at 1.7 gets through
        (0.0, None, 40.0, None),  # never within Timer F: the request fails
        (0.0, None, None, None),  # never recovered
    ],
)
def test_retransmits_needed(sent: float, answered: float | None, recovered: float | None, expected: int | None) -> None:
    offsets = measure.retransmit_offsets()
    assert measure.retransmits_needed(sent, answered, recovered, offsets) == expected


def test_retransmits_over_a_stream() -> None:
    # interval 0.1; answers at 100.01, 100.11; probes at 100.2..100.9 lost; 101.0 answered at 101.01.
    s = stream("..xxxxxxxx.")
    r = measure.retransmits(s)
    # lost probe sent at t, recovery 101.01: resends at t+0.5 (< 101.01 when t <= 100.5) then t+1.5 (> 101.01)
    # t = 100.2..100.5 (4 probes): 0.5 early, 1.5 through -> 2;  t = 100.6..100.9 (4): 0.5 through -> 1
    assert r["histogram"] == {"0": 3, "1": 4, "2": 4}
    assert r["max"] == 2 and r["failed"] == 0


def test_first_answer_from_the_new_node_and_attribution() -> None:
    s = stream("..xx....")  # answers 100.01, 100.11, then 100.41 100.51 100.61 100.71
    own = [(100.0, {"node1": True, "node2": False}), (100.35, {"node1": False, "node2": True})]
    attributed = measure.attribute_nodes(s, own)
    assert [x.node for x in attributed if x.answered] == ["node1", "node1", "node2", "node2", "node2", "node2"]
    assert s[0].node is None  # the input is not changed
    # fault at 100.15: first answer from a node other than node1 arrives 100.41 -> 0.26 s
    assert measure.first_answer_from(attributed, 100.15, "node1") == pytest.approx(0.26)
    assert measure.first_answer_from(attributed, 100.15, "node2") is None
    assert measure.holder_at(own, 99.0) is None
    assert measure.holder_at([(1.0, {"a": True, "b": True})], 2.0) is None  # two holders: not one node


def test_reply_naming_its_node_wins_over_ownership() -> None:
    s = [Sample(1, 1.0, 1.01, 200, "node2")]
    assert measure.attribute_nodes(s, [(0.0, {"node1": True})])[0].node == "node2"


def test_split_brain_counts_instants_with_two_owners() -> None:
    t = [i * 0.01 for i in range(8)]
    own = [
        (t[0], {"a": True, "b": False}),
        (t[1], {"a": True, "b": True}),  # 1
        (t[2], {"a": True, "b": True}),  # 2 (run of 2)
        (t[3], {"a": False, "b": True}),
        (t[4], {"a": False, "b": False}),  # nowhere
        (t[5], {"a": True, "b": True}),  # 3 (run of 1)
        (t[6], {"a": False, "b": True}),
        (t[7], {"a": False, "b": True}),
    ]
    sb = measure.split_brain(own)
    assert sb["samples"] == 3 and sb["total"] == 8 and sb["first_at"] == pytest.approx(0.01)
    assert sb["longest_ms"] == pytest.approx(20.0) and sb["vip_nowhere_samples"] == 1
    assert measure.split_brain([])["samples"] == 0


def _call(cid: str, phase: str, started: float, status: int | None, bye: int | None = None) -> Call:
    return Call(call_id=cid, callee="u", phase=phase, started=started, setup_status=status, bye_status=bye)


def test_calls_and_registrations() -> None:
    cs = [
        _call("e1", "established", 1.0, 200, 200),
        _call("e2", "established", 1.0, 200, None),  # BYE never answered
        _call("e3", "established", 1.0, 503),  # never set up: not counted as established
        _call("n1", "new", 4.0, 200),  # before the fault (5.0)
        _call("n2", "new", 5.5, None),  # during (5.0 .. 6.0)
        _call("n3", "new", 5.9, 200),  # during
        _call("n4", "new", 6.0, 200),  # after (at recovery)
    ]
    c = measure.calls(cs, fault_at=5.0, recovered_at=6.0)
    assert c["established"] == 2 and c["bye_ok"] == 1 and c["bye_failed"] == ["e2"]
    assert c["new"]["before"] == {"attempted": 1, "set_up": 1, "ratio": 1.0}
    assert c["new"]["during"] == {"attempted": 2, "set_up": 1, "ratio": 0.5}
    assert c["new"]["after"] == {"attempted": 1, "set_up": 1, "ratio": 1.0}
    assert measure.calls(cs, 5.0, None)["new"]["during"]["attempted"] == 3  # no recovery: all after the fault

    regs = [
        Registration("a", "sip:a@x", 1.0, 200, 7.0, 200, True),
        Registration("b", "sip:b@x", 1.0, 200, 7.0, 404, False),  # proxy lost the binding
        Registration("c", "sip:c@x", 1.0, 200, 7.0, 200, False),  # 200 from someone else: not reached
        Registration("d", "sip:d@x", 1.0, None),  # never registered: not checked
    ]
    r = measure.registrations(regs)
    assert r == {"attempted": 4, "registered": 3, "checked": 3, "reachable": 1, "unreachable": ["b", "c"]}


def test_figures_of_one_drill() -> None:
    s = stream("....xxxxx.....")  # answers to 100.31, gap to 100.91 (0.6 s), fault at 100.35
    own = [(100.0, {"node1": True, "node2": False}), (100.8, {"node1": False, "node2": True})]
    f = measure.figures(s, [], [], fault_at=100.35, old_node="node1", ownership=own)
    assert f["gap_ms"] == pytest.approx(600.0) and f["recovered"]
    assert f["recovery_ms"] == pytest.approx(560.0)  # 100.91 - 100.35
    assert f["first_answer_new_node_ms"] == pytest.approx(560.0)
    assert f["probes_unanswered"] == 5 and f["split_brain_samples"] == 0
    assert f["details"]["answers_by_node"] == {"node1": 4, "node2": 5}


def test_percentiles_nearest_rank() -> None:
    v = [float(i) for i in range(1, 21)]  # 1..20
    assert measure.percentile(v, 50) == 10.0  # ceil(0.5*20)=10th
    assert measure.percentile(v, 95) == 19.0  # ceil(19.0)=19th
    assert measure.percentile(v, 99) == 20.0  # ceil(19.8)=20th
    assert measure.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        measure.percentile([], 50)


def test_aggregate_repeats() -> None:
    runs = [
        {"gap_ms": 100.0, "recovered": True, "first_answer_new_node_ms": None, "details": {}},
        {"gap_ms": 300.0, "recovered": True, "first_answer_new_node_ms": 250.0, "details": {}},
        {"gap_ms": 200.0, "recovered": False, "first_answer_new_node_ms": 150.0, "details": {}},
    ]
    agg = measure.aggregate(runs)
    assert agg["gap_ms"] == {"n": 3, "missing": 0, "p50": 200.0, "p95": 300.0, "p99": 300.0, "max": 300.0}
    assert agg["recovered"] == {"n": 3, "true": 2, "false": 1}
    assert agg["first_answer_new_node_ms"]["n"] == 2 and agg["first_answer_new_node_ms"]["missing"] == 1
    assert "details" not in agg
