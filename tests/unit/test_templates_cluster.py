"""The cluster-wide templates (CIB, corosync.conf, zoo.cfg, myid, inventory) carry the model's values.

Outputs are parsed, not grepped, so a test fails on the property an operator relies on rather than on layout.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from ha import model, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("lab", "production")


def load_data(example: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text())


def build(data: dict[str, Any]) -> model.Cluster:
    return model.parse(data, "<test>", ROOT / "examples")


def files(cluster: model.Cluster) -> dict[str, str]:
    """render_files with the real templates; the proxy config is stubbed only while its template is absent."""
    env = render._env()
    stub = jinja2.DictLoader({"kamailio.cfg.j2": "", "opensips.cfg.j2": ""})
    env.loader = jinja2.ChoiceLoader([env.loader, stub])  # type: ignore[list-item]
    return {o.path: o.text for o in render.render_files(cluster, env)}


def nvpairs(elem: ET.Element) -> dict[str, str]:
    return {nv.get("name", ""): nv.get("value", "") for nv in elem.iter("nvpair")}


def corosync_sections(text: str) -> dict[str, Any]:
    """A tiny corosync.conf reader: nested sections -> dicts, repeated sections -> lists."""
    root: dict[str, Any] = {}
    stack = [root]
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            name, new = line[:-1].strip(), {}
            cur = stack[-1]
            if name in cur:
                cur[name] = cur[name] if isinstance(cur[name], list) else [cur[name]]
                cur[name].append(new)
            else:
                cur[name] = new
            stack.append(new)
        elif line == "}":
            stack.pop()
        else:
            key, _, value = line.partition(":")
            stack[-1][key.strip()] = value.strip()
    assert len(stack) == 1, "unbalanced braces"
    return root


def inventory(text: str) -> dict[str, dict[str, dict[str, str]]]:
    groups: dict[str, dict[str, dict[str, str]]] = {}
    group = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"\[(.+)\]", line):
            group = m.group(1)
            groups[group] = {}
            continue
        assert group is not None
        if group.endswith(":vars"):
            key, _, value = line.partition("=")
            groups[group][key] = {"value": value}
        else:
            host, *pairs = line.split()
            groups[group][host] = dict(p.split("=", 1) for p in pairs)
    return groups


@pytest.fixture(params=EXAMPLES)
def cluster(request: pytest.FixtureRequest) -> model.Cluster:
    return build(load_data(request.param))


def test_cib_cluster_properties(cluster: model.Cluster) -> None:
    cib = ET.fromstring(files(cluster)["cib.xml"])
    assert cib.get("validate-with", "").startswith("pacemaker-3.")
    props = nvpairs(cib.find("configuration/crm_config"))
    assert props["stonith-enabled"] == "true"
    assert props["no-quorum-policy"] == "stop"
    assert props["symmetric-cluster"] == "true"
    assert props["cluster-name"] == cluster.name
    assert props["dc-deadtime"] == f"{cluster.timings.dc_deadtime_ms}ms"
    assert nvpairs(cib.find("configuration/rsc_defaults"))["resource-stickiness"] == str(cluster.timings.stickiness)
    assert "timeout" in nvpairs(cib.find("configuration/op_defaults"))
    assert cib.find("status") is not None
    ids = [e.get("id") for e in cib.iter() if e.get("id")]
    assert len(ids) == len(set(ids)), "CIB ids must be unique"


def test_cib_one_fence_device_per_node_kept_off_its_target(cluster: model.Cluster) -> None:
    cib = ET.fromstring(files(cluster)["cib.xml"])
    fences = [p for p in cib.iter("primitive") if p.get("class") == "stonith"]
    assert len(fences) == len(cluster.nodes)
    bans = {(c.get("rsc"), c.get("node")): c.get("score") for c in cib.iter("rsc_location") if c.get("node")}
    for node in cluster.nodes:
        (dev,) = [f for f in fences if nvpairs(f)["pcmk_host_list"] == node.name]
        assert dev.get("type") == cluster.fencing.agent
        params = nvpairs(dev)
        for key, value in {**cluster.fencing.options, **node.fence_options}.items():
            assert params[key] == value
        assert ("pcmk_delay_base" in params) == (node.name == cluster.fencing.delay_node)
        assert bans[(dev.get("id"), node.name)] == "-INFINITY"


def test_cib_proxy_clone_and_coordinator_clone(cluster: model.Cluster) -> None:
    cib = ET.fromstring(files(cluster)["cib.xml"])
    clones = {c.get("id"): c for c in cib.iter("clone")}
    proxy = clones["proxy-clone"]
    assert nvpairs(proxy.find("meta_attributes"))["interleave"] == "true"
    prim = proxy.find("primitive")
    assert (prim.get("class"), prim.get("provider"), prim.get("type")) == ("ocf", "sipha", "proxy")
    kind = cluster.proxy.kind
    assert nvpairs(prim.find("instance_attributes")) == {
        "kind": kind,
        "config": f"/etc/sipha/{kind}.cfg",
        "shm_mb": str(cluster.proxy.shm_mb),
        "pkg_mb": str(cluster.proxy.pkg_mb),
    }
    (monitor,) = [op for op in prim.iter("op") if op.get("name") == "monitor"]
    assert monitor.get("interval") == f"{cluster.timings.proxy_monitor_ms}ms"
    assert monitor.get("on-fail") == "restart"
    assert monitor.get("timeout")
    coord = clones["coordinator-clone"].find("primitive")
    assert (coord.get("provider"), coord.get("type")) == ("sipha", "coordinator")
    assert nvpairs(coord)["config"] == "/etc/sipha/cluster.yaml"


def test_cib_vips_follow_a_healthy_proxy(cluster: model.Cluster) -> None:
    cib = ET.fromstring(files(cluster)["cib.xml"])
    prims = {p.get("id"): p for p in cib.iter("primitive")}
    colocs = {(c.get("rsc"), c.get("with-rsc")): c.get("score") for c in cib.iter("rsc_colocation")}
    orders = {(o.get("first"), o.get("then")): o.get("kind") for o in cib.iter("rsc_order")}
    rules = {loc.get("rsc"): loc.find("rule") for loc in cib.iter("rsc_location") if loc.find("rule") is not None}
    first = f"vip-{cluster.vips[0].name}"
    for i, vip in enumerate(cluster.vips):
        rid = f"vip-{vip.name}"
        prim = prims[rid]
        assert (prim.get("class"), prim.get("provider"), prim.get("type")) == ("ocf", "sipha", "vip")
        params = nvpairs(prim)
        assert (params["ip"], params["cidr_netmask"], params["nic"]) == (vip.ip, str(vip.prefix), vip.interface)
        assert int(params["arp_count"]) >= 1 and int(params["arp_interval"]) < 200  # faster than the default
        (monitor,) = prim.iter("op")
        assert monitor.get("interval") == f"{cluster.timings.vip_monitor_ms}ms"
        assert colocs[(rid, "proxy-clone")] == "INFINITY"
        # no order: it would make a failover's VIP start wait for the hung proxy's recovery (templates/cib.xml.j2)
        assert ("proxy-clone", rid) not in orders
        rule = rules[rid]
        assert rule.get("score") == "-INFINITY"
        (expr,) = rule.iter("expression")
        assert expr.attrib | {"id": ""} == {
            "id": "", "attribute": "sipha-health", "operation": "lte", "value": "0", "type": "number",
        }  # fmt: skip
        if i:
            assert colocs[(rid, first)] == "INFINITY"


def test_cib_escapes_values() -> None:
    data = load_data("production")
    data["nodes"][0]["fence_options"]["password"] = "a<b>&\"c'"
    cib = ET.fromstring(files(build(data))["cib.xml"])
    (dev,) = [p for p in cib.iter("primitive") if p.get("id") == "fence-sip-a"]
    assert nvpairs(dev)["password"] == "a<b>&\"c'"


def test_corosync_conf(cluster: model.Cluster) -> None:
    conf = corosync_sections(files(cluster)["corosync.conf"])
    totem = conf["totem"]
    assert totem["version"] == "2"
    assert totem["cluster_name"] == cluster.name
    assert (totem["transport"], totem["crypto_cipher"], totem["crypto_hash"]) == ("knet", "aes256", "sha256")
    assert totem["token"] == str(cluster.timings.token_ms)
    assert totem["consensus"] == str(cluster.timings.consensus_ms)
    nodes = conf["nodelist"]["node"]
    assert [(n["name"], n["ring0_addr"], n["nodeid"]) for n in nodes] == [
        (n.name, n.ip, str(i)) for i, n in enumerate(cluster.nodes, 1)
    ]
    quorum = conf["quorum"]
    assert quorum["provider"] == "corosync_votequorum"
    assert "two_node" not in quorum
    net = quorum["device"]["net"]
    assert quorum["device"]["model"] == "net"
    assert (net["host"], net["port"], net["algorithm"]) == (cluster.witness.ip, "5403", "ffsplit")
    log = conf["logging"]
    assert (log["to_syslog"], log["to_logfile"], log["to_stderr"]) == ("no", "yes", "no")
    assert log["logfile"] == "/var/log/corosync/corosync.log"


def test_two_node_without_witness() -> None:
    data = load_data("lab")
    del data["witness"]
    data.pop("failover", None)  # the fast claim needs a witness
    data["zookeeper"]["members"] = ["node1"]
    out = files(build(data))
    quorum = corosync_sections(out["corosync.conf"])["quorum"]
    assert quorum["two_node"] == "1"
    assert "device" not in quorum
    inv = inventory(out["inventory.ini"])
    assert inv["witnesses"] == {}
    assert list(inv["cluster:children"]) == ["nodes", "witnesses"]


def test_zookeeper(cluster: model.Cluster) -> None:
    out = files(cluster)
    cfg = dict(line.split("=", 1) for line in out["zoo.cfg"].splitlines() if line and not line.startswith("#"))
    zk = cluster.zookeeper
    assert cfg["tickTime"] == str(zk.tick_ms)
    assert cfg["dataDir"] == zk.data_dir
    assert cfg["clientPort"] == str(zk.client_port)
    assert cfg["admin.enableServer"] == "false"
    assert set(cfg["4lw.commands.whitelist"].split(",")) == {"srvr", "mntr", "ruok", "stat"}
    assert int(cfg["minSessionTimeout"]) <= zk.session_timeout_ms <= int(cfg["maxSessionTimeout"])
    servers = {k: v for k, v in cfg.items() if k.startswith("server.")}
    assert servers == {
        f"server.{cluster.zk_myid(m.name)}": f"{m.ip}:{zk.peer_port}:{zk.election_port}" for m in cluster.zk_members
    }
    for m in cluster.zk_members:
        assert out[f"{m.name}/zookeeper-myid"] == f"{cluster.zk_myid(m.name)}\n"


def test_inventory(cluster: model.Cluster) -> None:
    inv = inventory(files(cluster)["inventory.ini"])
    assert list(inv["nodes"]) == [n.name for n in cluster.nodes]
    assert list(inv["cluster:children"]) == ["nodes", "witnesses"]
    assert inv["all:vars"]["cluster_name"] == {"value": cluster.name}
    for i, node in enumerate(cluster.nodes, 1):
        hv = inv["nodes"][node.name]
        assert hv["ansible_host"] == node.ssh_host
        assert (hv["ansible_user"], hv["ansible_port"]) == (node.ssh.user, str(node.ssh.port))
        assert hv["corosync_nodeid"] == str(i)
        assert hv["zk_myid"] == str(cluster.zk_myid(node.name))
    w = cluster.witness
    assert inv["witnesses"][w.name]["ansible_host"] == w.ssh_host
    assert inv["witnesses"][w.name]["zk_myid"] == str(cluster.zk_myid(w.name))


def test_model_timing_changes_reach_the_output() -> None:
    data = load_data("lab")
    data["timings"].update(token_ms=450, consensus_ms=540, stickiness=777, vip_monitor_ms=3000)
    data["zookeeper"]["tick_ms"] = 500
    out = files(build(data))
    totem = corosync_sections(out["corosync.conf"])["totem"]
    assert (totem["token"], totem["consensus"]) == ("450", "540")
    cib = ET.fromstring(out["cib.xml"])
    assert nvpairs(cib.find("configuration/rsc_defaults"))["resource-stickiness"] == "777"
    assert cib.find(".//primitive[@id='vip-vip']/operations/op").get("interval") == "3000ms"
    assert "tickTime=500\n" in out["zoo.cfg"]


def test_render_is_deterministic(cluster: model.Cluster) -> None:
    assert files(cluster) == files(cluster)


def test_two_node_fence_race_delays_fencing_of_the_delay_node() -> None:
    data = load_data("lab")
    del data["witness"]
    data.pop("failover", None)  # the fast claim needs a witness
    data["zookeeper"] = {"members": ["node1"]}
    data["fencing"] = {"agent": "fence_sipha_lab", "delay_node": "node2", "delay_ms": 2500}
    cib = ET.fromstring(files(build(data))["cib.xml"])
    delays = {
        nvpairs(p)["pcmk_host_list"]: nvpairs(p).get("pcmk_delay_base")
        for p in cib.iter("primitive")
        if p.get("class") == "stonith"
    }
    assert delays == {"node1": None, "node2": "2500ms"}


@pytest.mark.parametrize(("token", "timers"), [(300, (75, 300)), (400, (100, 400)), (500, None), (3000, None)])
def test_knet_ping_timers_stay_above_libknets_timer(token: int, timers: tuple[int, int] | None) -> None:
    data = load_data("lab")
    data["timings"].update(token_ms=token, consensus_ms=token * 12 // 10)
    totem = corosync_sections(files(build(data))["corosync.conf"])["totem"]
    got = (int(totem["interface"]["knet_ping_interval"]), int(totem["interface"]["knet_ping_timeout"])) \
        if "interface" in totem else None
    assert got == timers


def test_qdevice_timeout_comes_from_the_model() -> None:
    data = load_data("lab")
    data["timings"]["qdevice_timeout_ms"] = 4000
    device = corosync_sections(files(build(data))["corosync.conf"])["quorum"]["device"]
    assert device["timeout"] == "4000"
