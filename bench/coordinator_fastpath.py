"""Restart fast path, end to end: N bindings in a real 3-member ensemble -> a (re)started real Kamailio holding
all of them -> the coordinator's resync done (readiness). Not a pass/fail gate: it prints the figures.

``flock /run/lock/sipha-lab.lock .venv/bin/python bench/coordinator_fastpath.py 100000 [--runs 3]``

The path a proxy restart takes (the coordinator runs, with its watched view of the store), timed from the
proxy agent's start to the readiness file, ``--runs`` times:

1. materialize: ``materialize`` on the coordinator's status socket (the real ``Service``, in this process):
   the SQLite table written from the coordinator's view, no ZooKeeper read.
2. kamailio: the rendered lab config with the preload define, ``-x tlsf``, ``-M`` as the agent sizes it, in
   a throwaway network namespace, from exec until it answers JSON-RPC (``wait_worker1_mode``: nothing
   answers before usrloc has loaded the table); then ``usrloc:location_contacts`` is checked == N.
3. ready: until the coordinator has replayed its view against what the proxy loaded (nothing to push here)
   and written the readiness file.

"proxy holds N" = 1 + 2; "ready" = 1 + 2 + 3. Then, once each, for comparison: the agent's fallback when no
coordinator answers (``python -m ha.coordinator.materialize``: a new interpreter reading ZooKeeper with
multiRead, then the same Kamailio start, then a replicator reading the store again to diff), and the path
without the fast path (an empty proxy, the replicator's read + pipelined ``ul.add``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

from conftest_zk import connect, contact  # noqa: E402 - the real-ensemble helpers

from ha import model, render  # noqa: E402
from ha.coordinator import materialize  # noqa: E402
from ha.coordinator.apply import ProxyApplier  # noqa: E402
from ha.coordinator.replication import Replication  # noqa: E402
from ha.coordinator.replicator import Replicator  # noqa: E402
from ha.coordinator.service import Service  # noqa: E402
from ha.coordinator.store import ZkStore  # noqa: E402
from ha.kamailio_testing import stop_group  # noqa: E402
from ha.proxy import kamailio  # noqa: E402
from ha.unixline import exchange  # noqa: E402
from ha.zk_testing import Ensemble, lab_yaml  # noqa: E402

PKG_KB_PER_BINDING = 3  # as resource_agents/sipha-proxy sizes -M


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def namespace(cluster: model.Cluster) -> Iterator[str]:
    ns = f"sipha-t-{secrets.token_hex(4)}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        for a in (cluster.nodes[0].address, *(v.address for v in cluster.vips)):
            _ip("-n", ns, "addr", "add", a.split("/")[0] + "/32", "dev", "lo")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


@contextlib.contextmanager
def kamailio_up(ns: str, cfg: Path, cluster: model.Cluster, run_dir: Path, preload: Path | None,
                n: int) -> Iterator[tuple[float, Path]]:
    """Start Kamailio; yields (seconds from exec to the first JSON-RPC answer, rpc socket)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    pkg = max(cluster.proxy.pkg_mb, 16 + (n * PKG_KB_PER_BINDING + 1023) // 1024)
    mem = cluster.model_copy(update={"proxy": cluster.proxy.model_copy(update={"pkg_mb": pkg})})
    defines = {"SIPHA_RPC_REPLY_DIR": f"{run_dir}/"}
    if preload is not None:
        defines["SIPHA_USRLOC_PRELOAD"] = f"sqlite:///{preload}"
    cmd = [*kamailio.kamailio_command(cfg, mem, run_dir=run_dir, foreground=True, defines=defines), "-x", "tlsf"]
    sock = run_dir / "kamailio-rpc.sock"
    sock.unlink(missing_ok=True)
    log = (run_dir / "kamailio.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = t0 + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kamailio did not answer: {(run_dir / 'kamailio.log').read_text()[-2000:]}")
            if sock.exists():
                try:
                    kamailio.rpc("core.uptime", sock=sock, timeout=0.2)
                    break
                except kamailio.RpcError:
                    pass
            time.sleep(0.002)
        yield time.monotonic() - t0, sock
    finally:
        stop_group(proc, wait_s=20)
        log.close()


def ask_table(sock: Path, limit_s: float = 120.0) -> dict[str, object]:
    """``materialize`` on the coordinator's status socket, asked again while it answers pending (as the agent)."""
    t0 = time.monotonic()
    while True:
        try:
            reply = json.loads(exchange(sock, b"materialize\n", 60.0))
        except OSError:
            # Its socket is not there yet. The agent never sees that (Pacemaker starts the proxy after the
            # coordinator agent's start found the socket answering): ask again at once.
            reply = {"ok": False, "pending": True, "no_socket": True}
        if reply.get("ok"):
            return reply
        if not reply.get("pending") or time.monotonic() - t0 > limit_s:
            raise RuntimeError(f"no table from the coordinator: {reply}")
        time.sleep(0.01 if reply.get("no_socket") else 0.05)  # 0.05: the agent's MATERIALIZE_POLL_S


def churn(writer: ZkStore, n: int, k: int) -> None:
    """What changes in the store while a node is away: k bindings re-registered (new mzxid), k new ones (so the
    total stays n), k deleted."""
    if k <= 0:
        return
    step = max(n // k, 1)
    changed = [contact(i, f"u{i}", f"sip:u{i}@198.51.100.80:5060", node="node2", kind="update")
               for i in range(1, n + 1, step)][:k]
    gone = [contact(i, f"u{i}", f"sip:u{i}@198.51.100.80:5060", node="node2", kind="delete")
            for i in range(2, n + 1, step)][:k]
    new = [contact(n + i, f"v{i}", f"sip:v{i}@198.51.100.81:5060", node="node2") for i in range(1, len(gone) + 1)]
    for batch in (changed, gone, new):
        writer.write(batch)


def contacts_in(sock: Path) -> int:
    for s in kamailio.rpc("stats.get_statistics", "usrloc:", sock=sock, timeout=5):
        if s.startswith("usrloc:location_contacts = "):
            return int(s.rsplit(" ", 1)[1])
    return -1


def rss_mb(sock: Path) -> int:
    """Resident memory of the Kamailio that owns ``sock`` (all its processes), in MB."""
    pid = int((sock.parent / kamailio.PID_NAME).read_text())
    pgid = os.getpgid(pid)
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if os.getpgid(int(d)) != pgid:
                continue
            status = Path(f"/proc/{d}/status").read_text()
            total += int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1])
    return total // 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-rpc-baseline", action="store_true", help="skip the ul.add comparison")
    ap.add_argument("--away-changes", type=int, default=1000,
                    help="bindings changed (and as many created, half as many deleted) between the node starts")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--warm-runs", type=int, default=3, help="node starts from the node cache (after one cold)")
    ap.add_argument("--log", action="store_true", help="the coordinator's log lines on stderr (where time goes)")
    ap.add_argument("--no-fallback", action="store_true", help="skip the no-coordinator fallback")
    args = ap.parse_args()
    if args.log:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s")
        logging.getLogger("kazoo").setLevel(logging.WARNING)
    from ha.coordinator.service import GIL_SWITCH_S

    sys.setswitchinterval(GIL_SWITCH_S)  # as the coordinator's main() does: its loop must not wait for the GIL
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="sipha-fastpath-"))
    ycfg = lab_yaml(tmp, f"fp{uuid.uuid4().hex[:8]}")  # the lab's model, with the tests' ZooKeeper credential
    cluster = model.load(ycfg)
    node = cluster.nodes[0]
    ens = Ensemble(tmp / "zk", tick_ms=500, heap_mb=768, fixed_heap=True)  # as the lab runs it
    try:
        ens.start(timeout=90)
        client = connect(ens, timeout_s=10)
        writer = ZkStore(client, cluster.name, "node2")
        writer.ensure_layout()
        writer.bump_epoch()
        t0 = time.monotonic()
        for start in range(0, args.n, 5000):
            writer.write([contact(i, f"u{i}", f"sip:u{i}@198.51.100.80:5060", node="node2")
                          for i in range(start + 1, min(start + 5000, args.n) + 1)])
        print(f"wrote {args.n} bindings to the ensemble in {time.monotonic() - t0:.1f} s")
        cfg = tmp / "kamailio.cfg"
        cfg.write_text(render._env().get_template("kamailio.cfg.j2").render(cluster=cluster, host=node, is_node=True))
        reader = ZkStore(client, cluster.name, "node1")
        rows: list[dict[str, object]] = []
        node_starts: list[dict[str, object]] = []
        with namespace(cluster) as ns:
            crun = tmp / "crun"
            crun.mkdir()
            ready = tmp / "ready"
            repl = Replication.from_model(cluster, "node1", journal_path=tmp / "journal", hosts=ens.hosts,
                                          rpc_socket=kamailio.rpc_socket(crun))
            svc = Service("127.0.0.1", 0, str(tmp / "c.pid"), str(tmp / "c.sock"), repl, ready_file=ready, role=None)
            th = threading.Thread(target=svc.run, daemon=True)
            th.start()
            try:
                t0 = time.monotonic()
                while repl.replicator is None or repl.replicator.view() is None:
                    if time.monotonic() - t0 > 120:
                        raise RuntimeError("the coordinator has no complete view after 120 s")
                    time.sleep(0.05)
                print(f"coordinator: complete view of {args.n} bindings {time.monotonic() - t0:.1f} s after start")
                for run in range(args.runs):
                    ready.unlink(missing_ok=True)  # as the agent's start does
                    t0 = time.monotonic()
                    reply = ask_table(tmp / "c.sock")
                    t_mat = time.monotonic() - t0
                    assert reply.get("ok") and reply["bindings"] == args.n, reply
                    with kamailio_up(ns, cfg, cluster, crun, crun / materialize.DB_NAME, args.n) as (t_kam, sock):
                        t1 = time.monotonic()
                        while not ready.exists():
                            if time.monotonic() - t1 > 120:
                                raise RuntimeError(f"not ready: {repl.replicator.last_status}")
                            time.sleep(0.005)
                        t_ready = time.monotonic() - t1
                        have = contacts_in(sock)
                        assert have == args.n, f"the proxy holds {have} of {args.n}"
                        mem = rss_mb(sock)
                    row = {"materialize_s": t_mat, "kamailio_s": t_kam, "resync_s": t_ready,
                           "holds_s": t_mat + t_kam, "ready_s": t_mat + t_kam + t_ready, "rss_mb": mem}
                    rows.append(row)
                    print(f"run {run + 1}: coordinator gave the table in {t_mat:.2f} s ({reply['ms']} ms, from its "
                          f"{reply['from']} table), "
                          f"kamailio start+preload {t_kam:.2f} s, proxy holds {args.n} after {row['holds_s']:.2f} s;"
                          f" readiness {t_ready:.2f} s later, ready after {row['ready_s']:.2f} s; proxy RSS {mem} MB"
                          f" ({repl.replicator.last_status}); load {os.getloadavg()[0]:.2f}", flush=True)
            finally:
                svc.stop()
                th.join(30)
            # A node start: coordinator and proxy start together (Pacemaker's order: coordinator first). The
            # agent asks for the table until the coordinator can give one: cold (no node cache: it reads the
            # store and builds the table first), then warm (the cache the cold run saved at its stop, with
            # --away-changes bindings changed, created and deleted in the store meanwhile).
            for label in ("cold", *["warm"] * args.warm_runs):
                if label == "cold":
                    shutil.rmtree(tmp / "node-cache", ignore_errors=True)
                else:
                    churn(writer, args.n, args.away_changes)
                ready.unlink(missing_ok=True)
                (crun / materialize.DB_NAME).unlink(missing_ok=True)
                t0 = time.monotonic()
                repl = Replication.from_model(cluster, "node1", journal_path=tmp / f"journal-{label}",
                                              hosts=ens.hosts, rpc_socket=kamailio.rpc_socket(crun))
                svc = Service("127.0.0.1", 0, str(tmp / "c2.pid"), str(tmp / "c2.sock"), repl, ready_file=ready,
                              role=None)
                th = threading.Thread(target=svc.run, daemon=True)
                th.start()
                try:
                    reply = ask_table(tmp / "c2.sock")
                    t_mat = time.monotonic() - t0
                    with kamailio_up(ns, cfg, cluster, crun, crun / materialize.DB_NAME, args.n) as (t_kam, sock):
                        while not ready.exists():
                            if time.monotonic() - t0 > 120:
                                raise RuntimeError(f"not ready: {repl.replicator.last_status}")
                            time.sleep(0.005)
                        t_ready = time.monotonic() - t0
                        assert contacts_in(sock) == args.n
                        st = repl.replicator.stats
                    print(f"node start ({label}): the coordinator gave the table {t_mat:.2f} s after its start "
                          f"({reply['ms']} ms, {reply['from']}), kamailio start+preload {t_kam:.2f} s, proxy holds "
                          f"{args.n} after {t_mat + t_kam:.2f} s, ready after {t_ready:.2f} s (pushed {st.added}, "
                          f"removed {st.removed}, {st.preloaded} preloaded); load {os.getloadavg()[0]:.2f}",
                          flush=True)
                    node_starts.append({"cache": label, "table_s": t_mat, "kamailio_s": t_kam,
                                        "holds_s": t_mat + t_kam, "ready_s": t_ready, "pushed": st.added,
                                        "removed": st.removed, "from": reply["from"]})
                finally:
                    svc.stop()
                    th.join(30)
            for run in range(0 if args.no_fallback else 1):
                run_dir = tmp / f"run{run}"
                db = run_dir / materialize.DB_NAME
                t0 = time.monotonic()
                p = subprocess.run([sys.executable, "-m", "ha.coordinator.materialize", "--config", str(ycfg),
                                    "--zk-hosts", ens.hosts, "--out", str(db), "--timeout", "10"],
                                   capture_output=True, text=True, timeout=120, cwd=ROOT)
                t_mat = time.monotonic() - t0
                if p.returncode != 0:
                    raise RuntimeError(f"materialize failed: {p.stderr}")
                meta = materialize.read_manifest(db)
                with kamailio_up(ns, cfg, cluster, run_dir, db, args.n) as (t_kam, sock):
                    have = contacts_in(sock)
                    assert have == args.n, f"the proxy loaded {have} of {args.n}"
                    mem = rss_mb(sock)
                    with kamailio.Rpc(sock, timeout=5.0) as rpc:
                        rep = Replicator(reader, ProxyApplier(rpc), "node1", include_own=True)
                        rep.preloaded = meta.loaded
                        t0 = time.monotonic()
                        rep.start()
                        if not rep.synced.wait(120):
                            raise RuntimeError(rep.last_status)
                        t_rep = time.monotonic() - t0
                        rep.stop()
                    assert rep.stats.preloaded == args.n and rep.stats.added == 0, rep.stats
                fb = {"materialize_s": t_mat, "zk_read_ms": meta.meta.get("read_ms"), "kamailio_s": t_kam,
                      "resync_s": t_rep, "holds_s": t_mat + t_kam, "ready_s": t_mat + t_kam + t_rep, "rss_mb": mem}
                print(f"fallback (no coordinator): materialize {t_mat:.2f} s (zookeeper read {fb['zk_read_ms']} ms), "
                      f"kamailio start+preload {t_kam:.2f} s, proxy holds {args.n} after {fb['holds_s']:.2f} s; "
                      f"replicator read + diff {t_rep:.2f} s, ready after {fb['ready_s']:.2f} s; "
                      f"proxy RSS {mem} MB", flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
            if not args.no_rpc_baseline:
                run_dir = tmp / "rpc"
                with kamailio_up(ns, cfg, cluster, run_dir, None, args.n) as (t_kam, sock):
                    mem0 = rss_mb(sock)
                    with kamailio.Rpc(sock, timeout=5.0) as rpc:
                        rep = Replicator(reader, ProxyApplier(rpc), "node1", include_own=True)
                        t0 = time.monotonic()
                        rep.start()
                        if not rep.synced.wait(600):
                            raise RuntimeError(rep.last_status)
                        t_rep = time.monotonic() - t0
                        rep.stop()
                    have = contacts_in(sock)
                    mem = rss_mb(sock)
                print(f"without the fast path: kamailio start {t_kam:.2f} s, replicator read + ul.add of {have} "
                      f"{t_rep:.2f} s, ready after {t_kam + t_rep:.2f} s; proxy RSS {mem0} MB empty, {mem} MB full")
        for key in ("materialize_s", "kamailio_s", "holds_s", "resync_s", "ready_s"):
            vals = [r[key] for r in rows]
            if not vals:
                continue
            print(f"{key}: median {statistics.median(vals):.2f} s (min {min(vals):.2f}, max {max(vals):.2f})")
        for label in ("cold", "warm"):
            vals = [float(r["ready_s"]) for r in node_starts if r["cache"] == label]  # type: ignore[arg-type]
            if vals:
                print(f"node start ({label}) ready_s: median {statistics.median(vals):.2f} s (min {min(vals):.2f}, "
                      f"max {max(vals):.2f}, {len(vals)} runs)")
        out = {"n": args.n, "away_changes": args.away_changes, "runs": rows, "node_starts": node_starts,
               "load": os.getloadavg()[0], "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(json.dumps(out))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        client.stop()
        client.close()
    finally:
        ens.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
