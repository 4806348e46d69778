"""``sipha deploy``: push a fresh render to the cluster's hosts over SSH, apply it, roll back on failure.

Why it is separate from the Ansible playbook: the playbook provisions a host (packages, users, units, agents)
and is the tool for first installs; ``deploy`` is the everyday path for a changed ``cluster.yaml`` -- a timing,
a VIP, a proxy setting -- and must be safe to run against a cluster carrying calls. So it works in phases, and
nothing running is touched until every host has accepted its files:

1. on every host: connect (host key verified, :mod:`ha.remote`), back up the files it is about to replace into
   ``/var/lib/sipha/backup/<id>/``, upload the new ones to a private staging directory, and check them with the
   daemons' own validators (``corosync -t``, ``kamailio -c``, ``crm_verify``). A failure here changes nothing.
2. on every host: install the changed files (atomically: write beside, then rename).
3. once, on the first node: activate -- ``corosync-cfgtool -R`` when corosync.conf changed, and the CIB through
   ``cib-compare`` + ``cibadmin --replace --scope configuration`` when the live configuration differs.

A failure in phase 2 or 3 restores every host's backed-up files and the saved CIB configuration, and the error
names the host and the task: ``node2: install: '/etc/sipha/kamailio.cfg' ...; rolled back node1, node2``.
Services whose config cannot be reloaded live (ZooKeeper) are reported, not restarted: a rolling restart is an
operator's decision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ha import render, unixline
from ha.model import Cluster, Node, Witness
from ha.remote import CommandFailed, Remote, RemoteError, Target

BACKUP_ROOT = "/var/lib/sipha/backup"
CIB_COMPARE = "/usr/local/lib/sipha/cib-compare"
KEEP_BACKUPS = 10


@dataclass(frozen=True)
class Install:
    """One file for one host: ``source`` is a render path (or ``cluster.yaml``), ``dest`` where it goes."""

    source: str
    dest: str
    mode: int = 0o644
    group: str = "root"
    check: str | None = None  # a validator, ``{file}`` replaced by the staged copy; exit 0 = accepted
    after: str | None = None  # what an operator must do when it changed (no live reload exists)


@dataclass(frozen=True)
class Activation:
    """A cluster-wide step after every host installed: ``command`` applies, ``undo`` reverts (both on ``host``).

    ``when`` names a file source: the step runs only if that file changed on some host (None: always).
    ``{backup}`` in either command is the host's backup directory of this deploy.
    """

    name: str
    host: str
    command: str
    undo: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class HostPlan:
    target: Target
    installs: tuple[Install, ...]
    backup_root: str = BACKUP_ROOT


@dataclass(frozen=True)
class Plan:
    hosts: tuple[HostPlan, ...]
    activations: tuple[Activation, ...] = ()


class DeployError(RuntimeError):
    """One line: the host, the task, the cause, and what was rolled back."""

    def __init__(self, host: str, task: str, cause: str, rolled_back: Sequence[str] = (),
                 rollback_errors: Sequence[str] = ()) -> None:  # fmt: skip
        self.host, self.task, self.cause = host, task, cause
        self.rolled_back, self.rollback_errors = tuple(rolled_back), tuple(rollback_errors)
        msg = f"{host}: {task}: {cause}"
        if rolled_back:
            msg += f"; rolled back {', '.join(rolled_back)}: previous config restored"
        elif task.split()[0] in ("connect", "backup", "upload", "check", "plan"):
            msg += "; nothing was changed on any host"
        if rollback_errors:
            msg += f"; ROLLBACK INCOMPLETE: {'; '.join(rollback_errors)}"
        super().__init__(msg)


@dataclass
class Report:
    """What a deploy did, for the CLI to print."""

    deploy_id: str
    changed: dict[str, list[str]] = field(default_factory=dict)  # host -> changed destinations
    activated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not any(self.changed.values()) and not self.activated


class Progress(Protocol):
    def __call__(self, host: str, task: str, state: str, detail: str = "") -> None: ...


def _quiet(host: str, task: str, state: str, detail: str = "") -> None:
    """The default progress sink: say nothing."""


def _prefixed(prefix: str, path: str) -> str:
    return f"{prefix.rstrip('/')}{path}" if prefix else path


def plan(cluster: Cluster, prefix: str = "") -> Plan:
    """Which files each host gets, how each is checked, and what activates them -- the same places the
    playbook writes (ansible/roles), so ``deploy`` and Ansible never disagree about where a file lives.
    ``prefix`` (tests) puts every destination under a directory (``{host}`` in it is the host's name) and leaves
    out the validators and activations, which act on the real system."""
    kind = cluster.proxy.kind
    zk_names = {h.name for h in cluster.zk_members}
    first = cluster.nodes[0].name
    real = not prefix
    hosts: list[HostPlan] = []
    for h in cluster.hosts:
        items: list[Install] = []
        if isinstance(h, Node):
            items += [
                Install("corosync.conf", "/etc/corosync/corosync.conf",
                        check="corosync -t -c {file}" if real else None),
                Install(f"{h.name}/{kind}.cfg", f"/etc/sipha/{kind}.cfg",
                        check=f"{kind} -c -f {{file}}" if real else None,
                        after=f"{kind} reads it at its next start: Pacemaker restarts it on a switchover"),
                Install("cluster.yaml", "/etc/sipha/cluster.yaml", mode=0o640, group="sipha",
                        after="the health service reads it at start: restart sipha-health"),
            ]  # fmt: skip
        if h.name == first:  # where the CIB is loaded from, as the playbook does (roles/cluster/tasks/cib.yml)
            items.append(Install("cib.xml", "/etc/sipha/cib.xml", mode=0o640,
                                 check="crm_verify --xml-file {file}" if real else None))  # fmt: skip
        if h.name in zk_names:
            zk_after = "restart ZooKeeper member by member (sipha-zookeeper), checking `srvr` between"
            items += [
                Install("zoo.cfg", "/etc/sipha/zoo.cfg", mode=0o640, group="zookeeper", after=zk_after),
                Install(f"{h.name}/zookeeper-myid", f"{cluster.zookeeper.data_dir}/myid", group="zookeeper",
                        after=zk_after),
            ]
        pre = prefix.replace("{host}", h.name)
        items = [Install(i.source, _prefixed(pre, i.dest), i.mode, i.group, i.check, i.after) for i in items]
        hosts.append(HostPlan(Target.of(h), tuple(items), _prefixed(pre, BACKUP_ROOT)))
    activations: tuple[Activation, ...] = ()
    if real:
        activations = (
            Activation("reload corosync", first,
                       "if corosync-cfgtool -s >/dev/null 2>&1; then corosync-cfgtool -R; fi",
                       undo="if corosync-cfgtool -s >/dev/null 2>&1; then corosync-cfgtool -R; fi",
                       when="corosync.conf"),
            Activation("load CIB", first,
                       f"test -x {CIB_COMPARE} || {{ echo '{CIB_COMPARE} missing: run the site playbook first' >&2;"
                       " exit 1; }; cibadmin --query --scope configuration > {backup}/cib-configuration.xml"
                       f" && {{ {CIB_COMPARE} /etc/sipha/cib.xml /var/lib/sipha/cib-configuration.xml; rc=$?;"
                       " if [ $rc = 3 ]; then cibadmin --replace --scope configuration"
                       " --xml-file /var/lib/sipha/cib-configuration.xml; elif [ $rc != 0 ]; then exit $rc; fi; }",
                       # No saved configuration: the step failed before it touched the CIB, nothing to undo.
                       undo="if [ -s {backup}/cib-configuration.xml ]; then cibadmin --replace --scope configuration"
                       " --xml-file {backup}/cib-configuration.xml; fi"),
        )  # fmt: skip
    return Plan(tuple(hosts), activations)


@dataclass
class _HostState:
    plan: HostPlan
    remote: Remote
    backup: str = ""
    staging: str = ""
    changed: list[int] = field(default_factory=list)  # indexes into plan.installs
    installed: bool = False


def _sh(*parts: str) -> str:
    return " && ".join(parts)


class Deployer:
    """Runs a :class:`Plan` (see the module docstring for the phases and the rollback)."""

    def __init__(self, files: dict[str, str], plan_: Plan, known_hosts: str | Path,
                 key_filename: str | Path | None = None, progress: Progress = _quiet,
                 connect: Callable[[Target], Remote] | None = None) -> None:  # fmt: skip
        self.files, self.plan = files, plan_
        self.progress = progress
        digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:8]
        self.deploy_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{digest}"
        self._connect = connect or (lambda t: Remote(t, known_hosts, key_filename))
        self.report = Report(self.deploy_id)

    # -- one task on one host, reported -----------------------------------------------------------------

    def _task(self, host: str, task: str, fn: Callable[[], Any]) -> Any:
        self.progress(host, task, "start")
        t0 = time.monotonic()
        try:
            out = fn()
        except RemoteError as exc:
            cause = exc.short if isinstance(exc, CommandFailed) and exc.short else exc.message
            self.progress(host, task, "failed", cause)
            raise _Failed(host, task, cause) from None
        self.progress(host, task, "ok", f"{time.monotonic() - t0:.1f} s")
        return out

    # -- phases -------------------------------------------------------------------------------------------

    def _prepare(self, s: _HostState) -> None:
        r, items = s.remote, s.plan.installs
        name = s.plan.target.name
        self._task(name, "connect", r.open)
        root = s.plan.backup_root
        s.backup = f"{root}/{self.deploy_id}"
        saves = [f"mkdir -p -m 0700 {s.backup}"]
        for i, it in enumerate(items):
            d, b = shlex.quote(it.dest), shlex.quote(f"{s.backup}/{i}")
            saves.append(f"if [ -e {d} ]; then cp -a {d} {b}; else : > {b}.absent; fi")
        keep = f"ls -1d {root}/*/ | head -n -{KEEP_BACKUPS} | xargs -r rm -rf"
        self._task(name, "backup", lambda: r.run(_sh(*saves, keep), sudo=True))

        def upload() -> None:
            s.staging = r.run("mktemp -d /tmp/sipha-deploy.XXXXXX").stdout.strip()
            for i, it in enumerate(items):
                r.put(self.files[it.source], f"{s.staging}/{i}", 0o600)
            # One round trip for every comparison: print the index of each file that differs.
            cmps = [f"cmp -s {s.staging}/{i} {shlex.quote(it.dest)} || echo {i}" for i, it in enumerate(items)]
            out = r.run("; ".join(cmps), sudo=True).stdout
            s.changed.extend(int(x) for x in out.split())

        self._task(name, "upload", upload)
        for i in s.changed:
            it = items[i]
            if it.check:
                cmd = it.check.format(file=f"{s.staging}/{i}")
                self._task(name, f"check {Path(it.dest).name}", lambda cmd=cmd: r.run(cmd, sudo=True))

    def _install(self, s: _HostState) -> None:
        r, items = s.remote, s.plan.installs
        if not s.changed:
            return
        steps = []
        for i in s.changed:
            it = items[i]
            d = shlex.quote(it.dest)
            new = shlex.quote(it.dest + ".sipha-new")
            group = f"$(getent group {it.group} >/dev/null && echo {it.group} || echo root)"
            steps.append(_sh(f"install -D -o root -g {group} -m {it.mode:o} {s.staging}/{i} {new}",
                             f"mv -f {new} {d}"))  # fmt: skip
        s.installed = True  # from here a failure must restore this host
        self._task(s.plan.target.name, "install", lambda: r.run(_sh(*steps), sudo=True))

    def _restore(self, s: _HostState) -> None:
        r, items = s.remote, s.plan.installs
        steps = []
        for i in s.changed:
            d, b = shlex.quote(items[i].dest), shlex.quote(f"{s.backup}/{i}")
            steps.append(f"if [ -e {b}.absent ]; then rm -f {d}; else cp -a {b} {d}; fi")
        r.run("; ".join(steps), sudo=True)

    def _cleanup(self, states: Sequence[_HostState]) -> None:
        for s in states:
            if s.staging:
                with contextlib.suppress(RemoteError):
                    s.remote.run(f"rm -rf {shlex.quote(s.staging)}", check=False)
            s.remote.close()

    # -- the whole run ------------------------------------------------------------------------------------

    def run(self) -> Report:
        states = [_HostState(hp, self._connect(hp.target)) for hp in self.plan.hosts]
        by_name = {s.plan.target.name: s for s in states}
        done: list[Activation] = []
        try:
            try:
                for s in states:
                    self._prepare(s)
                for s in states:
                    self._install(s)
                changed_sources = {s.plan.installs[i].source for s in states for i in s.changed}
                for a in self.plan.activations:
                    if a.when is not None and a.when not in changed_sources:
                        continue
                    s = by_name[a.host]
                    cmd = a.command.replace("{backup}", s.backup)
                    done.append(a)
                    res = self._task(a.host, a.name, lambda s=s, cmd=cmd: s.remote.run(cmd, sudo=True))
                    said = res.stdout.strip().splitlines()[-1:] if res is not None else []
                    self.report.activated.append(f"{a.host}: {a.name}" + (f" ({said[0]})" if said else ""))
            except _Failed as f:
                raise self._rollback(states, by_name, done, f) from None
            for s in states:
                self.report.changed[s.plan.target.name] = [s.plan.installs[i].dest for i in s.changed]
                for i in s.changed:
                    after = s.plan.installs[i].after
                    note = f"{s.plan.target.name}: {s.plan.installs[i].dest} changed: {after}" if after else ""
                    if note and note not in self.report.notes:
                        self.report.notes.append(note)
            return self.report
        finally:
            self._cleanup(states)

    def _rollback(self, states: Sequence[_HostState], by_name: dict[str, _HostState], done: list[Activation],
                  f: _Failed) -> DeployError:  # fmt: skip
        rolled, errors = [], []
        for s in states:
            if not s.installed:
                continue
            name = s.plan.target.name
            self.progress(name, "rollback", "start")
            try:
                self._restore(s)
                rolled.append(name)
                self.progress(name, "rollback", "ok")
            except RemoteError as exc:
                errors.append(exc.message if exc.target.name == name else str(exc))
                self.progress(name, "rollback", "failed", exc.message)
        for a in reversed(done):
            if not a.undo:
                continue
            s = by_name[a.host]
            try:
                self.progress(a.host, f"undo {a.name}", "start")
                s.remote.run(a.undo.replace("{backup}", s.backup), sudo=True)
                self.progress(a.host, f"undo {a.name}", "ok")
            except RemoteError as exc:
                errors.append(f"{a.host}: undo {a.name}: {exc.message}")
                self.progress(a.host, f"undo {a.name}", "failed", exc.message)
        return DeployError(f.host, f.task, f.cause, rolled, errors)


class _Failed(Exception):
    def __init__(self, host: str, task: str, cause: str) -> None:
        super().__init__(f"{host}: {task}: {cause}")
        self.host, self.task, self.cause = host, task, cause


def rendered_files(cluster: Cluster, cluster_yaml_text: str) -> dict[str, str]:
    """The render in memory (``ha.render``), plus the model itself for the services that read it."""
    files = {o.path: o.text for o in render.render_files(cluster)}
    files["cluster.yaml"] = cluster_yaml_text
    return files


def deploy(cluster: Cluster, cluster_yaml_text: str, known_hosts: str | Path,
           key_filename: str | Path | None = None, progress: Progress = _quiet, prefix: str = "",
           only: Sequence[str] = ()) -> Report:  # fmt: skip
    """Render, push, check, install and activate (see the module docstring). ``only`` limits to named hosts;
    the activations still run on the first node when it is among them."""
    p = plan(cluster, prefix)
    if only:
        unknown = set(only) - {h.target.name for h in p.hosts}
        if unknown:
            raise DeployError(", ".join(sorted(unknown)), "plan", "not a host of the cluster")
        hosts = tuple(h for h in p.hosts if h.target.name in only)
        p = Plan(hosts, tuple(a for a in p.activations if a.host in only))
    return Deployer(rendered_files(cluster, cluster_yaml_text), p, known_hosts, key_filename, progress).run()


# -------------------------------------------------------------------------------------------------- playbook

ANSIBLE_DIR = Path(__file__).resolve().parent.parent / "ansible"
_TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?P<task>.*)\] \**$")
_FATAL = re.compile(r"^(?:fatal|failed): \[(?P<host>[^\]]+)\]")
_UNREACHABLE = re.compile(r"^fatal: \[(?P<host>[^\]]+)\]: UNREACHABLE!")


def playbook_command(render_dir: Path, cluster_yaml: Path, known_hosts: str | Path, identity: str | Path | None,
                     service_manager: str = "systemd", only: Sequence[str] = (),
                     extra_vars: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The ansible-playbook command line for ansible/site.yml on a render, with host keys checked against
    ``known_hosts`` (StrictHostKeyChecking=yes: an unknown or changed key fails the host)."""
    ssh_args = f"-o UserKnownHostsFile={Path(known_hosts).expanduser()} -o StrictHostKeyChecking=yes"
    cmd = ["ansible-playbook", "-i", str(render_dir / "inventory.ini"), str(ANSIBLE_DIR / "site.yml"),
           "-e", f"sipha_render_dir={render_dir}", "-e", f"sipha_cluster_yaml={cluster_yaml.resolve()}",
           "-e", f"sipha_service_manager={service_manager}", "--ssh-common-args", ssh_args]  # fmt: skip
    if identity:
        # Only this key: an agent's or ~/.ssh's other keys would count against sshd's MaxAuthTries (3 once the
        # common role's hardening is in place) before this one is offered.
        cmd[cmd.index(ssh_args)] = ssh_args + " -o IdentitiesOnly=yes"
        cmd += ["--private-key", str(Path(identity).expanduser())]
    if only:
        cmd += ["--limit", ",".join(only)]
    for ev in extra_vars:
        cmd += ["-e", ev]
    return cmd


def failed_tasks(lines: Sequence[str]) -> list[tuple[str, str, str]]:
    """(host, task, cause) for every failed or unreachable host in ansible-playbook's output, in order. The cause
    is the last line of the task's stderr, else its msg: what the operator reads first (a service that exited
    at once names its log), not the task's name alone."""
    task, out = "", []
    for line in lines:
        if m := _TASK.match(line):
            task = m["task"]
        elif m := _UNREACHABLE.match(line):
            out.append((m["host"], f"{task} (unreachable)", _cause(line)))
        elif m := _FATAL.match(line):
            out.append((m["host"], task, _cause(line)))
    return out


def _cause(line: str) -> str:
    """The cause in a ``fatal: [host]: FAILED! => {json}`` line ('' when it has none or is not JSON)."""
    try:
        result = json.loads(line.split(" => ", 1)[1])
    except (IndexError, ValueError):
        return ""
    if not isinstance(result, dict):
        return ""
    for key in ("stderr", "msg"):
        text = [ln.strip() for ln in str(result.get(key) or "").splitlines() if ln.strip()]
        if text:
            return text[-1][:300]
    return ""


def run_playbook(cluster: Cluster, cluster_yaml: Path, known_hosts: str | Path, identity: str | Path | None,
                 service_manager: str = "systemd", only: Sequence[str] = (), extra_vars: Sequence[str] = (),
                 echo: Callable[[str], None] = print) -> int:  # fmt: skip
    """Render into a temp dir and run the site playbook on it, streaming its output; on failure, one line per
    failed host naming the task. Ansible provisions; it does not roll back (re-run it after fixing the cause)."""
    with tempfile.TemporaryDirectory(prefix="sipha-deploy-") as tmp:
        rdir = Path(tmp) / "render"
        render.write(cluster, rdir)
        cmd = playbook_command(rdir, cluster_yaml, known_hosts, identity, service_manager, only, extra_vars)
        # A fresh ControlPath directory: a master connection left by an earlier run (made with another
        # known_hosts) must not be reused, or the host keys would not be checked against this one.
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(Path(tmp) / "cp")}
        lines: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=ANSIBLE_DIR) as proc:  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                echo(lines[-1])
        for host, task, cause in failed_tasks(lines):
            echo(f"deploy failed: {host}: task {task!r}" + (f": {cause}" if cause else ""))
        return proc.returncode


# ---------------------------------------------------------------------------------------------------- remote
# status and switchover: the health service's Pacemaker actions, with each command run over SSH on a node.


def remote_actions(cluster: Cluster, known_hosts: str | Path, key_filename: str | Path | None = None,
                   via: str | None = None) -> tuple[Any, Remote]:  # fmt: skip
    """A :class:`ha.health.cluster.PacemakerActions` whose commands run on ``via`` (default: the first node
    that answers). Reuses the health service's command lines and crm_mon parsing rather than copying them."""
    from ha.health.cluster import ActionError, PacemakerActions

    candidates: list[Node | Witness] = [cluster.node(via)] if via else list(cluster.nodes)
    errors = []
    for n in candidates:
        remote = Remote(Target.of(n), known_hosts, key_filename)
        try:
            remote.open()
        except RemoteError as exc:
            errors.append(str(exc))
            continue
        return _over_ssh(PacemakerActions, ActionError, cluster, remote), remote
    raise RemoteError(Target.of(candidates[0]), "no node reachable: " + "; ".join(errors))


def _over_ssh(base: type, action_error: type[Exception], cluster: Cluster, remote: Remote) -> Any:
    """An instance of ``base`` (PacemakerActions) whose ``run`` goes through ``remote``."""

    class OverSsh(base):  # type: ignore[misc,valid-type]
        def run(self, cmd: Sequence[str]) -> str:
            try:
                return remote.run(shlex.join(cmd), sudo=True).stdout
            except CommandFailed as exc:
                raise action_error(502, str(exc)) from None
            except RemoteError as exc:
                raise action_error(503, str(exc)) from None

    return OverSsh(cluster)


def _ask_coordinator() -> str:
    """A script asking a node's coordinator for its status over its unix socket, run by the host's own python3
    (every host has it: Ansible needs it), so it works whatever the install mode and wherever sipha's venv is.
    The exchange is ha.unixline's own (stdlib only), sent as source rather than written again."""
    return (Path(unixline.__file__).read_text()
            + "\nimport sys\nsys.stdout.write(exchange(sys.argv[1], b'status\\n', 2.0).decode())\n")


# What ``sipha status --remote`` shows of each node's replication (the coordinator's status has more)
REPLICATION_FIELDS = ("active", "epoch", "zookeeper", "ready", "shedding", "shed_limit_per_s", "pending", "lost",
                      "journal_bytes", "last")


def remote_replication(remote: Remote, socket_path: str) -> dict[str, Any]:
    """A node's replication as its coordinator reports it, or ``{"error": why}``. Why in status: while the proxy
    answers REGISTERs 503 (replication behind) or ZooKeeper is away (fail static, journal growing), the operator
    must see it beside the VIP's place, not in a log on each node."""
    try:
        r = remote.run(f"python3 -c {shlex.quote(_ask_coordinator())} {shlex.quote(socket_path)}", check=False,
                       sudo=True, timeout=10)
    except RemoteError as exc:
        return {"error": exc.message}
    if not r.ok:
        why = r.last_line() or f"exit {r.exit_code}"
        return {"error": f"the coordinator does not answer on {socket_path}: {why}"}
    try:
        doc = json.loads(r.stdout)
        repl = doc["replication"]
        return {k: repl.get(k) for k in REPLICATION_FIELDS} | {"ready": doc.get("ready", repl.get("ready"))}
    except (ValueError, KeyError, TypeError):
        return {"error": f"the coordinator's answer is not a status: {r.stdout.strip()[:120]!r}"}


def replication_line(repl: dict[str, Any]) -> str:
    """One line of a node's replication for ``sipha status --remote``."""
    if "error" in repl:
        return f"replication unknown: {repl['error']}"
    parts = ["active (writer)" if repl.get("active") else "standby", f"epoch {repl.get('epoch')}",
             f"ZooKeeper {repl.get('zookeeper')}", "ready" if repl.get("ready") else "NOT ready"]
    if repl.get("shedding"):
        parts.append(f"SHEDDING REGISTERs over {repl.get('shed_limit_per_s')}/s (503)")
    if repl.get("pending"):
        parts.append(f"{repl['pending']} events pending")
    if repl.get("journal_bytes"):
        parts.append(f"journal {repl['journal_bytes']} bytes (ZooKeeper writes buffered)")
    if repl.get("lost"):
        parts.append(f"{repl['lost']} events lost at the intake")
    return ", ".join(parts)


def remote_status(cluster: Cluster, known_hosts: str | Path, key_filename: str | Path | None = None,
                  status_socket: str = "/run/sipha/coordinator.sock") -> dict[str, Any]:  # fmt: skip
    """Each host's reachability and each node's replication, plus the cluster view (crm_mon) from the first
    node that answers."""
    hosts: dict[str, str] = {}
    replication: dict[str, dict[str, Any]] = {}
    nodes = {n.name for n in cluster.nodes}
    for h in cluster.hosts:
        r = Remote(Target.of(h), known_hosts, key_filename)
        try:
            r.open()
            up = r.run("cat /proc/uptime", check=False).stdout.split()
            hosts[h.name] = f"reachable, up {float(up[0]) / 3600:.1f} h" if up else "reachable"
            if h.name in nodes:
                replication[h.name] = remote_replication(r, status_socket)
        except RemoteError as exc:
            hosts[h.name] = exc.message
            if h.name in nodes:
                replication[h.name] = {"error": "host unreachable"}
        finally:
            r.close()
    actions, remote = remote_actions(cluster, known_hosts, key_filename)
    try:
        view = actions.status()
    finally:
        remote.close()
    return {"hosts": hosts, "via": remote.target.name, "cluster": view, "replication": replication}


__all__ = [
    "Activation",
    "DeployError",
    "Deployer",
    "HostPlan",
    "Install",
    "Plan",
    "Report",
    "deploy",
    "failed_tasks",
    "plan",
    "playbook_command",
    "remote_actions",
    "remote_replication",
    "remote_status",
    "rendered_files",
    "replication_line",
    "run_playbook",
]
