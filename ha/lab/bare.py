"""``sipha lab up --bare``: the lab's hosts running nothing but sshd, to be provisioned over SSH.

Why: the site playbook (ansible/site.yml) must be proven against node1, node2 and the witness exactly as against
VMs -- over real SSH, host keys checked -- and the normal lab cannot serve for that, because it starts Corosync,
Pacemaker and ZooKeeper itself. A bare host has the same namespaces, address, bridge port and supervisor (so
``fence_sipha_lab`` can power it off and on) but its init starts only sshd, and it gets *empty* private copies
of every directory the playbook writes, as a freshly installed machine has (the packages themselves come from
the machine's shared /usr). ``sipha lab down`` removes it like the normal lab: every private copy lives under
the state dir, every process in the hosts' namespaces.

What is shared between the hosts (and with the machine): /usr (packages; the fence agents in /usr/sbin, which
``make install-agents`` writes byte for byte as the playbook does), /etc/passwd and /etc/group (the playbook's
``sipha`` system user is created there once, with ``throttle: 1``: a per-host *file* bind mount of /etc/passwd
would make useradd's rename fail with EBUSY).

SSH material (made fresh by every ``lab up --bare``, in ``<state dir>/ssh``): one ed25519 host key per host,
a client key for root logins, and a ``known_hosts`` naming each host by its lab address (and name), which
is what Ansible, ``sipha deploy`` and testinfra check host keys against. Root logs in by key only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ha import model
from ha.lab import node as labnode
from ha.lab.node import LabError
from ha.lab.supervisor import CONTROL_DIR, SupervisorError, power

# Directories the playbook writes besides the ones the normal lab already keeps private (ha.lab.lab._host_binds).
PRIVATE_DIRS = ("/var/lib/sipha", "/var/log/sipha", "/usr/lib/ocf/resource.d/sipha", "/usr/local/sbin",
                "/usr/local/lib", "/etc/ssh/sshd_config.d", "/etc/sysctl.d", "/opt", "/etc/systemd/system")  # fmt: skip
SSHD_CONFIG = "/etc/ssh/sshd_config"  # a per-host file: `sshd -t` (the playbook's reload check) reads this path
# Under /run/sipha-lab (root-owned, 0755, bound into every host): sshd's StrictModes accepts it, /var/tmp (1777)
# it would not.
AUTHORIZED_KEYS = CONTROL_DIR / "authorized_keys"
SSH_PORT = 22
REQUIRED = {"/usr/sbin/sshd": "openssh-server", "/usr/bin/ssh-keygen": "openssh-client"}


def ssh_paths(state_dir: str | Path) -> dict[str, str]:
    d = Path(state_dir) / "ssh"
    return {"dir": str(d), "client_key": str(d / "id_ed25519"), "known_hosts": str(d / "known_hosts"),
            "authorized_keys": str(AUTHORIZED_KEYS), "user": "root", "port": str(SSH_PORT)}  # fmt: skip


def binds(root: Path) -> list[tuple[str, str]]:
    out = [(str(root / d.lstrip("/")), d) for d in PRIVATE_DIRS]
    out.append((str(root / SSHD_CONFIG.lstrip("/")), SSHD_CONFIG))
    return out


def services() -> list[dict[str, Any]]:
    # -D: stay in the foreground (the lab init is its parent and reaper); -e: log to the service log.
    return [{"name": "sshd", "argv": ["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG]}]


def _keygen(path: Path, comment: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       capture_output=True, text=True, timeout=20)  # fmt: skip
    if p.returncode != 0:
        raise LabError(f"ssh-keygen {path}: {(p.stderr or p.stdout).strip()[:200]}")
    return Path(f"{path}.pub").read_text().strip()


def sshd_config(host_key: Path) -> str:
    """The host's own sshd_config. The drop-ins come first, as in Debian's: sshd keeps the first value it
    reads, so the playbook's hardening (60-sipha.conf) is what applies once it is there."""
    return "\n".join([
        "# sshd of a bare lab host (written by `sipha lab up --bare`)",
        "Include /etc/ssh/sshd_config.d/*.conf",
        f"Port {SSH_PORT}",
        f"HostKey {host_key}",
        "PidFile /run/sshd.pid",  # private /run; the playbook's lab reload HUPs this (common_sshd_pidfile)
        f"AuthorizedKeysFile {AUTHORIZED_KEYS}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",  # no PAM session modules (loginuid, systemd) in a namespace host
        "AcceptEnv LANG LC_*",
        "Subsystem sftp internal-sftp",
        "",
    ])  # fmt: skip


def prepare(cluster: model.Cluster, spec: dict[str, Any]) -> None:
    """Keys, known_hosts, authorized_keys and each host's sshd_config, before any host starts."""
    paths = spec["ssh"]
    ssh_dir = Path(paths["dir"])
    ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    client_pub = _keygen(Path(paths["client_key"]), f"sipha-lab-client@{cluster.name}")
    CONTROL_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(CONTROL_DIR, 0o755)  # noqa: S103 - sshd's StrictModes walks it: root-owned, not group/world writable
    AUTHORIZED_KEYS.write_text(client_pub + "\n")
    os.chmod(AUTHORIZED_KEYS, 0o644)
    known = []
    for h in spec["hosts"]:
        if not h["init"]:
            continue
        key = ssh_dir / h["name"] / "ssh_host_ed25519_key"
        key_type, key_b64 = _keygen(key, f"root@{h['name']}").split()[:2]
        known.append(f"{h['ip']},{h['name']} {key_type} {key_b64}")
        cfg = Path(dict((d, s) for s, d in h["binds"])[SSHD_CONFIG])
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(sshd_config(key))
    Path(paths["known_hosts"]).write_text("\n".join(known) + "\n")


def _banner(ip: str, port: int) -> str:
    with socket.create_connection((ip, port), timeout=0.5) as s:
        return s.recv(64).decode(errors="replace").strip()


def wait_ready(spec: dict[str, Any], step: Callable[[str], None], timeout: float) -> None:
    """Every powered host's sshd greets the client namespace with an SSH banner."""
    deadline = time.monotonic() + timeout
    hosts = [h for h in spec["hosts"] if h["init"]]
    client = next(h["ns"] for h in spec["hosts"] if not h["init"])
    waiting = {h["name"]: h for h in hosts}
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        for name, h in list(waiting.items()):
            try:
                banner = labnode.in_netns(client, lambda h=h: _banner(h["ip"], SSH_PORT))
            except OSError as exc:
                last[name] = exc.strerror or str(exc)
                continue
            if banner.startswith("SSH-"):
                step(f"{name}: sshd answers on {h['ip']}:{SSH_PORT} ({banner})")
                del waiting[name]
        if not waiting:
            step(f"bare lab is up: log in as root with {spec['ssh']['client_key']}, "
                 f"host keys in {spec['ssh']['known_hosts']}")  # fmt: skip
            return
        for name in waiting:
            try:
                if power("status", name) != "on":
                    raise LabError(f"{name} died during start; see {spec['state_dir']}/{name}/logs")
            except SupervisorError as exc:
                raise LabError(str(exc)) from None
        time.sleep(0.1)
    detail = ", ".join(f"{n} ({last.get(n, 'no answer')})" for n in waiting)
    raise LabError(f"sshd not answering after {timeout:.0f} s on {detail}; logs in {spec['state_dir']}/<host>/logs")
