"""The follower: after a split, the versions the old owner minted with a stale epoch reach
`kcm.core.keys` once its link heals. The owner imports them decrypt-only, so every DEK wrapped
on either side of the split still unwraps here and no key version is lost.

The follower reads `kcm.core.keys` from offsets stored in the log head (`key_offsets`),
authenticates every other region's events through their hash chains (`ChainVerifier`), and
keeps the `KeyRotated`/`TenantInitialized` events that
- concern a tenant this region owns (active or pending purge),
- were stamped with an epoch below the tenant's current epoch (the other side of a split),
- introduce a key version the timeline does not know.
For those it fetches the wrapped blob from `kcm.core.material`, unwraps it (an L2 through L1,
an L3 through its parent L2, which may be a stale L2 of the same batch), checks the key check
value against the verified event, stores the blob in the vault and, in one transaction with the
new offsets, appends the event as an imported entry flagged stale. A stale version is listed on
the timeline view under `stale` and is never current: rotation continues from the owner's own
versions.

Offsets are written with imports and otherwise every few seconds: re-reading is harmless (a
version already known is skipped). While a hydration is pending the follower holds back, so an
event it skips for a tenant not owned yet was published before that hydration read the log.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

from core_service import state as st
from core_service.hydration import hydration_pending
from core_service.keys import l2_aad, l3_aad
from core_service.replicated import read_material
from events import topics
from events.envelope import DecodeError
from events.fastpath import read_raw
from events.kafka import (
    KafkaSettings,
    assign_from_offsets,
    ensure_topics,
    make_consumer,
)
from events.signing import ChainVerifier, TrustStore
from plugins.crypto import KeyHandle, UnwrapError
from plugins.l1 import L1Refused

log = logging.getLogger("openkcm.core.follower")

_KEY_EVENTS = ("KeyRotated", "TenantInitialized")


def _versions(event: dict[str, Any]) -> list[dict[str, Any]]:
    p = event["payload"]
    if event["type"] == "TenantInitialized":
        return [p["l2"], p["l3"]]
    return [p["key"]]


class Follower:
    def __init__(self, engine, settings: KafkaSettings, trust: TrustStore,  # type: ignore[no-untyped-def]
                 max_records: int = 5_000, flush_every: float = 5.0) -> None:
        self.engine = engine
        self.settings = settings
        self.trust = trust
        self.max_records = max_records
        self.flush_every = flush_every
        self.connected = False
        self.imported = 0
        self.rejected: list[dict[str, str]] = []
        self.last_error: str | None = None
        self.waiting_material: dict[tuple[int, int], dict[str, Any]] = {}
        """(partition, offset) -> a stale event whose material has not arrived yet."""
        self._unverified: dict[tuple[int, str], list[tuple[int, Any]]] = {}
        self._next: dict[int, int] = {}

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "stale_imported": self.imported,
                "waiting_for_material": len(self.waiting_material),
                "rejected": self.rejected[-20:], "offsets": self.engine.log.meta.key_offsets,
                "last_error": self.last_error}

    # -- decisions (no I/O) ----------------------------------------------------------
    def wanted(self, event: dict[str, Any]) -> bool:
        """A stale-epoch version of a tenant owned here that the timeline does not know."""
        e = self.engine
        if event["type"] not in _KEY_EVENTS or event["producer"] == e.region:
            return False
        t = e.state.tenants.get(event.get("tenant_id") or "")
        if t is None or t.owner != e.region or t.status not in (st.ACTIVE, st.PENDING_PURGE):
            return False
        if int(event["payload"]["epoch"]) >= t.epoch:
            return False  # not stale: another owner at our epoch or above is fencing's business
        known = {(k.layer, k.key_id) for k in (*t.l2, *t.l3, *t.stale)}
        return any((kv["layer"], kv["key_id"]) not in known for kv in _versions(event))

    def _offsets(self) -> dict[str, int]:
        out = dict(self.engine.log.meta.key_offsets)
        for p, nxt in self._next.items():
            held = [o for (pp, _), evs in self._unverified.items() if pp == p for o, _ in evs]
            held += [o for (pp, o) in self.waiting_material if pp == p]
            out[str(p)] = min([nxt, *held])
        return out

    # -- importing -------------------------------------------------------------------
    async def _import(self, candidates: dict[tuple[int, int], dict[str, Any]]) -> None:
        e = self.engine
        tenants = {ev["tenant_id"] for ev in candidates.values() if _versions(ev)}
        material = await read_material(self.settings, tenants) if tenants else {}
        txn = e.begin()
        at = e.clock.now()
        fresh: dict[tuple[str, str, str], KeyHandle] = {}
        # L2 versions first: a stale L3 may hang under a stale L2 of the same batch.
        order = sorted(candidates.items(), key=lambda kv: (
            kv[1]["type"] != "TenantInitialized", kv[1]["payload"].get("key", {}).get("layer")
            != "L2", kv[0]))
        for where, ev in order:
            if not self.wanted(ev):
                self.waiting_material.pop(where, None)
                continue
            tid = ev["tenant_id"]
            staged: list[tuple[str, str, KeyHandle, bytes]] = []
            why = ""
            for kv in sorted(_versions(ev), key=lambda k: k["layer"]):
                m = material.get(tid, {}).get((kv["layer"], kv["key_id"]))
                if m is None:
                    why = "material"
                    break
                blob = base64.b64decode(m["blob"])
                try:
                    h = self._unwrap(tid, kv, m, blob, fresh)
                except (UnwrapError, L1Refused, KeyError) as exc:
                    why = f"{kv['layer']} {kv['key_id']} does not unwrap: {type(exc).__name__}"
                    break
                if h.kcv != kv["kcv"]:
                    h.destroy()
                    why = f"KCV mismatch for {kv['layer']} {kv['key_id']}"
                    break
                fresh[(tid, kv["layer"], kv["key_id"])] = h
                staged.append((kv["layer"], kv["key_id"], h, blob))
            if why == "material":
                self.waiting_material[where] = ev  # its material follows; retried
                for *_, h, _b in staged:
                    h.destroy()
                continue
            self.waiting_material.pop(where, None)
            if why:
                self.rejected.append({"tenant": tid, "event_id": ev["event_id"], "reason": why})
                log.warning("stale version of %s from %s not imported: %s", tid,
                            ev["producer"], why)
                for *_, h, _b in staged:
                    h.destroy()
                continue
            for layer, kid, h, blob in staged:
                txn.vault_items.append((tid, layer, kid, blob))
                txn.stage(tid, layer, kid, h)
            e.import_event(txn, tid, ev, True, at)
            self.imported += len(staged)
            log.warning("imported stale %s of %s from %s (epoch %s) decrypt-only",
                        ",".join(k for _, k, _, _ in staged), tid, ev["producer"],
                        ev["payload"]["epoch"])
        txn.meta.key_offsets = self._offsets()
        e.commit(txn)

    def _unwrap(self, tid: str, kv: dict[str, Any], m: dict[str, Any], blob: bytes,
                fresh: dict[tuple[str, str, str], KeyHandle]) -> KeyHandle:
        e = self.engine
        kid = kv["key_id"]
        if kv["layer"] == "L2":
            t = e.state.tenants[tid]
            last: Exception = UnwrapError("no L1 reference")
            for ref in dict.fromkeys(r for r in (m.get("wrapped_by"), t.l1_ref,
                                                 *reversed(t.l1_history)) if r):
                try:
                    return e.l1.unwrap(ref, blob, l2_aad(tid, ref, kid))  # type: ignore[no-any-return]
                except (UnwrapError, L1Refused) as exc:
                    last = exc
            raise last
        parent_id = kv.get("parent_key_id") or ""
        parent = fresh.get((tid, "L2", parent_id))
        if parent is None:
            parent = e._l2_handle(None, tid, parent_id)
        return parent.unwrap(blob, l3_aad(tid, kid, parent_id))  # type: ignore[no-any-return]

    # -- the loop --------------------------------------------------------------------
    async def run(self) -> None:
        backoff = 0.2
        while True:
            consumer = None
            try:
                await ensure_topics(self.settings, [topics.CORE_KEYS, topics.CORE_MATERIAL])
                consumer = make_consumer(self.settings, max_poll_records=self.max_records)
                await consumer.start()
                stored = {int(p): o for p, o in self.engine.log.meta.key_offsets.items()}
                await assign_from_offsets(consumer, topics.CORE_KEYS, stored)
                verifier = ChainVerifier(self.trust)
                self._unverified = {}
                self._next = dict(stored)
                self.waiting_material = {}
                self.connected = True
                backoff = 0.2
                flushed = time.monotonic()
                own = b'"producer":"' + self.engine.region.encode() + b'"'
                while True:
                    if hydration_pending(self.engine):
                        await asyncio.sleep(0.2)
                        continue
                    batch = await consumer.getmany(timeout_ms=500, max_records=self.max_records)
                    candidates = dict(self.waiting_material)
                    for tp, records in batch.items():
                        p = tp.partition
                        for rec in records:
                            self._next[p] = rec.offset + 1
                            if own in rec.value:
                                continue  # our own events (canonical JSON): the log has them
                            try:
                                ev = read_raw(rec.value)
                            except DecodeError:
                                continue
                            if ev.producer == self.engine.region:
                                continue  # our own events: the local log has them
                            chain = (p, ev.producer)
                            good, _bad = verifier.feed((topics.CORE_KEYS, *chain), ev)
                            waiting = self._unverified.setdefault(chain, [])
                            if not good and not _bad:
                                waiting.append((rec.offset, ev))
                                continue
                            at = {id(w): o for o, w in waiting}
                            if good:
                                self._unverified[chain] = []
                            for ok in good:
                                if self.wanted(ok.data):
                                    candidates[(p, at.get(id(ok), rec.offset))] = ok.data
                    if candidates:
                        await self._import(candidates)
                        flushed = time.monotonic()
                        if self.waiting_material:
                            await asyncio.sleep(0.5)
                    elif time.monotonic() - flushed > self.flush_every and (
                            self._offsets() != self.engine.log.meta.key_offsets):
                        txn = self.engine.begin()
                        txn.meta.key_offsets = self._offsets()
                        self.engine.commit(txn)
                        flushed = time.monotonic()
                    self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect and go on
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("follower: %s; reconnecting", self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.connected = False
                if consumer is not None:
                    try:
                        await consumer.stop()
                    except Exception:  # noqa: BLE001
                        pass
