"""Declaring a region failover: a `RegionFailover` event signed by an operator key, published
straight to `kcm.registry.lifecycle`, so it works while the Registry is down."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core_service.replicated import read_tenant_definitions
from events import topics
from events.envelope import encode, new_envelope, partition_key
from events.fastpath import read_raw
from events.kafka import (
    KafkaSettings,
    assign_from_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
    read_to_end,
)
from events.models import RegionFailover
from events.signing import TrustStore, load_or_create_signing_key, sign_event

DEFAULT_OPERATOR_KEY_DIR = Path.home() / ".openkcm" / "operator"


@dataclass(frozen=True)
class Declared:
    event_id: str
    from_region: str
    to_region: str
    epoch: int
    tenants: list[str] | None
    seq: int
    topic: str
    partition: int
    offset: int
    key_id: str
    expected_refused: list[dict[str, Any]] = field(default_factory=list)
    """Tenants the survivor is expected to refuse, with the reason (from the compacted
    tenant definitions; the survivor's `GET /v1/status` lists what it actually refused)."""


def expected_refusals(definitions: dict[str, dict[str, Any]], from_region: str,
                      to_region: str, tenants: list[str] | None) -> list[dict[str, Any]]:
    """Tenants of `from_region` (its home tenants, or those listed) that will not move:
    their allow-list excludes `to_region`, or they have no live definition."""
    out: list[dict[str, Any]] = []
    if tenants is not None:
        chosen = {t: definitions.get(t) for t in tenants}
    else:
        chosen = {t: d for t, d in definitions.items() if d.get("home_region") == from_region}
    for tid in sorted(chosen):
        d = chosen[tid]
        if d is None:
            out.append({"tenant": tid, "reason": "no live definition in kcm.registry.tenants"})
        elif to_region not in d.get("regions", ()):
            out.append({"tenant": tid,
                        "reason": f"allow-list {list(d['regions'])} excludes {to_region}"})
    return out


async def last_operator_state(settings: KafkaSettings) -> tuple[int, int]:
    """(last operator seq, highest failover epoch) found on the lifecycle topic."""
    consumer = make_consumer(settings)
    await consumer.start()
    seq, epoch = 0, 1
    try:
        tps = await assign_from_offsets(consumer, topics.LIFECYCLE, {})
        async for _tp, records in read_to_end(consumer, tps):
            for record in records:
                try:
                    event = read_raw(record.value)
                except ValueError:
                    continue
                if event.type == "RegionFailover":
                    epoch = max(epoch, int(event.payload.get("epoch", 1)))
                if event.producer == "operator":
                    seq = max(seq, event.seq)
    finally:
        await consumer.stop()
    return seq, epoch


async def declare_failover(
    settings: KafkaSettings,
    *,
    from_region: str,
    to_region: str,
    trust_dir: Path,
    key_dir: Path = DEFAULT_OPERATOR_KEY_DIR,
    tenants: list[str] | None = None,
    epoch: int | None = None,
) -> Declared:
    """Publish one signed RegionFailover; the epoch defaults to one above any seen so far.
    (Operator events are few, so the scan of the topic for the operator's last seq and the
    highest epoch costs nothing worth keeping local state for.)"""
    key = load_or_create_signing_key(key_dir, "operator", trust_dir)
    await ensure_topics(settings)
    last_seq, last_epoch = await last_operator_state(settings)
    payload = RegionFailover(
        from_region=from_region,
        to_region=to_region,
        epoch=epoch if epoch is not None else max(2, last_epoch + 1),
        tenants=tenants,
    )
    env = sign_event(new_envelope(payload, producer="operator", seq=last_seq + 1, tenant_id=None),
                     key)
    producer = make_producer(settings)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topics.LIFECYCLE, encode(env), key=partition_key(env))
    finally:
        await producer.stop()
    definitions, _ = await read_tenant_definitions(settings, TrustStore(trust_dir))
    return Declared(
        event_id=str(env.event_id),
        from_region=from_region,
        to_region=to_region,
        epoch=payload.epoch,
        tenants=tenants,
        seq=env.seq,
        topic=topics.LIFECYCLE,
        partition=meta.partition,
        offset=meta.offset,
        key_id=key.key_id,
        expected_refused=expected_refusals(definitions, from_region, to_region, tenants),
    )


def as_row(declared: Declared) -> dict[str, object]:
    return asdict(declared)
