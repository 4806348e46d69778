"""The drill's :class:`~ha.drill.faults.ClusterControl` for the namespace lab: a thin layer over ``ha.lab``.

Kept thin on purpose: every decision (health rules, targets, fault sequences, measurements) lives in modules
tested without a lab; this file only maps each question to the lab function that answers it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

from ha.drill.faults import ClusterState, DrillError
from ha.drill.ownership import NamespaceView
from ha.drill.traffic import SocketFactory

COORDINATOR_SOCKET = "/run/sipha/coordinator.sock"  # ha.coordinator.service's default status socket
STOCK_GROUP = "sip"  # ha.lab.stock: IPaddr2 + ocf:heartbeat:kamailio in one group


def coordinator_ready(status: dict[str, Any] | str, holds_vip: bool) -> tuple[bool, str]:
    """Whether a node's coordinator is where a drill needs it: ready (its proxy holds the store's state),
    connected to ZooKeeper, and active exactly on the VIP's node. Why: a drill right after a start or a
    previous fault would otherwise register phones while nobody writes them to the store yet, and report
    registrations "lost" that were never replicated."""
    if isinstance(status, str):
        return False, f"no coordinator status: {status}"
    repl = status.get("replication") or {}
    if not status.get("ready"):
        return False, "coordinator not ready: resync pending"
    if repl.get("zookeeper") != "connected":
        return False, f"coordinator's zookeeper {repl.get('zookeeper', 'unknown')}"
    if bool(repl.get("active")) != holds_vip:
        return False, ("coordinator not active yet on the VIP's node" if holds_vip
                       else "coordinator still active on a node without the VIP")  # fmt: skip
    return True, "ready, " + ("active" if holds_vip else "standby")


class LabControl:
    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        from ha.lab import lab as labmod

        spec = spec or labmod.load_spec()
        if not spec or not spec.get("hosts"):
            raise DrillError("no lab is up (start one with `sipha lab up`)")
        self.lab = labmod
        self.spec = spec
        self.hosts = {h["name"]: h for h in spec["hosts"]}
        self.nodes = tuple(h["name"] for h in spec["hosts"] if h["role"] == "node")
        self.vip = spec["vips"][0]
        self.sip_port = int(spec["sip_port"])
        self.client_ip = labmod.host(spec, "client")["ip"]
        self.variant = spec.get("variant", "model")
        self._views = {n: NamespaceView(self.hosts[n]["ns"], self._in_netns) for n in self.nodes}
        self._model: Any = None

    @staticmethod
    def _in_netns(ns: str, fn: Any) -> Any:
        from ha.lab import node as labnode

        return labnode.in_netns(ns, fn)

    @property
    def model(self) -> Any:
        if self._model is None:
            from ha import model

            self._model = model.load(self.spec["cluster_yaml"])
        return self._model

    def status(self) -> ClusterState:
        st = self.lab.status(self.spec)
        holders = st["vips"].get(self.vip, "-")
        stock = self.variant == "stock"  # one proxy, grouped with the VIP: probed on the VIP's node only
        proxies = {}
        for n in self.nodes:
            if st["hosts"][n].get("power") == "on" and (not stock or n in holders.split(",")):
                proxies[n] = self.lab.sip_options(self.spec, self.hosts[n]["ip"], timeout=0.5)
        pm = st.get("pacemaker", {})
        failed = tuple(f"{r['id']} on {','.join(r['nodes']) or '?'}" for r in pm.get("resources", []) if r["failed"])
        holder = holders if holders in self.nodes else None
        replication = {}
        if any(r["id"] == "coordinator" for r in pm.get("resources", [])):  # the stock lab replicates nothing
            replication = {n: coordinator_ready(self.coordinator_status(n), n == holder) for n in proxies}
        return ClusterState(
            nodes=self.nodes,
            vip=self.vip,
            powered={n: st["hosts"][n].get("power") == "on" for n in self.nodes},
            quorate={n: bool(st["quorum"].get(n, {}).get("quorate")) for n in self.nodes},
            vip_holders=tuple(h for h in holders.split(",") if h and h != "-"),
            vip_answers=bool(st["vip_sip"]["answered"]),
            vip_detail=st["vip_sip"]["detail"],
            proxies=proxies,
            partitioned=tuple(n for n in self.nodes if st["hosts"][n].get("partitioned")),
            failed_resources=failed,
            replication=replication,
            standby_proxies=not stock,
        )

    def coordinator_status(self, node: str) -> dict[str, Any] | str:
        """The node's coordinator status document (its unix socket, asked from inside the node), or why not."""
        code = ("import sys; from ha.unixline import exchange; "
                f"sys.stdout.write(exchange({COORDINATOR_SOCKET!r}, b'status\\n', 1.0).decode())")  # fmt: skip
        rc, out = self.exec(node, [sys.executable, "-c", code], timeout=5)
        if rc != 0:
            return out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"
        try:
            return json.loads(out)
        except ValueError:
            return f"unreadable status: {out.strip()[:80]!r}"

    def proxy_holds(self, node: str, aors: list[str]) -> set[str] | str:
        """The AoRs of ``aors`` the node's proxy has a binding for (``ul.lookup`` over its RPC socket, asked from
        inside the node), or why it cannot tell."""
        code = ("import json, sys; from ha.proxy.kamailio import Rpc, RpcError\n"
                "have = []\n"
                "with Rpc(timeout=1.0) as r:\n"
                "    for a in json.loads(sys.argv[1]):\n"
                "        try:\n"
                "            got = r.call('ul.lookup', 'location', a)\n"
                "        except RpcError:\n"
                "            continue\n"
                "        if got:\n"
                "            have.append(a)\n"
                "print(json.dumps(have))")  # fmt: skip
        rc, out = self.exec(node, [sys.executable, "-c", code, json.dumps(aors)], timeout=10)
        if rc != 0:
            return out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"
        try:
            return set(json.loads(out))
        except ValueError:
            return f"unreadable lookup result: {out.strip()[:80]!r}"

    def vip_owners(self) -> dict[str, bool]:
        # A powered-off node's namespace still holds the VIP, but nothing there answers: not an owner.
        return {n: self.lab.powered(n) and v.holds(self.vip) for n, v in self._views.items()}

    def exec(self, node: str, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        try:
            p = self.lab.exec_in(self.spec, node, argv, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, f"`{' '.join(argv)}` timed out after {timeout:g} s"
        except RuntimeError as exc:  # LabError: powered off
            return 1, str(exc)
        return p.returncode, (p.stdout + p.stderr)

    def power(self, node: str, on: bool) -> None:
        from ha.lab.supervisor import SupervisorError, power

        try:
            power("on" if on else "off", node)
        except SupervisorError as exc:
            raise DrillError(str(exc)) from None

    def partition(self, node: str, cut: bool) -> None:
        from ha.lab import node as labnode

        try:
            labnode.partition(self.spec, self.hosts[node], cut=cut)
        except labnode.LabError as exc:
            raise DrillError(str(exc)) from None

    def link(self, node: str, up: bool) -> None:
        from ha.lab import node as labnode

        try:
            labnode.link(self.spec, self.hosts[node], up=up)
        except labnode.LabError as exc:  # e.g. the node is being power-cycled (fenced): its port is gone
            raise DrillError(str(exc)) from None

    def socket_factory(self) -> SocketFactory:
        ns = self.lab.client_ns(self.spec)
        return lambda kind: self._in_netns(ns, lambda: socket.socket(socket.AF_INET, kind))

    def pacemaker_command(self, what: str, node: str, on: bool = True) -> list[str]:
        """The same command spellings as the health service's actions (``ha.health.cluster``)."""
        from ha.health.cluster import PacemakerActions

        actions = PacemakerActions(self.model)
        if self.variant == "stock" and what in ("move", "clear"):  # ha.lab.stock: the VIP is in group "sip"
            return ["crm_resource", "--resource", STOCK_GROUP, *(["--move", "--node", node] if what == "move"
                                                                  else ["--clear"])]  # fmt: skip
        if what == "move":
            return actions.move_command(node)
        if what == "clear":
            return actions.clear_command()
        if what == "standby":
            return actions.maintenance_command(node, on)
        if what == "cleanup":
            return ["crm_resource", "--cleanup", "--node", node]
        raise ValueError(f"unknown pacemaker command {what!r}")

    def log_lines(self, node: str, max_bytes: int = 4 << 20) -> list[str]:
        """The tail of the node's Pacemaker and Corosync logs (files on the host: reading disturbs nothing)."""
        root = self.lab.STATE_DIR / node / "root" / "var" / "log"
        out: list[str] = []
        for f in (root / "pacemaker" / "pacemaker.log", root / "corosync" / "corosync.log"):
            try:
                with f.open("rb") as fh:
                    size = fh.seek(0, 2)
                    fh.seek(max(0, size - max_bytes))
                    out += fh.read().decode(errors="replace").splitlines()
            except OSError:
                continue
        return out

    def close(self) -> None:
        for v in self._views.values():
            v.close()
