"""The cluster model: one ``cluster.yaml`` read once, validated, and handed down frozen.

Every setting sipha uses lives here and nowhere else. Parsing is strict (unknown keys and wrong types are
errors, not silently coerced) because a typo in a failover timing is discovered at 3 a.m. otherwise.
Every failure is one :class:`ModelError` whose text is a single line: ``FILE: FIELD.PATH: what is wrong``.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

TRANSPORTS = ("udp", "tcp", "tls", "ws")
PROXY_KINDS = ("kamailio", "opensips")
# Measured on a 2-core VM: token 150 ms made the two-node cluster flap; 300 ms is the practical floor.
TOKEN_FLOOR_MS = 300
NAME_RE = r"^[a-z][a-z0-9-]{0,30}$"

DEFAULT_SCANNER_USER_AGENTS = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "VaxSIPUserAgent",
    "sip-scan",
    "sundayddr",
    "iWar",
    "SIVuS",
    "smap",
)
DEFAULT_SCANNER_FROM_NAMES = ("sipvicious", "Caller", "MAYET", "Simple SIP", "0123456789")


class ModelError(ValueError):
    """A cluster.yaml problem, always one line naming the file, the field path and the cause."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source, self.path, self.message = source, path, message
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {message}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _interface(value: str) -> str:
    try:
        return str(ipaddress.IPv4Interface(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address/prefix such as 198.51.100.11/24") from None


Port = Annotated[int, Field(ge=1, le=65535)]
IPv4 = Annotated[str, AfterValidator(_ipv4)]
IPv4If = Annotated[str, AfterValidator(_interface)]
Name = Annotated[str, Field(pattern=NAME_RE)]


class Ssh(_Frozen):
    user: str = "root"
    port: Port = 22
    host: str | None = None  # defaults to the node's address


class Node(_Frozen):
    name: Name
    address: IPv4If  # address/prefix on the cluster network, e.g. 198.51.100.11/24
    ssh: Ssh = Ssh()
    fence_options: dict[str, str] = {}

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.address).ip)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(self.address).network

    @property
    def ssh_host(self) -> str:
        return self.ssh.host or self.ip


class Witness(_Frozen):
    """The third vote: runs corosync-qnetd and the third ZooKeeper member."""

    name: Name = "witness"
    address: IPv4If
    qnetd_port: Port = 5403
    ssh: Ssh = Ssh()

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.address).ip)

    @property
    def ssh_host(self) -> str:
        return self.ssh.host or self.ip


class Vip(_Frozen):
    name: Name = "vip"
    address: IPv4If  # address/prefix, e.g. 198.51.100.10/24
    interface: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,15}$")] = "eth0"
    transports: tuple[Literal["udp", "tcp", "tls", "ws"], ...] = ("udp", "tcp")

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.address).ip)

    @property
    def prefix(self) -> int:
        return ipaddress.IPv4Interface(self.address).network.prefixlen


class Listen(_Frozen):
    """Listen port per transport; a transport left out is not served."""

    udp: Port | None = 5060
    tcp: Port | None = 5060
    tls: Port | None = None
    ws: Port | None = None

    def ports(self) -> dict[str, int]:
        return {t: p for t in TRANSPORTS if (p := getattr(self, t)) is not None}


class ScannerDefence(_Frozen):
    """Requests from known SIP scanners are dropped silently (no reply helps them enumerate)."""

    user_agents: tuple[Annotated[str, Field(min_length=2, pattern=r"^[^\"\\\n]+$")], ...] = (
        DEFAULT_SCANNER_USER_AGENTS
    )
    from_names: tuple[Annotated[str, Field(min_length=2, pattern=r"^[^\"\\\n]+$")], ...] = (
        DEFAULT_SCANNER_FROM_NAMES
    )


class RateLimit(_Frozen):
    """Per-source-IP request limit (pike): more than ``max_requests`` in ``window_s`` blocks the source."""

    window_s: Annotated[int, Field(ge=1, le=60)] = 2
    max_requests: Annotated[int, Field(ge=1, le=100000)] = 400
    block_s: Annotated[int, Field(ge=1, le=3600)] = 60
    trusted: tuple[str, ...] = ()  # networks exempt from the limit (load balancers, the lab client)

    @field_validator("trusted")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for v in value:
            try:
                out.append(str(ipaddress.IPv4Network(v, strict=False)))
            except ValueError:
                raise ValueError(f"{v!r} is not an IPv4 network such as 198.51.100.0/24") from None
        return tuple(out)


class Proxy(_Frozen):
    kind: Literal["kamailio", "opensips"] = "kamailio"
    listen: Listen = Listen()
    shm_mb: Annotated[int, Field(ge=64, le=65536)] = 256
    pkg_mb: Annotated[int, Field(ge=8, le=1024)] = 16
    children: Annotated[int, Field(ge=1, le=256)] = 4
    scanner: ScannerDefence = ScannerDefence()
    rate_limit: RateLimit = RateLimit()
    event_port: Port = 5090  # local coordinator's UDP intake for the proxy's events


class Timings(_Frozen):
    """Failover timings in milliseconds; defaults are the fastest measured stable on a 2-core VM."""

    token_ms: Annotated[int, Field(ge=1)] = 300
    consensus_ms: Annotated[int, Field(ge=1)] = 360
    probe_period_ms: Annotated[int, Field(ge=20, le=10000)] = 100
    probe_timeout_ms: Annotated[int, Field(ge=10, le=10000)] = 80
    failure_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    recovery_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    proxy_monitor_ms: Annotated[int, Field(ge=200, le=3600000)] = 1000
    vip_monitor_ms: Annotated[int, Field(ge=1000, le=3600000)] = 10000
    coordinator_monitor_ms: Annotated[int, Field(ge=1000, le=3600000)] = 5000
    dc_deadtime_ms: Annotated[int, Field(ge=0, le=600000)] = 2000
    # corosync-qdevice's timeout: qnetd declares a silent node dead after 1.5 x its heartbeat (0.8 x this), and
    # until then it withholds the witness's vote from the survivor. Stock 10 s held a hard-killed node's
    # quorum for ~12 s in the lab. qnetd and qdevice accept heartbeats down to 1000 ms unless told otherwise; the
    # lab and the Ansible roles start both with heartbeat_interval_min=200 (-S), so the floor is 500 (400 ms beats).
    qdevice_timeout_ms: Annotated[int, Field(ge=500, le=120000)] = 1250
    stickiness: Annotated[int, Field(ge=0, le=1000000)] = 100


class ZooKeeper(_Frozen):
    client_port: Port = 2181
    peer_port: Port = 2888
    election_port: Port = 3888
    tick_ms: Annotated[int, Field(ge=100, le=60000)] = 1000
    session_timeout_ms: Annotated[int, Field(ge=200, le=600000)] = 2000
    members: tuple[Name, ...] = ()  # default: every node and the witness
    data_dir: str = "/var/lib/zookeeper"
    # Lines of user:password (one, or two while it is being changed), the same on every node: sipha's znodes
    # readable and writable by those alone (ha.coordinator.zkauth). Unset: ZooKeeper's open ACLs, anyone reaching
    # client_port may rewrite bindings.
    auth_file: str | None = None
    # How long the active coordinator gathers its proxy's events before writing them (a full transaction's
    # worth is written at once). A write costs per transaction far more than per binding (three members, both
    # coordinators), so this trades a few ms of replication lag for the CPU of the whole node; 0: each burst
    # is written as soon as it came. The price: a REGISTER answered this long before its node dies is not
    # replicated (as one answered within the write's round trip never was). See BENCHMARKS.md, "Replication
    # throughput, lag and memory".
    write_linger_ms: Annotated[int, Field(ge=0, le=1000)] = 10

    @field_validator("auth_file")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path (it is read on every node)")
        return value


class Tls(_Frozen):
    cert: str
    key: str


class Rest(_Frozen):
    bind: IPv4 = "127.0.0.1"
    port: Port = 8008
    tls: Tls | None = None
    token_file: str = "/etc/sipha/api-token"  # noqa: S105 - a path, not a secret


class SnmpV3(_Frozen):
    user: Annotated[str, Field(min_length=1, max_length=32)]
    auth_protocol: Literal["sha", "sha256", "sha512"] = "sha256"
    auth_key: Annotated[str, Field(min_length=8)]
    priv_protocol: Literal["aes", "aes256"] = "aes"
    priv_key: Annotated[str, Field(min_length=8)]


class Snmp(_Frozen):
    targets: tuple[str, ...] = ()  # host or host:port, port 162 by default
    community: str | None = None
    v3: SnmpV3 | None = None
    agent_port: Port = 1161

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for t in value:
            host, _, port = t.partition(":")
            _ipv4(host)
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"{t!r}: port must be 1-65535")
            out.append(f"{host}:{port or 162}")
        return tuple(out)


class Fencing(_Frozen):
    """One stonith device per node, ``options`` shared, each node's ``fence_options`` added."""

    agent: Annotated[str, Field(pattern=r"^fence_[a-z0-9_]+$")] = "fence_sipha_lab"
    options: dict[str, str] = {}
    # Without a witness both nodes may shoot at once; fencing of ``delay_node`` waits ``delay_ms``, so that
    # node survives the race. With a witness, quorum decides and no delay is needed (it only slows recovery).
    delay_node: Name | None = None
    delay_ms: Annotated[int, Field(ge=0, le=60000)] = 5000


class Failover(_Frozen):
    """Opt-in paths beside Pacemaker's (see ha/health/fastclaim.py and docs/node-crash-path.md)."""

    # The health service claims the VIPs as soon as Corosync's membership shows the holder gone and the witness
    # grants it the VIP lease, instead of waiting for Pacemaker's scheduler (which often sleeps 1-2 s on that
    # path). Needs a witness: it runs the lease's arbiter (`sipha health arbiter`), and without one both halves
    # of a split stay quorate. Measured in docs/node-crash-path.md and BENCHMARKS.md.
    fast_claim: bool = False
    arbiter_port: Port = 5409  # UDP, on the witness
    # How long the witness's lease outlives the holder's last renewal (renewed every quarter of it). Below
    # token + consensus, a survivor is granted the lease the moment it sees the holder gone.
    lease_ms: Annotated[int, Field(ge=100, le=10000)] = 400
    # The least time from the membership change to a claim: the cut-off holder sees the same change within a few
    # ms of the survivor and drops its VIPs then; this keeps the claim from overlapping that drop.
    claim_hold_ms: Annotated[int, Field(ge=0, le=5000)] = 100
    # The HMAC key of the lease's datagrams, on the nodes and the witness: the lab and the playbook write a hash
    # of the Corosync authkey there (ha.health.arbiter.lease_key_of), readable by the health service's group.
    lease_key_file: str = "/etc/sipha/lease.key"


class Lab(_Frozen):
    """Only ``sipha lab`` reads this: where the lab's caller lives and how the bridge is named."""

    client: IPv4If = "198.51.100.50/24"
    bridge: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,14}$")] = "sipha-br"

    @property
    def client_ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.client).ip)


class Cluster(_Frozen):
    name: Name
    nodes: Annotated[tuple[Node, ...], Field(min_length=2, max_length=16)]
    witness: Witness | None = None
    vips: Annotated[tuple[Vip, ...], Field(min_length=1)]
    proxy: Proxy = Proxy()
    timings: Timings = Timings()
    zookeeper: ZooKeeper = ZooKeeper()
    rest: Rest = Rest()
    snmp: Snmp = Snmp()
    fencing: Fencing = Fencing()
    failover: Failover = Failover()
    lab: Lab = Lab()

    @property
    def hosts(self) -> tuple[Node | Witness, ...]:
        """Every host that runs part of the cluster: the nodes, then the witness."""
        return self.nodes + ((self.witness,) if self.witness else ())

    @property
    def zk_members(self) -> tuple[Node | Witness, ...]:
        by_name = {h.name: h for h in self.hosts}
        return tuple(by_name[n] for n in self.zookeeper.members) if self.zookeeper.members else self.hosts

    def zk_myid(self, name: str) -> int:
        return [h.name for h in self.zk_members].index(name) + 1

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part):
            continue  # pydantic's internal validator names, meaningless to an operator
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required but missing"
    if kind == "literal_error":
        return f"{msg[0].lower()}{msg[1:]}, got {err['input']!r}"
    if kind.endswith("_type") or kind in ("int_from_float", "model_type"):
        return f"wrong type: {msg[0].lower()}{msg[1:]}, got {type(err['input']).__name__} {err['input']!r}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg[0].lower()}{msg[1:]}"


def _cross_check(c: Cluster, base: Path, src: str) -> None:
    """Rules that span fields; each names the field an operator must edit."""

    def fail(path: str, msg: str) -> None:
        raise ModelError(src, path, msg)

    seen_names: dict[str, str] = {}
    seen_ips: dict[str, str] = {}
    for i, h in enumerate(c.hosts):
        path = f"nodes[{i}]" if i < len(c.nodes) else "witness"
        if h.name in seen_names:
            fail(f"{path}.name", f"duplicate host name {h.name!r} (also {seen_names[h.name]})")
        if h.ip in seen_ips:
            fail(f"{path}.address", f"duplicate address {h.ip} (also {seen_ips[h.ip]})")
        seen_names[h.name], seen_ips[h.ip] = path, path
    if c.lab.client_ip in seen_ips:
        fail("lab.client", f"address {c.lab.client_ip} is already used by {seen_ips[c.lab.client_ip]}")

    listen = c.proxy.listen.ports()
    if not listen:
        fail("proxy.listen", "no transport has a port: at least one of udp, tcp, tls, ws is needed")
    if "ws" in listen and listen["ws"] in (listen.get("tcp"), listen.get("tls")):
        fail("proxy.listen.ws", f"port {listen['ws']} is already taken by tcp/tls on the same address")
    vip_names: set[str] = set()
    for i, v in enumerate(c.vips):
        if v.name in vip_names:
            fail(f"vips[{i}].name", f"duplicate VIP name {v.name!r}")
        vip_names.add(v.name)
        if v.ip in seen_ips:
            fail(f"vips[{i}].address", f"VIP {v.ip} is already the address of {seen_ips[v.ip]}")
        seen_ips[v.ip] = f"vips[{i}]"
        if not any(ipaddress.IPv4Address(v.ip) in n.network for n in c.nodes):
            nets = ", ".join(sorted({str(n.network) for n in c.nodes}))
            fail(f"vips[{i}].address", f"VIP {v.ip} is outside every node's subnet ({nets})")
        if not v.transports:
            fail(f"vips[{i}].transports", "empty: the VIP must serve at least one transport")
        for t in v.transports:
            if t not in listen:
                fail(f"vips[{i}].transports", f"{t!r} has no port in proxy.listen")

    t = c.timings
    if t.token_ms < TOKEN_FLOOR_MS:
        fail("timings.token_ms", f"{t.token_ms} ms is below the floor of {TOKEN_FLOOR_MS} ms (a cluster flaps)")
    if t.consensus_ms * 10 < t.token_ms * 12:
        fail("timings.consensus_ms", f"{t.consensus_ms} ms must be at least 1.2 x token_ms ({t.token_ms * 1.2:g})")
    if t.probe_timeout_ms >= t.probe_period_ms:
        fail("timings.probe_timeout_ms", f"{t.probe_timeout_ms} ms must be below probe_period_ms")
    detect = t.probe_period_ms * t.failure_threshold
    budget = t.token_ms + t.consensus_ms
    if detect >= budget:
        fail(
            "timings.failure_threshold",
            f"probe_period_ms x failure_threshold = {detect} ms must be below token_ms + consensus_ms "
            f"= {budget} ms, or a hung proxy is noticed later than a dead node",
        )

    z = c.zookeeper
    names = [h.name for h in c.hosts]
    for i, m in enumerate(z.members):
        if m not in names:
            fail(f"zookeeper.members[{i}]", f"{m!r} is not a node or the witness")
    if len(set(z.members)) != len(z.members):
        fail("zookeeper.members", "a member is listed twice")
    if len(c.zk_members) % 2 == 0:
        fail("zookeeper.members", f"{len(c.zk_members)} members: an ensemble needs an odd count to keep a majority")
    if len({z.client_port, z.peer_port, z.election_port}) != 3:
        fail("zookeeper", "client_port, peer_port and election_port must differ")
    if z.session_timeout_ms < 2 * z.tick_ms:
        fail("zookeeper.session_timeout_ms", f"the server clamps sessions to >= 2 x tick_ms ({2 * z.tick_ms} ms)")

    r = c.rest
    if r.tls:
        for field in ("cert", "key"):
            f = Path(getattr(r.tls, field))
            f = f if f.is_absolute() else base / f
            if not f.is_file():
                fail(f"rest.tls.{field}", f"file {f} does not exist")

    s = c.snmp
    if s.targets and not (s.community or s.v3):
        fail("snmp", "trap targets need either community (v2c) or v3")
    if s.community and s.v3:
        fail("snmp", "give community (v2c) or v3, not both")

    f = c.fencing
    if f.delay_node and f.delay_node not in {n.name for n in c.nodes}:
        fail("fencing.delay_node", f"{f.delay_node!r} is not a node")
    if c.failover.fast_claim and c.witness is None:
        fail("failover.fast_claim", "needs a witness: without one both halves of a split stay quorate")
    t, fo = c.timings, c.failover
    if fo.fast_claim and fo.lease_ms > t.token_ms + t.consensus_ms - 100:
        fail("failover.lease_ms", f"{fo.lease_ms} must be at most token_ms + consensus_ms - 100 "
             f"({t.token_ms + t.consensus_ms - 100}): a cut-off holder's lease must have lapsed when it sees its "
             "peer leave, which is when the survivor asks for it")  # fmt: skip


def parse(data: Any, source: str = "<cluster.yaml>", base: Path | None = None) -> Cluster:
    """Validate already-loaded YAML data; ``base`` resolves relative file paths (TLS)."""
    if not isinstance(data, dict):
        raise ModelError(source, "", f"top level must be a mapping, got {type(data).__name__}")
    try:
        # JSON mode: strict about scalars (no "5060" for a port) yet YAML lists may fill tuples.
        cluster = Cluster.model_validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ModelError(source, _loc(err["loc"]), _message(err)) from None
    _cross_check(cluster, base or Path.cwd(), source)
    return cluster


class _UniqueKeyLoader(yaml.SafeLoader):
    """A duplicate key in YAML silently wins the last value; for a cluster file that hides typos."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path) -> Cluster:
    """Read and validate a cluster.yaml; the only place that parses it."""
    p = Path(path)
    src = str(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ModelError(src, "", f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ModelError(src, where, f"invalid YAML: {problem}") from None
    return parse(data, src, p.resolve().parent)


__all__ = ["PROXY_KINDS", "TRANSPORTS", "Cluster", "ModelError", "load", "parse"]
