"""``sipha lab ...``: a real two-node + witness cluster in namespaces on this machine. Thin: parse, call, print."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

DEFAULT_YAML = "examples/lab.yaml"


def _echo(msg: str) -> None:
    click.echo(msg)


def _spec() -> dict[str, Any]:
    from ha.lab import lab as labmod

    spec = labmod.load_spec()
    if not spec or not spec.get("hosts"):
        raise click.ClickException("no lab is up (start one with `sipha lab up`)")
    return spec


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group()
def lab() -> None:
    """The lab: a real two-node + witness cluster in namespaces on this machine."""


@lab.command("up")
@click.argument("cluster_yaml", default=DEFAULT_YAML, type=click.Path(dir_okay=False))
@click.option("--stock", is_flag=True, help="stock comparison: IPaddr2 + ocf:heartbeat:kamailio group, token 3000")
@click.option("--bare", is_flag=True,
              help="the hosts with only sshd (keys in the state dir), to provision with ansible/site.yml")
@click.option("--timeout", default=60.0, show_default=True, help="seconds to wait for the cluster to be ready")
def up_cmd(cluster_yaml: str, stock: bool, bare: bool, timeout: float) -> None:
    """Build the lab and wait until it is quorate, the VIP answers SIP and ZooKeeper has a leader
    (--bare: until every host's sshd answers)."""
    from ha.lab import lab as labmod
    from ha.lab.node import LabError

    if cluster_yaml == DEFAULT_YAML and not os.path.exists(cluster_yaml):
        cluster_yaml = str(labmod.REPO / DEFAULT_YAML)  # run from outside the checkout
    try:
        if stock and bare:
            raise LabError("--stock and --bare exclude each other")
        variant = "stock" if stock else "bare" if bare else "model"
        t = labmod.up(cluster_yaml, echo=_echo, variant=variant, timeout=timeout)
    except (LabError, OSError) as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        click.echo("interrupted; the lab was taken down", err=True)
        sys.exit(130)
    click.echo(f"lab up in {t:.1f} s")


@lab.command("down")
@click.option("--keep-logs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="copy every host's logs (Pacemaker, Corosync, services) to this directory first")
def down_cmd(keep_logs: Path | None) -> None:
    """Remove every namespace, veth, mount and process the lab made (safe to run twice)."""
    from ha.lab import lab as labmod

    if os.geteuid() != 0:
        raise click.ClickException("the lab needs root: run it with sudo")
    labmod.down(echo=_echo, keep_logs=keep_logs)


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
def status_cmd(as_json: bool) -> None:
    """Hosts, quorum, DC, where the VIP is, resources, ZooKeeper modes."""
    from ha.lab import lab as labmod

    st = labmod.status()
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    if not st.get("up"):
        click.echo("no lab is up")
        sys.exit(1)
    pm = st["pacemaker"]
    click.echo(f"cluster {st['cluster']} ({st['variant']})")
    for name, h in st["hosts"].items():
        extra = " PARTITIONED" if h.get("partitioned") else ""
        power = h.get("power", "-")
        pnode = pm.get("nodes", {}).get(name, "")
        q = st["quorum"].get(name)
        qs = f" quorate={'yes' if q['quorate'] else 'NO'} ({q['summary']})" if q else ""
        click.echo(f"  {name:<8} {h['ip']:<15} {h['role']:<8} power={power:<4} {pnode}{qs}{extra}")
    click.echo(f"  DC: {pm.get('dc') or '-'}   (crm_mon from {pm.get('from') or 'no node'})")
    for vip, where in st["vips"].items():
        sip = st["vip_sip"]
        click.echo(f"  VIP {vip} on {where}; SIP OPTIONS from client: "
                   f"{'answered' if sip['answered'] else 'NO ANSWER'} ({sip['detail']})")  # fmt: skip
    for r in pm.get("resources", []):
        state = "FAILED" if r["failed"] else (r["role"] or "")
        click.echo(f"  resource {r['id']:<22} {r['agent'] or '':<28} {state:<8} {','.join(r['nodes'])}")
    click.echo("  ZooKeeper: " + ", ".join(f"{k} {v}" for k, v in st["zookeeper"].items()))


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("host")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
def exec_cmd(host: str, argv: tuple[str, ...]) -> None:
    """Run a command inside a lab host: sipha lab exec node1 -- crm_mon -1."""
    from ha.lab import lab as labmod
    from ha.lab.node import LabError

    try:
        prefix = labmod.nsenter_argv(_spec(), host)
    except LabError as exc:
        raise _fail(exc) from None
    os.execvp(prefix[0], [*prefix, *argv])  # noqa: S606


def _power(action: str, host: str) -> str:
    from ha.lab.supervisor import SupervisorError, power

    _spec()
    try:
        return power(action, host)
    except SupervisorError as exc:
        raise _fail(exc) from None


@lab.command("kill")
@click.argument("host")
def kill_cmd(host: str) -> None:
    """Power a host off hard (through the supervisor, as fencing does)."""
    t0 = time.monotonic()
    state = _power("off", host)
    click.echo(f"{host}: {state} ({(time.monotonic() - t0) * 1000:.0f} ms)")


@lab.command("start")
@click.argument("host")
def start_cmd(host: str) -> None:
    """Power a host on again (fresh network namespace, its services start, it rejoins)."""
    t0 = time.monotonic()
    state = _power("on", host)
    click.echo(f"{host}: {state} ({(time.monotonic() - t0) * 1000:.0f} ms)")


@lab.command("partition")
@click.argument("host")
def partition_cmd(host: str) -> None:
    """Cut a host off the lab network (its link stays up; every frame to or from it is dropped)."""
    from ha.lab import lab as labmod
    from ha.lab import node as labnode

    spec = _spec()
    try:
        labnode.partition(spec, labmod.host(spec, host), cut=True)
    except labnode.LabError as exc:
        raise _fail(exc) from None
    click.echo(f"{host}: partitioned")


@lab.command("heal")
def heal_cmd() -> None:
    """Undo every partition."""
    from ha.lab import node as labnode

    spec = _spec()
    healed = []
    for h in spec["hosts"]:
        if labnode.partitioned(spec, h):
            labnode.partition(spec, h, cut=False)
            healed.append(h["name"])
    click.echo(f"healed: {', '.join(healed) or 'nothing was partitioned'}")


@lab.command("failover")
@click.option("--interval-ms", default=20, show_default=True)
@click.option("--after-s", default=4.0, show_default=True, help="probe for this long after the kill")
@click.option("--json", "as_json", is_flag=True)
def failover_cmd(interval_ms: int, after_s: float, as_json: bool) -> None:
    """Kill the VIP's node while the client probes the VIP; report the longest unanswered gap."""
    from ha.lab import lab as labmod
    from ha.lab.node import LabError

    try:
        res = labmod.failover(_spec(), interval=interval_ms / 1000, after=after_s, echo=_echo)
    except LabError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"killed {res['killed']}: VIP moved to {res['new_holder']}; longest unanswered gap "
                   f"{res['longest_gap_ms']:.0f} ms ({res['answered']}/{res['sent']} probes answered, "
                   f"every {interval_ms} ms)")  # fmt: skip
    if not res["recovered"]:
        sys.exit(1)
