"""Kamailio dmq_usrloc beside sipha's restart fast path: resync of N contacts into a restarted peer.

``flock /run/lock/sipha-lab.lock .venv/bin/python bench/coordinator_dmq.py 100000 [--runs 3] [--default-batching]``

Two Kamailio 5.6 instances on loopback (127.0.0.11:5060 and 127.0.0.12:5060, no lab needed), in-memory usrloc,
``dmq`` + ``dmq_usrloc`` (sync at start-up on). "Tuned batching", as in the issue's anchor: full-sync messages of
up to 150 contacts (``batch_msg_contacts``, the module's maximum) and 60000 bytes (``batch_msg_size``); the
default is one contact per message. Shared memory 512 MB each (the issue saw the default run out at 100k).

1. Peer A alone gets N bindings over JSON-RPC ``ul.add`` (pipelined). (Filled with B running, the live
   replication of 100k adds exhausted shared memory: ``Can't insert contact``.)
2. B is started (then stopped and started again, ``--runs`` times): timed from exec until B's
   ``usrloc:location_contacts`` == N (its start-up sync request, A's batched KDMQ answers, B's inserts),
   polled every 10 ms over JSON-RPC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ha.kamailio_testing import stop_group  # noqa: E402
from ha.proxy import kamailio  # noqa: E402

MPATH = next((str(p.parent) for p in Path("/usr/lib").glob("*/kamailio/modules/dmq_usrloc.so")), "")

CFG = """#!KAMAILIO
debug=2
log_stderror=yes
memdbg=5
memlog=5
children=4
auto_aliases=no
dns=no
rev_dns=no
disable_tcp=yes
listen=udp:{me}:5060
mpath="{mpath}/"
run_dir="{run}"
loadmodule "jsonrpcs.so"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "dmq.so"
loadmodule "dmq_usrloc.so"
modparam("jsonrpcs", "transport", 4)
modparam("jsonrpcs", "dgram_socket", "kamailio-rpc.sock")
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "hash_size", 14)
modparam("dmq", "server_address", "sip:{me}:5060")
modparam("dmq", "notification_address", "sip:{peer}:5060")
modparam("dmq", "num_workers", 2)
modparam("dmq_usrloc", "enable", 1)
modparam("dmq_usrloc", "sync", 1)
{batching}
request_route {{
    if (is_method("KDMQ")) {{
        dmq_handle_message();
        exit;
    }}
    if (is_method("REGISTER")) {{
        save("location");
        exit;
    }}
    sl_send_reply("404", "Not here");
}}
"""
TUNED = 'modparam("dmq_usrloc", "batch_msg_contacts", 150)\nmodparam("dmq_usrloc", "batch_msg_size", 60000)'


@contextlib.contextmanager
def kamailio_at(tmp: Path, me: str, peer: str, batching: str, shm_mb: int = 512) -> Iterator[Path]:
    run = tmp / me
    run.mkdir(parents=True, exist_ok=True)
    cfg = run / "k.cfg"
    cfg.write_text(CFG.format(me=me, peer=peer, mpath=MPATH, run=run, batching=batching))
    sock = run / "kamailio-rpc.sock"
    sock.unlink(missing_ok=True)
    log = (run / "k.log").open("ab")
    proc = subprocess.Popen([kamailio.kamailio_binary() or "kamailio", "-f", str(cfg), "-m", str(shm_mb), "-M", "32",
                             "-P", str(run / "k.pid"), "-DD", "-E"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kamailio {me} did not start: {(run / 'k.log').read_text()[-1500:]}")
            time.sleep(0.005)
        yield sock
    finally:
        stop_group(proc, wait_s=20)
        log.close()


def rss_mb(sock: Path) -> int:
    """Resident memory of every process of the Kamailio whose run dir holds ``sock``, in MB."""
    pgid = os.getpgid(int((sock.parent / "k.pid").read_text()))
    total = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, StopIteration):
                if os.getpgid(int(d)) == pgid:
                    status = Path(f"/proc/{d}/status").read_text().splitlines()
                    total += int(next(ln for ln in status if ln.startswith("VmRSS")).split()[1])
    return total // 1024


def answers(sock: Path) -> bool:
    try:
        kamailio.rpc("core.uptime", sock=sock, timeout=0.2)
    except (kamailio.RpcError, OSError):
        return False
    return True


def contacts(sock: Path) -> int:
    for s in kamailio.rpc("stats.get_statistics", "usrloc:", sock=sock, timeout=5):
        if s.startswith("usrloc:location_contacts = "):
            return int(s.rsplit(" ", 1)[1])
    return -1


def wait_count(sock: Path, n: int, limit_s: float, every_s: float = 0.01) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        with contextlib.suppress(kamailio.RpcError, OSError):
            if contacts(sock) >= n:
                return time.monotonic() - t0
        time.sleep(every_s)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--default-batching", action="store_true", help="dmq_usrloc's defaults (1 contact/message)")
    ap.add_argument("--limit", type=float, default=120.0, help="give up on a resync after this many seconds")
    args = ap.parse_args()
    if not MPATH:
        print("kamailio's dmq_usrloc module is not installed", file=sys.stderr)
        return 2
    batching = "" if args.default_batching else TUNED
    tmp = Path(tempfile.mkdtemp(prefix="sipha-dmq-"))
    a_ip, b_ip = "127.0.0.11", "127.0.0.12"
    res: dict[str, object] = {"n": args.n, "batching": "default" if args.default_batching else "tuned"}
    try:
        with kamailio_at(tmp, a_ip, b_ip, batching) as a:
            # A alone is filled (no live replication: 100k KDMQ transactions in flight exhausted shared memory
            # here, "Can't insert contact"); B's start-up sync then has to carry all of them.
            t0 = time.monotonic()
            calls = [("ul.add", ["location", f"u{i}", f"sip:u{i}@127.0.0.80:5060", 3600, -1, "0", 0, 0, -1])
                     for i in range(args.n)]
            with kamailio.Rpc(a, timeout=5.0) as r:
                bad = [o for o in r.call_many(calls, 8) if isinstance(o, Exception)]
            res["fill_a_s"] = time.monotonic() - t0
            assert not bad, bad[:3]
            assert contacts(a) == args.n
            print(f"A filled with {args.n} over ul.add in {res['fill_a_s']:.2f} s", flush=True)
            times = []
            for run in range(args.runs):
                t0 = time.monotonic()
                with kamailio_at(tmp, b_ip, a_ip, batching) as b:
                    t_up = time.monotonic() - t0
                    t_sync = wait_count(b, args.n, args.limit)
                    have = contacts(b)
                    mem = rss_mb(b)
                total = None if t_sync is None else t_up + t_sync
                times.append(total)
                print(f"run {run + 1}: restarted B answered after {t_up:.2f} s, held {have} of {args.n} "
                      f"{'(gave up)' if total is None else f'after {total:.2f} s'}; B's RSS {mem} MB; "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
            res["resync_s"] = times
            done = [t for t in times if t is not None]
            if done:
                print(f"dmq_usrloc ({res['batching']} batching) resync of {args.n}: median "
                      f"{statistics.median(done):.2f} s ({len(done)}/{len(times)} runs complete)")
        print(json.dumps(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
