"""ha.drill.run and the `sipha drill` command, with a stand-in cluster: a loopback SIP responder that a test
fault silences. Nothing here touches the lab: the CLI tests replace LabControl before it is built.

Also the VIP-ownership sampler's netlink reading, in a throwaway namespace ``sipha-t-<random>``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_drill_faults import HEALTHY, Recorder

from ha import sip
from ha.drill import faults, ownership, run
from ha.drill.faults import ClusterState, DrillError, Fault


class Responder:
    """Answers SIP requests on 127.0.0.1 with 200 (naming node1) unless ``silent``."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.silent = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.silent:
                continue
            req = sip.parse(data)
            if req.is_request and req.method != "ACK":
                self.sock.sendto(sip.response(req, 200, headers=(("X-Sipha-Node", "node1"),)).encode(), addr)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def responder() -> Iterator[Responder]:
    r = Responder()
    try:
        yield r
    finally:
        r.close()


class Ctl(Recorder):
    vip = "127.0.0.1"
    client_ip = "127.0.0.1"

    def __init__(self, r: Responder, state: ClusterState = HEALTHY) -> None:
        super().__init__()
        self.sip_port = r.port
        self.r = r
        self.state = state

    def status(self) -> ClusterState:
        return self.state

    def vip_owners(self) -> dict[str, bool]:
        return {"node1": not self.r.silent, "node2": False}


class Silence(Fault):
    kind = "silence"
    raise_on_inject: type[BaseException] | None = None

    def inject(self) -> str:
        self.injected = True
        self.ctl.r.silent = True  # type: ignore[attr-defined]
        if self.raise_on_inject:
            raise self.raise_on_inject()
        return "responder silenced"

    def undo(self) -> str:
        self.ctl.r.silent = False  # type: ignore[attr-defined]
        self.ctl.log.append(("undo",))  # type: ignore[attr-defined]
        return "responder answers again"


OPTS = run.DrillOptions(fault="node-crash", registrations=0, calls=0, rate=0.0, before_s=0.3, hold_s=0.6,
                        after_s=0.4)  # fmt: skip


def test_one_drill_measures_the_silence(responder: Responder) -> None:
    ctl = Ctl(responder)
    lines: list[str] = []
    doc = run.run_once(ctl, OPTS, lines.append, lambda k, n, c: Silence(node=n, ctl=c))
    f = doc["figures"]
    assert f["recovered"] and 0.5 <= f["gap_ms"] / 1000 <= 0.9, f["gap_ms"]
    assert f["first_answer_new_node_ms"] is None  # node1 answered before and after: the VIP never moved
    assert f["split_brain_samples"] == 0 and f["details"]["split_brain"]["vip_nowhere_samples"] > 20
    assert [e["event"] for e in doc["timeline"] if "fault" in e["event"] or "undo" in e["event"]] == [
        "fault injected", "undo started", "fault undone"]  # fmt: skip
    assert doc["target"] == "node1" and doc["old_node"] == "node1" and not doc["interrupted"]
    assert ctl.log == [("undo",)] and "responder silenced" in lines
    json.dumps(doc)  # the whole document is JSON


def test_undo_runs_when_inject_fails_and_after_ctrl_c(responder: Responder) -> None:
    for exc, interrupted in ((DrillError, False), (KeyboardInterrupt, True)):
        ctl = Ctl(responder)

        def broken(k: str, n: str, c: Any, e: type[BaseException] = exc) -> Fault:
            f = Silence(node=n, ctl=c)
            f.raise_on_inject = e
            return f

        doc = run.run_once(ctl, OPTS, lambda _m: None, broken)
        assert ctl.log == [("undo",)], exc
        assert doc["interrupted"] is interrupted and not responder.silent
        assert doc["figures"]["probes_sent"] > 5  # what was measured before is reported


def test_refuses_an_unhealthy_cluster_and_bad_input(responder: Responder) -> None:
    ctl = Ctl(responder, ClusterState(**{**HEALTHY.__dict__, "vip_holders": ()}))
    with pytest.raises(DrillError, match=r"^the cluster is not healthy, not starting a drill: VIP .* is nowhere$"):
        run.run(ctl, OPTS)
    assert not responder.silent and ctl.log == []
    with pytest.raises(DrillError, match="unknown fault"):
        run.run(ctl, run.DrillOptions(fault="meteor"))
    with pytest.raises(DrillError, match="calls need at least one registration"):
        run.run(ctl, run.DrillOptions(fault="node-crash", registrations=0, calls=3))
    with pytest.raises(DrillError, match="--baseline runs against the stock lab"):
        run.run(Ctl(responder), run.DrillOptions(fault="node-crash", baseline=True))


def test_repeat_aggregates_and_stops_when_the_cluster_does_not_recover(responder: Responder) -> None:
    ctl = Ctl(responder)
    res = run.run(ctl, run.DrillOptions(**{**OPTS.__dict__, "repeat": 2, "hold_s": 0.3}),
                  fault_factory=lambda k, n, c: Silence(node=n, ctl=c), sleep=lambda _s: None)  # fmt: skip
    assert res["completed"] == 2 and res["stopped"] is None
    assert res["aggregate"]["gap_ms"]["n"] == 2 and res["aggregate"]["recovered"]["true"] == 2

    class Sick(Ctl):
        n = 0

        def status(self) -> ClusterState:
            self.n += 1
            return HEALTHY if self.n == 1 else ClusterState(**{**HEALTHY.__dict__, "quorate": {}})

    res = run.run(Sick(responder), run.DrillOptions(**{**OPTS.__dict__, "repeat": 3, "settle_timeout_s": 0.0}),
                  fault_factory=lambda k, n, c: Silence(node=n, ctl=c), sleep=lambda _s: None)  # fmt: skip
    assert res["completed"] == 1 and res["stopped"].startswith("after run 1: the cluster did not recover: no quorum")


def test_cli_runs_reports_and_writes_json_and_png(responder: Responder, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import ha.drill.labctl
    from ha.drill.cli import drill

    ctl = Ctl(responder)
    ctl.close = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr(ha.drill.labctl, "LabControl", lambda: ctl)  # never the real lab
    monkeypatch.setattr(faults, "make_fault", lambda k, n, c: Silence(node=n, ctl=c))
    monkeypatch.setattr(run, "make_fault", lambda k, n, c: Silence(node=n, ctl=c))
    args = ["--fault", "node-crash", "--registrations", "0", "--calls", "0", "--rate", "0", "--hold", "0.5",
            "--after", "0.3", "--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png")]  # fmt: skip
    r = CliRunner().invoke(drill, args)
    assert r.exit_code == 0, r.output
    assert "longest gap with no answer at the VIP" in r.output and "run 1/1" in r.output
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["figures"]["recovered"] and (tmp_path / "d.png").stat().st_size > 10000


def test_cli_bad_input_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import ha.drill.labctl
    from ha.drill.cli import drill

    def no_lab() -> Any:
        raise DrillError("no lab is up (start one with `sipha lab up`)")

    monkeypatch.setattr(ha.drill.labctl, "LabControl", no_lab)
    r = CliRunner().invoke(drill, ["--fault", "node-crash"])
    assert r.exit_code == 2 and r.output.strip() == "Error: no lab is up (start one with `sipha lab up`)"
    r = CliRunner().invoke(drill, ["--fault", "meteor"])
    assert r.exit_code == 2 and "'meteor' is not one of" in r.output
    r = CliRunner().invoke(drill, ["--fault", "node-crash", "--registrations", "0", "--calls", "2"])
    assert r.exit_code == 2 and "--calls needs --registrations" in r.output


# ---------------------------------------------------------------------------------------------- ownership


def test_netlink_parse_of_a_crafted_dump() -> None:
    import struct

    attr = struct.pack("=HH", 8, ownership.IFA_LOCAL) + socket.inet_aton("198.51.100.10")
    body = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 2) + attr
    msg = struct.pack("=LHHLL", 16 + len(body), ownership.RTM_NEWADDR, 2, 1, 0) + body
    done = struct.pack("=LHHLL", 20, ownership.NLMSG_DONE, 2, 1, 0) + b"\0\0\0\0"
    assert ownership.parse_addresses(msg + done) == ({"198.51.100.10"}, True)
    assert ownership.parse_addresses(msg) == ({"198.51.100.10"}, False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_namespace_view_sees_the_vip_come_and_go() -> None:
    from ha.lab.node import in_netns

    ns = f"sipha-t-{secrets.token_hex(4)}"

    def ip(*a: str) -> None:
        subprocess.run(["ip", "-n", ns, *a], check=True, capture_output=True, timeout=10)

    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    view = ownership.NamespaceView(ns, in_netns)
    try:
        ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip("link", "set", "d0", "up")
        assert not view.holds("198.51.100.10")
        ip("addr", "add", "198.51.100.10/24", "dev", "d0")
        assert view.holds("198.51.100.10")
        sampler = ownership.OwnershipSampler(lambda: {"n": view.holds("198.51.100.10")}, interval=0.01)
        sampler.start()
        threading.Event().wait(0.15)
        ip("addr", "del", "198.51.100.10/24", "dev", "d0")
        threading.Event().wait(0.1)
        sampler.stop()
        seen = [o["n"] for _t, o in sampler.samples]
        assert seen[0] and not seen[-1] and 15 <= len(seen) <= 40 and sampler.errors == 0
    finally:
        view.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)
    assert not view.holds("198.51.100.10")  # the namespace is gone: nobody holds anything there


def test_cluster_log_events_join_the_timeline(responder: Responder) -> None:
    import time

    class WithLogs(Ctl):
        def log_lines(self, node: str) -> list[str]:
            stamp = time.strftime("%b %d %H:%M:%S", time.localtime(time.time() - 0.5))
            return [f"{stamp}.250 {node} pacemaker-controld  [30] (te_rsc_command) \tnotice: Initiating start "
                    f"operation vip-vip_start_0 locally on {node} | action 9"]  # fmt: skip

    doc = run.run_once(WithLogs(responder), OPTS, lambda _m: None, lambda k, n, c: Silence(node=n, ctl=c))
    got = [e for e in doc["timeline"] if "pacemaker" in e["event"]]
    assert [e["event"] for e in got] == [f"{n}: pacemaker: vip-vip start initiated on {n}" for n in ("node1", "node2")]
    assert all(0 < e["t"] < 5 for e in got)  # on the drill's clock, seconds after the first probe


def test_a_real_ctrl_c_mid_drill_undoes_and_reports(responder: Responder) -> None:
    """SIGINT while the fault holds (asyncio.run cancels the drill): undo runs, sockets close, figures come back."""
    import signal

    class Interrupting(Silence):
        def inject(self) -> str:
            threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            return super().inject()

    ctl = Ctl(responder)
    doc = run.run_once(ctl, OPTS, lambda _m: None, lambda k, n, c: Interrupting(node=n, ctl=c))
    assert doc["interrupted"] and ctl.log == [("undo",)] and not responder.silent
    assert "fault undone" in [e["event"] for e in doc["timeline"]] and "undo started" not in str(doc["timeline"])
    assert doc["figures"]["probes_unanswered"] >= 5  # the silence before Ctrl-C was measured


def test_tcp_stream_reconnects_after_the_connection_drops() -> None:
    """A TCP phone has no SIP retransmits: when its connection dies it must reconnect; so does the stream."""
    import asyncio

    from ha.drill.traffic import Endpoint, OptionsStream

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    stop, drop = threading.Event(), threading.Event()

    def serve() -> None:
        for _ in range(200):  # bounded: at most ~20 s
            if stop.is_set():
                return
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.05)
            buf = b""
            with conn:
                while not stop.is_set() and not drop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    msgs, buf = sip.parse_stream(buf + data)
                    for m in msgs:
                        conn.sendall(sip.response(m, 200).encode())
            drop.clear()

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    async def go() -> OptionsStream:
        ep = Endpoint("tcp", "127.0.0.1", ("127.0.0.1", port), lambda k: socket.socket(socket.AF_INET, k))
        await ep.open()
        stream = OptionsStream(ep, "127.0.0.1", port, interval=0.02, max_samples=100)
        stream.start()
        await asyncio.sleep(0.3)
        drop.set()  # the server closes the connection (a failover: the new node knows no connection)
        await asyncio.sleep(0.5)
        await stream.stop(grace=0.1)
        await ep.close()
        return stream

    try:
        stream = asyncio.run(go())
    finally:
        stop.set()
        t.join(timeout=5)
        srv.close()
    assert stream.reconnects >= 1
    answered = [s for s in stream.samples if s.answered]
    assert answered and answered[-1].sent > stream.samples[0].sent + 0.35  # answers again after the drop


def test_wait_replicated_waits_for_every_peer_and_says_what_is_missing() -> None:
    """The drill's registrations must be on the standby proxies before the fault (else it measures replication
    lag): polled until they are, bounded, and a timeout says which peer lacks how many."""
    calls = {"n": 0}

    def holds(node: str, aors: list[str]) -> set[str] | str:
        calls["n"] += 1
        return set(aors[: calls["n"]])  # one more AoR arrives per poll

    ok, said = run.wait_replicated(holds, ["node2"], ["a", "b", "c"], timeout=5, poll_s=0, sleep=lambda _s: None)
    assert ok and calls["n"] == 3 and "3 registrations on the standby proxies (node2)" in said
    ok, said = run.wait_replicated(lambda _n, _a: {"a"}, ["node2"], ["a", "b"], timeout=0.05, poll_s=0.01)
    assert not ok and "node2: 1 of 2 missing" in said and "injecting anyway" in said
    ok, said = run.wait_replicated(lambda _n, _a: "exit 1", ["node2"], ["a"], timeout=0.02, poll_s=0.01)
    assert not ok and "node2: exit 1" in said
