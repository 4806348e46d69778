"""Bench: the caller's-eye cost of a hung proxy, a killed proxy and a graceful switchover, sipha beside stock.

One lab per variant (``model``: examples/lab.yaml with ocf:sipha:proxy clones and the health service; ``stock``:
``sipha lab up --stock``, token 3000, group IPaddr2 + ocf:heartbeat:kamailio with 10 s monitors). The client
probes the VIP with SIP OPTIONS every 20 ms (ha.lab.prober) around each fault:

* ``sigstop``: SIGSTOP to the proxy's whole process group on the VIP holder -> first answered probe sent after
  the signal (``first_answer_after_fault_ms``); then SIGCONT, cleanup, settle.
* ``kill9``: SIGKILL to the proxy's process group on the VIP holder -> the same measure.
* ``move``: ``crm_resource --move`` of the VIP (stock: the group) to the other node, then ``--clear`` ->
  the longest gap between answered probes.
* ``api``: ``POST /switchover`` with the token (model only) -> the longest gap.
* start-to-monitor-OK of the proxy agent: from Pacemaker's logs of the restarts the kill9 runs cause (the
  execd "executing ... action:start" line to the controller's first "Result of monitor operation ...: ok").

    sudo .venv/bin/python bench/failover.py --variant model --runs 20 --json /tmp/model.json
    sudo .venv/bin/python bench/failover.py --variant stock --runs 5 --json /tmp/stock.json
    sudo .venv/bin/python bench/failover.py --variant model --cluster bench/lab-fast-probes.yaml

Every run is bounded (a fault that never recovers is recorded as such after ``--after-s``); the lab is always
taken down. ``make install-agents`` first (the model variant needs the installed agents).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "lab")]

from labhelp import api, node_sh, other, settled, token  # noqa: E402

from ha.lab import lab as labmod  # noqa: E402


def q(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))], 1)  # nearest rank


def stock_settled(spec: dict[str, Any]) -> bool:
    st = labmod.crm_status(spec)
    if not all(st["nodes"].get(n) == "online" for n in ("node1", "node2")) or not st.get("dc"):
        return False
    if any(r["failed"] for r in st["resources"]):
        return False
    ks = [r for r in st["resources"] if r["id"] == "kamailio" and r["role"] == "Started"]
    return bool(ks) and labmod.vip_holder(spec) in ("node1", "node2") and labmod.sip_options(spec, spec["vips"][0])[0]


def settle(spec: dict[str, Any], stock: bool, timeout: float = 60) -> None:
    """Wait for a settled cluster; failed actions (a broken proxy leaves one) are cleaned up every 5 s."""
    pred = (lambda: stock_settled(spec)) if stock else (lambda: settled(spec))
    deadline = time.monotonic() + timeout
    last_cleanup = -1e9
    while time.monotonic() < deadline:
        if pred():
            time.sleep(1.0)
            return
        # a last resort only: Pacemaker recovers a failed proxy by itself, and a cleanup that lands while that
        # recovery runs makes it forget the result ("resource information was removed since it was initiated"),
        # which left the clone instance Stopped for good in two runs
        if time.monotonic() > deadline - timeout / 2 and time.monotonic() - last_cleanup > 20:
            last_cleanup = time.monotonic()
            for n in ("node1", "node2"):
                if labmod.powered(n):
                    labmod.exec_in(spec, n, ["crm_resource", "--cleanup", "--quiet"], timeout=20)
                    break
        time.sleep(0.3)
    st = labmod.crm_status(spec)
    raise RuntimeError(f"not settled after {timeout} s: {st}")


def proxy_pgid(spec: dict[str, Any], node: str) -> int:
    """The process group of the node's live Kamailio, for either agent: the group with the most live (not
    zombie) kamailio processes. Kamailio daemonizes into its own session, so the group is exactly the proxy."""
    cmd = ("ps -C kamailio -o pgid=,stat= | awk '$2 !~ /Z/ {print $1}' | sort | uniq -c | sort -rn"
           " | awk 'NR==1{print $2}'")
    p = node_sh(spec, node, cmd)
    assert p.returncode == 0 and p.stdout.strip().isdigit(), p.stdout + p.stderr
    return int(p.stdout)


def signal_group(spec: dict[str, Any], node: str, sig: str, pgid: int) -> None:
    p = node_sh(spec, node, f"/bin/kill -s {sig} -- -{pgid}")
    if p.returncode != 0 and sig != "CONT":
        raise RuntimeError(f"kill -{sig} -{pgid} on {node}: {p.stderr.strip()}")


def fault_run(spec: dict[str, Any], kind: str, stock: bool, after: float) -> dict[str, Any]:
    holder = labmod.vip_holder(spec)
    peer = other(holder)
    rid = "sip" if stock else "vip-vip"
    box: dict[str, Any] = {}
    t_wall = time.time()
    if kind in ("sigstop", "kill9"):
        pgid = proxy_pgid(spec, holder)
        sig = "STOP" if kind == "sigstop" else "KILL"

        def fault() -> None:
            signal_group(spec, holder, sig, pgid)

        # recovered when a probe sent after the fault is answered (VIP moved, or the proxy restarted in place)
        res = labmod.probed(spec, fault, after=after, until=lambda: True)
        if kind == "sigstop":
            signal_group(spec, holder, "CONT", pgid)
    elif kind == "move":
        def fault() -> None:
            box["p"] = node_sh(spec, holder, f"crm_resource --resource {rid} --move --node {peer}")

        res = labmod.probed(spec, fault, after=after, until=lambda: labmod.vip_holder(spec) == peer)
        node_sh(spec, holder, f"crm_resource --resource {rid} --clear")
    elif kind == "api":
        tok = token(spec, holder)

        def fault() -> None:
            box["r"] = api(spec, holder, "POST", "/switchover", token=tok, body={"to": peer})

        res = labmod.probed(spec, fault, after=after, until=lambda: labmod.vip_holder(spec) == peer)
    else:
        raise ValueError(kind)
    res = {k: v for k, v in res.items() if k != "fault_result"}
    return {"kind": kind, "from": holder, "to_holder": labmod.vip_holder(spec), "wall": t_wall, **res}


TS = re.compile(r"^(\w{3} \d+ \d\d:\d\d:\d\d\.\d{3}) ")


def _ts(line: str) -> float | None:
    m = TS.match(line)
    if not m:
        return None
    year = datetime.now().year
    return datetime.strptime(f"{year} {m.group(1)}", "%Y %b %d %H:%M:%S.%f").timestamp()


def start_to_monitor_ok(spec: dict[str, Any], rsc: str) -> list[float]:
    """ms from execd's "executing - rsc:RSC action:start" to the next "Result of monitor operation for RSC ...: ok"
    on the same node, for every start in the node logs."""
    out = []
    for n in ("node1", "node2"):
        path = Path(spec["state_dir"]) / n / "root/var/log/pacemaker/pacemaker.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        t_start = None
        for ln in lines:
            if f"executing - rsc:{rsc} action:start" in ln:
                t_start = _ts(ln)
            elif t_start is not None and f"Result of monitor operation for {rsc} on {n}: ok" in ln:
                t = _ts(ln)
                if t is not None:
                    out.append(round((t - t_start) * 1000, 1))
                t_start = None
    return out


def summarize(name: str, values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": q(values, 50), "p99_ms": q(values, 99), "min_ms": min(values, default=None),
            "max_ms": max(values, default=None), "mean_ms": round(statistics.mean(values), 1) if values else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("model", "stock"), default="model")
    ap.add_argument("--cluster", default=str(REPO / "examples/lab.yaml"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kinds", default="sigstop,kill9,move,api")
    ap.add_argument("--after-s", type=float, default=None, help="give up on one run after this long")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (the lab)", file=sys.stderr)
        return 2
    stock = args.variant == "stock"
    kinds = [k for k in args.kinds.split(",") if k and not (stock and k == "api")]
    after = args.after_s if args.after_s is not None else (40.0 if stock else 8.0)
    runs = max(1, min(args.runs, 30))
    results: list[dict[str, Any]] = []
    inst = subprocess.run(["make", "-s", "install-agents"], cwd=REPO, capture_output=True, text=True, timeout=120)
    if inst.returncode != 0:  # the agents are machine-wide: make sure they are this checkout's
        print(f"make install-agents: {inst.stderr.strip()}", file=sys.stderr)
        return 2
    load = {"before": os.getloadavg()}
    with labmod.lab_up(args.cluster, echo=lambda _m: None, variant=args.variant) as up_s:
        spec = labmod.load_spec()
        print(f"{args.variant}: lab up in {up_s:.1f} s; load {os.getloadavg()}", flush=True)
        settle(spec, stock, 90)
        for kind in kinds:
            for i in range(1, runs + 1):
                r = fault_run(spec, kind, stock, after)
                r["run"] = i
                results.append(r)
                print(f"{args.variant} {kind} {i}: {r['from']} -> {r['to_holder']}; first answer after fault "
                      f"{r['first_answer_after_fault_ms']} ms; longest gap {r['longest_gap_ms']} ms; "
                      f"{r['answered']}/{r['sent']} answered; load {os.getloadavg()[0]:.2f}", flush=True)
                if args.json_out:  # as we go: a run that breaks the lab must not lose the others
                    Path(args.json_out).write_text(json.dumps({"runs": results}, indent=1))
                settle(spec, stock, 90)
        starts = start_to_monitor_ok(spec, "kamailio" if stock else "proxy")
        reasks = sum(
            (Path(spec["state_dir"]) / n / "root/var/log/pacemaker/pacemaker.log").read_text(errors="replace")
            .count("Re-asking for the CIB") for n in ("node1", "node2")
        )
    load["after"] = os.getloadavg()
    summary: dict[str, Any] = {"variant": args.variant, "cluster": args.cluster, "runs": runs, "load": load,
                               "lab_up_s": round(up_s, 2)}
    for kind in kinds:
        rs = [r for r in results if r["kind"] == kind]
        metric = "first_answer_after_fault_ms" if kind in ("sigstop", "kill9") else "longest_gap_ms"
        vals = [r[metric] for r in rs if r[metric] is not None]
        summary[kind] = {"metric": metric, "not_recovered": len(rs) - len(vals),
                         "moved": sum(r["to_holder"] != r["from"] for r in rs), **summarize(kind, vals)}
    summary["start_to_monitor_ok"] = summarize("start", starts)
    summary["reasking_for_the_cib"] = reasks  # the controller's 1 s wait (ARCHITECTURE.md): how often it hit
    print(json.dumps(summary, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        subprocess.run([sys.executable, "-m", "ha.cli", "lab", "down"], cwd=REPO, check=False)
        raise
