"""`openkcm replay --verify`: clean on a live Core, and it names a tampered state or log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import orjson

from core_service.log import OWN, EventLog
from core_service.state import dump_tenant
from openkcm.stack import Stack, wait_for
from registry_service.client import RegistryClient

R1, R2 = "eu-central-1", "eu-west-1"
ROOT = Path(__file__).resolve().parent.parent


def _verify(data_dir: Path, *extra: str) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "openkcm.cli", "replay", "--verify", "--data-dir", str(data_dir),
         "--format", "json", *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_replay_verify_live_then_tampered(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_broker()
        registry = stack.registry([R1, R2]).start()
        core = stack.core(R1, registry_url=registry.url or "",
                          l1=f"local:{tmp_path / 'kr.json'}", extra=["--tick", "0.2"]).start()
        tenants = [f"t{i}" for i in range(8)]
        with RegistryClient(registry.url or "") as client:
            for tid in tenants:
                client.create(tid, [R1, R2], R1)
        url = core.url or ""
        assert wait_for(lambda: all(
            httpx.post(f"{url}/v1/tenants/{t}/deks", timeout=5).status_code == 200
            for t in tenants), 30)
        for tid in tenants[:4]:
            for layer in ("L3", "L3", "L2"):
                r = httpx.post(f"{url}/v1/tenants/{tid}/rotate", json={"layer": layer}, timeout=5)
                assert r.status_code == 200, r.text
        data_dir = tmp_path / f"core-{R1}"
        # Live: the Core is still running; the relay has published everything it acknowledged.
        assert wait_for(lambda: _verify(data_dir, "--bootstrap-servers", stack.bootstrap or "",
                                        "--trust-dir", str(stack.trust_dir))[0] == 0, 20, 1.0)
        code, report = _verify(data_dir, "--bootstrap-servers", stack.bootstrap or "",
                               "--trust-dir", str(stack.trust_dir))
        assert code == 0 and report["clean"] and report["region"] == R1
        assert report["tenants"] >= 8 and report["own_events"] >= 8 + 4 * 4
        assert report["topic_events_checked"] >= report["own_events"]
        # An event signed with this Core's key that its log never had: named as foreign.
        forged = _publish_forged_rotation(stack.bootstrap or "", data_dir, "t7")
        code, report = _verify(data_dir, "--bootstrap-servers", stack.bootstrap or "",
                               "--trust-dir", str(stack.trust_dir))
        assert code == 1
        assert [(d["kind"], d["tenant_id"]) for d in report["differences"]] == [
            ("foreign", "t7")] and forged in report["differences"][0]["detail"]
        core.stop()

    # Tamper with the stored state of one tenant: the fold of the log disagrees.
    log = EventLog(data_dir / "log")
    stored = log.load_tenants()["t0"]
    log.db.put(b"tt0", dump_tenant(stored._replace(epoch=stored.epoch + 7)))
    log.close()
    code, report = _verify(data_dir)
    assert code == 1
    assert [(d["kind"], d["tenant_id"]) for d in report["differences"]] == [("state", "t0")]
    assert "epoch" in report["differences"][0]["detail"]

    # Tamper with one of the Core's own signed events: authentication names it.
    log = EventLog(data_dir / "log")
    for pos, entry in log.iter_events():
        if entry[:1] == OWN and b'"t1"' in entry:
            event = orjson.loads(entry[1:])
            event["occurred_at"] = "2000-01-01T00:00:00Z"
            tampered = OWN + orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
            log.db.put(b"l" + pos.to_bytes(8, "big"), tampered)
            break
    log.close()
    code, report = _verify(data_dir, "--trust-dir", str(tmp_path / "trust"))
    kinds = {d["kind"] for d in report["differences"]}
    assert code == 1 and "chain" in kinds


def _publish_forged_rotation(bootstrap: str, data_dir: Path, tenant: str) -> str:
    import asyncio

    from events import topics
    from events.envelope import encode, new_envelope
    from events.kafka import KafkaSettings, make_producer
    from events.models import KeyRotated
    from events.signing import load_or_create_signing_key, sign_event
    from tests.factories import key_version

    key = load_or_create_signing_key(data_dir, R1)
    env = sign_event(new_envelope(KeyRotated(region=R1, epoch=1, key=key_version("L3", 99),
                                             trigger="on-demand"),
                                  producer=R1, seq=10_000, tenant_id=tenant), key)

    async def send() -> None:
        producer = make_producer(KafkaSettings(bootstrap))
        await producer.start()
        try:
            await producer.send_and_wait(topics.CORE_KEYS, encode(env), key=tenant.encode())
        finally:
            await producer.stop()

    asyncio.run(send())
    return str(env.event_id)


def test_replay_usage_errors(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "openkcm.cli", "replay", "--verify",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "no Core event log" in out.stderr


def test_rebuild_from_the_topics_serves_the_same_deks(tmp_path: Path) -> None:
    """A region loses its disk; `replay --region` rebuilds it from the topics into an empty
    dir, and the restarted Core serves every DEK it had wrapped, keeps a pending purge, and
    passes its own verification."""
    import shutil

    with Stack(tmp_path) as stack:
        stack.start_broker()
        registry = stack.registry([R1, R2]).start()
        l1 = f"local:{tmp_path / 'kr.json'}"
        core = stack.core(R1, registry_url=registry.url or "", l1=l1,
                          extra=["--tick", "0.2"]).start()
        tenants = [f"r{i}" for i in range(6)]
        with RegistryClient(registry.url or "") as client:
            for tid in tenants:
                client.create(tid, [R1, R2], R1)
        url = core.url or ""
        assert wait_for(lambda: all(
            httpx.post(f"{url}/v1/tenants/{t}/deks", timeout=5).status_code == 200
            for t in tenants), 30)
        deks: list[tuple[str, str, str]] = []
        for tid in tenants:
            for layer in ("L3", "L2", "L3"):
                r = httpx.post(f"{url}/v1/tenants/{tid}/deks", timeout=5).json()
                deks.append((tid, r["wrapped"], r["plaintext"]))
                assert httpx.post(f"{url}/v1/tenants/{tid}/rotate", json={"layer": layer},
                                  timeout=5).status_code == 200
        with RegistryClient(registry.url or "") as client:
            client.delete("r5")
        assert wait_for(lambda: httpx.post(f"{url}/v1/tenants/r5/deks/unwrap", json={
            "wrapped": deks[-1][1]}, timeout=5).status_code == 409, 20)
        data_dir = tmp_path / f"core-{R1}"
        args = ["--bootstrap-servers", stack.bootstrap or "", "--trust-dir", str(stack.trust_dir)]
        assert wait_for(lambda: _verify(data_dir, *args)[0] == 0, 20, 1.0)  # all published
        core.kill()
        shutil.rmtree(data_dir)  # the disk is gone

        out = subprocess.run(
            [sys.executable, "-m", "openkcm.cli", "replay", "--region", R1, "--data-dir",
             str(data_dir), "--l1", l1, "--format", "json", *args],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        report = json.loads(out.stdout)
        assert report["tenants_rebuilt"] == 6 and report["refused"] == []
        assert report["purges_kept"] == 1

        core.start()  # the same command line, on the rebuilt data dir
        url = core.url or ""
        for tid, wrapped, plaintext in deks:
            r = httpx.post(f"{url}/v1/tenants/{tid}/deks/unwrap", json={"wrapped": wrapped},
                           timeout=5)
            if tid == "r5":
                assert r.status_code == 409 and r.json()["error"]["code"] == "pending_purge"
            else:
                assert r.status_code == 200, r.text
                assert r.json()["plaintext"] == plaintext
        view = httpx.get(f"{url}/v1/tenants/r0/keys", timeout=5).json()
        assert view["epoch"] == 2 and len(view["versions"]["L3"]) == 4
        rotated = httpx.post(f"{url}/v1/tenants/r0/rotate", timeout=5).json()
        assert rotated["current"]["L3"] == "e2v5"  # the count continues, in the new epoch
        core.stop()
        code, verify = _verify(data_dir, *args)
        assert code == 0, verify["differences"]
