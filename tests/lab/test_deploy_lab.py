"""Issue 7's acceptance, in the lab: bare hosts provisioned by the site playbook over real SSH.

The lab comes up bare (``sipha lab up --bare``: node1, node2 and the witness run only sshd, keys made by the
lab). From the client namespace (198.51.100.50, where the hosts' lab addresses are reachable) this module runs
``sipha deploy --playbook`` (ansible/site.yml, host keys checked against the lab's known_hosts), runs it again
and requires changed=0 on every host, runs the ``tests/infra`` testinfra suite against the result, moves the VIP
with ``sipha switchover`` over SSH, and checks that ``sipha deploy`` with a wrong key or an unreachable host,
and ``sipha deploy --playbook`` with a failing task, name the host (and task) and change nothing.

This module does NOT use the session ``lab`` fixture (that one is the normal, already-running lab): it brings
up its own bare lab and ALWAYS takes it down (failure, Ctrl-C, SIGTERM, interpreter exit), as conftest.py does
for the session lab. Ordering: conftest.py's ``pytest_collection_modifyitems`` runs this module before every
other lab test, so the session lab (which stays up until the session ends) is never up while this module
wants the machine's one lab; if a lab is up anyway (someone else's, or an ordering plugin), it skips.
The tests depend on each other in file order (provision, then check, then switch over), like test_lab.py.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ha.lab import lab as labmod

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parent.parent.parent
LAB_YAML = REPO / "examples" / "lab.yaml"
HOSTS = ("node1", "node2", "witness")
PLAYBOOK_TIMEOUT_S = 600
_RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unr>\d+)\s+"
                    r"failed=(?P<failed>\d+)", re.M)  # fmt: skip

_ours = {"up": False}


def _teardown() -> None:
    if _ours["up"]:
        labmod.down(echo=lambda _m: None)
        _ours["up"] = False


@pytest.fixture(scope="module")
def bare() -> Iterator[dict[str, Any]]:
    """The bare lab's spec (with ``ssh``: client_key, known_hosts); down at the end of the module, whatever
    happens."""
    from ha.lab.node import LabError

    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if shutil.which("ansible-playbook") is None:
        pytest.skip("ansible-playbook is not installed (apt-get install ansible; make apt does)")
    if labmod.load_spec() is not None:
        pytest.skip("a lab is already up and is not this module's: `sipha lab down` first")
    atexit.register(_teardown)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_teardown(), os._exit(143)))
    _ours["up"] = True  # from here on any partial lab is ours to remove
    try:
        labmod.up(LAB_YAML, echo=lambda m: print(m, flush=True), variant="bare", timeout=30)
    except LabError as exc:
        _teardown()
        (pytest.skip if "missing package" in str(exc) else pytest.fail)(f"lab up --bare: {exc}")
    except BaseException:
        _teardown()
        raise
    try:
        yield labmod.load_spec()
    finally:
        _teardown()
        signal.signal(signal.SIGTERM, previous)


def _in_client(spec: dict[str, Any], argv: list[str], timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run argv in the client namespace (the controller's seat: the hosts' lab addresses are reachable there
    and nowhere else on this machine)."""
    return subprocess.run(["ip", "netns", "exec", labmod.client_ns(spec), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})  # fmt: skip


def _sipha(spec: dict[str, Any], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    ssh = spec["ssh"]
    return _in_client(spec, [sys.executable, "-m", "ha.cli", *args], timeout,
                      env={"SIPHA_KNOWN_HOSTS": ssh["known_hosts"], "SIPHA_SSH_KEY": ssh["client_key"]})


def _playbook(spec: dict[str, Any]) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, int]]]:
    p = _sipha(spec, "deploy", str(LAB_YAML), "--playbook", "--service-manager", "lab",
               "-e", "sipha_install=present", timeout=PLAYBOOK_TIMEOUT_S)  # fmt: skip
    recap = {m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unr", "failed")} for m in _RECAP.finditer(p.stdout)}
    return p, recap


def _tail(p: subprocess.CompletedProcess[str], n: int = 60) -> str:
    return "\n".join((p.stdout + p.stderr).splitlines()[-n:])


def _failure(p: subprocess.CompletedProcess[str]) -> str:
    """What a failed playbook run said that matters (its fatal lines, sipha's one line per failed host and the
    recap), not its last lines: those are the task timing table."""
    keep = [ln[:400] for ln in (p.stdout + p.stderr).splitlines()
            if ln.startswith(("fatal:", "failed:", "deploy failed:")) or _RECAP.match(ln)]  # fmt: skip
    return "\n".join(keep[-30:]) or _tail(p, 30)


def _infra_failures(p: subprocess.CompletedProcess[str]) -> str:
    """The inner pytest's one line per failure (-rfEs), not its tracebacks: a failed deploy fails most of them
    for one cause, and the outer report should still show the failures after this one."""
    lines = (p.stdout + p.stderr).splitlines()
    keep = [ln[:300] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return "\n".join(keep) or "\n".join(lines[-40:])


def _service_logs(spec: dict[str, Any], n: int = 8) -> str:
    """Each host's lab service logs (sipha-service: /run/sipha/NAME.log, private per host), last lines: why a
    daemon exited at once, which the playbook's output only points to."""
    out = []
    for h in HOSTS:
        p = labmod.exec_in(spec, h, ["sh", "-c", f"for f in /run/sipha/*.log; do [ -f \"$f\" ] && echo \"== $f\" "
                                                  f"&& tail -n {n} \"$f\"; done; true"], timeout=20)  # fmt: skip
        out.append(f"--- {h}\n{p.stdout.strip()}{p.stderr.strip()}")
    # A node that lost its daemons between two runs may have been fenced (the lab's fence agent powers it off).
    p = labmod.exec_in(spec, "node1", ["sh", "-c", "stonith_admin --history='*' 2>&1 | tail -n 5"], timeout=20)
    out.append(f"--- fencing history (node1)\n{p.stdout.strip()}")
    return "\n".join(out)


def _host_sh(spec: dict[str, Any], host: str, cmd: str) -> str:
    p = labmod.exec_in(spec, host, ["sh", "-c", cmd], timeout=20)
    assert p.returncode == 0, f"{host}: {cmd}: {p.stderr.strip()}"
    return p.stdout


def _digests(spec: dict[str, Any]) -> dict[str, str]:
    """What the deploy tests must leave alone: each node's installed configs, as sha256."""
    files = "/etc/corosync/corosync.conf /etc/sipha/kamailio.cfg /etc/sipha/cluster.yaml"
    return {n: hashlib.sha256(_host_sh(spec, n, f"cat {files}").encode()).hexdigest() for n in ("node1", "node2")}


# ------------------------------------------------------------------------------------------------ provisioning


def test_first_run_provisions_bare_hosts(bare: dict[str, Any]) -> None:
    for h in HOSTS:  # really bare: nothing of the cluster before the play
        listing = _host_sh(bare, h, "ls -A /etc/corosync /usr/lib/ocf/resource.d/sipha /etc/sipha").split()
        assert sorted(listing) == ["/etc/corosync:", "/etc/sipha:", "/usr/lib/ocf/resource.d/sipha:"], listing
    p, recap = _playbook(bare)
    assert p.returncode == 0, f"first playbook run failed:\n{_failure(p)}\n{_service_logs(bare)}"
    assert set(recap) >= set(HOSTS), f"no PLAY RECAP for every host:\n{_tail(p)}"
    assert all(r["failed"] == 0 and r["unr"] == 0 for r in recap.values()), recap
    assert all(recap[h]["changed"] > 0 for h in HOSTS), f"a first run on bare hosts must change them: {recap}"


def test_second_run_changes_nothing(bare: dict[str, Any]) -> None:
    p, recap = _playbook(bare)
    assert p.returncode == 0, f"second playbook run failed:\n{_failure(p)}\n{_service_logs(bare)}"
    changed = {h: r["changed"] for h, r in recap.items()}
    which = "\n".join(line for line in p.stdout.splitlines() if line.startswith("changed:"))
    assert set(changed) >= set(HOSTS) and not any(changed.values()), f"second run not idempotent: {changed}\n{which}"


def test_testinfra_suite_passes(bare: dict[str, Any], tmp_path: Path) -> None:
    """tests/infra against the provisioned hosts (paramiko, host keys checked by ha.remote): every test runs and
    passes -- fence devices included, which fence_sipha_lab runs against the lab supervisor."""
    r = subprocess.run([sys.executable, "-m", "ha.cli", "render", str(LAB_YAML), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    ssh = bare["ssh"]
    p = _in_client(bare, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "tests/infra"],
                   timeout=300, env={"SIPHA_INVENTORY": str(tmp_path / "r" / "inventory.ini"),
                                     "SIPHA_KNOWN_HOSTS": ssh["known_hosts"], "SIPHA_SSH_KEY": ssh["client_key"]})
    summary = (p.stdout.strip().splitlines() or [""])[-1]
    assert p.returncode == 0, f"tests/infra failed: {summary}\n{_infra_failures(p)}"
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    assert passed >= 20 and not re.search(r"failed|error", summary), summary
    # Only one skip is expected: the witness's ZooKeeper test is not skipped (it is a member), so none at all.
    assert "skipped" not in summary, f"tests/infra skipped checks: {summary}\n{_tail(p, 30)}"


# ------------------------------------------------------------------------------------------------ operations


def test_switchover_over_ssh_moves_the_vip(bare: dict[str, Any]) -> None:
    from labhelp import wait_for

    vip = bare["vips"][0]
    before = wait_for(lambda: labmod.vip_holder(bare, vip) if labmod.vip_holder(bare, vip) in ("node1", "node2")
                      else None, 60, "the VIP on exactly one node")  # fmt: skip
    target = "node2" if before == "node1" else "node1"
    p = _sipha(bare, "switchover", str(LAB_YAML), "--to", target)
    assert p.returncode == 0, f"sipha switchover: {_tail(p)}"
    # Looked at on the hosts themselves: the address is on the target's eth0 and on no other node.
    assert f" {vip}/" in _host_sh(bare, target, "ip -o -4 addr show dev eth0")
    assert f" {vip}/" not in _host_sh(bare, before, "ip -o -4 addr show dev eth0")
    assert labmod.vip_holder(bare, vip) == target
    answered, detail = labmod.sip_options(bare, vip, timeout=1.0)
    assert answered, f"the VIP does not answer SIP OPTIONS on {target} after the switchover: {detail}"
    st = _sipha(bare, "status", str(LAB_YAML), "--remote", "--json")
    assert st.returncode == 0, _tail(st)
    assert list(json.loads(st.stdout)["cluster"]["vips"].values()) == [target], st.stdout

    # Each node's real coordinator, asked over SSH: the target becomes the writer, the other node its standby,
    # both connected to ZooKeeper; and the text form says so in one line per node.
    seen: list[Any] = []

    def settled() -> dict[str, Any] | None:
        p = _sipha(bare, "status", str(LAB_YAML), "--remote", "--json")
        repl = json.loads(p.stdout)["replication"] if p.returncode == 0 else {}
        seen[:] = [repl or _tail(p, 5)]
        good = (set(repl) == {"node1", "node2"} and repl[target].get("active") is True
                and repl[before].get("active") is False
                and all(r.get("zookeeper") == "connected" and r.get("ready") for r in repl.values()))
        return repl if good else None

    try:
        wait_for(settled, 60, f"status --remote to show {target} writing and {before} standby", step=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen}") from None
    text = _sipha(bare, "status", str(LAB_YAML), "--remote")
    assert text.returncode == 0, _tail(text)
    lines = {ln.split()[0]: ln for ln in text.stdout.splitlines()[text.stdout.splitlines().index(
        "replication (each node's coordinator):") + 1:]}
    assert "active (writer)" in lines[target] and "ZooKeeper connected" in lines[target], text.stdout
    assert "standby" in lines[before] and "SHEDDING" not in text.stdout, text.stdout


def _changed_model(tmp_path: Path, **ssh_port: int) -> Path:
    """examples/lab.yaml with one setting changed (so a deploy would rewrite kamailio.cfg), and per-node SSH
    ports overridden."""
    doc = yaml.safe_load(LAB_YAML.read_text())
    doc["proxy"]["rate_limit"]["max_requests"] += 1
    for n in doc["nodes"]:
        if n["name"] in ssh_port:
            n["ssh"] = {"port": ssh_port[n["name"]]}
    out = tmp_path / "cluster.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_deploy_with_wrong_key_names_host_and_changes_nothing(bare: dict[str, Any], tmp_path: Path) -> None:
    before = _digests(bare)
    key = tmp_path / "not-authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    p = _sipha(bare, "deploy", str(_changed_model(tmp_path)), "-i", str(key))
    assert p.returncode != 0
    assert "Error: node1: connect: authentication failed for user root" in p.stderr, p.stderr
    assert "nothing was changed on any host" in p.stderr, p.stderr
    assert _digests(bare) == before


def test_deploy_to_unreachable_host_names_it_and_changes_nothing(bare: dict[str, Any], tmp_path: Path) -> None:
    before = _digests(bare)
    p = _sipha(bare, "deploy", str(_changed_model(tmp_path, node2=2222)))
    assert p.returncode != 0
    assert "Error: node2: connect: unreachable: connection refused" in p.stderr, p.stderr
    assert "nothing was changed on any host" in p.stderr, p.stderr
    assert _digests(bare) == before
    answered, detail = labmod.sip_options(bare, bare["vips"][0], timeout=1.0)
    assert answered, f"the previous config is no longer serving: {detail}"


def test_playbook_failing_task_names_host_and_task(bare: dict[str, Any]) -> None:
    """A task that fails (here: the hosts are told they run systemd, which the play checks before it writes
    anything) is named per host, and the running cluster is left as it was."""
    before = _digests(bare)
    p = _sipha(bare, "deploy", str(LAB_YAML), "--playbook", "--service-manager", "systemd",
               "-e", "sipha_install=present", timeout=PLAYBOOK_TIMEOUT_S)  # fmt: skip
    assert p.returncode != 0
    for h in HOSTS:
        assert f"deploy failed: {h}: task 'common : Match the service manager to the host'" in p.stdout, _tail(p)
    assert _digests(bare) == before
    answered, detail = labmod.sip_options(bare, bare["vips"][0], timeout=1.0)
    assert answered, f"the previous config is no longer serving: {detail}"

