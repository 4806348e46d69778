"""Fixtures for the testinfra suite: which hosts, and a testinfra host per name with verified host keys.

Give the deployed cluster with environment variables (pytest options would not reach this non-root conftest
when the whole tree runs):

    SIPHA_INVENTORY=build/lab/inventory.ini     the rendered inventory (`sipha render ... --out build/lab`)
    SIPHA_KNOWN_HOSTS=/var/tmp/sipha-lab/ssh/known_hosts   host keys to verify against (`sipha lab up --bare`
                                                writes one)
    SIPHA_SSH_KEY=/var/tmp/sipha-lab/ssh/id_ed25519        optional: the private key to log in with

Against the lab, run it from the client namespace (`ip netns exec sipha-client ...`): the hosts' lab addresses
are reachable only there. tests/lab/test_deploy_lab.py does exactly that after provisioning the bare lab.

Without SIPHA_INVENTORY every test here is skipped, saying so. Connections use testinfra's paramiko backend,
but the paramiko client is built by ha.remote (RejectPolicy against SIPHA_KNOWN_HOSTS): testinfra's own client
would accept any host key (WarningPolicy).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ENV_INVENTORY, ENV_KNOWN_HOSTS, ENV_KEY = "SIPHA_INVENTORY", "SIPHA_KNOWN_HOSTS", "SIPHA_SSH_KEY"


@dataclass(frozen=True)
class InventoryHost:
    name: str
    group: str  # nodes | witness
    vars: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.vars.get("ansible_host", self.name)


def read_inventory(path: Path) -> list[InventoryHost]:
    """The rendered inventory's [nodes] and [witnesses] host lines (name key=value ...)."""
    hosts, group = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            group = line.strip("[]")
            continue
        if group in ("nodes", "witnesses"):
            name, *kv = line.split()
            hosts.append(InventoryHost(name, group, dict(x.split("=", 1) for x in kv if "=" in x)))
    return hosts


def _inventory() -> list[InventoryHost]:
    p = os.environ.get(ENV_INVENTORY)
    return read_inventory(Path(p)) if p and Path(p).is_file() else []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``node`` / ``any_host`` parameters: one test per inventory host (a placeholder that skips when none)."""
    hosts = _inventory()
    for arg, group in (("node", "nodes"), ("witness_host", "witnesses"), ("any_host", None)):
        if arg in metafunc.fixturenames:
            names = [h.name for h in hosts if group is None or h.group == group]
            metafunc.parametrize(arg, names or ["<no inventory>"], scope="session")


@pytest.fixture(scope="session")
def inventory() -> list[InventoryHost]:
    p = os.environ.get(ENV_INVENTORY)
    if not p:
        pytest.skip(f"no deployed cluster given: set {ENV_INVENTORY} (and {ENV_KNOWN_HOSTS}) to check one")
    if not Path(p).is_file():
        pytest.fail(f"{ENV_INVENTORY}={p}: no such file")
    return read_inventory(Path(p))


class Hosts:
    """testinfra hosts by inventory name, connected lazily and closed at the end of the session."""

    def __init__(self, inventory: list[InventoryHost], known_hosts: Path, key: str | None) -> None:
        self.by_name = {h.name: h for h in inventory}
        self.known_hosts, self.key = known_hosts, key
        self._open: dict[str, Any] = {}
        self._remotes: list[Any] = []

    def __call__(self, name: str) -> Any:
        if name not in self._open:
            import testinfra

            from ha.remote import Remote, RemoteError, Target

            h = self.by_name[name]
            target = Target(name, h.address, int(h.vars.get("ansible_port", 22)), h.vars.get("ansible_user", "root"))
            remote = Remote(target, self.known_hosts, self.key)
            try:
                remote.open()
            except RemoteError as exc:
                pytest.fail(str(exc))
            self._remotes.append(remote)
            host = testinfra.get_host(f"paramiko://{target.user}@{target.host}:{target.port}",
                                      ssh_identity_file=self.key)  # fmt: skip
            # cached_property: this verified client is the one testinfra uses from now on.
            host.backend.__dict__["client"] = remote.conn.client
            self._open[name] = host
        return self._open[name]

    def close(self) -> None:
        for r in self._remotes:
            r.close()


@pytest.fixture(scope="session")
def hosts(inventory: list[InventoryHost]) -> Iterator[Hosts]:
    kh = os.environ.get(ENV_KNOWN_HOSTS)
    if not kh:
        pytest.fail(f"{ENV_INVENTORY} is set but {ENV_KNOWN_HOSTS} is not: host keys must be verified")
    h = Hosts(inventory, Path(kh), os.environ.get(ENV_KEY))
    yield h
    h.close()


@pytest.fixture(scope="session")
def node_names(inventory: list[InventoryHost]) -> list[str]:
    return [h.name for h in inventory if h.group == "nodes"]


@pytest.fixture(scope="session")
def has_witness(inventory: list[InventoryHost]) -> bool:
    return any(h.group == "witnesses" for h in inventory)
