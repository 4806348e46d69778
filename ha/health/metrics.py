"""Prometheus metrics of the health service, in their own registry.

Own :class:`CollectorRegistry` (not the global default) so two services in one process (tests, the lab) never
collide, and /metrics shows only what the service means, not the process collectors of whatever imported us.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ha.health.probe import Health, Observation, Verdict

# Local probes answer in well under a millisecond; the top buckets catch a proxy near its timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
HEALTH_VALUE = {Health.HEALTHY: 1, Health.UNHEALTHY: 0, Health.UNKNOWN: -1}


class Metrics:
    """The service's metrics; methods take the service's own objects so call sites stay one line."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, node: str, vips: tuple[str, ...] = ()) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            "sipha_probe_latency_seconds", "SIP OPTIONS round trip of answered probes",
            ["node", "transport"], registry=r, buckets=LATENCY_BUCKETS,
        )
        self.failures = Counter(
            "sipha_probe_failures_total", "Probes that were not ok: dead (no answer) or overloaded (5xx/slow)",
            ["node", "transport", "verdict"], registry=r,
        )
        self.late_answers = Counter(
            "sipha_probe_late_answers_total",
            "Final responses that came after their probe's timeout: the proxy was alive but busy (counted overloaded)",
            ["node", "transport"], registry=r,
        )
        self.transitions = Counter(
            "sipha_health_transitions_total", "Health changes of the local proxy, by new state", ["to"], registry=r
        )
        self.health = Gauge("sipha_health", "Local proxy health: 1 healthy, 0 unhealthy, -1 unknown", registry=r)
        self.ready = Gauge("sipha_ready", "1 when readiness is given (or no gate is configured)", registry=r)
        self.vip_holder = Gauge("sipha_vip_holder", "1 when this node holds the VIP address", ["vip"], registry=r)
        # From the local coordinator's status (ha.health.replication); -1 until it was read once.
        self.shedding = Gauge("sipha_replication_shedding",
                              "1 while the coordinator has the proxy answer REGISTERs 503 (replication behind)",
                              registry=r)  # fmt: skip
        self.shed_limit = Gauge("sipha_replication_shed_limit_per_s",
                                "REGISTERs per second the proxy still takes during a shedding spell", registry=r)
        self.shed_spells = Gauge("sipha_replication_shed_spells", "Shedding spells since the coordinator started",
                                 registry=r)  # fmt: skip
        self.lost_events = Gauge("sipha_replication_lost_events",
                                 "Proxy events the coordinator counted lost (each repaired by reconciliation)",
                                 registry=r)  # fmt: skip
        self.zk_connected = Gauge("sipha_replication_zookeeper_connected",
                                  "1 when the coordinator is connected to ZooKeeper", registry=r)
        for g in (self.shedding, self.shed_limit, self.shed_spells, self.lost_events, self.zk_connected):
            g.set(-1)
        self.health.set(-1)
        for t in Health:
            self.transitions.labels(str(t))
        for v in vips:
            self.vip_holder.labels(v).set(0)

    def observe(self, node: str, obs: Observation) -> None:
        if obs.verdict is not Verdict.DEAD:
            self.latency.labels(node, obs.transport).observe(obs.latency_ms / 1000)
        if obs.verdict is not Verdict.OK:
            self.failures.labels(node, obs.transport, str(obs.verdict)).inc()

    def late(self, node: str, transport: str) -> None:
        self.late_answers.labels(node, transport).inc()

    def health_changed(self, health: Health) -> None:
        self.transitions.labels(str(health)).inc()
        self.health.set(HEALTH_VALUE[health])

    def set_vips(self, all_vips: tuple[str, ...], held: list[str]) -> None:
        for v in all_vips:
            self.vip_holder.labels(v).set(1 if v in held else 0)

    def replication(self, fields: dict[str, object]) -> None:
        """The coordinator's replication status (ha.health.replication.FIELDS)."""
        self.shedding.set(1 if fields.get("shedding") else 0)
        self.shed_limit.set(float(fields.get("shed_limit_per_s") or 0))  # type: ignore[arg-type]
        self.shed_spells.set(float(fields.get("shed_spells") or 0))  # type: ignore[arg-type]
        self.lost_events.set(float(fields.get("lost") or 0))  # type: ignore[arg-type]
        self.zk_connected.set(1 if fields.get("zookeeper") == "connected" else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
