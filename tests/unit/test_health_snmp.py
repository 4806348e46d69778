"""ha.health.snmp: traps and GETs over real UDP on 127.0.0.1, v2c and v3 (authPriv).

Receivers: pysnmp's own notification receiver (always), and Net-SNMP's snmptrapd writing to a file (when the
Debian package ``snmptrapd`` is installed), so the traps are checked by an independent implementation too. GETs:
pysnmp's get_cmd, and Net-SNMP's snmpget/snmpwalk (package ``snmp``) when installed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import ntfrcv
from pysnmp.proto import rfc1902

from ha.health import snmp as s
from ha.model import Snmp, SnmpV3

ROOT = Path(__file__).resolve().parents[2]
V3 = SnmpV3(user="sipha-ops", auth_key="auth-secret-1", priv_key="priv-secret-1")
STATE = s.NodeState("node1", "active", "unhealthy", "udp dead: no answer within 80 ms")
SHEDDING = s.NodeState("node1", "active", "healthy", "replication behind: REGISTERs over 1200/s answered 503",
                       "shedding")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mib_file_matches_the_code() -> None:
    """Every OID the code sends is the one SIPHA-MIB.txt defines (the MIB is what a NOC loads)."""
    text = (ROOT / "mibs" / "SIPHA-MIB.txt").read_text()
    text = re.sub(r"--[^\n]*", "", text)
    known = {"netSnmpPlaypen": s.NET_SNMP_PLAYPEN}
    kinds = "MODULE-IDENTITY|OBJECT-TYPE|NOTIFICATION-TYPE|OBJECT IDENTIFIER|MODULE-COMPLIANCE|OBJECT-GROUP|" \
            "NOTIFICATION-GROUP"
    pattern = rf"^(\w+)[ \t]+(?:{kinds})\b.*?::=\s*\{{\s*(\w+)\s+(\d+)\s*\}}"
    for name, parent, arc in re.findall(pattern, text, re.S | re.M):
        known[name] = (*known[parent], int(arc))
    assert known["sipHaMIB"] == s.SIPHA_MIB
    for oid, name in s.NAMES.items():
        assert known[name] == oid, name
    assert "OBJECTS     { sipHaNodeName, sipHaRole, sipHaReason }" in text
    assert "OBJECTS     { sipHaNodeName, sipHaHealth, sipHaReason }" in text
    assert "OBJECTS     { sipHaNodeName, sipHaShedding, sipHaReason }" in text
    for label, values in (("sipHaRole", s.ROLE_VALUES), ("sipHaHealth", s.HEALTH_VALUES),
                          ("sipHaShedding", s.SHEDDING_VALUES)):
        enum = re.search(label + r" OBJECT-TYPE\s+SYNTAX\s+INTEGER \{([^}]*)\}", text)
        assert enum is not None
        assert dict((k, int(v)) for k, v in re.findall(r"(\w+)\((\d+)\)", enum.group(1))) == values


def test_engine_id_is_stable_and_rfc3411_text_format() -> None:
    eid = s.engine_id("node1")
    assert eid == s.engine_id("node1") != s.engine_id("node2")
    assert eid[:5] == bytes.fromhex("80001f8804") and 5 <= len(eid) <= 32


# ---------------------------------------------------------------------------------------------- traps


class PysnmpReceiver:
    """pysnmp's NotificationReceiver on 127.0.0.1: collects (oid, value) lists of every trap accepted."""

    def __init__(self, port: int, community: str | None = None, v3: SnmpV3 | None = None, node: str = "node1"):
        self.traps: list[dict[str, Any]] = []
        self.engine = engine.SnmpEngine()
        config.add_transport(self.engine, udp.DOMAIN_NAME, udp.UdpTransport().open_server_mode(("127.0.0.1", port)))
        if community:
            config.add_v1_system(self.engine, "rx", community)
        if v3:
            config.add_v3_user(self.engine, v3.user, s._AUTH[v3.auth_protocol], v3.auth_key,
                               s._PRIV[v3.priv_protocol], v3.priv_key,
                               securityEngineId=rfc1902.OctetString(s.engine_id(node)))

        def cb(snmp_engine, state_ref, ctx_engine_id, ctx_name, var_binds, cb_ctx):  # type: ignore[no-untyped-def]
            self.traps.append({tuple(o): v for o, v in var_binds})

        ntfrcv.NotificationReceiver(self.engine, cb)
        self.engine.transport_dispatcher.job_started(1)

    async def wait(self, n: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.traps) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.engine.transport_dispatcher.job_finished(1)
        self.engine.close_dispatcher()


@pytest.mark.parametrize("version", ["v2c", "v3"])
def test_traps_received_by_pysnmp(version: str) -> None:
    port = free_udp_port()
    cfg = Snmp(targets=(f"127.0.0.1:{port}",), community="c0mm" if version == "v2c" else None,
               v3=V3 if version == "v3" else None)

    async def main() -> list[dict[str, Any]]:
        rx = PysnmpReceiver(port, community=cfg.community, v3=cfg.v3)
        tx = s.TrapSender(cfg, "node1")
        try:
            assert await tx.send("health", STATE) == []
            assert await tx.send("role", STATE) == []
            assert await tx.send("shedding", SHEDDING) == []
            await rx.wait(3)
            return rx.traps
        finally:
            tx.close()
            rx.close()

    traps = asyncio.run(main())
    assert len(traps) == 3
    health, role, shedding = traps
    assert shedding[s.SNMP_TRAP_OID] == rfc1902.ObjectIdentifier(s.SIP_HA_SHEDDING_CHANGE)
    assert int(shedding[(*s.SIP_HA_SHEDDING, 0)]) == s.SHEDDING_VALUES["shedding"]
    assert str(shedding[(*s.SIP_HA_REASON, 0)]) == SHEDDING.reason
    assert health[s.SNMP_TRAP_OID] == rfc1902.ObjectIdentifier(s.SIP_HA_HEALTH_CHANGE)
    assert str(health[(*s.SIP_HA_NODE_NAME, 0)]) == "node1"
    assert int(health[(*s.SIP_HA_HEALTH, 0)]) == s.HEALTH_VALUES["unhealthy"]
    assert str(health[(*s.SIP_HA_REASON, 0)]) == STATE.reason
    assert role[s.SNMP_TRAP_OID] == rfc1902.ObjectIdentifier(s.SIP_HA_ROLE_CHANGE)
    assert int(role[(*s.SIP_HA_ROLE, 0)]) == s.ROLE_VALUES["active"]


def test_wrong_community_trap_is_dropped() -> None:
    port = free_udp_port()

    async def main() -> int:
        rx = PysnmpReceiver(port, community="right")
        tx = s.TrapSender(Snmp(targets=(f"127.0.0.1:{port}",), community="wrong"), "node1")
        try:
            await tx.send("health", STATE)
            await rx.wait(1, timeout=0.5)
            return len(rx.traps)
        finally:
            tx.close()
            rx.close()

    assert asyncio.run(main()) == 0


@pytest.mark.skipif(not shutil.which("snmptrapd"), reason="Debian package snmptrapd not installed")
def test_traps_received_by_net_snmp_snmptrapd(tmp_path: Path) -> None:
    port = free_udp_port()
    conf = tmp_path / "snmptrapd.conf"
    conf.write_text(
        "authCommunity log c0mm\n"
        f"createUser -e 0x{s.engine_id('node1').hex()} {V3.user} SHA-256 {V3.auth_key} AES {V3.priv_key}\n"
        f"authUser log {V3.user} priv\n"
    )
    log = tmp_path / "traps.log"
    env = {**os.environ, "SNMP_PERSISTENT_DIR": str(tmp_path / "state"), "MIBS": "", "MIBDIRS": str(tmp_path)}
    proc = subprocess.Popen(["snmptrapd", "-f", "-C", "-c", str(conf), "-Lf", str(log), "-On", "-m", "",
                             f"udp:127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while "NET-SNMP version" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)

        async def main() -> None:
            for cfg in (Snmp(targets=(f"127.0.0.1:{port}",), community="c0mm"),
                        Snmp(targets=(f"127.0.0.1:{port}",), v3=V3)):
                tx = s.TrapSender(cfg, "node1")
                try:
                    assert await tx.send("health", STATE) == []
                finally:
                    tx.close()

        asyncio.run(main())
        deadline = time.monotonic() + 5
        while log.read_text().count(s.oid_str(s.SIP_HA_HEALTH_CHANGE)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(5)
    text = log.read_text()
    assert text.count(f"OID: .{s.oid_str(s.SIP_HA_HEALTH_CHANGE)}") == 2, text
    assert f'.{s.oid_str(s.SIP_HA_REASON)}.0 = STRING: "{STATE.reason}"' in text
    assert f".{s.oid_str(s.SIP_HA_HEALTH)}.0 = INTEGER: 2" in text


# ---------------------------------------------------------------------------------------------- GET


@pytest.mark.parametrize("version", ["v2c", "v3"])
def test_responder_serves_live_values(version: str, tmp_path: Path) -> None:
    port = free_udp_port()
    cfg = Snmp(community="c0mm") if version == "v2c" else Snmp(v3=V3)
    current = {"state": STATE}

    async def main() -> tuple[dict[str, str], dict[str, str], str]:
        r = s.Responder(cfg, "node1", lambda: current["state"], "127.0.0.1", port)
        try:
            first = await s.snmp_get(cfg, "127.0.0.1", port)
            current["state"] = s.NodeState("node1", "standby", "healthy", "all transports answer", "shedding")
            second = await s.snmp_get(cfg, "127.0.0.1", port)
            net_snmp = ""
            if shutil.which("snmpwalk"):
                auth = (["-v2c", "-c", "c0mm"] if version == "v2c" else
                        ["-v3", "-l", "authPriv", "-u", V3.user, "-a", "SHA-256", "-A", V3.auth_key, "-x", "AES",
                         "-X", V3.priv_key])
                proc = await asyncio.create_subprocess_exec(
                    "snmpwalk", *auth, "-On", "-m", "", "-t", "2", f"127.0.0.1:{port}", s.oid_str(s.SIPHA_MIB),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    env={**os.environ, "SNMP_PERSISTENT_DIR": str(tmp_path), "MIBS": ""},
                )
                out, _ = await proc.communicate()
                net_snmp = out.decode()
            return first, second, net_snmp
        finally:
            r.close()

    first, second, walk = asyncio.run(main())
    assert first == {"sipHaNodeName": "node1", "sipHaRole": "active(1)", "sipHaHealth": "unhealthy(2)",
                     "sipHaReason": STATE.reason, "sipHaShedding": "unknown(3)"}
    assert second["sipHaHealth"] == "healthy(1)" and second["sipHaRole"] == "standby(2)"
    assert second["sipHaShedding"] == "shedding(1)"
    if walk:
        assert f".{s.oid_str(s.SIP_HA_HEALTH)}.0 = INTEGER: 1" in walk
        assert f'.{s.oid_str(s.SIP_HA_NODE_NAME)}.0 = STRING: "node1"' in walk


def test_get_with_wrong_credentials_fails() -> None:
    port = free_udp_port()

    async def main() -> None:
        r = s.Responder(Snmp(community="right"), "node1", lambda: STATE, "127.0.0.1", port)
        try:
            await s.snmp_get(Snmp(community="wrong"), "127.0.0.1", port, timeout=0.3)
        finally:
            r.close()

    with pytest.raises(RuntimeError, match="snmp get"):
        asyncio.run(main())
