"""The event contract: validation, canonical bytes, signing, hash chains, upcasting."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events import models as m
from events.canonical import canonical_bytes
from events.envelope import DecodeError, Envelope, decode, encode, new_envelope
from events.models import PAYLOADS
from events.signing import (
    ChainSigner,
    ChainVerifier,
    SigningKey,
    TrustStore,
    VerificationError,
    load_or_create_signing_key,
    sign_event,
    verify_event,
)
from tests.factories import T0, sample_envelopes


def test_every_event_type_has_a_sample() -> None:
    assert {e.type for e in sample_envelopes()} == set(PAYLOADS)


@pytest.mark.parametrize("env", sample_envelopes(), ids=lambda e: e.type)
def test_round_trip_through_canonical_bytes(env: Envelope) -> None:
    raw = encode(env)
    back = decode(raw)
    assert back == env
    assert encode(back) == raw
    assert raw == canonical_bytes(json.loads(raw))


def test_unknown_fields_are_rejected() -> None:
    data = json.loads(encode(sample_envelopes()[0]))
    data["payload"]["colour"] = "blue"
    with pytest.raises(DecodeError, match="colour"):
        decode(json.dumps(data).encode())
    data = json.loads(encode(sample_envelopes()[0]))
    data["extra"] = 1
    with pytest.raises(DecodeError, match="extra"):
        decode(json.dumps(data).encode())


@pytest.mark.parametrize(
    "tenant_id",
    ["", "a" * 41, "tenänt", "has space", "slash/no", "semi;colon"],
)
def test_bad_tenant_ids_are_rejected(tenant_id: str) -> None:
    data = json.loads(encode(sample_envelopes()[0]))
    data["tenant_id"] = tenant_id
    with pytest.raises(DecodeError, match="tenant_id"):
        decode(json.dumps(data).encode())


def test_good_tenant_ids_pass() -> None:
    for tid in ["a", "A" * 40, "acme.prod_eu~1-x"]:
        new_envelope(m.TenantDeleted(), producer="registry", seq=1, tenant_id=tid)


@pytest.mark.parametrize(
    "region", ["", "EU-central-1", "eu", "eu-central", "eu central 1", "x-y-1"]
)
def test_bad_regions_are_rejected(region: str) -> None:
    with pytest.raises(ValueError):
        m.TenantCreated(regions=[region], home_region=region)


def test_home_region_must_be_in_allow_list_and_regions_unique() -> None:
    with pytest.raises(ValueError, match="home_region"):
        m.TenantCreated(regions=["eu-central-1"], home_region="us-east-1")
    with pytest.raises(ValueError, match="repeat"):
        m.TenantCreated(regions=["eu-central-1", "eu-central-1"], home_region="eu-central-1")
    with pytest.raises(ValueError):
        m.TenantCreated(regions=[], home_region="eu-central-1")


def test_timestamps_must_be_aware_and_are_normalised_to_utc() -> None:
    with pytest.raises(ValueError):
        new_envelope(
            m.TenantDeleted(), producer="registry", seq=1, tenant_id="t",
            occurred_at=datetime(2026, 1, 1),
        )
    env = new_envelope(
        m.TenantDeleted(), producer="registry", seq=1, tenant_id="t",
        occurred_at=datetime(2026, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))),
    )
    assert env.occurred_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert b'"occurred_at":"2026-01-01T00:00:00Z"' in encode(env)


def test_payload_size_is_bounded() -> None:
    data = json.loads(encode(sample_envelopes()[1]))
    data["payload"]["reason"] = "x" * 501
    with pytest.raises(DecodeError, match="reason"):
        decode(json.dumps(data).encode())
    with pytest.raises(DecodeError, match="exceeds"):
        decode(b"{" + b" " * 1_000_001 + b"}")


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[]", b"null", b'{"type":"Nope"}', None])
def test_garbage_gives_a_reason(raw: bytes | None) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert str(info.value)


def test_region_scoped_and_tenant_scoped_events() -> None:
    with pytest.raises(ValueError, match="tenant_id must be null"):
        new_envelope(
            m.RegionFailover(from_region="eu-central-1", to_region="eu-west-1", epoch=2),
            producer="operator", seq=1, tenant_id="t",
        )
    with pytest.raises(ValueError, match="needs a tenant_id"):
        new_envelope(m.TenantDeleted(), producer="registry", seq=1, tenant_id=None)


def test_cloudevent_mapping() -> None:
    env = sample_envelopes()[0]
    ce = env.to_cloudevent()
    assert ce["id"] == str(env.event_id)
    assert ce["source"] == "openkcm/registry"
    assert ce["type"] == "io.openkcm.TenantCreated.v2"
    assert ce["subject"] == "tenant-1"
    assert ce["time"] == "2026-12-04T12:00:00Z"


# --- signing -------------------------------------------------------------------------------


def _signed(key: SigningKey) -> Envelope:
    env = new_envelope(
        m.TenantCreated(regions=["eu-central-1"], home_region="eu-central-1"),
        producer="registry", seq=7, tenant_id="acme", occurred_at=T0,
    )
    return sign_event(env, key)


def test_signed_event_verifies_after_the_wire(
    registry_key: SigningKey, trust: TrustStore
) -> None:
    verify_event(decode(encode(_signed(registry_key))), trust)


def test_flipping_any_byte_breaks_verification(
    registry_key: SigningKey, trust: TrustStore
) -> None:
    raw = encode(_signed(registry_key))
    body_end = raw.index(b'"event_id"')  # flip bytes inside the signed body, not the auth
    broken = 0
    for i in range(body_end, len(raw), 7):
        mutated = bytearray(raw)
        mutated[i] ^= 0x01
        try:
            env = decode(bytes(mutated))
        except DecodeError:
            broken += 1
            continue
        with pytest.raises(VerificationError):
            verify_event(env, trust)
        broken += 1
    assert broken > 10


def test_flipping_a_payload_letter_fails_verification(
    registry_key: SigningKey, trust: TrustStore
) -> None:
    raw = encode(_signed(registry_key))
    tampered = raw.replace(b'"acme"', b'"acmf"')
    assert tampered != raw
    with pytest.raises(VerificationError, match="bad signature"):
        verify_event(decode(tampered), trust)


def test_unknown_signer_fails(trust: TrustStore) -> None:
    stranger = SigningKey.generate("registry")
    with pytest.raises(VerificationError, match="unknown signer"):
        verify_event(decode(encode(_signed(stranger))), trust)


def test_key_of_another_producer_cannot_authenticate(trust_dir, trust: TrustStore) -> None:
    region_key = load_or_create_signing_key(trust_dir.parent / "core", "eu-central-1", trust_dir)
    env = _signed(SigningKey.generate("registry"))
    # claim to be the registry but sign with a region's (trusted) key
    forged = env.model_copy(
        update={"auth": env.auth.model_copy(update={"key_id": region_key.key_id})}
    )
    with pytest.raises(VerificationError, match="does not belong"):
        verify_event(decode(encode(forged)), trust)
    with pytest.raises(ValueError, match="cannot sign"):
        sign_event(env, region_key)


def test_signing_key_persists_and_is_published(tmp_path, trust_dir) -> None:
    a = load_or_create_signing_key(tmp_path / "d", "registry", trust_dir)
    b = load_or_create_signing_key(tmp_path / "d", "registry", trust_dir)
    assert a.key_id == b.key_id
    assert (trust_dir / f"{a.key_id}.pub").exists()
    assert oct((tmp_path / "d" / "signing-registry.pem").stat().st_mode & 0o777) == "0o600"
    assert a.key_id in TrustStore(trust_dir).key_ids()


def test_trust_store_picks_up_keys_published_later(trust_dir) -> None:
    store = TrustStore(trust_dir, rescan_interval=3600)
    assert store.get("us-east-1.0000000000000000") is None  # a miss that just rescanned
    late = load_or_create_signing_key(trust_dir.parent / "late", "us-east-1", trust_dir)
    # published right after a rescan: the changed directory is noticed, not the interval
    assert store.get(late.key_id) is not None


# --- hash chains -------------------------------------------------------------------------


def _run(n: int, key: SigningKey, every: int) -> list[Envelope]:
    signer = ChainSigner(key)
    out = []
    for i in range(1, n + 1):
        env = new_envelope(m.TenantDeleted(), producer="registry", seq=i, tenant_id=f"t{i}")
        out.append(signer.sign(env, chain=0, checkpoint=(i % every == 0 or i == n)))
    return out


def test_chain_checkpoint_authenticates_the_run(
    registry_key: SigningKey, trust: TrustStore
) -> None:
    events = [decode(encode(e)) for e in _run(25, registry_key, every=10)]
    verifier = ChainVerifier(trust)
    verified: list[Envelope] = []
    for e in events:
        ok, bad = verifier.feed(0, e)
        assert bad == []
        verified += ok
    assert [e.seq for e in verified] == list(range(1, 26))
    assert verifier.pending(0) == 0


def test_chain_rejects_an_injected_unsigned_event(
    registry_key: SigningKey, trust: TrustStore
) -> None:
    events = _run(5, registry_key, every=5)
    attacker = SigningKey.generate("registry")
    trust.add_signer(attacker)  # even a trusted-looking key cannot splice into the chain
    forged = sign_event(
        new_envelope(m.TenantDeleted(), producer="registry", seq=3, tenant_id="victim"),
        attacker, prev=events[1].auth.prev, checkpoint=False,
    )
    verifier = ChainVerifier(trust)
    verified, rejected = [], []
    for e in [*events[:3], forged, *events[3:]]:
        ok, bad = verifier.feed(0, e)
        verified += ok
        rejected += bad
    assert [e.tenant_id for e, _ in rejected] == ["victim"]
    assert "not covered" in rejected[0][1]
    assert [e.seq for e in verified] == [1, 2, 3, 4, 5]


def test_chain_tolerates_a_producer_retry(registry_key: SigningKey, trust: TrustStore) -> None:
    events = _run(4, registry_key, every=4)
    unsigned_copy = events[:3]  # published once without the checkpoint, then again in full
    verifier = ChainVerifier(trust)
    verified, rejected = [], []
    for e in [*unsigned_copy, *events]:
        ok, bad = verifier.feed(0, e)
        verified += ok
        rejected += bad
    assert rejected == []
    assert [e.seq for e in verified] == [1, 2, 3, 4]


def test_tampered_event_in_chain_breaks_the_checkpoint(
    registry_key: SigningKey, trust: TrustStore
) -> None:
    events = [encode(e) for e in _run(3, registry_key, every=3)]
    events[1] = events[1].replace(b'"t2"', b'"t9"')
    verifier = ChainVerifier(trust)
    rejected = []
    for raw in events:
        rejected += verifier.feed(0, decode(raw))[1]
    assert [e.tenant_id for e, _ in rejected] == ["t1", "t9"]  # t3 itself is authentic


# --- upcasting -----------------------------------------------------------------------------


def test_v1_tenant_created_is_upcast_to_v2(registry_key: SigningKey, trust: TrustStore) -> None:
    v1 = {
        "event_id": str(uuid.uuid4()),
        "type": "TenantCreated",
        "schema_version": 1,
        "tenant_id": "legacy",
        "producer": "registry",
        "seq": 1,
        "occurred_at": "2020-01-01T00:00:00Z",
        "payload": {"region": "eu-central-1"},
    }
    # an old registry signed the v1 body; the signature still verifies after upcasting
    import base64
    import hashlib

    from events.signing import _DOMAIN
    digest = hashlib.sha256(canonical_bytes(v1)).digest()
    v1["auth"] = {
        "key_id": registry_key.key_id,
        "prev": None,
        "sig": base64.b64encode(registry_key._private.sign(_DOMAIN + digest)).decode(),
    }
    env = decode(canonical_bytes(v1))
    assert env.schema_version == 2
    assert env.payload == m.TenantCreated(regions=["eu-central-1"], home_region="eu-central-1")
    verify_event(env, trust)


def test_future_schema_version_is_refused() -> None:
    data = json.loads(encode(sample_envelopes()[0]))
    data["schema_version"] = 3
    with pytest.raises(DecodeError, match="newer"):
        decode(json.dumps(data).encode())


# --- property: what validates re-serialises identically ------------------------------------

_region = st.from_regex(r"\A[a-z]{2,10}(?:-[a-z]{2,16}){1,3}-[0-9]{1,3}\Z")
_tenant = st.from_regex(r"\A[A-Za-z0-9._~-]{1,40}\Z")
_time = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)


@st.composite
def _envelopes(draw: st.DrawFn) -> dict:
    regions = draw(st.lists(_region, min_size=1, max_size=4, unique=True))
    kind = draw(st.sampled_from(["TenantCreated", "TenantDeleted", "KeyRotated", "RegionFailover"]))
    if kind == "TenantCreated":
        payload = {"regions": regions, "home_region": draw(st.sampled_from(regions))}
    elif kind == "TenantDeleted":
        payload = {"reason": draw(st.none() | st.text(max_size=50))}
    elif kind == "KeyRotated":
        v = draw(st.integers(1, 10**6))
        payload = {
            "region": regions[0], "epoch": 1, "trigger": "scheduled",
            "key": {"layer": "L3", "version": v, "epoch": 1, "key_id": f"e1v{v}",
                    "parent_key_id": "e1v1", "kcv": "00ff" * 3,
                    "created_at": draw(_time).isoformat()},
        }
    else:
        payload = {"from_region": "eu-central-1", "to_region": "us-east-1",
                   "epoch": draw(st.integers(2, 10**6)), "tenants": None}
    return {
        "event_id": str(draw(st.uuids())),
        "type": kind,
        "schema_version": 2 if kind == "TenantCreated" else 1,
        "tenant_id": None if kind == "RegionFailover" else draw(_tenant),
        "producer": draw(st.sampled_from(["registry", "operator", *regions])),
        "seq": draw(st.integers(1, 2**62)),
        "occurred_at": draw(_time).isoformat(),
        "payload": payload,
    }


@settings(max_examples=300, deadline=None)
@given(_envelopes())
def test_what_validates_reserialises_identically(data: dict) -> None:
    try:
        env = decode(json.dumps(data).encode())
    except DecodeError:
        return
    first = encode(env)
    assert encode(decode(first)) == first
    assert decode(first) == env
