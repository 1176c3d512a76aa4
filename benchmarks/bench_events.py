"""Event contract throughput: encode/decode and authentication, against raw baselines
measured in the same run (json, raw Ed25519 verify per event).

    .venv/bin/python -m benchmarks.bench_events
"""

from __future__ import annotations

import json

from benchmarks.common import rate, report
from events import models as m
from events.envelope import decode, encode, new_envelope
from events.fastpath import read_raw
from events.ids import key_version_id, utcnow
from events.signing import ChainSigner, ChainVerifier, SigningKey, TrustStore, event_digest

N = 20_000
CHECKPOINT_EVERY = 1000


def _events(key: SigningKey) -> list[bytes]:
    signer = ChainSigner(key)
    now = utcnow()
    out = []
    for i in range(1, N + 1):
        kv = m.KeyVersion(layer="L3", version=i, epoch=1, key_id=key_version_id(1, i),
                          parent_key_id="e1v1", kcv="0123456789ab", created_at=now)
        env = new_envelope(
            m.KeyRotated(region="eu-central-1", epoch=1, key=kv, trigger="scheduled"),
            producer="eu-central-1", seq=i, tenant_id=f"t{i % 1000}", occurred_at=now,
        )
        out.append(encode(signer.sign(env, 0, checkpoint=i % CHECKPOINT_EVERY == 0 or i == N)))
    return out


def main() -> None:
    key = SigningKey.generate("eu-central-1")
    trust = TrustStore()
    trust.add_signer(key)
    raw = _events(key)
    envs = [decode(r) for r in raw]

    def json_baseline() -> int:
        for r in raw:
            json.dumps(json.loads(r), sort_keys=True, separators=(",", ":"))
        return N

    def decode_encode() -> int:
        for r in raw:
            encode(decode(r))
        return N

    signed = [(event_digest(env), key._private.sign(event_digest(env))) for env in envs[:2000]]

    def ed25519_per_event() -> int:
        pub = key.public_key
        for digest, sig in signed:
            pub.verify(sig, digest)  # a valid signature per event: the cost chains avoid
        return len(signed)

    def chain_verify_decoded() -> int:
        verifier = ChainVerifier(trust)
        ok = 0
        for env in envs:
            good, bad = verifier.feed(0, env)
            ok += len(good)
            assert not bad
        assert ok == N
        return N

    def decode_and_chain_verify() -> int:
        verifier = ChainVerifier(trust)
        ok = 0
        for r in raw:
            good, _ = verifier.feed(0, decode(r))
            ok += len(good)
        assert ok == N
        return N

    def raw_path_chain_verify() -> int:
        verifier = ChainVerifier(trust)
        ok = 0
        for r in raw:
            good, _ = verifier.feed(0, read_raw(r))
            ok += len(good)
        assert ok == N
        return N

    base_json = rate(json_baseline)
    fast = rate(raw_path_chain_verify)
    codec = rate(decode_encode)
    ed = rate(ed25519_per_event)
    chain = rate(chain_verify_decoded)
    full = rate(decode_and_chain_verify)
    report(
        "events",
        {
            "events": N,
            "checkpoint_every": CHECKPOINT_EVERY,
            "baseline_raw_json_roundtrip": base_json,
            "decode_validate_encode": codec,
            "ratio_codec_vs_raw_json": round(
                codec["median_per_s"] / base_json["median_per_s"], 3
            ),
            "baseline_raw_ed25519_verify_per_event": ed,
            "chain_verify": chain,
            "ratio_chain_vs_per_event_signatures": round(
                chain["median_per_s"] / ed["median_per_s"], 1
            ),
            "decode_plus_chain_verify": full,
            "raw_fastpath_plus_chain_verify": fast,
            "ratio_fastpath_vs_strict": round(fast["median_per_s"] / full["median_per_s"], 2),
        },
    )


if __name__ == "__main__":
    main()
