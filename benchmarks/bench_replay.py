"""Reading the authenticated key log (hydration, replay, rebuild) against raw aiokafka
consumption of the same topic, both measured in this run on the embedded broker.

    .venv/bin/python -m benchmarks.bench_replay [--events 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiokafka import TopicPartition

from benchmarks.common import report
from core_service.replicated import read_key_log
from events import models as m
from events import topics
from events.envelope import encode, new_envelope, partition_key
from events.ids import key_version_id, utcnow
from events.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer, partition_for
from events.signing import ChainSigner, SigningKey, TrustStore
from openkcm.broker import EmbeddedBroker

REGION = "eu-central-1"


def timeline(n: int, tenants: int, key: SigningKey, parts: int) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value): KeyRotated events chained per partition, a checkpoint
    signature every 1,000 events of a partition and at its end."""
    signer = ChainSigner(key)
    now = utcnow()
    plain = []
    for i in range(n):
        tid = f"t{i % tenants:06d}"
        version = i // tenants + 2
        kv = m.KeyVersion(layer="L3", version=version, epoch=1, key_id=key_version_id(1, version),
                          parent_key_id="e1v1", kcv="0123456789ab", created_at=now)
        env = new_envelope(m.KeyRotated(region=REGION, epoch=1, key=kv, trigger="scheduled"),
                           producer=REGION, seq=i + 1, tenant_id=tid, occurred_at=now)
        plain.append((partition_for(partition_key(env), parts), env))
    last = {p: i for i, (p, _) in enumerate(plain)}
    count: dict[int, int] = {}
    out = []
    for i, (p, env) in enumerate(plain):
        count[p] = count.get(p, 0) + 1
        signed = signer.sign(env, p, checkpoint=count[p] % 1000 == 0 or last[p] == i)
        out.append((p, partition_key(env), encode(signed)))
    return out


async def produce(settings: KafkaSettings, records: list[tuple[int, bytes, bytes]]) -> float:
    producer = make_producer(settings)
    await producer.start()
    t0 = time.perf_counter()
    try:
        by_part: dict[int, list[tuple[bytes, bytes]]] = {}
        for p, k, v in records:
            by_part.setdefault(p, []).append((k, v))
        futures = []
        for p, items in by_part.items():
            batch = producer.create_batch()
            for k, v in items:
                if batch.append(key=k, value=v, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topics.CORE_KEYS, partition=p))
                    batch = producer.create_batch()
                    batch.append(key=k, value=v, timestamp=None)
            futures.append(await producer.send_batch(batch, topics.CORE_KEYS, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(records) / (time.perf_counter() - t0)


async def raw_consume(settings: KafkaSettings, n: int) -> float:
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topics.CORE_KEYS) or set()
        while not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            parts = consumer.partitions_for_topic(topics.CORE_KEYS) or set()
        tps = [TopicPartition(topics.CORE_KEYS, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        t0 = time.perf_counter()
        got = 0
        while got < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            got += sum(len(v) for v in batch.values())
        return got / (time.perf_counter() - t0)
    finally:
        await consumer.stop()


async def main_async(n: int, tenants: int, repeats: int) -> dict[str, object]:
    key = SigningKey.generate(REGION)
    trust = TrustStore()
    trust.add_signer(key)
    with EmbeddedBroker() as broker:
        settings = KafkaSettings(broker.bootstrap)
        await ensure_topics(settings)
        records = timeline(n, tenants, key, settings.partitions)
        produce_rate = await produce(settings, records)
        raw, ours = [], []
        for _ in range(repeats):
            raw.append(await raw_consume(settings, n))
            logs, stats = await read_key_log(settings, trust)
            assert stats.verified == n and stats.rejected == 0, stats
            assert sum(len(x.events) for x in logs.values()) == n
            ours.append(stats.events_per_second)
            del logs  # each repeat starts from the same heap (not holding the last result)
    raw_med, ours_med = statistics.median(raw), statistics.median(ours)
    return {
        "events": n,
        "tenants": tenants,
        "checkpoint_every": 1000,
        "baseline_raw_aiokafka_produce_per_s": round(produce_rate),
        "baseline_raw_aiokafka_consume_per_s": round(raw_med),
        "read_key_log_verified_per_s": round(ours_med),
        "ratio_verified_vs_raw_consume": round(ours_med / raw_med, 3),
        "target_per_s": 100_000,
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    report("replay", asyncio.run(main_async(args.events, args.tenants, args.repeats)))


if __name__ == "__main__":
    main()
