"""Tenant state as a pure fold over the Core's own log.

The log holds three kinds of entries, all folded by `apply`:
- the Core's own timeline events (`TenantInitialized`, `KeyRotated`, `TenantPurgeScheduled`,
  `TenantPurgeCancelled`, `TenantPurged`, `TenantL1Bound`, `TenantHydrated`),
- the lifecycle events it accepted from the Registry (`TenantCreated`, `TenantDeleted`,
  `TenantRestored`, `TenantRegionsChanged`; `RegionFailover` is region-scoped and folds into no
  tenant), which record what the Core knows of a tenant, including "seen, not allowed here",
- local records of the Core (`PolicySet`: a per-tenant rotation policy override;
  `OwnershipMoved`: a RegionFailover moved the tenant elsewhere, which fences an old owner;
  `TenantReconciled`: a repair by reconciliation against a Registry snapshot),
- imported records (`TimelineImported`): another region's verified timeline event, folded into
  the key timeline by hydration or, flagged stale, by the follower (docs/dr.md).

An event is the plain JSON object of its envelope (`type`, `tenant_id`, `event_id`, `producer`,
`seq`, `occurred_at`, `payload`). Live consumption, restart, replay and hydration run the same
`apply`; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from core_service.clock import parse_ts
from events.models import SCHEMA_VERSIONS
from events.upcasting import upcast

# Tenant status in this region.
INITIALIZING = "initializing"  # home region, keys not issued yet (e.g. the L1 refused)
ACTIVE = "active"  # owned and served here
STANDBY = "standby"  # allowed here, owned elsewhere: no keys (may take over on failover)
FOREIGN = "foreign"  # allow-list excludes this region: never keys
PENDING_PURGE = "pending_purge"  # deleted, keys disabled until the grace ends or a restore
PURGED = "purged"  # crypto-shredded
DELETED = "deleted"  # deleted while holding no keys here
MOVED = "moved"  # was owned here; a RegionFailover moved it to a higher epoch elsewhere (fenced)

POLICY_SET = "PolicySet"  # local record type (not published)
OWNERSHIP_MOVED = "OwnershipMoved"  # local record: a RegionFailover moved the tenant's owner
TIMELINE_IMPORTED = "TimelineImported"  # imported record: another region's timeline event
TENANT_RECONCILED = "TenantReconciled"  # local record: a repair by reconciliation (below)
_RECONCILED_AS = {"missing": "TenantCreated", "gone": "TenantDeleted",
                  "restored": "TenantRestored", "regions": "TenantRegionsChanged"}


class KeyVer(NamedTuple):
    """One key version as the timeline knows it: never its bytes. (Named tuples: immutable
    and cheap to build, so a restart loads 100k tenants fast.)"""

    layer: str
    version: int
    epoch: int
    key_id: str
    parent_key_id: str | None
    kcv: str
    created_at: float
    trigger: str


class TenantState(NamedTuple):
    tenant_id: str
    status: str
    regions: tuple[str, ...]
    home_region: str
    owner: str | None = None
    epoch: int = 0
    l1_ref: str | None = None
    l1_history: tuple[str, ...] = ()
    l2: tuple[KeyVer, ...] = ()
    l3: tuple[KeyVer, ...] = ()
    l3_period: float | None = None
    l2_period: float | None = None
    deleted: bool = False
    purge_at: float | None = None
    purge_cause: str | None = None
    purged_at: float | None = None
    created_at: float | None = None
    updated_at: float | None = None
    stale: tuple[KeyVer, ...] = ()
    """Versions another region minted with a stale epoch (during a split), imported
    decrypt-only: never current, never rotated from."""

    @property
    def current_l2(self) -> KeyVer | None:
        return self.l2[-1] if self.l2 else None

    @property
    def current_l3(self) -> KeyVer | None:
        return self.l3[-1] if self.l3 else None


@dataclass
class CoreState:
    """Every tenant this region knows, by id. `fold` replaces one tenant per event; the
    per-tenant `apply` is pure."""

    region: str
    tenants: dict[str, TenantState] = field(default_factory=dict)

    def fold(self, event: Mapping[str, Any]) -> None:
        tid = event.get("tenant_id")
        if tid is None:
            return
        new = apply(self.tenants.get(tid), event, self.region)
        if new is None:
            self.tenants.pop(tid, None)
        else:
            self.tenants[tid] = new


def _key(layer: str, kv: Mapping[str, Any], trigger: str) -> KeyVer:
    return KeyVer(
        layer=layer,
        version=int(kv["version"]),
        epoch=int(kv["epoch"]),
        key_id=kv["key_id"],
        parent_key_id=kv.get("parent_key_id"),
        kcv=kv["kcv"],
        created_at=parse_ts(kv["created_at"]),
        trigger=trigger,
    )


def _disposition(region: str, regions: tuple[str, ...], home: str) -> str:
    if region == home:
        return INITIALIZING
    return STANDBY if region in regions else FOREIGN


def lifecycle_payload(event: Mapping[str, Any]) -> dict[str, Any]:
    """The payload of an accepted lifecycle event, upcast to the current schema."""
    payload = dict(event["payload"])
    version = int(event.get("schema_version", SCHEMA_VERSIONS.get(event["type"], 1)))
    if event["type"] in SCHEMA_VERSIONS and version != SCHEMA_VERSIONS[event["type"]]:
        _, payload = upcast(event["type"], version, payload)
    return payload


def apply(tenant: TenantState | None, event: Mapping[str, Any], region: str) -> TenantState | None:
    """The next state of one tenant after `event` (pure; `region` is this Core's region)."""
    etype = event["type"]
    at = parse_ts(event["occurred_at"])
    if etype in ("TenantCreated", "TenantDeleted", "TenantRestored", "TenantRegionsChanged"):
        p = lifecycle_payload(event)
    else:
        p = event["payload"]

    if etype == TENANT_RECONCILED:
        # Reconciliation against a Registry snapshot repairs a tenant as the lifecycle event it
        # stands for would have (core_service/reconcile.py); the payload carries its fields.
        return apply(tenant, {**event, "type": _RECONCILED_AS[p["action"]]}, region)
    if etype == "TenantCreated":
        if tenant is not None:
            return tenant  # a tenant id is created once; later creates change nothing
        regions = tuple(p["regions"])
        home = p["home_region"]
        return TenantState(
            tenant_id=event["tenant_id"],
            status=_disposition(region, regions, home),
            regions=regions,
            home_region=home,
            owner=home,
            created_at=at,
            updated_at=at,
        )
    if tenant is None:
        return None  # nothing else means anything for a tenant this region never saw

    if etype == "TenantDeleted":
        status = tenant.status
        if status in (STANDBY, FOREIGN, INITIALIZING):
            status = DELETED
        return tenant._replace(deleted=True, status=status, updated_at=at)
    if etype == "TenantRestored":
        status = tenant.status
        if status == DELETED:
            status = _disposition(region, tenant.regions, tenant.home_region)
            if status == INITIALIZING and tenant.l2:
                status = ACTIVE
        return tenant._replace(deleted=False, status=status, updated_at=at)
    if etype == "TenantRegionsChanged":
        regions = tuple(p["regions"])
        status = tenant.status
        if status in (STANDBY, FOREIGN):
            status = STANDBY if region in regions else FOREIGN
        return tenant._replace(
            regions=regions, home_region=p["home_region"], status=status, updated_at=at
        )
    if etype == POLICY_SET:
        return tenant._replace(
            l3_period=p.get("l3_period"), l2_period=p.get("l2_period"), updated_at=at
        )
    if etype == "TenantInitialized":
        return tenant._replace(
            status=ACTIVE if not tenant.deleted else tenant.status,
            owner=p["region"],
            epoch=int(p["epoch"]),
            l1_ref=p["l1_ref"],
            l2=(_key("L2", p["l2"], "initial"),),
            l3=(_key("L3", p["l3"], "initial"),),
            updated_at=at,
        )
    if etype == "KeyRotated":
        kv = p["key"]
        key = _key(kv["layer"], kv, p["trigger"])
        if key.layer == "L2":
            return tenant._replace(l2=(*tenant.l2, key), updated_at=at)
        return tenant._replace(l3=(*tenant.l3, key), updated_at=at)
    if etype == "TenantPurgeScheduled":
        return tenant._replace(
            status=PENDING_PURGE,
            purge_at=parse_ts(p["purge_at"]),
            purge_cause=p["cause_event_id"],
            updated_at=at,
        )
    if etype == "TenantPurgeCancelled":
        return tenant._replace(status=ACTIVE, purge_at=None, purge_cause=None, updated_at=at)
    if etype == "TenantPurged":
        return tenant._replace(status=PURGED, purge_at=None, purged_at=at, updated_at=at)
    if etype == "TenantL1Bound":
        return tenant._replace(
            l1_ref=p["l1_ref"],
            l1_history=(*tenant.l1_history, p["previous_l1_ref"]),
            updated_at=at,
        )
    if etype == "TenantHydrated":
        return tenant._replace(
            status=PENDING_PURGE if tenant.status == PENDING_PURGE else ACTIVE,
            owner=p["region"], epoch=int(p["epoch"]), updated_at=at
        )
    if etype == OWNERSHIP_MOVED:
        status = tenant.status
        if status in (ACTIVE, PENDING_PURGE):
            status = MOVED
        elif status == INITIALIZING:
            status = STANDBY
        return tenant._replace(status=status, owner=p["to_region"],
                               epoch=max(tenant.epoch + 1, int(p["epoch"])), updated_at=at)
    if etype == TIMELINE_IMPORTED:
        return _imported(tenant, p["event"], bool(p.get("stale")), at)
    return tenant


def _known(tenant: TenantState, key_id: str, layer: str) -> bool:
    pool = (tenant.l2 if layer == "L2" else tenant.l3) + tenant.stale
    return any(k.key_id == key_id and k.layer == layer for k in pool)


def _add(tenant: TenantState, key: KeyVer, stale: bool) -> TenantState:
    if _known(tenant, key.key_id, key.layer):
        return tenant  # imported twice (hydration resumed, follower re-read): no duplicate
    if stale:
        return tenant._replace(stale=(*tenant.stale, key))
    if key.layer == "L2":
        return tenant._replace(l2=(*tenant.l2, key))
    return tenant._replace(l3=(*tenant.l3, key))


def _imported(tenant: TenantState, event: Mapping[str, Any], stale: bool, at: float
              ) -> TenantState:
    """Fold one timeline event of another region (hydration, or a stale-epoch version seen by
    the follower): key versions join the timeline (or `stale`), nothing else of this region's
    status changes; TenantHydrated of the new owner follows in the same transaction."""
    etype = event["type"]
    p = event["payload"]
    t = tenant
    if etype == "TenantInitialized":
        t = _add(t, _key("L2", p["l2"], "initial"), stale)
        t = _add(t, _key("L3", p["l3"], "initial"), stale)
        if not stale:
            t = t._replace(l1_ref=t.l1_ref or p["l1_ref"], epoch=max(t.epoch, int(p["epoch"])))
    elif etype == "KeyRotated":
        kv = p["key"]
        t = _add(t, _key(kv["layer"], kv, p["trigger"]), stale)
        if not stale:
            t = t._replace(epoch=max(t.epoch, int(p["epoch"])))
    elif etype == "TenantL1Bound" and not stale and p["l1_ref"] != t.l1_ref:
        t = t._replace(l1_ref=p["l1_ref"], l1_history=(*t.l1_history, p["previous_l1_ref"]))
    elif etype == "TenantHydrated" and not stale:
        t = t._replace(epoch=max(t.epoch, int(p["epoch"])))
    elif etype == "TenantPurgeScheduled" and not stale:
        t = t._replace(status=PENDING_PURGE, purge_at=parse_ts(p["purge_at"]),
                       purge_cause=p["cause_event_id"])
    elif etype == "TenantPurgeCancelled" and not stale and t.status == PENDING_PURGE:
        t = t._replace(status=STANDBY, purge_at=None, purge_cause=None)
    return t._replace(updated_at=at) if t is not tenant else tenant


def replay(events: Iterable[Mapping[str, Any]], region: str) -> CoreState:
    """Fold a whole log from scratch (restart verification, `openkcm replay --verify`)."""
    state = CoreState(region)
    for event in events:
        state.fold(event)
    return state


# --- compact persistence of the projection -----------------------------------------------


def _kv_row(k: KeyVer) -> tuple[Any, ...]:
    return tuple(k)


def dump_tenant(t: TenantState) -> bytes:
    return orjson.dumps(
        [
            t.tenant_id, t.status, list(t.regions), t.home_region, t.owner, t.epoch, t.l1_ref,
            list(t.l1_history), [_kv_row(k) for k in t.l2], [_kv_row(k) for k in t.l3],
            t.l3_period, t.l2_period, t.deleted, t.purge_at, t.purge_cause, t.purged_at,
            t.created_at, t.updated_at, [_kv_row(k) for k in t.stale],
        ]
    )


_kv = KeyVer._make


def load_tenant(raw: bytes) -> TenantState:
    r = orjson.loads(raw)
    return TenantState(
        r[0], r[1], tuple(r[2]), r[3], r[4], r[5], r[6], tuple(r[7]),
        tuple(map(_kv, r[8])), tuple(map(_kv, r[9])),
        r[10], r[11], r[12], r[13], r[14], r[15], r[16], r[17],
        tuple(map(_kv, r[18])) if len(r) > 18 else (),
    )
