"""ha.drill.labctl.coordinator_ready: when a node's coordinator counts as ready for a drill (no lab needed)."""

from __future__ import annotations

from typing import Any

import pytest

from ha.drill.labctl import coordinator_ready


def status(ready: bool = True, zk: str = "connected", active: bool = False) -> dict[str, Any]:
    return {"ok": True, "ready": ready, "replication": {"zookeeper": zk, "active": active}}


@pytest.mark.parametrize(
    ("doc", "holds_vip", "expected"),
    [
        (status(active=True), True, (True, "ready, active")),
        (status(), False, (True, "ready, standby")),
        (status(ready=False, active=True), True, (False, "coordinator not ready: resync pending")),
        (status(zk="unavailable"), False, (False, "coordinator's zookeeper unavailable")),
        (status(), True, (False, "coordinator not active yet on the VIP's node")),
        (status(active=True), False, (False, "coordinator still active on a node without the VIP")),
        ("connection refused", False, (False, "no coordinator status: connection refused")),
        ({"ok": True}, False, (False, "coordinator not ready: resync pending")),
    ],
)  # fmt: skip
def test_coordinator_ready(doc: dict[str, Any] | str, holds_vip: bool, expected: tuple[bool, str]) -> None:
    assert coordinator_ready(doc, holds_vip) == expected
