"""A real 3-member ZooKeeper ensemble on 127.0.0.1, started once per test session; event builders.

Imported by the coordinator test modules (``from conftest_zk import zk_ensemble, zk_client``). A fixture
imported into several modules is registered once per module, so the ensemble itself is a process-wide
singleton: the first module starts it, every module's session teardown closes it (idempotent), and
``atexit`` kills the JVMs (by pid) should pytest die another way.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient

from ha.coordinator.events import ContactEvent, DialogEvent, Event, from_dict
from ha.zk_testing import Ensemble, credential_kwargs

_ENSEMBLE: Ensemble | None = None


def _shared() -> Ensemble:
    global _ENSEMBLE
    if _ENSEMBLE is None:
        if not Path("/usr/share/java/zookeeper.jar").exists():
            pytest.skip("the Debian zookeeper package is not installed")
        root = Path(tempfile.mkdtemp(prefix="sipha-zk-"))
        ens = Ensemble(root, tick_ms=500)
        atexit.register(ens.close)
        try:
            ens.start(timeout=90)
        except BaseException:
            ens.close()
            raise
        _ENSEMBLE = ens
    return _ENSEMBLE


def _close() -> None:
    global _ENSEMBLE
    if _ENSEMBLE is not None:
        _ENSEMBLE.close()
        shutil.rmtree(_ENSEMBLE.root, ignore_errors=True)
        _ENSEMBLE = None


@pytest.fixture(scope="session")
def zk_ensemble() -> Iterator[Ensemble]:
    ens = _shared()
    try:
        yield ens
    finally:
        _close()


def connect(ens: Ensemble, timeout_s: float = 2.0) -> KazooClient:
    """A started client; sessions of 2 s so a lost quorum shows quickly (the server clamps to >= 2 ticks).
    Authenticated as the services the tests start are (zk_testing.TEST_CREDENTIAL): the trees are closed."""
    c = KazooClient(hosts=ens.hosts, timeout=timeout_s, connection_retry={"max_tries": -1, "max_delay": 0.5},
                    **credential_kwargs())
    c.start(timeout=20)
    return c


@pytest.fixture
def zk_client(zk_ensemble: Ensemble) -> Iterator[KazooClient]:
    c = connect(zk_ensemble)
    try:
        yield c
    finally:
        c.stop()
        c.close()


def contact(
    seq: int, aor: str, uri: str | None = None, kind: str = "insert", ttl: int = 3600, **kw: Any
) -> ContactEvent:
    now = int(time.time())
    d: dict[str, Any] = {
        "seq": seq,
        "node": kw.pop("node", "node1"),
        "type": f"contact.{kind}",
        "ts": now * 1000,
        "aor": aor,
        "contact": uri or f"sip:{aor}@198.51.100.50:5062",
        "expires": ttl if kind in ("insert", "update") else 0,
        "expires_at": now + ttl if kind in ("insert", "update") else 0,
        "q": -1,
        "received": "udp:198.51.100.50:5062",
        "socket": "udp:198.51.100.10:5060",
        "path": "",
        "callid": f"reg-{aor}",
        "cseq": seq,
        "user_agent": "test 1.0",
        "flags": 0,
        "cflags": 0,
        "methods": -1,
        "ruid": f"uloc-{seq}",
    }
    d.update(kw)
    ev = from_dict(d)
    assert isinstance(ev, ContactEvent)
    return ev


def dialog(seq: int, callid: str, kind: str = "start", **kw: Any) -> DialogEvent:
    d: dict[str, Any] = {
        "seq": seq,
        "node": "node1",
        "type": f"dialog.{kind}",
        "ts": int(time.time() * 1000),
        "callid": callid,
        "from_tag": "ft1",
        "to_tag": "tt1",
        "from_uri": "sip:alice@x",
        "to_uri": "sip:bob@x",
        "from_rs": "<sip:198.51.100.10;lr>",
        "to_rs": "",
        "from_contact": "sip:alice@198.51.100.50",
        "to_contact": "sip:bob@198.51.100.51",
        "h_entry": 1,
        "h_id": 2,
        "created_ms": 1764014460123,
        "start_ts": 1764014461,
        "state": 4,
    }
    d.update(kw)
    ev = from_dict(d)
    assert isinstance(ev, DialogEvent)
    return ev


def fold(events: list[Event]) -> dict[tuple[str, str], tuple[int, str, int]]:
    """What the store must hold after these events: (aor, contact) -> (expires_at, callid, cseq)."""
    state: dict[tuple[str, str], tuple[int, str, int]] = {}
    for ev in events:
        if isinstance(ev, ContactEvent):
            if ev.removed:
                state.pop((ev.aor, ev.contact), None)
            else:
                state[(ev.aor, ev.contact)] = (ev.expires_at, ev.callid, ev.cseq)
    return state
