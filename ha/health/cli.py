"""``sipha health ...``: run the health service, read a node's health over SNMP, make an API token.

Thin, as the rest of the CLI: parse, build the objects from the model, call down. Registered in ha/cli.py with
``from ha.health.cli import health; main.add_command(health)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import click

from ha import model
from ha.health.replication import DEFAULT_STATUS_SOCKET


def _load(path: str) -> model.Cluster:
    try:
        return model.load(path)
    except model.ModelError as exc:
        raise click.ClickException(str(exc)) from None


def _node(cluster: model.Cluster, name: str) -> model.Node:
    try:
        return cluster.node(name)
    except KeyError:
        names = ", ".join(n.name for n in cluster.nodes)
        raise click.ClickException(f"--node {name!r} is not a node of {cluster.name} ({names})") from None


def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


@click.group("health", context_settings={"help_option_names": ["-h", "--help"]})
def health() -> None:
    """The health service: SIP probes, the sipha-health attribute, REST API, metrics, SNMP."""


def _fast_claim(cluster: Any, node: str, service: Any) -> Any:
    """The lease-guarded fast claim (ha.health.fastclaim), fed by this service's health."""
    from ha.health.arbiter import LeaseClient, PeerWatch, load_key, local_addresses
    from ha.health.fastclaim import FastClaim, VipAddr, located_here
    from ha.health.probe import Health

    f = cluster.failover
    ips = {v.ip for v in cluster.vips}
    me = _node(cluster, node)
    try:
        key = load_key(f.lease_key_file)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"failover.lease_key_file: {exc}") from None
    claim: FastClaim | None = None

    def held() -> set[str]:
        return ips & local_addresses()

    def tick() -> None:  # the lease's renewals and the peer pings both re-check the lease
        if claim:
            claim.check_lease()

    peers = [n for n in cluster.nodes if n.name != node]
    lease = LeaseClient(node, me.ip, (cluster.witness.ip, f.arbiter_port), key, f.lease_ms / 1000,
                        has_vips=lambda: bool(held()), on_tick=tick)  # fmt: skip
    watch = PeerWatch(node, (me.ip, f.arbiter_port), {n.name: (n.ip, f.arbiter_port) for n in peers}, key,
                      on_tick=tick)  # fmt: skip
    claim = FastClaim(
        node, [n.name for n in peers],
        [VipAddr(v.name, v.ip, v.prefix, v.interface) for v in cluster.vips],
        healthy=lambda: service.state.health is Health.HEALTHY,
        held=held,
        located_here=located_here(node), event=service.event, lease=lease,
        hold_s=f.claim_hold_ms / 1000, distrust_s=cluster.timings.qdevice_timeout_ms / 1000 + 0.1,
        node_ids={i: n.name for i, n in enumerate(cluster.nodes, 1)},  # corosync.conf.j2 numbers them so
        peer_watch=watch,
    )
    return claim


@health.command("arbiter")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False, exists=True))
@click.option("--bind", default=None, help="address to listen on (default: the witness's address)")
def arbiter_cmd(cluster_yaml: str, bind: str | None) -> None:
    """Serve the VIP lease the fast claim asks for (on the witness; runs until SIGTERM/SIGINT)."""
    import threading

    from ha.health.arbiter import ArbiterServer, claim_window_s, load_key

    cluster = _load(cluster_yaml)
    if cluster.witness is None:
        raise click.ClickException(f"{cluster_yaml}: witness: the arbiter runs on the witness, and there is none")
    f = cluster.failover
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        key = load_key(f.lease_key_file)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"failover.lease_key_file: {exc}") from None
    addr = (bind or cluster.witness.ip, f.arbiter_port)
    try:
        t = cluster.timings
        window = claim_window_s(t.token_ms, t.consensus_ms, f.lease_ms)
        server = ArbiterServer(addr, key, f.lease_ms / 1000, {n.name for n in cluster.nodes}, claim_window=window)
    except OSError as exc:
        raise click.ClickException(f"the arbiter cannot listen on {addr[0]}:{addr[1]}: {exc.strerror or exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("sipha.health.arbiter").info("arbiter_listening address=%s:%d lease_ms=%d claim_window_ms=%d",
                                                   *addr, f.lease_ms, round(window * 1000))
    try:
        server.serve(stop)
    finally:
        server.close()


@health.command("run")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False, exists=True))
@click.option("--node", "node_name", required=True, help="this node's name in cluster.yaml")
@click.option("--probe-host", default=None, help="address the local proxy answers on (default: the node's address)")
@click.option("--slow-ms", type=float, default=None, help="answers slower than this are 'overloaded' "
              "(default: half of timings.probe_timeout_ms)")
@click.option("--readiness-gate/--no-readiness-gate", default=False,
              help="never report healthy before readiness is given (the coordinator's resync)")
@click.option("--ready-file", type=click.Path(dir_okay=False), default="/run/sipha/ready", show_default=True,
              help="readiness is given when this file exists")
@click.option("--dampen-ms", type=int, default=None, help="attrd_updater -d (default: none; hysteresis debounces)")
@click.option("--rest-bind", default=None, help="override rest.bind (default from the model)")
@click.option("--rest-port", type=int, default=None, help="override rest.port")
@click.option("--snmp-bind", default=None, help="address of the SNMP GET responder (default: the node's address)")
@click.option("--no-snmp-agent", is_flag=True, help="do not start the SNMP GET responder")
@click.option("--json-logs", is_flag=True, help="log events as JSON lines instead of key=value")
@click.option("--fault-file", type=click.Path(dir_okay=False), default=None,
              help="TEST ONLY (the lab): an integer N written here makes the next N local UDP probes time out")
@click.option("--proxy-pidfile", type=click.Path(dir_okay=False), default=None,
              help="the local proxy's pidfile (default /run/sipha/<proxy kind>.pid, the proxy agent's): an unanswered "
                   "probe while its processes burn CPU is 'overloaded', not dead; 'none' turns that off")
@click.option("--coordinator-socket", default=DEFAULT_STATUS_SOCKET, show_default=True,
              help="the local coordinator's status socket, read every second for /health, the replication metrics "
                   "and the shedding events; 'none' turns that off")
@click.option("-v", "--verbose", is_flag=True, help="also log every steady cycle (DEBUG)")
def run_cmd(cluster_yaml: str, node_name: str, probe_host: str | None, slow_ms: float | None, readiness_gate: bool,
            ready_file: str, dampen_ms: int | None, rest_bind: str | None, rest_port: int | None,
            snmp_bind: str | None, no_snmp_agent: bool, json_logs: bool, fault_file: str | None,
            proxy_pidfile: str | None, coordinator_socket: str, verbose: bool) -> None:
    """Start the health service of NODE (runs until SIGTERM/SIGINT)."""
    from ha.health.api import ApiServer, serve, tls_context
    from ha.health.cluster import AttrdWriter, PacemakerActions
    from ha.health.replication import ReplicationWatch, query
    from ha.health.service import HealthService, Readiness
    from ha.health.snmp import Responder

    cluster = _load(cluster_yaml)
    node = _node(cluster, node_name)
    base = Path(cluster_yaml).resolve().parent
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        service = HealthService(
            cluster, node.name, probe_host=probe_host, slow_ms=slow_ms,
            readiness=Readiness(readiness_gate, Path(ready_file)), attrd=AttrdWriter(dampen_ms),
            json_logs=json_logs, fault_file=Path(fault_file) if fault_file else None,
            proxy_pidfile=None if proxy_pidfile == "none" else Path(
                proxy_pidfile or f"/run/sipha/{cluster.proxy.kind}.pid"),
            replication=None if coordinator_socket == "none" else ReplicationWatch(lambda: query(coordinator_socket)),
        )
    except ValueError as exc:
        raise click.ClickException(f"{cluster_yaml}: {exc}") from None
    r = cluster.rest
    tls = tls_context(_resolve(base, r.tls.cert), _resolve(base, r.tls.key)) if r.tls else None
    try:
        api = ApiServer(
            (rest_bind or r.bind, rest_port or r.port), cluster=cluster, node=node.name, health=service.snapshot,
            actions=PacemakerActions(cluster), metrics=service.metrics, vip_check=service.vip_check,
            token_file=_resolve(base, r.token_file), tls=tls,
        )
    except OSError as exc:
        raise click.ClickException(f"REST API cannot listen on {rest_bind or r.bind}:{rest_port or r.port}: "
                                   f"{exc.strerror or exc}") from None
    serve(api)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        responder = None
        if not no_snmp_agent and (cluster.snmp.community or cluster.snmp.v3):
            responder = Responder(cluster.snmp, node.name, service.node_state, snmp_bind or node.ip,
                                  cluster.snmp.agent_port)
        claim = _fast_claim(cluster, node.name, service) if cluster.failover.fast_claim else None
        if claim:
            claim.start()
        try:
            await service.run(stop)
        finally:
            if claim:
                claim.stop()
            if responder:
                responder.close()

    try:
        asyncio.run(main())
    finally:
        api.shutdown()
        api.server_close()


@health.command("snmp-get")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False, exists=True))
@click.option("--node", "node_name", required=True, help="the node to ask")
@click.option("--host", default=None, help="address of its SNMP responder (default: the node's address)")
@click.option("--port", type=int, default=None, help="default: snmp.agent_port")
def snmp_get_cmd(cluster_yaml: str, node_name: str, host: str | None, port: int | None) -> None:
    """GET sipHaNodeName, sipHaRole, sipHaHealth and sipHaReason from a node (exit 1 unless healthy)."""
    from ha.health.snmp import snmp_get

    cluster = _load(cluster_yaml)
    node = _node(cluster, node_name)
    if not (cluster.snmp.community or cluster.snmp.v3):
        raise click.ClickException("snmp: neither community nor v3 is configured in the model")
    try:
        values = asyncio.run(snmp_get(cluster.snmp, host or node.ip, port or cluster.snmp.agent_port))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    for k, v in values.items():
        click.echo(f"SIPHA-MIB::{k}.0 = {v}")
    sys.exit(0 if values.get("sipHaHealth", "").startswith("healthy") else 1)


@health.command("snmp-engine-id")
@click.option("--node", "node_name", required=True)
def snmp_engine_id_cmd(node_name: str) -> None:
    """Print the node's SNMPv3 engine ID (a trap receiver needs it: snmptrapd `createUser -e 0x...`)."""
    from ha.health.snmp import engine_id

    click.echo("0x" + engine_id(node_name).hex())


@health.command("token")
@click.argument("token_file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="replace an existing token")
def token_cmd(token_file: str, force: bool) -> None:
    """Write a new 256-bit API token to TOKEN_FILE (mode 0600)."""
    p = Path(token_file)
    if p.exists() and not force:
        raise click.ClickException(f"{p} exists; --force replaces it (clients must get the new token)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    tmp.replace(p)
    click.echo(f"wrote a new API token to {p}")


__all__ = ["health"]
