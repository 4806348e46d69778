"""``sipha``: the operator's command line. Thin: parse, call down, print; exit codes carry the verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ha import model, render


def _load(path: str) -> model.Cluster:
    try:
        return model.load(path)
    except model.ModelError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """sipha: make a SIP proxy node loss something no caller notices."""


@main.command("render")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="directory to write")
def render_cmd(cluster_yaml: str, out: str) -> None:
    """Render corosync.conf, the CIB, proxy configs and the Ansible inventory."""
    cluster = _load(cluster_yaml)
    try:
        files = render.write(cluster, out)
    except render.RenderError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"rendered {len(files)} files for cluster {cluster.name} into {Path(out)}")


@main.command("validate")
@click.argument("cluster_yaml", type=click.Path(dir_okay=False))
def validate_cmd(cluster_yaml: str) -> None:
    """Render to a temp dir and run the real validators (crm_verify, corosync -t, kamailio -c)."""
    from ha import validate

    cluster = _load(cluster_yaml)
    failures = 0
    for result in validate.run_all(cluster):
        mark = "ok  " if result.ok else "FAIL"
        click.echo(f"{mark} {result.what}: {result.detail}")
        failures += not result.ok
    if failures:
        click.echo(f"{failures} validator(s) failed", err=True)
        sys.exit(1)


def _register() -> None:
    from ha.coordinator.cli import calls, registrations
    from ha.deploy_cli import deploy_cmd, status_cmd, switchover_cmd
    from ha.drill.cli import drill
    from ha.health.cli import health
    from ha.lab.cli import lab

    for command in (lab, health, drill, registrations, calls, deploy_cmd, status_cmd, switchover_cmd):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
