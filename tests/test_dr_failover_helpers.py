"""Helpers of the region-failover and split-brain tests (no tests here): tenants published the
way the Registry publishes them (lifecycle events hash-chained, signed definitions on the
compacted topic), declaring a failover, reading a Core's status and timelines."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from events import topics
from events.envelope import encode, new_envelope
from events.kafka import KafkaSettings, partition_for
from events.models import TenantCreated, TenantDefinition
from events.signing import sign_event
from openkcm.failover import Declared, declare_failover
from tests.test_core_helpers import (
    Lifecycle,
    publish,
    publish_events,
    status,
)


def create_tenants(bootstrap: str, lc: Lifecycle, tenants: dict[str, list[str]],
                   home: str) -> None:
    """TenantCreated on the lifecycle topic and the definition on kcm.registry.tenants, both
    signed by the Registry key, as the Registry's relay writes them."""
    envs = [lc.envelope(TenantCreated(regions=regions, home_region=home), tid)
            for tid, regions in tenants.items()]
    asyncio.run(publish_events(bootstrap, envs, lc.key, chained=True))
    parts = KafkaSettings(bootstrap).partitions
    values: list[tuple[bytes | None, bytes | None]] = []
    for env, (tid, regions) in zip(envs, tenants.items(), strict=True):
        definition = new_envelope(
            TenantDefinition(regions=regions, home_region=home, registry_seq=env.seq),
            producer="registry", seq=env.seq, tenant_id=tid)
        values.append((tid.encode(), encode(sign_event(definition, lc.key))))
    by_part: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    for k, v in values:
        by_part.setdefault(partition_for(k or b"", parts), []).append((k, v))
    for p, group in by_part.items():
        asyncio.run(publish(bootstrap, group, topic=topics.TENANTS, partition=p))


def declare(bootstrap: str, trust_dir: Path, key_dir: Path, src: str, dst: str) -> Declared:
    return asyncio.run(declare_failover(KafkaSettings(bootstrap), from_region=src,
                                        to_region=dst, trust_dir=trust_dir, key_dir=key_dir))






def hydration_done(url: str) -> dict[str, Any] | None:
    """The last finished failover once nothing is pending, else None."""
    try:
        fo = status(url)["failover"]
    except (httpx.HTTPError, KeyError):
        return None
    if fo["pending"] or fo["last"] is None:
        return None
    return fo  # type: ignore[no-any-return]

