"""Reading what the platform replicated to Kafka, for hydration, replay and fencing:

- the key timeline on `kcm.core.keys` (every region's), authenticated through the producers'
  hash chains on the fast path (one signature per checkpoint, not per event);
- the wrapped blobs on the compacted `kcm.core.material`. Their authenticity comes from the
  timeline: a blob is only ever used when it unwraps (AES-GCM, with AAD binding tenant, layer
  and versions) to a key whose check value equals the one the verified timeline records;
- tenant definitions on the compacted `kcm.registry.tenants`, each signed by the Registry (the
  snapshot a survivor hydrates from when the Registry is down).

Everything here reads to the end offsets as of the start of the read and returns plain data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from core_service.memory import gc_paused
from events import topics
from events.envelope import DecodeError
from events.fastpath import RawEvent, read_raw
from events.kafka import KafkaSettings, assign_from_offsets, make_consumer, read_to_end
from events.signing import ChainVerifier, TrustStore, VerificationError, verify_event

Progress = Callable[[int], None]


@dataclass
class TenantKeyLog:
    """What the replicated log says of one tenant."""

    tenant_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    """Verified timeline events (plain JSON envelopes), in each producer's chain order."""
    material: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)
    """(layer, key_id) -> the KeyMaterial payload, or None where a purge left a tombstone."""

    @property
    def purged(self) -> bool:
        return any(e["type"] == "TenantPurged" for e in self.events)


@dataclass
class ReadStats:
    events: int = 0
    verified: int = 0
    rejected: int = 0
    material: int = 0
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def read_key_log(
    settings: KafkaSettings,
    trust: TrustStore,
    tenants: Collection[str] | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, TenantKeyLog], ReadStats]:
    """The verified timeline and the material of `tenants` (None: every tenant).

    The material is read by a second consumer while the timeline is read, and caught up
    after it: the material read always reaches at least the end offsets the material topic
    had when the timeline read finished (as when the two were read one after the other)."""
    stats = ReadStats()
    started = time.perf_counter()
    wanted = set(tenants) if tenants is not None else None
    out: dict[str, TenantKeyLog] = {}
    timeline_read = asyncio.Event()
    with gc_paused(collect_after=True):
        material_task = asyncio.create_task(_read_material(settings, wanted, timeline_read))
        try:
            await _read_timeline(settings, trust, wanted, out, stats, progress)
        except BaseException:
            material_task.cancel()
            with contextlib.suppress(BaseException):
                await material_task
            raise
        timeline_read.set()
        material, mstats = await material_task
    for tid, blobs in material.items():
        log = out.get(tid)
        if log is None:
            log = out[tid] = TenantKeyLog(tid)
        log.material.update(blobs)
    stats.material = mstats.material
    for reason in mstats.reasons:
        _note(stats, reason)
    stats.seconds = time.perf_counter() - started
    return out, stats


async def _read_timeline(
    settings: KafkaSettings,
    trust: TrustStore,
    wanted: set[str] | None,
    out: dict[str, TenantKeyLog],
    stats: ReadStats,
    progress: Progress | None,
) -> None:
    verifier = ChainVerifier(trust)
    feed = verifier.feed
    keys_topic = topics.CORE_KEYS
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await assign_from_offsets(consumer, keys_topic, {})
        async for tp, records in read_to_end(consumer, tps):
            partition = tp.partition
            verified = 0
            for rec in records:
                try:
                    ev = read_raw(rec.value)
                except DecodeError as exc:
                    stats.rejected += 1
                    _note(stats, f"{partition}@{rec.offset}: {exc}")
                    continue
                # Every event is fed, wanted or not: a checkpoint on another tenant's event
                # may be what vouches for a wanted one.
                good, bad = feed((keys_topic, partition, ev.producer), ev)
                if bad:
                    stats.rejected += len(bad)
                    for ev_bad, reason in bad:
                        _note(stats, f"{ev_bad.event_id}: {reason}")
                if good:
                    verified += len(good)
                    for ok in good:
                        data = ok.data
                        tid = data.get("tenant_id")
                        if tid is None:
                            continue
                        if type(tid) is not str:
                            tid = str(tid)
                        if wanted is None or tid in wanted:
                            log = out.get(tid)
                            if log is None:
                                log = out[tid] = TenantKeyLog(tid)
                            log.events.append(data)
            stats.events += len(records)
            stats.verified += verified
            if progress is not None:
                progress(stats.events)
    finally:
        await consumer.stop()


async def _read_material(
    settings: KafkaSettings, wanted: set[str] | None, timeline_read: asyncio.Event
) -> tuple[dict[str, dict[tuple[str, str], dict[str, Any] | None]], ReadStats]:
    """tenant -> (layer, key_id) -> KeyMaterial payload (None: tombstone), read to the end
    offsets as of the start, then caught up to those as of `timeline_read`."""
    stats = ReadStats()
    out: dict[str, dict[tuple[str, str], dict[str, Any] | None]] = {}
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await assign_from_offsets(consumer, topics.CORE_MATERIAL, {})
        while True:
            async for _tp, records in read_to_end(consumer, tps):
                for rec in records:
                    _material_record(rec.key, rec.value, wanted, out, stats)
            await timeline_read.wait()
            ends = await consumer.end_offsets(tps)
            if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                break
    finally:
        await consumer.stop()
    return out, stats


async def read_material(
    settings: KafkaSettings, tenants: set[str]
) -> dict[str, dict[tuple[str, str], dict[str, Any] | None]]:
    """The latest wrapped material of `tenants`: tenant -> (layer, key_id) -> KeyMaterial
    payload (None where a purge left a tombstone), checked as `read_key_log` checks it."""
    done = asyncio.Event()
    done.set()  # nothing to wait for: read to the end offsets as of now
    out, _ = await _read_material(settings, tenants, done)
    return out


def _material_record(
    raw_key: bytes | None,
    value: bytes | None,
    wanted: set[str] | None,
    out: dict[str, dict[tuple[str, str], dict[str, Any] | None]],
    stats: ReadStats,
) -> None:
    key = (raw_key or b"").decode(errors="replace")
    tid, _, rest = key.partition("/")
    layer, _, key_id = rest.partition("/")
    if not key_id or (wanted is not None and tid not in wanted):
        return
    stats.material += 1
    if value is None:
        out.setdefault(tid, {})[(layer, key_id)] = None
        return
    try:
        ev = read_raw(value)
    except DecodeError as exc:
        _note(stats, f"material {key}: {exc}")
        return
    if ev.type != "KeyMaterial" or ev.tenant_id != tid:
        _note(stats, f"material {key}: not a KeyMaterial of {tid}")
        return
    payload = ev.payload
    if payload.get("layer") != layer or payload.get("key_id") != key_id:
        _note(stats, f"material {key}: key and payload disagree")
        return
    out.setdefault(tid, {})[(layer, key_id)] = payload


async def read_tenant_definitions(
    settings: KafkaSettings, trust: TrustStore
) -> tuple[dict[str, dict[str, Any]], ReadStats]:
    """Live tenant definitions from the compacted topic (latest value per key wins; a
    tombstone removes). Each value must carry a valid Registry signature."""
    stats = ReadStats()
    started = time.perf_counter()
    out: dict[str, dict[str, Any]] = {}
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await assign_from_offsets(consumer, topics.TENANTS, {})
        async for _tp, records in read_to_end(consumer, tps):
            for rec in records:
                stats.events += 1
                tid = (rec.key or b"").decode(errors="replace")
                if rec.value is None:
                    out.pop(tid, None)
                    continue
                try:
                    ev: RawEvent = read_raw(rec.value)
                    if ev.producer != "registry" or ev.tenant_id != tid:
                        raise VerificationError("not the Registry's definition of this key")
                    verify_event(ev, trust)
                except (DecodeError, VerificationError) as exc:
                    stats.rejected += 1
                    _note(stats, f"definition {tid}: {exc}")
                    continue
                stats.verified += 1
                out[tid] = ev.payload
    finally:
        await consumer.stop()
    stats.seconds = time.perf_counter() - started
    return out, stats


def _note(stats: ReadStats, reason: str) -> None:
    if len(stats.reasons) < 100:
        stats.reasons.append(reason)
