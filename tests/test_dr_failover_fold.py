"""Fast tests of region failover without Kafka: the pure fold of imported timeline events,
TenantHydrated and OwnershipMoved; per-tenant hydration planning (unwrap through L1 and L2,
KCV checks, refusals); a chunk commit and its replay; fencing of the old owner; stale-epoch
versions kept decrypt-only. Real RocksDB, real crypto, real local L1 provider."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from core_service import state as st
from core_service.clock import FakeClock
from core_service.engine import HYDRATION_PENDING, Engine, TenantUnavailable
from core_service.hydration import Hydrator, plan_tenant
from core_service.log import OWN, event_of
from core_service.replicated import TenantKeyLog
from events.kafka import KafkaSettings
from events.models import RegionFailover, TenantCreated, TenantDeleted
from events.signing import SigningKey, TrustStore
from plugins.l1_local import set_regions
from tests.test_core_helpers import R1, R2, R3, Lifecycle, close_engine, make_engine

T0 = 1_800_000_000.0


@pytest.fixture
def reg() -> Lifecycle:
    return Lifecycle(SigningKey.generate("registry"))


@pytest.fixture
def operator() -> Lifecycle:
    return Lifecycle(SigningKey.generate("operator"))


def _kv(layer: str, version: int, epoch: int = 1, parent: str | None = None) -> dict[str, Any]:
    return {"layer": layer, "version": version, "epoch": epoch, "key_id": f"e{epoch}v{version}",
            "parent_key_id": parent, "kcv": "ab" * 6, "created_at": "2027-01-15T08:00:00Z"}


def _ev(etype: str, payload: dict[str, Any], producer: str = R1, tid: str = "acme"
        ) -> dict[str, Any]:
    return {"event_id": f"{etype}-{payload.get('key', payload).get('key_id', '')}",
            "type": etype, "tenant_id": tid, "producer": producer, "seq": 1,
            "occurred_at": "2027-01-15T08:00:00Z", "payload": payload}


def _imported(event: dict[str, Any], stale: bool = False) -> dict[str, Any]:
    return {"event_id": "x", "type": st.TIMELINE_IMPORTED, "tenant_id": event["tenant_id"],
            "producer": R2, "occurred_at": "2027-01-15T09:00:00Z",
            "payload": {"event": event, "stale": stale}}


# --- the pure fold -------------------------------------------------------------------


def test_fold_of_imported_timeline_then_hydrated(reg: Lifecycle) -> None:
    created, _, _ = reg.accepted(TenantCreated(regions=[R1, R2], home_region=R1), "acme")
    t = st.apply(None, created, R2)
    assert t is not None and t.status == st.STANDBY and t.owner == R1
    timeline = [
        _ev("TenantInitialized", {"region": R1, "epoch": 1, "l1_ref": "default",
                                  "l2": _kv("L2", 1), "l3": _kv("L3", 1, parent="e1v1")}),
        _ev("KeyRotated", {"region": R1, "epoch": 1, "trigger": "scheduled",
                           "key": _kv("L3", 2, parent="e1v1")}),
        _ev("KeyRotated", {"region": R1, "epoch": 1, "trigger": "scheduled",
                           "key": _kv("L2", 2)}),
        _ev("KeyRotated", {"region": R1, "epoch": 1, "trigger": "l2-rotation",
                           "key": _kv("L3", 3, parent="e1v2")}),
    ]
    records = [_imported(e) for e in timeline]
    for r in records:
        t = st.apply(t, r, R2)
    assert t is not None
    assert t.status == st.STANDBY and t.owner == R1  # importing alone serves nothing
    assert [k.key_id for k in t.l2] == ["e1v1", "e1v2"]
    assert [k.key_id for k in t.l3] == ["e1v1", "e1v2", "e1v3"] and t.l1_ref == "default"
    again = t
    for r in records:  # a resumed hydration imports the same events again: no duplicates
        again = st.apply(again, r, R2)
    assert again == t
    hydrated = {"event_id": "h", "type": "TenantHydrated", "tenant_id": "acme", "producer": R2,
                "occurred_at": "2027-01-15T09:00:00Z",
                "payload": {"region": R2, "epoch": 2, "from_region": R1, "l2_versions": 2,
                            "l3_versions": 3, "cause_event_id": "f"}}
    t = st.apply(t, hydrated, R2)
    assert t is not None and t.status == st.ACTIVE and t.owner == R2 and t.epoch == 2
    assert t.current_l3 is not None and t.current_l3.key_id == "e1v3"
    # A version the old owner minted with the stale epoch during a split: decrypt-only.
    stale = _ev("KeyRotated", {"region": R1, "epoch": 1, "trigger": "scheduled",
                               "key": _kv("L3", 4, parent="e1v2")})
    t2 = st.apply(t, _imported(stale, stale=True), R2)
    assert t2 is not None and [k.key_id for k in t2.stale] == ["e1v4"]
    assert t2.current_l3 == t.current_l3 and t2.l3 == t.l3
    assert st.apply(t2, _imported(stale, stale=True), R2) == t2
    assert st.load_tenant(st.dump_tenant(t2)) == t2
    # replay of the same records gives the same state
    all_records = [created, *records, hydrated, _imported(stale, stale=True)]
    assert st.replay(all_records, R2).tenants["acme"] == t2


def test_ownership_moved_fences_the_old_owner(reg: Lifecycle) -> None:
    created, _, _ = reg.accepted(TenantCreated(regions=[R1, R2], home_region=R1), "acme")
    init = _ev("TenantInitialized", {"region": R1, "epoch": 1, "l1_ref": "default",
                                     "l2": _kv("L2", 1), "l3": _kv("L3", 1, parent="e1v1")})
    t = st.apply(st.apply(None, created, R1), init, R1)
    assert t is not None and t.status == st.ACTIVE
    moved = {"event_id": "m", "type": st.OWNERSHIP_MOVED, "tenant_id": "acme", "producer": R1,
             "occurred_at": "2027-01-15T09:00:00Z",
             "payload": {"from_region": R1, "to_region": R2, "epoch": 2, "cause_event_id": "f"}}
    fenced = st.apply(t, moved, R1)
    assert fenced is not None and fenced.status == st.MOVED
    assert fenced.owner == R2 and fenced.epoch == 2 and fenced.l3 == t.l3
    standby = st.apply(st.apply(None, created, R3), moved, R3)
    assert standby is not None and standby.owner == R2


# --- hydration planning and commit, in process ---------------------------------------


def _keylog_of(engine: Engine, tenant: str) -> TenantKeyLog:
    """What kcm.core.keys and kcm.core.material would hold of `tenant` after the relay."""
    kl = TenantKeyLog(tenant)
    for _, entry in engine.log.iter_events():
        if entry[:1] == OWN:
            ev = event_of(entry)
            if ev["tenant_id"] == tenant:
                kl.events.append(ev)
    t = engine.state.tenants[tenant]
    for k in (*t.l2, *t.l3):
        blob = engine.vault.get(tenant, k.layer, k.key_id)
        kl.material[(k.layer, k.key_id)] = None if blob is None else {
            "layer": k.layer, "key_id": k.key_id, "blob": base64.b64encode(blob).decode(),
            "wrapped_by": t.l1_ref if k.layer == "L2" else k.parent_key_id}
    return kl


def _hydrator(engine: Engine) -> Hydrator:
    return Hydrator(engine, KafkaSettings("127.0.0.1:9"), TrustStore(), None)


def test_plan_and_commit_hydration_then_fence_and_stale_import(
        tmp_path: Path, reg: Lifecycle, operator: Lifecycle) -> None:
    clock = FakeClock(T0)
    r1 = make_engine(tmp_path / "r1", clock, R1)
    r2 = make_engine(tmp_path / "r2", clock, R2)
    try:
        ids = [f"t{i}" for i in range(30)]
        events = [reg.accepted(TenantCreated(regions=[R1, R2], home_region=R1), t) for t in ids]
        events.append(reg.accepted(TenantCreated(regions=[R1], home_region=R1), "local-only"))
        events.append(reg.accepted(TenantCreated(regions=[R1, R2], home_region=R1), "gone"))
        r1.apply_lifecycle(events, {0: (len(events), len(events))})
        r2.apply_lifecycle(events, {0: (len(events), len(events))})
        for _ in range(2):
            r1.rotate_many([(t, "L3", "scheduled") for t in ids])
        r1.rotate_many([(t, "L2", "scheduled") for t in ids])
        wrapped = {t: r1.generate_dek(t) for t in ids}
        deleted = reg.accepted(TenantDeleted(), "gone")
        r2.apply_lifecycle([deleted], {0: (len(events) + 1, len(events) + 1)})

        # The failover: R2 records a pending hydration in the consuming transaction.
        fo, raw, _ = operator.accepted(RegionFailover(from_region=R1, to_region=R2, epoch=2),
                                       None)  # type: ignore[arg-type]
        r2.apply_lifecycle([(fo, raw, 0)], {})
        markers = r2.log.markers(HYDRATION_PENDING)
        assert len(markers) == 1
        marker = orjson.loads(next(iter(markers.values())))
        assert set(marker["tenants"]) == {*ids, "local-only", "gone"}

        defs = {t: {"regions": [R1, R2], "home_region": R1} for t in ids}
        defs["local-only"] = {"regions": [R1], "home_region": R1}
        plans, refused = [], {}
        started = time.perf_counter()
        for tid in marker["tenants"]:
            result = plan_tenant(tid, R2, 2, defs.get(tid), _keylog_of(r1, tid),
                                 r2.state.tenants.get(tid), r2.l1)
            if isinstance(result, str):
                refused[tid] = result
            else:
                plans.append(result)
        assert refused == {"local-only": f"allow-list {[R1]} excludes {R2}",
                           "gone": "no live definition in the Registry (deleted)"}
        h = _hydrator(r2)
        key = HYDRATION_PENDING + marker["event_id"].encode()
        h._commit_chunk(marker, key, plans, [{"tenant": k, "reason": v}
                                             for k, v in refused.items()])
        elapsed = time.perf_counter() - started
        for tid in ids:
            t = r2.state.tenants[tid]
            assert t.status == st.ACTIVE and t.owner == R2 and t.epoch == 2
            assert [k.version for k in t.l3] == [1, 2, 3, 4] and [k.version for k in t.l2] == [1, 2]
            dek, w = wrapped[tid]
            assert r2.unwrap_dek(tid, w) == dek
        assert orjson.loads(r2.log.get(key) or b"{}")["hydrated"] == len(ids)
        # Hydrating the same chunk again (a resumed run) changes nothing.
        again = [plan_tenant(t, R2, 2, defs[t], _keylog_of(r1, t), r2.state.tenants[t], r2.l1)
                 for t in ids[:3]]
        pos = r2.log.meta.pos
        h._commit_chunk(marker, key, [p for p in again if not isinstance(p, str)], [])
        assert r2.log.meta.pos == pos
        # Rotation continues the count with the new epoch.
        out = r2.rotate_many([("t0", "L3", "scheduled")])
        assert out[0][0]["key_id"] == "e2v5"  # type: ignore[index]
        # Replay of R2's log gives its stored state (imported entries fold the same way).
        entries = [event_of(v) for _, v in r2.log.iter_events()]
        assert st.replay(entries, R2).tenants == r2.log.load_tenants()

        # Fencing: R1 sees the failover; moved tenants refuse with the reason, stop rotating.
        stale_before = r1.rotate_many([("t1", "L3", "scheduled")])[0]
        r1.apply_lifecycle([(fo, raw, 0)], {})
        with pytest.raises(TenantUnavailable) as exc:
            r1.generate_dek("t1")
        assert exc.value.status == 409 and f"moved to {R2} at epoch 2" in exc.value.message
        assert r1.state.tenants["local-only"].status == st.ACTIVE  # not moved: still owned
        assert isinstance(r1.rotate_many([("t1", "L3", "scheduled")])[0], TenantUnavailable)
        assert st.replay([event_of(v) for _, v in r1.log.iter_events()], R1).tenants == \
            r1.log.load_tenants()
        print(f"hydration of {len(ids)} tenants in process: {elapsed * 1000:.1f} ms; "
              f"stale version minted before the fence: {stale_before[0]['key_id']}")  # type: ignore[index]
    finally:
        close_engine(r1)
        close_engine(r2)


def test_l1_refusing_the_survivor_is_a_reason(tmp_path: Path, reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    r1 = make_engine(tmp_path / "r1", clock, R1)
    r3 = make_engine(tmp_path / "r3", clock, R3)
    try:
        ev = reg.accepted(TenantCreated(regions=[R1, R3], home_region=R1), "acme")
        r1.apply_lifecycle([ev], {0: (1, 1)})
        r3.apply_lifecycle([ev], {0: (1, 1)})
        set_regions(tmp_path / "keyring.json", [R1, R2])  # the keyring does not serve R3
        result = plan_tenant("acme", R3, 2, {"regions": [R1, R3], "home_region": R1},
                             _keylog_of(r1, "acme"), r3.state.tenants["acme"], r3.l1)
        assert isinstance(result, str) and "L1 refused" in result
    finally:
        close_engine(r1)
        close_engine(r3)
