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


class _LoadingProxy:
    """A socket that takes requests at once and answers them all only after ``answer_after_s`` (a Kamailio in
    wait_worker1_mode loading its table)."""

    def __init__(self, path: Path, answer_after_s: float) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.srv.bind(str(path))
        self.srv.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(answer_after_s,), daemon=True)
        self.thread.start()

    def _serve(self, answer_after_s: float) -> None:
        if self.stop.wait(answer_after_s):
            return
        while not self.stop.is_set():
            try:
                data, peer = self.srv.recvfrom(65536)
            except TimeoutError:
                continue
            req = json.loads(data)
            reply = {"jsonrpc": "2.0", "id": req["id"], "result": {"uptime": 7}}
            self.srv.sendto(json.dumps(reply).encode(), peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.srv.close()


def test_waits_for_a_proxy_that_is_loading(tmp_path: Path) -> None:
    proxy = _LoadingProxy(tmp_path / "rpc.sock", 1.3)
    try:
        t0 = time.monotonic()
        assert uptime_once_loaded(tmp_path / "rpc.sock", 10) == {"uptime": 7}
        took = time.monotonic() - t0
        assert 1.2 < took < 2.0, took  # the answer, not the next 0.5 s try
    finally:
        proxy.close()


def test_gives_up_at_the_deadline(tmp_path: Path) -> None:
    proxy = _LoadingProxy(tmp_path / "rpc.sock", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(RpcError, match="no answer"):
            uptime_once_loaded(tmp_path / "rpc.sock", 1.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        proxy.close()


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
