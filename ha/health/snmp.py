"""SNMP for the health service: traps on role/health changes, and a GET of the node's state, per SIPHA-MIB.

Why SNMP at all: many SIP operators' NOCs watch everything through an SNMP manager; a trap on each role or
health change, and a scalar they can poll, put sipha into the console they already read.

The OIDs live under ``netSnmpPlaypen`` (NET-SNMP-MIB, 1.3.6.1.4.1.8072.9999.9999), the arc Net-SNMP documents
for private testing. That is a **placeholder**: before production use it must move under a registered IANA
Private Enterprise Number (change :data:`SIPHA_MIB` here and ``sipHaMIB`` in ``mibs/SIPHA-MIB.txt``; nothing
else spells the numbers).

GET choice: a tiny pysnmp command responder (GET/GETNEXT, so ``snmpget`` and ``snmpwalk`` both work) serving
the four ``sipHa*`` scalars on ``snmp.agent_port``, run in the health service's own asyncio loop. It was chosen
over an snmpd ``pass_persist`` script because it needs no snmpd installed and configured on every node, no
second process to keep in sync with the service, and it reads the values straight from the live service state.
Reads use the same credentials as traps: the v2c community (read-only view of the sipHa subtree), or the v3
USM user with authPriv.

pysnmp 7 is asyncio only (``pysnmp.hlapi.v3arch.asyncio``); numeric OIDs are used throughout so no compiled
MIB has to be shipped to pysnmp.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context
from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    UsmUserData,
    get_cmd,
    send_notification,
)
from pysnmp.hlapi.v3arch.asyncio import auth as hauth
from pysnmp.proto import rfc1902

from ha.model import Snmp, SnmpV3

log = logging.getLogger("sipha.health.snmp")

# ---------------------------------------------------------------------------------------------- the MIB
NET_SNMP_PLAYPEN = (1, 3, 6, 1, 4, 1, 8072, 9999, 9999)  # placeholder arc: replace with a registered PEN
SIPHA_MIB = (*NET_SNMP_PLAYPEN, 5060)
NOTIFICATIONS = (*SIPHA_MIB, 0)
OBJECTS = (*SIPHA_MIB, 1)
SIP_HA_NODE_NAME = (*OBJECTS, 1)
SIP_HA_ROLE = (*OBJECTS, 2)
SIP_HA_HEALTH = (*OBJECTS, 3)
SIP_HA_REASON = (*OBJECTS, 4)
SIP_HA_SHEDDING = (*OBJECTS, 5)
SIP_HA_ROLE_CHANGE = (*NOTIFICATIONS, 1)
SIP_HA_HEALTH_CHANGE = (*NOTIFICATIONS, 2)
SIP_HA_SHEDDING_CHANGE = (*NOTIFICATIONS, 3)
SNMP_TRAP_OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)

ROLE_VALUES = {"active": 1, "standby": 2, "unknown": 3}
HEALTH_VALUES = {"healthy": 1, "unhealthy": 2, "unknown": 3}
SHEDDING_VALUES = {"shedding": 1, "taking": 2, "unknown": 3}
NAMES = {
    SIP_HA_NODE_NAME: "sipHaNodeName",
    SIP_HA_ROLE: "sipHaRole",
    SIP_HA_HEALTH: "sipHaHealth",
    SIP_HA_REASON: "sipHaReason",
    SIP_HA_SHEDDING: "sipHaShedding",
    SIP_HA_ROLE_CHANGE: "sipHaRoleChange",
    SIP_HA_HEALTH_CHANGE: "sipHaHealthChange",
    SIP_HA_SHEDDING_CHANGE: "sipHaSheddingChange",
}
MAX_REASON = 255  # DisplayString (SIZE (0..255))

_AUTH = {"sha": hauth.USM_AUTH_HMAC96_SHA, "sha256": hauth.USM_AUTH_HMAC192_SHA256,
         "sha512": hauth.USM_AUTH_HMAC384_SHA512}
_PRIV = {"aes": hauth.USM_PRIV_CFB128_AES, "aes256": hauth.USM_PRIV_CFB256_AES}


def oid_str(oid: tuple[int, ...]) -> str:
    return ".".join(map(str, oid))


def engine_id(node: str) -> bytes:
    """A stable SNMPv3 engine ID per node (RFC 3411 text format under enterprise 8072).

    v3 traps are authenticated with the *sender's* engine ID, so a trap receiver must know it in advance
    (snmptrapd: ``createUser -e 0x<id> ...``); deriving it from the node name makes it predictable, and
    ``sipha health snmp-engine-id`` prints it.
    """
    return bytes((0x80, 0x00, 0x1F, 0x88, 0x04)) + f"sipha-{node}".encode()[:27]


@dataclass(frozen=True)
class NodeState:
    """What SNMP says about this node: the ``sipHa*`` scalars."""

    node: str
    role: str  # active | standby | unknown
    health: str  # healthy | unhealthy | unknown
    reason: str
    shedding: str = "unknown"  # shedding | taking | unknown: REGISTERs refused while replication is behind


def varbinds(state: NodeState) -> list[tuple[tuple[int, ...], object]]:
    """The scalar values (instance ``.0``) in MIB order, typed as the MIB says."""
    return [
        ((*SIP_HA_NODE_NAME, 0), rfc1902.OctetString(state.node[:MAX_REASON])),
        ((*SIP_HA_ROLE, 0), rfc1902.Integer32(ROLE_VALUES.get(state.role, 3))),
        ((*SIP_HA_HEALTH, 0), rfc1902.Integer32(HEALTH_VALUES.get(state.health, 3))),
        ((*SIP_HA_REASON, 0), rfc1902.OctetString(state.reason.encode()[:MAX_REASON])),
        ((*SIP_HA_SHEDDING, 0), rfc1902.Integer32(SHEDDING_VALUES.get(state.shedding, 3))),
    ]


def _auth_data(snmp: Snmp) -> CommunityData | UsmUserData:
    if snmp.v3:
        v3: SnmpV3 = snmp.v3
        return UsmUserData(
            v3.user,
            authKey=v3.auth_key,
            privKey=v3.priv_key,
            authProtocol=_AUTH[v3.auth_protocol],
            privProtocol=_PRIV[v3.priv_protocol],
        )
    if snmp.community:
        return CommunityData(snmp.community, mpModel=1)  # noqa: S508 - v2c when the model has no v3
    raise ValueError("snmp: neither community (v2c) nor v3 is configured")


def _target(spec: str) -> tuple[str, int]:
    host, _, port = spec.partition(":")
    return host, int(port or 162)


# ---------------------------------------------------------------------------------------------- traps


class TrapSender:
    """Sends ``sipHaRoleChange`` / ``sipHaHealthChange`` to every ``snmp.targets`` entry.

    One engine for the life of the service, with the node's stable engine ID (see :func:`engine_id`).
    Traps are fire-and-forget (unconfirmed, as a trap is): a lost trap is repaired by the manager polling
    ``sipHaHealth``/``sipHaRole`` through the responder.
    """

    def __init__(self, snmp: Snmp, node: str) -> None:
        self.snmp = snmp
        self.node = node
        self._engine: SnmpEngine | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.snmp.targets) and bool(self.snmp.community or self.snmp.v3)

    def start(self) -> None:
        """Create the engine now (its sysUpTime, sent in every trap, counts from here)."""
        if self.enabled:
            self._get_engine()

    def _get_engine(self) -> SnmpEngine:
        if self._engine is None:
            self._engine = SnmpEngine(snmpEngineID=rfc1902.OctetString(engine_id(self.node)))
        return self._engine

    async def send(self, notification: str, state: NodeState) -> list[str]:
        """Send a ``role``, ``health`` or ``shedding`` change to all targets; returns one error text per failed
        target."""
        if not self.enabled:
            return []
        trap_oid, changed = {"role": (SIP_HA_ROLE_CHANGE, SIP_HA_ROLE), "health": (SIP_HA_HEALTH_CHANGE, SIP_HA_HEALTH),
                             "shedding": (SIP_HA_SHEDDING_CHANGE, SIP_HA_SHEDDING)}[notification]  # fmt: skip
        values = dict(varbinds(state))
        objects = [SIP_HA_NODE_NAME, changed, SIP_HA_REASON]
        binds = [ObjectType(ObjectIdentity(oid_str(SNMP_TRAP_OID)), rfc1902.ObjectIdentifier(trap_oid))]
        binds += [ObjectType(ObjectIdentity(oid_str((*o, 0))), values[(*o, 0)]) for o in objects]
        snmp_engine = self._get_engine()
        errors = []
        for spec in self.snmp.targets:
            try:
                target = await UdpTransportTarget.create(_target(spec), timeout=1, retries=0)
                err, _status, _index, _ = await send_notification(
                    snmp_engine, _auth_data(self.snmp), target, ContextData(), "trap", *binds
                )
            except Exception as exc:  # a trap failure must never stop the health loop
                err = exc
            if err:
                errors.append(f"{spec}: {err}")
        return errors

    def close(self) -> None:
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._engine.close_dispatcher()
            self._engine = None


# ---------------------------------------------------------------------------------------------- GET


class Responder:
    """A GET/GETNEXT responder for the ``sipHa*`` scalars, values read live from ``state()`` on each request.

    Runs on the caller's asyncio loop (pysnmp's asyncio transport); :meth:`close` releases the socket.
    """

    def __init__(self, snmp: Snmp, node: str, state: Callable[[], NodeState], bind: str, port: int) -> None:
        self.state = state
        self.address = (bind, port)
        self.engine = engine.SnmpEngine(rfc1902.OctetString(engine_id(node)))
        config.add_transport(
            self.engine, udp.DOMAIN_NAME, udp.UdpTransport().open_server_mode(self.address)
        )
        if snmp.v3:
            v3 = snmp.v3
            config.add_v3_user(
                self.engine, v3.user, _AUTH[v3.auth_protocol], v3.auth_key, _PRIV[v3.priv_protocol], v3.priv_key
            )
            config.add_vacm_user(self.engine, 3, v3.user, "authPriv", SIPHA_MIB)
        elif snmp.community:
            config.add_v1_system(self.engine, "sipha-read", snmp.community)
            config.add_vacm_user(self.engine, 2, "sipha-read", "noAuthNoPriv", SIPHA_MIB)
        else:
            raise ValueError("snmp: the responder needs community (v2c) or v3 credentials")
        snmp_context = context.SnmpContext(self.engine)
        builder = snmp_context.get_mib_instrum().get_mib_builder()
        mib_scalar, mib_scalar_instance = builder.import_symbols("SNMPv2-SMI", "MibScalar", "MibScalarInstance")
        responder = self

        class _Live(mib_scalar_instance):  # type: ignore[misc, valid-type]
            def getValue(self, name, **ctx):  # pysnmp calls it by this name
                return dict(varbinds(responder.state()))[tuple(name)]

        symbols = {}
        for oid, value in varbinds(state()):
            base = oid[:-1]
            label = NAMES[base]
            symbols[label] = mib_scalar(base, value.clone()).setMaxAccess("read-only")
            symbols[label + "Instance"] = _Live(base, (0,), value.clone())
        builder.export_symbols("__SIPHA-MIB", **symbols)
        cmdrsp.GetCommandResponder(self.engine, snmp_context)
        cmdrsp.NextCommandResponder(self.engine, snmp_context)
        self.engine.transport_dispatcher.job_started(1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.transport_dispatcher.job_finished(1)
        with contextlib.suppress(Exception):
            self.engine.close_dispatcher()


async def snmp_get(snmp: Snmp, host: str, port: int, timeout: float = 1.0) -> dict[str, str]:
    """GET the four scalars from a node's responder; names and values as an operator reads them."""
    snmp_engine = SnmpEngine()
    try:
        target = await UdpTransportTarget.create((host, port), timeout=timeout, retries=1)
        err, status, index, binds = await get_cmd(
            snmp_engine,
            _auth_data(snmp),
            target,
            ContextData(),
            *(ObjectType(ObjectIdentity(oid_str((*o, 0)))) for o in (SIP_HA_NODE_NAME, SIP_HA_ROLE,
                                                                      SIP_HA_HEALTH, SIP_HA_REASON, SIP_HA_SHEDDING)),
            lookupMib=False,
        )
    finally:
        snmp_engine.close_dispatcher()
    if err:
        raise RuntimeError(f"snmp get {host}:{port}: {err}")
    if status:
        raise RuntimeError(f"snmp get {host}:{port}: {status.prettyPrint()} at {index}")
    out: dict[str, str] = {}
    enums = {o: {v: k for k, v in values.items()} for o, values in
             ((SIP_HA_ROLE, ROLE_VALUES), (SIP_HA_HEALTH, HEALTH_VALUES), (SIP_HA_SHEDDING, SHEDDING_VALUES))}
    for name, value in binds:
        oid = tuple(name)[:-1]
        label = NAMES.get(oid, str(name))
        if oid in enums:
            out[label] = f"{enums[oid].get(int(value), '?')}({int(value)})"
        else:
            out[label] = bytes(value).decode(errors="replace")
    return out


__all__ = [
    "SIPHA_MIB",
    "NodeState",
    "Responder",
    "TrapSender",
    "engine_id",
    "snmp_get",
    "varbinds",
]
