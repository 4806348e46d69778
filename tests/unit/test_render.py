"""`sipha render`: byte-identical output, atomic replacement, golden files per template.

Goldens live in tests/golden/<example>/; after an intended template change regenerate them with
``SIPHA_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_render.py`` and review the diff like code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ha import model, render
from ha.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/golden"
EXAMPLES = ("lab", "production")


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


def test_failed_write_leaves_no_half_render(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the temp-then-rename path is covered above")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(render.RenderError):
            render.write(model.load(ROOT / "examples/lab.yaml"), parent / "out")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("example", EXAMPLES)
def test_golden(example: str) -> None:
    files = render.render_files(model.load(ROOT / f"examples/{example}.yaml"))
    gdir = GOLDEN / example
    if os.environ.get("SIPHA_UPDATE_GOLDEN"):
        for f in files:
            (gdir / f.path).parent.mkdir(parents=True, exist_ok=True)
            (gdir / f.path).write_text(f.text)
    expected = sorted(str(p.relative_to(gdir)) for p in gdir.rglob("*") if p.is_file())
    assert [f.path for f in files] == expected, "the set of rendered files changed"
    for f in files:
        assert f.text == (gdir / f.path).read_text(), f"{example}/{f.path} differs from its golden file"
