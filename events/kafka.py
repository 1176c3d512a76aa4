"""The small Kafka layer every service uses: topics, producer and consumer factories.

Consumers of the platform keep their offsets with their own state (aiokafka's local-state
pattern): `assign_from_offsets` assigns partitions explicitly and seeks to the stored next
offsets, so no consumer group (slow to join on the embedded broker) is needed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from events import topics

DEFAULT_PARTITIONS = 6


def idempotence_default() -> bool:
    """Idempotent producer: on for real Kafka, off on the embedded broker (Tansu's memory
    engine rejects InitProducerId). `OPENKCM_KAFKA_IDEMPOTENCE=1|0` decides explicitly."""
    explicit = os.environ.get("OPENKCM_KAFKA_IDEMPOTENCE")
    if explicit is not None:
        return explicit.strip().lower() in {"1", "true", "yes", "on"}
    return bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    idempotence: bool = field(default_factory=idempotence_default)
    partitions: int = DEFAULT_PARTITIONS
    replication_factor: int = 1
    client_id: str = "openkcm"


def topic_configs(name: str) -> dict[str, str]:
    if name in topics.COMPACTED:
        return {"cleanup.policy": "compact"}
    if name in (topics.CORE_KEYS, topics.LIFECYCLE):
        return {"retention.ms": "-1", "retention.bytes": "-1"}  # kept forever for audit
    return {}


async def ensure_topics(
    settings: KafkaSettings, names: Iterable[str] = topics.ALL, timeout: float = 30.0
) -> None:
    """Create the platform's topics that do not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, client_id=settings.client_id
    )
    await asyncio.wait_for(admin.start(), timeout)
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                n,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=topic_configs(n),
            )
            for n in names
            if n not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all always; idempotence per settings; batched with a short linger."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "acks": "all",
        "enable_idempotence": settings.idempotence,
        "linger_ms": 5,
        "max_batch_size": 1 << 20,
        "request_timeout_ms": 15_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer without a group: the caller assigns partitions and owns the offsets."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_uncommitted",
        "max_partition_fetch_bytes": 4 << 20,
        "fetch_max_bytes": 16 << 20,
        # A waiting fetch holds its connection: the embedded broker answers the requests of a
        # connection in order, so seeks and offset look-ups queued behind a 500 ms long poll
        # (aiokafka's default) each took half a second. New records still arrive at once.
        "fetch_max_wait_ms": 50,
    }
    options.update(overrides)
    return AIOKafkaConsumer(**options)


def make_group_consumer(
    settings: KafkaSettings, group_id: str, *topic_names: str, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer-group member, tuned to join and rejoin in seconds on the embedded broker."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "rebalance_timeout_ms": 5000,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topic_names, **options)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str, timeout: float = 30.0) -> list[int]:
    """Partition ids of a topic, waiting for its metadata to appear. Asks the cluster directly
    (a consumer's own metadata only follows the topics it is assigned, and switching a
    consumer to another topic would otherwise wait seconds for its refresh)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = consumer._client  # noqa: SLF001 - the public API cannot fetch a topic's metadata
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        parts = (await client.fetch_all_metadata()).partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if loop.time() > deadline:
            raise TimeoutError(f"topic {topic} has no partitions after {timeout}s")
        await asyncio.sleep(0.1)


async def assign_from_offsets(
    consumer: AIOKafkaConsumer, topic: str, next_offsets: Mapping[int, int]
) -> list[TopicPartition]:
    """Assign every partition of `topic` and seek to the stored next offset of each
    (the beginning where nothing is stored)."""
    tps = [TopicPartition(topic, p) for p in await partitions_of(consumer, topic)]
    consumer.assign(tps)
    for tp in tps:
        if tp.partition in next_offsets:
            consumer.seek(tp, next_offsets[tp.partition])
    # One reset for every partition without a stored offset: each call waits for its reset,
    # and one at a time they queued behind the fetch in flight (~50 ms per partition).
    fresh = [tp for tp in tps if tp.partition not in next_offsets]
    if fresh:
        await consumer.seek_to_beginning(*fresh)
    return tps


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key` (murmur2, as in Java)."""
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


async def read_to_end(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], batch_ms: int = 200
) -> Any:
    """Yield batches of records until every partition reached the end offset it had when the
    read started. For hydration and replay.

    A partition is done only once its position reached that end AND a fetch returned nothing
    more for it: a broker may report the end of a multi-record batch as the batch's base
    offset + 1 (the embedded broker does), and records of that batch still buffered in the
    consumer must not be left behind."""
    end = await consumer.end_offsets(tps)
    remaining = set(tps)
    while remaining:
        below = [tp for tp in remaining if await consumer.position(tp) < end[tp]]
        batch = await consumer.getmany(
            *remaining, timeout_ms=batch_ms if below else 20, max_records=10_000
        )
        for tp, records in batch.items():
            if records:
                yield tp, records
        for tp in list(remaining):
            if not batch.get(tp) and await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
