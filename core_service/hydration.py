"""Survivor hydration: the region a `RegionFailover` names as `to_region` takes over the lost
region's tenants.

The lifecycle consumer applies the RegionFailover and, in the same transaction as the consumed
offset, stores a pending marker (`h/<event id>`: the tenants to take over, how far it got, the
tenants refused so far). The `Hydrator` then, for the tenants not done yet:

1. reads the tenant definitions (the Registry's signed snapshot over HTTP; the compacted
   `kcm.registry.tenants` when the Registry does not answer);
2. reads the verified key timeline and the wrapped blobs (`replicated.read_key_log`);
3. per tenant (`plan_tenant`, no I/O but the L1 call): unwraps every L2 version through L1 and
   every L3 version through its parent L2, and checks each key check value against the
   verified timeline;
4. per chunk of tenants, one transaction: the blobs go to the vault (durably, first), then the
   imported timeline events (`I` entries), `TenantHydrated` with the new epoch and the updated
   marker, in one synced WriteBatch. The last transaction replaces the marker with the outcome
   (`H/<event id>`), which `GET /v1/status` lists with every refused tenant and its reason.

A SIGKILL anywhere leaves either a chunk fully applied or not at all; on restart the marker is
found again and the tenants not hydrated yet are done (a hydrated tenant is recognised by its
owner and epoch, so nothing is imported twice; the fold ignores a version it already knows).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from core_service import state as st
from core_service.engine import HYDRATION_PENDING
from core_service.keys import l2_aad, l3_aad
from core_service.replicated import TenantKeyLog, read_key_log, read_tenant_definitions
from core_service.state import TenantState
from events.kafka import KafkaSettings
from events.signing import TrustStore
from plugins.crypto import KeyHandle, UnwrapError
from plugins.l1 import L1Provider, L1Refused

log = logging.getLogger("openkcm.core.hydration")

HYDRATION_DONE = b"H/"  # + RegionFailover event id -> outcome (JSON)

_IMPORTABLE = frozenset({"TenantInitialized", "KeyRotated", "TenantL1Bound", "TenantHydrated",
                         "TenantPurgeScheduled", "TenantPurgeCancelled"})


@dataclass
class Plan:
    """What one tenant's hydration writes: never holds key bytes outside KeyHandles."""

    tenant_id: str
    epoch: int
    imported: list[tuple[dict[str, Any], bool]]
    vault_items: list[tuple[str, str, str, bytes]]
    handles: list[tuple[str, str, KeyHandle]]
    l2_versions: int
    l3_versions: int

    def destroy(self) -> None:
        for *_, h in self.handles:
            h.destroy()
        self.handles.clear()


def _blob(material: Mapping[tuple[str, str], dict[str, Any] | None], layer: str, kid: str
          ) -> tuple[bytes | None, dict[str, Any] | None, str]:
    key = (layer, kid)
    if key not in material:
        return None, None, f"material of {layer} {kid} is missing on kcm.core.material"
    m = material[key]
    if m is None:
        return None, None, f"material of {layer} {kid} was purged (tombstone)"
    return base64.b64decode(m["blob"]), m, ""


def plan_tenant(tenant_id: str, region: str, failover_epoch: int,
                definition: Mapping[str, Any] | None, keylog: TenantKeyLog | None,
                local: TenantState | None, l1: L1Provider) -> Plan | str:
    """Everything to import for one tenant, or the reason it is not moved here."""
    if definition is None:
        return "no live definition in the Registry (deleted)"
    regions = list(definition.get("regions", ()))
    if region not in regions:
        return f"allow-list {regions} excludes {region}"
    if keylog is None or not keylog.events:
        return "no key timeline on kcm.core.keys"
    if keylog.purged:
        return "purged before the failover: its keys are destroyed"
    imported: list[tuple[dict[str, Any], bool]] = []
    versions: dict[tuple[str, str], dict[str, Any]] = {}
    floor = 0  # epoch of the latest takeover seen on the timeline
    top = 0
    l1_ref: str | None = None
    refs: list[str] = []
    for ev in keylog.events:
        etype = ev["type"]
        if etype not in _IMPORTABLE:
            continue
        p = ev["payload"]
        epoch = int(p.get("epoch", 0))
        stale = etype in ("KeyRotated", "TenantL1Bound") and epoch < floor
        if etype == "TenantInitialized":
            for layer in ("L2", "L3"):
                versions.setdefault((layer, p[layer.lower()]["key_id"]), p[layer.lower()])
            l1_ref = l1_ref or p["l1_ref"]
            refs.append(p["l1_ref"])
        elif etype == "KeyRotated":
            versions.setdefault((p["key"]["layer"], p["key"]["key_id"]), p["key"])
        elif etype == "TenantL1Bound" and not stale:
            l1_ref = p["l1_ref"]
            refs.append(p["l1_ref"])
        elif etype == "TenantHydrated":
            floor = max(floor, epoch)
        if not stale:
            top = max(top, epoch)
        imported.append((ev, stale))
    if not versions:
        return "never initialised: no key version on the timeline"

    plan = Plan(tenant_id, 0, imported, [], [], 0, 0)
    why = _unwrap_all(plan, versions, keylog.material, l1_ref, refs, l1)
    if why:
        plan.destroy()  # refused: forget whatever was unwrapped
        return why
    local_epoch = local.epoch if local is not None else 0
    plan.epoch = max(top + 1, failover_epoch, local_epoch + 1)
    return plan


def _unwrap_all(plan: Plan, versions: Mapping[tuple[str, str], Mapping[str, Any]],
                material: Mapping[tuple[str, str], dict[str, Any] | None], l1_ref: str | None,
                refs: list[str], l1: L1Provider) -> str:
    """Unwrap every L2 through L1 and every L3 through its parent, checking each KCV against
    the timeline; fills `plan`. Returns why not ("" when every version is good)."""
    tid = plan.tenant_id
    l2h: dict[str, KeyHandle] = {}
    for (layer, kid), kv in versions.items():
        if layer != "L2":
            continue
        blob, m, why = _blob(material, layer, kid)
        if blob is None or m is None:
            return why
        handle = None
        errors: list[str] = []
        for ref in dict.fromkeys(r for r in (m.get("wrapped_by"), l1_ref, *reversed(refs)) if r):
            try:
                handle = l1.unwrap(ref, blob, l2_aad(tid, ref, kid))
                break
            except L1Refused as exc:
                errors.append(f"L1 refused: {exc}")
            except UnwrapError:
                errors.append(f"L2 {kid} does not unwrap under L1 key {ref!r}")
        if handle is None:
            return "; ".join(errors) or f"no L1 reference for L2 {kid}"
        plan.handles.append(("L2", kid, handle))
        if handle.kcv != kv["kcv"]:
            return f"KCV mismatch for L2 {kid}"
        l2h[kid] = handle
        plan.vault_items.append((tid, "L2", kid, blob))
        plan.l2_versions += 1
    for (layer, kid), kv in versions.items():
        if layer != "L3":
            continue
        blob, m, why = _blob(material, layer, kid)
        if blob is None or m is None:
            return why
        parent_id = kv.get("parent_key_id") or ""
        parent = l2h.get(parent_id)
        if parent is None:
            return f"L3 {kid}: its parent L2 {parent_id or '?'} is not on the timeline"
        try:
            handle = parent.unwrap(blob, l3_aad(tid, kid, parent_id))
        except UnwrapError:
            return f"L3 {kid} does not unwrap under L2 {parent_id}"
        plan.handles.append(("L3", kid, handle))
        if handle.kcv != kv["kcv"]:
            return f"KCV mismatch for L3 {kid}"
        plan.vault_items.append((tid, "L3", kid, blob))
        plan.l3_versions += 1
    return ""


def apply_plan(engine, txn, plan: Plan, from_region: str, cause: str,  # type: ignore[no-untyped-def]
               at: float) -> None:
    """Stage one tenant's import in a transaction: its blobs (vault first), its unsealed
    handles, the imported timeline events and `TenantHydrated` with the plan's epoch."""
    tid = plan.tenant_id
    txn.vault_items.extend(plan.vault_items)
    for layer, kid, handle in plan.handles:
        txn.stage(tid, layer, kid, handle)
    for ev, stale in plan.imported:
        engine.import_event(txn, tid, ev, stale, at)
    engine.emit(txn, "TenantHydrated", tid, {
        "region": engine.region, "epoch": plan.epoch, "from_region": from_region,
        "l2_versions": plan.l2_versions, "l3_versions": plan.l3_versions,
        "cause_event_id": cause}, at)


def _done(t: TenantState | None, region: str, epoch: int) -> bool:
    return t is not None and t.owner == region and t.epoch >= epoch and t.status in (
        st.ACTIVE, st.PENDING_PURGE)


@dataclass
class Outcome:
    event_id: str
    from_region: str
    to_region: str
    epoch: int
    tenants: int = 0
    hydrated: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)
    definitions_from: str | None = None
    key_log_events: int = 0
    key_log_events_per_second: float = 0.0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent reading definitions, reading the key log, unwrapping, committing."""


class Hydrator:
    """Runs pending hydrations, one RegionFailover at a time, in chunks of `batch` tenants."""

    def __init__(self, engine, settings: KafkaSettings, trust: TrustStore,  # type: ignore[no-untyped-def]
                 registry_url: str | None, batch: int = 2_000) -> None:
        self.engine = engine
        self.settings = settings
        self.trust = trust
        self.registry_url = registry_url
        self.batch = batch
        self.wake = asyncio.Event()
        self.running: str | None = None
        self.last_error: str | None = None
        engine.listeners.append(self._committed)

    def _committed(self) -> None:
        if self.engine.hydration_requested:  # a RegionFailover left a pending marker
            self.wake.set()

    # -- state -----------------------------------------------------------------------
    def pending(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): orjson.loads(v)
                for k, v in self.engine.log.markers(HYDRATION_PENDING).items()}

    def outcomes(self) -> list[dict[str, Any]]:
        out = [orjson.loads(v) for v in self.engine.log.markers(HYDRATION_DONE).values()]
        return sorted(out, key=lambda o: o.get("finished_at", ""))

    def status(self) -> dict[str, Any]:
        pending = self.pending()
        outcomes = self.outcomes()
        refused: dict[str, dict[str, Any]] = {}
        for o in [*outcomes, *pending.values()]:
            for r in o.get("refused", ()):
                refused[r["tenant"]] = {**r, "epoch": o["epoch"]}
        return {
            "pending": [{"event_id": m["event_id"], "from_region": m["from_region"],
                         "epoch": m["epoch"], "tenants": len(m["tenants"]),
                         "hydrated": m.get("hydrated", 0), "refused": len(m["refused"])}
                        for m in pending.values()],
            "running": self.running,
            "last": {k: v for k, v in outcomes[-1].items() if k != "refused"}
            if outcomes else None,
            "refused": sorted(refused.values(), key=lambda r: r["tenant"]),
            "last_error": self.last_error,
        }

    # -- the work --------------------------------------------------------------------
    async def definitions(self) -> tuple[dict[str, dict[str, Any]], str]:
        """Tenant definitions: the Registry's snapshot, else the compacted topic."""
        if self.registry_url:
            from registry_service.client import AsyncRegistryClient, RegistryError

            try:
                async with AsyncRegistryClient(self.registry_url, timeout=5.0) as client:
                    snap = await client.snapshot(self.trust)
                return ({t.tenant_id: {"regions": list(t.regions), "home_region": t.home_region}
                         for t in snap.tenants}, "registry")
            except RegistryError as exc:
                log.warning("Registry snapshot unavailable (%s): definitions from "
                            "kcm.registry.tenants", exc)
        defs, _ = await read_tenant_definitions(self.settings, self.trust)
        return defs, "kcm.registry.tenants"

    async def hydrate(self, marker: dict[str, Any]) -> dict[str, Any]:
        e = self.engine
        started = time.perf_counter()
        key = HYDRATION_PENDING + marker["event_id"].encode()
        epoch = int(marker["epoch"])
        refused_ids = {r["tenant"] for r in marker["refused"]}
        todo = [tid for tid in marker["tenants"] if tid not in refused_ids
                and not _done(e.state.tenants.get(tid), e.region, epoch)]
        log.info("hydrating %d tenants of %s (epoch %d)", len(todo), marker["from_region"], epoch)
        phases = {"definitions": 0.0, "key_log": 0.0, "unwrap": 0.0, "commit": 0.0}
        t0 = time.perf_counter()
        defs, source = await self.definitions() if todo else ({}, None)
        t1 = time.perf_counter()
        keylogs, stats = await read_key_log(self.settings, self.trust, todo) if todo else ({}, None)
        phases["definitions"], phases["key_log"] = t1 - t0, time.perf_counter() - t1
        for i in range(0, len(todo), self.batch):
            chunk = todo[i : i + self.batch]
            plans: list[Plan] = []
            refusals: list[dict[str, str]] = []
            t0 = time.perf_counter()
            for n, tid in enumerate(chunk):
                result = plan_tenant(tid, e.region, epoch, defs.get(tid), keylogs.get(tid),
                                     e.state.tenants.get(tid), e.l1)
                if isinstance(result, str):
                    refusals.append({"tenant": tid, "reason": result})
                else:
                    plans.append(result)
                if n % 500 == 499:
                    await asyncio.sleep(0)
            t1 = time.perf_counter()
            self._commit_chunk(marker, key, plans, refusals)
            phases["unwrap"] += t1 - t0
            phases["commit"] += time.perf_counter() - t1
            await asyncio.sleep(0)
        outcome = Outcome(marker["event_id"], marker["from_region"], marker["to_region"], epoch,
                          len(marker["tenants"]), int(marker.get("hydrated", 0)),
                          list(marker["refused"]), source,
                          stats.events if stats else 0,
                          round(stats.events_per_second) if stats else 0.0,
                          round(time.perf_counter() - started, 3),
                          {k: round(v, 3) for k, v in phases.items()})
        done = {**outcome.__dict__, "finished_at": e.clock.now()}
        txn = e.begin()
        txn.deletes.append(key)
        txn.puts[HYDRATION_DONE + marker["event_id"].encode()] = orjson.dumps(done)
        e.commit(txn)
        log.info("failover %s: %d tenants hydrated, %d refused in %.2fs", marker["event_id"],
                 outcome.hydrated, len(outcome.refused), outcome.seconds)
        return done

    def _commit_chunk(self, marker: dict[str, Any], key: bytes, plans: list[Plan],
                      refusals: list[dict[str, str]]) -> None:
        """One transaction for a chunk (synchronous: no other transaction interleaves)."""
        e = self.engine
        at = e.clock.now()
        txn = e.begin()
        for plan in plans:
            tid = plan.tenant_id
            if _done(e.tenant(txn, tid), e.region, int(marker["epoch"])):
                plan.destroy()
                continue
            apply_plan(e, txn, plan, marker["from_region"], marker["event_id"], at)
            marker["hydrated"] = int(marker.get("hydrated", 0)) + 1
        marker["refused"].extend(refusals)
        for r in refusals:
            log.warning("tenant %s not moved to %s: %s", r["tenant"], e.region, r["reason"])
        txn.puts[key] = orjson.dumps(marker)
        e.commit(txn)

    async def run(self) -> None:
        while True:
            try:
                self.engine.hydration_requested = False
                for marker in self.pending().values():
                    self.running = marker["event_id"]
                    await self.hydrate(marker)
                self.running = None
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried; the marker stays durable
                self.running = None
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("hydration: %s; retrying", self.last_error)
                await asyncio.sleep(1.0)
                continue
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), 1.0)
            except TimeoutError:
                pass


def hydration_pending(engine) -> bool:  # type: ignore[no-untyped-def]
    """True while a RegionFailover waits for hydration (the follower holds back meanwhile)."""
    return bool(engine.log.markers(HYDRATION_PENDING))

