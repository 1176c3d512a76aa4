"""Reading the replicated key log and tenant definitions back from the real broker."""

from __future__ import annotations

from core_service.replicated import read_key_log, read_tenant_definitions
from events import models as m
from events import topics
from events.envelope import encode, new_envelope, partition_key
from events.kafka import KafkaSettings, ensure_topics, make_producer, partition_for
from events.signing import (
    ChainSigner,
    SigningKey,
    TrustStore,
    load_or_create_signing_key,
    sign_event,
)
from tests.factories import T0, key_version

REGION = "eu-central-1"


def _timeline(signer: ChainSigner, tenant: str, n_rot: int, seq0: int) -> list:
    out = []
    seq = seq0
    init = new_envelope(m.TenantInitialized(region=REGION, epoch=1, l1_ref="default",
                                            l2=key_version("L2"), l3=key_version("L3")),
                        producer=REGION, seq=seq, tenant_id=tenant, occurred_at=T0)
    out.append(init)
    for v in range(2, 2 + n_rot):
        seq += 1
        out.append(new_envelope(m.KeyRotated(region=REGION, epoch=1, key=key_version("L3", v),
                                             trigger="scheduled"),
                                producer=REGION, seq=seq, tenant_id=tenant, occurred_at=T0))
    return out


async def test_key_log_is_verified_filtered_and_carries_material(fresh_broker, trust_dir) -> None:
    settings = KafkaSettings(fresh_broker.bootstrap, partitions=3)
    await ensure_topics(settings)
    key = load_or_create_signing_key(trust_dir.parent / "core", REGION, trust_dir)
    signer = ChainSigner(key)
    events = _timeline(signer, "acme", 3, 1) + _timeline(signer, "globex", 1, 10)
    producer = make_producer(settings)
    await producer.start()
    try:
        for i, env in enumerate(events):
            part = partition_for(partition_key(env), 3)
            last = i == len(events) - 1 or env.tenant_id != events[i + 1].tenant_id
            signed = signer.sign(env, part, checkpoint=last)
            await producer.send_and_wait(topics.CORE_KEYS, encode(signed),
                                         key=partition_key(env), partition=part)
        forger = SigningKey.generate(REGION)
        forged = sign_event(new_envelope(
            m.KeyRotated(region=REGION, epoch=1, key=key_version("L3", 9), trigger="scheduled"),
            producer=REGION, seq=99, tenant_id="acme"), forger)
        await producer.send_and_wait(topics.CORE_KEYS, encode(forged), key=b"acme")
        await producer.send_and_wait(topics.CORE_KEYS, b"\x00garbage", key=b"acme")
        for kid in ("e1v1", "e1v2"):
            mat = sign_event(new_envelope(
                m.KeyMaterial(region=REGION, epoch=1, layer="L3", key_id=kid, wrapped_by="e1v1",
                              blob="AAAA"), producer=REGION, seq=50, tenant_id="acme"), key)
            await producer.send_and_wait(topics.CORE_MATERIAL, encode(mat),
                                         key=f"acme/L3/{kid}".encode())
        await producer.send_and_wait(topics.CORE_MATERIAL, None, key=b"acme/L3/e1v2")
    finally:
        await producer.stop()

    logs, stats = await read_key_log(settings, TrustStore(trust_dir), tenants={"acme"})
    assert set(logs) == {"acme"}
    acme = logs["acme"]
    assert [e["type"] for e in acme.events] == ["TenantInitialized"] + ["KeyRotated"] * 3
    assert [e["payload"]["key"]["version"] for e in acme.events[1:]] == [2, 3, 4]
    assert stats.rejected == 2  # the forged rotation and the garbage
    assert acme.material[("L3", "e1v1")]["blob"] == "AAAA"
    assert acme.material[("L3", "e1v2")] is None  # tombstoned
    everyone, _ = await read_key_log(settings, TrustStore(trust_dir))
    assert set(everyone) == {"acme", "globex"}


async def test_tenant_definitions_from_the_compacted_topic(
    fresh_broker, trust_dir, registry_key
) -> None:
    settings = KafkaSettings(fresh_broker.bootstrap, partitions=3)
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        for seq, tid in enumerate(["a", "b", "c"], start=1):
            env = sign_event(new_envelope(
                m.TenantDefinition(regions=[REGION], home_region=REGION, registry_seq=seq),
                producer="registry", seq=seq, tenant_id=tid), registry_key)
            await producer.send_and_wait(topics.TENANTS, encode(env), key=tid.encode())
        await producer.send_and_wait(topics.TENANTS, None, key=b"b")
        stranger = SigningKey.generate("registry")
        env = sign_event(new_envelope(
            m.TenantDefinition(regions=[REGION], home_region=REGION, registry_seq=9),
            producer="registry", seq=9, tenant_id="evil"), stranger)
        await producer.send_and_wait(topics.TENANTS, encode(env), key=b"evil")
    finally:
        await producer.stop()
    defs, stats = await read_tenant_definitions(settings, TrustStore(trust_dir))
    assert set(defs) == {"a", "c"}
    assert defs["a"]["home_region"] == REGION
    assert stats.rejected == 1 and "unknown signer" in stats.reasons[0]
