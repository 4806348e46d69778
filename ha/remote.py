"""Commands and files on the cluster's hosts over SSH (fabric on paramiko), with host keys always verified.

Why this module exists: ``sipha deploy``, ``sipha status --remote`` and ``sipha switchover`` act on real machines,
and an operator acting on the wrong machine (a reinstalled host, a spoofed address) is worse than not acting.
So host keys are checked against one known_hosts file the lab or the user supplies, with paramiko's
:class:`~paramiko.client.RejectPolicy` semantics: a host that is not in the file, or offers another key, is
refused. Fabric's own default (``AutoAddPolicy``: trust whatever answers) is replaced as soon as a connection
is built; nothing here ever adds a key.

Every failure is one :class:`RemoteError` line naming the host, so ``sipha deploy`` can say where it stopped::

    node2 (198.51.100.12:22): host key mismatch: offered ssh-ed25519 SHA256:..., known_hosts has SHA256:...
    node2 (198.51.100.12:22): unreachable: connection refused
    node2 (198.51.100.12:22): authentication failed for user root (keys: /root/.ssh/id_ed25519)
"""

from __future__ import annotations

import base64
import hashlib
import io
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit

from ha.model import Node, Witness

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 120.0


class RemoteError(RuntimeError):
    """One line naming the host (``name (address:port)``) and what went wrong there."""

    def __init__(self, target: Target, message: str) -> None:
        self.target, self.message = target, message
        super().__init__(f"{target}: {message}")


class Unreachable(RemoteError):
    """No SSH session: refused, timed out, no route, or not an SSH server."""


class AuthFailed(RemoteError):
    """The server refused every key we offered for the user."""


class HostKeyUnknown(RemoteError):
    """The host is not in the known_hosts file: refused rather than trusted on first use."""


class HostKeyMismatch(RemoteError):
    """The host offered a key other than the one recorded: a reinstall, or someone in the middle."""


class CommandFailed(RemoteError):
    """The command ran and exited non-zero (or timed out); ``result`` has its output."""

    def __init__(self, target: Target, message: str, result: Result | None = None) -> None:
        super().__init__(target, message)
        self.result = result
        # Without the command line, for callers that already name the step (``node1: load CIB: exited 1: ...``).
        self.short = f"exited {result.exit_code}: {result.last_line()}" if result else ""


@dataclass(frozen=True)
class Target:
    """Where and as whom to log in; ``name`` is the cluster's host name used in every message."""

    name: str
    host: str
    port: int = 22
    user: str = "root"

    @classmethod
    def of(cls, host: Node | Witness) -> Target:
        return cls(host.name, host.ssh_host, host.ssh.port, host.ssh.user)

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH and paramiko key this host in known_hosts (``[addr]:port`` off port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"


@dataclass(frozen=True)
class Result:
    """What a command did on a host."""

    target: Target
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def last_line(self) -> str:
        lines = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return lines[-1].strip() if lines else ""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` form, so a message can be compared with ``ssh-keygen -lf``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _Reject(paramiko.MissingHostKeyPolicy):
    """RejectPolicy that remembers what the server offered, for the error message."""

    def __init__(self) -> None:
        self.offered: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.offered = key
        raise paramiko.SSHException(f"host {hostname} is not in known_hosts")


def load_known_hosts(path: str | Path) -> paramiko.HostKeys:
    """Read a known_hosts file; a missing or unreadable file is an error, never an empty trust store."""
    p = Path(path).expanduser()
    try:
        return paramiko.HostKeys(str(p))
    except OSError as exc:
        raise FileNotFoundError(f"known_hosts {p}: cannot read: {exc.strerror or exc}") from None


class Remote:
    """One host: ``run`` commands and ``put``/``get`` files over one verified SSH session.

    ``key_filename`` is the private key to offer (default: the user's agent and ~/.ssh keys, as ssh does).
    Commands run through the login user's shell; ``sudo=True`` prefixes ``sudo -n`` unless the user is root.
    """

    def __init__(
        self,
        target: Target,
        known_hosts: str | Path = DEFAULT_KNOWN_HOSTS,
        key_filename: str | Path | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.target = target
        self.known_hosts = Path(known_hosts).expanduser()
        self.key_filename = str(Path(key_filename).expanduser()) if key_filename else None
        self.connect_timeout = connect_timeout
        self._policy = _Reject()
        self._conn: Connection | None = None

    # -- session ---------------------------------------------------------------------------------------

    def _connection(self) -> Connection:
        kwargs: dict[str, object] = {
            "banner_timeout": self.connect_timeout,
            "auth_timeout": self.connect_timeout,
        }
        if self.key_filename:
            kwargs.update(key_filename=self.key_filename, look_for_keys=False, allow_agent=False)
        # No ~/.ssh/config: what sipha connects to is the model's address, port and user, nothing else.
        config = Config(overrides={"load_ssh_configs": False, "run": {"hide": True, "warn": True}})
        conn = Connection(
            self.target.host,
            user=self.target.user,
            port=self.target.port,
            config=config,
            connect_timeout=int(self.connect_timeout),
            connect_kwargs=kwargs,
        )
        client = conn.client
        client.set_missing_host_key_policy(self._policy)  # replaces fabric's AutoAddPolicy
        keys = client.get_host_keys()
        keys.clear()
        try:
            keys.update(load_known_hosts(self.known_hosts))
        except FileNotFoundError as exc:
            raise HostKeyUnknown(self.target, str(exc)) from None
        return conn

    def _recorded(self) -> str:
        entry = load_known_hosts(self.known_hosts).lookup(self.target.known_hosts_name) or {}
        return ", ".join(f"{t} {fingerprint(k)}" for t, k in entry.items()) or "nothing"

    def open(self) -> Remote:
        """Connect and authenticate; every failure becomes one :class:`RemoteError` naming the host."""
        if self._conn is not None and self._conn.is_connected:
            return self
        conn = self._connection()
        t = self.target
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            conn.close()
            raise HostKeyMismatch(
                t,
                f"host key mismatch: offered {exc.key.get_name()} {fingerprint(exc.key)}, {self.known_hosts} has "
                f"{self._recorded()} for {t.known_hosts_name}; refusing (reinstalled? then "
                f"ssh-keygen -f {self.known_hosts} -R '{t.known_hosts_name}' and verify the new key)",
            ) from None
        except paramiko.AuthenticationException:
            conn.close()
            keys = self.key_filename or "agent and ~/.ssh keys"
            raise AuthFailed(t, f"authentication failed for user {t.user} (keys: {keys})") from None
        except paramiko.SSHException as exc:
            conn.close()
            offered = self._policy.offered
            if offered is not None:
                raise HostKeyUnknown(
                    t,
                    f"host key unknown: {t.known_hosts_name} is not in {self.known_hosts} (offered "
                    f"{offered.get_name()} {fingerprint(offered)}); refusing: verify it and add it to the file",
                ) from None
            raise Unreachable(t, f"unreachable: SSH handshake failed: {exc}") from None
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            conn.close()
            reasons = {(e.strerror or str(e)).lower() for e in exc.errors.values()}
            raise Unreachable(t, f"unreachable: {', '.join(sorted(reasons))}") from None
        except TimeoutError:
            conn.close()
            raise Unreachable(t, f"unreachable: no answer within {self.connect_timeout:g} s") from None
        except OSError as exc:
            conn.close()
            raise Unreachable(t, f"unreachable: {(exc.strerror or str(exc)).lower()}") from None
        self._conn = conn
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Remote:
        return self.open()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def conn(self) -> Connection:
        self.open()
        assert self._conn is not None
        return self._conn

    # -- operations ------------------------------------------------------------------------------------

    def wrap(self, command: str, sudo: bool = False) -> str:
        """The command line as sent: ``sudo -n sh -c ...`` for a non-root user when ``sudo``."""
        if sudo and self.target.user != "root":
            return f"sudo -n sh -c {shlex.quote(command)}"
        return command

    def run(self, command: str, check: bool = True, sudo: bool = False,
            timeout: float = COMMAND_TIMEOUT_S) -> Result:  # fmt: skip
        """Run a shell command; ``check`` turns a non-zero exit into :class:`CommandFailed`."""
        line = self.wrap(command, sudo)
        try:
            r = self.conn.run(line, hide=True, warn=True, timeout=timeout, in_stream=False)
        except CommandTimedOut:
            raise CommandFailed(self.target, f"{command!r} did not finish within {timeout:g} s") from None
        except UnexpectedExit as exc:  # only when warn is off; kept for safety
            r = exc.result
        except (OSError, paramiko.SSHException) as exc:
            self.close()
            raise Unreachable(self.target, f"connection lost running {command!r}: {exc}") from None
        result = Result(self.target, command, r.exited, r.stdout, r.stderr)
        if check and not result.ok:
            raise CommandFailed(self.target, f"{command!r} exited {r.exited}: {result.last_line()}", result)
        return result

    def put(self, data: bytes | str, remote_path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``remote_path`` as the login user (callers stage, then install with sudo)."""
        payload = data.encode() if isinstance(data, str) else data
        try:
            sftp = self.conn.sftp()
            with sftp.open(remote_path, "wb") as f:
                f.write(payload)
            sftp.chmod(remote_path, mode)
        except OSError as exc:
            raise CommandFailed(self.target, f"cannot write {remote_path}: {exc.strerror or exc}") from None
        except paramiko.SSHException as exc:
            raise Unreachable(self.target, f"connection lost writing {remote_path}: {exc}") from None

    def get(self, remote_path: str) -> bytes:
        """Read a file as the login user."""
        buf = io.BytesIO()
        try:
            self.conn.sftp().getfo(remote_path, buf)
        except OSError as exc:
            raise CommandFailed(self.target, f"cannot read {remote_path}: {exc.strerror or exc}") from None
        return buf.getvalue()


__all__ = [
    "AuthFailed",
    "CommandFailed",
    "HostKeyMismatch",
    "HostKeyUnknown",
    "Remote",
    "RemoteError",
    "Result",
    "Target",
    "Unreachable",
    "fingerprint",
    "load_known_hosts",
]
