"""The health service's view of the local coordinator (ha.health.replication): shedding made visible.

The status is read over a real unix socket here, from a small server that answers what the coordinator's status
thread answers; the lab test (tests/lab/test_health_lab.py) reads the real coordinator's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ha import model
from ha.health.replication import DEFAULT_STATUS_SOCKET, ReplicationWatch, query

ROOT = Path(__file__).resolve().parents[2]


class StatusServer:
    """Answers "status\\n" on a unix socket with ``doc`` (None: closes without an answer)."""

    def __init__(self, path: Path) -> None:
        self.doc: dict[str, Any] | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.recv(64)
                if self.doc is not None:
                    conn.sendall(json.dumps(self.doc).encode() + b"\n")


def status(shedding: bool, **repl: Any) -> dict[str, Any]:
    replication = {"active": True, "zookeeper": "connected", "shedding": shedding, "pending": 3, "journal_bytes": 0,
                   "shed_limit_per_s": 1200 if shedding else 0, "shed_spells": 1, "lost": 0, **repl}
    return {"ok": True, "ready": True, "replication": replication}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[StatusServer, str]]:
    path = tmp_path / "c.sock"
    srv = StatusServer(path)
    yield srv, str(path)
    srv.stop.set()
    srv.sock.close()


def test_the_watch_reports_a_shedding_spell_once_at_its_start_and_once_at_its_end(
    server: tuple[StatusServer, str],
) -> None:
    srv, path = server
    watch = ReplicationWatch(lambda: query(path, timeout=0.5))
    assert watch.snapshot() == {"error": "not read yet"}
    srv.doc = status(False)
    assert watch.poll() is None and watch.snapshot()["shedding"] is False and watch.snapshot()["error"] is None
    srv.doc = status(True)
    what, fields = watch.poll()  # type: ignore[misc]
    assert what == "shedding_started" and fields["shed_limit_per_s"] == 1200 and fields["ready"] is True
    assert watch.poll() is None  # still shedding: nothing new to say
    srv.doc = None  # the coordinator does not answer: the last state stands, and the error says so
    assert watch.poll() is None and watch.shedding
    assert watch.snapshot()["error"].startswith("the coordinator does not answer") and watch.snapshot()["shedding"]
    srv.doc = {"ok": True}  # not a status document
    assert watch.poll() is None and "no replication status" in watch.snapshot()["error"]
    srv.doc = status(False)
    assert watch.poll() == ("shedding_ended", watch.status)


def test_the_health_service_logs_records_and_exports_the_spell(server: tuple[StatusServer, str],
                                                              tmp_path: Path) -> None:  # fmt: skip
    from ha.health.service import HealthService
    from ha.health.snmp import NodeState

    class Traps:  # the lab model's trap target is in the lab's subnet: nothing is sent from here
        def __init__(self) -> None:
            self.sent: list[tuple[str, NodeState]] = []

        async def send(self, notification: str, state: NodeState) -> list[str]:
            self.sent.append((notification, state))
            return []

    srv, path = server
    cluster = model.load(ROOT / "examples/lab.yaml")
    traps = Traps()
    svc = HealthService(cluster, "node1", replication=ReplicationWatch(lambda: query(path, timeout=0.5)),
                        traps=traps)  # type: ignore[arg-type]
    events: list[tuple[str, dict[str, Any]]] = []
    svc.event = lambda name, *_a, **kw: events.append((name, kw))  # type: ignore[method-assign]

    async def body() -> None:
        srv.doc = status(False)
        await svc._poll_replication()
        srv.doc = status(True)
        await svc._poll_replication()
        srv.doc = status(False, shed_spells=1, lost=7)
        await svc._poll_replication()

    asyncio.run(body())
    assert [e for e, _ in events] == ["replication_shedding_started", "replication_shedding_ended"]
    assert "REGISTERs over 1200/s answered 503" in events[0][1]["reason"]
    shed = [t.as_dict() for t in svc.history if t.kind == "shedding"]
    assert [(t["from"], t["to"]) for t in shed] == [("false", "true"), ("true", "false")]
    text = svc.metrics.render().decode()
    assert "sipha_replication_shedding 0.0" in text and "sipha_replication_lost_events 7.0" in text
    assert "sipha_replication_zookeeper_connected 1.0" in text
    assert svc.snapshot()["replication"]["lost"] == 7
    # SNMP: a sipHaSheddingChange at each end of the spell, with the spell's sentence as sipHaReason
    assert [(n, st.shedding) for n, st in traps.sent] == [("shedding", "shedding"), ("shedding", "taking")]
    assert traps.sent[0][1].reason == events[0][1]["reason"]


def test_the_health_service_asks_the_coordinators_own_status_socket() -> None:
    from ha.coordinator.service import DEFAULT_STATUS_SOCKET as COORDINATOR

    assert DEFAULT_STATUS_SOCKET == COORDINATOR
