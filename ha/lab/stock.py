"""``sipha lab up --stock``: the comparison baseline, the way a cluster is usually built from stock parts.

* corosync token 3000 ms (consensus 3600), the stock default;
* one group: ``ocf:heartbeat:IPaddr2`` then ``ocf:heartbeat:kamailio`` (so Kamailio stops and starts with the
  VIP: no warm standby), both monitored every 10 s;
* fencing and everything else as the model renders it (fencing devices are kept from the rendered CIB).

Only the lab uses this; the numbers it gives are the "before" beside sipha's "after".
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

from ha import model

STOCK_TOKEN_MS = 3000
STOCK_CONSENSUS_MS = 3600
STOCK_MONITOR = "10s"


def cluster(c: model.Cluster) -> model.Cluster:
    """The model with stock corosync timings (render then writes token 3000 into corosync.conf)."""
    timings = c.timings.model_copy(update={"token_ms": STOCK_TOKEN_MS, "consensus_ms": STOCK_CONSENSUS_MS})
    return c.model_copy(update={"timings": timings})


def _nv(parent: ET.Element, rid: str, name: str, value: str) -> None:
    ET.SubElement(parent, "nvpair", {"id": f"{rid}-{name}", "name": name, "value": value})


def _primitive(parent: ET.Element, rid: str, agent: str, params: dict[str, str]) -> None:
    p = ET.SubElement(parent, "primitive", {"id": rid, "class": "ocf", "provider": "heartbeat", "type": agent})
    ia = ET.SubElement(p, "instance_attributes", {"id": f"{rid}-params"})
    for k, v in params.items():
        _nv(ia, rid, k, v)
    ops = ET.SubElement(p, "operations")
    ET.SubElement(ops, "op", {"id": f"{rid}-monitor", "name": "monitor", "interval": STOCK_MONITOR, "timeout": "30s"})
    ET.SubElement(ops, "op", {"id": f"{rid}-start", "name": "start", "interval": "0s", "timeout": "60s"})
    ET.SubElement(ops, "op", {"id": f"{rid}-stop", "name": "stop", "interval": "0s", "timeout": "60s"})


def cib(c: model.Cluster, rendered_cib: str, fence_installed: bool, step: Callable[[str], None]) -> str:
    root = ET.fromstring(rendered_cib)  # noqa: S314 - our own render
    resources = root.find("configuration/resources")
    constraints = root.find("configuration/constraints")
    assert resources is not None and constraints is not None
    keep = {p.get("id") for p in resources if p.tag == "primitive" and p.get("class") == "stonith"}
    if not fence_installed:
        keep = set()
        for nv in root.iter("nvpair"):
            if nv.get("name") == "stonith-enabled":
                nv.set("value", "false")
    for r in list(resources):
        if r.get("id") not in keep:
            resources.remove(r)
    for con in list(constraints):
        if con.get("rsc") not in keep:
            constraints.remove(con)
    vip = c.vips[0]
    group = ET.SubElement(resources, "group", {"id": "sip"})
    _primitive(group, "vip", "IPaddr2", {"ip": vip.ip, "cidr_netmask": str(vip.prefix), "nic": vip.interface})
    port = str(c.proxy.listen.udp or 5060)
    proto = "udptcp" if c.proxy.listen.tcp else "udp"
    _primitive(group, "kamailio", "kamailio", {
        "conffile": "/etc/sipha/kamailio.cfg", "listen_address": vip.ip, "monitoring_ip": vip.ip, "port": port,
        "proto": proto, "kamctlrc": "", "extra_options": f"-m {c.proxy.shm_mb} -M {c.proxy.pkg_mb}",
    })  # fmt: skip
    step(f"  stock CIB: group sip = IPaddr2 + ocf:heartbeat:kamailio, monitors {STOCK_MONITOR}, "
         f"token {STOCK_TOKEN_MS} ms, stonith {'on' if fence_installed else 'off'}")  # fmt: skip
    return ET.tostring(root, encoding="unicode")


MONITOR_ANSWER = (
    'request_route {\n\t# lab stock variant: ocf:heartbeat:kamailio probes with sipsak OPTIONS sip:monitor@IP, which\n'
    '\t# the generated config would route to the location table (404 -> the stock monitor fails).\n'
    '\tif (is_method("OPTIONS") && $rU == "monitor") { sl_send_reply("200", "OK"); exit; }\n'
)


def kamailio_cfg(text: str) -> str:
    """The rendered Kamailio config with one line added so the stock agent's sipsak monitor gets its 200."""
    return text.replace("request_route {\n", MONITOR_ANSWER, 1)
