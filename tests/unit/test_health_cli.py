"""``sipha health run`` end to end on loopback: a real process probing a real UDP SIP responder, its REST API,
metrics and SNMP responder read over real sockets, and a clean stop on SIGTERM.

attrd_updater is run for real but finds no cluster here, so the attribute write fails and is retried with
back-off without stalling the probes (the log says so); the lab integration test crosses the real attrd.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from ha import sip
from ha.health.cli import health

ROOT = Path(__file__).resolve().parents[2]
ENTRY = "from ha.health.cli import health; health()"


class ThreadResponder:
    """A blocking UDP SIP responder in a thread: answers OPTIONS with 200 unless ``silent``."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.silent = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if not self.silent:
                with contextlib.suppress(sip.SipParseError, OSError):
                    self.sock.sendto(sip.response(sip.parse(data), 200).encode(), addr)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def responder() -> Iterator[ThreadResponder]:
    r = ThreadResponder()
    try:
        yield r
    finally:
        r.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(url: str, status: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    last: tuple[int, bytes] = (0, b"")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = get(url)
            if last[0] == status:
                return json.loads(last[1])
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status}; last {last}")


def test_run_serves_health_metrics_snmp_and_stops(tmp_path: Path, responder: ThreadResponder) -> None:
    rest_port, snmp_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    cfg = {
        "name": "loop",
        "nodes": [{"name": "node1", "address": "127.0.0.1/8"}, {"name": "node2", "address": "127.0.0.2/8"}],
        "witness": {"name": "witness", "address": "127.0.0.3/8"},
        "vips": [{"name": "vip", "address": "127.0.0.10/8", "transports": ["udp"]}],
        "proxy": {"listen": {"udp": responder.port, "tcp": None}},
        "rest": {"bind": "127.0.0.1", "port": rest_port, "token_file": str(tmp_path / "token")},
        "snmp": {"community": "c0mm", "agent_port": snmp_port},
    }
    yaml_file = tmp_path / "cluster.yaml"
    yaml_file.write_text(yaml.safe_dump(cfg))
    assert CliRunner().invoke(health, ["token", str(tmp_path / "token")]).exit_code == 0
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / "token").read_text().strip()) >= 43

    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "run", str(yaml_file), "--node", "node1"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{rest_port}"
    try:
        body = wait_for(f"{base}/health", 200)
        assert body["health"] == "healthy" and body["transports"][0]["verdict"] == "ok"
        status, text = get(f"{base}/metrics")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(text.decode())}
        assert {"sipha_health", "sipha_probe_latency_seconds", "sipha_vip_holder"} <= names
        assert get(f"{base}/active")[0] == 503  # this host does not hold 127.0.0.10

        snmp = CliRunner().invoke(health, ["snmp-get", str(yaml_file), "--node", "node1"])
        assert snmp.exit_code == 0, snmp.output
        assert "SIPHA-MIB::sipHaHealth.0 = healthy(1)" in snmp.output

        responder.silent = True
        body = wait_for(f"{base}/health", 503)
        assert body["health"] == "unhealthy" and "dead" in body["reason"]
        assert CliRunner().invoke(health, ["snmp-get", str(yaml_file), "--node", "node1"]).exit_code == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "event=health_change node=node1 was=unknown now=healthy" in err
    assert "event=health_change node=node1 was=healthy now=unhealthy" in err
    assert "event=attribute_write" in err  # attempted without blocking the probes
    assert "event=stop" in err


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    lab = str(ROOT / "examples" / "lab.yaml")
    r = CliRunner().invoke(health, ["run", lab, "--node", "node9"])
    assert r.exit_code != 0 and "'node9' is not a node" in r.output
    r = CliRunner().invoke(health, ["snmp-engine-id", "--node", "node1"])
    assert r.output.strip() == "0x80001f880473697068612d6e6f646531"
    (tmp_path / "t").write_text("x")
    assert "exists" in CliRunner().invoke(health, ["token", str(tmp_path / "t")]).output
