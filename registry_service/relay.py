"""The relay: publishes the store's events, in order, to Kafka, and records how far it got.

No dual write: the HTTP API only writes the store; this task reads the log after the recorded
position and publishes

- every event to `kcm.registry.lifecycle` (key = tenant id), chained per partition and signed as
  a checkpoint at the last event of each batch on that partition (and at least every
  `checkpoint_every` events);
- the tenant's definition after the event to `kcm.registry.tenants` (a `TenantDefinition`
  envelope signed on its own, or a tombstone after a delete).

Only after Kafka acknowledged the whole batch does it record the new position and chain heads
(one synced write). A crash in between re-publishes the batch: the same bytes per event (the
store keeps the signed body, the chain digests and Ed25519 signatures are deterministic), so a
duplicate always carries the same `event_id`. While Kafka is down it retries with backoff,
re-creating its topics when the broker comes back (an in-memory broker returns empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, TopicPartition

from events import topics
from events.envelope import Envelope, decode, encode, new_envelope
from events.kafka import (
    KafkaSettings,
    ensure_topics,
    make_consumer,
    make_producer,
    partition_for,
    partitions_of,
)
from events.models import TenantDefinition
from events.signing import SigningKey, event_digest, sign_event
from registry_service.metrics import Metrics
from registry_service.store import RegistryStore, RelayPosition, StoredEvent

log = logging.getLogger("openkcm.registry.relay")

DEFINITION_NAMESPACE = uuid.UUID("6f0c2f4e-8a51-4f0e-9b7c-2f1d6f0d3a11")
"""event_id of a TenantDefinition = uuid5(namespace, lifecycle event_id): deterministic."""


@dataclass
class RelayConfig:
    batch_size: int = 500
    """Events per publish batch: small enough that one partition's records of a batch fit
    one producer batch (1 MiB), so a partition's records of a batch land all or none."""
    checkpoint_every: int = 500
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    request_timeout_ms: int = 5000
    connect_timeout: float = 5.0


def definition_envelope(env: Envelope, stored: StoredEvent, key: SigningKey) -> Envelope:
    """The signed compacted-topic value for a live tenant after `env`."""
    after = stored.after
    definition = new_envelope(
        TenantDefinition(
            regions=list(after.regions), home_region=after.home_region, registry_seq=stored.seq
        ),
        producer=env.producer,
        seq=stored.seq,
        tenant_id=stored.tenant_id,
        occurred_at=env.occurred_at,
        event_id=uuid.uuid5(DEFINITION_NAMESPACE, str(env.event_id)),
    )
    return sign_event(definition, key)


def sign_batch(
    events: list[StoredEvent],
    key: SigningKey,
    heads: dict[int, str],
    partitions: int,
    checkpoint_every: int,
) -> list[tuple[int, Envelope]]:
    """Chain-sign a batch (updates `heads`): (partition, signed envelope) in store order."""
    decoded = [(partition_for(s.tenant_id.encode(), partitions), decode(s.body)) for s in events]
    last_index: dict[int, int] = {}
    for i, (p, _) in enumerate(decoded):
        last_index[p] = i
    since: dict[int, int] = {}
    out: list[tuple[int, Envelope]] = []
    for i, (p, env) in enumerate(decoded):
        since[p] = since.get(p, 0) + 1
        checkpoint = last_index[p] == i or since[p] >= checkpoint_every
        if checkpoint:
            since[p] = 0
        signed = sign_event(env, key, prev=heads.get(p), checkpoint=checkpoint)
        heads[p] = event_digest(signed).hex()
        out.append((p, signed))
    return out


class BrokerLostRecords(RuntimeError):
    """The broker acknowledged records it does not keep (its topics vanished)."""


async def end_offsets(
    settings: KafkaSettings, names: list[str], timeout: float
) -> dict[str, dict[int, int]]:
    """End offset of every partition of the named topics ({} for a topic that is absent)."""
    consumer = make_consumer(settings, client_id="openkcm-registry-relay")
    await asyncio.wait_for(consumer.start(), timeout)
    try:
        existing = await consumer.topics()
        out: dict[str, dict[int, int]] = {}
        for name in names:
            if name not in existing:
                out[name] = {}
                continue
            tps = [TopicPartition(name, p) for p in await partitions_of(consumer, name, timeout)]
            ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout)
            out[name] = {tp.partition: offset for tp, offset in ends.items()}
        return out
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


class Relay:
    def __init__(
        self,
        store: RegistryStore,
        settings: KafkaSettings,
        key: SigningKey,
        metrics: Metrics | None = None,
        config: RelayConfig | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.key = key
        self.metrics = metrics or Metrics()
        self.config = config or RelayConfig()
        self.connected = False
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tenant_partitions = 0
        self.republished = 0
        """How often the relay found the broker had lost its records and started over."""

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="registry-relay")

    def notify(self) -> None:
        """New events are in the store."""
        self._wake.set()

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        await self._close_producer()

    @property
    def lag(self) -> int:
        return self.store.seq - self.store.relay.seq

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = self.config.backoff_initial
        while not self._stopping:
            try:
                partitions = await self._connect()
                backoff = self.config.backoff_initial
                while not self._stopping:
                    published = await self._publish_next(partitions)
                    if not published:
                        self._wake.clear()
                        if self.store.seq > self.store.relay.seq:
                            continue
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect and retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.relay_errors.inc()
                log.warning("relay: %s; retrying in %.1fs", self.last_error, backoff)
                await self._close_producer()
                if self._stopping:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped_event(), backoff)
                backoff = min(backoff * 2, self.config.backoff_max)

    async def _stopped_event(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.05)

    async def _connect(self) -> int:
        """(Re)create our topics if missing, start a producer, learn the partition count."""
        await ensure_topics(
            self.settings, [topics.LIFECYCLE, topics.TENANTS], timeout=self.config.connect_timeout
        )
        producer = make_producer(
            self.settings,
            client_id="openkcm-registry",
            request_timeout_ms=self.config.request_timeout_ms,
            retry_backoff_ms=100,
        )
        try:
            await asyncio.wait_for(producer.start(), self.config.connect_timeout)
            lifecycle = await asyncio.wait_for(
                producer.partitions_for(topics.LIFECYCLE), self.config.connect_timeout
            )
            tenants = await asyncio.wait_for(
                producer.partitions_for(topics.TENANTS), self.config.connect_timeout
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        try:
            await self._check_broker_kept_our_records()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        self._tenant_partitions = len(tenants)
        self.connected = True
        self.metrics.kafka_connected.set(1)
        log.info("relay connected to %s", self.settings.bootstrap_servers)
        return len(lifecycle)

    async def _check_broker_kept_our_records(self) -> None:
        """If the broker's end offsets are below what it acknowledged to us (an in-memory
        broker restarted, or the topics were deleted), publish the whole log again: the
        compacted topic must hold every tenant, and the chains restart from the first event.
        The re-published events are byte-identical to the lost ones (same event ids)."""
        position = self.store.relay
        if not position.offsets:
            return
        ends = await end_offsets(
            self.settings, [topics.LIFECYCLE, topics.TENANTS], self.config.connect_timeout
        )
        lost = [
            f"{topic}[{partition}] ends at {ends.get(topic, {}).get(partition, 0)}, "
            f"expected >= {offset}"
            for topic, parts in position.offsets.items()
            for partition, offset in parts.items()
            if ends.get(topic, {}).get(partition, 0) < offset
        ]
        if not lost:
            return
        log.warning(
            "relay: the broker lost records we published (%s); republishing the whole log "
            "(%d events)",
            "; ".join(lost[:3]),
            self.store.seq,
        )
        await asyncio.to_thread(self.store.record_relay, RelayPosition())
        self.republished += 1

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        self.connected = False
        self.metrics.kafka_connected.set(0)
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5.0)

    async def _check_topics_exist(self, producer: AIOKafkaProducer) -> None:
        """After the acks: our topics still exist. (An in-memory broker that restarted
        acknowledges records for topics it does not have, and drops them.)"""
        client = producer.client
        await asyncio.wait_for(client.force_metadata_update(), self.config.connect_timeout)
        for name in (topics.LIFECYCLE, topics.TENANTS):
            if not client.cluster.partitions_for_topic(name):
                raise BrokerLostRecords(f"topic {name} vanished from the broker")

    async def _publish_next(self, partitions: int) -> int:
        """Publish the next batch after the recorded position; returns how many events."""
        producer = self._producer
        assert producer is not None
        position = self.store.relay
        events = await asyncio.to_thread(
            self.store.read_events, position.seq, self.config.batch_size
        )
        if not events:
            return 0
        heads = dict(position.heads)
        signed = sign_batch(events, self.key, heads, partitions, self.config.checkpoint_every)
        futures = []
        for (partition, env), stored in zip(signed, events, strict=True):
            tid = stored.tenant_id.encode()
            futures.append(
                await producer.send(topics.LIFECYCLE, encode(env), key=tid, partition=partition)
            )
            value = (
                encode(definition_envelope(env, stored, self.key)) if stored.after.live else None
            )
            futures.append(
                await producer.send(
                    topics.TENANTS,
                    value,
                    key=tid,
                    partition=partition_for(tid, self._tenant_partitions),
                )
            )
        started = time.monotonic()
        pending = asyncio.ensure_future(asyncio.gather(*futures))
        done, _ = await asyncio.wait({pending}, timeout=self.config.request_timeout_ms / 1000)
        if not done:
            # Stalled: the broker does not answer. Say so in /healthz while aiokafka retries.
            self.connected = False
            self.metrics.kafka_connected.set(0)
            self.last_error = "publishing stalled: the broker does not acknowledge"
        acks = await asyncio.wait_for(pending, self.config.request_timeout_ms / 1000 * 2)
        self.connected = True
        self.metrics.kafka_connected.set(1)
        offsets = {t: dict(parts) for t, parts in position.offsets.items()}
        for ack in acks:
            expected = offsets.get(ack.topic, {}).get(ack.partition, 0)
            if ack.offset < expected:
                raise BrokerLostRecords(
                    f"{ack.topic}[{ack.partition}] acknowledged offset {ack.offset} below "
                    f"{expected}: the broker lost records"
                )
        for ack in acks:
            parts = offsets.setdefault(ack.topic, {})
            parts[ack.partition] = max(parts.get(ack.partition, 0), ack.offset + 1)
        await self._check_topics_exist(producer)
        new_position = RelayPosition(events[-1].seq, heads, partitions, offsets)
        await asyncio.to_thread(self.store.record_relay, new_position)
        self.metrics.relay_events.inc(len(events))
        self.metrics.relay_seq.set(new_position.seq)
        log.debug(
            "relay published %d events up to seq %d in %.3fs",
            len(events),
            new_position.seq,
            time.monotonic() - started,
        )
        return len(events)
