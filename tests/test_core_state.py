"""Fast tests of the Core without Kafka: the pure fold, the scheduler with a fake clock (a
simulated year), restart and replay, the wrapped-DEK format, purge, L1 binding and the
lifecycle consumer's decisions. Real RocksDB, real crypto, real local L1 provider."""

from __future__ import annotations

import base64
from collections import namedtuple
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from core_service import state as st
from core_service.clock import DAY, FakeClock, iso
from core_service.engine import TenantUnavailable
from core_service.keys import dek_header, parse_wrapped
from core_service.lifecycle import LifecycleConsumer
from core_service.log import OWN, event_of
from core_service.scheduler import Scheduler, due
from events import topics
from events.envelope import decode, encode
from events.kafka import KafkaSettings, partition_for
from events.models import TenantCreated, TenantDeleted, TenantRestored
from events.signing import ChainSigner, ChainVerifier, SigningKey, TrustStore, sign_event
from plugins.l1_local import add_key
from tests.test_core_helpers import R1, R2, R3, Lifecycle, close_engine, make_engine

T0 = 1_800_000_000.0


@pytest.fixture
def reg() -> Lifecycle:
    return Lifecycle(SigningKey.generate("registry"))


def created(reg: Lifecycle, n: int, regions: list[str] | None = None, home: str = R1,
            prefix: str = "t") -> list:
    regions = regions or [R1, R2]
    return [reg.accepted(TenantCreated(regions=regions, home_region=home), f"{prefix}{i}")
            for i in range(n)]


# --- the pure fold -------------------------------------------------------------------


def test_fold_records_what_each_region_may_hold(reg: Lifecycle) -> None:
    ev, _, _ = reg.accepted(TenantCreated(regions=[R1, R2], home_region=R1), "acme")
    assert st.apply(None, ev, R1).status == st.INITIALIZING  # home: keys follow at once
    assert st.apply(None, ev, R2).status == st.STANDBY  # allowed, not home: no keys
    foreign = st.apply(None, ev, R3)
    assert foreign.status == st.FOREIGN and foreign.l2 == () and foreign.l3 == ()
    deleted, _, _ = reg.accepted(TenantDeleted(), "acme")
    gone = st.apply(foreign, deleted, R3)
    assert gone.status == st.DELETED and gone.deleted
    restored, _, _ = reg.accepted(TenantRestored(), "acme")
    assert st.apply(gone, restored, R3).status == st.FOREIGN
    assert st.apply(None, deleted, R1) is None  # unknown tenant: nothing to record
    assert st.load_tenant(st.dump_tenant(foreign)) == foreign


def test_log_is_replayable_and_its_events_honour_the_contract(tmp_path: Path,
                                                              reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock)
    e.apply_lifecycle(created(reg, 20), {0: (20, 20)})
    e.rotate_many([(f"t{i % 20}", "L2" if i % 7 == 0 else "L3", "on-demand") for i in range(60)])
    entries = list(e.log.iter_events())
    assert [p for p, _ in entries] == list(range(1, len(entries) + 1))  # gap-free positions
    own = [decode(v[1:]) for _, v in entries if v[:1] == OWN]  # strict contract decoding
    assert [x.seq for x in own] == list(range(1, len(own) + 1))  # per-producer seq gap-free
    trust = TrustStore()
    trust.add_signer(e.key)
    verifier = ChainVerifier(trust)
    verified = []
    for x in own:
        ok, bad = verifier.feed(partition_for(x.tenant_id.encode(), 6), x)
        assert bad == []
        verified += ok
    assert len(verified) == len(own)
    replayed = st.replay((event_of(v) for _, v in entries), R1)
    assert replayed.tenants == e.state.tenants == e.log.load_tenants()
    for t in e.state.tenants.values():
        for layer in (t.l2, t.l3):
            assert [k.version for k in layer] == list(range(1, len(layer) + 1))
            assert len({k.key_id for k in layer}) == len(layer)
        assert all(k.parent_key_id in {x.key_id for x in t.l2} for k in t.l3)
    close_engine(e)


# --- the scheduler with a fake clock ---------------------------------------------------


def test_simulated_year_rotates_l3_four_times_and_l2_once_within_one_tick(
    tmp_path: Path, reg: Lifecycle
) -> None:
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock)
    n = 200
    e.apply_lifecycle(created(reg, n), {0: (n, n)})
    sched = Scheduler(e)
    tick = 3600.0
    # Before every tick, remember when each tenant was due, to measure lateness.
    lateness: list[float] = []
    while clock.now() < T0 + 366 * DAY:
        clock.advance(tick)
        plan = due(e.state.tenants.values(), clock.now(), R1, e.config.l3_period,
                   e.config.l2_period)
        for tid, layer in plan.rotations:
            t = e.state.tenants[tid]
            period = e.config.l2_period if layer == "L2" else e.config.l3_period
            last = (t.l2 if layer == "L2" else t.l3)[-1].created_at
            lateness.append(clock.now() - (last + period))
        sched.tick()
    assert max(lateness) < tick  # within one scheduler tick of due
    for t in e.state.tenants.values():
        l3_sched = [k for k in t.l3 if k.trigger == "scheduled"]
        l2_sched = [k for k in t.l2 if k.trigger == "scheduled"]
        assert len(l3_sched) == 4, [k.trigger for k in t.l3]
        assert len(l2_sched) == 1
        assert t.l3[-1].trigger == "l2-rotation" and t.l3[-1].parent_key_id == t.l2[-1].key_id
    close_engine(e)


def test_after_downtime_each_overdue_tenant_rotates_once(tmp_path: Path, reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock)
    e.apply_lifecycle(created(reg, 30), {0: (30, 30)})
    before = e.log.meta.seq
    clock.advance(3 * 365 * DAY)  # three years down
    Scheduler(e).tick()
    assert e.log.meta.seq - before == 30 * 2  # one L2 (+ its L3) per tenant, not 3 years' worth
    Scheduler(e).tick()
    assert e.log.meta.seq - before == 60
    t = e.state.tenants["t0"]
    assert len(t.l2) == 2 and len(t.l3) == 2 and t.l3[-1].created_at == clock.now()
    close_engine(e)


def test_policy_override_changes_due_times(tmp_path: Path, reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock)
    e.apply_lifecycle(created(reg, 2), {0: (2, 2)})
    e.set_policy("t0", 10 * DAY, None)
    clock.advance(11 * DAY)
    Scheduler(e).tick()
    assert len(e.state.tenants["t0"].l3) == 2 and len(e.state.tenants["t1"].l3) == 1
    replayed = st.replay((event_of(v) for _, v in e.log.iter_events()), R1)
    assert replayed.tenants["t0"].l3_period == 10 * DAY
    close_engine(e)


# --- restart, DEKs, purge, L1 --------------------------------------------------------


def test_restart_serves_old_deks_from_the_stored_projection(tmp_path: Path,
                                                            reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    key = SigningKey.generate(R1)
    e = make_engine(tmp_path / "a", clock, key=key)
    e.apply_lifecycle(created(reg, 5), {0: (5, 5)})
    dek, wrapped = e.generate_dek("t1")
    e.rotate_many([("t1", "L2", "on-demand"), ("t1", "L3", "on-demand")])
    state_before = dict(e.state.tenants)
    close_engine(e)
    e = make_engine(tmp_path / "a", clock, key=key)
    assert e.state.tenants == state_before
    assert e.unwrap_dek("t1", wrapped) == dek  # unsealed from the vault through L1 on demand
    dek2, wrapped2 = e.generate_dek("t1")
    assert parse_wrapped(wrapped2).key_id == "e1v3"  # initial, under the new L2, on-demand
    assert e.unwrap_dek("t1", wrapped2) == dek2
    close_engine(e)


def test_wrapped_dek_is_self_describing_and_bound(tmp_path: Path, reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock)
    e.apply_lifecycle(created(reg, 2) + [
        reg.accepted(TenantCreated(regions=[R1, R2], home_region=R2), "standby"),
        reg.accepted(TenantCreated(regions=[R2], home_region=R2), "foreign"),
    ], {0: (4, 4)})
    dek, wrapped = e.generate_dek("t0")
    parsed = parse_wrapped(wrapped)
    assert (parsed.tenant_id, parsed.key_id) == ("t0", "e1v1")
    assert parsed.header == dek_header("t0", "e1v1") and len(wrapped) == len(parsed.header) + 60
    tampered = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    codes = {}
    for name, call in {
        "tampered": lambda: e.unwrap_dek("t0", tampered),
        "other_tenant": lambda: e.unwrap_dek("t1", wrapped),
        "garbage": lambda: e.unwrap_dek("t0", b"\x07abc"),
        "unknown": lambda: e.generate_dek("nobody"),
        "standby": lambda: e.generate_dek("standby"),
        "foreign": lambda: e.generate_dek("foreign"),
    }.items():
        with pytest.raises(TenantUnavailable) as info:
            call()
        codes[name] = (info.value.status, info.value.code)
    assert codes == {
        "tampered": (422, "bad_wrapped_dek"), "other_tenant": (422, "tenant_mismatch"),
        "garbage": (422, "bad_wrapped_dek"), "unknown": (404, "tenant_unknown"),
        "standby": (409, "not_owner"), "foreign": (404, "not_allowed_in_region"),
    }
    assert e.unwrap_dek("t0", wrapped) == dek
    close_engine(e)


def test_delete_restore_and_purge(tmp_path: Path, reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock, purge_grace=7 * DAY)
    e.apply_lifecycle(created(reg, 2), {0: (2, 2)})
    dek, wrapped = e.generate_dek("t0")
    e.apply_lifecycle([reg.accepted(TenantDeleted(), "t0")], {0: (3, 3)})
    with pytest.raises(TenantUnavailable, match="pending purge"):
        e.unwrap_dek("t0", wrapped)
    clock.advance(DAY)
    e.apply_lifecycle([reg.accepted(TenantRestored(), "t0")], {0: (4, 4)})
    assert e.unwrap_dek("t0", wrapped) == dek
    e.apply_lifecycle([reg.accepted(TenantDeleted(), "t0")], {0: (5, 5)})
    clock.advance(6 * DAY)
    Scheduler(e).tick()
    assert e.state.tenants["t0"].status == st.PENDING_PURGE  # grace not over yet
    clock.advance(DAY + 1)
    Scheduler(e).tick()
    with pytest.raises(TenantUnavailable) as info:
        e.unwrap_dek("t0", wrapped)
    assert info.value.code == "tenant_purged" and "purged" in info.value.message
    assert e.vault.list("t0") == [] and "t0" not in e.cache.l3
    purged = [event_of(v) for _, v in e.log.iter_events() if event_of(v)["type"] == "TenantPurged"]
    assert purged[0]["payload"]["destroyed"] == ["e1v1", "e1v1"]
    assert e.unwrap_dek("t1", e.generate_dek("t1")[1])  # the other tenant is untouched
    close_engine(e)


def test_l1_binding_rewraps_l2_and_survives_a_crash_between_vault_and_log(
    tmp_path: Path, reg: Lifecycle
) -> None:
    clock = FakeClock(T0)
    key = SigningKey.generate(R1)
    e = make_engine(tmp_path / "a", clock, key=key)
    e.apply_lifecycle(created(reg, 2), {0: (2, 2)})
    e.rotate_many([("t0", "L2", "on-demand")])
    dek, wrapped = e.generate_dek("t0")
    add_key(tmp_path / "keyring.json", "customer-7")
    out = e.bind_l1("t0", "customer-7")
    assert out["rewrapped"] == ["e1v1", "e1v2"]
    with pytest.raises(TenantUnavailable):
        e.bind_l1("t0", "no-such-key")
    close_engine(e)
    e = make_engine(tmp_path / "a", clock, key=key)
    assert e.state.tenants["t0"].l1_ref == "customer-7"
    assert e.unwrap_dek("t0", wrapped) == dek
    # A crash after the vault was re-wrapped but before the log said so:
    add_key(tmp_path / "keyring.json", "customer-8")
    from core_service.keys import l2_aad

    items = []
    for kv in e.state.tenants["t0"].l2:
        h = e.cache.l2["t0"][kv.key_id]
        items.append(("t0", "L2", kv.key_id, e.l1.wrap("customer-8", h, l2_aad(
            "t0", "customer-8", kv.key_id))))
    e.log.put_marker(b"bt0", b"customer-8")
    e.vault.put_many(items)
    close_engine(e)
    e = make_engine(tmp_path / "a", clock, key=key)
    assert e.state.tenants["t0"].l1_ref == "customer-7"
    assert e.unwrap_dek("t0", wrapped) == dek
    close_engine(e)


# --- the lifecycle consumer's decisions ------------------------------------------------

Rec = namedtuple("Rec", "topic partition offset key value")


def test_consumer_verifies_chains_dedupes_and_rejects(tmp_path: Path, reg: Lifecycle) -> None:
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock)
    trust = TrustStore()
    trust.add_signer(reg.key)
    c = LifecycleConsumer(e, KafkaSettings("127.0.0.1:1"), trust)
    tp = TopicPartition(topics.LIFECYCLE, 0)
    signer = ChainSigner(reg.key)
    envs = [reg.envelope(TenantCreated(regions=[R1], home_region=R1), f"c{i}") for i in range(3)]
    chained = [signer.sign(x, 0, checkpoint=False) for x in envs[:2]]

    def recs(values: list[bytes], start: int) -> dict:
        return {tp: [Rec(topics.LIFECYCLE, 0, start + i, b"k", v) for i, v in enumerate(values)]}

    # Two unsigned events wait for their checkpoint: nothing applied, offsets stay before them.
    acc, dead = c.process(recs([encode(chained[0]), encode(chained[1])], 0))
    assert acc == [] and dead == [] and c._new_offsets[0] == (0, 2)
    e.apply_lifecycle(acc, c._new_offsets)
    checkpoint = signer.sign(envs[2], 0, checkpoint=True)
    forged_key = SigningKey.generate("registry")
    forged = sign_event(reg.envelope(TenantDeleted(), "c0"), forged_key)
    acc, dead = c.process(recs([encode(checkpoint), encode(forged), b"\x00\xffrandom"], 2))
    assert [a[0]["tenant_id"] for a in acc] == ["c0", "c1", "c2"]
    assert ["unknown signer" in d.reason for d in dead] == [True, False]
    assert "undecodable" in dead[1].reason
    e.apply_lifecycle(acc, c._new_offsets)
    assert e.log.meta.offsets["0"] == [5, 5]
    # A verbatim replay of an applied event, and a fresh event with an old seq.
    replay = sign_event(envs[0], reg.key)
    old_seq = sign_event(reg.envelope(TenantDeleted(), "c1").model_copy(update={"seq": 1}),
                         reg.key)
    acc, dead = c.process(recs([encode(replay), encode(old_seq)], 5))
    assert acc == [] and [d.reason.split(":")[0] for d in dead] == ["replayed", "replayed"]
    # After a restart the same records are read again below the high-water mark: quiet.
    c2 = LifecycleConsumer(e, KafkaSettings("127.0.0.1:1"), trust)
    acc, dead = c2.process(recs([encode(checkpoint)], 2))
    assert acc == [] and dead == []
    assert all(e.state.tenants[f"c{i}"].status == st.ACTIVE for i in range(3))
    assert iso(T0).endswith("Z") and base64  # helpers stay imported for readers
    close_engine(e)


def test_fast_canonical_json_is_byte_identical_to_the_contract(tmp_path: Path,
                                                               reg: Lifecycle) -> None:
    from core_service.canonical import canonical
    from events.canonical import canonical_bytes

    samples = [{"b": [1, None, True, {"z": "é\u001f\"\\/", "a": -5}], "a": "x\ty"}, {}, []]
    clock = FakeClock(T0)
    e = make_engine(tmp_path / "a", clock)
    e.apply_lifecycle(created(reg, 3), {0: (3, 3)})
    samples += [event_of(v) for _, v in e.log.iter_events()]
    for obj in samples:
        assert canonical(obj) == canonical_bytes(obj)
    close_engine(e)
