"""Split brain, on real processes: the old owner's Kafka link is cut (a Tansu proxy), the
operator declares a failover, both sides rotate and wrap DEKs during the split, the link heals.
After heal: exactly one owner per tenant, the old owner fenced (409 "moved to R2 at epoch 2",
no more rotations), its stale-epoch rotations imported by the owner decrypt-only and flagged,
and every DEK wrapped on either side during the split unwraps at the owner."""

from __future__ import annotations

import time
from pathlib import Path

from events.signing import SigningKey
from openkcm.broker import EmbeddedBroker
from openkcm.links import KafkaLink
from tests.test_core_helpers import (
    R1,
    R2,
    Lifecycle,
    core_service,
    dek_status,
    keys,
    new_dek,
    status,
    unwrap,
    wait_until,
)
from tests.test_dr_failover_helpers import (
    create_tenants,
    declare,
    hydration_done,
)


def test_split_brain_one_owner_after_heal_and_no_dek_lost(
    tmp_path: Path, fresh_broker: EmbeddedBroker, trust_dir: Path, registry_key: SigningKey
) -> None:
    b = fresh_broker.bootstrap
    tenants = ["s1", "s2", "s3"]
    create_tenants(b, Lifecycle(registry_key), {t: [R1, R2] for t in tenants}, R1)
    link = KafkaLink(b, log_path=tmp_path / "link.log").start()
    r1 = core_service(tmp_path, R1, link.bootstrap, trust_dir, l3="2s").start()
    r2 = core_service(tmp_path, R2, b, trust_dir, l3="2s").start()
    u1, u2 = r1.url or "", r2.url or ""
    try:
        wait_until(lambda: status(u1)["tenants_served"] == 3, timeout=30, what="R1 serves")
        deks = {t: [new_dek(u1, t)] for t in tenants}
        wait_until(lambda: status(u1)["relay"]["backlog"] == 0, what="R1 published")

        link.cut()  # R1 keeps running and serving, but Kafka is gone for it
        declared = declare(b, trust_dir, tmp_path / "operator", R1, R2)
        assert declared.epoch == 2
        wait_until(lambda: hydration_done(u2), timeout=30, what="R2 hydrated")
        wait_until(lambda: all(dek_status(u2, t)[0] == 200 for t in tenants), what="R2 serves")
        split_start = {t: len(keys(u1, t)["versions"]["L3"]) for t in tenants}
        # Both sides rotate (every 2 s) and wrap DEKs during the split.
        for _ in range(2):
            time.sleep(2.2)
            for t in tenants:
                deks[t].append(new_dek(u1, t))
                deks[t].append(new_dek(u2, t))
        r1_split = {t: keys(u1, t) for t in tenants}
        for t in tenants:  # both sides minted versions during the split
            assert len(r1_split[t]["versions"]["L3"]) > split_start[t]
            assert all(k["epoch"] == 1 for k in r1_split[t]["versions"]["L3"])
            assert any(k["epoch"] == 2 for k in keys(u2, t)["versions"]["L3"])

        link.heal()
        # The old owner sees the failover and fences itself; its relay publishes its stale
        # rotations; the owner imports them decrypt-only.
        def fenced() -> bool:
            return all(dek_status(u1, t)[0] == 409 for t in tenants)

        wait_until(fenced, timeout=40, what="R1 fenced after heal")
        code, body = dek_status(u1, "s1")
        assert body["error"]["code"] == "moved"
        assert f"moved to {R2} at epoch 2" in body["error"]["message"]
        wait_until(lambda: status(u1)["relay"]["backlog"] == 0, timeout=30,
                   what="R1's split rotations published")

        def imported() -> bool:
            for t in tenants:
                r1_ids = {k["key_id"] for k in keys(u1, t)["versions"]["L3"] if k["epoch"] == 1}
                tl = keys(u2, t)
                have = {k["key_id"] for k in tl["versions"]["L3"]} | {
                    k["key_id"] for k in tl["stale"]}
                if not r1_ids <= have:
                    return False
            return True

        wait_until(imported, timeout=30, what="stale versions imported by the owner")
        for t in tenants:
            t1, t2 = keys(u1, t), keys(u2, t)
            # Exactly one owner.
            assert t1["status"] == "moved" and t1["owner"] == R2 and t1["epoch"] == 2
            assert t2["status"] == "active" and t2["owner"] == R2 and t2["epoch"] == 2
            # The owner's timeline: its own count, never replaced by stale versions.
            l3 = t2["versions"]["L3"]
            assert [k["version"] for k in l3] == list(range(1, len(l3) + 1))
            hydrated = [k for k in l3 if k["epoch"] == 1]
            assert l3[len(hydrated):] and all(k["epoch"] == 2 for k in l3[len(hydrated):])
            assert [k["key_id"] for k in hydrated] == [
                k["key_id"] for k in t1["versions"]["L3"][: len(hydrated)]]
            assert t2["current"]["L3"] == l3[-1]["key_id"] and l3[-1]["epoch"] == 2
            stale = {k["key_id"] for k in t2["stale"]}
            assert stale and all(k["stale"] and k["epoch"] == 1 for k in t2["stale"])
            split = {k["key_id"] for k in t1["versions"]["L3"][len(hydrated):]}
            assert stale == split and len(split) >= len(r1_split[t]["versions"]["L3"]) - len(
                hydrated)
            # Every DEK wrapped on either side unwraps at the owner.
            for plaintext, wrapped in deks[t]:
                r = unwrap(u2, t, wrapped)
                assert r.status_code == 200 and r.json()["plaintext"] == plaintext, r.text
        assert status(u2)["follower"]["stale_imported"] >= 3
        # The fenced side rotates no more.
        counts = {t: len(keys(u1, t)["versions"]["L3"]) for t in tenants}
        time.sleep(2.5)
        assert {t: len(keys(u1, t)["versions"]["L3"]) for t in tenants} == counts
        # And the owner keeps rotating, from its own versions.
        owned = {t: len(keys(u2, t)["versions"]["L3"]) for t in tenants}
        wait_until(lambda: all(len(keys(u2, t)["versions"]["L3"]) > owned[t] for t in tenants),
                   what="the owner keeps rotating")
        # After a restart the owner still unwraps everything (stale versions from its vault).
        r2.restart()
        u2 = r2.url or ""
        for t in tenants:
            for plaintext, wrapped in deks[t]:
                assert unwrap(u2, t, wrapped).json()["plaintext"] == plaintext
    finally:
        r1.stop()
        r2.stop()
        link.cut()
