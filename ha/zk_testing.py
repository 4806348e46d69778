"""A real ZooKeeper ensemble on 127.0.0.1 for tests and measurements (never mocks).

Why a real ensemble: the behaviour the coordinator depends on (multi-op atomicity, version checks for
epoch fencing, what a client sees when quorum is lost, session clamping) only exists in the server.
Three JVMs from the Debian ``zookeeper`` package, each with its own data dir and distinct client, peer and
election ports, started with small heaps and the serial GC because the test machine is a shared 2-core VM.

Every process this module starts is remembered by pid and stopped by pid (SIGTERM, then SIGKILL), never by
name: other engineers run their own JVMs on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JAVA = "/usr/bin/java"
# zookeeper.jar's manifest names its dependencies; the Debian package also needs these two to log at all.
CLASSPATH = ":".join(
    ("/usr/share/java/zookeeper.jar", "/usr/share/java/slf4j-log4j12.jar", "/usr/share/java/log4j-1.2.jar")
)
JVM_OPTS = ("-Xms16m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto")
LOG4J = """log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File=${zookeeper.log.dir}/zookeeper.log
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{ISO8601} [myid:%X{myid}] %-5p [%t] %c{1}@%L - %m%n
"""


def free_ports(n: int) -> list[int]:
    """Ports the kernel just handed out, so parallel runs and the lab's own ensemble never collide."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def four_letter(port: int, word: str = "srvr", timeout: float = 1.0) -> str:
    """Send a ZooKeeper four-letter command; "" when the member does not answer (down, or not serving)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(word.encode())
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


def mode(port: int) -> str:
    """ "leader", "follower", "standalone", or "" when the member is not serving clients (no quorum)."""
    for line in four_letter(port).splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return ""


@dataclass
class Member:
    myid: int
    client_port: int
    peer_port: int
    election_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None


@dataclass
class Ensemble:
    """Three (or any odd number of) members under ``root``; start(), stop_member(i), start_member(i), close()."""

    root: Path
    size: int = 3
    tick_ms: int = 500
    heap_mb: int = 128  # enough for tests; ~100k bindings need ~512
    # The heap at its maximum from the start, as the lab and Ansible run ZooKeeper (grown from a small start it
    # grows by full collections, pauses of every request); small by default, for the unit tests' many ensembles.
    fixed_heap: bool = False
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(3 * self.size)
        for i in range(self.size):
            d = self.root / f"zk{i + 1}"
            self.members.append(Member(i + 1, *ports[3 * i : 3 * i + 3], data_dir=d))

    @property
    def hosts(self) -> str:
        """The kazoo connect string naming every member."""
        return ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def _write_config(self, m: Member) -> Path:
        m.data_dir.mkdir(parents=True, exist_ok=True)
        (m.data_dir / "myid").write_text(f"{m.myid}\n")
        (m.data_dir / "log4j.properties").write_text(LOG4J)
        servers = "\n".join(f"server.{o.myid}=127.0.0.1:{o.peer_port}:{o.election_port}" for o in self.members)
        cfg = m.data_dir / "zoo.cfg"
        cfg.write_text(
            f"tickTime={self.tick_ms}\ninitLimit=10\nsyncLimit=5\n"
            f"dataDir={m.data_dir}\nclientPort={m.client_port}\nclientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n4lw.commands.whitelist=srvr,stat,ruok,mntr\n"
            "maxClientCnxns=200\nstandaloneEnabled=false\n"
            f"{servers}\n"
        )
        return cfg

    def start_member(self, i: int) -> None:
        m = self.members[i]
        if m.pid:
            return
        cfg = self._write_config(m)
        log = (m.data_dir / "stdout.log").open("ab")
        m.proc = subprocess.Popen(
            [
                JAVA,
                *JVM_OPTS,
                f"-Xmx{self.heap_mb}m",
                *([f"-Xms{self.heap_mb}m"] if self.fixed_heap else []),  # after JVM_OPTS' -Xms: the last one counts
                f"-Dzookeeper.log.dir={m.data_dir}",
                f"-Dlog4j.configuration=file:{m.data_dir / 'log4j.properties'}",
                "-cp",
                CLASSPATH,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                str(cfg),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def stop_member(self, i: int, timeout: float = 10.0) -> None:
        """SIGKILL by pid (a hard stop is what a crash or a partition looks like), then reap."""
        m = self.members[i]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout)
        m.proc = None

    def start(self, timeout: float = 60.0) -> None:
        for i in range(self.size):
            self.start_member(i)
        self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 60.0, members: list[int] | None = None) -> None:
        """Until there is a leader and every named (default: running) member serves clients."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idx = members if members is not None else [i for i, m in enumerate(self.members) if m.pid]
            modes = [mode(self.members[i].client_port) for i in idx]
            if "leader" in modes and all(modes):
                return
            for i in idx:
                if self.members[i].proc is not None and self.members[i].proc.poll() is not None:
                    raise RuntimeError(f"zookeeper member {i + 1} exited; see {self.members[i].data_dir}")
            time.sleep(0.2)
        raise TimeoutError(f"no ZooKeeper leader within {timeout} s; logs under {self.root}")

    def close(self) -> None:
        for i in range(self.size):
            self.stop_member(i)


# The credential of every client of a test Ensemble (tests' and benches' own clients, and the services they start
# through lab_yaml): their znodes closed as in the lab, and all of them one identity.
TEST_CREDENTIAL = "sipha:test-credential-of-the-lab-yaml"


def credential_kwargs() -> dict[str, object]:
    """KazooClient arguments of TEST_CREDENTIAL (see ha.coordinator.zkauth). Not named test_*: a test module that
    imports it would have it collected as a test."""
    from ha.coordinator.zkauth import ZkAuth

    user, _, password = TEST_CREDENTIAL.partition(":")
    return ZkAuth(((user, password),)).client_kwargs()


@contextlib.contextmanager
def started_client(hosts: str, timeout: float = 10.0, **kwargs: Any) -> Iterator[Any]:
    """A started KazooClient (kwargs: KazooClient's own, e.g. credential_kwargs()), stopped and closed after."""
    from kazoo.client import KazooClient

    zk = KazooClient(hosts=hosts, timeout=timeout, **kwargs)
    zk.start(timeout=30)
    try:
        yield zk
    finally:
        zk.stop()
        zk.close()


def lab_yaml(tmp: Path, name: str | None = None) -> Path:
    """examples/lab.yaml for a coordinator run outside the lab (tests, benches on an Ensemble): renamed when
    ``name`` is given, its ``zookeeper.auth_file`` TEST_CREDENTIAL written into ``tmp`` (the lab writes its own
    into each node's /etc/sipha), so the service and materialize authenticate as they do in the lab."""
    text = (Path(__file__).resolve().parents[1] / "examples" / "lab.yaml").read_text()
    if name:
        text = text.replace("name: sipha-lab", f"name: {name}", 1)
    cred = tmp / "zk-auth"
    cred.write_text(TEST_CREDENTIAL + "\n")
    cred.chmod(0o600)
    if "auth_file: /etc/sipha/zk-auth" not in text:
        raise ValueError("examples/lab.yaml no longer sets zookeeper.auth_file: /etc/sipha/zk-auth")
    out = tmp / "cluster.yaml"
    out.write_text(text.replace("auth_file: /etc/sipha/zk-auth", f"auth_file: {cred}", 1))
    return out


__all__ = ["TEST_CREDENTIAL", "Ensemble", "credential_kwargs", "four_letter", "free_ports", "lab_yaml", "mode",
           "started_client"]
