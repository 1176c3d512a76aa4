"""The Registry's store, fold, relay signing and snapshot format, in process (real RocksDB,
real Ed25519; no broker needed)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from events.envelope import decode, encode
from events.ids import utcnow
from events.signing import ChainVerifier, SigningKey, TrustStore, verify_event
from registry_service.client import SnapshotError, SnapshotVerifier
from registry_service.relay import definition_envelope, sign_batch
from registry_service.snapshot import snapshot_lines
from registry_service.store import (
    ChangeRegions,
    CreateTenant,
    DeleteTenant,
    Policy,
    RegistryStore,
    RestoreTenant,
    StoreError,
    fold,
)

REGIONS = ("eu-central-1", "eu-west-1", "us-east-1")
POLICY = Policy(frozenset(REGIONS), timedelta(seconds=60))


def create(tid: str, regions: tuple[str, ...] = REGIONS[:2], home: str = REGIONS[0]):
    return CreateTenant(tid, regions, home)


@pytest.fixture
def store(tmp_path: Path):
    s = RegistryStore(tmp_path / "store", POLICY)
    yield s
    s.close()


def log_of(store: RegistryStore) -> list[dict]:
    return [json.loads(e.body) for e in store.read_events(0, 1_000_000)]


def test_commands_are_checked_against_state(store: RegistryStore) -> None:
    out = store.execute(
        [
            create("a"),
            create("a"),  # duplicate in the same group commit
            DeleteTenant("nope"),
            DeleteTenant("a", reason="offboarded"),
            DeleteTenant("a"),
            RestoreTenant("a"),
            RestoreTenant("a"),
            ChangeRegions("a", ("eu-west-1",)),  # drops the home region
            ChangeRegions("a", ("eu-central-1", "us-east-1")),
            ChangeRegions("a", ("us-east-1", "eu-central-1")),  # same set: nothing to do
            ChangeRegions("a", ("eu-central-1",), expected_version=1),  # stale version
            CreateTenant("b", ("eu-central-1", "ap-south-1"), "eu-central-1"),
            CreateTenant("b", ("eu-west-1",), "eu-central-1"),
            CreateTenant("b", ("eu-west-1", "eu-west-1"), "eu-west-1"),
        ]
    )
    got = [(o.error.status, o.error.code) if o.error else ("ok", o.seq) for o in out]
    assert got == [
        ("ok", 1),
        (409, "tenant_exists"),
        (404, "tenant_not_found"),
        ("ok", 2),
        (409, "tenant_deleted"),
        ("ok", 3),
        (409, "tenant_not_deleted"),
        (409, "home_region_required"),
        ("ok", 4),
        ("ok", 4),
        (409, "version_conflict"),
        (422, "unknown_region"),
        (422, "home_region_outside_regions"),
        (422, "invalid_regions"),
    ]
    assert out[9].event_id is None
    assert [e["type"] for e in log_of(store)] == [
        "TenantCreated",
        "TenantDeleted",
        "TenantRestored",
        "TenantRegionsChanged",
    ]
    assert [e["seq"] for e in log_of(store)] == [1, 2, 3, 4]
    a = store.get("a")
    assert a is not None and a.live and a.regions == ("eu-central-1", "us-east-1")
    assert a.version == 4
    # Deleted ids are never reused, and restore ends with the purge grace.
    store.execute([DeleteTenant("a")])
    later = utcnow() + timedelta(seconds=61)
    again = store.execute([RestoreTenant("a"), create("a")], now=later)
    assert [o.error.code for o in again if o.error] == ["purge_grace_over", "tenant_deleted"]


def test_state_survives_reopen_and_equals_the_fold(tmp_path: Path) -> None:
    s = RegistryStore(tmp_path / "store", POLICY)
    s.execute([create(f"t{i}") for i in range(50)])
    s.execute([DeleteTenant(f"t{i}") for i in range(0, 50, 5)])
    before = dict(s.tenants)
    log = log_of(s)
    s.close()
    s = RegistryStore(tmp_path / "store", POLICY)
    try:
        assert s.tenants == before == fold(log)
        assert s.seq == 60
    finally:
        s.close()


def test_concurrent_creates_of_one_tenant_accept_exactly_one(store: RegistryStore) -> None:
    results = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        results.append(store.execute([create("same")])[0])

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.error.status if o.error else 201 for o in results) == [201] + [409] * 7
    assert len(log_of(store)) == 1


def _corrupt_state(path: Path) -> None:
    options = Options(raw_mode=True)
    db = Rdict(str(path), options)
    key = b"t/t1"
    data = json.loads(db[key])
    data["regions"] = ["us-east-1"]
    db[key] = json.dumps(data).encode()
    db.close()


def _drop_event(path: Path) -> None:
    db = Rdict(str(path), Options(raw_mode=True))
    del db[b"e/" + (2).to_bytes(8, "big")]
    db.close()


def _garbage_files(path: Path) -> None:
    for f in path.iterdir():
        if f.name.startswith(("MANIFEST", "CURRENT")):
            f.write_bytes(b"\x00garbage" * 10)


@pytest.mark.parametrize("damage", [_corrupt_state, _drop_event, _garbage_files])
def test_a_damaged_store_fails_its_integrity_check(tmp_path: Path, damage) -> None:
    s = RegistryStore(tmp_path / "store", POLICY)
    s.execute([create("t1"), create("t2"), DeleteTenant("t1")])
    s.close()
    damage(tmp_path / "store")
    with pytest.raises(StoreError):
        RegistryStore(tmp_path / "store", POLICY)


COMMANDS = st.lists(
    st.tuples(
        st.sampled_from(["create", "delete", "restore", "regions"]),
        st.sampled_from(["a", "b", "c"]),
        st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3, unique=True),
    ),
    max_size=40,
)


def command(kind: str, tid: str, regions: list[str]):
    if kind == "create":
        return CreateTenant(tid, tuple(regions), regions[0])
    if kind == "delete":
        return DeleteTenant(tid)
    if kind == "restore":
        return RestoreTenant(tid)
    return ChangeRegions(tid, tuple(regions))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(COMMANDS)
def test_live_state_is_always_the_fold_of_the_log(tmp_path: Path, script) -> None:
    path = tmp_path / f"s{abs(hash(repr(script)))}"
    s = RegistryStore(path, POLICY)
    try:
        for kind, tid, regions in script:
            s.execute([command(kind, tid, regions)])
        assert s.tenants == fold(log_of(s))
        assert [e["seq"] for e in log_of(s)] == list(range(1, s.seq + 1))
    finally:
        s.close()
        Rdict.destroy(str(path))


def test_relay_signing_is_deterministic_and_verifiable(store: RegistryStore) -> None:
    key = SigningKey.generate("registry")
    trust = TrustStore()
    trust.add_signer(key)
    store.execute([create(f"t{i}") for i in range(40)])
    events = store.read_events(0, 100)
    heads1: dict[int, str] = {}
    first = sign_batch(events, key, heads1, 3, checkpoint_every=5)
    # A re-publish after a crash: the same events in other batches give identical chains.
    heads2: dict[int, str] = {}
    second = sign_batch(events[:17], key, heads2, 3, 5) + sign_batch(events[17:], key, heads2, 3, 5)
    assert heads1 == heads2
    assert [e.auth.prev for _, e in first] == [e.auth.prev for _, e in second]  # type: ignore[union-attr]
    verifier = ChainVerifier(trust)
    verified = []
    for partition, env in first + second:
        ok, rejected = verifier.feed(("lifecycle", partition, "registry"), decode(encode(env)))
        assert rejected == []
        verified += ok
    assert {e.event_id for e in verified} == {decode(e.body).event_id for e in events}
    # At least one checkpoint every 5 events per partition, and one at each batch's end.
    for partition in range(3):
        run = 0
        for p, env in first:
            if p == partition:
                run = 0 if env.auth.sig else run + 1  # type: ignore[union-attr]
                assert run < 5
    definition = definition_envelope(first[0][1], events[0], key)
    verify_event(definition, trust)
    assert definition == definition_envelope(first[0][1], events[0], key)


def test_snapshot_lines_verify_and_tampering_is_detected(store: RegistryStore) -> None:
    key = SigningKey.generate("registry")
    trust = TrustStore()
    trust.add_signer(key)
    store.execute([create(f"t{i:04d}") for i in range(2500)] + [DeleteTenant("t0001")])
    seq, live = store.live_snapshot()
    data = b"".join(snapshot_lines(seq, live, key))
    lines = data.splitlines(keepends=True)
    assert len(lines) == 1 + 2499 + 1

    def check(raw_lines: list[bytes], trust: TrustStore = trust):
        v = SnapshotVerifier(trust)
        tenants = [t for t in (v.feed(line) for line in raw_lines) if t is not None]
        return v.finish(), tenants

    header, tenants = check(lines)
    assert header.seq == seq == 2501 and len(tenants) == 2499
    assert "t0001" not in {t.tenant_id for t in tenants}
    tampered = lines.copy()
    tampered[5] = tampered[5].replace(b"eu-west-1", b"us-east-1")
    with pytest.raises(SnapshotError):
        check(tampered)
    with pytest.raises(SnapshotError):
        check(lines[:3] + lines[4:])
    with pytest.raises(SnapshotError):
        check(lines[:-1])
    with pytest.raises(SnapshotError):
        check(lines, TrustStore())
