"""The fast failure path in the lab (issues 4 and 5): the health service's sipha-health attribute drives the VIP.

Every node runs ``sipha health run /etc/sipha/cluster.yaml --node NAME`` (started by its init, token in its own
/etc/sipha/api-token). Each test starts from a settled cluster (both proxies and coordinators started, one VIP,
sipha-health=1 on both nodes) and leaves one behind. The client probes the VIP every 20 ms; gaps are printed.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from labhelp import (
    NODES,
    api,
    cleanup,
    health,
    health_attrs,
    node_sh,
    other,
    settled,
    signal_proxy,
    token,
    wait_for,
    wait_settled,
)

from ha.lab import lab as labmod

pytestmark = pytest.mark.lab


@pytest.fixture
def lab_ok(lab: dict[str, Any]) -> Any:
    """A settled cluster before the test, and again after it (whatever the test did)."""
    wait_settled(lab, 60)
    yield lab
    # Pacemaker recovers a broken proxy by itself; a cleanup while that recovery runs would make it forget the
    # result, so it is only the fallback
    try:
        wait_settled(lab, 40)
    except AssertionError:
        cleanup(lab)
        wait_settled(lab, 60)


def test_clones_started_and_force_check(lab_ok: dict[str, Any]) -> None:
    st = labmod.crm_status(lab_ok)
    for rid, agent in (("proxy", "ocf:sipha:proxy"), ("coordinator", "ocf:sipha:coordinator")):
        rs = [r for r in st["resources"] if r["id"] == rid]
        assert {n for r in rs if r["role"] == "Started" for n in r["nodes"]} == set(NODES), rs
        assert all(r["agent"] == agent for r in rs), rs
    p = subprocess.run([*labmod.nsenter_argv(lab_ok, "node1"), "crm_mon", "-1", "-r"], capture_output=True,
                       text=True, timeout=10)  # fmt: skip
    print(p.stdout)
    assert "Clone Set: proxy-clone [proxy]" in p.stdout and "Started: [ node1 node2 ]" in p.stdout, p.stdout
    for rid in ("proxy", "coordinator"):
        p = node_sh(lab_ok, "node1", f"crm_resource --force-check -r {rid}", timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr
    assert health_attrs(lab_ok) == {"node1": "1", "node2": "1"}
    holder = labmod.vip_holder(lab_ok)
    for n in NODES:
        h = health(lab_ok, n)
        assert h["healthy"] and h["attribute"]["written"] == 1, h

        def replication_seen(n: str = n) -> dict[str, Any] | None:
            """The local coordinator's status as the health service last read it from its socket (each second,
            ha.health.replication): ready, connected, active on the VIP holder only, not shedding."""
            r = health(lab_ok, n)["replication"]
            ok = r.get("error") is None and r.get("zookeeper") == "connected" and r.get("ready") is True
            return r if ok and r.get("active") is (n == holder) and r.get("shedding") is False else None

        wait_for(replication_seen, 10, f"{n}'s health service showing its coordinator's replication state", 0.5)
    _status, metrics = api(lab_ok, holder, "GET", "/metrics")
    assert "sipha_replication_shedding 0.0" in metrics and "sipha_replication_zookeeper_connected 1.0" in metrics


def _unhealthy_seen(spec: dict[str, Any], node: str, since: str) -> bool:
    """The node's health service recorded a change to unhealthy at/after ``since`` (ISO, its own clock)."""
    hist = health(spec, node)["history"]
    return any(t["kind"] == "health" and t["to"] == "unhealthy" and t["at"] >= since for t in hist)


def _now_iso() -> str:
    from ha.health.service import iso

    return iso(time.time() - 0.01)


def test_sigstop_moves_vip_and_sigcont_does_not_move_it_back(lab_ok: dict[str, Any]) -> None:
    holder = labmod.vip_holder(lab_ok)
    peer = other(holder)
    since = _now_iso()
    pgid: dict[str, int] = {}

    def stop() -> None:
        pgid["v"] = signal_proxy(lab_ok, holder, "STOP")

    res = labmod.probed(lab_ok, stop, after=8.0, until=lambda: labmod.vip_holder(lab_ok) == peer)
    print("SIGSTOP:", res)
    try:
        assert labmod.vip_holder(lab_ok) == peer, res
        assert res["first_answer_after_fault_ms"] is not None, res
        assert _unhealthy_seen(lab_ok, holder, since), health(lab_ok, holder)["history"]
    finally:
        signal_proxy(lab_ok, holder, "CONT", pgid.get("v"))
    # healthy again (the agent's monitor may also have restarted the hung proxy), and the VIP stays (stickiness)
    wait_for(lambda: health_attrs(lab_ok).get(holder) == "1", 30, f"{holder} healthy again")
    time.sleep(3)
    assert labmod.vip_holder(lab_ok) == peer, "the VIP moved back after SIGCONT: stickiness broken"


def test_kill9_moves_vip_and_pacemaker_restarts_the_proxy(lab_ok: dict[str, Any]) -> None:
    holder = labmod.vip_holder(lab_ok)
    peer = other(holder)
    old = {}

    def kill() -> None:
        old["pgid"] = signal_proxy(lab_ok, holder, "KILL")

    res = labmod.probed(lab_ok, kill, after=8.0, until=lambda: labmod.vip_holder(lab_ok) == peer)
    print("kill -9:", res)
    assert labmod.vip_holder(lab_ok) == peer, res
    assert res["first_answer_after_fault_ms"] is not None, res

    def restarted() -> bool:
        p = node_sh(lab_ok, holder, "cat /run/sipha/kamailio.pid")
        pid = p.stdout.strip()
        return pid.isdigit() and int(pid) != old["pgid"] and settled(lab_ok)

    wait_for(restarted, 45, f"Pacemaker restarted the proxy on {holder}")
    log = labmod.exec_in(lab_ok, holder, ["crm_mon", "-1", "--include=failures"], timeout=10).stdout
    print(log)


def test_one_dropped_probe_never_moves_the_vip(lab_ok: dict[str, Any]) -> None:
    """This kernel has no sch_netem (and no nftables/iptables), so the drop is the health service's test-only
    injection (``--fault-file``, see ha.health.service.ProbeDrops): the next N UDP probes time out unanswered."""
    holder = labmod.vip_holder(lab_ok)
    threshold = 3  # examples/lab.yaml timings.failure_threshold
    for drops in (1, threshold - 1):
        before = health(lab_ok, holder)
        since = _now_iso()
        p = node_sh(lab_ok, holder, f"echo {drops} > {labmod.HEALTH_FAULT_FILE}")
        assert p.returncode == 0, p.stderr
        wait_for(lambda d=drops, b=before: health(lab_ok, holder)["injected_drops"] >= b["injected_drops"] + d,
                 5, f"{drops} probe(s) dropped", 0.1)  # fmt: skip
        time.sleep(1.0)
        after = health(lab_ok, holder)
        assert not _unhealthy_seen(lab_ok, holder, since), after["history"]
        assert after["healthy"], after
        assert labmod.vip_holder(lab_ok) == holder
        assert health_attrs(lab_ok).get(holder) == "1"


def test_rest_api_auth_switchover_metrics_active(lab_ok: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    holder = labmod.vip_holder(lab_ok)
    peer = other(holder)
    assert api(lab_ok, holder, "GET", "/active")[0] == 200
    assert api(lab_ok, peer, "GET", "/active")[0] == 503
    status, text = api(lab_ok, holder, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"sipha_probe_latency_seconds", "sipha_health", "sipha_vip_holder"} <= set(families), sorted(families)
    vip_held = [s.value for s in families["sipha_vip_holder"].samples]
    assert vip_held == [1.0], vip_held
    # no token: 401, nothing moves
    status, text = api(lab_ok, holder, "POST", "/switchover", body={})
    assert status == 401, text
    status, text = api(lab_ok, holder, "POST", "/switchover", token="x" * 43, body={})
    assert status == 401, text
    time.sleep(2)
    assert labmod.vip_holder(lab_ok) == holder
    # the token: the VIP moves, and the client barely notices
    tok = token(lab_ok, holder)
    out: dict[str, Any] = {}

    def switch() -> None:
        out["r"] = api(lab_ok, holder, "POST", "/switchover", token=tok, body={"to": peer})

    res = labmod.probed(lab_ok, switch, after=3.0, until=lambda: labmod.vip_holder(lab_ok) == peer)
    print("POST /switchover:", out["r"], res)
    assert out["r"][0] == 200, out["r"]
    assert json.loads(out["r"][1])["holder"] == peer
    assert labmod.vip_holder(lab_ok) == peer
    assert res["longest_gap_ms"] < 1000, res
    st = labmod.crm_status(lab_ok)
    assert st  # the move constraint is cleared by the API: no cli-prefer left behind
    cons = labmod.exec_in(lab_ok, peer, ["cibadmin", "-Q", "-o", "constraints"], timeout=10).stdout
    assert "cli-prefer" not in cons and "cli-ban" not in cons, cons


def test_snmp_role_change_trap_reaches_the_client(lab_ok: dict[str, Any], tmp_path: Any) -> None:
    """snmptrapd in the client namespace (198.51.100.50:162, the model's target) logs the trap numerically."""
    from ha.health.snmp import SIP_HA_NODE_NAME, SIP_HA_ROLE, SIP_HA_ROLE_CHANGE, oid_str

    conf = tmp_path / "snmptrapd.conf"
    conf.write_text("authCommunity log sipha-lab\ndisableAuthorization no\n")
    out = tmp_path / "traps.log"
    ns = labmod.host(lab_ok, "client")["ns"]
    with open(out, "wb") as f:
        trapd = subprocess.Popen(["ip", "netns", "exec", ns, "snmptrapd", "-f", "-On", "-Lo", "-C", "-c", str(conf),
                                  "--doNotRetainNotificationLogs=yes", "udp:198.51.100.50:162"],
                                 stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        time.sleep(1.0)
        assert trapd.poll() is None, out.read_text()
        holder = labmod.vip_holder(lab_ok)
        peer = other(holder)
        status, text = api(lab_ok, holder, "POST", "/switchover", token=token(lab_ok, holder), body={"to": peer})
        assert status == 200, text
        want = oid_str(SIP_HA_ROLE_CHANGE)

        def got() -> bool:  # both: the new active's trap and the old active's (roles are checked every 1 s)
            text = out.read_text(errors="replace")
            return text.count(want) >= 2 and f'"{peer}"' in text and f'"{holder}"' in text

        wait_for(got, 10, f"traps {want} (sipHaRoleChange) from {holder} and {peer} logged by snmptrapd", 0.2)
        text = out.read_text(errors="replace")
        print(text)
        assert oid_str(SIP_HA_NODE_NAME) in text and oid_str(SIP_HA_ROLE) in text
        assert f"{oid_str(SIP_HA_ROLE)}.0 = INTEGER: 1" in text  # active(1), from the new holder
    finally:
        trapd.terminate()
        try:
            trapd.wait(5)
        except subprocess.TimeoutExpired:
            trapd.kill()
            trapd.wait(5)


FLOOD_S = 30


@pytest.mark.skipif(not Path("/usr/bin/svmap").exists() or not Path("/usr/bin/sipp").exists(),
                    reason="needs sipp (sip-tester) and svmap/svwar (sipvicious)")  # fmt: skip
def test_invite_flood_and_scanner_move_nothing(lab_ok: dict[str, Any], tmp_path: Path) -> None:
    """500 INVITE/s from the client (sipp, trusted by the rate limit) plus a sipvicious scan (svmap, svwar)
    against the VIP for 30 s: the VIP stays, the node stays healthy, the scanner gets no answer."""
    vip = lab_ok["vips"][0]
    holder = labmod.vip_holder(lab_ok)
    since = _now_iso()
    ns = ["ip", "netns", "exec", labmod.host(lab_ok, "client")["ns"]]
    calls = 500 * FLOOD_S
    sipp_out = open(tmp_path / "sipp.log", "wb")  # noqa: SIM115 - closed below
    sipp = subprocess.Popen([*ns, "sipp", "-sn", "uac", f"{vip}:5060", "-i", "198.51.100.50", "-r", "500",
                             "-m", str(calls), "-nostdin", "-timeout", f"{FLOOD_S + 15}s", "-timeout_error"],
                            stdout=sipp_out, stderr=subprocess.STDOUT)  # fmt: skip
    holders = set()
    try:
        time.sleep(2)
        scans = {}
        for name, argv in (("svmap", ["svmap", "-p5060", vip]), ("svwar", ["svwar", "-e100-199", "-m", "INVITE", vip])):
            p = subprocess.run([*ns, *argv], capture_output=True, text=True, timeout=FLOOD_S + 30)
            scans[name] = p.stdout + p.stderr
        deadline = time.monotonic() + FLOOD_S - 2
        while time.monotonic() < deadline and sipp.poll() is None:
            holders.add(labmod.vip_holder(lab_ok))
            time.sleep(0.5)
        holders.add(labmod.vip_holder(lab_ok))
    finally:
        if sipp.poll() is None:
            sipp.terminate()
        try:
            sipp.wait(20)
        except subprocess.TimeoutExpired:
            sipp.kill()
            sipp.wait(5)
        sipp_out.close()
    print("svmap:", scans["svmap"][-800:])
    print("svwar:", scans["svwar"][-800:])
    print("sipp:", (tmp_path / "sipp.log").read_text(errors="replace")[-1500:])
    assert holders == {holder}, f"the VIP moved during the flood: {holders}"
    h = health(lab_ok, holder)
    assert not _unhealthy_seen(lab_ok, holder, since), h["history"]
    assert h["healthy"], h
    # the scanner's requests are dropped by the generated config: no device, no extension found
    assert f"{vip}:5060" not in scans["svmap"].split("-----")[-1], scans["svmap"]
    assert "reqauth" not in scans["svwar"] and "noauth" not in scans["svwar"], scans["svwar"]
