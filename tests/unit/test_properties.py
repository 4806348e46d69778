"""Property: any valid model renders to configs that the real validators accept.

The strategy builds cluster.yaml *data* (what an operator writes), so the model's own parsing and defaults are
part of what is exercised; a generated case the model rejects is a bug in the strategy, and fails loudly.
"""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ha import model, render

needs_validators = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("crm_verify", "corosync", "kamailio")),
    reason="the real validators are installed by `make test` (pacemaker, corosync, kamailio)",
)


@st.composite
def clusters(draw: st.DrawFn) -> dict:
    n_nodes = draw(st.integers(2, 4))
    witness = draw(st.booleans())
    addrs = draw(st.lists(st.integers(2, 250), min_size=n_nodes + 4, max_size=n_nodes + 4, unique=True))
    nodes = [{"name": f"n{i + 1}", "address": f"198.51.100.{addrs[i]}/24"} for i in range(n_nodes)]
    transports = draw(st.sets(st.sampled_from(["udp", "tcp", "tls", "ws"]), min_size=1))
    base_port = draw(st.integers(1024, 60000))
    listen = {"udp": base_port, "tcp": base_port, "tls": base_port + 1, "ws": base_port + 2}
    listen = {t: p for t, p in listen.items() if t in transports}
    token = draw(st.integers(300, 5000))
    consensus = draw(st.integers((token * 12 + 9) // 10, token * 2))
    period = draw(st.integers(20, 500))
    threshold = draw(st.integers(1, min(100, max(1, (token + consensus - 1) // period))))
    hosts = [n["name"] for n in nodes] + (["witness"] if witness else [])
    zk = hosts if len(hosts) % 2 else hosts[:-1]
    data: dict = {
        "name": draw(st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)),
        "nodes": nodes,
        "vips": [
            {"name": f"vip{i}", "address": f"198.51.100.{addrs[n_nodes + 2 + i]}/24",
             "transports": sorted(draw(st.sets(st.sampled_from(sorted(transports)), min_size=1)))}
            for i in range(draw(st.integers(1, 2)))
        ],
        "proxy": {"kind": "kamailio", "listen": listen, "children": draw(st.integers(1, 8)),
                  "scanner": {"user_agents": draw(st.lists(st.from_regex(r"[A-Za-z][A-Za-z0-9 ._-]{2,15}",
                                                                          fullmatch=True), min_size=1, max_size=4))}},
        "timings": {"token_ms": token, "consensus_ms": consensus, "probe_period_ms": period,
                    "probe_timeout_ms": draw(st.integers(10, period - 1)), "failure_threshold": threshold,
                    "stickiness": draw(st.integers(0, 1000))},
        "zookeeper": {"members": zk},
        "lab": {"client": f"198.51.100.{addrs[n_nodes]}/24"},
    }
    if witness:
        data["witness"] = {"address": f"198.51.100.{addrs[n_nodes + 1]}/24"}
    return data


@needs_validators
@pytest.mark.validators
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_any_valid_model_renders_to_configs_the_validators_accept(data: dict) -> None:
    from ha import validate

    cluster = model.parse(data, "generated.yaml")
    results = validate.run_all(cluster)
    failed = [f"{r.what}: {r.detail}" for r in results if not r.ok]
    assert not failed, failed
    assert len(results) >= 2 + len(cluster.nodes)


@settings(max_examples=60, deadline=None)
@given(clusters())
def test_rendering_is_a_pure_function_of_the_model(data: dict) -> None:
    cluster = model.parse(data, "generated.yaml")
    assert render.render_files(cluster) == render.render_files(model.parse(data, "generated.yaml"))
