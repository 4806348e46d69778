"""Model + ``templates/`` -> configuration files, deterministic and atomic.

Layout of a render (``--out DIR``): files every host shares sit at the top, files that differ per host sit in
a directory named after the host. Nothing is written until every file rendered in memory, and the directory
is swapped in whole, so a crash or a bad model never leaves a half-rendered tree behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2

from ha.model import Cluster, Node, Witness

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MARKER = ".sipha-render"


class RenderError(RuntimeError):
    """The output directory cannot be written; one line naming the path and the cause."""


@dataclass(frozen=True)
class Output:
    """One file of a render: its path under ``--out`` and its bytes."""

    path: str
    text: str
    mode: int = 0o644


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,  # a template naming a setting the model lacks is a bug, loudly
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # Config files are not HTML; only the CIB is XML, and there every value is escaped.
        autoescape=jinja2.select_autoescape(enabled_extensions=("xml.j2",), default_for_string=False),
    )
    env.filters["xml"] = lambda v: jinja2.utils.markupsafe.escape(str(v))
    return env


def _is_node(host: Node | Witness, cluster: Cluster) -> bool:
    return any(host.name == n.name for n in cluster.nodes)


# (template, output path, who gets it): "cluster" -> one shared file; "node" -> one per proxy node;
# "zk" -> one per ZooKeeper member. Each per-host template sees ``host`` besides ``cluster``.
PLAN: tuple[tuple[str, str, str], ...] = (
    ("corosync.conf.j2", "corosync.conf", "cluster"),
    ("cib.xml.j2", "cib.xml", "cluster"),
    ("inventory.ini.j2", "inventory.ini", "cluster"),
    ("zoo.cfg.j2", "zoo.cfg", "cluster"),
    ("myid.j2", "{host}/zookeeper-myid", "zk"),
    ("{kind}.cfg.j2", "{host}/{kind}.cfg", "node"),
)


def render_files(cluster: Cluster, env: jinja2.Environment | None = None) -> list[Output]:
    """Render every file in memory; pure, so tests compare outputs without touching disk."""
    env = env or _env()
    kind = cluster.proxy.kind
    hosts: dict[str, Callable[[], tuple[Node | Witness, ...]]] = {
        "node": lambda: cluster.nodes,
        "zk": lambda: cluster.zk_members,
    }
    out: list[Output] = []
    for template, target, who in PLAN:
        tpl = env.get_template(template.format(kind=kind))
        if who == "cluster":
            out.append(Output(target, tpl.render(cluster=cluster)))
            continue
        for host in hosts[who]():
            text = tpl.render(cluster=cluster, host=host, is_node=_is_node(host, cluster))
            out.append(Output(target.format(host=host.name, kind=kind), text))
    return sorted(out, key=lambda o: o.path)


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RenderError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise RenderError(f"{out}: not empty and not an earlier sipha render; refusing to replace it")


def write(cluster: Cluster, out: str | Path) -> list[Output]:
    """Render into ``out`` atomically: a sibling temp dir is filled, then swapped in by rename."""
    out = Path(out).absolute()
    _check_target(out)
    files = render_files(cluster)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in files:
            p = tmp / f.path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f.text)
            os.chmod(p, f.mode)
        (tmp / MARKER).write_text(f"rendered by sipha from cluster {cluster.name}\n")
        os.chmod(tmp, 0o755)  # noqa: S103 - a config tree daemons read, like /etc
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / "x")
        tmp.rename(out)
        if old:
            shutil.rmtree(old)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RenderError(f"{out}: cannot write: {exc.strerror or exc}") from None
    return files
