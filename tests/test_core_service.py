"""The Core as a real process (`python -m openkcm.cli core`) against a real broker, with the
Registry as a real process where the acceptance point names it. Real RocksDB, real crypto,
SIGKILL for crashes. Each test runs on a broker of its own."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from core_service.keys import l2_aad, l3_aad
from core_service.log import OWN, EventLog, event_of
from core_service.state import replay
from events import topics
from events.dlq import DeadLetter
from events.envelope import decode, encode
from events.models import TenantCreated, TenantDeleted, TenantRestored
from events.signing import ChainVerifier, SigningKey, TrustStore, sign_event
from openkcm.broker import EmbeddedBroker
from openkcm.stack import Stack
from plugins.l1 import open_l1
from plugins.l1_local import add_key
from plugins.vault import open_vault
from registry_service.client import RegistryClient
from tests.test_core_helpers import (
    R1,
    R2,
    R3,
    Lifecycle,
    core_service,
    dek_status,
    keys,
    new_dek,
    publish,
    publish_events,
    read_topic,
    status,
    unwrap,
    wait_until,
)

DAY = 86_400.0






def create_tenants(bootstrap: str, lc: Lifecycle, ids: list[str], regions: list[str],
                   home: str) -> None:
    envs = [lc.envelope(TenantCreated(regions=regions, home_region=home), t) for t in ids]
    asyncio.run(publish_events(bootstrap, envs, lc.key, chained=True))


@pytest.fixture
def reg(registry_key: SigningKey) -> Lifecycle:
    return Lifecycle(registry_key)


# --- acceptance 1: created through the Registry, servable in its region only -------------


def test_tenant_created_through_registry_is_servable_in_its_region_only(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start_broker()
        registry = stack.registry([R1, R2, R3]).start()
        cores = {
            r: stack.core(r, registry_url=registry.url or "", l1=f"local:{tmp_path / 'kr.json'}",
                          extra=["--tick", "0.2"]).start()
            for r in (R1, R2, R3)
        }
        url = {r: c.url or "" for r, c in cores.items()}
        with RegistryClient(registry.url or "") as client:
            t0 = time.monotonic()
            client.create("acme", [R1, R2], R1)
            wait_until(lambda: dek_status(url[R1], "acme")[0] == 200, timeout=15,
                       what="acme servable in its home region")
            servable_after = time.monotonic() - t0
            assert servable_after < 10
            plaintext, wrapped = new_dek(url[R1], "acme")
            # The standby region knows it but holds nothing; the excluded one refuses.
            wait_until(lambda: dek_status(url[R3], "acme")[1]["error"]["code"]
                       == "not_allowed_in_region", what="R3 saw acme")
            code, body = dek_status(url[R3], "acme")
            assert body["error"]["code"] == "not_allowed_in_region" and R3 in body["error"][
                "message"]
            wait_until(lambda: dek_status(url[R2], "acme")[0] == 409, what="R2 saw acme")
            assert dek_status(url[R2], "acme")[1]["error"]["code"] == "not_owner"
            assert unwrap(url[R3], "acme", wrapped).status_code == 404
            assert status(url[R1])["registry"]["reachable"] is True
            # Deleted through the Registry: refused at once, restored within the grace.
            client.delete("acme")
            wait_until(lambda: unwrap(url[R1], "acme", wrapped).status_code == 409,
                       what="pending purge")
            assert unwrap(url[R1], "acme", wrapped).json()["error"]["code"] == "pending_purge"
            client.restore("acme")
            wait_until(lambda: unwrap(url[R1], "acme", wrapped).status_code == 200,
                       what="restored")
            assert unwrap(url[R1], "acme", wrapped).json()["plaintext"] == plaintext
        print(f"servable after {servable_after:.2f}s")


# --- acceptance 2: rotations keep old DEKs readable; timeline without material -----------


def test_dek_from_l3_v1_survives_rotations_and_l1_binding(
    tmp_path: Path, fresh_broker: EmbeddedBroker, trust_dir: Path, reg: Lifecycle
) -> None:
    core = core_service(tmp_path, R1, fresh_broker.bootstrap, trust_dir).start()
    create_tenants(fresh_broker.bootstrap, reg, ["acme"], [R1], R1)
    url = core.url or ""
    wait_until(lambda: dek_status(url, "acme")[0] == 200, what="acme served")
    plaintext, wrapped = new_dek(url, "acme")
    for layer in ["L3"] * 3 + ["L2"] + ["L3"] * 2 + ["L2"]:
        r = httpx.post(f"{url}/v1/tenants/acme/rotate", json={"layer": layer}, timeout=5)
        assert r.status_code == 200, r.text
    assert unwrap(url, "acme", wrapped).json()["plaintext"] == plaintext
    timeline = keys(url, "acme")
    l3 = timeline["versions"]["L3"]
    l2 = timeline["versions"]["L2"]
    assert [k["version"] for k in l3] == list(range(1, 9))  # 1 + 5 on demand + 2 under new L2
    assert [k["version"] for k in l2] == [1, 2, 3]
    assert [k["trigger"] for k in l3].count("on-demand") == 5
    assert [k["trigger"] for k in l2].count("on-demand") == 2
    assert l3[-1]["parent_key_id"] == l2[-1]["key_id"] == "e1v3"
    # No material in the timeline: none of the published wrapped blobs, no blob fields.
    wait_until(lambda: status(url)["relay"]["backlog"] == 0, what="relay caught up")
    material = asyncio.run(read_topic(fresh_broker.bootstrap, topics.CORE_MATERIAL))
    blobs = [json.loads(m.value)["payload"]["blob"] for m in material if m.value]
    assert len(blobs) == 11  # 3 L2 + 8 L3
    text = json.dumps(timeline)
    assert "blob" not in text and not any(b in text for b in blobs)
    assert status(url)["last_rotation"] is not None
    # The customer binds its own L1 key: every L2 re-wrapped, old DEKs still readable,
    # also after a restart (unsealed again through the new L1 key).
    add_key(tmp_path / "keyring.json", "customer-7")
    r = httpx.put(f"{url}/v1/tenants/acme/l1", json={"l1_ref": "customer-7"}, timeout=5)
    assert r.status_code == 200 and r.json()["rewrapped"] == ["e1v1", "e1v2", "e1v3"]
    bad = httpx.put(f"{url}/v1/tenants/acme/l1", json={"l1_ref": "nope"}, timeout=5)
    assert bad.status_code == 409 and bad.json()["error"]["code"] == "l1_refused"
    core.restart()
    url = core.url or ""
    assert keys(url, "acme")["l1_ref"] == "customer-7"
    assert unwrap(url, "acme", wrapped).json()["plaintext"] == plaintext
    core.stop()


# --- acceptance 3: delete, restore, purge, and nothing left on disk ----------------------


def _key_bytes(data_dir: Path, keyring: Path, tenant: str, timeline: dict[str, Any]
               ) -> list[bytes]:
    """The raw L2/L3 bytes of a tenant, recovered in the test through crypto's internals."""
    vault = open_vault(None, data_dir / "vault")
    l1 = open_l1(f"local:{keyring}", R1)
    ref = timeline["l1_ref"]
    out: list[bytes] = []
    l2 = {}
    try:
        for kv in timeline["versions"]["L2"]:
            blob = vault.get(tenant, "L2", kv["key_id"])
            l2[kv["key_id"]] = l1.unwrap(ref, blob, l2_aad(tenant, ref, kv["key_id"]))
            out.append(l2[kv["key_id"]]._bytes())
        for kv in timeline["versions"]["L3"]:
            blob = vault.get(tenant, "L3", kv["key_id"])
            parent = kv["parent_key_id"]
            out.append(l2[parent].unwrap(blob, l3_aad(tenant, kv["key_id"], parent))._bytes())
    finally:
        vault.close()
    return out


def test_delete_refuses_at_once_restore_brings_back_purge_leaves_nothing(
    tmp_path: Path, fresh_broker: EmbeddedBroker, trust_dir: Path, reg: Lifecycle
) -> None:
    b = fresh_broker.bootstrap
    core = core_service(tmp_path, R1, b, trust_dir, purge_grace="4s").start()
    url = core.url or ""
    create_tenants(b, reg, ["doomed", "keeper"], [R1], R1)
    wait_until(lambda: dek_status(url, "doomed")[0] == 200, what="served")
    plaintext, wrapped = new_dek(url, "doomed")
    httpx.post(f"{url}/v1/tenants/doomed/rotate", json={"layer": "L2"}, timeout=5)
    plaintext2, wrapped2 = new_dek(url, "doomed")
    timeline = keys(url, "doomed")
    core.stop()
    data_dir = tmp_path / f"core-{R1}"
    secrets = _key_bytes(data_dir, tmp_path / "keyring.json", "doomed", timeline)
    assert len(secrets) == 4  # 2 L2 + 2 L3
    core.start()
    url = core.url or ""
    assert unwrap(url, "doomed", wrapped).json()["plaintext"] == plaintext

    asyncio.run(publish_events(b, [reg.envelope(TenantDeleted(), "doomed")], reg.key))
    wait_until(lambda: unwrap(url, "doomed", wrapped).status_code == 409, timeout=5,
               what="refused at once")
    err = unwrap(url, "doomed", wrapped).json()["error"]
    assert err["code"] == "pending_purge" and "pending purge" in err["message"]
    assert dek_status(url, "doomed")[1]["error"]["code"] == "pending_purge"
    asyncio.run(publish_events(b, [reg.envelope(TenantRestored(), "doomed")], reg.key))
    wait_until(lambda: unwrap(url, "doomed", wrapped).status_code == 200, what="restored")
    assert unwrap(url, "doomed", wrapped2).json()["plaintext"] == plaintext2

    asyncio.run(publish_events(b, [reg.envelope(TenantDeleted(), "doomed")], reg.key))
    wait_until(lambda: unwrap(url, "doomed", wrapped).status_code == 409, what="deleted")
    wait_until(lambda: keys(url, "doomed")["status"] == "purged", timeout=15, what="purged")
    for w in (wrapped, wrapped2):
        err = unwrap(url, "doomed", w).json()["error"]
        assert err["code"] == "tenant_purged" and "was purged" in err["message"]
    assert unwrap(url, "doomed", wrapped).status_code == 409
    assert dek_status(url, "keeper")[0] == 200  # others untouched
    wait_until(lambda: status(url)["relay"]["backlog"] == 0, what="relay caught up")
    material = asyncio.run(read_topic(b, topics.CORE_MATERIAL))
    tombstones = {m.key.decode() for m in material if m.value is None}
    assert tombstones == {"doomed/L2/e1v1", "doomed/L2/e1v2", "doomed/L3/e1v1",
                          "doomed/L3/e1v2"}
    core.stop()

    needles: list[bytes] = []
    for raw in [base64.b64decode(plaintext), base64.b64decode(plaintext2), *secrets]:
        needles += [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), raw.hex().encode()]
    scanned = 0
    for root in (data_dir, tmp_path / "logs", tmp_path / "broker.log"):
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            content = path.read_bytes()
            scanned += 1
            for needle in needles:
                assert needle not in content, f"key material found in {path}"
    assert scanned > 5
    vault = open_vault(None, data_dir / "vault")
    assert vault.list("doomed") == []
    vault.close()


# --- acceptance 4: SIGKILL during a burst of 1000 rotations ------------------------------


async def _burst(url: str, tenants: list[str], total: int, acked: list[tuple[str, str]],
                 errors: list[str]) -> None:
    sem = asyncio.Semaphore(32)
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(i: int) -> None:
            tenant = tenants[i % len(tenants)]
            async with sem:
                try:
                    r = await client.post(f"{url}/v1/tenants/{tenant}/rotate",
                                          json={"layer": "L2" if i % 10 == 0 else "L3"})
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    return
                if r.status_code == 200:
                    acked.extend((tenant, f"{k['layer']}/{k['key_id']}")
                                 for k in r.json()["rotated"])
                else:
                    errors.append(str(r.status_code))

        await asyncio.gather(*(one(i) for i in range(total)))


def test_sigkill_during_1000_rotations_loses_nothing(
    tmp_path: Path, fresh_broker: EmbeddedBroker, trust_dir: Path, reg: Lifecycle
) -> None:
    b = fresh_broker.bootstrap
    core = core_service(tmp_path, R1, b, trust_dir).start()
    url = core.url or ""
    tenants = [f"t{i:03d}" for i in range(100)]
    create_tenants(b, reg, tenants, [R1], R1)
    wait_until(lambda: status(url)["tenants_served"] == 100, what="100 tenants served")
    acked: list[tuple[str, str]] = []
    errors: list[str] = []

    async def burst_and_kill() -> None:
        task = asyncio.create_task(_burst(url, tenants, 1000, acked, errors))
        while len(acked) < 400 and not task.done():
            await asyncio.sleep(0.005)
        core.kill()  # SIGKILL mid-burst
        await task

    asyncio.run(burst_and_kill())
    assert 400 <= len(acked) and errors, "the kill must land inside the burst"
    core.start()
    url = core.url or ""
    wait_until(lambda: status(url)["relay"]["backlog"] == 0, timeout=30, what="relay caught up")
    present: set[tuple[str, str]] = set()
    for t in tenants:
        timeline = keys(url, t)
        for layer in ("L2", "L3"):
            versions = [k["version"] for k in timeline["versions"][layer]]
            assert versions == list(range(1, len(versions) + 1)), (t, layer, versions)
            ids = [k["key_id"] for k in timeline["versions"][layer]]
            assert len(set(ids)) == len(ids)
            present |= {(t, f"{layer}/{k}") for k in ids}
    assert set(acked) <= present  # no acknowledged version lost
    core.stop()

    log = EventLog(tmp_path / f"core-{R1}" / "log")
    try:
        entries = list(log.iter_events())
        assert [p for p, _ in entries] == list(range(1, len(entries) + 1))
        own = [event_of(v) for _, v in entries if v[:1] == OWN]
        assert [e["seq"] for e in own] == list(range(1, len(own) + 1))
        assert replay((event_of(v) for _, v in entries), R1).tenants == log.load_tenants()
    finally:
        log.close()
    published = asyncio.run(read_topic(b, topics.CORE_KEYS))
    published_ids = {json.loads(r.value)["event_id"] for r in published}
    assert {e["event_id"] for e in own} <= published_ids
    # What reached the topic authenticates through the Core's hash chains.
    verifier = ChainVerifier(TrustStore(trust_dir))
    verified: set[str] = set()
    for r in sorted(published, key=lambda r: (r.partition, r.offset)):
        ok, bad = verifier.feed((r.topic, r.partition, R1), decode(r.value))
        assert bad == []
        verified |= {str(e.event_id) for e in ok}
    assert verified == published_ids


# --- acceptance 5: Registry stopped, a simulated year ------------------------------------


def test_simulated_year_without_registry(tmp_path: Path, fresh_broker: EmbeddedBroker,
                                         trust_dir: Path, reg: Lifecycle) -> None:
    # One real second is ~23 simulated days: fast, yet a stall of ~170 ms on a loaded 2-core
    # machine is still under the 4-day sanity bound below.
    speed, tick = 2_000_000, 0.025  # one tick ~ 0.58 simulated days
    core = core_service(tmp_path, R1, fresh_broker.bootstrap, trust_dir,
                        registry_url="http://127.0.0.1:9",  # the Registry is down
                        extra=["--clock-speed", str(speed), "--tick", str(tick)]).start()
    url = core.url or ""
    tenants = [f"y{i:02d}" for i in range(20)]
    create_tenants(fresh_broker.bootstrap, reg, tenants, [R1], R1)
    wait_until(lambda: status(url)["tenants_served"] == 20, what="tenants served")
    born = max(keys(url, t)["versions"]["L2"][0]["created_at"] for t in tenants)
    from core_service.clock import parse_ts

    end = parse_ts(born) + 367 * DAY
    wait_until(lambda: parse_ts(status(url)["clock"]) > end, timeout=60, what="a year")
    st = status(url)
    assert st["registry"]["reachable"] is False
    max_gap = st["scheduler"]["max_gap_s"]
    assert max_gap < 4 * DAY
    for t in tenants:
        tl = keys(url, t)
        # The clock runs on while we read: judge the first year's rotations by their order and
        # lateness, not by a cut-off that a busy machine can push a due rotation across.
        l3 = tl["versions"]["L3"][:6]
        l2 = tl["versions"]["L2"][:2]
        assert [k["trigger"] for k in l3] == ["initial"] + ["scheduled"] * 4 + ["l2-rotation"]
        assert [k["trigger"] for k in l2] == ["initial", "scheduled"]
        for layer, period, seq in (("L3", 90 * DAY, l3), ("L2", 365 * DAY, l2)):
            for prev, cur in zip(seq, seq[1:], strict=False):
                if cur["trigger"] == "l2-rotation":
                    continue
                late = parse_ts(cur["created_at"]) - (parse_ts(prev["created_at"]) + period)
                assert 0 <= late <= max_gap, (t, layer, late / DAY)
    core.stop()


# --- acceptance 6: forged, replayed and random records go to the DLQ ---------------------


def test_forged_replayed_and_random_records_go_to_the_dlq(
    tmp_path: Path, fresh_broker: EmbeddedBroker, trust_dir: Path, reg: Lifecycle
) -> None:
    b = fresh_broker.bootstrap
    core = core_service(tmp_path, R1, b, trust_dir).start()
    url = core.url or ""
    created = reg.envelope(TenantCreated(regions=[R1], home_region=R1), "acme")
    original = encode(sign_event(created, reg.key))
    asyncio.run(publish(b, [(b"acme", original)]))
    wait_until(lambda: dek_status(url, "acme")[0] == 200, what="served")
    plaintext, wrapped = new_dek(url, "acme")
    impostor = SigningKey.generate("registry")  # right owner name, key not trusted
    forged = encode(sign_event(reg.envelope(TenantDeleted(reason="forged"), "acme"), impostor))
    asyncio.run(publish(b, [(b"acme", forged), (b"acme", original), (b"acme", b"\x00" * 7 +
                                                                      bytes(range(200)))]))
    time.sleep(0.5)

    def letters() -> list[DeadLetter]:
        recs = asyncio.run(read_topic(b, topics.DLQ))
        return [DeadLetter.model_validate(orjson.loads(r.value)) for r in recs
                if r.key == f"core:{R1}".encode()]

    found = wait_until(lambda: len(letters()) >= 3 and letters(), what="3 dead letters")
    reasons = sorted(x.reason for x in found)
    assert len(found) == 3
    assert any("unknown signer" in r for r in reasons)
    assert any(r.startswith("replayed") for r in reasons)
    assert any(r.startswith("undecodable") for r in reasons)
    assert unwrap(url, "acme", wrapped).json()["plaintext"] == plaintext  # keys intact
    assert httpx.get(f"{url}/healthz", timeout=5).json()["ok"] is True
    st = status(url)
    assert st["consumer"]["dead_letters"] == 3 and st["consumer"]["connected"]
    assert keys(url, "acme")["status"] == "active"
    # The Core keeps consuming after the bad records.
    create_tenants(b, reg, ["after"], [R1], R1)
    wait_until(lambda: dek_status(url, "after")[0] == 200, what="consumer carries on")
    core.stop()


# --- the relay and the consumer survive a broker that comes back empty -------------------


def test_broker_restarting_empty_is_recovered(
    tmp_path: Path, fresh_broker: EmbeddedBroker, trust_dir: Path, reg: Lifecycle
) -> None:
    b = fresh_broker.bootstrap
    core = core_service(tmp_path, R1, b, trust_dir).start()
    url = core.url or ""
    create_tenants(b, reg, ["a1", "a2"], [R1], R1)
    wait_until(lambda: dek_status(url, "a2")[0] == 200, what="served")
    wait_until(lambda: status(url)["relay"]["backlog"] == 0, what="published")
    fresh_broker.restart()  # same port, nothing stored
    create_tenants(b, Lifecycle(reg.key, reg.seq), ["b1"], [R1], R1)
    wait_until(lambda: dek_status(url, "b1")[0] == 200, timeout=30, what="consumer recovered")

    def republished() -> bool:
        recs = asyncio.run(read_topic(b, topics.CORE_KEYS))
        return {json.loads(r.value)["tenant_id"] for r in recs} >= {"a1", "a2", "b1"}

    wait_until(republished, timeout=30, what="the log published again")
    core.stop()
