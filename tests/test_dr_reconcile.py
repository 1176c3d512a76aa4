"""Fast tests of reconciliation (ACD-402 tier 1) without Kafka: the pure `reconcile` and the
purge rail, the repair transaction on a real engine (real RocksDB, crypto and L1 provider,
a fake clock), and the rails of a pass against a Registry that answers over real HTTP with a
frozen store, a tampered, an untrusted or a stale snapshot."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from core_service import state as st
from core_service.clock import DAY, FakeClock, parse_ts
from core_service.log import event_of
from core_service.reconcile import (
    Definition,
    Reconciler,
    applied_registry_seq,
    plan_repairs,
    reconcile,
    repair,
)
from core_service.scheduler import Scheduler
from events.models import TenantCreated, TenantDeleted, TenantRestored
from events.signing import SigningKey, TrustStore, publish_public_key
from registry_service.snapshot import snapshot_lines
from tests.test_core_helpers import R1, R2, R3, Lifecycle, close_engine, make_engine

T0 = 1_800_000_000.0


def fold(reg: Lifecycle, *steps: tuple[str, object]) -> dict[str, st.TenantState]:
    """Tenants of region R1 after lifecycle events (tenant id, payload) and, for the
    home-region tenants, their initialisation."""
    state = st.CoreState(R1)
    for tid, payload in steps:
        ev, _, _ = reg.accepted(payload, tid)  # type: ignore[arg-type]
        state.fold(ev)
        t = state.tenants.get(tid)
        if t is not None and t.status == st.INITIALIZING and not t.deleted:
            kv = {"version": 1, "epoch": 1, "key_id": "e1v1", "kcv": "ab",
                  "created_at": ev["occurred_at"]}
            state.fold({"type": "TenantInitialized", "tenant_id": tid,
                        "occurred_at": ev["occurred_at"],
                        "payload": {"region": R1, "epoch": 1, "l1_ref": "default",
                                    "l2": kv, "l3": {**kv, "parent_key_id": "e1v1"}}})
    return state.tenants


@pytest.fixture
def reg() -> Lifecycle:
    return Lifecycle(SigningKey.generate("registry"))


# --- the pure function ----------------------------------------------------------------


def test_reconcile_finds_each_kind_of_drift(reg: Lifecycle) -> None:
    tenants = fold(
        reg,
        ("same", TenantCreated(regions=[R1, R2], home_region=R1)),
        ("ghost", TenantCreated(regions=[R1], home_region=R1)),
        ("ghost-standby", TenantCreated(regions=[R2, R1], home_region=R2)),
        ("moved-list", TenantCreated(regions=[R1], home_region=R1)),
        ("deleted-here", TenantCreated(regions=[R1], home_region=R1)),
        ("deleted-here", TenantDeleted()),
        ("gone-both", TenantCreated(regions=[R1], home_region=R1)),
        ("gone-both", TenantDeleted()),
    )
    tenants["deleted-here"] = tenants["deleted-here"]._replace(status=st.PENDING_PURGE)
    tenants["gone-both"] = tenants["gone-both"]._replace(status=st.PENDING_PURGE)
    tenants["shredded"] = tenants["same"]._replace(tenant_id="shredded", status=st.PURGED,
                                                   deleted=True)
    snapshot = [
        Definition("same", (R2, R1), R1),  # order of the allow-list does not matter
        {"tenant_id": "moved-list", "regions": [R1, R3], "home_region": R1},
        SimpleNamespace(tenant_id="missed", regions=[R1], home_region=R1),
        Definition("missed-standby", (R3, R1), R3),
        Definition("elsewhere", (R2, R3), R2),  # not admitted here: not drift
        Definition("deleted-here", (R1,), R1),
        Definition("shredded", (R1, R2), R1),
    ]
    drift = reconcile(tenants, snapshot, R1)
    assert drift.gone == ("ghost", "ghost-standby")
    assert [d.tenant_id for d in drift.missing] == ["missed", "missed-standby"]
    assert drift.missing[0] == Definition("missed", (R1,), R1)
    assert drift.regions == (Definition("moved-list", (R1, R3), R1),)
    assert drift.restored == ("deleted-here",)
    assert drift.purged_but_live == ("shredded",)
    assert drift.total == 7
    summary = drift.summary()
    assert summary["gone"] == {"count": 2, "tenants": ["ghost", "ghost-standby"]}
    assert reconcile(tenants, snapshot, R1) == drift  # pure: same input, same answer
    # A Core that agrees with the Registry has no drift.
    agreed = [Definition(t.tenant_id, t.regions, t.home_region) for t in tenants.values()
              if not t.deleted]
    assert reconcile(st.CoreState(R1, {k: v for k, v in tenants.items() if not v.deleted}),
                     agreed, R1).total == 0


def test_purge_rail_refuses_a_mass_purge_and_allows_at_least_one(reg: Lifecycle) -> None:
    tenants = fold(reg, *[(f"t{i}", TenantCreated(regions=[R1], home_region=R1))
                          for i in range(20)])
    everyone_gone = reconcile(tenants, [], R1)
    assert len(everyone_gone.gone) == 20
    plan = plan_repairs(everyone_gone, tenants, R1, 0.1)
    assert plan.gone == () and plan.purges == () and plan.refused_gone == everyone_gone.gone
    assert plan.refused_reason is not None and "20 purges" in plan.refused_reason
    two_gone = reconcile(tenants, [Definition(f"t{i}", (R1,), R1) for i in range(2, 20)], R1)
    assert plan_repairs(two_gone, tenants, R1, 0.1).purges == ("t0", "t1")  # 2 of 20 = 10 %
    three_gone = reconcile(tenants, [Definition(f"t{i}", (R1,), R1) for i in range(3, 20)], R1)
    assert plan_repairs(three_gone, tenants, R1, 0.1).refused_reason
    one = {"t0": tenants["t0"]}
    assert plan_repairs(reconcile(one, [], R1), one, R1, 0.1).purges == ("t0",)


# --- the repair transaction on a real engine ------------------------------------------


def test_repair_schedules_purges_with_the_grace_initialises_and_replays(
    tmp_path: Path, reg: Lifecycle
) -> None:
    clock = FakeClock(T0)
    engine = make_engine(tmp_path / "core", clock, purge_grace=7 * DAY)
    try:
        accepted = [reg.accepted(TenantCreated(regions=[R1], home_region=R1), t)
                    for t in ("keep", "ghost", "later-restored")]
        accepted.append(reg.accepted(TenantCreated(regions=[R1, R2], home_region=R1), "narrow"))
        engine.apply_lifecycle(accepted, {0: (4, 4)})
        before = {t: engine.state.tenants[t] for t in ("keep", "ghost")}
        snapshot = [Definition("keep", (R1,), R1), Definition("narrow", (R1,), R1),
                    Definition("missed", (R1, R2), R1), Definition("standby-here", (R2, R1), R2)]
        drift = reconcile(engine.state, snapshot, R1)
        plan = plan_repairs(drift, engine.state, R1, 1.0)
        report = repair(engine, plan, 42, applied_seq=applied_registry_seq(engine.log.meta),
                        trigger="test", snapshot_tenants=len(snapshot))
        assert report["outcome"] == "repaired" and report["snapshot_seq"] == 42
        assert report["applied_seq"] == 4
        assert report["repaired"]["purges_scheduled"]["tenants"] == ["ghost", "later-restored"]
        assert report["repaired"]["initialized"]["tenants"] == ["missed"]
        assert report["repaired"]["recorded"]["tenants"] == ["standby-here"]
        assert report["repaired"]["regions_updated"]["tenants"] == ["narrow"]
        tenants = engine.state.tenants
        ghost = tenants["ghost"]
        assert ghost.status == st.PENDING_PURGE and ghost.deleted
        assert ghost.purge_cause == "registry-snapshot:42"
        assert ghost.purge_at == T0 + 7 * DAY  # the normal grace, never at once
        assert ghost.l2 == before["ghost"].l2  # keys kept until the grace ends
        assert tenants["keep"] == before["keep"]
        missed = tenants["missed"]
        assert missed.status == st.ACTIVE and [k.key_id for k in missed.l2] == ["e1v1"]
        assert [k.version for k in missed.l3] == [1] and missed.regions == (R1, R2)
        assert tenants["standby-here"].status == st.STANDBY and not tenants["standby-here"].l2
        assert tenants["narrow"].regions == (R1,)
        # A restore within the grace cancels a reconciliation-scheduled purge as usual.
        clock.advance(DAY)
        engine.apply_lifecycle([reg.accepted(TenantRestored(), "later-restored")], {0: (5, 5)})
        assert engine.state.tenants["later-restored"].status == st.ACTIVE
        # Nothing is purged before the grace ends; then the ghost is.
        scheduler = Scheduler(engine)
        scheduler.tick(T0 + 7 * DAY - 1)
        assert engine.state.tenants["ghost"].status == st.PENDING_PURGE
        scheduler.tick(T0 + 7 * DAY)
        assert engine.state.tenants["ghost"].status == st.PURGED
        assert engine.state.tenants["later-restored"].status == st.ACTIVE
        # A second pass against the same snapshot finds nothing left to repair.
        again = reconcile(engine.state, snapshot + [Definition("later-restored", (R1,), R1)], R1)
        assert again.total == 0
        # Every repair is in the log: a replay computes the same state.
        entries = [event_of(v) for _, v in engine.log.iter_events()]
        types = [e["type"] for e in entries]
        assert types.count("TenantReconciled") == 5 and types.count("Reconciled") == 1
        summary = next(e for e in entries if e["type"] == "Reconciled")["payload"]
        assert summary["snapshot_seq"] == 42 and summary["drift"]["gone"]["count"] == 2
        assert st.replay(entries, R1).tenants == engine.state.tenants
        assert engine.log.load_tenants() == engine.state.tenants
        scheduled = [e for e in entries if e["type"] == "TenantPurgeScheduled"]
        assert {e["payload"]["cause_event_id"] for e in scheduled} == {"registry-snapshot:42"}
    finally:
        close_engine(engine)


def test_a_deletion_the_registry_withdrew_is_cancelled(tmp_path: Path, reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    engine = make_engine(tmp_path / "core", clock)
    try:
        engine.apply_lifecycle([reg.accepted(TenantCreated(regions=[R1], home_region=R1), "x"),
                                reg.accepted(TenantDeleted(), "x")], {0: (2, 2)})
        assert engine.state.tenants["x"].status == st.PENDING_PURGE
        drift = reconcile(engine.state, [Definition("x", (R1,), R1)], R1)
        assert drift.restored == ("x",)
        report = repair(engine, plan_repairs(drift, engine.state, R1, 0.1), 3, applied_seq=2,
                        trigger="test", snapshot_tenants=1)
        assert report["repaired"]["purges_cancelled"]["tenants"] == ["x"]
        x = engine.state.tenants["x"]
        assert x.status == st.ACTIVE and not x.deleted and x.purge_at is None
    finally:
        close_engine(engine)


# --- the rails of a pass, against a Registry answering over HTTP ----------------------


class FakeRegistry:
    """A real HTTP server answering `GET /v1/snapshot` with whatever bytes a test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    server = FakeRegistry()
    yield server
    server.close()


def _snapshot(key: SigningKey, seq: int, tenants: list[tuple[str, list[str], str]]) -> bytes:
    rows = [SimpleNamespace(tenant_id=t, regions=r, home_region=h, version=seq)
            for t, r, h in sorted(tenants)]
    return b"".join(snapshot_lines(seq, rows, key))  # type: ignore[arg-type]


def test_a_pass_refuses_frozen_tampered_untrusted_and_stale_snapshots(
    tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    registry_key = SigningKey.generate("registry")
    publish_public_key(registry_key, trust_dir)
    reg = Lifecycle(registry_key)
    engine = make_engine(tmp_path / "core", FakeClock(T0))
    try:
        engine.apply_lifecycle([reg.accepted(TenantCreated(regions=[R1], home_region=R1), t)
                                for t in ("a", "b")], {0: (2, 2)})
        before = dict(engine.state.tenants)
        position = engine.log.meta.pos
        reconciler = Reconciler(engine, None, TrustStore(trust_dir), fake_registry.url)

        def run() -> dict:  # type: ignore[type-arg]
            return asyncio.run(reconciler.run_once("test"))

        # Frozen (tier 3): 503 -> refused.
        fake_registry.status = 503
        fake_registry.body = orjson.dumps({"error": {"code": "frozen", "message": "frozen"}})
        report = run()
        assert report["outcome"] == "refused" and "frozen" in report["refused"]["reason"]
        # Tampered: a tenant line altered after signing (b dropped from the snapshot).
        fake_registry.status = 200
        good = _snapshot(registry_key, 5, [("a", [R1], R1), ("b", [R1], R1)])
        fake_registry.body = good.replace(b'"tenant_id":"b"', b'"tenant_id":"c"')
        report = run()
        assert report["outcome"] == "refused" and "verification" in report["refused"]["reason"]
        # Signed by a key that claims to be the Registry but is not trusted.
        impostor = SigningKey.generate("registry")
        fake_registry.body = _snapshot(impostor, 5, [("a", [R1], R1)])
        report = run()
        assert report["outcome"] == "refused" and "snapshot_untrusted" in report["refused"][
            "reason"]
        # Truncated stream.
        fake_registry.body = good[: len(good) // 2]
        assert run()["outcome"] == "refused"
        # Older than what the Core applied (seq 2): refused, even though it lacks "b".
        fake_registry.body = _snapshot(registry_key, 1, [("a", [R1], R1)])
        report = run()
        assert report["outcome"] == "refused" and "older than seq 2" in report["refused"][
            "reason"]
        assert engine.state.tenants == before and engine.log.meta.pos == position
        # Unreachable: reported as such, nothing changes.
        reconciler.registry_url = "http://127.0.0.1:9"
        assert run()["outcome"] == "unreachable"
        assert engine.state.tenants == before and engine.log.meta.pos == position
        # A verified, current snapshot lacking "b": its purge is scheduled, reported.
        reconciler.registry_url = fake_registry.url
        fake_registry.body = _snapshot(registry_key, 3, [("a", [R1], R1)])
        report = run()
        assert report["outcome"] == "repaired"
        assert report["repaired"]["purges_scheduled"]["tenants"] == ["b"]
        b = engine.state.tenants["b"]
        assert b.status == st.PENDING_PURGE and b.purge_cause == "registry-snapshot:3"
        assert parse_ts(report["at"]) == T0
        # The report survives a restart (written with the pass's transaction).
        assert Reconciler(engine, None, TrustStore(trust_dir), None).last == report
        # A snapshot that would purge too many: refused, unless an operator overrides the
        # share for one pass.
        engine.apply_lifecycle([reg.accepted(TenantCreated(regions=[R1], home_region=R1), t)
                                for t in ("c", "d", "e")], {0: (5, 5)})
        fake_registry.body = _snapshot(registry_key, 6, [("a", [R1], R1)])
        report = run()
        assert report["outcome"] == "refused" and report["refused"]["tenants"]["count"] == 3
        assert engine.state.tenants["c"].status == st.ACTIVE
        report = asyncio.run(reconciler.run_once("operator", max_purge_share=0.9))
        assert report["repaired"]["purges_scheduled"]["tenants"] == ["c", "d", "e"]
    finally:
        close_engine(engine)
