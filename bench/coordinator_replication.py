"""Replication throughput, lag and memory: REGISTER -> (ZooKeeper ->) standby proxy, sipha beside Kamailio
dmq_usrloc, measured the same way. Not a pass/fail gate: it prints the figures and writes a JSON summary.

``flock /run/lock/sipha-lab.lock .venv/bin/python bench/coordinator_replication.py dmq --json out.json``
``flock /run/lock/sipha-lab.lock bash -c "trap '.venv/bin/sipha lab down' EXIT; .venv/bin/sipha lab up
examples/lab.yaml && .venv/bin/python bench/coordinator_replication.py sipha --json out.json"``

* **sipha**: the lab (``examples/lab.yaml``). REGISTERs go from the client namespace (198.51.100.50, this
  process re-runs itself there) to the VIP; the proxy that holds it is the receiving proxy, the other node's
  the standby. Path: proxy event -> active coordinator -> ZooKeeper -> the standby coordinator's watch ->
  ``ul.add`` into the standby proxy.
* **dmq**: two loopback Kamailio 5.6 instances with dmq_usrloc and tuned batching, configured and started by
  bench/coordinator_dmq.py (imported, not copied); REGISTERs to A (127.0.0.11), B is the standby.

Steps (``--steps rate:seconds,...``): REGISTERs at a fixed offered rate, distinct AoRs, one binding each,
expires 3600, never waiting for answers; markers (``--marker-rate``/s) ride along. Every 200 ms the contacts in
the receiving proxy, in ZooKeeper (sipha: the leader's ``zk_znode_count`` from mntr, compared by its offset; the
exact ``numChildren`` sum of the 256 buckets after each step) and in the standby proxy
(``usrloc:location_contacts``) are sampled. Per step: offered, accepted (200 OK/s at the sender and the
receiving proxy's count), reached ZooKeeper and the standby (/s over the step and its second half), how far
behind they were at the step's last send and how long they then took to catch up (bounded). Markers: from the
marker's 200 OK at the sender to its first ``ul.lookup`` hit on the standby, and (sipha) to its znode existing
(lib: bench/replbench.py).

Memory: the standby Kamailio's ``core.shmmem`` before the first step and after it has caught up (the first,
moderate step: 500/s for 60 s, ~31k contacts; reported per 100k, usrloc's cost is linear); for sipha also the
coordinators' RSS on both nodes and ZooKeeper's ``zk_approximate_data_size`` (mntr) and JVM RSS. Where the cores
go: CPU time per process group over each step. sipha stops stepping when the VIP left the active (also for a few
seconds: the coordinators' logs) or a coordinator restarted: the figures after it would describe a failover.
Nothing is unregistered: the lab goes down after (``lab down``), the dmq instances are stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests" / "lab")]

import replbench as rb  # noqa: E402

from ha.coordinator.service import SUMMARY_EVERY_S  # noqa: E402
from ha.proxy import kamailio  # noqa: E402

DEFAULT_STEPS = "500:60,1000:20,2000:12,5000:12,10000:12,15000:12"
CATCH_UP_LIMIT_S = 120.0
SHM_FREE_MIN = 0.2  # a step starts only while both proxies have this share of shared memory free


def parse_steps(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        rate, secs = part.split(":")
        out.append((int(rate), float(secs)))
    return out


def value(sampler: rb.Sampler, key: str, t: float) -> int | None:
    """The last non-missing value of ``key`` sampled at or before ``t``."""
    best = None
    for s in sampler.samples:
        if s.t > t:
            break
        if s.values.get(key) is not None:
            best = s.values[key]
    return best


class System:
    """What differs between sipha and dmq: where to send, what to read. Subclasses fill the fields."""

    name = ""
    local: tuple[str, int] = ("127.0.0.1", 0)
    target: tuple[str, int] = ("127.0.0.1", 5060)
    domain = ""
    recv_sock: Path
    standby_sock: Path
    has_zk = False
    sender_local: tuple[str, int] = ("", 0)

    def zk_count(self) -> int:
        raise NotImplementedError

    def memory(self, rpc_standby: kamailio.Rpc) -> dict[str, Any]:
        return {"standby_shm_used": rb.shm_used(rpc_standby)}

    def step_context(self) -> dict[str, Any]:
        return {}

    def final(self) -> dict[str, Any]:
        return {}

    def cpu_groups(self) -> dict[str, list[int]]:
        """Processes whose CPU time each step reports, by name (where the cores go)."""
        return {}

    def after_step(self, t_wall0: float, t_wall1: float) -> dict[str, Any]:
        """Anything more to report about a step (wall-clock window: start of the step to caught up)."""
        return {}

    def sender_at(self, local: tuple[str, int]) -> None:
        """The sender's address (its phones' Contact host and port), once known."""
        self.sender_local = local

    def markers_in_store(self) -> Callable[[list[str]], list[bool]] | None:
        """How to tell which marker AoRs an intermediate store already holds (None: there is none)."""
        return None

    def stop_after(self, row: dict[str, Any]) -> str:
        """Why no further step makes sense after this one ('' to go on)."""
        return ""


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


class Cpu:
    """CPU cores used per process group (and by the whole machine) between construction and ``since()``.

    Only processes alive at both reads count: a process restarted in between (a coordinator Pacemaker restarted)
    would otherwise subtract its old total from its new one."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t = time.monotonic()
        self.cpu = {g: {p: rb.cpu_s([p]) for p in pids} for g, pids in groups.items()}
        self.busy = machine_busy()

    def since(self) -> dict[str, float]:
        dt = time.monotonic() - self.t
        if dt < 1.0:
            return {"seconds": round(dt, 2)}  # too short a window for shares of a core
        out: dict[str, float] = {}
        for g, before in self.cpu.items():
            alive = [p for p in before if Path(f"/proc/{p}").exists()]
            out[g] = round(sum(rb.cpu_s([p]) - before[p] for p in alive) / dt, 2)
        b, t = machine_busy()
        out["machine_busy_cores"] = round((b - self.busy[0]) / max(1, t - self.busy[1]) * (os.cpu_count() or 1), 2)
        out["seconds"] = round(dt, 1)
        return out


def shm_free_share(rpc: kamailio.Rpc) -> float:
    m = rpc.call("core.shmmem")
    return int(m["free"]) / int(m["total"])


def run(system: System, steps: list[tuple[int, float]], marker_rate: float, sender: rb.Sender) -> dict[str, Any]:
    """Warm-up, then each step with its catch-up; memory around the first step. Bounded in time and count."""
    rpc_recv = kamailio.Rpc(system.recv_sock, timeout=3.0)
    rpc_stby = kamailio.Rpc(system.standby_sock, timeout=3.0)
    rpc_mark = kamailio.Rpc(system.standby_sock, timeout=3.0)
    probe_recv = kamailio.Rpc(system.recv_sock, timeout=3.0)
    probe_stby = kamailio.Rpc(system.standby_sock, timeout=3.0)
    probes: dict[str, Callable[[], int]] = {"recv": lambda: rb.location_contacts(probe_recv)}
    if system.has_zk:
        probes["zk"] = system.zk_count
    probes["standby"] = lambda: rb.location_contacts(probe_stby)
    sampler = rb.Sampler(probes, every=0.2)
    markers = rb.Markers(rpc_mark, sender.markers)
    out: dict[str, Any] = {"system": system.name, "marker_rate": marker_rate, "steps": [], "notes": []}
    t_first = 0.0
    try:
        sampler.start()
        markers.start()
        w = sender.step("warm", 20, 1.0, 0, "mkwx", 20)
        system.sender_at(tuple(w["local"]))
        markers.mid = system.markers_in_store()
        if not _caught_up(sampler, {"standby": 0, "zk": 0}, 30):
            raise RuntimeError(f"warm-up: the standby did not get the {w['ok']} warm-up bindings within 30 s: "
                               f"{sampler.latest()}")
        out["memory_before"] = system.memory(rpc_stby)
        out["memory_before"]["standby_contacts"] = rb.location_contacts(rpc_stby)
        out["memory_before"]["receiving_shm_used"] = rb.shm_used(rpc_recv)
        for i, (rate, secs) in enumerate(steps):
            if i > 0:
                free = min(shm_free_share(rpc_recv), shm_free_share(rpc_stby))
                if free < SHM_FREE_MIN:
                    out["notes"].append(f"steps from {rate}/s on skipped: only {free:.0%} shared memory free")
                    break
            t_first = t_first or time.monotonic()
            groups = {"sender": [sender.proc.pid], "bench": [os.getpid()], **system.cpu_groups()}
            row = one_step(system, sampler, markers, sender, i, rate, secs, marker_rate, groups)
            out["steps"].append(row)
            print(json.dumps(row), flush=True)
            stop = system.stop_after(row)
            if stop:
                out["notes"].append(stop)
                break
            if i == 0:
                out["memory_after_first"] = system.memory(rpc_stby)
                out["memory_after_first"]["standby_contacts"] = rb.location_contacts(rpc_stby)
                out["memory_after_first"]["receiving_shm_used"] = rb.shm_used(rpc_recv)
        markers.wait_done(5)
        out["markers_missed"] = markers.missed
        out["sampler_errors"] = sampler.errors
        out["marker_polls"] = markers.polls
        out["series_columns"] = ["s", *probes]
        out["series"] = sampler.series(t_first)
        out.update(system.final())
    finally:
        markers.stop()
        sampler.stop()
        for r in (rpc_recv, rpc_stby, rpc_mark, probe_recv, probe_stby):
            r.close()
    return out


def _caught_up(sampler: rb.Sampler, offsets: dict[str, int], limit_s: float) -> float | None:
    """Waits until every other count has reached the receiving proxy's (plus its offset); monotonic time or None.

    The receiving proxy's count is read again each time: answers still in flight may add a few."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        s = sampler.latest()
        if s is not None and s.values.get("recv") is not None and all(
                s.values.get(k) is not None and s.values[k] + off >= s.values["recv"]  # type: ignore[operator]
                for k, off in offsets.items() if k in s.values):  # fmt: skip
            return s.t
        time.sleep(0.05)
    return None


def one_step(system: System, sampler: rb.Sampler, markers: rb.Markers, sender: rb.Sender, i: int, rate: int,
             secs: float, marker_rate: float, groups: dict[str, list[int]]) -> dict[str, Any]:  # fmt: skip
    ctx0 = system.step_context()
    time.sleep(0.5)  # a fresh sample before the step
    t_base = time.monotonic()
    base = {k: value(sampler, k, t_base) or 0 for k in ("recv", "zk", "standby")}
    offsets = {k: base["recv"] - base[k] for k in ("zk", "standby")}  # normally 0: all caught up before
    n_mark = len(markers.results)
    t_wall0 = time.time()
    cpu = Cpu(groups)
    res = sender.step(f"s{i}x", rate, secs, marker_rate, f"{rb.MARK}{i}x", int(rate * secs * 1.2) + 10)
    t0, t_last = res["t0"], res["t_last"]
    dur = t_last - t0
    row: dict[str, Any] = {"step": i, "offered_per_s": rate, "seconds": round(dur, 2), "sent": res["sent"],
                           "markers_sent": res["markers_sent"],
                           "offered_with_markers_per_s": round((res["sent"] + res["markers_sent"]) / dur),
                           "answered_200": res["ok"], "answered_other": res["other"],
                           "other_codes_so_far": res["other_codes"],
                           "accepted_per_s": round(res["ok"] / dur)}
    row["cpu_cores_step"] = cpu.since()  # the step and the 1 s after it (answers in flight)
    cpu = Cpu(groups)
    half = t0 + dur / 2
    for k in ("recv", "zk", "standby") if system.has_zk else ("recv", "standby"):
        at_end, at_half = value(sampler, k, t_last), value(sampler, k, half)
        row[f"{k}_per_s"] = None if at_end is None else round((at_end - base[k]) / (t_last - t_base))
        row[f"{k}_per_s_2nd_half"] = None if at_end is None or at_half is None else round(
            (at_end - at_half) / (t_last - half))
    recv_end = value(sampler, "recv", t_last) or 0
    for k in ("zk", "standby") if system.has_zk else ("standby",):
        have = value(sampler, k, t_last)
        row[f"{k}_behind_at_end"] = None if have is None else recv_end - (have + offsets[k])
    # Caught up: the first sample from the last send on in which the other count reached the receiving proxy's
    # final one (read once everything is in: answers still in flight at the last send add a few).
    t_all = _caught_up(sampler, offsets, CATCH_UP_LIMIT_S)
    recv_final = value(sampler, "recv", time.monotonic()) or 0
    for k in ("zk", "standby") if system.has_zk else ("standby",):
        t_k = None if t_all is None else next(
            (s.t for s in sampler.samples if s.t >= t_last and s.values.get(k) is not None
             and s.values[k] + offsets[k] >= recv_final), None)  # type: ignore[operator]
        row["catch_up_s" if k == "standby" else f"{k}_catch_up_s"] = None if t_k is None else round(t_k - t_last, 2)
    row["cpu_cores_catch_up"] = cpu.since()
    row.update(system.after_step(t_wall0, time.time()))
    last = sampler.latest()
    row["final"] = None if last is None else last.values
    row["recv_added"] = (value(sampler, "recv", time.monotonic()) or 0) - base["recv"]
    markers.wait_done(10)
    mine = [r for r in markers.results[n_mark:] if r.aor.startswith(f"{rb.MARK}{i}x")]
    row["lag"] = rb.lag_summary(mine, sum(m.startswith(f"{rb.MARK}{i}x") for m in markers.missed))
    row["load1"] = round(os.getloadavg()[0], 2)
    row.update({f"before_{k}": v for k, v in ctx0.items()})
    row.update({f"after_{k}": v for k, v in system.step_context().items()})
    return row


# ------------------------------------------------------------------------------------------------ dmq


class Dmq(System):
    name = "dmq_usrloc (tuned batching)"

    def __init__(self, a: Path, b: Path) -> None:
        import coordinator_dmq as dmq

        self.dmq = dmq
        self.recv_sock, self.standby_sock = a, b
        self.target = ("127.0.0.11", 5060)
        self.domain = "127.0.0.11"

    def cpu_groups(self) -> dict[str, list[int]]:
        return {"kamailio_receiving": rb.pids_matching(str(self.recv_sock.parent / "k.cfg")),
                "kamailio_standby": rb.pids_matching(str(self.standby_sock.parent / "k.cfg"))}

    def memory(self, rpc_standby: kamailio.Rpc) -> dict[str, Any]:
        return {"standby_shm_used": rb.shm_used(rpc_standby), "standby_rss_mb": self.dmq.rss_mb(self.standby_sock),
                "receiving_rss_mb": self.dmq.rss_mb(self.recv_sock)}


def main_dmq(args: argparse.Namespace) -> dict[str, Any]:
    import coordinator_dmq as dmq

    if not dmq.MPATH:
        raise SystemExit("kamailio's dmq_usrloc module is not installed")
    sender = rb.Sender(("127.0.0.1", 0), ("127.0.0.11", 5060), "127.0.0.11")  # forked before any thread
    tmp = Path(tempfile.mkdtemp(prefix="sipha-replbench-dmq-"))
    try:
        with dmq.kamailio_at(tmp, "127.0.0.11", "127.0.0.12", dmq.TUNED, args.dmq_shm_mb) as a, \
                dmq.kamailio_at(tmp, "127.0.0.12", "127.0.0.11", dmq.TUNED, args.dmq_shm_mb) as b:
            time.sleep(2)  # both dmq nodes know each other (B's start-up sync asked A)
            res = run(Dmq(a, b), parse_steps(args.steps), args.marker_rate, sender)
            res["shm_mb"] = args.dmq_shm_mb
            return res
    finally:
        sender.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ sipha


def mntr(ip: str, port: int) -> dict[str, str]:
    with socket.create_connection((ip, port), timeout=2) as s:
        s.sendall(b"mntr")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return dict(ln.split("\t", 1) for ln in data.decode(errors="replace").splitlines() if "\t" in ln)


class Sipha(System):
    name = "sipha"
    has_zk = True

    def __init__(self, spec: dict[str, Any], active: str, standby: str, zk: Any) -> None:
        from ha.lab import lab as labmod
        from ha.lab import node as labnode

        self.spec, self.labmod, self.active, self.standby, self.zk = spec, labmod, active, standby, zk
        self.target = (spec["vips"][0], int(spec["sip_port"]))
        self.domain = spec["vips"][0]
        self.local = (labmod.host(spec, "client")["ip"], 0)

        def sock(node: str) -> Path:
            _u, init = labnode.recorded_pids(node)
            return Path(f"/proc/{init}/root") / str(kamailio.rpc_socket()).lstrip("/")

        self.recv_sock, self.standby_sock = sock(active), sock(standby)
        root = f"/sipha/{spec['cluster']}/contacts"
        self.buckets = [f"{root}/{b:02x}" for b in range(256)]
        self.zk_ips = [h["ip"] for h in spec["hosts"] if any(s["name"] == "zookeeper" for s in h.get("services", []))]
        self.leader = ""

    def zk_count(self) -> int:
        """Sampled: the leader's ``zk_znode_count`` (mntr; one request). Every znode, so the runner compares it
        by its offset at the step's start; nothing else changes meanwhile (no calls, the GC finds nothing)."""
        if not self.leader:
            self.leader = next((ip for ip, m in self.zk_mntr().items() if m["state"] == "leader"), self.zk_ips[0])
        try:
            return int(mntr(self.leader, int(self.spec["zk_client_port"]))["zk_znode_count"])
        except (OSError, KeyError, ValueError):
            self.leader = ""  # a new leader is looked for on the next sample
            raise

    def markers_in_store(self) -> Callable[[list[str]], list[bool]] | None:
        from ha.coordinator.store import contact_name

        ip, port = self.sender_local
        root = f"/sipha/{self.spec['cluster']}/contacts"

        def check(aors: list[str]) -> list[bool]:
            paths = ["{}/{}/{}".format(root, *contact_name(a, f"sip:{a}@{ip}:{port}")) for a in aors]
            futs = [self.zk.exists_async(p) for p in paths]
            return [f.get(timeout=2) is not None for f in futs]

        return check

    def zk_bindings(self) -> int:
        """Exact: the children of the 256 contact buckets (pipelined ``exists``: ``numChildren``)."""
        futs = [self.zk.exists_async(b) for b in self.buckets]
        return sum(st.numChildren for f in futs if (st := f.get(timeout=5)) is not None)

    def zk_mntr(self) -> dict[str, Any]:
        out = {}
        for ip in self.zk_ips:
            with contextlib.suppress(OSError, ValueError):
                m = mntr(ip, int(self.spec["zk_client_port"]))
                out[ip] = {"state": m.get("zk_server_state"), "data_bytes": int(m.get("zk_approximate_data_size", -1)),
                           "znodes": int(m.get("zk_znode_count", -1))}
        return out

    def memory(self, rpc_standby: kamailio.Rpc) -> dict[str, Any]:
        coord = {n: rb.rss_kb(rb.pids_matching("ha.coordinator\0--config", f"sipha-{n}"))
                 for n in (self.active, self.standby)}
        jvm = {h: rb.rss_kb(rb.pids_matching("QuorumPeerMain", f"sipha-{h}")) for h in ("node1", "node2", "witness")}
        return {"standby_shm_used": rb.shm_used(rpc_standby), "coordinator_rss_kb": coord, "zk_jvm_rss_kb": jvm,
                "zk": self.zk_mntr()}

    def coordinator_pids(self) -> dict[str, list[int]]:
        return {n: rb.pids_matching("ha.coordinator\0--config", f"sipha-{n}") for n in (self.active, self.standby)}

    def step_context(self) -> dict[str, Any]:
        return {"vip": self.labmod.vip_holder(self.spec), "coordinator_pids": self.coordinator_pids()}

    def cpu_groups(self) -> dict[str, list[int]]:
        a, s = self.active, self.standby
        pids = self.coordinator_pids()
        return {"kamailio_active": rb.pids_matching("kamailio.cfg", f"sipha-{a}"), "coordinator_active": pids[a],
                "kamailio_standby": rb.pids_matching("kamailio.cfg", f"sipha-{s}"), "coordinator_standby": pids[s],
                "zookeeper_3": [p for h in ("node1", "node2", "witness")
                                for p in rb.pids_matching("QuorumPeerMain", f"sipha-{h}")],
                "health_2": [p for n in (a, s) for p in rb.pids_matching("health\0run", f"sipha-{n}")],
                "pacemaker_corosync_2": [p for n in (a, s) for name in ("pacemaker", "corosync")
                                         for p in rb.pids_matching(name, f"sipha-{n}")]}

    def after_step(self, t_wall0: float, t_wall1: float) -> dict[str, Any]:
        """ZooKeeper's exact binding count, and the standby coordinator's replicator passes in the window (its
        log: one line per batch the watch delivered), which show how the standby's intake is paced."""
        out: dict[str, Any] = {}
        try:
            out["zk_bindings_exact"] = self.zk_bindings()
        except Exception as exc:  # reported, never fatal: the sampled count is there
            out["zk_bindings_exact"] = repr(exc)[:200]
        out["standby_passes"] = replicator_passes(Path(f"/var/log/sipha/coordinator-{self.standby}.log"),
                                                  t_wall0, t_wall1)
        out["role_changes"] = sorted(
            f"{t} {n}: {what}" for n in (self.active, self.standby)
            for t, what in role_changes(Path(f"/var/log/sipha/coordinator-{n}.log"), t_wall0, t_wall1))
        out["window"] = [time.strftime("%H:%M:%S", time.localtime(t)) for t in (t_wall0, t_wall1)]
        return out

    def stop_after(self, row: dict[str, Any]) -> str:
        took = [c for c in row.get("role_changes", []) if f" {self.standby}: took over" in c]
        if row.get("before_vip") != row.get("after_vip") or took:
            row["health_log_tail"] = health_log_tail(Path(self.spec["state_dir"]) / self.active / "logs")
            return (f"the VIP left {self.active} during step {row['step']} ({row['offered_per_s']}/s offered: VIP on "
                    f"{row.get('before_vip')} before, {row.get('after_vip')} after; "
                    f"{took or 'no role change logged'}); no further step")
        if row.get("before_coordinator_pids") != row.get("after_coordinator_pids"):
            return f"a coordinator restarted during step {row['step']}; no further step"
        return ""

    def final(self) -> dict[str, Any]:
        from coordlab import status

        out: dict[str, Any] = {"active": self.active, "standby": self.standby}
        for n in (self.active, self.standby):
            try:
                repl = status(self.spec, n)["replication"]
                out[f"coordinator_{n}"] = {k: repl.get(k) for k in (
                    "active", "accepted", "gaps", "lost", "dropped", "reconcile_runs", "last_reconcile", "replicator")}
            except Exception as exc:  # reported: the figures above stand without it
                out[f"coordinator_{n}"] = {"error": repr(exc)[:300]}
        return out


def health_log_tail(logs: Path, n: int = 15) -> list[str]:
    """The last lines (not DEBUG) of a lab node's health service log: why the VIP left it."""
    try:
        lines = (logs / "sipha-health.log").read_text(errors="replace").splitlines()
    except OSError as exc:
        return [str(exc)]
    return [ln[:300] for ln in lines if "DEBUG" not in ln][-n:]


def role_changes(log: Path, t0: float, t1: float, tail_bytes: int = 8 << 20) -> list[tuple[str, str]]:
    """A coordinator's role changes between t0 and t1 (its log): ("HH:MM:SS,mmm", "took over"|"gave up").

    Finer than looking at the VIP before and after a step: a VIP that left for 3 s and came back, or a coordinator
    that believed for a second that it had lost the VIP, shows here only."""
    import datetime as dt

    out = []
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    for ln in lines:
        what = ("took over" if "a VIP is local: taking over" in ln else
                "gave up" if "no VIP is local any more" in ln else "")
        if what:
            with contextlib.suppress(ValueError):
                t = dt.datetime.strptime(ln[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if t0 <= t <= t1:
                    out.append((ln[11:23], what))
    return out


def replicator_passes(log: Path, t0: float, t1: float, tail_bytes: int = 8 << 20) -> dict[str, Any]:
    """From a coordinator's log: its replicator's passes between the wall-clock times t0 and t1, from the
    summary lines ("replicator window: ...", one per SUMMARY_EVERY_S) that cover only that time: how many,
    changes per pass (mean and most), the longest pause between two passes, and (the active) how many of its own
    writes its watch took from their replies instead of reading them back. (Before stop 18 every pass had a log
    line of its own, and the older result files give medians from those.)"""
    import datetime as dt
    import re

    pat = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* replicator window: (\d+) passes, (\d+) changes, "
                     r"at most (\d+) in one pass; .* longest pause between passes (\d+) ms")
    unread = re.compile(r"own skipped \((\d+) known from the writes' replies")
    rows: list[tuple[int, int, int, int, int]] = []
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    for ln in lines:
        m = pat.match(ln)
        if m:
            t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if t0 + SUMMARY_S <= t <= t1 + 0.5:  # its window (t - SUMMARY_S, t] within the step
                u = unread.search(ln)
                rows.append((int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5)),
                             int(u.group(1)) if u else 0))
    passes, changes = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return {"passes": passes, "changes": changes, "summaries": len(rows),
            "changes_per_pass_mean": round(changes / passes, 1) if passes else None,
            "changes_per_pass_max": max((r[2] for r in rows), default=None),
            "s_between_passes_max": round(max(r[3] for r in rows) / 1000, 3) if rows else None,
            "own_unread": sum(r[4] for r in rows)}


SUMMARY_S = SUMMARY_EVERY_S  # the coordinator's summary lines come this often


_JVM_PAUSE = re.compile(r"^\[(?P<ts>[0-9T:.\-]+)[+-]\d{4}\] GC\(\d+\) Pause (?P<what>.*?) (?P<ms>[0-9.]+)ms$")
_COORD_SLOW = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \w+ (?P<msg>(slow |garbage collector).*)$")
PAUSE_MIN_MS = 20.0  # JVM pauses shorter than this are left out


def stalls(spec: dict[str, Any], t0: float, t1: float) -> dict[str, list[Any]]:
    """What may hold a marker up, read from the lab's logs for the bench's window: each ZooKeeper member's GC
    pauses over PAUSE_MIN_MS (its stdout, -Xlog:gc) and the coordinators' slow writes, slow ticks and collector
    summaries. Why: a lag tail is one stall of a few hundred ms, and the logs are gone with the lab."""
    import calendar

    out: dict[str, list[Any]] = {"zookeeper_gc": [], "coordinators": []}
    for h in spec["hosts"]:
        path = Path(spec["state_dir"]) / h["name"] / "logs" / "zookeeper.log"
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                m = _JVM_PAUSE.match(line.strip())
                if not m or float(m["ms"]) < PAUSE_MIN_MS:
                    continue
                t = calendar.timegm(time.strptime(m["ts"].split(".")[0], "%Y-%m-%dT%H:%M:%S"))
                if t0 - 1 <= t <= t1 + 1:
                    out["zookeeper_gc"].append([h["name"], m["ts"], m["what"], float(m["ms"])])
    for node in ("node1", "node2"):
        with contextlib.suppress(OSError):
            for line in Path(f"/var/log/sipha/coordinator-{node}.log").read_text(errors="replace").splitlines():
                m = _COORD_SLOW.match(line)
                if m and t0 - 1 <= time.mktime(time.strptime(m["ts"][:19], "%Y-%m-%d %H:%M:%S")) <= t1 + 1:
                    out["coordinators"].append([node, m["ts"], m["msg"][:200]])
    return out


def main_sipha(args: argparse.Namespace) -> dict[str, Any]:
    from labhelp import other, wait_settled

    from ha.lab import lab as labmod
    from ha.zk_testing import started_client

    spec = labmod.load_spec()
    if spec is None:
        raise SystemExit("no lab is up (sipha lab up examples/lab.yaml)")
    ns = labmod.client_ns(spec)
    if os.stat("/proc/self/ns/net").st_ino != os.stat(f"/run/netns/{ns}").st_ino:
        # Kazoo, the sender and the mntr reads all talk to 198.51.100.0/24: simplest from the client namespace.
        os.execvp("ip", ["ip", "netns", "exec", ns, sys.executable, *sys.argv])  # noqa: S606 - fixed argv
    tmp = rb.rpc_tmpdir()
    tempfile.tempdir = tmp  # the Rpc clients' reply sockets: where the nodes' Kamailio can answer them
    sender = rb.Sender((labmod.host(spec, "client")["ip"], 0), (spec["vips"][0], int(spec["sip_port"])),
                       spec["vips"][0])  # forked before any thread
    try:
        wait_settled(spec, 240)
        time.sleep(args.settle_s)  # the lab's own start-up work (JVMs, Pacemaker's probes) done
        active = labmod.vip_holder(spec)
        hosts = ",".join(f"{h['ip']}:{spec['zk_client_port']}" for h in spec["hosts"]
                         if any(s["name"] == "zookeeper" for s in h.get("services", [])))
        t0 = time.time()
        with started_client(hosts, **labmod.zk_client_kwargs(spec)) as zk:
            res = run(Sipha(spec, active, other(active), zk), parse_steps(args.steps), args.marker_rate, sender)
        res["stalls"] = stalls(spec, t0, time.time())
        return res
    finally:
        sender.close()
        tempfile.tempdir = None
        shutil.rmtree(tmp, ignore_errors=True)


def summary(res: dict[str, Any]) -> str:
    lines = [f"{res['system']}:"]
    for r in res["steps"]:
        lag = r["lag"]
        lines.append(
            f"  {r['offered_per_s']}/s x {r['seconds']} s: accepted {r['accepted_per_s']}/s "
            f"(proxy {r['recv_per_s']}/s),"
            + (f" zookeeper {r['zk_per_s']}/s (2nd half {r['zk_per_s_2nd_half']}/s)," if "zk_per_s" in r else "")
            + f" standby {r['standby_per_s']}/s (2nd half {r['standby_per_s_2nd_half']}/s), behind at end "
            f"{r['standby_behind_at_end']}, caught up {r['catch_up_s']} s after; lag p50/p99/max "
            f"{lag['p50_ms']}/{lag['p99_ms']}/{lag['max_ms']} ms (n={lag['n']}, missed {lag['missed']})"
            + (f", to zookeeper p50/p99 {lag['to_store_p50_ms']}/{lag['to_store_p99_ms']} ms"
               if "to_store_n" in lag else "")
            + "; "
            f"load {r['load1']}")
    if "stalls" in res:
        gc, co = res["stalls"]["zookeeper_gc"], res["stalls"]["coordinators"]
        lines.append(f"  zookeeper GC pauses >= {PAUSE_MIN_MS:.0f} ms: {len(gc)}"
                     + (f" (longest {max(p[3] for p in gc):.0f} ms)" if gc else "")
                     + f"; coordinator slow/collector lines: {len(co)}")
    b, a = res.get("memory_before", {}), res.get("memory_after_first", {})
    if a:
        n = a["standby_contacts"] - b["standby_contacts"]
        per = (a["standby_shm_used"] - b["standby_shm_used"]) / max(1, n) * 100_000 / 2**20
        lines.append(f"  standby shm: {b['standby_shm_used'] / 2**20:.1f} -> {a['standby_shm_used'] / 2**20:.1f} MB "
                     f"for {n} contacts: {per:.1f} MB per 100k")
    return "\n".join(lines)


def head() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=("sipha", "dmq"))
    ap.add_argument("--steps", default=DEFAULT_STEPS, help=f"rate/s:seconds,... (default {DEFAULT_STEPS})")
    ap.add_argument("--marker-rate", type=float, default=20.0, help="marker REGISTERs per second")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--dmq-shm-mb", type=int, default=1024,
                    help="dmq: shared memory of each instance (512 left A 20%% free at 161k contacts)")
    ap.add_argument("--settle-s", type=float, default=15.0, help="sipha: wait after the lab settled")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (lab namespaces, the nodes' sockets)", file=sys.stderr)
        return 2
    t_start = time.strftime("%Y-%m-%d %H:%M:%S")
    commit = head()  # the checkout may move during a run (others commit): both ends are kept
    res = main_sipha(args) if args.system == "sipha" else main_dmq(args)
    res["started"] = t_start
    res["steps_arg"] = args.steps
    res["commit"], res["commit_end"] = commit, head()
    print(summary(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
