"""The audit rules as a pure fold: one test per finding kind, plus the cases that must NOT be
findings (a failover's new epoch, a restore, a late lifecycle event, a redelivery)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from events import models as m
from projections.rules import Event, Finding, Policy, apply_failover, audit, tick

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400.0
EU, WEST, US = "eu-central-1", "eu-west-1", "us-east-1"
POLICY = Policy(settle=timedelta(seconds=10), lifecycle_lag=timedelta(seconds=60))


def at(days: float) -> datetime:
    return T0 + timedelta(days=days)


def ev(payload: m.Payload, producer: str, days: float, tenant: str | None = "t1",
       offset: int = -1) -> Event:
    return Event(
        event_id=str(uuid.uuid4()),
        type=type(payload).__name__,
        tenant_id=tenant,
        producer=producer,
        time=at(days).timestamp(),
        payload=payload.model_dump(mode="json"),
        source="kcm.core.keys/0" if offset >= 0 else "",
        offset=offset,
    )


def kv(layer: str, version: int, epoch: int, days: float) -> m.KeyVersion:
    return m.KeyVersion(layer=layer, version=version, epoch=epoch,  # type: ignore[arg-type]
                        key_id=f"e{epoch}v{version}", kcv="aabbccdd",
                        parent_key_id=None if layer == "L2" else "e1v1", created_at=at(days))


def created(days: float = 0, regions: tuple[str, ...] = (EU, WEST)) -> Event:
    return ev(m.TenantCreated(regions=list(regions), home_region=regions[0]), "registry", days)


def initialized(days: float = 0.001, region: str = EU) -> Event:
    return ev(m.TenantInitialized(region=region, epoch=1, l1_ref="local:default",
                                  l2=kv("L2", 1, 1, days), l3=kv("L3", 1, 1, days)),
              region, days)


def rotated(layer: str, version: int, days: float, epoch: int = 1, region: str = EU,
            **kw: Any) -> Event:
    return ev(m.KeyRotated(region=region, epoch=epoch, key=kv(layer, version, epoch, days),
                           trigger="scheduled"), region, days, **kw)


def fold(events: list[Event], now_days: float = 0.0) -> tuple[dict[str, Any], list[Finding]]:
    state: dict[str, Any] | None = None
    found: list[Finding] = []
    for e in events:
        if e.tenant_id is None:
            assert state is not None
            state, out = apply_failover(state, e, at(now_days).timestamp(), POLICY)
        else:
            state, out = audit(state, e, at(now_days).timestamp(), POLICY)
        found += out
    assert state is not None
    return state, found


def kinds(found: list[Finding]) -> list[str]:
    return [f.kind for f in found]


def normal_history(years: int = 2) -> list[Event]:
    events = [created(), initialized()]
    l3 = l2 = 1
    for month in range(1, years * 12 + 1):
        day = month * 30.0
        if month % 3 == 0:
            l3 += 1
            events.append(rotated("L3", l3, day))
        if month % 12 == 0:
            l2 += 1
            events.append(rotated("L2", l2, day + 0.01))
    return events


def test_normal_history_has_no_findings_and_tracks_the_timeline() -> None:
    events = normal_history()
    state, found = fold(events, now_days=events[-1].time / DAY)
    assert found == []
    assert state["layers"]["L3"]["version"] == 9 and state["layers"]["L2"]["version"] == 3
    assert state["owner"] == EU and state["epoch"] == 1 and state["status"] == "active"
    state, found = tick(state, at(730).timestamp(), POLICY)
    assert found == []


def test_version_gap_and_repeat() -> None:
    _, found = fold([created(), initialized(), rotated("L3", 3, 10)])
    assert kinds(found) == ["version_gap"]
    _, found = fold([created(), initialized(), rotated("L3", 2, 10), rotated("L3", 2, 11)])
    assert kinds(found) == ["version_repeat"]


def test_duplicate_event_and_redelivery_are_no_ops() -> None:
    r = rotated("L3", 2, 10, offset=5)
    state, found = fold([created(), initialized(), r])
    again, out = audit(state, r, 0, POLICY)
    assert out == [] and again["layers"] == state["layers"]


def test_failover_new_epoch_continues_the_count_and_old_owner_is_stale() -> None:
    failover = ev(m.RegionFailover(from_region=EU, to_region=WEST, epoch=2), "operator", 20,
                  tenant=None)
    hydrated = ev(m.TenantHydrated(region=WEST, epoch=2, from_region=EU, l2_versions=1,
                                   l3_versions=2, cause_event_id=failover.event_id), WEST, 20.1)
    history = [created(), initialized(), rotated("L3", 2, 10), failover, hydrated,
               rotated("L3", 3, 30, epoch=2, region=WEST)]
    state, found = fold(history)
    assert found == []
    assert state["owner"] == WEST and state["epoch"] == 2
    assert state["layers"]["L3"]["key_id"] == "e2v3"
    # The old owner comes back and rotates with its stale epoch.
    stale = rotated("L3", 3, 31, epoch=1, region=EU)
    state2, out = audit(state, stale, 0, POLICY)
    assert kinds(out) == ["stale_epoch"]
    assert state2["layers"]["L3"]["key_id"] == "e2v3"  # never replaces the owner's timeline


def test_stale_epoch_found_when_the_failover_is_read_after_the_rotation() -> None:
    failover = ev(m.RegionFailover(from_region=EU, to_region=WEST, epoch=2), "operator", 20,
                  tenant=None)
    stale = rotated("L3", 3, 31, epoch=1, region=EU)
    _, found = fold([created(), initialized(), rotated("L3", 2, 10), stale, failover])
    assert kinds(found) == ["stale_epoch"] and found[0].event_id == stale.event_id


def test_region_outside_allow_list() -> None:
    _, found = fold([created(regions=(EU,)), initialized(), rotated("L3", 2, 10, region=US)])
    assert kinds(found) == ["region_not_allowed"]


def test_region_check_waits_for_a_late_tenant_created() -> None:
    state, found = fold([initialized(), rotated("L3", 2, 10, region=US), created()])
    assert kinds(found) == ["region_not_allowed"]
    assert found[0].reason.startswith("key event from us-east-1")
    state, found = fold([initialized(), rotated("L3", 2, 10), created()])
    assert found == []
    # A tenant the Registry never created: decided once the check settles.
    state, found = fold([initialized()])
    assert found == []
    _, found = tick(state, state["unchecked"][0][3] + 11, POLICY)
    assert kinds(found) == ["region_not_allowed"]


def test_overdue_by_tick_and_by_late_rotation() -> None:
    base = [created(), initialized()]
    state, found = fold(base)
    _, found = tick(state, at(90.5).timestamp(), POLICY)
    assert found == []  # within the grace
    _, found = tick(state, at(91.5).timestamp(), POLICY)
    assert kinds(found) == ["rotation_overdue"] and found[0].layer == "L3"
    tick_finding = found[0]
    _, found = fold([*base, rotated("L3", 2, 120)])
    assert kinds(found) == ["rotation_overdue"] and found[0].key == tick_finding.key
    # Per-region policy
    policy = Policy(regions={EU: {"L3": timedelta(days=30)}})
    _, found = tick(state, at(32).timestamp(), policy)
    assert kinds(found) == ["rotation_overdue"]


def test_purge_without_delete() -> None:
    purge = ev(m.TenantPurged(region=EU, epoch=1, destroyed=["e1v1"], destroyed_layers=["L3"]),
               EU, 50)
    state, found = fold([created(), initialized(), purge], now_days=0)
    assert found == []  # waits for a TenantDeleted that may come on the other topic
    _, found = tick(state, at(0).timestamp() + 11, POLICY)
    assert kinds(found) == ["purge_without_delete"]
    deleted = ev(m.TenantDeleted(), "registry", 40)
    state, found = fold([created(), initialized(), deleted, purge])
    assert found == [] and state["status"] == "purged"
    state, found = fold([created(), initialized(), purge, deleted])  # read late: fine too
    assert found == [] and state["purges"] == []


def test_a_purge_scheduled_by_reconciliation_is_not_a_purge_without_delete() -> None:
    """A Core that reconciled against the Registry's signed snapshot (the tenant is gone there,
    its TenantDeleted never reached the Core) schedules the purge with that cause."""
    scheduled = ev(m.TenantPurgeScheduled(region=EU, epoch=1, purge_at=at(45),
                                          cause_event_id="registry-snapshot:812"), EU, 44)
    purge = ev(m.TenantPurged(region=EU, epoch=1, destroyed=["e1v1"], destroyed_layers=["L3"]),
               EU, 50)
    state, found = fold([created(), initialized(), scheduled, purge])
    assert found == [] and state["status"] == "purged"
    _, found = tick(state, at(50).timestamp() + 11, POLICY)
    assert found == []
    # Any other cause without a TenantDeleted is still a finding.
    other = ev(m.TenantPurgeScheduled(region=EU, epoch=1, purge_at=at(45),
                                      cause_event_id="something-else"), EU, 44)
    state, _ = fold([created(), initialized(), other, purge])
    _, found = tick(state, at(50).timestamp() + 11, POLICY)
    assert kinds(found) == ["purge_without_delete"]


def test_rotated_after_delete_and_the_restore_case() -> None:
    deleted = ev(m.TenantDeleted(), "registry", 40)
    restored = ev(m.TenantRestored(), "registry", 42)
    after = rotated("L3", 2, 41)
    state, found = fold([created(), initialized(), deleted, after, restored])
    assert kinds(found) == ["rotated_after_delete"]
    # Rotations after the restore are fine, even if read before the restore.
    state, found = fold([created(), initialized(), deleted, rotated("L3", 2, 43), restored])
    assert found == []
    # Still deleted: decided when the check settles.
    state, found = fold([created(), initialized(), deleted, after])
    assert found == []
    _, found = tick(state, state["suspects"][0][2] + 11, POLICY)
    assert kinds(found) == ["rotated_after_delete"]
    # Deletion read after the rotation.
    state, found = fold([created(), initialized(), after, deleted])
    assert state["suspects"] and found == []
    # A rotation within the lifecycle lag (the Core had not heard yet) is fine.
    soon = rotated("L3", 2, 40 + 30 / DAY)
    state, found = fold([created(), initialized(), deleted, soon])
    assert state["suspects"] == [] and found == []
