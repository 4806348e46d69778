"""ha.drill.timeline: the cluster's own events from Pacemaker 2.1.5 / Corosync 3.1.7 log lines."""

from __future__ import annotations

import time

import pytest

from ha.drill import timeline

LOG = """\
Nov 24 20:46:49 [2] node2 corosync notice  [MAIN  ] Corosync Cluster Engine 3.1.7 starting up
Nov 24 21:10:00 [2] node2 corosync info    [KNET  ] link: host: 1 link: 0 is down
Nov 24 21:10:00 [2] node2 corosync notice  [TOTEM ] A new membership (2.2c) was formed. Members left: 1
Nov 24 21:10:00.662 node2 pacemaker-controld  [30] (update_peer_state_iter) \tnotice: Node node1 state is now lost \
| nodeid=1 previous=member source=crm_reap_unseen_nodes
Nov 24 21:10:00.700 node2 pacemaker-controld  [30] (te_fence_node) \tnotice: Requesting fencing (off) targeting \
node node1 | action=7 timeout=60
Nov 24 21:10:01.100 node2 pacemaker-controld  [30] (tengine_stonith_notify) \tnotice: Peer node1 was terminated \
(off) by node2 on behalf of pacemaker-controld.30: OK
Nov 24 21:10:01.662 node2 pacemaker-controld  [30] (te_rsc_command) \tnotice: Initiating start operation \
vip-vip_start_0 locally on node2 | action 9
Nov 24 21:10:01.722 node2 pacemaker-controld  [30] (log_executor_event) \tnotice: Result of start operation for \
vip-vip on node2: ok | CIB update 40
Nov 24 21:10:01.800 node2 pacemaker-controld  [30] (log_executor_event) \tnotice: Result of start operation for \
proxy on node2: ok | CIB update 41
not a log line
"""


def test_events_in_the_window_in_order() -> None:
    since = timeline.line_time("Nov 24 21:09:59 x", 2026)
    assert since is not None
    evs = timeline.events(LOG.splitlines(), since, since + 10, year=2026, node="node2")
    assert [e for _t, e in evs] == [
        "node2: knet: link to node id 1 down (logged to the second)",
        "node2: corosync: new membership 2.2c (left: 1) (logged to the second)",
        "node2: pacemaker: node1 lost",
        "node2: pacemaker: fencing node1 (off) requested",
        "node2: pacemaker: node1 fenced (off) by node2",
        "node2: pacemaker: vip-vip start initiated on node2",
        "node2: pacemaker: vip-vip start on node2: ok",
    ]  # the start-up line is before the window, the proxy's start is not a VIP event
    assert evs[3][0] - evs[2][0] == pytest.approx(0.038, abs=1e-6)  # millisecond stamps kept


def test_the_same_change_logged_twice_is_one_event() -> None:
    line = ("Nov 24 21:10:00.662 node2 pacemaker-controld  [30] (update_peer_state_iter) \tnotice: Node node1 "
            "state is now lost | nodeid=1")  # fmt: skip
    later = line.replace("00.662", "00.700")
    much_later = line.replace("00.662", "03.000")
    since = timeline.line_time("Nov 24 21:09:59 x", 2026)
    assert since is not None
    evs = timeline.events([line, later, much_later], since, since + 10, year=2026)
    assert [round(t - since, 3) for t, _e in evs] == [1.662, 4.0]


def test_line_time_and_clock_mapping() -> None:
    t = timeline.line_time("Nov 24 21:10:00.662 node2 x", 2026)
    assert t == pytest.approx(time.mktime(time.strptime("2026 Nov 24 21:10:00", "%Y %b %d %H:%M:%S")) + 0.662)
    assert timeline.line_time("garbage", 2026) is None
    assert timeline.to_monotonic([(100.5, "x")], 90.0) == [(10.5, "x")]
