"""The lifecycle consumer: `kcm.registry.lifecycle` -> verified, deduplicated, applied.

No consumer group: every partition is assigned and sought to the offsets stored in the log
(`assign_from_offsets`). A batch of records (getmany) is decoded, authenticated with the
`ChainVerifier` (chain = topic, partition, producer; unsigned events wait for their chain's
checkpoint), deduplicated by event_id and by the producer's seq, and applied with the consumed
offsets in one log transaction. Whatever fails decoding, validation or authentication, or is a
replay, goes to `kcm.dlq` with the reason and is never applied; the consumer carries on.

Offsets: per partition the log stores `next` (where to resume: the first record still waiting
for a checkpoint, else after the last record) and `hwm` (every offset below was seen). After a
restart the records between `next` and `hwm` are read again: those already applied are skipped
quietly; a duplicate event_id at or above `hwm` is a replay and goes to the DLQ.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from events import topics
from events.dlq import dead_letter, encode_dead_letter
from events.envelope import DecodeError, Envelope, decode
from events.kafka import (
    KafkaSettings,
    assign_from_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
)
from events.models import LIFECYCLE_TYPES
from events.signing import ChainVerifier, TrustStore

log = logging.getLogger("openkcm.core.lifecycle")

ALLOWED_PRODUCERS = {
    "TenantCreated": {"registry"},
    "TenantDeleted": {"registry"},
    "TenantRestored": {"registry"},
    "TenantRegionsChanged": {"registry"},
    "RegionFailover": {"operator", "registry"},
}


LINK_DOWN_AFTER = 5.0


class LifecycleConsumer:
    def __init__(self, engine, settings: KafkaSettings, trust: TrustStore,  # type: ignore[no-untyped-def]
                 max_records: int = 5_000) -> None:
        self.engine = engine
        self.settings = settings
        self.trust = trust
        self.max_records = max_records
        self.name = f"core:{engine.region}"
        self.verifier = ChainVerifier(trust)
        self.pending: dict[tuple[int, str], list[tuple[int, Envelope, Any]]] = {}
        self.highwater: dict[int, int] = {}
        self.position: dict[int, int] = {}
        self.applied: dict[int, int] = {}
        """Per partition: every record below this offset was decided and its batch committed."""
        self.dead_letters = 0
        self.connected = False
        self.last_error: str | None = None
        self._producer: Any = None
        self.responses = 0
        """Fetch answers received from the broker (the reconciler waits for a fresh one)."""
        self.last_response: float | None = None  # monotonic time of the last one
        self.on_link_up: list[Any] = []
        """Called when the broker answers again after the link was down (reconciliation)."""
        self._poll_ts = 0

    @property
    def link_up(self) -> bool:
        """The broker answered a fetch within LINK_DOWN_AFTER seconds (aiokafka reconnects
        by itself: a cut link shows as fetches that stop being answered, not as an error)."""
        return (self.connected and self.last_response is not None
                and time.monotonic() - self.last_response < LINK_DOWN_AFTER)

    def _saw_fetch(self, consumer: Any, tps: list[Any], reconnected: bool) -> bool:
        ts = max((consumer.last_poll_timestamp(tp) or 0 for tp in tps), default=0)
        if not ts or ts == self._poll_ts:
            return False
        self._poll_ts = ts
        now = time.monotonic()
        down = reconnected or (self.last_response is not None
                               and now - self.last_response >= LINK_DOWN_AFTER)
        self.responses += 1
        self.last_response = now
        if down:
            log.info("lifecycle consumer: the broker answers again")
            for callback in self.on_link_up:
                callback()
        return True

    @property
    def lag(self) -> int | None:
        if not self.highwater:
            return None
        return sum(max(0, hw - self.position.get(p, 0)) for p, hw in self.highwater.items())

    def _stored(self) -> dict[int, tuple[int, int]]:
        return {int(p): (v[0], v[1]) for p, v in self.engine.log.meta.offsets.items()}

    def process(self, batch: Mapping[Any, list[Any]]) -> tuple[list[Any], list[Any]]:
        """Decide a batch: (accepted (event, raw, partition), dead letters). Offsets are
        attached by `commit_batch`. Pure of I/O except the dedupe lookups in the log."""
        stored = self._stored()
        meta = self.engine.log.meta
        accepted: list[tuple[dict[str, Any], bytes, int]] = []
        dead: list[Any] = []
        seen_ids: set[str] = set()
        pseq: dict[str, int] = {}
        self._new_offsets: dict[int, tuple[int, int]] = {}

        def reject(rec: Any, reason: str, env: Envelope | None) -> None:
            dead.append(dead_letter(
                consumer=self.name, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                reason=reason, key=rec.key, value=rec.value,
                event_id=str(env.event_id) if env is not None else None,
                event_type=env.type if env is not None else None))

        for tp, records in batch.items():
            p = tp.partition
            _, hwm = stored.get(p, (0, 0))
            for rec in records:
                try:
                    env = decode(rec.value)
                except DecodeError as exc:
                    reject(rec, f"undecodable: {exc}", None)
                    continue
                if env.type not in LIFECYCLE_TYPES:
                    reject(rec, f"{env.type} is not a lifecycle event", env)
                    continue
                if env.producer not in ALLOWED_PRODUCERS[env.type]:
                    reject(rec, f"{env.producer} may not publish {env.type}", env)
                    continue
                chain = (topics.LIFECYCLE, p, env.producer)
                waiting = self.pending.setdefault((p, env.producer), [])
                lookup = {id(e): r for _, e, r in waiting}
                lookup[id(env)] = rec
                verified, rejected = self.verifier.feed(chain, env)
                if verified:  # a checkpoint: nothing of this chain waits any more
                    self.pending[(p, env.producer)] = []
                elif not rejected:
                    waiting.append((rec.offset, env, rec))
                    continue  # waits for its checkpoint
                for bad, reason in rejected:
                    reject(lookup.get(id(bad), rec), f"authentication failed: {reason}", bad)
                for good in verified:
                    r = lookup.get(id(good), rec)
                    eid = str(good.event_id)
                    if eid in seen_ids or self.engine.log.has_event(eid):
                        if r.offset < hwm:
                            continue  # read again after a restart; applied before
                        reject(r, f"replayed: event_id {eid} was already applied", good)
                        continue
                    key = f"{p}/{good.producer}"
                    last = pseq.get(key, meta.pseq.get(key, 0))
                    if good.seq <= last:
                        reject(r, f"replayed: seq {good.seq} of {good.producer} is not after "
                                  f"the last applied seq {last}", good)
                        continue
                    seen_ids.add(eid)
                    pseq[key] = good.seq
                    accepted.append((orjson.loads(r.value), r.value, p))
            if records:
                last_off = records[-1].offset
                waiting_offs = [o for (pp, _), ws in self.pending.items() if pp == p
                                for o, _, _ in ws]
                nxt = min(waiting_offs) if waiting_offs else last_off + 1
                self._new_offsets[p] = (nxt, max(hwm, last_off + 1))
                self.position[p] = last_off + 1
        return accepted, dead

    async def _broker_lost(self, consumer: Any, tps: list[Any]) -> bool:
        ends = await consumer.end_offsets(tps)
        return any(ends.get(tp, 0) < self.position.get(tp.partition, 0) for tp in tps)

    async def _publish_dead(self, dead: list[Any]) -> None:
        if not dead:
            return
        futs = []
        for letter in dead:
            futs.append(await self._producer.send(
                topics.DLQ, encode_dead_letter(letter), key=self.name.encode()))
        await asyncio.gather(*futs)
        self.dead_letters += len(dead)
        for letter in dead:
            log.warning("dead letter %s/%s@%s: %s", letter.topic, letter.partition,
                        letter.offset, letter.reason)

    async def run(self) -> None:
        backoff = 0.2
        while True:
            consumer = None
            try:
                await ensure_topics(self.settings, [topics.LIFECYCLE, topics.DLQ])
                self._producer = make_producer(self.settings)
                await self._producer.start()
                consumer = make_consumer(self.settings, max_poll_records=self.max_records)
                await consumer.start()
                stored = self._stored()
                tps = await assign_from_offsets(consumer, topics.LIFECYCLE,
                                                {p: v[0] for p, v in stored.items()})
                self.verifier = ChainVerifier(self.trust)
                self.pending = {}
                self.position = {p: v[0] for p, v in stored.items()}
                self.applied = dict(self.position)
                self.connected = True
                backoff = 0.2
                resets = self.engine.broker_resets
                idle = 0
                reconnected = self.last_error is not None
                while True:
                    batch = await consumer.getmany(timeout_ms=500, max_records=self.max_records)
                    for tp in tps:
                        hw = consumer.highwater(tp)
                        if hw is not None:
                            self.highwater[tp.partition] = hw
                    if self._saw_fetch(consumer, tps, reconnected):
                        reconnected = False
                    if not any(batch.values()):
                        idle += 1
                        if resets != self.engine.broker_resets or (
                                idle % 10 == 0 and await self._broker_lost(consumer, tps)):
                            # The broker came back empty: read every partition from its start
                            # again (what was applied is skipped by event_id below the
                            # high-water mark; new events are applied).
                            log.warning("lifecycle topic was emptied: reading it from the start")
                            resets = self.engine.broker_resets
                            self.verifier = ChainVerifier(self.trust)
                            self.pending = {}
                            for tp in tps:
                                consumer.seek(tp, 0)
                                self.position[tp.partition] = 0
                                self.applied[tp.partition] = 0
                        continue
                    accepted, dead = self.process(batch)
                    await self._publish_dead(dead)
                    self.engine.apply_lifecycle(accepted, self._new_offsets)
                    self.applied.update(self.position)
                    self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never crash on one bad record/outage
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("lifecycle consumer: %s; reconnecting", self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.connected = False
                for client in (consumer, self._producer):
                    if client is not None:
                        try:
                            await client.stop()
                        except Exception:  # noqa: BLE001
                            pass
                self._producer = None
