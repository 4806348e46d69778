"""The proxy's own cost of a REGISTER with sipha's events: CPU per REGISTER and intake, two configs side by side.

``.venv/bin/python bench/proxy_event_cost.py [--rev 12798a8] [--n 20000] [--rate 3000] [--blast-rate 8000]
[--runs 3] [--json F]``

Why: on the active node every REGISTER also builds a JSON event for the coordinator, inside the SIP worker,
under the AoR's lock. That CPU is taken from the proxy's intake and from everything else on the node (the
coordinator, ZooKeeper), so it is measured on its own here, without the lab.

Each config is the lab's node1 kamailio.cfg, rendered from this checkout's template ("current") or from
``--rev``'s (git show), started in a throwaway namespace (``ha.kamailio_testing``). A UDP socket in the
namespace stands in for the coordinator and counts the events. Two measurements per run:

* paced: ``--n`` REGISTERs (one new AoR each, from a trusted source, to the VIP) at ``--rate``/s; the CPU
  time of Kamailio's whole process group (utime + stime from /proc) over the sends and 2 s after, divided
  by the 200 OKs;
* intake: REGISTERs offered at ``--blast-rate``/s (above what the proxy takes) for ``--blast-s`` s; 200 OKs
  per second from the first send to the last 200 OK. What is not answered was dropped from Kamailio's full
  socket buffer, as it would be on a node. The sender shares the 2 cores, as the lab's clients do.

Runs alternate between the two configs so a slow patch of the shared machine hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.replbench import register  # noqa: E402
from ha.health import activity  # noqa: E402
from ha.kamailio_testing import Proxy, ns_socket, running_proxy  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the live processes of ``pgid`` (Kamailio's workers are one group)."""
    return activity.group_cpu(pgid)[1] / TICK


class Counter(threading.Thread):
    """Counts datagrams on one socket (200 OKs, or events) until stopped; remembers the last one's time."""

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        super().__init__(daemon=True)
        self.sock, self.prefix, self.n, self.last = sock, prefix, 0, 0.0
        self.done = threading.Event()
        sock.settimeout(0.2)

    def run(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if data.startswith(self.prefix):
                self.n += 1
                self.last = time.monotonic()


def send(sock: socket.socket, p: Proxy, first: int, n: int, rate: float | None) -> float:
    """``n`` REGISTERs for users ``first..``; paced at ``rate``/s, or as fast as possible. Returns the start."""
    me = sock.getsockname()
    t0 = time.monotonic()
    for i in range(n):
        sock.sendto(register(f"u{first + i}", p.vip, me), (p.vip, 5060))
        if rate:
            wait = t0 + (i + 1) / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
    return t0


def settle(counter: Counter, want: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while counter.n < want and time.monotonic() < deadline:
        time.sleep(0.05)


def one_run(template: str | None, n: int, rate: float, blast_rate: float, blast_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, running_proxy(Path(tmp), "lab", template=template) as p:
        events = ns_socket(p.ns)
        events.bind(("127.0.0.1", p.cluster.proxy.event_port))
        events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sip = ns_socket(p.ns)
        sip.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sip.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sip.bind((p.node_ip, 0))  # a node's address: trusted, so the rate limit stays out of the figures
        ev, ok = Counter(events), Counter(sip, b"SIP/2.0 200")
        ev.start()
        ok.start()
        try:
            time.sleep(1.0)  # start-up's own CPU is not the REGISTERs'
            cpu0 = group_cpu(p.pid)
            send(sip, p, 0, n, rate)
            settle(ok, n, 10.0)
            time.sleep(2.0)
            cpu = group_cpu(p.pid) - cpu0
            paced_ok, paced_ev = ok.n, ev.n
            blast = int(blast_rate * blast_s)
            t0 = send(sip, p, n, blast, blast_rate)
            settle(ok, paced_ok + blast, 5.0)
            intake_ok = ok.n - paced_ok
            intake = intake_ok / max(ok.last - t0, 1e-6)
        finally:
            ok.done.set()
            ev.done.set()
        return {
            "paced_ok": paced_ok,
            "paced_events": paced_ev,
            "cpu_s": round(cpu, 3),
            "us_per_register": round(1e6 * cpu / max(paced_ok, 1), 1),
            "intake_offered": blast,
            "intake_ok": intake_ok,
            "intake_per_s": round(intake, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="12798a8", help="the earlier template to compare (a git revision)")
    ap.add_argument("--n", type=int, default=20000, help="REGISTERs per measurement")
    ap.add_argument("--rate", type=float, default=3000.0, help="paced rate, REGISTER/s")
    ap.add_argument("--blast-rate", type=float, default=8000.0, help="offered rate of the intake step")
    ap.add_argument("--blast-s", type=float, default=3.0, help="length of the intake step, s")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.rev}:templates/kamailio.cfg.j2"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    configs: dict[str, str | None] = {"current": None, args.rev: old}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
    for i in range(args.runs):
        for name, template in configs.items():
            r = one_run(template, args.n, args.rate, args.blast_rate, args.blast_s)
            runs[name].append(r)
            print(f"run {i + 1} {name}: {json.dumps(r)}", flush=True)
    summary = {
        name: {
            "us_per_register_median": statistics.median(r["us_per_register"] for r in rs),
            "intake_per_s_median": statistics.median(r["intake_per_s"] for r in rs),
        }
        for name, rs in runs.items()
    }
    out = {"n": args.n, "rate": args.rate, "blast_rate": args.blast_rate, "blast_s": args.blast_s, "rev": args.rev,
           "runs": runs, "summary": summary}  # fmt: skip
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
