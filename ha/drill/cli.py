"""``sipha drill ...``: break the cluster on purpose and report what callers saw. Thin: parse, call, print.

Registered in ``ha/cli.py`` with ``from ha.drill.cli import drill; main.add_command(drill)``.
Exit codes: 0 the drill ran and the service recovered; 1 it ran and the service did not recover (or an undo
failed); 2 bad input or a cluster not healthy enough to drill (nothing was touched); 130 Ctrl-C (the fault
was undone and what was measured is reported).
"""

from __future__ import annotations

import sys
import time

import click

from ha.drill.faults import KINDS


class _Progress:
    """One line per step with the elapsed time, so a long ``--repeat`` shows where it is."""

    def __init__(self, quiet: bool) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.monotonic() - self.t0:7.2f}s] {msg}", err=True)


@click.command("drill")
@click.option("--fault", "fault", required=True, type=click.Choice(KINDS), help="what to break")
@click.option("--target", default="active", show_default=True, help="NODE, active (the VIP's node) or standby")
@click.option("--registrations", default=20, show_default=True, type=click.IntRange(0, 2000))
@click.option("--calls", default=5, show_default=True, type=click.IntRange(0, 1000),
              help="calls set up before the fault and hung up after it")  # fmt: skip
@click.option("--rate", default=2.0, show_default=True, type=click.FloatRange(0, 200),
              help="new calls per second attempted during the fault")  # fmt: skip
@click.option("--transport", default="udp", show_default=True, type=click.Choice(["udp", "tcp"]))
@click.option("--hold", "hold_s", default=3.0, show_default=True, type=click.FloatRange(0, 300),
              help="seconds between inject and undo")  # fmt: skip
@click.option("--after", "after_s", default=4.0, show_default=True, type=click.FloatRange(0, 300),
              help="seconds observed after the undo")  # fmt: skip
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1, 1000))
@click.option("--wait", "wait_s", default=0.0, show_default=True, type=click.FloatRange(0, 600),
              help="wait up to this long for a healthy cluster, then refuse (e.g. after `sipha lab up`)")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write every figure and the timeline")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG timeline (last run)")
@click.option("--baseline", is_flag=True, help="this is the stock-settings baseline (lab up --stock)")
@click.option("--quiet", is_flag=True, help="no progress lines")
def drill(fault: str, target: str, registrations: int, calls: int, rate: float, transport: str, hold_s: float,
          after_s: float, repeat: int, wait_s: float, json_path: str | None, plot_path: str | None, baseline: bool,
          quiet: bool) -> None:  # fmt: skip
    """Inject a fault into the lab while phones call through the VIP; report the caller's-eye cost."""
    from ha.drill import report
    from ha.drill.faults import DrillError
    from ha.drill.run import DrillOptions, run

    if calls and not registrations:
        raise click.UsageError("--calls needs --registrations >= 1 (calls go to registered phones)")
    opts = DrillOptions(fault=fault, target=target, registrations=registrations, calls=calls, rate=rate,
                        transport=transport, hold_s=hold_s, after_s=after_s, repeat=repeat,
                        baseline=baseline, wait_s=wait_s)  # fmt: skip
    try:
        from ha.drill.labctl import LabControl

        ctl = LabControl()
    except DrillError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    try:
        result = run(ctl, opts, _Progress(quiet))
    except DrillError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # before any fault was injected
        click.echo("interrupted before the fault; nothing to undo", err=True)
        sys.exit(130)
    finally:
        ctl.close()
    runs = result["runs"]
    if not runs:
        click.echo(f"Error: no drill completed ({result['stopped']})", err=True)
        sys.exit(1)
    if repeat == 1 or len(runs) == 1:
        report.print_report(runs[-1])
    else:
        from rich.console import Console

        Console().print(report.repeat_table(result["aggregate"], fault, len(runs)))
    if result["stopped"]:
        click.echo(f"stopped: {result['stopped']}", err=True)
    if json_path:
        report.write_json(result if repeat > 1 else runs[-1], json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        report.plot(runs[-1], plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    if runs[-1]["interrupted"]:
        sys.exit(130)
    if any(r["undo_error"] for r in runs) or not all(r["figures"]["recovered"] for r in runs):
        sys.exit(1)
