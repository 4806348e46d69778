"""Check a rendered cluster with the real tools before anything reaches a host.

A template that renders is not yet a configuration the daemons accept: only ``crm_verify``, ``corosync -t``
and ``kamailio -c`` know. Every check returns a :class:`Result` instead of raising, so one report lists every
problem, and a missing tool is a failed check that names the Debian package to install (never a silent pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ha import render
from ha.model import Cluster

TIMEOUT_S = 60
NETNS_PREFIX = "sipha-v-"
_PACKAGES = {
    "crm_verify": "pacemaker-cli-utils",
    "corosync": "corosync",
    "corosync-keygen": "corosync",
    "ip": "iproute2",
    "unshare": "util-linux",
    "kamailio": "kamailio",
}
_OPENSIPS = "not checkable here: opensips is not packaged in Debian 12"

# Inside a fresh network namespace (holding one node's address) and a private mount namespace: tmpfs over
# /etc/corosync for a throwaway authkey (the config's crypto needs one; the host's is never read or made) and
# over the log directory, so `corosync -t` writes its verdict there, not into the host's corosync.log.
_COROSYNC_SCRIPT = """\
set -e
mount -t tmpfs -o mode=0755 sipha-v /etc/corosync
if [ -d "$(dirname "$2")" ]; then mount -t tmpfs -o mode=0755 sipha-v "$(dirname "$2")"; fi
corosync-keygen -k /etc/corosync/authkey >/dev/null 2>&1
rc=0
corosync -t -c "$1" || rc=$?
cat "$2" 2>/dev/null || true
exit $rc
"""


@dataclass(frozen=True)
class Result:
    """One check: what was checked (file and node), whether it passed, and the tool's one-line verdict."""

    what: str
    ok: bool
    detail: str


def _missing(*tools: str) -> str | None:
    """The first tool not on PATH, as the advice an operator can act on."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not found: install package {_PACKAGES.get(tool, tool)}"
    return None


def _one_line(text: str, limit: int = 600) -> str:
    line = "; ".join(s.strip() for s in text.splitlines() if s.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_cib(path: Path) -> Result:
    """``crm_verify --xml-file``: schema, ids, constraints, and a scheduler run over the CIB offline.

    Our own agents (ocf:sipha:*, fence_sipha_lab) need not be installed: crm_verify 2.1.5 does not read agent
    metadata. It does print "lack of quorum" for a CIB with no status; that is a warning with exit 0.
    """
    what = f"{path.name}: crm_verify"
    if err := _missing("crm_verify"):
        return Result(what, False, err)
    try:
        proc = subprocess.run(
            ["crm_verify", "--xml-file", str(path)], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return Result(what, False, f"crm_verify did not finish in {TIMEOUT_S} s")
    if proc.returncode == 0:
        return Result(what, True, "accepted")
    noise = ("Errors found during check", "Warnings found during check", "-V may provide more details")
    lines = [s for s in (proc.stderr + proc.stdout).splitlines() if s.strip() and not any(n in s for n in noise)]
    lines = list(dict.fromkeys(lines))  # libxml2 reports some errors twice
    return Result(what, False, f"exit {proc.returncode}: " + _one_line("\n".join(lines) or proc.stderr))


def _corosync_value(text: str, key: str) -> list[str]:
    return re.findall(rf"^\s*{key}\s*:\s*(\S+)\s*$", text, flags=re.MULTILINE)


@contextlib.contextmanager
def _netns(address: str) -> Iterator[str]:
    """A throwaway network namespace holding ``address``; removed on every way out, failure included."""
    name = NETNS_PREFIX + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=TIMEOUT_S)
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{address}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, capture_output=True, timeout=TIMEOUT_S)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=TIMEOUT_S)


def _corosync_messages(output: str) -> str:
    """corosync's log lines without timestamp and pid, errors and warnings only."""
    kept = []
    for line in output.splitlines():
        if not re.search(r"\b(error|warning|Error)\b", line) or "Cluster Engine exiting" in line:
            continue
        kept.append(re.sub(r"^.*\[[A-Z]+\s*\]\s*", "", line))
    return _one_line("\n".join(kept) or output)


def check_corosync(path: Path, address: str | None = None) -> Result:
    """``corosync -t -c`` as the node that owns ``address`` (default: the file's first ring0_addr).

    corosync 3.1.7 accepts ``-c`` with ``-t``, but ``-t`` refuses a file whose nodelist has no address of this
    machine ("No valid name found for local host"), needs the authkey that crypto names, and logs its verdict
    only where the file's logging section says. So the check runs in a throwaway network namespace
    (``sipha-v-*``) that holds the node's address, with a private mount namespace for the key and the log.
    """
    path = Path(path).absolute()
    text = path.read_text()
    if address is None:
        addrs = _corosync_value(text, "ring0_addr")
        if not addrs:
            return Result(f"{path.name}: corosync -t", False, "no nodelist ring0_addr to check the file as")
        address = addrs[0]
    what = f"{path.name} as {address}: corosync -t"
    if err := _missing("corosync", "corosync-keygen", "ip", "unshare"):
        return Result(what, False, err)
    if os.geteuid() != 0:
        return Result(what, False, "needs root: the check runs in a throwaway network namespace")
    logfile = (_corosync_value(text, "logfile") or ["/var/log/corosync/corosync.log"])[-1]
    try:
        with _netns(address) as ns:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", _COROSYNC_SCRIPT, "sh", str(path), logfile],
                capture_output=True, text=True, timeout=TIMEOUT_S,
            )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        return Result(what, False, f"cannot set up the check namespace: {_one_line(exc.stderr.decode())}")
    except subprocess.TimeoutExpired:
        return Result(what, False, f"corosync -t did not finish in {TIMEOUT_S} s")
    output = proc.stderr + proc.stdout
    if proc.returncode == 0:
        return Result(what, True, "accepted")
    return Result(what, False, f"exit {proc.returncode}: {_corosync_messages(output)}")


def check_proxy(cluster: Cluster, path: Path, node: str) -> Result:
    """The proxy's own parser on one node's config; the proxy adapter owns how that parser is run."""
    kind = cluster.proxy.kind
    what = f"{node}/{path.name}: {kind} -c"
    if kind == "opensips":
        return Result(what, True, _OPENSIPS)
    try:
        from ha.proxy.kamailio import check_config
    except ImportError as exc:
        return Result(what, False, f"checker ha.proxy.kamailio.check_config is missing ({exc})")
    try:
        error = check_config(path)
    except FileNotFoundError:
        return Result(what, False, _missing("kamailio") or "kamailio could not be run")
    except Exception as exc:  # a crashing checker is a failed check in the report, not a lost report
        return Result(what, False, f"checker failed: {type(exc).__name__}: {exc}")
    return Result(what, error is None, error or "accepted")


def run_all(cluster: Cluster) -> list[Result]:
    """Render into a temp dir and run every check; the temp dir is gone afterwards whatever happened."""
    tmp = Path(tempfile.mkdtemp(prefix="sipha-validate-"))
    try:
        out = tmp / "render"
        try:
            render.write(cluster, out)
        except Exception as exc:  # a template bug must show up as a failed check, like any other
            return [Result("render", False, f"{type(exc).__name__}: {exc}")]
        results = [check_cib(out / "cib.xml")]
        for node in cluster.nodes:
            r = check_corosync(out / "corosync.conf", node.ip)
            results.append(dataclasses.replace(r, what=f"corosync.conf as {node.name}: corosync -t"))
        for node in cluster.nodes:
            results.append(check_proxy(cluster, out / node.name / f"{cluster.proxy.kind}.cfg", node.name))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["Result", "check_cib", "check_corosync", "check_proxy", "run_all"]
