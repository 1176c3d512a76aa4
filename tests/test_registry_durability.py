"""The Registry under faults, each on a broker of its own test: SIGKILL in the middle of a burst
of creates, the broker gone while creates are accepted, and a damaged store (tier 3)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from rocksdict import Options, Rdict

from events import topics
from events.signing import TrustStore
from openkcm.broker import EmbeddedBroker
from registry_service.client import RegistryClient
from registry_service.store import CreateTenant, DeleteTenant, Policy, RegistryStore
from tests.test_registry_support import (
    REGIONS,
    RegistryProcess,
    copies_by_event_id,
    read_topic,
    verified_lifecycle,
)

FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    if FIGURES:
        print("\nregistry figures: " + json.dumps(FIGURES))


async def test_sigkill_mid_burst_loses_no_acknowledged_create(
    fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    data, trust_dir = tmp_path / "data", tmp_path / "trust"
    registry = RegistryProcess(data, fresh_broker.bootstrap, trust_dir).start()
    FIGURES["cold_start_s"] = round(registry.startup_seconds, 2)
    valid = [f"burst-{i:03d}" for i in range(500)]
    invalid = {f"burst-bad-{i:02d}" for i in range(50)}  # unknown region: 422
    order = [t for i, t in enumerate(valid) for t in ([t, f"burst-bad-{i // 10:02d}"]
             if i % 10 == 0 else [t])]
    phase1: dict[str, int | str] = {}
    event_ids: dict[str, str] = {}
    acknowledged = 0
    kill_after = 200
    started = time.monotonic()

    async with httpx.AsyncClient(
        base_url=registry.url, timeout=10, limits=httpx.Limits(max_connections=16)
    ) as http:
        sem = asyncio.Semaphore(16)

        async def create(tid: str) -> None:
            nonlocal acknowledged
            regions = ["ap-south-1"] if tid in invalid else ["eu-central-1", "eu-west-1"]
            body = {"tenant_id": tid, "regions": regions, "home_region": regions[0]}
            async with sem:
                try:
                    response = await http.post("/v1/tenants", json=body)
                except httpx.TransportError:
                    phase1[tid] = "lost"
                    return
            phase1[tid] = response.status_code
            if response.status_code == 201:
                event_ids[tid] = response.json()["event_id"]
                acknowledged += 1
                if acknowledged == kill_after:
                    FIGURES["creates_per_s"] = round(kill_after / (time.monotonic() - started))
                    registry.kill()

        await asyncio.gather(*(create(t) for t in order))
    lost = sorted(t for t, s in phase1.items() if s == "lost")
    assert kill_after <= acknowledged < len(valid), "the kill must land mid-burst"
    assert lost, "requests in flight or after the kill must have failed"
    assert all(phase1[t] in (422, "lost") for t in invalid)

    # Restart on the same data dir; retry what got no answer.
    restarted = RegistryProcess(data, fresh_broker.bootstrap, trust_dir).start()
    FIGURES["restart_to_listening_s"] = round(restarted.startup_seconds, 2)
    try:
        phase2: dict[str, int] = {}
        with RegistryClient(restarted.url) as client:
            for tid in lost:
                regions = ["ap-south-1"] if tid in invalid else ["eu-central-1", "eu-west-1"]
                response = httpx.post(
                    f"{restarted.url}/v1/tenants",
                    json={"tenant_id": tid, "regions": regions, "home_region": regions[0]},
                    timeout=10,
                )
                phase2[tid] = response.status_code
                if response.status_code == 201:
                    event_ids[tid] = response.json()["event_id"]
            registered = {t.tenant_id for t in client.list_by_region("eu-central-1")}
        assert set(phase2.values()) <= {201, 409, 422}
        committed_before_kill = {t for t, s in phase2.items() if s == 409}
        acked = {t for t, s in phase1.items() if s == 201} | {
            t for t, s in phase2.items() if s == 201
        }
        errored = {t for t, s in phase1.items() if s == 422} | {
            t for t, s in phase2.items() if s == 422
        }
        assert acked | committed_before_kill == set(valid) == registered
        assert errored == invalid

        caught_up = time.monotonic()
        restarted.wait_relayed()
        FIGURES["relay_catch_up_after_restart_s"] = round(time.monotonic() - caught_up, 2)
        records = await read_topic(fresh_broker.bootstrap, topics.LIFECYCLE)
        events = verified_lifecycle(records, TrustStore(trust_dir))
        copies = copies_by_event_id(events)
        on_topic: dict[str, set[str]] = {}
        for eid, envs in copies.items():
            assert len({e.body() for e in envs}) == 1, "a duplicate carries the same event"
            assert envs[0].type == "TenantCreated"
            on_topic.setdefault(envs[0].tenant_id or "", set()).add(eid)
        assert set(on_topic) == set(valid), "every create that got 201 is on the topic"
        assert not set(on_topic) & invalid, "nothing that got an error is"
        assert all(len(ids) == 1 for ids in on_topic.values()), "one event per create"
        for tid, eid in event_ids.items():
            assert on_topic[tid] == {eid}
        seqs = sorted({e.seq for _, e in events})
        assert seqs == list(range(1, len(valid) + 1)), "store sequence is gap-free"
        FIGURES["duplicates_after_kill"] = len(records) - len(copies)
    finally:
        assert restarted.terminate() == 0


async def test_broker_outage_creates_are_accepted_and_published_in_order_later(
    fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    trust_dir = tmp_path / "trust"
    registry = RegistryProcess(tmp_path / "data", fresh_broker.bootstrap, trust_dir).start()
    try:
        with RegistryClient(registry.url) as client:
            first = client.create("before-outage", ["eu-central-1"], "eu-central-1")
            registry.wait_relayed()
            fresh_broker.stop()
            accepted = [
                client.create(f"outage-{i:02d}", ["eu-west-1", "us-east-1"], "eu-west-1")
                for i in range(50)
            ]
            assert [r.seq for r in accepted] == list(range(2, 52))
            health = registry.health()
            assert health["status"] in ("ok", "degraded") and health["relay_lag"] == 50
            fresh_broker.start()  # same port, empty again
            back = time.monotonic()
            registry.wait_relayed(timeout=90)
            FIGURES["relay_recovery_after_broker_return_s"] = round(time.monotonic() - back, 2)
        records = await read_topic(fresh_broker.bootstrap, topics.LIFECYCLE)
        events = verified_lifecycle(records, TrustStore(trust_dir))
        by_id = copies_by_event_id(events)
        # The broker came back empty: the relay noticed and published the whole log again,
        # so the event from before the outage is there too (same event id).
        assert set(by_id) == {r.event_id for r in accepted} | {first.event_id}
        assert all(len({e.body() for e in c}) == 1 for c in by_id.values())
        # In order: per partition the first copies follow the store sequence, none is missing.
        for partition in {p for p, _ in events}:
            seqs = list(dict.fromkeys(e.seq for p, e in events if p == partition))
            assert seqs == sorted(seqs)
        assert sorted({e.seq for _, e in events}) == list(range(1, 52))
        compacted = await read_topic(fresh_broker.bootstrap, topics.TENANTS)
        assert {r.key.decode() for r in compacted} == {f"outage-{i:02d}" for i in range(50)} | {
            "before-outage"
        }
    finally:
        assert registry.terminate() == 0


def _fold_mismatch(store: Path) -> None:
    db = Rdict(str(store), Options(raw_mode=True))
    state = json.loads(db[b"t/t3-a"])
    state["regions"] = ["eu-central-1", "us-east-1"]
    db[b"t/t3-a"] = json.dumps(state).encode()
    db.close()


def _unopenable(store: Path) -> None:
    for f in store.iterdir():
        if f.name.startswith(("MANIFEST", "CURRENT")):
            f.write_bytes(b"\xffnot a rocksdb file\n" * 4)


MANAGEMENT_CALLS = [
    ("POST", "/v1/tenants", {"tenant_id": "t3-new", "regions": ["eu-west-1"],
                              "home_region": "eu-west-1"}),
    ("DELETE", "/v1/tenants/t3-a", None),
    ("POST", "/v1/tenants/t3-b/restore", None),
    ("PUT", "/v1/tenants/t3-a/regions", {"regions": ["eu-central-1"]}),
    ("GET", "/v1/tenants/t3-a", None),
    ("GET", "/v1/tenants?region=eu-central-1", None),
    ("GET", "/v1/snapshot", None),
]


@pytest.mark.parametrize("damage", [_fold_mismatch, _unopenable], ids=["fold", "unopenable"])
async def test_tier3_damaged_store_freezes_management_and_emits_nothing(
    fresh_broker: EmbeddedBroker, tmp_path: Path, damage
) -> None:
    data = tmp_path / "data"
    store = RegistryStore(data / "store", Policy(frozenset(REGIONS)))
    store.execute(
        [
            CreateTenant("t3-a", ("eu-central-1", "eu-west-1"), "eu-central-1"),
            CreateTenant("t3-b", ("eu-west-1",), "eu-west-1"),
            DeleteTenant("t3-b"),
        ]
    )
    store.close()
    damage(data / "store")
    registry = RegistryProcess(data, fresh_broker.bootstrap, tmp_path / "trust").start()
    try:
        assert registry.announced["frozen"] is True
        for method, path, body in MANAGEMENT_CALLS:
            response = httpx.request(method, registry.url + path, json=body, timeout=5)
            assert response.status_code == 503, (method, path, response.text)
            error = response.json()["error"]
            assert error["code"] == "frozen" and "platform is frozen" in error["message"]
        health = httpx.get(f"{registry.url}/healthz", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "frozen"
        assert "openkcm_registry_frozen 1.0" in httpx.get(f"{registry.url}/metrics").text
        await asyncio.sleep(1.0)
        assert await read_topic(fresh_broker.bootstrap, topics.LIFECYCLE) == []
        assert await read_topic(fresh_broker.bootstrap, topics.TENANTS) == []
    finally:
        assert registry.terminate() == 0
