"""A resync for a starting proxy waits while the proxy's RPC socket is there but silent (uptime_once_loaded).

Real UNIX datagram sockets stand in for Kamailio's jsonrpcs socket here; the node-start bench
(bench/coordinator_fastpath.py) and tests/unit/test_coordinator_preload.py cross the real Kamailio.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from ha.coordinator.replication import uptime_once_loaded
from ha.proxy.kamailio import RpcError


def _loading_proxy(path: Path, answer_after_s: float) -> tuple[socket.socket, threading.Thread]:
    """A socket that takes requests at once and answers them all only after ``answer_after_s`` (a Kamailio in
    wait_worker1_mode loading its table)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))

    def serve() -> None:
        time.sleep(answer_after_s)
        srv.settimeout(0.5)
        while True:
            try:
                data, peer = srv.recvfrom(65536)
            except (TimeoutError, OSError):
                return
            req = json.loads(data)
            srv.sendto(json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": {"uptime": 7}}).encode(), peer)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return srv, th


def test_waits_for_a_proxy_that_is_loading(tmp_path: Path) -> None:
    srv, th = _loading_proxy(tmp_path / "rpc.sock", 1.3)
    try:
        t0 = time.monotonic()
        assert uptime_once_loaded(tmp_path / "rpc.sock", 10) == {"uptime": 7}
        took = time.monotonic() - t0
        assert 1.2 < took < 2.0, took  # the answer, not the next 0.5 s try
    finally:
        th.join(3)
        srv.close()


def test_gives_up_at_the_deadline(tmp_path: Path) -> None:
    srv, _th = _loading_proxy(tmp_path / "rpc.sock", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(RpcError, match="no answer"):
            uptime_once_loaded(tmp_path / "rpc.sock", 1.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        srv.close()


def test_no_socket_or_nobody_reading_it_fails_at_once(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(RpcError, match="cannot reach"):
        uptime_once_loaded(tmp_path / "absent.sock", 10)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # the file stays, as a killed proxy's does
    with pytest.raises(RpcError, match="cannot reach"):
        uptime_once_loaded(tmp_path / "dead.sock", 10)
    assert time.monotonic() - t0 < 0.5
