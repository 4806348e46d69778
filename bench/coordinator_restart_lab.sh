#!/bin/bash
# The restart fast path in the lab, once: N bindings in the lab's ZooKeeper (written as a third node's, so both
# proxies get them), then the standby's Kamailio process group is killed (kill -9); Pacemaker's monitor sees it,
# ocf:sipha:proxy restarts it with the table from the local coordinator, the coordinator pushes the difference
# and gives readiness. Prints the times and the agent's and coordinator's log lines.
#   flock /run/lock/sipha-lab.lock bench/coordinator_restart_lab.sh 20000
# (root; brings the lab up and down; installs the agents first, as the lab runs the installed ones.)
set -u
cd "$(dirname "$0")/.."
N=${1:-20000}
trap '.venv/bin/sipha lab down >/dev/null 2>&1' EXIT
uptime
make -s install-agents
.venv/bin/sipha lab up examples/lab.yaml || exit 1
read -r -d '' FILL <<'EOF'
import sys, time
root = sys.argv[2]
sys.path[:0] = [root, f"{root}/tests/unit"]
from kazoo.client import KazooClient
from conftest_zk import contact
from ha import model
from ha.coordinator.store import StaleEpoch, ZkStore
from ha.lab import lab
n = int(sys.argv[1])
c = model.load(f"{root}/examples/lab.yaml")
cl = KazooClient(hosts=",".join(f"{h.ip}:{c.zookeeper.client_port}" for h in c.zk_members), timeout=10,
                 **lab.zk_client_kwargs(lab.load_spec()))
cl.start(timeout=20)
s = ZkStore(cl, c.name, "node1")
s.ensure_layout()
time.sleep(3)  # the active's promotion bumps the epoch first
for start in range(0, n, 5000):
    evs = [contact(i, f"lab{i}", f"sip:lab{i}@198.51.100.90:5060", node="node9")
           for i in range(start + 1, min(start + 5000, n) + 1)]
    for _ in range(5):
        s.adopt_epoch()
        try:
            s.write(evs)
            break
        except StaleEpoch:
            time.sleep(0.5)
print(f"{len(s.snapshot().contacts)} bindings in ZooKeeper")
cl.stop()
cl.close()
EOF
read -r -d '' COUNT <<'EOF'
import os, sys
sys.path.insert(0, sys.argv[1])
from ha.proxy.kamailio import rpc
st = rpc("stats.get_statistics", "usrloc:", sock="/run/sipha/kamailio-rpc.sock", timeout=5)
ready = open("/run/sipha/ready").read().strip() if os.path.exists("/run/sipha/ready") else "NOT READY"
print([x for x in st if "location_contacts" in x], ready)
EOF
PY=$PWD/.venv/bin/python
.venv/bin/sipha lab exec client -- "$PY" -c "$FILL" "$N" "$PWD"
sleep 20
for n in node1 node2; do echo "== $n $(.venv/bin/sipha lab exec $n -- "$PY" -c "$COUNT" "$PWD")"; done
VIPNODE=$(.venv/bin/sipha lab status 2>/dev/null | grep -o "VIP 198.51.100.10 on node[12]" | grep -o "node[12]")
SBY=node2; [ "$VIPNODE" = node2 ] && SBY=node1
PID=$(.venv/bin/sipha lab exec $SBY -- cat /run/sipha/kamailio.pid)
PGID=$(.venv/bin/sipha lab exec $SBY -- ps -o pgid= -p "$PID" | tr -d ' ')
echo "VIP on $VIPNODE; kill -9 of Kamailio's process group $PGID on $SBY at $(date +%T.%N)"
.venv/bin/sipha lab exec $SBY -- kill -9 -- "-$PGID"
for _ in $(seq 1 60); do
  sleep 0.5
  NEWPID=$(.venv/bin/sipha lab exec $SBY -- cat /run/sipha/kamailio.pid 2>/dev/null)
  [ -n "$NEWPID" ] && [ "$NEWPID" != "$PID" ] && .venv/bin/sipha lab exec $SBY -- test -e /run/sipha/ready && break
done
echo "ready by $(date +%T.%N): $(.venv/bin/sipha lab exec $SBY -- "$PY" -c "$COUNT" "$PWD")"
.venv/bin/sipha lab exec $SBY -- sh -c 'grep -h "preload\|readiness\|resync" /var/log/sipha/coordinator-*.log | tail -8'
.venv/bin/sipha lab exec $SBY -- sh -c 'grep -h "sipha-proxy(proxy)" /var/log/pacemaker/pacemaker.log | grep -v "error output" | tail -6'
uptime
