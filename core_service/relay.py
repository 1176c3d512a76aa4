"""The relay: publishes the local log to Kafka (no dual write) and records how far it got.

- Own timeline events go to `kcm.core.keys` (key = tenant id) exactly as logged: they were
  signed into their partition's hash chain when they were appended (a checkpoint signature on
  the last event of each partition in each log batch), so a re-publish after a crash yields
  identical bytes.
- Wrapped blobs go to the compacted `kcm.core.material` (key `tenant/layer/key_id`) as
  `KeyMaterial` events, read from the vault at publish time (the log holds no blobs, so a purge
  leaves nothing to recover); a `TenantPurged` publishes a tombstone for every destroyed
  version. A material event's id is derived from its content and it carries the seq of the
  timeline event that introduced the version. Each publish batch hash-chains its material per
  partition with one checkpoint signature at the end (not one signature per blob, which halved
  end-to-end rotation throughput). Compaction breaks such chains, so readers authenticate a
  blob the stronger way: it must unwrap, under AAD binding tenant, layer and versions, to a key
  whose check value the verified timeline records (hydration and the follower do exactly that).
- When the broker comes back empty (its end offsets fall below what it acknowledged), the relay
  recreates the topics and publishes the whole log again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import uuid
from typing import Any

from aiokafka import TopicPartition

from core_service.canonical import canonical
from core_service.log import OWN, RelayMeta, event_of
from events import topics
from events.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer, partition_for

log = logging.getLogger("openkcm.core.relay")

_MATERIAL_NS = uuid.UUID("6f1c1f1e-6b9a-4d0e-9a57-3c6d1f1c0a01")


def material_key(tenant_id: str, layer: str, key_id: str) -> bytes:
    return f"{tenant_id}/{layer}/{key_id}".encode()


def material_refs(event: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(layer, key_id, parent L2 key id) of the versions an own event introduced or re-wrapped."""
    p = event["payload"]
    etype = event["type"]
    if etype == "TenantInitialized":
        return [("L2", p["l2"]["key_id"], None), ("L3", p["l3"]["key_id"], p["l2"]["key_id"])]
    if etype == "KeyRotated":
        k = p["key"]
        return [(k["layer"], k["key_id"], k.get("parent_key_id"))]
    if etype == "TenantL1Bound":
        return [("L2", kid, None) for kid in p["rewrapped"]]
    return []


class Relay:
    def __init__(self, engine, settings: KafkaSettings, batch: int = 5_000) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.settings = settings
        self.batch = batch
        self.material_partitions = settings.partitions
        self.wake = asyncio.Event()
        self.producer: Any = None
        self.connected = False
        self.published_events = 0
        self.republishes = 0
        self.last_error: str | None = None
        engine.listeners.append(self.wake.set)

    @property
    def backlog(self) -> int:
        return self.engine.log.meta.pos - self.engine.log.relay.pos

    # -- material --------------------------------------------------------------------
    def _material(self, event: dict[str, Any], layer: str, key_id: str,
                  parent: str | None) -> dict[str, Any] | None:
        """The unsigned KeyMaterial envelope of one version (None: purged since)."""
        tid = event["tenant_id"]
        blob = self.engine.vault.get(tid, layer, key_id)
        if blob is None:
            return None  # purged since: its tombstone follows
        if layer == "L2":
            t = self.engine.state.tenants.get(tid)
            wrapped_by = (t.l1_ref if t is not None and t.l1_ref else None) or \
                self.engine.l1.default_ref(tid)
        else:
            wrapped_by = parent or ""
        digest = hashlib.sha256(blob).hexdigest()
        name = f"{tid}/{layer}/{key_id}/{wrapped_by}/{digest}"
        env = {
            "event_id": str(uuid.uuid5(_MATERIAL_NS, name)),
            "type": "KeyMaterial",
            "schema_version": 1,
            "tenant_id": tid,
            "producer": event["producer"],
            "seq": event["seq"],
            "occurred_at": event["occurred_at"],
            "payload": {
                "region": event["payload"]["region"],
                "epoch": event["payload"]["epoch"],
                "layer": layer,
                "key_id": key_id,
                "wrapped_by": wrapped_by,
                "blob": base64.b64encode(blob).decode(),
            },
        }
        return env

    def _sign_material(self, items: list[tuple[bytes, dict[str, Any]]]
                       ) -> list[tuple[bytes, int, bytes]]:
        """(key, partition, wire bytes): chained per partition, the last of each signed."""
        parts = self.material_partitions
        key = self.engine.key
        placed = [(k, partition_for(k, parts), env) for k, env in items]
        last = {p: i for i, (_, p, _) in enumerate(placed)}
        heads: dict[int, str | None] = {}
        out = []
        for i, (k, p, env) in enumerate(placed):
            prev = heads.get(p)
            body = canonical(env)
            digest = hashlib.sha256((bytes.fromhex(prev) if prev else b"") + body).digest()
            heads[p] = digest.hex()
            sig = key.sign(digest) if last[p] == i else None
            out.append((k, p, canonical({**env, "auth": {"key_id": key.key_id, "prev": prev,
                                                          "sig": sig}})))
        return out

    # -- publishing ------------------------------------------------------------------
    async def _connect(self) -> None:
        await ensure_topics(self.settings)
        consumer = make_consumer(self.settings)
        await consumer.start()
        try:
            tps = [TopicPartition(topics.CORE_KEYS, p) for p in range(self.settings.partitions)]
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        if self._lost(ends, tps):
            log.warning("kcm.core.keys lost events (broker emptied?): publishing the log again")
            self.republishes += 1
            self.engine.broker_resets += 1  # the lifecycle consumer reads from the start too
            self.engine.log.save_relay(RelayMeta(0, {}))
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.connected = True

    def _lost(self, ends: dict[Any, int], tps: list[TopicPartition]) -> bool:
        relay = self.engine.log.relay
        return any(ends.get(tp, 0) < relay.ends.get(str(tp.partition), 0) for tp in tps)

    async def _broker_lost_events(self) -> bool:
        consumer = make_consumer(self.settings)
        try:
            await consumer.start()
            tps = [TopicPartition(topics.CORE_KEYS, p) for p in range(self.settings.partitions)]
            return self._lost(await consumer.end_offsets(tps), tps)
        except Exception:  # noqa: BLE001 - not reachable: the send path will notice
            return False
        finally:
            await consumer.stop()

    async def _close(self) -> None:
        self.connected = False
        if self.producer is not None:
            try:
                await self.producer.stop()
            except Exception:  # noqa: BLE001
                pass
            self.producer = None

    async def publish_once(self) -> int:
        """Publish the next batch of the log; returns how many entries it covered."""
        lg = self.engine.log
        relay = lg.relay
        entries = lg.select_events(relay.pos, self.batch)
        if not entries:
            return 0
        out: list[tuple[str, int, bytes, bytes | None]] = []  # (topic, partition, key, value)
        material: list[tuple[bytes, dict[str, Any]]] = []
        # values and tombstones of one key must share a partition: use the topic's real count
        self.material_partitions = len(
            await self.producer.partitions_for(topics.CORE_MATERIAL)) or self.settings.partitions
        parts = self.settings.partitions
        published = 0
        for _, entry in entries:
            if entry[:1] != OWN:
                continue
            event = event_of(entry)
            tid = event["tenant_id"]
            out.append((topics.CORE_KEYS, partition_for(tid.encode(), parts), tid.encode(),
                        entry[1:]))
            published += 1
            if event["type"] == "TenantPurged":
                # material queued so far goes first: a tombstone must stay the last word
                out += [(topics.CORE_MATERIAL, mp, k, v) for k, mp, v in
                        self._sign_material(material)]
                material.clear()
                pl = event["payload"]
                for layer, kid in zip(pl["destroyed_layers"], pl["destroyed"], strict=False):
                    k = material_key(tid, layer, kid)
                    out.append((topics.CORE_MATERIAL, partition_for(k, self.material_partitions),
                                k, None))
                continue
            for layer, kid, parent in material_refs(event):
                env = self._material(event, layer, kid, parent)
                if env is not None:
                    material.append((material_key(tid, layer, kid), env))
        out += [(topics.CORE_MATERIAL, mp, k, v) for k, mp, v in self._sign_material(material)]
        sent = await self._send_all(out)
        ends = dict(relay.ends)
        for (topic, p), end in sent.items():
            if topic == topics.CORE_KEYS:
                ends[str(p)] = max(ends.get(str(p), 0), end)
        self.published_events += published
        lg.save_relay(RelayMeta(entries[-1][0], ends))
        return len(entries)

    async def _send_all(self, records: list[tuple[str, int, bytes, bytes | None]]
                        ) -> dict[tuple[str, int], int]:
        """Send records as one record batch per partition (order kept within a partition),
        wait for every acknowledgement, and return per partition an end offset the broker
        must have reached (at least).
        Batches skip the per-message bookkeeping of `send()`: about twice the throughput."""
        groups: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}
        for topic, p, k, v in records:
            groups.setdefault((topic, p), []).append((k, v))
        pending: list[tuple[tuple[str, int], int, Any]] = []
        for (topic, p), items in groups.items():
            batch, n = self.producer.create_batch(), 0
            for k, v in items:
                if batch.append(key=k, value=v, timestamp=None) is None:
                    pending.append(((topic, p), n,
                                    await self.producer.send_batch(batch, topic, partition=p)))
                    batch, n = self.producer.create_batch(), 0
                    if batch.append(key=k, value=v, timestamp=None) is None:
                        raise ValueError(f"a record of {len(v or b'')} bytes exceeds the batch")
                n += 1
            if n:
                pending.append(((topic, p), n,
                                await self.producer.send_batch(batch, topic, partition=p)))
        ends: dict[tuple[str, int], int] = {}
        for tp, _n, fut in pending:
            md = await fut
            # The batch's first record is at md.offset, so the end is at least md.offset + 1.
            # Not + n: the embedded broker reports a high watermark of the last batch's base
            # offset + 1, and a higher recorded end would look like lost records on every
            # reconnect (republishing the whole log and rewinding the lifecycle consumer).
            ends[tp] = max(ends.get(tp, 0), md.offset + 1)
        return ends

    async def run(self) -> None:
        backoff = 0.2
        idle = 0
        while True:
            try:
                if not self.connected:
                    await self._connect()
                    backoff = 0.2
                n = await self.publish_once()
                self.last_error = None
                if n == 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), 1.0)
                    except TimeoutError:
                        idle += 1
                        if idle % 5 == 0 and await self._broker_lost_events():
                            await self._close()
            except asyncio.CancelledError:
                await self._close()
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect and go on
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("relay: %s; reconnecting", self.last_error)
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
