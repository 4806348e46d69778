"""The kazoo handler whose waits are one ``poll`` (ha.coordinator.zkhandler): select's contract on real sockets,
and a client on it against the real ensemble (the coordinator's own clients use it: Replication.from_model)."""

from __future__ import annotations

import socket
import time
import uuid

import conftest_zk
import pytest

from ha.coordinator.store import _GET_DATA, ZkStore
from ha.coordinator.zkhandler import PollHandler, new_client

zk_ensemble = conftest_zk.zk_ensemble


def test_select_reports_what_is_ready_waits_its_timeout_and_counts_a_hang_up_as_readable() -> None:
    h = PollHandler()
    a, b = socket.socketpair()
    try:
        assert h.select([a], [a], [], 1.0) == ([], [a], [])  # nothing to read yet; room to write
        t0 = time.monotonic()
        assert h.select([a], [], [], 0.05) == ([], [], [])
        assert 0.04 <= time.monotonic() - t0 < 1.0  # the timeout is in seconds
        b.send(b"x")
        assert h.select([a, b], [], [b], 1.0) == ([a], [], [])  # only the ready one; never any of xlist
        assert h.select([a.fileno()], [], [], 0) == ([a.fileno()], [], [])  # descriptors as well as objects
        b.close()
        a.recv(1)
        assert h.select([a], [], [], 1.0) == ([a], [], [])  # hung up: readable, so the read sees it at once
        with pytest.raises(ValueError, match="non-negative"):
            h.select([a], [], [], -1)
        with pytest.raises(TypeError):
            h.select([a], [], [], "1")  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()
    with pytest.raises(TypeError, match="Invalid file descriptor"):
        h.select([a], [], [], 0)  # a closed socket (fileno -1): what kazoo's own select raises


def test_a_client_on_it_writes_and_reads_many_replies_from_the_real_ensemble(
    zk_ensemble: conftest_zk.Ensemble,
) -> None:
    c = new_client(zk_ensemble.hosts, timeout=10)
    c.start(timeout=10)
    try:
        assert isinstance(c.handler, PollHandler)
        store = ZkStore(c, f"zkh{uuid.uuid4().hex[:6]}", "node1")
        store.ensure_layout()
        paths = [f"{store.root}/contacts/00/n{i}" for i in range(3000)]
        t = c.transaction()
        for p in paths[:80]:
            t.create(p, b"x" * 300)
        t.commit()
        for i in range(80, 3000, 500):
            tt = c.transaction()
            for p in paths[i : i + 500]:
                tt.create(p, p.encode() * 8)  # ~300 KB of replies per multiRead round: many waits per reply
            tt.commit()
        got = store._multi_read([(_GET_DATA, p) for p in paths], lean=True)
        assert [d for d, _v, _z in got[80:]] == [p.encode() * 8 for p in paths[80:]]
    finally:
        c.stop()
        c.close()
