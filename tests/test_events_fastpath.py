"""The raw fast path authenticates exactly what the strict path does."""

from __future__ import annotations

import json

import pytest

from events.canonical import canonical_bytes
from events.envelope import DecodeError, encode
from events.fastpath import read_raw
from events.signing import ChainSigner, ChainVerifier, SigningKey, TrustStore, sign_event
from tests.factories import sample_envelopes


def _keys_and_trust() -> tuple[dict[str, SigningKey], TrustStore]:
    trust = TrustStore()
    keys = {p: SigningKey.generate(p) for p in ("registry", "operator", "eu-central-1")}
    for k in keys.values():
        trust.add_signer(k)
    return keys, trust


@pytest.mark.parametrize("signed", [True, False])
def test_raw_body_equals_the_signed_body(signed: bool) -> None:
    keys, _ = _keys_and_trust()
    for env in sample_envelopes():
        if signed:
            env = sign_event(env, keys[env.producer])
        raw = read_raw(encode(env))
        assert raw.body() == env.body()
        assert raw.event_id == str(env.event_id)
        assert raw.envelope() == env


def test_raw_chain_verification_matches_strict() -> None:
    keys, trust = _keys_and_trust()
    signer = ChainSigner(keys["eu-central-1"])
    envs = [e for e in sample_envelopes() if e.producer == "eu-central-1"]
    wire = [encode(signer.sign(e, 0, checkpoint=(i == len(envs) - 1))) for i, e in enumerate(envs)]
    verifier = ChainVerifier(trust)
    verified = []
    for w in wire:
        ok, bad = verifier.feed(0, read_raw(w))
        assert bad == []
        verified += ok
    assert [v.raw for v in verified] == wire


def test_non_canonical_bytes_fail_closed() -> None:
    keys, trust = _keys_and_trust()
    env = sign_event(sample_envelopes()[0], keys["registry"])
    data = json.loads(encode(env))
    reordered = json.dumps(data).encode()  # same content, other key order/spacing
    with pytest.raises(DecodeError, match="canonical"):
        read_raw(reordered)
    # a member added after auth changes the body: the signature no longer holds
    tampered = canonical_bytes({**data, "seq": data["seq"] + 1})
    ok, bad = ChainVerifier(trust).feed(0, read_raw(tampered))
    assert ok == [] and "bad signature" in bad[0][1]


@pytest.mark.parametrize(
    "raw", [None, b"", b"[]", b'{"type":"Nope"}', b'{"auth":{"x":1},"type":"TenantDeleted"}']
)
def test_raw_garbage_gives_a_reason(raw: bytes | None) -> None:
    with pytest.raises(DecodeError):
        read_raw(raw)
