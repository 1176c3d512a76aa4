"""Prometheus metrics of one Registry process (own CollectorRegistry, no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.commands = Counter(
            "openkcm_registry_commands",
            "Management commands by kind and outcome",
            ["command", "outcome"],
            registry=r,
        )
        self.write_batches = Histogram(
            "openkcm_registry_write_batch_commands",
            "Commands per synced store write (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.store_seq = Gauge("openkcm_registry_store_seq", "Last store sequence", registry=r)
        self.tenants_live = Gauge("openkcm_registry_tenants_live", "Live tenants", registry=r)
        self.relay_seq = Gauge(
            "openkcm_registry_relay_seq", "Last store sequence published to Kafka", registry=r
        )
        self.relay_events = Counter(
            "openkcm_registry_relay_events", "Lifecycle events published", registry=r
        )
        self.relay_errors = Counter(
            "openkcm_registry_relay_errors", "Relay publish or connect failures", registry=r
        )
        self.kafka_connected = Gauge(
            "openkcm_registry_kafka_connected", "1 while the relay holds a producer", registry=r
        )
        self.frozen = Gauge(
            "openkcm_registry_frozen", "1 when the store failed (tier 3: frozen)", registry=r
        )
