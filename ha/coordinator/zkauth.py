"""Who may read and write sipha's znodes: ``zookeeper.auth_file``.

Why: the ensemble listens on the cluster network, and a binding in it is where a phone's calls go. With open
ACLs (ZooKeeper's default) anyone who reaches the client port can read every phone's contact or write one of
their own and have the standby install it: calls to a victim routed to an attacker. With ``auth_file`` set, every
sipha client authenticates with ZooKeeper's digest scheme and creates its znodes readable and writable by that
identity only; the file holds a line ``user:password`` (more than one while a credential is being changed: see
ZkAuth), the same on every node (the lab writes one per lab; the Ansible role makes one on the first node once
and copies it to the others).

The shared parent ``/sipha`` stays open so that clusters with different credentials can share an ensemble; each
cluster's own subtree (``/sipha/<name>``) is closed. Znodes written before ``auth_file`` was set are closed by
:func:`secure_tree` when a coordinator next ensures the layout (ha.coordinator.store.ZkStore.ensure_layout).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.security import ACL, make_digest_acl

_USER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_PASSWORD = 16  # digest auth sends it in clear to the server; a guessable one would be the weak point
WINDOW = 1000  # requests in flight while walking a tree (bounded: kazoo queues them all in memory)


class ZkAuthError(ValueError):
    """The credential file is missing, unreadable or not ``user:password``; the message is one line."""


@dataclass(frozen=True)
class ZkAuth:
    """One or more digest credentials, all authenticated, all given every permission on what this writes.

    More than one line is how a credential is changed without locking the cluster out of its own tree: add the
    new line on every node, restart the coordinators (the first to start re-ACLs the tree for both), then drop
    the old line and restart them again (the tree's ACL follows). A credential simply replaced is refused by
    the tree its predecessor closed (``ZkStore.ensure_layout`` says so)."""

    credentials: tuple[tuple[str, str], ...]

    @property
    def acl(self) -> list[ACL]:
        return [make_digest_acl(user, password, all=True) for user, password in self.credentials]

    def client_kwargs(self) -> dict[str, Any]:
        """KazooClient arguments: authenticate on every (re)connect, create with these identities' ACL."""
        return {"auth_data": [("digest", f"{u}:{p}") for u, p in self.credentials], "default_acl": self.acl}


def same_acl(a: Sequence[ACL], b: Sequence[ACL]) -> bool:
    """The same grants, in whatever order the server lists them."""
    return {(x.perms, x.id.scheme, x.id.id) for x in a} == {(x.perms, x.id.scheme, x.id.id) for x in b}


def read(path: str | Path) -> ZkAuth:
    where = f"zookeeper.auth_file: {path}"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ZkAuthError(f"{where}: cannot read: {exc.strerror}") from None
    creds: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.strip().partition(":")
        if not sep:
            raise ZkAuthError(f"{where}: line {n}: expected user:password")
        if not _USER.fullmatch(user):
            raise ZkAuthError(f"{where}: line {n}: the user must be 1-64 of A-Z a-z 0-9 _ . -")
        if len(password) < MIN_PASSWORD:
            raise ZkAuthError(f"{where}: line {n}: the password must be at least {MIN_PASSWORD} characters")
        creds.append((user, password))
    if not creds:
        raise ZkAuthError(f"{where}: no user:password line")
    return ZkAuth(tuple(creds))


def client_kwargs(zookeeper: Any) -> dict[str, Any]:
    """The model's ``zookeeper`` section -> KazooClient arguments ({} when no auth_file is set)."""
    return read(zookeeper.auth_file).client_kwargs() if zookeeper.auth_file else {}


def secure_tree(client: KazooClient, top: str, acl: Sequence[ACL], timeout: float = 10.0) -> int:
    """Give ``top`` and every znode below it ``acl`` where it has another; how many were changed.

    The deepest first and ``top`` last, so a walk cut short (a lost connection, a stopped node) is done again
    whole at the next start: ``ensure_layout`` looks only at the top's ACL. Pipelined, WINDOW requests in
    flight: 100k bindings one request at a time would hold a coordinator's start for tens of seconds."""
    want = list(acl)
    found: list[str] = []  # still to change, parents before children
    level = [top]
    while level:
        parents: list[str] = []
        for path, (have, stat) in _each(client.get_acls_async, level, timeout):
            if not same_acl(have, want):
                found.append(path)
            if stat.numChildren:
                parents.append(path)
        level = [f"{path}/{c}" for path, kids in _each(client.get_children_async, parents, timeout) for c in kids]
    # any version: each writer sets the same
    return sum(1 for _ in _each(lambda p: client.set_acls_async(p, want), found[::-1], timeout))


def _each(call: Callable[[str], Any], paths: Sequence[str], timeout: float) -> Iterator[tuple[str, Any]]:
    """(path, what ``call(path)``'s async result gives), WINDOW requests in flight at a time (kazoo queues them all
    in memory); a path deleted meanwhile is left out."""
    for i in range(0, len(paths), WINDOW):
        for path, a in [(p, call(p)) for p in paths[i:i + WINDOW]]:
            try:
                got = a.get(timeout=timeout)
            except NoNodeError:
                continue
            yield path, got


__all__ = ["ZkAuth", "ZkAuthError", "client_kwargs", "read", "same_acl", "secure_tree"]
