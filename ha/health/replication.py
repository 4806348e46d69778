"""What the local coordinator says about replication, for the health service's API, metrics and log.

Why: while replication is behind, the coordinator has the proxy answer REGISTERs ``503`` (back-pressure). Phones
see that at once; the operator must see it too -- on ``GET /health`` (``replication``), in Prometheus
(``sipha_replication_shedding`` and friends) and as one log event when a spell begins and one when it ends --
without reading the coordinator's own log. Read from the coordinator's status socket (its own thread answers,
even while its loop is busy), about once a second, off the health loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from ha.unixline import exchange

DEFAULT_STATUS_SOCKET = "/run/sipha/coordinator.sock"  # ha.coordinator.service's (a test keeps them equal)
POLL_S = 1.0
# What /health shows of the coordinator's status (its "replication" part, and its readiness)
FIELDS = ("active", "zookeeper", "shedding", "shed_limit_per_s", "shed_spells", "lost", "pending", "journal_bytes")


def query(path: str = DEFAULT_STATUS_SOCKET, timeout: float = 0.5) -> dict[str, Any]:
    """The coordinator's status document; raises OSError (nobody answers) or ValueError (not a status)."""
    doc = json.loads(exchange(path, b"status\n", timeout))
    if not isinstance(doc, dict) or not isinstance(doc.get("replication"), dict):
        raise ValueError("the coordinator's answer has no replication status")
    return doc


class ReplicationWatch:
    """The last replication status read, and whether the proxy is shedding REGISTERs; thread-safe."""

    def __init__(self, read: Callable[[], dict[str, Any]] = query) -> None:
        self.read = read
        self._lock = threading.Lock()
        self.status: dict[str, Any] | None = None  # FIELDS of the last good read, plus "ready"
        self.error = "not read yet"
        self.shedding = False

    def poll(self) -> tuple[str, dict[str, Any]] | None:
        """Read once. Returns ("shedding_started"|"shedding_ended", fields) when the shedding changed, else None.
        A coordinator that does not answer keeps the last shedding state (its spell holds in the proxy anyway,
        and ends by itself at most SHED_HOLD_S after its last refresh)."""
        try:
            doc = self.read()
        except (OSError, ValueError) as exc:
            with self._lock:
                self.error = f"the coordinator does not answer ({exc})"
            return None
        repl = doc["replication"]
        fields = {k: repl.get(k) for k in FIELDS} | {"ready": doc.get("ready")}
        with self._lock:
            self.status, self.error = fields, ""
            was, self.shedding = self.shedding, bool(fields["shedding"])
        if was == self.shedding:
            return None
        return ("shedding_started" if self.shedding else "shedding_ended"), fields

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            if self.status is None:
                return {"error": self.error}
            return {**self.status, "error": self.error or None}


__all__ = ["DEFAULT_STATUS_SOCKET", "FIELDS", "POLL_S", "ReplicationWatch", "query"]
