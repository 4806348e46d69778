"""``sipha deploy``, ``sipha status --remote``, ``sipha switchover``: the cluster's hosts over SSH.

Thin, as the rest of the CLI: parse, call :mod:`ha.deploy` / :mod:`ha.remote`, print, exit non-zero on failure.
Registered in ha/cli.py with::

    from ha.deploy_cli import deploy_cmd, status_cmd, switchover_cmd
    main.add_command(deploy_cmd)
    main.add_command(status_cmd)
    main.add_command(switchover_cmd)

Host keys are always checked against ``--known-hosts`` (default ~/.ssh/known_hosts, or $SIPHA_KNOWN_HOSTS);
there is deliberately no option to turn that off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ha import model
from ha.remote import RemoteError

KNOWN_HOSTS_HELP = "known_hosts file to verify host keys against (never added to)"


def _load(path: str) -> model.Cluster:
    try:
        return model.load(path)
    except model.ModelError as exc:
        raise click.ClickException(str(exc)) from None


def _ssh_options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option("--known-hosts", envvar="SIPHA_KNOWN_HOSTS", default="~/.ssh/known_hosts", show_default=True,
                     type=click.Path(dir_okay=False), help=KNOWN_HOSTS_HELP)(f)  # fmt: skip
    f = click.option("-i", "--identity", envvar="SIPHA_SSH_KEY", default=None, type=click.Path(dir_okay=False),
                     help="private key to log in with (default: ssh agent and ~/.ssh keys)")(f)  # fmt: skip
    return f


def _progress(host: str, task: str, state: str, detail: str = "") -> None:
    if state == "start":
        return
    mark = {"ok": "ok  ", "failed": "FAIL"}.get(state, state)
    click.echo(f"{mark} {host:<12} {task}{': ' + detail if detail else ''}", err=state == "failed")


@click.command("deploy")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False, exists=True))
@_ssh_options
@click.option("--host", "only", multiple=True, help="only this host (repeatable); default: every host")
@click.option("--playbook", is_flag=True,
              help="provision with ansible/site.yml instead (packages, users, units, agents; first installs)")
@click.option("--service-manager", type=click.Choice(["systemd", "lab"]), default="systemd", show_default=True,
              help="with --playbook: how services are run (lab: the namespace lab, no systemd)")
@click.option("-e", "--extra-vars", "extra_vars", multiple=True,
              help="with --playbook: passed to ansible-playbook -e (e.g. sipha_install=present)")
def deploy_cmd(cluster_yaml: str, known_hosts: str, identity: str | None, only: tuple[str, ...], playbook: bool,
               service_manager: str, extra_vars: tuple[str, ...]) -> None:  # fmt: skip
    """Render CLUSTER_YAML, push it to every host, check, install and activate; roll back on failure."""
    from ha import deploy

    cluster = _load(cluster_yaml)
    if playbook:
        rc = deploy.run_playbook(cluster, Path(cluster_yaml), known_hosts, identity, service_manager, only,
                                 extra_vars, echo=click.echo)  # fmt: skip
        sys.exit(rc)
    try:
        report = deploy.deploy(cluster, Path(cluster_yaml).read_text(), known_hosts, identity, _progress, only=only)
    except deploy.DeployError as exc:
        raise click.ClickException(str(exc)) from None
    for host, dests in report.changed.items():
        click.echo(f"{host}: {', '.join(dests) if dests else 'unchanged'}")
    for a in report.activated:
        click.echo(f"activated {a}")
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo("nothing to do: every host already has this render" if report.nothing_to_do
               else f"deployed {report.deploy_id}")  # fmt: skip


@click.command("status")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False, exists=True))
@click.option("--remote", "remote", is_flag=True, required=True, help="ask the hosts over SSH (the only mode here)")
@_ssh_options
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def status_cmd(cluster_yaml: str, remote: bool, known_hosts: str, identity: str | None, as_json: bool) -> None:
    """Each host's reachability, the cluster as Pacemaker sees it and each node's replication, over SSH."""
    from ha import deploy
    from ha.health.cluster import ActionError

    cluster = _load(cluster_yaml)
    try:
        st = deploy.remote_status(cluster, known_hosts, identity)
    except (RemoteError, ActionError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    for name, state in st["hosts"].items():
        click.echo(f"{name:<12} {state}")
    view = st["cluster"]
    click.echo(f"cluster view from {st['via']}:")
    for n in view.get("nodes", []):
        flags = [k for k in ("standby", "maintenance", "unclean") if n.get(k)]
        click.echo(f"  node {n['name']:<10} {'online' if n['online'] else 'OFFLINE'}"
                   f"{' (' + ', '.join(flags) + ')' if flags else ''}{' DC' if n.get('is_dc') else ''}")  # fmt: skip
    for vip, holder in view.get("vips", {}).items():
        click.echo(f"  {vip}: {holder if isinstance(holder, str) else 'NOT on exactly one node: ' + str(holder)}")
    click.echo("replication (each node's coordinator):")
    for name, repl in st["replication"].items():
        click.echo(f"  {name:<10} {deploy.replication_line(repl)}")


@click.command("switchover")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False, exists=True))
@click.option("--to", "to", default=None, help="target node (default: any other healthy node)")
@_ssh_options
def switchover_cmd(cluster_yaml: str, to: str | None, known_hosts: str, identity: str | None) -> None:
    """Move the VIP to another node over SSH (Pacemaker move, wait, clear the constraint)."""
    from ha import deploy
    from ha.health.cluster import ActionError

    cluster = _load(cluster_yaml)
    if to is not None and to not in {n.name for n in cluster.nodes}:
        raise click.ClickException(f"--to {to!r} is not a node of {cluster.name}")
    try:
        actions, remote = deploy.remote_actions(cluster, known_hosts, identity)
        try:
            result = actions.switchover(to)
        finally:
            remote.close()
    except (RemoteError, ActionError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result["message"])


__all__ = ["deploy_cmd", "status_cmd", "switchover_cmd"]
