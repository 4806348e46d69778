"""ha.health.api over real HTTP(S) on 127.0.0.1, and ha.health.cluster's Pacemaker commands run for real against a
file CIB (``CIB_file``) produced by ``crm_simulate``.

API tests use a recording ClusterActions object: the real Pacemaker boundary (a live CIB, attrd) is crossed in
the lab integration test. The non-loopback refusal is tested twice: the decision function, and a real server
bound to 198.51.100.11 inside a network namespace created (and always deleted) here.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ha import model, render
from ha.health.api import ApiServer, mutations_allowed, read_token, serve, tls_context
from ha.health.cluster import ActionError, PacemakerActions, VipCheck, held_vips, parse_crm_mon
from ha.health.metrics import Metrics
from ha.health.probe import Health, Observation, Verdict

ROOT = Path(__file__).resolve().parents[2]
LAB = model.load(ROOT / "examples" / "lab.yaml")


class RecordingActions:
    """Records what the API asked of the cluster; raises when told to, so error paths are exercised."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: ActionError | None = None

    def status(self) -> dict[str, Any]:
        self.calls.append(("status",))
        if self.fail:
            raise self.fail
        return {"nodes": [{"name": "node1", "online": True}, {"name": "node2", "online": True}],
                "vips": {"vip-vip": "node1"}}

    def switchover(self, to: str | None) -> dict[str, Any]:
        self.calls.append(("switchover", to))
        if self.fail:
            raise self.fail
        return {"changed": True, "holder": to or "node2"}

    def maintenance(self, node: str | None, on: bool) -> dict[str, Any]:
        self.calls.append(("maintenance", node, on))
        return {"changed": True, "node": node, "on": on}


class FixedVips(VipCheck):
    def __init__(self, held: list[str]) -> None:
        super().__init__(LAB)
        self._fixed = held

    def held(self) -> list[str]:
        return list(self._fixed)


class Api:
    def __init__(self, tmp: Path, *, tls: ssl.SSLContext | None = None, token: str | None = None) -> None:
        self.token = token if token is not None else secrets.token_urlsafe(32)
        self.token_file = tmp / "api-token"
        self.token_file.write_text(self.token + "\n")
        self.state: dict[str, Any] = {"node": "node1", "health": "healthy", "healthy": True, "history": [],
                                      "peers": {}}
        self.actions = RecordingActions()
        self.metrics = Metrics("node1", ("vip",))
        self.vips = FixedVips(["vip"])
        self.server = ApiServer(("127.0.0.1", 0), cluster=LAB, node="node1", health=lambda: dict(self.state),
                                actions=self.actions, metrics=self.metrics, vip_check=self.vips,
                                token_file=self.token_file, tls=tls)
        self.thread = serve(self.server)
        self.port = self.server.server_address[1]
        self.client_ctx: ssl.SSLContext | None = None

    def request(self, method: str, path: str, body: Any = None, token: str | None = "",
                raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        if self.server.tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5,
                                                                            context=self.client_ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        hdrs = dict(headers or {})
        if token == "":
            token = self.token
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type") or ""
        parsed = json.loads(payload) if ctype.startswith("application/json") and payload else payload.decode()
        return resp.status, dict(resp.getheaders()), parsed

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(tmp_path)
    try:
        yield a
    finally:
        a.close()


# ---------------------------------------------------------------------------------------------- read-only routes


def test_health_code_carries_the_answer(api: Api) -> None:
    status, _, body = api.request("GET", "/health", token=None)
    assert status == 200 and body["health"] == "healthy"
    api.state.update(health="unhealthy", healthy=False)
    status, _, body = api.request("GET", "/health", token=None)
    assert status == 503 and body["health"] == "unhealthy"
    status, headers, _ = api.request("HEAD", "/health", token=None)
    assert status == 503 and int(headers["Content-Length"]) > 0


def test_active_follows_vip_ownership(api: Api) -> None:
    assert api.request("GET", "/active", token=None)[0] == 200
    api.vips._fixed = []
    status, _, body = api.request("GET", "/active", token=None)
    assert status == 503 and body["active"] is False


def test_cluster_merges_pacemaker_and_history(api: Api) -> None:
    api.state["history"] = [{"from": "unknown", "to": "healthy"}]
    status, _, body = api.request("GET", "/cluster", token=None)
    assert status == 200
    assert body["vip_holder"] == "node1" and body["roles"] == {"node1": "active", "node2": "standby"}
    assert body["history"] == [{"from": "unknown", "to": "healthy"}]
    api.actions.fail = ActionError(502, "crm_mon: exit 102: Not connected")
    status, _, body = api.request("GET", "/cluster", token=None)
    assert status == 503 and "Not connected" in body["pacemaker"]["error"]


def test_metrics_parse_as_prometheus_text(api: Api) -> None:
    m = api.metrics
    m.observe("node1", Observation("udp", "udp:x", Verdict.OK, 200, 0.7, "200 OK"))
    m.observe("node1", Observation("tcp", "tcp:x", Verdict.DEAD, None, 80, "no answer"))
    m.health_changed(Health.HEALTHY)
    m.set_vips(("vip",), ["vip"])
    status, headers, text = api.request("GET", "/metrics", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("sipha_health", ())] == 1
    assert samples[("sipha_vip_holder", (("vip", "vip"),))] == 1
    assert samples[("sipha_health_transitions_total", (("to", "healthy"),))] == 1
    assert samples[("sipha_probe_failures_total", (("node", "node1"), ("transport", "tcp"), ("verdict", "dead")))] == 1
    assert samples[("sipha_probe_latency_seconds_count", (("node", "node1"), ("transport", "udp")))] == 1
    assert families["sipha_probe_latency_seconds"].type == "histogram"


# ---------------------------------------------------------------------------------------------- bad requests


def test_bad_requests_are_4xx_json_without_side_effect(api: Api) -> None:
    cases = [
        ("GET", "/nope", None, "", None, 404),
        ("GET", "/../etc/passwd", None, "", None, 404),
        ("POST", "/health", {}, "", None, 405),
        ("GET", "/switchover", None, "", None, 405),
        ("DELETE", "/maintenance", None, "", None, 405),
        ("POST", "/switchover", {"to": "node2"}, None, None, 401),
        ("POST", "/switchover", {"to": "node2"}, "wrong-token", None, 401),
        ("POST", "/switchover", None, "", b"{not json", 400),
        ("POST", "/switchover", None, "", b"[1]", 400),
        ("POST", "/switchover", {"to": "node9"}, "", None, 400),
        ("POST", "/switchover", {"to": 7}, "", None, 400),
        ("POST", "/switchover", {"to": "node2", "force": True}, "", None, 400),
        ("POST", "/maintenance", {"node": "node1"}, "", None, 400),
        ("POST", "/maintenance", {"node": "node1", "on": "yes"}, "", None, 400),
        ("POST", "/maintenance", {"node": "nodeX", "on": True}, "", None, 400),
        ("POST", "/maintenance", None, "", b"x" * (65 * 1024), 413),
    ]
    for method, path, body, token, raw, want in cases:
        status, headers, got = api.request(method, path, body, token=token, raw=raw)
        assert status == want, (method, path, body, got)
        assert isinstance(got, dict) and got["error"], got
        if want == 405:
            assert "Allow" in headers
        if want == 401:
            assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert api.actions.calls == []


def test_mutations_with_token(api: Api) -> None:
    status, _, body = api.request("POST", "/switchover", {"to": "node2"})
    assert status == 200 and body["holder"] == "node2"
    assert api.request("POST", "/switchover")[0] == 200  # no body: "anywhere else"
    assert api.request("POST", "/maintenance", {"node": "node1", "on": True})[0] == 200
    assert api.request("POST", "/maintenance", {"on": False})[0] == 200
    assert api.actions.calls == [("switchover", "node2"), ("switchover", None), ("maintenance", "node1", True),
                                 ("maintenance", None, False)]
    api.actions.fail = ActionError(504, "vip-vip still on node1 after 30 s")
    status, _, body = api.request("POST", "/switchover", {"to": "node2"})
    assert status == 504 and "still on node1" in body["error"]


def test_short_or_missing_token_file_disables_mutations(tmp_path: Path) -> None:
    a = Api(tmp_path, token="short")
    try:
        status, _, body = a.request("POST", "/switchover", {"to": "node2"})
        assert status == 403 and "no usable token" in body["error"]
        assert a.actions.calls == []
    finally:
        a.close()
    assert read_token(tmp_path / "missing") is None


def test_mutations_allowed_decision() -> None:
    assert mutations_allowed("127.0.0.1", tls=False)[0]
    assert mutations_allowed("127.0.0.53", tls=False)[0]
    assert mutations_allowed("::1", tls=False)[0]
    ok, why = mutations_allowed("198.51.100.11", tls=False)
    assert not ok and "rest.tls" in why
    assert not mutations_allowed("0.0.0.0", tls=False)[0]  # any-address: not loopback
    assert mutations_allowed("198.51.100.11", tls=True)[0]


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    crt, key = tmp_path / "api.crt", tmp_path / "api.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return crt, key


def test_tls_listener(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    crt, key = cert
    a = Api(tmp_path, tls=tls_context(crt, key))
    try:
        a.client_ctx = ssl.create_default_context(cafile=str(crt))
        assert a.request("GET", "/health", token=None)[0] == 200
        assert a.request("POST", "/maintenance", {"node": "node2", "on": True})[0] == 200
        assert a.request("POST", "/maintenance", {"node": "node2", "on": True}, token="bad")[0] == 401
        # a client that does not trust the certificate never gets an answer
        with pytest.raises(ssl.SSLError):
            a.client_ctx = ssl.create_default_context()
            a.request("GET", "/health", token=None)
        # plain HTTP to the TLS port: the handshake fails, the server keeps serving
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/health")
            conn.getresponse()
        conn.close()
        a.client_ctx = ssl.create_default_context(cafile=str(crt))
        assert a.request("GET", "/health", token=None)[0] == 200
    finally:
        a.close()


# ---------------------------------------------------------------------------------------------- a namespace


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for a network namespace")
    name = f"sipha-t-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                    ["addr", "add", "198.51.100.11/24", "dev", "d0"], ["addr", "add", "198.51.100.10/24", "dev", "d0"],
                    ["link", "set", "d1", "up"], ["link", "set", "d0", "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def addresses_in(ns: str) -> Callable[[], set[str]]:
    """Another namespace's addresses, for an address check running in the test's own namespace (the checks
    themselves read the namespace they run in: see the next test): the same netlink dump, made from a thread
    switched into ``ns``; raises OSError as they do."""
    from ha.lab.node import in_netns
    from ha.netaddr import ipv4_addresses

    return lambda: in_netns(ns, ipv4_addresses)


def test_vip_check_reads_real_interfaces(netns: str) -> None:
    check = VipCheck(LAB, addresses=addresses_in(netns))
    assert check.held() == ["vip"] and check.error == ""
    assert VipCheck(LAB).held() == []  # the host itself has no lab address (its own netlink dump)
    subprocess.run(["ip", "-n", netns, "addr", "del", "198.51.100.10/24", "dev", "d0"], check=True)
    assert VipCheck(LAB, max_age_s=0, addresses=addresses_in(netns)).held() == []
    broken = VipCheck(LAB, addresses=addresses_in("sipha-t-absent"))
    assert broken.held() == [] and broken.error.startswith("cannot list this host's addresses")
    # In the namespace itself, the real check (a netlink dump there) finds the VIP that is still configured.
    subprocess.run(["ip", "-n", netns, "addr", "add", "198.51.100.10/24", "dev", "d0"], check=True)
    probe = "from ha import model; from ha.health.cluster import VipCheck; " \
            f"print(VipCheck(model.load({str(ROOT / 'examples' / 'lab.yaml')!r})).held())"
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30, check=True, cwd=ROOT)  # fmt: skip
    assert out.stdout.strip() == "['vip']"


def test_plain_http_on_non_loopback_refuses_mutations(netns: str, tmp_path: Path) -> None:
    """A real server bound to 198.51.100.11 inside the namespace; the client runs there too."""
    token = secrets.token_urlsafe(32)
    (tmp_path / "tok").write_text(token)
    server = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ha import model
        from ha.health.api import ApiServer, serve
        from ha.health.metrics import Metrics
        from ha.health.cluster import VipCheck
        class A:
            def status(self): return {{}}
            def switchover(self, to): print("SIDE EFFECT", flush=True); return {{}}
            def maintenance(self, node, on): print("SIDE EFFECT", flush=True); return {{}}
        lab = model.load({str(ROOT / "examples" / "lab.yaml")!r})
        s = ApiServer(("198.51.100.11", 8008), cluster=lab, node="node1", health=lambda: {{"healthy": True}},
                      actions=A(), metrics=Metrics("node1"), vip_check=VipCheck(lab),
                      token_file=Path({str(tmp_path / "tok")!r}))
        serve(s)
        print("READY", flush=True)
        sys.stdin.read()
    """)
    client = textwrap.dedent(f"""
        import http.client, json
        for method, path in (("GET", "/health"), ("POST", "/switchover")):
            c = http.client.HTTPConnection("198.51.100.11", 8008, timeout=5)
            c.request(method, path, body=b"{{}}", headers={{"Authorization": "Bearer {token}"}})
            r = c.getresponse()
            print(r.status, json.loads(r.read())["error" if r.status >= 400 else "healthy"])
    """)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", server], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", client], capture_output=True,
                             text=True, timeout=30, check=True).stdout.splitlines()
        assert out[0] == "200 True"
        assert out[1].startswith("403 ") and "non-loopback" in out[1]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    assert "SIDE EFFECT" not in (proc.stdout.read() if proc.stdout else "")


def test_held_vips_names_the_vips_whose_address_is_here() -> None:
    assert held_vips(LAB, {"127.0.0.1", "198.51.100.11", "198.51.100.10"}) == ["vip"]
    assert held_vips(LAB, set()) == []


# ---------------------------------------------------------------------------------------------- Pacemaker, file CIB


@pytest.fixture
def cib(tmp_path: Path) -> Path:
    """A CIB with both nodes online and every resource started, made by Pacemaker's own crm_simulate."""
    if not shutil.which("crm_simulate") or not shutil.which("crm_resource"):
        pytest.skip("pacemaker tools not installed")
    render.write(LAB, tmp_path / "r")
    out = tmp_path / "cib-running.xml"
    subprocess.run(["crm_simulate", "-x", str(tmp_path / "r" / "cib.xml"), "--node-up", "node1", "--node-up",
                    "node2", "--quorum", "true", "-S", "-O", str(out)], check=True, capture_output=True)
    return out


def test_crm_mon_xml_parsed(cib: Path) -> None:
    xml = subprocess.run(["crm_mon", "--output-as=xml", "--inactive"], env={**os.environ, "CIB_file": str(cib)},
                         capture_output=True, text=True, check=True).stdout
    st = parse_crm_mon(xml, ["vip-vip"])
    assert [n["name"] for n in st["nodes"]] == ["node1", "node2"] and all(n["online"] for n in st["nodes"])
    assert st["vips"]["vip-vip"] in ("node1", "node2")
    assert any(t["resource"] == "vip-vip" and t["task"] == "start" for t in st["transitions"])
    assert not st["maintenance_mode"] and st["bans"] == []


def test_pacemaker_actions_real_commands_on_file_cib(cib: Path) -> None:
    acts = PacemakerActions(LAB, env={"CIB_file": str(cib)}, move_timeout_s=0.3, poll_s=0.1)
    holder = acts.vip_holder()
    other = "node2" if holder == "node1" else "node1"
    assert acts.switchover(holder)["changed"] is False
    # The move itself is accepted by crm_resource (the constraint appears) ...
    def cli_constraints() -> list[str]:
        xml = acts.run(["cibadmin", "--query", "--scope", "constraints"])
        ids = [c.get("id", "") for c in ET.fromstring(xml).iter("rsc_location")]
        return sorted(i for i in ids if i.startswith("cli-"))

    acts.run(acts.move_command(other))
    assert cli_constraints() == ["cli-prefer-vip-vip"]
    acts.run(acts.clear_command())
    assert cli_constraints() == []
    # ... and a switchover that cannot complete (no cluster runs the file CIB) reports 504 and leaves no constraint.
    with pytest.raises(ActionError) as err:
        acts.switchover(other)
    assert err.value.status == 504
    assert cli_constraints() == []
    acts.maintenance("node2", True)
    nodes = {n["name"]: n for n in acts.status()["nodes"]}
    assert nodes["node2"]["standby"] and not nodes["node1"]["standby"]
    acts.maintenance("node2", False)
    assert not {n["name"]: n for n in acts.status()["nodes"]}["node2"]["standby"]
    acts.maintenance(None, True)
    assert acts.status()["maintenance_mode"]
    (cib.parent / "garbage.xml").write_text("not a CIB")
    with pytest.raises(ActionError) as err:
        PacemakerActions(LAB, env={"CIB_file": str(cib.parent / "garbage.xml")}).status()
    assert err.value.status == 502 and "Could not connect to the CIB" in err.value.message  # crm_mon exited 0
