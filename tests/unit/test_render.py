"""`sipha render`: byte-identical output, atomic replacement, golden files per template.

Goldens live in tests/golden/<example>/; after an intended template change regenerate them with
``SIPHA_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_render.py`` and review the diff like code.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ha import model, render
from ha.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/golden"
EXAMPLES = ("lab", "production", "lab-opensips")


def _example(name: str) -> model.Cluster:
    """An example by name; ``lab-opensips`` is the lab with the other proxy kind, so its template has a golden."""
    if name == "lab-opensips":
        data = yaml.safe_load((ROOT / "examples/lab.yaml").read_text())
        data["proxy"]["kind"] = "opensips"
        return model.parse(data, "lab-opensips", ROOT / "examples")
    return model.load(ROOT / f"examples/{name}.yaml")


def _tree(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def test_render_twice_gives_identical_trees(tmp_path: Path) -> None:
    runner = CliRunner()
    for out in ("a", "b"):
        r = runner.invoke(main, ["render", str(ROOT / "examples/lab.yaml"), "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b
    assert {"corosync.conf", "cib.xml", "inventory.ini", "zoo.cfg", "node1/kamailio.cfg", "node2/kamailio.cfg",
            "witness/zookeeper-myid"} <= set(a)


def test_rerender_replaces_previous_render_whole(tmp_path: Path) -> None:
    c = model.load(ROOT / "examples/lab.yaml")
    out = tmp_path / "r"
    render.write(c, out)
    (out / "node1" / "stale.cfg").write_text("from an older render")
    render.write(c, out)
    assert not (out / "node1" / "stale.cfg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temp or .old dirs left behind


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "etc"
    out.mkdir()
    (out / "passwd").write_text("not ours")
    with pytest.raises(render.RenderError, match="not an earlier sipha render"):
        render.write(model.load(ROOT / "examples/lab.yaml"), out)
    assert (out / "passwd").read_text() == "not ours"


def test_disk_full_mid_write_keeps_the_previous_render(tmp_path: Path) -> None:
    """A real ENOSPC: a 48 KiB tmpfs holds one lab render (~66 KB with blocks) only as long as nothing else."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and `make test` run as root)")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "sipha-test", str(small)], check=True)
    try:
        out = small / "out"
        out.mkdir()
        (out / render.MARKER).write_text("an earlier render\n")
        (out / "corosync.conf").write_text("previous config\n")
        with pytest.raises(render.RenderError, match="cannot write"):
            render.write(model.load(ROOT / "examples/lab.yaml"), out)
        assert sorted(p.name for p in small.iterdir()) == ["out"]  # the temp dir is gone
        assert (out / "corosync.conf").read_text() == "previous config\n"
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("example", EXAMPLES)
def test_golden(example: str) -> None:
    files = render.render_files(_example(example))
    gdir = GOLDEN / example
    if os.environ.get("SIPHA_UPDATE_GOLDEN"):
        for f in files:
            (gdir / f.path).parent.mkdir(parents=True, exist_ok=True)
            (gdir / f.path).write_text(f.text)
    expected = sorted(str(p.relative_to(gdir)) for p in gdir.rglob("*") if p.is_file())
    assert [f.path for f in files] == expected, "the set of rendered files changed"
    for f in files:
        assert f.text == (gdir / f.path).read_text(), f"{example}/{f.path} differs from its golden file"
