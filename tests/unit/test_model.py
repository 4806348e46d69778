"""Bad cluster.yaml inputs: one line naming the file and field, non-zero exit, --out untouched."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from ha import model
from ha.cli import main

ROOT = Path(__file__).resolve().parents[2]
LAB = yaml.safe_load((ROOT / "examples/lab.yaml").read_text())


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation setting a dotted path (``nodes.1.address``) in the lab example."""

    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return apply


def _drop(path: str) -> Callable[[dict], None]:
    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        del d[last]

    return apply


# (case id, mutation of examples/lab.yaml, field path the error must name, words the error must contain)
BAD: list[tuple[str, Callable[[dict], None], str, str]] = [
    ("unknown-top-key", _set("colour", "blue"), "colour", "unknown key"),
    ("unknown-nested-key", _set("timings.tokn_ms", 500), "timings.tokn_ms", "unknown key"),
    ("port-as-string", _set("proxy.listen.udp", "5060"), "proxy.listen.udp", "wrong type"),
    ("port-out-of-range", _set("proxy.listen.tcp", 70000), "proxy.listen.tcp", "65535"),
    ("duplicate-node-name", _set("nodes.1.name", "node1"), "nodes[1].name", "duplicate host name"),
    ("duplicate-node-address", _set("nodes.1.address", "198.51.100.11/24"), "nodes[1].address", "duplicate"),
    ("witness-address-clash", _set("witness.address", "198.51.100.12/24"), "witness.address", "duplicate"),
    ("bad-ip", _set("nodes.0.address", "198.51.100.300/24"), "nodes[0].address", "not an IPv4"),
    ("vip-outside-subnets", _set("vips.0.address", "203.0.113.5/24"), "vips[0].address", "outside every node"),
    ("vip-is-node-address", _set("vips.0.address", "198.51.100.11/24"), "vips[0].address", "already the address"),
    ("token-below-floor", _set("timings.token_ms", 150), "timings.token_ms", "below the floor"),
    ("consensus-too-small", _set("timings.consensus_ms", 300), "timings.consensus_ms", "1.2 x token"),
    ("probe-budget", _set("timings.failure_threshold", 20), "timings.failure_threshold", "token_ms + consensus_ms"),
    ("probe-timeout-over-period", _set("timings.probe_timeout_ms", 150), "timings.probe_timeout_ms", "below"),
    ("unknown-proxy-kind", _set("proxy.kind", "asterisk"), "proxy.kind", "'kamailio' or 'opensips'"),
    ("unknown-transport", _set("vips.0.transports", ["udp", "sctp"]), "vips[0].transports[1]", "sctp"),
    ("transport-without-port", _set("vips.0.transports", ["tls"]), "vips[0].transports", "no port"),
    ("one-node", lambda d: d["nodes"].pop(), "nodes", "at least 2"),
    ("nodes-null", _set("nodes", None), "nodes", "wrong type"),
    ("missing-name", _drop("name"), "name", "required"),
    ("bad-name", _set("name", "Prod Cluster"), "name", "pattern"),
    ("missing-tls-files", _set("rest.tls", {"cert": "/nonexistent/api.crt", "key": "/nonexistent/api.key"}),
     "rest.tls.cert", "does not exist"),
    ("bad-rest-bind", _set("rest.bind", "localhost"), "rest.bind", "not an IPv4"),
    ("snmp-without-auth", _drop("snmp.community"), "snmp", "community (v2c) or v3"),
    ("snmp-bad-target", _set("snmp.targets", ["198.51.100.50:99999"]), "snmp.targets", "1-65535"),
    ("snmpv3-short-key", _set("snmp.v3", {"user": "u", "auth_key": "short", "priv_key": "longenough"}),
     "snmp.v3.auth_key", "at least 8"),
    ("zk-even-members", _set("zookeeper.members", ["node1", "node2"]), "zookeeper.members", "odd"),
    ("zk-unknown-member", _set("zookeeper.members", ["node1", "node2", "node9"]), "zookeeper.members[2]",
     "not a node"),
    ("zk-session-too-short", _set("zookeeper.session_timeout_ms", 1000), "zookeeper.session_timeout_ms", "2 x"),
    ("zk-linger-negative", _set("zookeeper.write_linger_ms", -5), "zookeeper.write_linger_ms", "0"),
    ("zk-linger-too-long", _set("zookeeper.write_linger_ms", 5000), "zookeeper.write_linger_ms", "1000"),
    ("bad-trusted-network", _set("proxy.rate_limit.trusted", ["lan"]), "proxy.rate_limit.trusted", "network"),
    ("bad-fence-agent", _set("fencing.agent", "ipmi"), "fencing.agent", "pattern"),
    ("fence-delay-unknown-node", _set("fencing.delay_node", "node7"), "fencing.delay_node", "not a node"),
    ("qdevice-timeout-below-floor", _set("timings.qdevice_timeout_ms", 400), "timings.qdevice_timeout_ms", "500"),
    ("fast-claim-without-witness",
     lambda d: (d.pop("witness"), d.__setitem__("failover", {"fast_claim": True}),
                d["zookeeper"].__setitem__("members", ["node1"])),
     "failover.fast_claim", "needs a witness"),
    ("lease-outlives-the-membership-change", _set("failover", {"fast_claim": True, "lease_ms": 600}),
     "failover.lease_ms", "at most token_ms + consensus_ms - 100 (560)"),
    ("lab-client-clash", _set("lab.client", "198.51.100.13/24"), "lab.client", "already used"),
    ("bool-as-int", _set("timings.failure_threshold", True), "timings.failure_threshold", "wrong type"),
    ("float-timing", _set("timings.token_ms", 300.5), "timings.token_ms", "wrong type"),
]


def _write(tmp_path: Path, data: Any, name: str = "cluster.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(("mutate", "field", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_one_line_names_field_and_writes_nothing(
    tmp_path: Path, mutate: Callable[[dict], None], field: str, words: str
) -> None:
    data = copy.deepcopy(LAB)
    mutate(data)
    src = _write(tmp_path, data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    result = CliRunner().invoke(main, ["render", str(src), "--out", str(out)])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert f"{src}: {field}:" in lines[0]
    assert words in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "untouched"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: a\nname: b\n", "duplicate key 'name'"),
        ("nodes: [\n", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("", "top level must be a mapping"),
    ],
    ids=["duplicate-yaml-key", "broken-yaml", "list-not-mapping", "empty-file"],
)
def test_bad_yaml_shapes(tmp_path: Path, text: str, words: str) -> None:
    src = tmp_path / "c.yaml"
    src.write_text(text)
    with pytest.raises(model.ModelError) as err:
        model.load(src)
    assert str(err.value).startswith(f"{src}: ")
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(model.ModelError, match="cannot read"):
        model.load(tmp_path / "nope.yaml")


def test_real_process_exit_code_and_stderr(tmp_path: Path) -> None:
    data = copy.deepcopy(LAB)
    data["timings"]["token_ms"] = 100
    src = _write(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, "-m", "ha.cli", "render", str(src), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"Error: {src}: timings.token_ms: 100 ms is below the floor of "
                                                "300 ms (a cluster flaps)"]
    assert not (tmp_path / "o").exists()


def test_examples_are_valid_and_frozen() -> None:
    for name in ("lab", "production"):
        c = model.load(ROOT / f"examples/{name}.yaml")
        with pytest.raises(Exception, match="frozen"):
            c.timings.token_ms = 1  # type: ignore[misc]
    lab = model.load(ROOT / "examples/lab.yaml")
    assert [h.name for h in lab.zk_members] == ["node1", "node2", "witness"]
    assert lab.zk_myid("witness") == 3
    assert lab.vips[0].ip == "198.51.100.10" and lab.vips[0].prefix == 24


def test_defaults_fill_an_minimal_cluster() -> None:
    c = model.parse(
        {"name": "mini", "nodes": [{"name": "a", "address": "198.51.100.1/24"},
                                   {"name": "b", "address": "198.51.100.2/24"}],
         "witness": {"address": "198.51.100.3/24"}, "vips": [{"address": "198.51.100.9/24"}]},
        "mini.yaml",
    )
    assert c.timings.token_ms == 300 and c.timings.consensus_ms == 360
    assert "friendly-scanner" in c.proxy.scanner.user_agents
    assert "MAYET" in c.proxy.scanner.from_names
    assert c.proxy.listen.ports() == {"udp": 5060, "tcp": 5060}
