"""The audit's verification stage without Kafka: chains, checkpoints, forged and broken
chains, garbage, and a restart between an unsigned event and its checkpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from events import models as m
from events.envelope import encode, new_envelope
from events.signing import ChainSigner, SigningKey, TrustStore, publish_public_key
from events.topics import CORE_KEYS
from projections import views
from projections.ingest import Ingest, Outcome, Record, collect

EU = "eu-central-1"
T0 = datetime(2026, 6, 1, tzinfo=UTC)


class DictStore:
    """The table as the ingest sees it (one partition)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get_json(self, key: str) -> dict[str, Any] | None:
        raw = self.data.get(key)
        return None if raw is None else orjson.loads(raw)

    def stashed(self) -> list[tuple[str, bytes]]:
        return [(k, v) for k, v in self.data.items() if k.startswith("p:")]

    def chain_offsets(self) -> dict[str, int]:
        return {k: orjson.loads(v)["offset"] for k, v in self.data.items() if k.startswith("c:")}

    def apply(self, out: Outcome) -> None:
        if out.stash:
            self.data[out.stash[0]] = out.stash[1]
        if out.chain:
            self.data[out.chain[0]] = views.dumps(out.chain[1])


def rotations(n: int, start: int = 2) -> list[Any]:
    return [
        new_envelope(
            m.KeyRotated(region=EU, epoch=1, trigger="scheduled", key=m.KeyVersion(
                layer="L3", version=v, epoch=1, key_id=f"e1v{v}", kcv="abcd",
                created_at=T0 + timedelta(days=v))),
            producer=EU, seq=v, tenant_id="t1", occurred_at=T0 + timedelta(days=v))
        for v in range(start, start + n)
    ]


def setup(tmp_path: Path) -> tuple[SigningKey, TrustStore]:
    key = SigningKey.generate(EU)
    publish_public_key(key, tmp_path)
    return key, TrustStore(tmp_path)


def signed_run(signer: ChainSigner, envs: list[Any]) -> list[bytes]:
    return [encode(signer.sign(e, (CORE_KEYS, 0), checkpoint=i == len(envs) - 1))
            for i, e in enumerate(envs)]


def feed_all(ingest: Ingest, store: DictStore, raws: list[bytes], first_offset: int = 0
             ) -> Outcome:
    total = Outcome()
    for i, raw in enumerate(raws):
        out = ingest.feed(Record(CORE_KEYS, 0, first_offset + i, raw, 0.0))
        store.apply(out)
        total.events += out.events
        total.findings += out.findings
    return total


def test_a_chain_verifies_at_its_checkpoint(tmp_path: Path) -> None:
    key, trust = setup(tmp_path)
    store = DictStore()
    out = feed_all(Ingest(trust, store), store, signed_run(ChainSigner(key), rotations(5)))
    assert out.findings == [] and [e.payload["key"]["version"] for e in out.events] == [2, 3, 4,
                                                                                       5, 6]


def test_restart_between_unsigned_events_and_their_checkpoint(tmp_path: Path) -> None:
    key, trust = setup(tmp_path)
    store = DictStore()
    raws = signed_run(ChainSigner(key), rotations(6))
    first = feed_all(Ingest(trust, store), store, raws[:4])
    assert first.events == [] and len(store.stashed()) == 4
    # A new process (empty verifier), the consumer resuming anywhere at or before offset 4.
    again = Ingest(trust, store)
    out = feed_all(again, store, raws[2:], first_offset=2)
    assert out.findings == []
    assert [e.payload["key"]["version"] for e in out.events] == [2, 3, 4, 5, 6, 7]
    assert sorted(collect(store.stashed(), store.chain_offsets(), 0)) == sorted(
        k for k, _ in store.stashed())
    # Redelivered after the checkpoint was applied: nothing happens twice.
    out = feed_all(Ingest(trust, store), store, raws, first_offset=0)
    assert out.events == [] and out.findings == []


def test_forged_broken_and_garbage(tmp_path: Path) -> None:
    key, trust = setup(tmp_path)
    store = DictStore()
    signer = ChainSigner(key)
    good = signed_run(signer, rotations(2))
    wrong = ChainSigner(SigningKey.generate(EU))  # not trusted
    forged = encode(wrong.sign(rotations(1, start=4)[0], (CORE_KEYS, 0), checkpoint=True))
    skipped = rotations(2, start=4)
    signer.sign(skipped[0], (CORE_KEYS, 0), checkpoint=True)  # never published
    after = encode(signer.sign(skipped[1], (CORE_KEYS, 0), checkpoint=True))
    out = feed_all(Ingest(trust, store), store, [*good, forged, after, b"\x00garbage"])
    assert [f.kind for f in out.findings] == ["auth_failure", "broken_chain", "invalid_event"]
    assert out.findings[0].reason.startswith("unknown signer")
    assert [e.payload["key"]["version"] for e in out.events] == [2, 3, 5]


def test_unsigned_events_without_a_checkpoint_are_reported_after_the_timeout(
    tmp_path: Path,
) -> None:
    key, trust = setup(tmp_path)
    store = DictStore()
    ingest = Ingest(trust, store)
    raws = signed_run(ChainSigner(key), rotations(3))
    feed_all(ingest, store, raws[:2])  # the producer died before its checkpoint
    assert ingest.unconfirmed(0, older_than=3600) == []
    late = ingest.unconfirmed(0, older_than=0)
    assert [f.kind for f in late] == ["auth_failure", "auth_failure"]
    assert "no signed checkpoint" in late[0].reason
    assert ingest.unconfirmed(1, older_than=0) == []  # another partition
    out = feed_all(ingest, store, raws[2:], first_offset=2)  # the checkpoint after all
    assert len(out.events) == 3 and ingest.unconfirmed(0, older_than=0) == []
