"""Helpers of the Core's test files (no tests here): building in-process engines, publishing
signed lifecycle events the way the Registry does, reading topics, running Core processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import TopicPartition

from core_service.clock import Clock
from core_service.engine import CoreConfig, Engine
from core_service.log import EventLog
from events import topics
from events.envelope import Envelope, encode, new_envelope
from events.kafka import (
    KafkaSettings,
    ensure_topics,
    make_consumer,
    make_producer,
    partition_for,
    partitions_of,
)
from events.models import Payload
from events.signing import ChainSigner, SigningKey, sign_event
from openkcm.stack import Service
from plugins.l1 import open_l1
from plugins.vault import open_vault

R1, R2, R3 = "eu-central-1", "eu-west-1", "us-east-1"


def make_engine(root: Path, clock: Clock, region: str = R1, key: SigningKey | None = None,
                **config: Any) -> Engine:
    return Engine(
        CoreConfig(region, root, **config),
        EventLog(root / "log"),
        open_vault(None, root / "vault"),
        open_l1(f"local:{root.parent / 'keyring.json'}", region),
        key or SigningKey.generate(region),
        clock,
    )


def close_engine(engine: Engine) -> None:
    engine.vault.close()
    engine.log.close()


class Lifecycle:
    """Registry-side events for tests: gap-free seq, signed like the Registry signs."""

    def __init__(self, key: SigningKey, start_seq: int = 0) -> None:
        self.key = key
        self.seq = start_seq

    def envelope(self, payload: Payload, tenant_id: str | None) -> Envelope:
        self.seq += 1
        return new_envelope(payload, producer=self.key.owner, seq=self.seq, tenant_id=tenant_id)

    def signed(self, payload: Payload, tenant_id: str | None) -> Envelope:
        return sign_event(self.envelope(payload, tenant_id), self.key)

    def accepted(self, payload: Payload, tenant_id: str, partition: int = 0
                 ) -> tuple[dict[str, Any], bytes, int]:
        """What the consumer hands the engine for one verified event."""
        raw = encode(self.signed(payload, tenant_id))
        return orjson.loads(raw), raw, partition


async def publish(bootstrap: str, values: list[tuple[bytes | None, bytes | None]],
                  topic: str = topics.LIFECYCLE, partition: int | None = None) -> None:
    settings = KafkaSettings(bootstrap)
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        futs = [await producer.send(topic, value, key=key, partition=partition)
                for key, value in values]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def publish_events(bootstrap: str, envs: list[Envelope], key: SigningKey,
                         chained: bool = False) -> None:
    """Publish lifecycle events keyed by tenant: standalone-signed, or (chained) hash-chained
    per partition with a checkpoint at the end of the batch, as the Registry's relay does."""
    if not chained:
        await publish(bootstrap, [(_key(e), encode(sign_event(e, key))) for e in envs])
        return
    signer = ChainSigner(key)
    parts = KafkaSettings(bootstrap).partitions
    by_part: dict[int, list[Envelope]] = {}
    for e in envs:
        by_part.setdefault(partition_for(_key(e), parts), []).append(e)
    for p, group in by_part.items():
        signed = [signer.sign(e, p, checkpoint=i == len(group) - 1) for i, e in enumerate(group)]
        await publish(bootstrap, [(_key(e), encode(e)) for e in signed], partition=p)


def _key(env: Envelope) -> bytes:
    return (env.tenant_id or "region").encode()


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of a topic (all partitions), up to the end offsets at call time."""
    settings = KafkaSettings(bootstrap)
    await ensure_topics(settings)
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(consumer, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


def core_service(root: Path, region: str, bootstrap: str, trust_dir: Path, *,
                 registry_url: str = "http://127.0.0.1:9", extra: list[str] | None = None,
                 purge_grace: str = "7d", l3: str = "90d", l2: str = "365d") -> Service:
    from openkcm.broker import free_port

    argv = [
        "core", "--region", region, "--data-dir", str(root / f"core-{region}"),
        "--bootstrap-servers", bootstrap, "--registry-url", registry_url,
        "--trust-dir", str(trust_dir), "--l1", f"local:{root / 'keyring.json'}",
        "--http", f"127.0.0.1:{free_port()}", "--l3-period", l3, "--l2-period", l2,
        "--purge-grace", purge_grace, "--format", "json", "--tick", "0.2", *(extra or []),
    ]
    return Service(f"core-{region}", argv, root / "logs" / f"core-{region}.log")


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dek_status(url: str, tenant_id: str) -> tuple[int, dict[str, Any]]:
    r = httpx.post(f"{url}/v1/tenants/{tenant_id}/deks", timeout=5)
    return r.status_code, r.json()


# --- the Core's HTTP API, for tests --------------------------------------------------------


def status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/status", timeout=10).json()  # type: ignore[no-any-return]


def keys(url: str, tenant: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/tenants/{tenant}/keys", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def new_dek(url: str, tenant: str) -> tuple[str, str]:
    """(plaintext, wrapped) of a fresh DEK, both base64."""
    r = httpx.post(f"{url}/v1/tenants/{tenant}/deks", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["plaintext"], r.json()["wrapped"]


def unwrap(url: str, tenant: str, wrapped: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/tenants/{tenant}/deks/unwrap", json={"wrapped": wrapped},
                      timeout=10)


def unwrapped(url: str, tenant: str, wrapped: str) -> str:
    """The plaintext (base64) a DEK unwraps to; the call must succeed."""
    r = unwrap(url, tenant, wrapped)
    assert r.status_code == 200, r.text
    return r.json()["plaintext"]  # type: ignore[no-any-return]
