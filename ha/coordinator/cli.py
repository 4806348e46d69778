"""``sipha registrations`` and ``sipha calls``: the replicated state as ZooKeeper holds it, from any node.

Thin, as the rest of the CLI: read the model, read one snapshot of the store (``ZkStore.snapshot``, a few
multiReads), print. ``--json`` gives one JSON document for scripts (records as the store keeps them);
without it a table. Registered in ha/cli.py with
``from ha.coordinator.cli import calls, registrations; main.add_command(registrations); main.add_command(calls)``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import click

from ha import model
from ha.coordinator import zkauth
from ha.coordinator.store import ClusterState, StoreUnavailable, ZkStore

DEFAULT_CONFIG = "/etc/sipha/cluster.yaml"


def _load(path: str) -> model.Cluster:
    try:
        return model.load(path)
    except model.ModelError as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def _store(config: str, zk_hosts: str | None, timeout: float) -> Iterator[ZkStore]:
    from kazoo.client import KazooClient
    from kazoo.handlers.threading import KazooTimeoutError

    cluster = _load(config)
    hosts = zk_hosts or ",".join(f"{h.ip}:{cluster.zookeeper.client_port}" for h in cluster.zk_members)
    try:
        auth = zkauth.client_kwargs(cluster.zookeeper)
    except zkauth.ZkAuthError as exc:
        raise click.ClickException(str(exc)) from None
    client = KazooClient(hosts=hosts, timeout=max(timeout, 2.0), connection_retry={"max_tries": 2, "max_delay": 1},
                         **auth)
    try:
        client.start(timeout=timeout)
    except KazooTimeoutError:
        client.close()
        raise click.ClickException(f"zookeeper ({hosts}) not reachable within {timeout:.0f} s") from None
    try:
        yield ZkStore(client, cluster.name, "cli")
    finally:
        client.stop()
        client.close()


def _snapshot(config: str, zk_hosts: str | None, timeout: float) -> ClusterState:
    with _store(config, zk_hosts, timeout) as store:
        if not store.client.exists(store.epoch_path):
            raise click.ClickException(f"nothing replicated yet: {store.root} does not exist in zookeeper")
        try:
            return store.snapshot()
        except StoreUnavailable as exc:
            raise click.ClickException(str(exc)) from None


def _ts(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S") if epoch_s else "-"


def _record(rec: Any) -> dict[str, Any]:
    d = asdict(rec)
    d.pop("version", None)
    return d


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 250).print(table)  # a pipe gets whole lines, not folds


_common = [
    click.option("--config", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False),
                 help="cluster.yaml (ZooKeeper members, cluster name)"),
    click.option("--zk-hosts", help="ZooKeeper connect string; overrides the model's members"),
    click.option("--timeout", default=5.0, show_default=True, help="seconds to wait for ZooKeeper"),
    click.option("--json", "as_json", is_flag=True, help="one JSON document instead of a table"),
]


def _options(f: Any) -> Any:
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command("registrations")
@_options
@click.option("--aor", help="only this AoR (the user part, as usrloc keys it)")
def registrations(config: str, zk_hosts: str | None, timeout: float, as_json: bool, aor: str | None) -> None:
    """List the replicated registrations (bindings) held in ZooKeeper."""
    snap = _snapshot(config, zk_hosts, timeout)
    now = time.time()
    contacts = [c for c in snap.contacts if aor is None or c.aor == aor]
    contacts.sort(key=lambda c: (c.aor, c.contact))
    if as_json:
        click.echo(json.dumps({"epoch": snap.epoch, "count": len(contacts),
                               "registrations": [_record(c) for c in contacts]}, indent=2))
        return
    rows = [
        [c.aor, c.contact, f"{int(c.expires_at - now)}" if c.expires_at > now else "expired", c.received or "-",
         c.user_agent or "-", c.node, str(c.epoch)]
        for c in contacts
    ]
    _print_table(f"{len(contacts)} registrations (epoch {snap.epoch})",
                 ["AoR", "Contact", "Expires in (s)", "Received", "User-Agent", "Written by", "Epoch"], rows)


@click.command("calls")
@_options
@click.option("--cdrs", is_flag=True, help="list the finished calls (CDRs) instead of the live ones")
def calls(config: str, zk_hosts: str | None, timeout: float, as_json: bool, cdrs: bool) -> None:
    """List the replicated calls (live dialogs) held in ZooKeeper, or with --cdrs the finished ones."""
    if cdrs:
        with _store(config, zk_hosts, timeout) as store:
            try:
                done = store.cdrs()
            except StoreUnavailable as exc:
                raise click.ClickException(str(exc)) from None
        if as_json:
            click.echo(json.dumps({"count": len(done), "cdrs": [_record(c) for c in done]}, indent=2))
            return
        rows = [[c.callid, c.from_uri, c.to_uri, _ts(c.created_ms / 1000), _ts(c.start_ts), _ts(c.end_ms / 1000),
                 str(max(0, round(c.end_ms / 1000 - c.start_ts))) if c.start_ts else "-", c.reason, c.node]
                for c in done]
        _print_table(f"{len(done)} finished calls",
                     ["Call-ID", "From", "To", "Created", "Answered", "Ended", "Duration (s)", "End", "Node"], rows)
        return
    snap = _snapshot(config, zk_hosts, timeout)
    dialogs = sorted(snap.dialogs, key=lambda d: (d.created_ms, d.callid))
    if as_json:
        click.echo(json.dumps({"epoch": snap.epoch, "count": len(dialogs),
                               "calls": [_record(d) for d in dialogs]}, indent=2))
        return
    now = time.time()
    rows = [[d.callid, d.from_uri, d.to_uri, _ts(d.created_ms / 1000), _ts(d.start_ts),
             str(round(now - d.start_ts)) if d.start_ts else "-", "confirmed" if d.start_ts else f"state {d.state}",
             d.node] for d in dialogs]
    _print_table(f"{len(dialogs)} calls (epoch {snap.epoch})",
                 ["Call-ID", "From", "To", "Created", "Answered", "Duration (s)", "State", "Node"], rows)


__all__ = ["calls", "registrations"]
