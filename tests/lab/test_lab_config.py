"""How the lab adapts the rendered configs (no root needed: pure functions on the real render)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ha import model, render
from ha.lab import lab as labmod
from ha.lab import stock

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def cluster() -> model.Cluster:
    return model.load(REPO / "examples/lab.yaml")


@pytest.fixture(scope="module")
def rendered(cluster: model.Cluster) -> dict[str, str]:
    return {f.path: f.text for f in render.render_files(cluster)}


def test_cib_without_our_agents_keeps_the_vip(cluster: model.Cluster, rendered: dict[str, str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(labmod, "_agent_installed", lambda provider, agent: provider == "heartbeat")
    monkeypatch.setattr(labmod, "_fence_agent_installed", lambda agent: False)
    cib, kamailio_by_lab = labmod._lab_cib(rendered["cib.xml"], cluster, lambda _m: None)
    assert kamailio_by_lab
    assert 'type="IPaddr2"' in cib and "ocf:sipha" not in cib and 'provider="sipha"' not in cib
    assert 'name="stonith-enabled" value="false"' in cib and 'class="stonith"' not in cib
    assert "proxy-clone" not in cib  # no constraint left pointing at a removed resource


def test_cib_with_everything_installed_is_the_render(cluster: model.Cluster, rendered: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(labmod, "_agent_installed", lambda provider, agent: True)
    monkeypatch.setattr(labmod, "_fence_agent_installed", lambda agent: True)
    cib, kamailio_by_lab = labmod._lab_cib(rendered["cib.xml"], cluster, lambda _m: None)
    assert not kamailio_by_lab
    assert cib.count("<primitive") == rendered["cib.xml"].count("<primitive")


def test_stock_variant(cluster: model.Cluster, rendered: dict[str, str]) -> None:
    c = stock.cluster(cluster)
    assert c.timings.token_ms == 3000 and c.timings.consensus_ms == 3600
    cib = stock.cib(c, rendered["cib.xml"], fence_installed=True, step=lambda _m: None)
    assert '<group id="sip">' in cib and 'type="kamailio"' in cib and 'provider="sipha"' not in cib
    assert 'interval="10s"' in cib and 'class="stonith"' in cib


def test_spec_names_only_lab_namespaces(cluster: model.Cluster) -> None:
    assert labmod._lab_namespaces(cluster) == ["sipha-br", "sipha-node1", "sipha-node2", "sipha-witness",
                                               "sipha-client"]  # fmt: skip
