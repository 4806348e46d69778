"""What every sipha OCF agent shares: exit codes, parameters, logging, /proc process checks, meta-data XML.

Kept beside the agents (one copy, never pasted into each agent) and standard-library only: Pacemaker runs an
agent with the system Python and a minimal environment. An installed agent finds this file and the ``ha``
package through the ``SIPHA_HOME`` line ``make install-agents`` writes into it (see the agents' headers).
"""

from __future__ import annotations

import contextlib
import ctypes
import html
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# OCF exit codes (resource-agents ocf-returncodes): Pacemaker's whole view of an agent.
OCF_SUCCESS = 0
OCF_ERR_GENERIC = 1
OCF_ERR_ARGS = 2
OCF_ERR_UNIMPLEMENTED = 3
OCF_ERR_PERM = 4
OCF_ERR_INSTALLED = 5
OCF_ERR_CONFIGURED = 6
OCF_NOT_RUNNING = 7


def escape(text: str) -> str:
    """XML text escaping (html.escape; xml.sax.saxutils would pull in urllib, ~35 ms on every monitor)."""
    return html.escape(text, quote=False)


def quoteattr(text: str) -> str:
    return f'"{html.escape(text, quote=True)}"'


class AgentError(Exception):
    """An action cannot go on; ``rc`` is the OCF code to exit with, the text the one-line reason logged."""

    def __init__(self, rc: int, message: str) -> None:
        super().__init__(message)
        self.rc = rc


@dataclass(frozen=True)
class Param:
    """One OCF parameter, as the meta-data advertises it and the agent reads it."""

    name: str
    shortdesc: str
    longdesc: str
    type: str = "string"  # ra-api-1.dtd: string | integer | boolean | time
    default: str = ""
    required: bool = False
    unique: bool = False


@dataclass(frozen=True)
class Action:
    name: str
    timeout: str
    interval: str | None = None
    depth: str | None = None


def metadata(name: str, version: str, shortdesc: str, longdesc: str, params: Iterable[Param],
             actions: Iterable[Action]) -> str:
    """Meta-data XML valid against ra-api-1.dtd (ocf-tester runs ``xmllint --valid`` on it)."""
    out = [
        '<?xml version="1.0"?>',
        '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">',
        f"<resource-agent name={quoteattr(name)} version={quoteattr(version)}>",
        "<version>1.0</version>",
        f'<longdesc lang="en">{escape(longdesc)}</longdesc>',
        f'<shortdesc lang="en">{escape(shortdesc)}</shortdesc>',
        "<parameters>",
    ]
    for p in params:
        default = f" default={quoteattr(p.default)}" if p.default != "" else ""
        out += [
            f'<parameter name={quoteattr(p.name)} required="{int(p.required)}" unique="{int(p.unique)}">',
            f'<longdesc lang="en">{escape(p.longdesc)}</longdesc>',
            f'<shortdesc lang="en">{escape(p.shortdesc)}</shortdesc>',
            f'<content type="{p.type}"{default}/>',
            "</parameter>",
        ]
    out.append("</parameters>")
    out.append("<actions>")
    for a in actions:
        extra = "".join(
            f" {k}={quoteattr(v)}" for k, v in (("interval", a.interval), ("depth", a.depth)) if v is not None
        )
        out.append(f'<action name="{a.name}" timeout="{a.timeout}"{extra}/>')
    out.append("</actions>")
    out.append("</resource-agent>")
    return "\n".join(out) + "\n"


class Logger:
    """ocf_log in spirit: ``agent(instance)[pid]: LEVEL: text`` on stderr (Pacemaker keeps an action's stderr
    in its log) and appended to ``HA_LOGFILE`` when set. DEBUG only with ``HA_debug=1``."""

    def __init__(self, agent: str) -> None:
        self.prefix = f"{agent}({os.environ.get('OCF_RESOURCE_INSTANCE', 'default')})[{os.getpid()}]"
        self.debug_on = os.environ.get("HA_debug", "0") not in ("", "0", "false", "no")  # noqa: SIM112 - OCF spelling

    def __call__(self, level: str, message: str) -> None:
        level = level.upper()
        if level == "DEBUG" and not self.debug_on:
            return
        line = f"{self.prefix}: {level}: {message}"
        with contextlib.suppress(OSError):
            print(line, file=sys.stderr, flush=True)
        logfile = os.environ.get("HA_LOGFILE")
        if logfile:
            with contextlib.suppress(OSError), open(logfile, "a") as f:
                f.write(f"{time.strftime('%b %d %H:%M:%S')} {line}\n")


def env_param(name: str, default: str = "") -> str:
    """``OCF_RESKEY_<name>``, the default when unset or empty (Pacemaker passes only what the CIB sets)."""
    value = os.environ.get(f"OCF_RESKEY_{name}", "")
    return value if value != "" else default


def meta_timeout_s(default: float = 20.0) -> float:
    """This action's timeout as Pacemaker set it (``OCF_RESKEY_CRM_meta_timeout``, ms)."""
    raw = os.environ.get("OCF_RESKEY_CRM_meta_timeout", "")  # noqa: SIM112 - Pacemaker spelling
    return int(raw) / 1000 if raw.isdigit() and int(raw) > 0 else default


def is_probe(action: str) -> bool:
    """A probe is a monitor with interval 0: Pacemaker asks "is it running here?" before acting."""
    interval = os.environ.get("OCF_RESKEY_CRM_meta_interval", "0")  # noqa: SIM112 - Pacemaker spelling
    return action == "monitor" and interval in ("", "0")


def int_param(name: str, default: str, lo: int, hi: int) -> int:
    raw = env_param(name, default)
    if not raw.lstrip("-").isdigit() or not lo <= int(raw) <= hi:
        raise AgentError(OCF_ERR_CONFIGURED, f"parameter {name}={raw!r}: expected an integer {lo}-{hi}")
    return int(raw)


# ----------------------------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a pid from /proc/<pid>/stat, None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) S ppid pgrp ...": comm may hold spaces or parens, so split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running or hung, not gone: a zombie counts as gone (on a host whose PID 1 never reaps, they linger)."""
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def stopped(pid: int) -> bool:
    """SIGSTOPped or traced: the process exists but will never answer; a monitor calls that a failure."""
    st = proc_stat(pid)
    return st is not None and st[0] in ("T", "t")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def read_pidfile(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Live processes of one process group: a daemon's children that must go with it on stop."""
    out = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st and st[2] == pgid and st[0] not in ("Z", "X", "x"):
            out.append(pid)
    return out


def wait_until(predicate: Callable[[], bool], deadline: float, step: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``deadline`` (monotonic) passes; never sleeps past the deadline."""
    while True:
        if predicate():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(step, deadline - now))


def kill_quiet(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def terminate(main_pid: int, members: Callable[[], list[int]], grace_s: float, deadline: float, log: Logger) -> bool:
    """SIGTERM to the main pid and SIGCONT to every member (a stopped process cannot act on SIGTERM, and a
    stopped worker keeps its parent waiting), wait ``grace_s``, then SIGKILL every member; True when all are
    gone by ``deadline``. ``members`` lists the live processes belonging to the service (main included)."""

    def gone() -> bool:
        return not alive(main_pid) and not members()

    kill_quiet(main_pid, signal.SIGTERM)
    for pid in members():
        kill_quiet(pid, signal.SIGCONT)
    if wait_until(gone, min(deadline, time.monotonic() + grace_s)):
        return True
    log("WARNING", f"pid {main_pid} still there {grace_s:.1f} s after SIGTERM: SIGKILL")
    for _ in range(50):  # bounded: a fork bomb must not keep stop busy forever
        pids = members()
        if not pids:
            break
        for pid in pids:
            kill_quiet(pid, signal.SIGKILL)
        if wait_until(gone, min(deadline, time.monotonic() + 0.1)):
            return True
    return wait_until(gone, deadline)


def become_subreaper() -> None:
    """Adopt a daemon's intermediate fork so it is reaped here instead of lingering as a zombie under a PID 1
    that never reaps (this machine's PID 1 is not an init)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def local_address(ip: str) -> bool:
    """Whether ``ip`` is configured on this host: a bind to it (port 0, closed at once) succeeds."""
    import socket

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def nonlocal_bind_enabled(ip: str) -> bool:
    key = "ipv6/ip_nonlocal_bind" if ":" in ip else "ipv4/ip_nonlocal_bind"
    try:
        return Path(f"/proc/sys/net/{key}").read_text().strip() == "1"
    except OSError:
        return False


def dispatch(agent: str, actions: dict[str, Callable[[str], int]], usage: str) -> int:
    """Run one action by name (argv[1]); AgentError becomes its rc with a one-line log, anything else
    unexpected becomes OCF_ERR_GENERIC with the reason (never a Python traceback as the only clue)."""
    log = Logger(agent)
    if len(sys.argv) != 2:
        print(usage, file=sys.stderr)
        return OCF_ERR_ARGS
    action = sys.argv[1]
    if action in ("usage", "help"):
        print(usage)
        return OCF_SUCCESS
    fn = actions.get(action)
    if fn is None:
        log("ERROR", f"action {action!r} is not implemented")
        return OCF_ERR_UNIMPLEMENTED
    try:
        return fn(action)
    except AgentError as exc:
        log("ERROR" if exc.rc not in (OCF_SUCCESS, OCF_NOT_RUNNING) else "INFO", f"{action}: {exc}")
        return exc.rc
    except Exception as exc:
        log("ERROR", f"{action}: unexpected {type(exc).__name__}: {exc}")
        return OCF_ERR_GENERIC
