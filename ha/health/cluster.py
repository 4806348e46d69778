"""The health service's boundary with Pacemaker and the kernel: every command it runs is built here.

Why one place: the REST API and the loop must agree on which commands are run, tests check the commands built,
and the lab integration test is the one place that crosses the real boundary (a running attrd, a live CIB).
Unit tests run the *real* Pacemaker tools against a file CIB (``CIB_file=...``, produced by ``crm_simulate``),
which checks option spelling and exit codes without a cluster; ``attrd_updater`` has no file mode, so only its
command line is tested until the lab test.

Commands, for Pacemaker 2.1.5 (Debian 12):

* health attribute: ``attrd_updater -n sipha-health -U 1|0`` (``-d <ms>`` only when dampening is configured:
  the hysteresis already debounces, and dampening would add delay to every failover).
* switchover: ``crm_resource --resource vip-<first> --move [--node TO]`` (without ``--node`` Pacemaker bans the
  current node), wait until ``crm_mon`` shows the VIP started elsewhere, then always
  ``crm_resource --resource vip-<first> --clear``: the move constraint is a means, not a state to keep;
  stickiness holds the VIP on its new node, and a forgotten ``cli-prefer``/``cli-ban`` constraint would
  silently veto the next failover. Other VIPs are colocated with the first and follow it.
* node maintenance (drain a node for patching): ``crm_attribute --node N --name standby --update on|off
  --lifetime forever`` (what ``crm_standby -N N -v on`` and crmsh's ``crm node standby`` do). Standby moves the
  VIP away and stops the node's resources; Pacemaker's per-node ``maintenance`` attribute would instead only
  unmanage them and leave the VIP where it is, which is not what an operator draining a node wants.
* cluster maintenance (no node given): ``crm_attribute --type crm_config --name maintenance-mode --update
  true|false``: Pacemaker stops managing everything (for work on Pacemaker/Corosync themselves).
* status: ``crm_mon --output-as=xml --inactive`` (``--as-xml`` is its deprecated spelling in 2.1.5). It exits
  0 even when it cannot reach the CIB ("Could not connect to the CIB: ..." inside ``<status><errors>``), so the
  XML is checked, not the exit code.
* VIP ownership: the kernel's address list (one netlink dump, ``ha.netaddr``): the VIP is held where the kernel
  has the address, which is what phones reach, whatever Pacemaker believes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ha.model import Cluster
from ha.netaddr import ipv4_addresses

ATTRIBUTE = "sipha-health"
COMMAND_TIMEOUT_S = 10.0


class ActionError(Exception):
    """A cluster action that could not be done; ``status`` is the HTTP code the API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------- attrd


def attrd_command(value: int, dampen_ms: int | None = None, name: str = ATTRIBUTE) -> list[str]:
    """``attrd_updater`` arguments to set this node's health attribute (1 healthy, 0 unhealthy)."""
    if value not in (0, 1):
        raise ValueError(f"health attribute is 0 or 1, not {value!r}")
    cmd = ["attrd_updater", "-n", name, "-U", str(value)]
    if dampen_ms is not None:
        cmd += ["-d", f"{dampen_ms}ms"]
    return cmd


@dataclass
class AttrdWriter:
    """Writes the attribute with a child process awaited on the loop, so a slow attrd never stalls probing."""

    dampen_ms: int | None = None
    timeout_s: float = COMMAND_TIMEOUT_S
    env: Mapping[str, str] | None = None

    async def write(self, value: int) -> tuple[bool, str]:
        cmd = attrd_command(value, self.dampen_ms)
        return await run_async(cmd, self.timeout_s, self.env)


async def run_async(cmd: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Run a command without blocking the loop; (ok, one-line detail). Never raises for the command's faults."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **env} if env else None,
        )
    except OSError as exc:
        return False, f"{cmd[0]}: {exc.strerror or exc}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"{cmd[0]} timed out after {timeout_s:g} s"
    text = (err or out).decode(errors="replace").strip().splitlines()
    detail = text[-1] if text else ""
    if proc.returncode != 0:
        return False, f"{cmd[0]} exit {proc.returncode}: {detail}"
    return True, out.decode(errors="replace")


# ---------------------------------------------------------------------------------------------- VIP ownership


def held_vips(cluster: Cluster, addresses: set[str]) -> list[str]:
    """Names of the VIPs whose address this host has."""
    return [v.name for v in cluster.vips if v.ip in addresses]


class VipCheck:
    """Which VIPs this host holds, from the kernel's address list (:func:`ha.netaddr.ipv4_addresses`: one netlink
    dump, ~20 us, no fork; it was a fork and exec of ``ip -j addr`` every second and on every API request); cached
    for ``max_age_s`` to absorb load-balancer polling. ``addresses`` raises OSError when it cannot tell."""

    def __init__(self, cluster: Cluster, max_age_s: float = 0.2,
                 addresses: Callable[[], set[str]] = ipv4_addresses) -> None:
        self.cluster = cluster
        self.max_age_s = max_age_s
        self.addresses = addresses
        self._at = -1e9
        self._held: list[str] = []
        self._error = ""

    def _read(self) -> list[str]:
        try:
            have = self.addresses()
        except OSError as exc:
            self._error = f"cannot list this host's addresses: {exc}"
            return []
        self._error = ""
        return held_vips(self.cluster, have)

    def held(self) -> list[str]:
        """For the API threads."""
        if time.monotonic() - self._at > self.max_age_s:
            self._held, self._at = self._read(), time.monotonic()
        return list(self._held)

    async def held_async(self) -> list[str]:
        """For the loop: a fresh answer (the dump does not block it)."""
        self._held, self._at = self._read(), time.monotonic()
        return list(self._held)

    @property
    def error(self) -> str:
        return self._error


# ---------------------------------------------------------------------------------------------- crm_mon


def parse_crm_mon(xml_text: str, vip_ids: Sequence[str] = ()) -> dict[str, Any]:
    """The parts of ``crm_mon --output-as=xml`` an operator asks /cluster for: nodes, VIP holder, roles."""
    root = ET.fromstring(xml_text)  # noqa: S314 - trusted local tool output
    errors = [e.text or "" for e in root.iterfind("status/errors/error")]
    if root.find("nodes") is None:
        # crm_mon 2.1.5 exits 0 even when it cannot reach the CIB; the only sign is this <errors> list.
        raise ValueError("; ".join(errors) or "crm_mon output has no <nodes>")
    summary = root.find("summary")
    dc = summary.find("current_dc") if summary is not None else None
    change = summary.find("last_change") if summary is not None else None
    options = summary.find("cluster_options") if summary is not None else None
    nodes = []
    for n in root.iterfind("nodes/node"):
        nodes.append({
            "name": n.get("name"),
            "online": n.get("online") == "true",
            "standby": n.get("standby") == "true",
            "maintenance": n.get("maintenance") == "true",
            "unclean": n.get("unclean") == "true",
            "is_dc": n.get("is_dc") == "true",
            "resources_running": int(n.get("resources_running") or 0),
        })
    resources: list[dict[str, Any]] = []
    for r in root.iter("resource"):
        resources.append({
            "id": r.get("id"),
            "agent": r.get("resource_agent"),
            "role": r.get("role"),
            "active": r.get("active") == "true",
            "failed": r.get("failed") == "true",
            "nodes": [x.get("name") for x in r.iterfind("node")],
        })
    vips = {}
    for vid in vip_ids:
        holders = sorted({n for r in resources if r["id"] == vid and r["active"] for n in r["nodes"]})
        vips[vid] = holders[0] if len(holders) == 1 else (holders or None)
    history = []
    for node in root.iterfind("node_history/node"):
        for rh in node.iterfind("resource_history"):
            for op in rh.iterfind("operation_history"):
                history.append({
                    "node": node.get("name"),
                    "resource": rh.get("id"),
                    "task": op.get("task"),
                    "rc": op.get("rc_text"),
                    "at": op.get("last-rc-change"),
                })
    history = [h for h in history if h["task"] != "monitor"]
    return {
        "dc": dc.get("name") if dc is not None and dc.get("present") == "true" else None,
        "quorum": (dc.get("with_quorum") == "true") if dc is not None and dc.get("with_quorum") else None,
        "maintenance_mode": options is not None and options.get("maintenance-mode") == "true",
        "last_change": (change.get("time") or None) if change is not None else None,
        "nodes": nodes,
        "vips": vips,
        "resources": resources,
        "transitions": history,
        "bans": [
            {"id": b.get("id"), "resource": b.get("resource"), "node": b.get("node"), "weight": b.get("weight")}
            for b in root.iterfind("bans/ban")
            if (b.get("id") or "").startswith("cli-")
        ],
    }


# ---------------------------------------------------------------------------------------------- actions


class ClusterActions(Protocol):
    """What the REST API may ask of the cluster. The real one is :class:`PacemakerActions`; API unit tests
    pass a recording object, and the lab integration test crosses the real Pacemaker boundary."""

    def status(self) -> dict[str, Any]: ...

    def switchover(self, to: str | None) -> dict[str, Any]: ...

    def maintenance(self, node: str | None, on: bool) -> dict[str, Any]: ...


@dataclass
class PacemakerActions:
    """:class:`ClusterActions` through the Pacemaker 2.1.5 command-line tools (see the module docstring).

    ``env`` is added to the tools' environment: ``{"CIB_file": path}`` points them at a file CIB (tests).
    """

    cluster: Cluster
    env: Mapping[str, str] = field(default_factory=dict)
    move_timeout_s: float = 30.0
    poll_s: float = 0.25

    @property
    def vip_ids(self) -> list[str]:
        return [f"vip-{v.name}" for v in self.cluster.vips]

    def run(self, cmd: Sequence[str]) -> str:
        try:
            proc = subprocess.run(
                list(cmd), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
                env={**os.environ, **self.env},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ActionError(502, f"{cmd[0]}: {exc}") from None
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise ActionError(502, f"{' '.join(cmd)}: exit {proc.returncode}: {lines[-1] if lines else ''}")
        return proc.stdout

    def status(self) -> dict[str, Any]:
        out = self.run(["crm_mon", "--output-as=xml", "--inactive"])
        try:
            return parse_crm_mon(out, self.vip_ids)
        except (ValueError, ET.ParseError) as exc:
            raise ActionError(502, f"crm_mon: {exc}") from None

    def vip_holder(self) -> str | None:
        holder = self.status()["vips"].get(self.vip_ids[0])
        return holder if isinstance(holder, str) else None

    def move_command(self, to: str | None) -> list[str]:
        return ["crm_resource", "--resource", self.vip_ids[0], "--move", *(["--node", to] if to else [])]

    def clear_command(self) -> list[str]:
        return ["crm_resource", "--resource", self.vip_ids[0], "--clear"]

    def switchover(self, to: str | None) -> dict[str, Any]:
        before = self.vip_holder()
        if before is None:
            raise ActionError(409, f"{self.vip_ids[0]} is not running on exactly one node: nothing to switch over")
        if to == before:
            return {"changed": False, "vip": self.vip_ids[0], "holder": before, "message": f"already on {to}"}
        self.run(self.move_command(to))
        try:
            deadline = time.monotonic() + self.move_timeout_s
            while True:
                now = self.vip_holder()
                if now is not None and now != before and (to is None or now == to):
                    return {"changed": True, "vip": self.vip_ids[0], "from": before, "holder": now,
                            "message": f"{self.vip_ids[0]} moved from {before} to {now}"}
                if time.monotonic() >= deadline:
                    raise ActionError(
                        504, f"{self.vip_ids[0]} still on {now or 'no node'} after {self.move_timeout_s:g} s "
                        f"(is the target healthy, sipha-health=1?); move constraint cleared")
                time.sleep(self.poll_s)
        finally:
            self.run(self.clear_command())

    def maintenance_command(self, node: str | None, on: bool) -> list[str]:
        if node:
            return ["crm_attribute", "--node", node, "--name", "standby", "--update", "on" if on else "off",
                    "--lifetime", "forever"]
        return ["crm_attribute", "--type", "crm_config", "--name", "maintenance-mode", "--update",
                "true" if on else "false"]

    def maintenance(self, node: str | None, on: bool) -> dict[str, Any]:
        self.run(self.maintenance_command(node, on))
        what = f"node {node} standby" if node else "cluster maintenance-mode"
        return {"changed": True, "node": node, "on": on, "message": f"{what} {'on' if on else 'off'}"}


__all__ = [
    "ATTRIBUTE",
    "ActionError",
    "AttrdWriter",
    "ClusterActions",
    "PacemakerActions",
    "VipCheck",
    "attrd_command",
    "held_vips",
    "parse_crm_mon",
    "run_async",
]
