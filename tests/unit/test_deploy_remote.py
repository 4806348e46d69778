"""ha.remote and ha.deploy against a REAL sshd on 127.0.0.1 (random high port, throwaway keys).

Why a real sshd: host-key verification, authentication and SFTP are exactly where a mock would agree with our
own assumptions. The server runs from a temp dir with its own host key and authorized_keys; it is stopped by
its pid in teardown. Nothing leaves loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ha import deploy, model
from ha.remote import AuthFailed, HostKeyMismatch, HostKeyUnknown, Remote, Target, Unreachable

SSHD = "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(not Path(SSHD).exists(), reason="openssh-server is not installed (/usr/sbin/sshd)"),
    pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the throwaway sshd logs in as root; run as root (make test does)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class Sshd:
    port: int
    dir: Path
    user_key: Path
    other_user_key: Path
    host_pub: str
    other_host_pub: str
    known_hosts: Path

    def target(self, name: str = "node1") -> Target:
        return Target(name, "127.0.0.1", self.port, "root")

    def known_hosts_with(self, pub: str) -> Path:
        p = self.dir / f"kh-{abs(hash(pub))}"
        key_type, key_b64 = pub.split()[:2]
        p.write_text(f"[127.0.0.1]:{self.port} {key_type} {key_b64}\n")
        return p


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    host_pub = _keygen(d / "host_ed25519")
    other_host_pub = _keygen(d / "other_host_ed25519")
    user_pub = _keygen(d / "user_ed25519")
    _keygen(d / "other_user_ed25519")
    (d / "authorized_keys").write_text(user_pub + "\n")
    port = _free_port()
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
        "LogLevel ERROR\nMaxStartups 50\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(d / "sshd.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.05)
    s = Sshd(port, d, d / "user_ed25519", d / "other_user_ed25519", host_pub, other_host_pub, d / "known_hosts")
    s.known_hosts.write_text(s.known_hosts_with(host_pub).read_text())
    yield s
    proc.terminate()  # by pid: only the server this fixture started
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


# ------------------------------------------------------------------------------------------------ ha.remote


def test_a_command_runs(sshd: Sshd) -> None:
    with Remote(sshd.target(), sshd.known_hosts, sshd.user_key) as r:
        res = r.run("echo hello; echo err >&2")
        assert res.ok and res.stdout == "hello\n" and res.stderr == "err\n"
        assert r.run("exit 3", check=False).exit_code == 3
        r.put("payload\n", f"{sshd.dir}/put.txt", 0o600)
        assert r.get(f"{sshd.dir}/put.txt") == b"payload\n"
        assert (sshd.dir / "put.txt").stat().st_mode & 0o777 == 0o600


def test_unknown_host_key_is_rejected(sshd: Sshd) -> None:
    empty = sshd.dir / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyUnknown) as e:
        Remote(sshd.target("node1"), empty, sshd.user_key).open()
    msg = str(e.value)
    assert msg.startswith(f"node1 (127.0.0.1:{sshd.port}): host key unknown")
    assert "SHA256:" in msg and "\n" not in msg


def test_wrong_host_key_is_rejected_naming_the_host(sshd: Sshd) -> None:
    wrong = sshd.known_hosts_with(sshd.other_host_pub)
    with pytest.raises(HostKeyMismatch) as e:
        Remote(sshd.target("node2"), wrong, sshd.user_key).open()
    msg = str(e.value)
    assert msg.startswith(f"node2 (127.0.0.1:{sshd.port}): host key mismatch")
    assert "ssh-keygen" in msg and "\n" not in msg


def test_missing_known_hosts_file_is_an_error_not_an_empty_trust_store(sshd: Sshd) -> None:
    with pytest.raises(HostKeyUnknown, match="cannot read"):
        Remote(sshd.target(), sshd.dir / "nope", sshd.user_key).open()


def test_wrong_user_key_is_an_auth_failure_naming_the_host(sshd: Sshd) -> None:
    with pytest.raises(AuthFailed) as e:
        Remote(sshd.target("witness"), sshd.known_hosts, sshd.other_user_key).open()
    assert str(e.value).startswith(f"witness (127.0.0.1:{sshd.port}): authentication failed for user root")


def test_unreachable_host_is_named(sshd: Sshd) -> None:
    with pytest.raises(Unreachable) as e:
        Remote(Target("node9", "127.0.0.1", _free_port()), sshd.known_hosts, sshd.user_key).open()
    assert str(e.value).startswith("node9 (127.0.0.1:") and "refused" in str(e.value)


# ------------------------------------------------------------------------------------------------ ha.deploy


def _cluster(sshd: Sshd, **timings: int) -> tuple[model.Cluster, str]:
    """examples/lab.yaml with every host's SSH pointed at the test sshd (all hosts share one server)."""
    data = yaml.safe_load((REPO / "examples/lab.yaml").read_text())
    for h in [*data["nodes"], data["witness"]]:
        h["ssh"] = {"host": "127.0.0.1", "port": sshd.port, "user": "root"}
    data["timings"].update(timings)
    text = yaml.safe_dump(data)
    return model.parse(data, "test.yaml"), text


def _lines(progress: list[tuple[str, str, str]]) -> list[str]:
    return [f"{h} {t} {s}" for h, t, s in progress]


def test_deploy_installs_then_has_nothing_to_do(sshd: Sshd, tmp_path: Path) -> None:
    cluster, text = _cluster(sshd)
    seen: list[tuple[str, str, str]] = []
    prefix = f"{tmp_path}/{{host}}"  # one sshd stands in for three hosts: one root directory each
    report = deploy.deploy(cluster, text, sshd.known_hosts, sshd.user_key,
                           lambda h, t, s, d="": seen.append((h, t, s)), prefix=prefix)  # fmt: skip
    n1, w = tmp_path / "node1", tmp_path / "witness"
    assert sorted(report.changed) == ["node1", "node2", "witness"]
    assert "token: 300" in (n1 / "etc/corosync/corosync.conf").read_text()
    assert "198.51.100.11" in (n1 / "etc/sipha/kamailio.cfg").read_text()
    assert (n1 / "var/lib/zookeeper/myid").read_text().strip() == "1"
    assert (w / "var/lib/zookeeper/myid").read_text().strip() == "3"
    assert not (w / "etc/sipha/kamailio.cfg").exists()  # the witness runs no proxy
    assert (n1 / "etc/sipha/cluster.yaml").stat().st_mode & 0o777 == 0o640
    assert "node1 connect ok" in _lines(seen) and "witness install ok" in _lines(seen)
    assert list((n1 / "var/lib/sipha/backup").iterdir())
    again = deploy.deploy(cluster, text, sshd.known_hosts, sshd.user_key, prefix=prefix)
    assert again.nothing_to_do, again.changed


def test_failed_activation_rolls_back_and_names_host_and_task(sshd: Sshd, tmp_path: Path) -> None:
    prefix = f"{tmp_path}/{{host}}"
    cluster, text = _cluster(sshd)
    deploy.deploy(cluster, text, sshd.known_hosts, sshd.user_key, prefix=prefix)
    before = {h: (tmp_path / h / "etc/corosync/corosync.conf").read_text() for h in ("node1", "node2")}

    changed, text2 = _cluster(sshd, token_ms=400, consensus_ms=480)
    p = deploy.plan(changed, prefix)
    failing = deploy.Activation("load CIB", "node1", "echo 'cibadmin: Update does not conform' >&2; exit 1")
    p = deploy.Plan(p.hosts, (failing,))
    seen: list[str] = []
    with pytest.raises(deploy.DeployError) as e:
        deploy.Deployer(deploy.rendered_files(changed, text2), p, sshd.known_hosts, sshd.user_key,
                        lambda h, t, s, d="": seen.append(f"{h} {t} {s}")).run()  # fmt: skip
    msg = str(e.value)
    assert msg.startswith("node1: load CIB: ") and msg.count("Update does not conform") == 1
    # The witness's files (zoo.cfg, myid) did not change with the token, so it had nothing to roll back.
    assert msg.endswith("rolled back node1, node2: previous config restored")
    assert "node2 install ok" in seen and "node2 rollback ok" in seen
    for h, text_before in before.items():
        assert (tmp_path / h / "etc/corosync/corosync.conf").read_text() == text_before


def test_failed_check_changes_nothing(sshd: Sshd, tmp_path: Path) -> None:
    cluster, text = _cluster(sshd)
    deploy.deploy(cluster, text, sshd.known_hosts, sshd.user_key, prefix=str(tmp_path))
    before = (tmp_path / "etc/sipha/kamailio.cfg").read_text()
    changed, text2 = _cluster(sshd, token_ms=500, consensus_ms=600)
    p = deploy.plan(changed, str(tmp_path))
    node2 = p.hosts[1]
    bad = tuple(
        deploy.Install(i.source, i.dest, i.mode, i.group, "echo 'parse error line 12' >&2; false {file}")
        if i.source == "corosync.conf" else i
        for i in node2.installs
    )
    p = deploy.Plan((p.hosts[0], deploy.HostPlan(node2.target, bad, node2.backup_root), p.hosts[2]), ())
    with pytest.raises(deploy.DeployError) as e:
        deploy.Deployer(deploy.rendered_files(changed, text2), p, sshd.known_hosts, sshd.user_key).run()
    msg = str(e.value)
    assert msg.startswith("node2: check corosync.conf: ") and "parse error line 12" in msg
    assert msg.endswith("nothing was changed on any host")
    assert (tmp_path / "etc/sipha/kamailio.cfg").read_text() == before
    assert "token: 300" in (tmp_path / "etc/corosync/corosync.conf").read_text()


def test_unreachable_host_stops_deploy_before_any_change(sshd: Sshd, tmp_path: Path) -> None:
    cluster, text = _cluster(sshd)
    data = yaml.safe_load(text)
    data["witness"]["ssh"]["port"] = _free_port()
    cluster = model.parse(data, "test.yaml")
    with pytest.raises(deploy.DeployError) as e:
        deploy.deploy(cluster, text, sshd.known_hosts, sshd.user_key, prefix=str(tmp_path))
    assert str(e.value).startswith("witness: connect: unreachable")
    assert not (tmp_path / "etc").exists()


def test_wrong_host_key_stops_deploy_naming_the_host(sshd: Sshd, tmp_path: Path) -> None:
    cluster, text = _cluster(sshd)
    with pytest.raises(deploy.DeployError) as e:
        deploy.deploy(cluster, text, sshd.known_hosts_with(sshd.other_host_pub), sshd.user_key,
                      prefix=str(tmp_path))  # fmt: skip
    assert str(e.value).startswith("node1: connect: host key mismatch")


def test_playbook_failures_name_host_and_task() -> None:
    out = [
        "TASK [cluster : Install corosync.conf from the render] ****",
        "ok: [node1]",
        'fatal: [node2]: FAILED! => {"msg": "failed to validate"}',
        "TASK [Gathering Facts] ****",
        "fatal: [witness]: UNREACHABLE! => {}",
        "RUNNING HANDLER [zookeeper : Restart ZooKeeper under systemd] ****",
        'fatal: [node1]: FAILED! => {"msg": "failure 1 during daemon-reload"}',
        "TASK [service : Start in the lab unless it runs - corosync-qdevice] ****",
        'fatal: [node2]: FAILED! => {"changed": false, "msg": "non-zero return code", "rc": 1, "stderr": "Traceback'
        '\\n  ...\\nsipha-service: corosync-qdevice exited at once; see /run/sipha/corosync-qdevice.log"}',
        "fatal: [node1]: FAILED! => not json",
    ]
    assert deploy.failed_tasks(out) == [
        ("node2", "cluster : Install corosync.conf from the render", "failed to validate"),
        ("witness", "Gathering Facts (unreachable)", ""),
        ("node1", "zookeeper : Restart ZooKeeper under systemd", "failure 1 during daemon-reload"),
        ("node2", "service : Start in the lab unless it runs - corosync-qdevice",
         "sipha-service: corosync-qdevice exited at once; see /run/sipha/corosync-qdevice.log"),
        ("node1", "service : Start in the lab unless it runs - corosync-qdevice", ""),
    ]
    cmd = deploy.playbook_command(Path("/r"), REPO / "examples/lab.yaml", "/k", None)
    assert "-o UserKnownHostsFile=/k -o StrictHostKeyChecking=yes" in cmd
    with_key = deploy.playbook_command(Path("/r"), REPO / "examples/lab.yaml", "/k", "/id")
    assert "-o UserKnownHostsFile=/k -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes" in with_key
    assert with_key[with_key.index("--private-key") + 1] == "/id"


# ------------------------------------------------------------------------------------------------ status --remote


def _serve_status(path: Path, doc: bytes) -> threading.Thread:
    """A unix socket at ``path`` answering one connection with ``doc`` (the coordinator's status line). The real
    coordinator behind it is crossed by the deploy lab test (test_deploy_lab.py, status --remote)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(10)

    def answer() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                assert conn.recv(64) == b"status\n"
                conn.sendall(doc)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    return t


def test_remote_replication_reads_the_coordinator_over_ssh(sshd: Sshd) -> None:
    sock = sshd.dir / "coord.sock"
    status = {"ready": True, "replication": {"active": True, "epoch": 7, "zookeeper": "connected", "shedding": True,
                                             "shed_limit_per_s": 2918, "pending": 12, "lost": 0, "journal_bytes": 0,
                                             "last": "wrote 12", "accepted": 99}}  # fmt: skip
    t = _serve_status(sock, json.dumps(status).encode() + b"\n")
    with Remote(sshd.target(), sshd.known_hosts, sshd.user_key) as r:
        repl = deploy.remote_replication(r, str(sock))
    t.join(5)
    assert repl == {"active": True, "epoch": 7, "zookeeper": "connected", "ready": True, "shedding": True,
                    "shed_limit_per_s": 2918, "pending": 12, "lost": 0, "journal_bytes": 0, "last": "wrote 12"}
    line = deploy.replication_line(repl)
    assert line.startswith("active (writer), epoch 7, ZooKeeper connected, ready"), line
    assert "SHEDDING REGISTERs over 2918/s (503)" in line and "12 events pending" in line, line


def test_remote_replication_names_a_coordinator_that_does_not_answer(sshd: Sshd) -> None:
    missing = sshd.dir / "no-such.sock"
    with Remote(sshd.target(), sshd.known_hosts, sshd.user_key) as r:
        repl = deploy.remote_replication(r, str(missing))
        assert set(repl) == {"error"}
        assert f"the coordinator does not answer on {missing}" in repl["error"], repl
        assert "FileNotFoundError" in repl["error"] or "No such file" in repl["error"], repl
        not_status = sshd.dir / "garbage.sock"
        t = _serve_status(not_status, b"hello\n")
        repl = deploy.remote_replication(r, str(not_status))
        t.join(5)
    assert repl == {"error": "the coordinator's answer is not a status: 'hello'"}
    assert deploy.replication_line(repl) == "replication unknown: the coordinator's answer is not a status: 'hello'"
