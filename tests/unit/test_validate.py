"""The validators run the real tools: a good render passes, a corrupted file fails with the tool's reason."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from ha import model, render, validate

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.validators


def cluster_of(example: str, **changes: Any) -> model.Cluster:
    data = yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text())
    data.update(changes)
    return model.parse(data, "<test>", ROOT / "examples")


def rendered(cluster: model.Cluster, tmp_path: Path) -> Path:
    """My templates written out; the proxy config is stubbed only while its template is absent."""
    env = render._env()
    env.loader = jinja2.ChoiceLoader([env.loader, jinja2.DictLoader({"kamailio.cfg.j2": "", "opensips.cfg.j2": ""})])
    for f in render.render_files(cluster, env):
        p = tmp_path / f.path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f.text)
    return tmp_path


def our_netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(validate.NETNS_PREFIX)}


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="corosync -t runs in a network namespace (root)")


@needs_root
def test_run_all_lab_passes_crm_verify_and_corosync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (render.TEMPLATES / "kamailio.cfg.j2").exists():
        pytest.skip("templates/kamailio.cfg.j2 not written yet: ha.render.write cannot render the lab")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a private temp root shows what run_all leaves
    before_ns = our_netns()
    results = validate.run_all(cluster_of("lab"))
    by_tool = {r.what: r for r in results}
    assert by_tool["cib.xml: crm_verify"].ok, by_tool["cib.xml: crm_verify"].detail
    for node in ("node1", "node2"):
        r = by_tool[f"corosync.conf as {node}: corosync -t"]
        assert r.ok, r.detail
        assert f"{node}/kamailio.cfg: kamailio -c" in by_tool  # called, whatever its verdict
    assert our_netns() == before_ns
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("example", ["lab", "production"])
@needs_root
def test_examples_pass(example: str, tmp_path: Path) -> None:
    out = rendered(cluster_of(example), tmp_path)
    cib = validate.check_cib(out / "cib.xml")
    assert cib.ok, cib.detail
    for node in cluster_of(example).nodes:
        r = validate.check_corosync(out / "corosync.conf", node.ip)
        assert r.ok, r.detail


@needs_root
def test_two_node_corosync_passes(tmp_path: Path) -> None:
    cluster = cluster_of("lab", witness=None, failover={}, zookeeper={"members": ["node1"]})
    r = validate.check_corosync(rendered(cluster, tmp_path) / "corosync.conf")
    assert r.ok, r.detail


def test_broken_cib_fails(tmp_path: Path) -> None:
    cib = rendered(cluster_of("lab"), tmp_path) / "cib.xml"
    cib.write_text(cib.read_text().replace('with-rsc="proxy-clone"', 'with-rsc="no-such-clone"'))
    r = validate.check_cib(cib)
    assert not r.ok
    assert "no-such-clone" in r.detail


def test_cib_that_is_not_xml_fails(tmp_path: Path) -> None:
    cib = rendered(cluster_of("lab"), tmp_path) / "cib.xml"
    cib.write_text(cib.read_text().replace("</resources>", ""))
    assert not validate.check_cib(cib).ok


@needs_root
def test_broken_corosync_fails(tmp_path: Path) -> None:
    before = our_netns()
    conf = rendered(cluster_of("lab"), tmp_path) / "corosync.conf"
    conf.write_text(conf.read_text().replace("crypto_cipher: aes256", "crypto_cipher: rot13"))
    r = validate.check_corosync(conf)
    assert not r.ok
    assert "cipher" in r.detail
    assert our_netns() == before


@needs_root
def test_corosync_for_a_host_outside_the_nodelist_fails(tmp_path: Path) -> None:
    conf = rendered(cluster_of("lab"), tmp_path) / "corosync.conf"
    r = validate.check_corosync(conf, "198.51.100.99")
    assert not r.ok
    assert "local host" in r.detail


def test_opensips_is_reported_not_checkable(tmp_path: Path) -> None:
    cluster = cluster_of("lab", proxy={"kind": "opensips", "listen": {"udp": 5060, "tcp": 5060}})
    r = validate.check_proxy(cluster, tmp_path / "node1" / "opensips.cfg", "node1")
    assert r.ok
    assert r.detail == "not checkable here: opensips is not packaged in Debian 12"


def test_health_rule_semantics_with_crm_simulate(tmp_path: Path) -> None:
    """sipha-health 0 moves the VIP; an undefined attribute on the other node does not forbid it."""
    cib = rendered(cluster_of("lab"), tmp_path) / "cib.xml"
    up = tmp_path / "up.xml"

    def simulate(src: Path, *args: str) -> str:
        proc = subprocess.run(["crm_simulate", "-x", str(src), "-S", *args], capture_output=True, text=True, check=True)
        return proc.stdout.split("Transition Summary:")[1].split("Executing")[0]

    summary = simulate(cib, "--node-up", "node1", "--node-up", "node2", "--quorum", "1", "-O", str(up))
    assert "Start      vip-vip" in summary
    active = "node1" if "vip-vip         ( node1 )" in summary else "node2"
    standby = "node2" if active == "node1" else "node1"
    # A restart of the standby's proxy leaves the VIP alone.
    assert "vip-vip" not in simulate(up, "-i", f"proxy_monitor_1000@{standby}=7")
    subprocess.run(
        ["crm_attribute", "-N", active, "-n", "sipha-health", "-v", "0", "-l", "reboot"],
        env={**os.environ, "CIB_file": str(up)}, check=True, capture_output=True,
    )  # fmt: skip
    assert f"Move       vip-vip     ( {active} -> {standby} )" in simulate(up)
