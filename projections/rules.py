"""The rotation-audit rules as a pure fold: `audit(state, event, now, policy)` and
`tick(state, now, policy)` return the new tenant state and the findings. No I/O here.

A tenant's state is a JSON-able dict (it is stored as is in the audit table). Times are POSIX
seconds (UTC). The fold is idempotent for redelivered events (per-source offsets and recent
event ids) and tolerant of the order in which the two topics interleave: checks that relate a
key event to the Registry's lifecycle compare event times, and are re-run when the lifecycle
event arrives late (allow-list, deletion, failover), so a replay in a different interleaving
gives the same findings.

Finding kinds: auth_failure, broken_chain, invalid_event (see `projections.ingest`),
version_gap, version_repeat, stale_epoch, region_not_allowed, rotation_overdue,
purge_without_delete, rotated_after_delete.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

KINDS = (
    "auth_failure",
    "broken_chain",
    "invalid_event",
    "version_gap",
    "version_repeat",
    "stale_epoch",
    "region_not_allowed",
    "rotation_overdue",
    "purge_without_delete",
    "rotated_after_delete",
)
LAYERS = ("L2", "L3")
HISTORY_LIMIT = 256
"""Key versions kept per tenant for retroactive checks and the cadence chart."""
RECENT_IDS = 64

State = dict[str, Any]


@dataclass(frozen=True)
class Finding:
    tenant_id: str | None
    event_id: str
    kind: str
    reason: str
    time: str
    """ISO-8601 UTC: when the offending event happened (overdue: when the grace ran out)."""
    layer: str | None = None

    @property
    def key(self) -> str:
        """Deduplication key: (kind, event_id[, layer])."""
        return f"{self.kind}:{self.event_id}" + (f":{self.layer}" if self.layer else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Policy:
    """Rotation periods per layer, per region (defaults for regions not listed)."""

    l3_period: timedelta = timedelta(days=90)
    l2_period: timedelta = timedelta(days=365)
    grace: timedelta = timedelta(days=1)
    regions: dict[str, dict[str, timedelta]] = field(default_factory=dict)
    lifecycle_lag: timedelta = timedelta(seconds=60)
    """How long a Core may legitimately keep rotating after the Registry deleted the tenant
    (the time the deletion takes to reach it)."""
    settle: timedelta = timedelta(seconds=15)
    """How long a check that waits for the other topic stays open before it is decided."""

    def period(self, region: str | None, layer: str) -> timedelta:
        override = self.regions.get(region or "", {})
        if layer in override:
            return override[layer]
        return self.l3_period if layer == "L3" else self.l2_period


@dataclass(frozen=True)
class Event:
    """What the fold reads of a verified, validated event."""

    event_id: str
    type: str
    tenant_id: str | None
    producer: str
    time: float
    payload: dict[str, Any]
    source: str = ""
    """`topic/partition` it was read from (idempotence); empty in unit tests."""
    offset: int = -1


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _copy(state: State) -> State:
    """A deep copy (the fold never mutates its input); JSON round trip, ~10x deepcopy."""
    return orjson.loads(orjson.dumps(state))  # type: ignore[no-any-return]


def new_state(tenant_id: str) -> State:
    return {
        "tenant_id": tenant_id,
        "regions": None,
        "home_region": None,
        "owner": None,
        "epoch": 0,
        "status": "unknown",
        "created_at": None,
        "deletions": [],  # [deleted_at, restored_at | None, event_id]
        "raises": [],  # [time, epoch, event_id]: ownership epoch raised
        "failovers": [],  # event ids of RegionFailover applied
        "layers": {},  # layer -> current version record of the owner's timeline
        "lineages": {"L2": {}, "L3": {}},  # layer -> str(epoch) -> last version
        "history": [],  # [layer, version, epoch, event_id, time, region]
        "last_rotation": None,
        "unchecked": [],  # [event_id, region, time, seen]: waiting for the allow-list
        "purges": [],  # [event_id, time, seen]: purges waiting for a TenantDeleted
        "suspects": [],  # [event_id, time, seen]: rotations inside an open deletion
        "applied": {},  # source -> last offset applied
        "recent_ids": [],
    }


def next_due(state: State, policy: Policy) -> dict[str, str]:
    out = {}
    for layer, rec in state["layers"].items():
        out[layer] = iso(rec["created_at"] + policy.period(rec["region"], layer).total_seconds())
    return out


# --- the fold ----------------------------------------------------------------------------


def audit(
    state: State | None, event: Event, now: float, policy: Policy
) -> tuple[State, list[Finding]]:
    """Apply one verified event to its tenant's state. Returns (new state, findings)."""
    tenant = event.tenant_id or ""
    st = _copy(state) if state is not None else new_state(tenant)
    if event.source and st["applied"].get(event.source, -1) >= event.offset >= 0:
        return st, []  # redelivered after a restart: already applied
    if event.event_id in st["recent_ids"]:
        return st, []  # a duplicate (producer retry): a no-op
    out: list[Finding] = []
    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(st, event, now, policy, out)
    if event.source and event.offset >= 0:
        st["applied"][event.source] = event.offset
    st["recent_ids"] = (st["recent_ids"] + [event.event_id])[-RECENT_IDS:]
    return st, out


def apply_failover(
    state: State, event: Event, now: float, policy: Policy
) -> tuple[State, list[Finding]]:
    """Apply a RegionFailover (a region-scoped event) to one tenant's state."""
    st = _copy(state)
    out: list[Finding] = []
    if event.event_id in st["failovers"]:
        return st, out
    st["failovers"].append(event.event_id)
    p = event.payload
    tenants = p.get("tenants")
    if tenants is not None and st["tenant_id"] not in tenants:
        return st, out
    if st["owner"] != p["from_region"]:
        return st, out
    if st["regions"] is not None and p["to_region"] not in st["regions"]:
        return st, out  # not moved: the allow-list excludes the survivor
    epoch = max(st["epoch"] + 1, int(p["epoch"]))
    st["owner"] = p["to_region"]
    _raise_epoch(st, event.time, epoch, event.event_id, out)
    return st, out


def tick(state: State, now: float, policy: Policy) -> tuple[State, list[Finding]]:
    """Periodic evaluation: overdue rotations and checks whose waiting time is over."""
    st = _copy(state)
    out: list[Finding] = []
    settle = policy.settle.total_seconds()
    tid = st["tenant_id"]
    if st["status"] == "active":
        for layer, rec in sorted(st["layers"].items()):
            limit = rec["created_at"] + (
                policy.period(rec["region"], layer) + policy.grace
            ).total_seconds()
            if now > limit:
                out.append(_overdue(tid, rec, layer, limit))
    keep = []
    for item in st["unchecked"]:
        if now - item[3] >= settle:
            out.append(
                Finding(tid, item[0], "region_not_allowed",
                        f"key event from {item[1]} for a tenant the Registry never created",
                        iso(item[2]))
            )
        else:
            keep.append(item)
    st["unchecked"] = keep
    keep = []
    for item in st["purges"]:
        if now - item[2] >= settle:
            out.append(
                Finding(tid, item[0], "purge_without_delete",
                        "TenantPurged without a preceding TenantDeleted", iso(item[1]))
            )
        else:
            keep.append(item)
    st["purges"] = keep
    keep = []
    for item in st["suspects"]:
        if now - item[2] >= settle:
            out.append(_rotated_after_delete(tid, item[0], item[1]))
        else:
            keep.append(item)
    st["suspects"] = keep
    return st, out


# --- lifecycle ---------------------------------------------------------------------------


def _created(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    p = ev.payload
    st["regions"], st["home_region"] = list(p["regions"]), p["home_region"]
    st["created_at"] = ev.time
    if st["owner"] is None:
        st["owner"] = p["home_region"]
    if st["epoch"] == 0:
        st["epoch"] = 1
    if st["status"] == "unknown":
        st["status"] = "active"
    waiting, st["unchecked"] = st["unchecked"], []
    for event_id, region, t, _seen in waiting:
        _check_region(st, event_id, region, t, now, out)


def _regions_changed(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    st["regions"], st["home_region"] = list(ev.payload["regions"]), ev.payload["home_region"]
    waiting, st["unchecked"] = st["unchecked"], []
    for event_id, region, t, _seen in waiting:
        _check_region(st, event_id, region, t, now, out)


def _deleted(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    st["deletions"].append([ev.time, None, ev.event_id])
    if st["status"] != "purged":
        st["status"] = "deleted"
    # Purges waiting for this deletion.
    keep = []
    for event_id, t, seen in st["purges"]:
        if ev.time <= t:
            continue
        keep.append([event_id, t, seen])
    st["purges"] = keep
    # Rotations already seen that happened after the deletion reached the Core.
    lag = policy.lifecycle_lag.total_seconds()
    for _layer, _v, _e, event_id, t, _region, trigger in st["history"]:
        if t > ev.time + lag and trigger and not _is_suspect(st, event_id):
            st["suspects"].append([event_id, t, now])


def _restored(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    for interval in st["deletions"]:
        if interval[1] is None:
            interval[1] = ev.time
    if st["status"] == "deleted":
        st["status"] = "active"
    _decide_suspects(st, policy, out)


# --- key timeline ------------------------------------------------------------------------


def _initialized(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    p = ev.payload
    _key_event_checks(st, ev, now, policy, out)
    if st["owner"] is None:
        st["owner"] = p["region"]
    st["epoch"] = max(st["epoch"], int(p["epoch"]))
    for layer in ("l2", "l3"):
        _new_version(st, ev, p[layer], p["region"], "", policy, out)


def _rotated(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    p = ev.payload
    _key_event_checks(st, ev, now, policy, out)
    t = _version_time(p["key"], ev)
    if _in_deletion(st, t, policy):
        _deletion_check(st, ev.event_id, t, now, out)
    _new_version(st, ev, p["key"], p["region"], p.get("trigger", ""), policy, out)


def _hydrated(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    p = ev.payload
    _key_event_checks(st, ev, now, policy, out, epoch_check=False)
    epoch = int(p["epoch"])
    for layer, count in (("L2", p["l2_versions"]), ("L3", p["l3_versions"])):
        lineage = st["lineages"][layer]
        lineage.setdefault(str(epoch), int(count))
    if epoch >= st["epoch"]:
        st["owner"] = p["region"]
    _raise_epoch(st, ev.time, epoch, ev.event_id, out)


def _purged(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    _key_event_checks(st, ev, now, policy, out)
    st["status"] = "purged"
    if not any(d[0] <= ev.time for d in st["deletions"]):
        st["purges"].append([ev.event_id, ev.time, now])


RECONCILIATION_CAUSE = "registry-snapshot:"
"""Cause of a purge a Core scheduled because the Registry's signed snapshot no longer has the
tenant (partition-heal reconciliation): a deletion the lifecycle topic never carried."""


def _other_key_event(st: State, ev: Event, now: float, policy: Policy, out: list[Finding]) -> None:
    _key_event_checks(st, ev, now, policy, out)
    if ev.type == "TenantPurgeScheduled" and str(
        ev.payload.get("cause_event_id", "")
    ).startswith(RECONCILIATION_CAUSE):
        _deleted(st, ev, now, policy, out)  # the snapshot's verdict stands for the deletion


_HANDLERS = {
    "TenantCreated": _created,
    "TenantRegionsChanged": _regions_changed,
    "TenantDeleted": _deleted,
    "TenantRestored": _restored,
    "TenantInitialized": _initialized,
    "KeyRotated": _rotated,
    "TenantHydrated": _hydrated,
    "TenantPurged": _purged,
    "TenantPurgeScheduled": _other_key_event,
    "TenantPurgeCancelled": _other_key_event,
    "TenantL1Bound": _other_key_event,
}


# --- helpers -----------------------------------------------------------------------------


def _version_time(key: dict[str, Any], ev: Event) -> float:
    created = key.get("created_at")
    return parse_time(created) if isinstance(created, str) else ev.time


def _key_event_checks(
    st: State, ev: Event, now: float, policy: Policy, out: list[Finding], epoch_check: bool = True
) -> None:
    p = ev.payload
    region = p.get("region", ev.producer)
    if region != ev.producer:
        out.append(
            Finding(st["tenant_id"], ev.event_id, "region_not_allowed",
                    f"event names region {region} but was produced by {ev.producer}",
                    iso(ev.time))
        )
    _check_region(st, ev.event_id, region, ev.time, now, out)
    if epoch_check and "epoch" in p:
        epoch = int(p["epoch"])
        raised = _raised_above(st, epoch, ev.time)
        if raised is not None:
            out.append(_stale(st["tenant_id"], ev.event_id, epoch, raised[1], ev.time))


def _check_region(
    st: State, event_id: str, region: str, t: float, now: float, out: list[Finding]
) -> None:
    if st["regions"] is None:
        st["unchecked"].append([event_id, region, t, now])
    elif region not in st["regions"]:
        out.append(
            Finding(st["tenant_id"], event_id, "region_not_allowed",
                    f"key event from {region}, outside the allow-list {st['regions']}", iso(t))
        )


def _raised_above(st: State, epoch: int, t: float) -> list[Any] | None:
    """The first epoch raise that happened at or before `t` to an epoch above `epoch`."""
    for raise_ in st["raises"]:
        if raise_[0] <= t and raise_[1] > epoch:
            return raise_
    return None


def _raise_epoch(st: State, t: float, epoch: int, event_id: str, out: list[Finding]) -> None:
    if any(r[2] == event_id for r in st["raises"]):
        return
    st["raises"].append([t, epoch, event_id])
    st["epoch"] = max(st["epoch"], epoch)
    # Key versions already seen that were minted after the raise with an older epoch.
    for _layer, _v, e, ev_id, vt, _region, _trigger in st["history"]:
        if vt >= t and e < epoch:
            out.append(_stale(st["tenant_id"], ev_id, e, epoch, vt))


def _stale(tenant: str, event_id: str, epoch: int, owner_epoch: int, t: float) -> Finding:
    return Finding(
        tenant, event_id, "stale_epoch",
        f"stamped with epoch {epoch} after ownership moved to epoch {owner_epoch}", iso(t),
    )


def _new_version(
    st: State,
    ev: Event,
    key: dict[str, Any],
    region: str,
    trigger: str,
    policy: Policy,
    out: list[Finding],
) -> None:
    layer, version, epoch = key["layer"], int(key["version"]), int(key["epoch"])
    t = _version_time(key, ev)
    tid = st["tenant_id"]
    lineages = st["lineages"][layer]
    if str(epoch) not in lineages:
        lower = [int(e) for e in lineages if int(e) < epoch]
        lineages[str(epoch)] = lineages[str(max(lower))] if lower else 0
    last = lineages[str(epoch)]
    if version <= last:
        out.append(
            Finding(tid, ev.event_id, "version_repeat",
                    f"{layer} version {version} (epoch {epoch}) repeats; last was {last}",
                    iso(t), None)
        )
    elif version > last + 1:
        out.append(
            Finding(tid, ev.event_id, "version_gap",
                    f"{layer} version {version} (epoch {epoch}) skips {last + 1}..{version - 1}",
                    iso(t), None)
        )
    lineages[str(epoch)] = max(last, version)
    st["history"] = (
        st["history"] + [[layer, version, epoch, ev.event_id, t, region, trigger]]
    )[-HISTORY_LIMIT:]
    stale = _raised_above(st, epoch, t) is not None
    current = st["layers"].get(layer)
    if stale or (current is not None and epoch < current["epoch"]):
        return  # never replaces the owner's timeline
    if current is not None and version <= current["version"] and epoch == current["epoch"]:
        return
    if current is not None and st["status"] == "active":
        limit = current["created_at"] + (
            policy.period(current["region"], layer) + policy.grace
        ).total_seconds()
        if t > limit:
            out.append(_overdue(tid, current, layer, limit))
    st["layers"][layer] = {
        "version": version,
        "epoch": epoch,
        "key_id": key["key_id"],
        "created_at": t,
        "event_id": ev.event_id,
        "region": region,
        "count": (current or {}).get("count", 0) + 1,
    }
    if trigger:
        st["last_rotation"] = max(st["last_rotation"] or 0.0, t)


def _overdue(tenant: str, rec: dict[str, Any], layer: str, limit: float) -> Finding:
    return Finding(
        tenant, rec["event_id"], "rotation_overdue",
        f"{layer} {rec['key_id']} from {iso(rec['created_at'])} not rotated within policy "
        f"plus grace", iso(limit), layer,
    )


def _in_deletion(st: State, t: float, policy: Policy) -> bool:
    lag = policy.lifecycle_lag.total_seconds()
    return any(d[0] + lag < t and (d[1] is None or t < d[1]) for d in st["deletions"])


def _is_suspect(st: State, event_id: str) -> bool:
    return any(s[0] == event_id for s in st["suspects"])


def _deletion_check(st: State, event_id: str, t: float, now: float, out: list[Finding]) -> None:
    """A rotation inside a deletion: decided now if the deletion was closed (restored) after
    it, otherwise held until the restore arrives or the check settles."""
    for d in st["deletions"]:
        if d[1] is not None and d[0] < t < d[1]:
            out.append(_rotated_after_delete(st["tenant_id"], event_id, t))
            return
    if not _is_suspect(st, event_id):
        st["suspects"].append([event_id, t, now])


def _decide_suspects(st: State, policy: Policy, out: list[Finding]) -> None:
    lag = policy.lifecycle_lag.total_seconds()
    keep = []
    for event_id, t, seen in st["suspects"]:
        containing = [d for d in st["deletions"] if d[0] + lag < t and (d[1] is None or t < d[1])]
        if not containing:
            continue  # rotated after the restore: fine
        if all(d[1] is not None for d in containing):
            out.append(_rotated_after_delete(st["tenant_id"], event_id, t))
        else:
            keep.append([event_id, t, seen])
    st["suspects"] = keep


def _rotated_after_delete(tenant: str, event_id: str, t: float) -> Finding:
    return Finding(
        tenant, event_id, "rotated_after_delete",
        "key rotated while the tenant was deleted (pending purge)", iso(t),
    )


def compliant(state: State, has_findings: bool) -> bool:
    return state["status"] in ("active", "unknown") and not has_findings
