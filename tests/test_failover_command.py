"""`openkcm failover` publishes a signed RegionFailover with a rising epoch, Registry or not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from events import topics
from events.envelope import decode
from events.kafka import KafkaSettings, assign_from_offsets, make_consumer, read_to_end
from events.signing import TrustStore, verify_event

ROOT = Path(__file__).resolve().parent.parent


def _failover(bootstrap: str, trust_dir: Path, key_dir: Path, *extra: str):
    return subprocess.run(
        [sys.executable, "-m", "openkcm.cli", "failover", "--bootstrap-servers", bootstrap,
         "--trust-dir", str(trust_dir), "--operator-key-dir", str(key_dir), "--format", "json",
         *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


async def _lifecycle(bootstrap: str) -> list:
    consumer = make_consumer(KafkaSettings(bootstrap))
    await consumer.start()
    try:
        tps = await assign_from_offsets(consumer, topics.LIFECYCLE, {})
        return [decode(r.value) async for _tp, recs in read_to_end(consumer, tps) for r in recs]
    finally:
        await consumer.stop()


async def test_failover_is_signed_and_epochs_rise(fresh_broker, trust_dir, tmp_path) -> None:
    keys = tmp_path / "operator"
    first = _failover(fresh_broker.bootstrap, trust_dir, keys,
                      "--from", "eu-central-1", "--to", "eu-west-1")
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert one["epoch"] == 2 and one["seq"] == 1
    second = _failover(fresh_broker.bootstrap, trust_dir, keys, "--from", "eu-west-1",
                       "--to", "us-east-1", "--tenant", "acme", "--tenant", "globex")
    assert second.returncode == 0, second.stderr
    two = json.loads(second.stdout)
    assert two["epoch"] == 3 and two["seq"] == 2 and two["tenants"] == ["acme", "globex"]

    events = await _lifecycle(fresh_broker.bootstrap)
    by_seq = sorted(events, key=lambda e: e.seq)
    assert [str(e.event_id) for e in by_seq] == [one["event_id"], two["event_id"]]
    assert [e.payload.epoch for e in by_seq] == [2, 3]
    trust = TrustStore(trust_dir)
    for env in events:
        verify_event(env, trust)
        assert env.producer == "operator" and env.tenant_id is None


def test_failover_usage_errors(trust_dir, tmp_path) -> None:
    bad = _failover("127.0.0.1:1", trust_dir, tmp_path, "--from", "eu-central-1",
                    "--to", "eu-central-1")
    assert bad.returncode == 2 and "differ" in bad.stderr
    bad = _failover("127.0.0.1:1", trust_dir, tmp_path, "--from", "Moon", "--to", "eu-west-1")
    assert bad.returncode == 2 and "region" in bad.stderr


def test_failover_fails_cleanly_without_a_broker(trust_dir, tmp_path) -> None:
    from openkcm.broker import free_port

    out = _failover(f"127.0.0.1:{free_port()}", trust_dir, tmp_path, "--from", "eu-central-1",
                    "--to", "eu-west-1")
    assert out.returncode == 1 and "not declared" in out.stderr
