"""Kamailio adapter: config check, JSON-RPC control and the command line that starts the proxy.

Standard library only: the resource agents import this module on hosts where sipha's virtualenv may not be
on the path.

The rendered ``kamailio.cfg`` (``templates/kamailio.cfg.j2``) fixes the contract used here:

* JSON-RPC (``jsonrpcs``) listens on a UNIX datagram socket, ``<run dir>/kamailio-rpc.sock``; the run dir
  is ``/run/sipha`` unless the command line defines ``SIPHA_RUN_DIR`` (``-A``), which tests do.
* Events go to ``127.0.0.1:<cluster.proxy.event_port>`` as one JSON object per UDP datagram (shape
  documented at the top of the template).

``kamailio -c`` and addresses that are not local: checked on Kamailio 5.6.3, ``kamailio -c`` parses the
file and resolves its listen addresses but binds nothing, so listening on a VIP or on another node's
address is accepted as it is. :func:`check_config` therefore runs it directly, with no network namespace.
What ``-c`` does not see: module ``mod_init`` work (a missing ``/etc/sipha/tls.cfg`` or certificate) and
names inside pseudo-variables (``$dlg(nosuch)``), which only fail when Kamailio really starts.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

RUN_DIR = Path("/run/sipha")
RPC_SOCKET_NAME = "kamailio-rpc.sock"
PID_NAME = "kamailio.pid"
CHECK_TIMEOUT_S = 30

# Lines kamailio -c prints that say what is wrong, most specific first.
_ERROR_LINE = re.compile(r"(CRITICAL|ERROR):")
_NOISE = re.compile(
    r"^\s*\d+\(\d+\)\s+(?:CRITICAL|ERROR|WARNING|INFO|NOTICE|DEBUG):\s*(?:<[^>]*>\s*)?(?:\[[^\]]*\]:\s*)?"
)
_CFG_ERROR = re.compile(
    r"parse error in config file (?P<file>\S+), line (?P<line>\d+), column (?P<col>[\d-]+): (?P<msg>.*)"
)


def decode_reply(what: str, data: bytes) -> dict[str, Any]:
    """One JSON-RPC reply, whatever carried it (datagram socket or FIFO); raises :class:`RpcError`."""
    try:
        reply = json.loads(data)
    except ValueError:
        raise RpcError(f"{what}: unreadable reply {data[:80]!r}") from None
    if not isinstance(reply, dict):
        raise RpcError(f"{what}: unexpected reply {data[:80]!r}")
    return reply


def result_of(method: str, reply: dict[str, Any]) -> Any:
    """The reply's ``result``, or :class:`RpcError` naming the method when Kamailio answered an error."""
    if "error" in reply:
        err = reply["error"]
        detail = f"{err.get('code')} {err.get('message')}" if isinstance(err, dict) else str(err)
        raise RpcError(f"{method}: {detail}")
    return reply.get("result")


class RpcError(RuntimeError):
    """Kamailio answered a JSON-RPC call with an error, or did not answer at all."""


def kamailio_binary() -> str | None:
    return shutil.which("kamailio") or next(
        (p for p in ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio") if os.access(p, os.X_OK)), None
    )


def _one_line(output: str) -> str:
    """The most telling line of kamailio -c output, stripped of its log prefix.

    A parse error names file, line and column, the most useful thing an operator can get; when its text is
    generic ("failed to load module") the ERROR line just before it holds the detail, so both are joined.
    """
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    detail = ""
    for ln in lines:
        m = _CFG_ERROR.search(ln)
        if m:
            msg = m["msg"].strip() or "syntax error"
            where = f"{m['file']}:{m['line']}:{m['col']}"
            return f"{where}: {msg} ({detail})" if detail and detail not in msg else f"{where}: {msg}"
        if _ERROR_LINE.search(ln) and "bad config file" not in ln:
            detail = _NOISE.sub("", ln)
    if detail:
        return detail
    for ln in lines:
        if "bad config file" in ln or "ERROR" in ln:
            return ln
    return lines[-1] if lines else "kamailio -c failed without output"


def check_config(path: Path | str) -> str | None:
    """Run ``kamailio -c -f PATH``: None when Kamailio accepts the file, else one line saying why not."""
    binary = kamailio_binary()
    if binary is None:
        return "kamailio is not installed (no kamailio binary on PATH)"
    path = Path(path)
    if not path.is_file():
        return f"{path}: no such file"
    try:
        proc = subprocess.run(
            [binary, "-c", "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{path}: kamailio -c did not finish within {CHECK_TIMEOUT_S} s"
    out = (proc.stdout or "") + "\n" + (proc.stderr or "")
    if proc.returncode == 0 and "config file ok" in out:
        return None
    return _one_line(out)


def rpc_socket(run_dir: Path | str = RUN_DIR) -> Path:
    return Path(run_dir) / RPC_SOCKET_NAME


class Rpc:
    """A JSON-RPC client on Kamailio's UNIX datagram socket, kept open for many calls.

    Replies need an address to come back to: the client binds a socket file in a private temp dir
    (Kamailio 5.6 cannot answer an abstract-namespace address), removed again by :meth:`close`.
    :meth:`call_many` pipelines: it sends up to ``window`` requests before reading replies, which is how a
    coordinator pushes thousands of ``ul.add`` per second through the single, in-order RPC worker. Keep
    ``window`` below ``net.unix.max_dgram_qlen`` (10 by default): a UNIX datagram sender blocks when the
    receiver's queue is full, and the replies queue up on our side while we send.
    """

    def __init__(self, sock: Path | str | None = None, timeout: float = 2.0) -> None:
        self.target = str(sock or rpc_socket())
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._dir = tempfile.mkdtemp(prefix="sipha-rpc-")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(os.path.join(self._dir, "c.sock"))
            self._sock.settimeout(timeout)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Rpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, params: tuple[Any, ...] | list[Any]) -> int:
        req_id = next(self._ids)
        data = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": req_id})
        try:
            self._sock.sendto(data.encode(), self.target)
        except OSError as exc:
            raise RpcError(f"{method}: cannot reach {self.target}: {exc.strerror or exc}") from None
        return req_id

    def _recv(self, what: str) -> dict[str, Any]:
        try:
            data = self._sock.recv(1 << 20)
        except TimeoutError:
            raise RpcError(f"{what}: no answer from {self.target} within {self.timeout} s") from None
        return decode_reply(what, data)

    def call(self, method: str, *params: Any) -> Any:
        """One call; returns its ``result`` or raises :class:`RpcError`."""
        req_id = self._send(method, params)
        while True:
            reply = self._recv(method)
            if reply.get("id") == req_id:  # a late reply to an earlier, timed-out call is skipped
                return result_of(method, reply)

    def call_many(self, calls: list[tuple[str, list[Any]]], window: int = 8) -> list[Any]:
        """Pipelined calls, results (or the :class:`RpcError` of each failed call) in the order given."""
        results: list[Any] = [None] * len(calls)
        pending: dict[int, int] = {}
        nxt = 0
        while nxt < len(calls) or pending:
            while nxt < len(calls) and len(pending) < window:
                pending[self._send(calls[nxt][0], calls[nxt][1])] = nxt
                nxt += 1
            reply = self._recv(f"{len(pending)} pipelined calls")
            idx = pending.pop(reply.get("id", -1), None)
            if idx is None:
                continue
            try:
                results[idx] = result_of(calls[idx][0], reply)
            except RpcError as exc:
                results[idx] = exc
        return results


def rpc(method: str, *params: Any, sock: Path | str | None = None, timeout: float = 2.0) -> Any:
    """Call one JSON-RPC method over Kamailio's UNIX datagram socket and return its ``result``.

    ``rpc("ul.add", "location", "alice", "sip:alice@198.51.100.50:5060", 3600, 1.0, "0", 0, 0, -1)``
    Raises :class:`RpcError` with Kamailio's message on an error reply or when nothing comes back.
    For many calls keep one :class:`Rpc` open instead.
    """
    with Rpc(sock, timeout) as client:
        return client.call(method, *params)


def kamailio_command(
    cfg_path: Path | str,
    cluster: Any,
    *,
    run_dir: Path | str = RUN_DIR,
    foreground: bool = True,
    binary: str | None = None,
    defines: dict[str, str] | None = None,
) -> list[str]:
    """The command line that starts Kamailio with this node's rendered config.

    Memory comes from the model (``-m`` shm, ``-M`` pkg: command-line options, not cfg settings).
    ``foreground`` (for a supervisor that keeps the process, like a Pacemaker agent or the lab):
    ``-DD`` (the main process does not daemonize but still forks the workers) and ``-E`` (log to stderr).
    Otherwise Kamailio daemonizes. Both write ``<run_dir>/kamailio.pid``. ``run_dir`` must exist.
    ``defines`` set the cfg's string defaults (``SIPHA_TLS_CFG``, ...) with ``-A NAME="value"``.
    """
    run_dir = Path(run_dir)
    cmd = [
        binary or kamailio_binary() or "kamailio",
        "-f", str(cfg_path),
        "-m", str(cluster.proxy.shm_mb),
        "-M", str(cluster.proxy.pkg_mb),
        "-P", str(run_dir / PID_NAME),
    ]  # fmt: skip
    # Kamailio refuses a name defined twice, so the run dir's defaults yield to the caller's defines.
    wanted = {"SIPHA_RUN_DIR": str(run_dir), "SIPHA_RPC_REPLY_DIR": f"{run_dir}/"} if run_dir != RUN_DIR else {}
    for name, value in (wanted | (defines or {})).items():
        cmd += ["-A", f'{name}="{value}"']
    if foreground:
        cmd += ["-DD", "-E"]
    return cmd


__all__ = ["Rpc", "RpcError", "check_config", "kamailio_command", "rpc", "rpc_socket"]
