"""Every event type through the real broker with a consumer group."""

from __future__ import annotations

import asyncio
import uuid

from events import topics
from events.envelope import decode, encode, partition_key
from events.kafka import (
    KafkaSettings,
    assign_from_offsets,
    ensure_topics,
    make_consumer,
    make_group_consumer,
    make_producer,
    partition_for,
    read_to_end,
)
from events.signing import TrustStore, sign_event, verify_event
from tests.factories import sample_envelopes


async def test_every_event_type_round_trips_through_the_broker(
    kafka_bootstrap: str, registry_key, trust_dir
) -> None:
    from events.signing import load_or_create_signing_key

    settings = KafkaSettings(kafka_bootstrap, partitions=3)
    topic = f"test.events.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic])
    keys = {
        "registry": registry_key,
        "operator": load_or_create_signing_key(trust_dir.parent / "op", "operator", trust_dir),
        "eu-central-1": load_or_create_signing_key(
            trust_dir.parent / "core", "eu-central-1", trust_dir
        ),
    }
    sent = [sign_event(e, keys[e.producer]) for e in sample_envelopes()]
    producer = make_producer(settings)
    await producer.start()
    try:
        for env in sent:
            await producer.send_and_wait(topic, encode(env), key=partition_key(env))
    finally:
        await producer.stop()

    consumer = make_group_consumer(settings, f"g-{topic}", topic)
    await consumer.start()
    received = []
    try:
        async with asyncio.timeout(60):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    received += [r.value for r in records]
        await consumer.commit()
    finally:
        await consumer.stop()
    trust = TrustStore(trust_dir)
    by_id = {e.event_id: e for e in sent}
    assert len(received) == len(sent)
    for raw in received:
        env = decode(raw)
        verify_event(env, trust)
        assert encode(env) == raw
        assert env == by_id[env.event_id]
    assert {decode(r).type for r in received} == {e.type for e in sent}


async def test_platform_topics_and_stored_offsets(kafka_bootstrap: str) -> None:
    settings = KafkaSettings(kafka_bootstrap, partitions=3)
    await ensure_topics(settings)
    await ensure_topics(settings)  # idempotent
    topic = f"test.offsets.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic])
    producer = make_producer(settings)
    await producer.start()
    for i in range(30):
        key = f"k{i}".encode()
        meta = await producer.send_and_wait(topic, b"%d" % i, key=key)
        assert meta.partition == partition_for(key, 3)  # our partitioner matches Kafka's
    await producer.stop()

    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await assign_from_offsets(consumer, topic, {0: 2})
        seen = []
        async for tp, records in read_to_end(consumer, tps):
            seen += [(tp.partition, r.offset) for r in records]
        assert len(seen) == 30 - 2
        assert (0, 0) not in seen and (0, 1) not in seen and (0, 2) in seen
        metadata = await consumer._client.fetch_all_metadata()
        assert set(topics.ALL) <= set(metadata.topics())
    finally:
        await consumer.stop()
