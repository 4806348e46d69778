"""``sipha lab ...`` commands (placeholder until the lab lands)."""

import click


@click.group()
def lab() -> None:
    """The lab: a real two-node + witness cluster in namespaces on this machine."""
