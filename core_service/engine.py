"""The Core's write path: commands become events, events are folded, and one synced
WriteBatch records them. Wrapped blobs go to the vault first (durably), then the log batch that
references them. Every method here is synchronous: a transaction never awaits, so in the single
asyncio loop of the Core no two transactions interleave.

Also the read path of the Gateway: DEK generate and unwrap from in-memory state only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from core_service import state as st
from core_service.canonical import canonical
from core_service.clock import DAY, Clock, iso
from core_service.keys import (
    BadWrappedDek,
    KeyCache,
    dek_header,
    l2_aad,
    l3_aad,
    parse_wrapped,
)
from core_service.log import IMPORTED, LIFECYCLE, LOCAL, OWN, EventLog, LogMeta
from core_service.memory import gc_paused
from core_service.state import CoreState, TenantState, apply
from events.ids import key_version_id
from events.kafka import DEFAULT_PARTITIONS, partition_for
from events.signing import SigningKey
from plugins.crypto import KeyHandle, UnwrapError, new_dek
from plugins.l1 import L1Provider, L1Refused
from plugins.vault import Vault

log = logging.getLogger("openkcm.core")

_BIND_MARK = b"b"
HYDRATION_PENDING = b"h/"  # + RegionFailover event id -> hydration still to do (JSON)


def new_event_id() -> str:
    """A random (version 4) UUID in its string form, as `str(uuid.uuid4())` gives, without
    building a UUID object."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class CoreConfig:
    region: str
    data_dir: Path
    l3_period: float = 90 * DAY
    l2_period: float = 365 * DAY
    purge_grace: float = 7 * DAY
    partitions: int = DEFAULT_PARTITIONS
    max_batch: int = 5_000


class TenantUnavailable(Exception):
    """A request this region will not serve; `status`/`code`/`message` become the HTTP error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class _Txn:
    """One transaction: entries, the tenant states they fold to, staged vault blobs and
    handles, the new head. Committed by Engine.commit in one WriteBatch."""

    meta: LogMeta
    entries: list[tuple[bytes, dict[str, Any], bytes | None]] = field(default_factory=list)
    overlay: dict[str, TenantState] = field(default_factory=dict)
    vault_items: list[tuple[str, Any, str, bytes]] = field(default_factory=list)
    handles: list[tuple[str, str, str, KeyHandle]] = field(default_factory=list)
    event_ids: list[tuple[str, int]] = field(default_factory=list)
    puts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    """Tenants whose unsealed handles are forgotten after the commit (purged or moved away)."""
    results: list[dict[str, Any]] = field(default_factory=list)

    by_tenant: dict[str, dict[tuple[str, str], KeyHandle]] = field(default_factory=dict)
    """The staged handles per tenant, by (layer, key id)."""

    def stage(self, tenant_id: str, layer: str, key_id: str, handle: KeyHandle) -> None:
        self.handles.append((tenant_id, layer, key_id, handle))
        mine = self.by_tenant.get(tenant_id)
        if mine is None:
            mine = self.by_tenant[tenant_id] = {}
        mine[(layer, key_id)] = handle

    def staged(self, tenant_id: str, layer: str, key_id: str) -> KeyHandle | None:
        mine = self.by_tenant.get(tenant_id)
        return None if mine is None else mine.get((layer, key_id))

    def discard(self) -> None:
        for *_, h in self.handles:
            h.destroy()
        self.handles.clear()
        self.by_tenant.clear()


class Engine:
    def __init__(
        self,
        config: CoreConfig,
        log_: EventLog,
        vault: Vault,
        l1: L1Provider,
        signing_key: SigningKey,
        clock: Clock,
    ) -> None:
        self.config = config
        self.region = config.region
        self.log = log_
        self.vault = vault
        self.l1 = l1
        self.key = signing_key
        self.clock = clock
        self.state = CoreState(self.region, log_.load_tenants())
        self.cache = KeyCache()
        self.listeners: list[Any] = []  # called after each commit (the relay's wake-up)
        self.broker_resets = 0  # the relay counts brokers that came back empty
        self.hydration_requested = False  # set with a pending hydration marker (hydration.py)
        self.rebuilding = False  # lifecycle without side effects (rebuild.py)
        self._iso_memo: tuple[float, str] = (float("nan"), "")
        self.counters: dict[str, int] = {
            "deks_generated": 0, "deks_unwrapped": 0, "dek_refusals": 0, "rotations": 0,
            "lifecycle_applied": 0, "purges": 0, "initialized": 0,
        }

    # -- transactions ------------------------------------------------------------------
    def _iso(self, at: float) -> str:
        """`iso(at)`, remembered for the last `at` (a transaction stamps many events with
        the same time)."""
        memo = self._iso_memo
        if memo[0] == at:
            return memo[1]
        text = iso(at)
        self._iso_memo = (at, text)
        return text

    def begin(self) -> _Txn:
        return _Txn(self.log.meta.copy())

    def tenant(self, txn: _Txn | None, tenant_id: str) -> TenantState | None:
        if txn is not None and tenant_id in txn.overlay:
            return txn.overlay[tenant_id]
        return self.state.tenants.get(tenant_id)

    def _fold(self, txn: _Txn, event: Mapping[str, Any]) -> None:
        tid = event.get("tenant_id")
        if tid is None:
            return
        new = apply(self.tenant(txn, tid), event, self.region)
        if new is not None:
            txn.overlay[tid] = new

    def _own(self, txn: _Txn, etype: str, tenant_id: str, payload: dict[str, Any], at: float
             ) -> dict[str, Any]:
        txn.meta.seq += 1
        event = {
            "event_id": new_event_id(),
            "type": etype,
            "schema_version": 1,
            "tenant_id": tenant_id,
            "producer": self.region,
            "seq": txn.meta.seq,
            "occurred_at": self._iso(at),
            "payload": payload,
        }
        txn.entries.append((OWN, event, None))
        self._fold(txn, event)
        return event

    def _lifecycle(self, txn: _Txn, event: dict[str, Any], raw: bytes) -> None:
        txn.entries.append((LIFECYCLE, event, raw))
        txn.event_ids.append((str(event["event_id"]), len(txn.entries)))
        self._fold(txn, event)

    def _local(self, txn: _Txn, etype: str, tenant_id: str, payload: dict[str, Any], at: float
               ) -> None:
        event = {
            "event_id": new_event_id(), "type": etype, "tenant_id": tenant_id,
            "producer": self.region, "occurred_at": self._iso(at), "payload": payload,
        }
        txn.entries.append((LOCAL, event, None))
        self._fold(txn, event)

    def import_event(self, txn: _Txn, tenant_id: str, event: Mapping[str, Any], stale: bool,
                     at: float) -> None:
        """Record another region's verified timeline event (an `I` entry) and fold it."""
        record = {
            "event_id": new_event_id(), "type": st.TIMELINE_IMPORTED, "tenant_id": tenant_id,
            "producer": self.region, "occurred_at": self._iso(at),
            "payload": {"event": dict(event), "stale": stale},
        }
        txn.entries.append((IMPORTED, record, None))
        self._fold(txn, record)

    def emit(self, txn: _Txn, etype: str, tenant_id: str, payload: dict[str, Any], at: float
             ) -> dict[str, Any]:
        """Append one of this region's own timeline events (published by the relay)."""
        return self._own(txn, etype, tenant_id, payload, at)

    def commit(self, txn: _Txn) -> None:
        if not txn.entries and not txn.puts and not txn.deletes:
            if (txn.meta.offsets != self.log.meta.offsets or txn.meta.pseq != self.log.meta.pseq
                    or txn.meta.key_offsets != self.log.meta.key_offsets):
                self.log.insert_events([], {}, txn.meta)
            return
        try:
            if txn.vault_items:
                self.vault.put_many(txn.vault_items)  # durable before the log references them
            entries = self._encode(txn)
            base = txn.meta.pos
            txn.meta.pos = base + len(entries)
            ids = {eid: base + idx for eid, idx in txn.event_ids}
            self.log.insert_events(
                entries, txn.overlay, txn.meta, event_ids=ids, puts=txn.puts,
                deletes=txn.deletes,
            )
        except BaseException:
            txn.discard()
            raise
        self.state.tenants.update(txn.overlay)
        self._cache_staged(txn)
        for tid in txn.purged:
            self.cache.drop(tid)
        for listener in self.listeners:
            listener()

    def _cache_staged(self, txn: _Txn) -> None:
        """Keep the new handles of tenants whose key set in memory is complete (or becomes
        complete with them); others are unsealed from the vault on first use."""
        tenants = self.state.tenants
        cache_l2, cache_l3 = self.cache.l2, self.cache.l3
        for tid, have in txn.by_tenant.items():
            t = tenants.get(tid)
            l2 = cache_l2.get(tid)
            l3 = cache_l3.get(tid)
            complete = l2 is not None and l3 is not None
            if not complete and t is not None:
                complete = all(("L2", k.key_id) in have for k in t.l2) and all(
                    ("L3", k.key_id) in have for k in t.l3) and all(
                    (k.layer, k.key_id) in have for k in t.stale)
                if complete:
                    l2 = cache_l2.setdefault(tid, {})
                    l3 = cache_l3.setdefault(tid, {})
            if complete and t is not None and t.status != st.PURGED:
                assert l2 is not None and l3 is not None
                for (layer, kid), h in have.items():
                    (l2 if layer == "L2" else l3)[kid] = h
            else:
                for h in have.values():
                    h.destroy()
        # a handle staged twice under one id was replaced (the cache kept the last one)
        txn.handles.clear()
        txn.by_tenant.clear()

    def _encode(self, txn: _Txn) -> list[bytes]:
        """Entry bytes; own events signed into their partition's hash chain, the last event
        of each partition in this batch carrying the checkpoint signature."""
        parts = self.config.partitions
        last: dict[int, int] = {}
        own_part: dict[int, int] = {}
        for i, (kind, event, _) in enumerate(txn.entries):
            if kind == OWN:
                p = partition_for(event["tenant_id"].encode(), parts)
                own_part[i] = p
                last[p] = i
        out = []
        key_id = self.key.key_id
        heads = txn.meta.heads
        prev_raw: dict[int, bytes] = {}  # partition -> its head's bytes within this batch
        sha256 = hashlib.sha256
        for i, (kind, event, raw) in enumerate(txn.entries):
            if kind == OWN:
                p = own_part[i]
                prev = heads.get(str(p))
                body = canonical(event)
                pb = prev_raw.get(p)
                if pb is None:
                    pb = bytes.fromhex(prev) if prev else b""
                digest = sha256(pb + body).digest()
                prev_raw[p] = digest
                auth = {
                    "key_id": key_id,
                    "prev": prev,
                    "sig": self.key.sign(digest) if last[p] == i else None,
                }
                heads[str(p)] = digest.hex()
                if event and min(event) > "auth":  # "auth" sorts first: splice it into the body
                    out.append(OWN + b'{"auth":' + canonical(auth) + b"," + body[1:])
                else:
                    out.append(OWN + canonical({**event, "auth": auth}))
            elif kind == LIFECYCLE:
                assert raw is not None
                out.append(LIFECYCLE + raw)
            elif kind == IMPORTED:
                out.append(IMPORTED + orjson.dumps(event))
            else:
                out.append(LOCAL + orjson.dumps(event))
        return out

    # -- key material ------------------------------------------------------------------
    def _l2_handle(self, txn: _Txn | None, tenant_id: str, key_id: str) -> KeyHandle:
        if txn is not None:
            h = txn.staged(tenant_id, "L2", key_id)
            if h is not None:
                return h
        h = self.cache.l2.get(tenant_id, {}).get(key_id)
        if h is None:
            self.unseal(tenant_id)
            h = self.cache.l2[tenant_id][key_id]
        return h

    def _new_l2(self, txn: _Txn, t: TenantState, l1_ref: str, epoch: int, version: int,
                at: float) -> dict[str, Any]:
        kid = key_version_id(epoch, version)
        h = KeyHandle.generate()
        blob = self.l1.wrap(l1_ref, h, l2_aad(t.tenant_id, l1_ref, kid))
        txn.vault_items.append((t.tenant_id, "L2", kid, blob))
        txn.stage(t.tenant_id, "L2", kid, h)
        return {"layer": "L2", "version": version, "epoch": epoch, "key_id": kid,
                "parent_key_id": None, "kcv": h.kcv, "created_at": self._iso(at)}

    def _new_l3(self, txn: _Txn, t: TenantState, parent: str, epoch: int, version: int,
                at: float) -> dict[str, Any]:
        kid = key_version_id(epoch, version)
        h = KeyHandle.generate()
        blob = self._l2_handle(txn, t.tenant_id, parent).wrap(h, l3_aad(t.tenant_id, kid, parent))
        txn.vault_items.append((t.tenant_id, "L3", kid, blob))
        txn.stage(t.tenant_id, "L3", kid, h)
        return {"layer": "L3", "version": version, "epoch": epoch, "key_id": kid,
                "parent_key_id": parent, "kcv": h.kcv, "created_at": self._iso(at)}

    def _initialize(self, txn: _Txn, tenant_id: str, at: float) -> bool:
        t = self.tenant(txn, tenant_id)
        if t is None or t.status != st.INITIALIZING:
            return False
        epoch = max(1, t.epoch)
        try:
            ref = self.l1.default_ref(tenant_id)
            l2 = self._new_l2(txn, t, ref, epoch, 1, at)
            l3 = self._new_l3(txn, t, l2["key_id"], epoch, 1, at)
        except L1Refused as exc:
            log.warning("tenant %s stays initializing: L1 refused: %s", tenant_id, exc)
            return False
        self._own(txn, "TenantInitialized", tenant_id, {
            "region": self.region, "epoch": epoch, "l1_ref": ref, "l2": l2, "l3": l3}, at)
        self.counters["initialized"] += 1
        return True

    def _rotate(self, txn: _Txn, tenant_id: str, layer: str, trigger: str, at: float
                ) -> list[dict[str, Any]]:
        t = self.tenant(txn, tenant_id)
        self._check_owner(t, tenant_id)
        assert t is not None and t.current_l2 is not None and t.current_l3 is not None
        out = []
        parent = t.current_l2.key_id
        if layer == "L2":
            kv = self._new_l2(txn, t, t.l1_ref or self.l1.default_ref(tenant_id), t.epoch,
                              t.current_l2.version + 1, at)
            self._own(txn, "KeyRotated", tenant_id, {
                "region": self.region, "epoch": t.epoch, "key": kv, "trigger": trigger}, at)
            out.append(kv)
            parent = kv["key_id"]
            trigger = "l2-rotation"
        kv = self._new_l3(txn, t, parent, t.epoch, t.current_l3.version + 1, at)
        self._own(txn, "KeyRotated", tenant_id, {
            "region": self.region, "epoch": t.epoch, "key": kv, "trigger": trigger}, at)
        out.append(kv)
        txn.meta.last_rotation = at
        txn.meta.rotations += len(out)
        self.counters["rotations"] += len(out)
        return out

    def _check_owner(self, t: TenantState | None, tenant_id: str) -> None:
        if t is None or t.status != st.ACTIVE or t.owner != self.region:
            raise self._unavailable(t, tenant_id)

    # -- commands ----------------------------------------------------------------------
    def rotate_many(self, requests: Iterable[tuple[str, str, str]], at: float | None = None
                    ) -> list[list[dict[str, Any]] | TenantUnavailable]:
        """Rotate (tenant, layer, trigger) in one transaction. Per request: the new key
        versions, or why it was refused."""
        at = self.clock.now() if at is None else at
        txn = self.begin()
        out: list[list[dict[str, Any]] | TenantUnavailable] = []
        for tid, layer, trigger in requests:
            try:
                out.append(self._rotate(txn, tid, layer, trigger, at))
            except TenantUnavailable as exc:
                out.append(exc)
            except L1Refused as exc:
                out.append(TenantUnavailable(503, "l1_refused", str(exc)))
        self.commit(txn)
        return out

    def set_policy(self, tenant_id: str, l3_period: float | None, l2_period: float | None
                   ) -> TenantState:
        t = self.tenant(None, tenant_id)
        self._check_owner(t, tenant_id)
        txn = self.begin()
        self._local(txn, st.POLICY_SET, tenant_id,
                    {"l3_period": l3_period, "l2_period": l2_period}, self.clock.now())
        self.commit(txn)
        return self.state.tenants[tenant_id]

    def bind_l1(self, tenant_id: str, l1_ref: str) -> dict[str, Any]:
        """Customer-driven L1 rotation: re-wrap every L2 version under `l1_ref`."""
        t = self.tenant(None, tenant_id)
        self._check_owner(t, tenant_id)
        assert t is not None
        previous = t.l1_ref or self.l1.default_ref(tenant_id)
        if l1_ref == previous:
            return {"l1_ref": l1_ref, "previous_l1_ref": previous, "rewrapped": []}
        items = []
        try:
            for kv in t.l2:
                h = self._l2_handle(None, tenant_id, kv.key_id)
                blob = self.l1.wrap(l1_ref, h, l2_aad(tenant_id, l1_ref, kv.key_id))
                items.append((tenant_id, "L2", kv.key_id, blob))
        except L1Refused as exc:
            raise TenantUnavailable(409, "l1_refused", str(exc)) from None
        # The vault is overwritten before the log says so: mark the new reference first, so
        # a crash in between still finds the key that wraps the stored blobs.
        self.log.put_marker(_BIND_MARK + tenant_id.encode(), l1_ref.encode())
        txn = self.begin()
        txn.vault_items.extend(items)
        rewrapped = [kv.key_id for kv in t.l2]
        self._own(txn, "TenantL1Bound", tenant_id, {
            "region": self.region, "epoch": t.epoch, "previous_l1_ref": previous,
            "l1_ref": l1_ref, "rewrapped": rewrapped}, self.clock.now())
        txn.deletes.append(_BIND_MARK + tenant_id.encode())
        self.commit(txn)
        return {"l1_ref": l1_ref, "previous_l1_ref": previous, "rewrapped": rewrapped}

    def apply_lifecycle(self, accepted: list[tuple[dict[str, Any], bytes, int]],
                        offsets: Mapping[int, tuple[int, int]]) -> None:
        """Apply verified lifecycle events (event JSON, wire bytes, partition) and record the
        consumed offsets (partition -> (next, hwm)) in the same transaction."""
        with gc_paused():
            self._apply_lifecycle(accepted, offsets)

    def _apply_lifecycle(self, accepted: list[tuple[dict[str, Any], bytes, int]],
                         offsets: Mapping[int, tuple[int, int]]) -> None:
        now = self.clock.now()
        txn = self.begin()
        for event, raw, partition in accepted:
            self._lifecycle(txn, event, raw)
            txn.meta.pseq[f"{partition}/{event['producer']}"] = int(event["seq"])
            self.counters["lifecycle_applied"] += 1
            if self.rebuilding:
                continue  # facts only: a rebuild takes the keys from the key log (rebuild.py)
            tid = event.get("tenant_id")
            if tid is None:
                if event["type"] == "RegionFailover":
                    self._region_failover(txn, event, now)
                continue
            t = self.tenant(txn, tid)
            etype = event["type"]
            if etype == "TenantCreated":
                self._initialize(txn, tid, now)
            elif etype == "TenantDeleted" and t is not None and t.status == st.ACTIVE:
                if t.owner == self.region:
                    self._own(txn, "TenantPurgeScheduled", tid, {
                        "region": self.region, "epoch": t.epoch,
                        "purge_at": iso(now + self.config.purge_grace),
                        "cause_event_id": str(event["event_id"])}, now)
            elif (etype == "TenantRestored" and t is not None and t.status == st.PENDING_PURGE
                  and t.purge_at is not None and now < t.purge_at):
                self._own(txn, "TenantPurgeCancelled", tid, {
                    "region": self.region, "epoch": t.epoch,
                    "cause_event_id": str(event["event_id"])}, now)
        for p, (nxt, hwm) in offsets.items():
            txn.meta.offsets[str(p)] = [nxt, hwm]
        self.commit(txn)

    def _region_failover(self, txn: _Txn, event: Mapping[str, Any], now: float) -> None:
        """A verified RegionFailover. The survivor records that hydration is pending (in this
        transaction, with the consumed offset; core_service.hydration does the work); every
        other region records the move of each tenant it affects (OwnershipMoved), which fences
        the old owner: it stops rotating and serving them."""
        p = st.lifecycle_payload(event)
        src, dst, epoch = p["from_region"], p["to_region"], int(p["epoch"])
        listed = set(p["tenants"]) if p.get("tenants") is not None else None
        known = {**self.state.tenants, **txn.overlay}
        affected = [t for t in known.values()
                    if t.owner == src and (listed is None or t.tenant_id in listed)]
        if dst == self.region:
            candidates = sorted(t.tenant_id for t in affected
                                if not (t.status == st.ACTIVE and t.owner == self.region))
            marker = {"event_id": str(event["event_id"]), "from_region": src,
                      "to_region": dst, "epoch": epoch, "declared_at": event["occurred_at"],
                      "tenants": candidates, "refused": [], "hydrated": 0}
            txn.puts[HYDRATION_PENDING + str(event["event_id"]).encode()] = orjson.dumps(marker)
            self.hydration_requested = True
            return
        for t in affected:
            if dst not in t.regions or t.status in (st.PURGED, st.FOREIGN) or t.epoch >= epoch:
                continue  # not moved (allow-list excludes the survivor) or already newer
            self._local(txn, st.OWNERSHIP_MOVED, t.tenant_id, {
                "from_region": src, "to_region": dst, "epoch": epoch,
                "cause_event_id": str(event["event_id"])}, now)
            if self.region == src:
                txn.purged.append(t.tenant_id)  # fenced: forget its unsealed keys
                log.warning("tenant %s moved to %s at epoch %s: fenced here",
                            t.tenant_id, dst, max(t.epoch + 1, epoch))

    def run_due(self, now: float, rotations: list[tuple[str, str]], purges: list[str],
                inits: list[str]) -> int:
        """What the scheduler found due, in transactions of at most max_batch tenants."""
        done = 0
        for tid in purges:
            self._purge(tid, now)
            done += 1
        if inits:
            txn = self.begin()
            for tid in inits:
                self._initialize(txn, tid, now)
            self.commit(txn)
        step = self.config.max_batch
        for i in range(0, len(rotations), step):
            chunk = rotations[i : i + step]
            results = self.rotate_many(((tid, layer, "scheduled") for tid, layer in chunk), now)
            done += sum(1 for r in results if not isinstance(r, TenantUnavailable))
        return done

    def _purge(self, tenant_id: str, now: float) -> None:
        t = self.tenant(None, tenant_id)
        if (t is None or t.status != st.PENDING_PURGE or not t.deleted or not t.purge_cause
                or t.purge_at is None or t.purge_at > now):
            return  # only a verified TenantDeleted whose grace ended leads here
        self.vault.destroy_tenant(tenant_id)
        txn = self.begin()
        destroyed = [k.key_id for k in t.l2] + [k.key_id for k in t.l3] + [
            k.key_id for k in t.stale]
        layers = ["L2"] * len(t.l2) + ["L3"] * len(t.l3) + [k.layer for k in t.stale]
        self._own(txn, "TenantPurged", tenant_id, {
            "region": self.region, "epoch": t.epoch, "destroyed": destroyed,
            "destroyed_layers": layers}, now)
        txn.purged.append(tenant_id)
        self.commit(txn)
        self.counters["purges"] += 1

    # -- unsealing ---------------------------------------------------------------------
    def unseal(self, tenant_id: str) -> None:
        """Unwrap a tenant's L2 versions through L1 and its L3 versions through L2, once."""
        t = self.state.tenants.get(tenant_id)
        if t is None or not t.l2 or t.status == st.PURGED:
            raise self._unavailable(t, tenant_id)
        marker = self.log.get(_BIND_MARK + tenant_id.encode())
        candidates = [r for r in (t.l1_ref, marker.decode() if marker else None,
                                  *reversed(t.l1_history)) if r]
        l2: dict[str, KeyHandle] = {}
        for kv in (*t.l2, *(k for k in t.stale if k.layer == "L2")):
            blob = self.vault.get(tenant_id, "L2", kv.key_id)
            if blob is None:
                raise TenantUnavailable(503, "material_missing",
                                        f"L2 {kv.key_id} of {tenant_id} is not in the vault")
            last_error = "no L1 reference"
            for ref in dict.fromkeys(candidates):
                try:
                    l2[kv.key_id] = self.l1.unwrap(ref, blob, l2_aad(tenant_id, ref, kv.key_id))
                    break
                except (UnwrapError, L1Refused) as exc:
                    last_error = str(exc)
            else:
                raise TenantUnavailable(503, "unseal_failed",
                                        f"L2 {kv.key_id} of {tenant_id}: {last_error}")
        l3: dict[str, KeyHandle] = {}
        for kv in (*t.l3, *(k for k in t.stale if k.layer == "L3")):
            blob = self.vault.get(tenant_id, "L3", kv.key_id)
            parent = l2.get(kv.parent_key_id or "")
            if blob is None or parent is None:
                raise TenantUnavailable(503, "material_missing",
                                        f"L3 {kv.key_id} of {tenant_id} cannot be unsealed")
            try:
                l3[kv.key_id] = parent.unwrap(blob, l3_aad(tenant_id, kv.key_id, parent_id(kv)))
            except UnwrapError as exc:
                raise TenantUnavailable(503, "unseal_failed", str(exc)) from None
        self.cache.drop(tenant_id)
        self.cache.l2[tenant_id] = l2
        self.cache.l3[tenant_id] = l3

    # -- the Gateway (L4): local state only ---------------------------------------------
    def _unavailable(self, t: TenantState | None, tenant_id: str) -> TenantUnavailable:
        r = self.region
        if t is None:
            return TenantUnavailable(404, "tenant_unknown",
                                     f"tenant {tenant_id} is not known in region {r}")
        s = t.status
        if s == st.FOREIGN:
            return TenantUnavailable(404, "not_allowed_in_region",
                                     f"tenant {tenant_id}'s allow-list excludes region {r}")
        if s == st.STANDBY:
            return TenantUnavailable(409, "not_owner",
                                     f"tenant {tenant_id} is owned by {t.owner}; {r} is standby")
        if s == st.PENDING_PURGE:
            return TenantUnavailable(409, "pending_purge",
                                     f"tenant {tenant_id} is pending purge: deleted, keys "
                                     f"disabled, purge at {iso(t.purge_at or 0)} (a restore "
                                     "cancels it)")
        if s == st.PURGED:
            return TenantUnavailable(409, "tenant_purged",
                                     f"tenant {tenant_id} was purged: its keys are destroyed")
        if s == st.DELETED:
            return TenantUnavailable(409, "tenant_deleted", f"tenant {tenant_id} was deleted")
        if s == st.MOVED:
            return TenantUnavailable(409, "moved",
                                     f"moved to {t.owner} at epoch {t.epoch}: tenant "
                                     f"{tenant_id} is no longer owned by {r}")
        if s == st.INITIALIZING:
            return TenantUnavailable(409, "initializing",
                                     f"tenant {tenant_id} has no keys yet in {r}")
        if t.owner != r:
            return TenantUnavailable(409, "not_owner",
                                     f"tenant {tenant_id} is owned by {t.owner}")
        return TenantUnavailable(409, "unavailable", f"tenant {tenant_id} is {s}")

    def _serving(self, tenant_id: str) -> tuple[TenantState, dict[str, KeyHandle]]:
        t = self.state.tenants.get(tenant_id)
        if t is None or t.status != st.ACTIVE or t.owner != self.region:
            self.counters["dek_refusals"] += 1
            raise self._unavailable(t, tenant_id)
        handles = self.cache.l3.get(tenant_id)
        if handles is None:
            self.unseal(tenant_id)
            handles = self.cache.l3[tenant_id]
        return t, handles

    def generate_dek(self, tenant_id: str) -> tuple[bytes, bytes]:
        t, handles = self._serving(tenant_id)
        kid = t.l3[-1].key_id
        header = dek_header(tenant_id, kid)
        dek = new_dek()
        wrapped = header + handles[kid].seal(dek, header)
        self.counters["deks_generated"] += 1
        return dek, wrapped

    def unwrap_dek(self, tenant_id: str, wrapped: bytes) -> bytes:
        try:
            parsed = parse_wrapped(wrapped)
        except BadWrappedDek as exc:
            raise TenantUnavailable(422, "bad_wrapped_dek", str(exc)) from None
        if parsed.tenant_id != tenant_id:
            raise TenantUnavailable(422, "tenant_mismatch",
                                    "the wrapped DEK belongs to another tenant")
        _, handles = self._serving(tenant_id)
        h = handles.get(parsed.key_id)
        if h is None:
            raise TenantUnavailable(422, "unknown_key_version",
                                    f"no L3 version {parsed.key_id} for tenant {tenant_id}")
        try:
            dek = h.open(parsed.sealed, parsed.header)
        except UnwrapError:
            raise TenantUnavailable(422, "bad_wrapped_dek",
                                    "the wrapped DEK does not authenticate") from None
        self.counters["deks_unwrapped"] += 1
        return dek

    # -- views -------------------------------------------------------------------------
    def timeline(self, tenant_id: str) -> dict[str, Any]:
        t = self.state.tenants.get(tenant_id)
        if t is None or t.status == st.FOREIGN:
            raise self._unavailable(t, tenant_id)
        return tenant_view(t, self.region, self.config)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.state.tenants.values():
            out[t.status] = out.get(t.status, 0) + 1
        return out


def parent_id(kv: st.KeyVer) -> str:
    return kv.parent_key_id or ""


def _kv_view(k: st.KeyVer) -> dict[str, Any]:
    return {"layer": k.layer, "version": k.version, "epoch": k.epoch, "key_id": k.key_id,
            "parent_key_id": k.parent_key_id, "kcv": k.kcv, "created_at": iso(k.created_at),
            "trigger": k.trigger}


def tenant_view(t: TenantState, region: str, config: CoreConfig) -> dict[str, Any]:
    l3p = t.l3_period if t.l3_period is not None else config.l3_period
    l2p = t.l2_period if t.l2_period is not None else config.l2_period
    active = t.status == st.ACTIVE and t.owner == region
    return {
        "tenant_id": t.tenant_id,
        "region": region,
        "status": t.status,
        "owner": t.owner,
        "epoch": t.epoch,
        "regions": list(t.regions),
        "home_region": t.home_region,
        "l1_ref": t.l1_ref,
        "policy": {"l3_period_s": l3p, "l2_period_s": l2p,
                   "override": t.l3_period is not None or t.l2_period is not None},
        "current": {"L2": t.l2[-1].key_id if t.l2 else None,
                    "L3": t.l3[-1].key_id if t.l3 else None},
        "next_rotation": {
            "L3": iso(t.l3[-1].created_at + l3p) if active and t.l3 and l3p > 0 else None,
            "L2": iso(t.l2[-1].created_at + l2p) if active and t.l2 and l2p > 0 else None,
        },
        "purge_at": iso(t.purge_at) if t.purge_at is not None else None,
        "purged_at": iso(t.purged_at) if t.purged_at is not None else None,
        "versions": {"L2": [_kv_view(k) for k in t.l2], "L3": [_kv_view(k) for k in t.l3]},
        "stale": [{**_kv_view(k), "stale": True} for k in t.stale],
    }
