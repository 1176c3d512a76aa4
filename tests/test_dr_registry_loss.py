"""Tier 3 of ACD-402, Registry loss, on real processes: the broker, the Registry and two Cores
as subprocesses; the Registry SIGKILLed, every file of its RocksDB store overwritten, and
restarted. It refuses management with 503 (frozen); the Cores keep rotating and serving;
reconciliation refuses to act on a frozen Registry, so nothing is purged (with a purge grace
of 2 s, a wrongly scheduled purge would have happened within the test). Restarted on an empty
store, its snapshot is older than what the Cores applied: refused too. Then the Registry is
gone entirely: the Cores report it unreachable and carry on, a restarted Core included.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from core_service.clock import parse_ts
from events import topics
from openkcm.stack import Stack
from registry_service.client import Frozen, RegistryClient
from tests.test_core_helpers import R1, R2, core_service, read_topic, wait_until
from tests.test_dr_partition import (
    PERIOD,
    keys,
    l4_round,
    ms,
    new_dek,
    rotation_lateness,
    status,
    unwrapped,
)

FIGURES: dict[str, Any] = {}


def corrupt_store(store: Path) -> int:
    """Overwrite every file of a RocksDB directory with garbage of the same size."""
    n = 0
    for f in store.rglob("*"):
        if f.is_file():
            size = max(f.stat().st_size, 64)
            f.write_bytes((b"\xde\xad\xbe\xef not rocksdb " * (size // 20 + 1))[:size])
            n += 1
    return n


def test_registry_killed_and_store_corrupted_cores_carry_on_nothing_purged(
    tmp_path: Path,
) -> None:
    with Stack(tmp_path) as stack:
        broker = stack.start_broker()
        registry = stack.registry([R1, R2]).start()
        cores = {}
        for region in (R1, R2):
            core = core_service(tmp_path, region, broker, stack.trust_dir,
                                registry_url=registry.url or "", l3=f"{int(PERIOD)}s",
                                purge_grace="2s", extra=["--reconcile-interval", "1s"])
            stack.services[core.name] = core
            cores[region] = core.start()
        url = {r: c.url or "" for r, c in cores.items()}
        client = RegistryClient(registry.url or "")
        homes = {"a1": R1, "a2": R1, "b1": R2}
        for tid, home in homes.items():
            client.create(tid, [R1, R2], home)
        wait_until(lambda: status(url[R1])["tenants_served"] == 2
                   and status(url[R2])["tenants_served"] == 1, what="tenants served")
        wait_until(lambda: all((status(u)["last_reconciliation"] or {}).get("outcome")
                               == "clean" for u in url.values()), what="clean reconciliations")
        deks = {tid: [new_dek(url[home], tid) for _ in range(2)] for tid, home in homes.items()}

        # Tier 3: SIGKILL, every store file overwritten, restarted -> frozen.
        registry.kill()
        lost_at = time.monotonic()
        assert corrupt_store(tmp_path / "registry" / "store") >= 3
        registry.start()
        health = httpx.get(f"{registry.url}/healthz", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "frozen"
        for call in (lambda: client.create("new", [R1], R1), lambda: client.delete("a1"),
                     lambda: client.restore("a1"), lambda: client.snapshot(stack.trust_dir)):
            try:
                call()
                raise AssertionError("management must be refused")
            except Frozen as exc:
                assert exc.status == 503 and exc.code == "frozen"

        def refused(u: str) -> dict[str, Any] | None:
            last = status(u)["last_reconciliation"] or {}
            return last if last.get("outcome") == "refused" else None

        for u in url.values():
            report = wait_until(lambda u=u: refused(u), timeout=15, what="a refused pass")
            assert "frozen" in report["refused"]["reason"]
            assert report["drift"] is None and report["repaired"] is None
        window_start = {r: parse_ts(status(u)["clock"]) for r, u in url.items()}
        made: list[tuple[str, str]] = []
        latencies: list[float] = []
        with httpx.Client(timeout=5) as http:
            while time.monotonic() - lost_at < 5 * PERIOD:
                l4_round(http, url[R1], "a1", made, latencies)
                time.sleep(0.25)
        FIGURES["l4_http_registry_frozen"] = ms(latencies)
        passes = {r: status(u)["reconciliation"]["passes"] for r, u in url.items()}
        for region, u in url.items():
            st = status(u)
            assert st["registry"]["state"] == "frozen" and st["registry"]["reachable"] is False
            assert st["last_reconciliation"]["outcome"] == "refused"
            assert st["tenants"].get("pending_purge", 0) == 0
            assert st["tenants"].get("purged", 0) == 0
            for tid, home in homes.items():
                if home == region:
                    lateness = rotation_lateness(u, tid, window_start[region],
                                                 parse_ts(st["clock"]))
                    assert len(lateness) >= 2 and all(0 <= x <= 1.0 for x in lateness)
        for tid, home in homes.items():
            for p, w in deks[tid]:
                assert unwrapped(url[home], tid, w) == p
        for p, w in made:
            assert unwrapped(url[R1], "a1", w) == p

        # Restarted on an empty store (its files deleted, its key kept): it has signed events
        # before, so starting over would re-issue sequence numbers the Cores reject as
        # replays. It freezes; the Cores refuse to reconcile against it and purge nothing.
        registry.kill()
        shutil.rmtree(tmp_path / "registry" / "store")
        restarted = time.time()
        registry.start()
        health = httpx.get(f"{registry.url}/healthz", timeout=5)
        assert health.status_code == 503 and "restore it from a backup" in health.text
        create = httpx.post(f"{registry.url}/v1/tenants", timeout=5, json={
            "tenant_id": "late", "regions": [R1], "home_region": R1})
        assert create.status_code == 503 and create.json()["error"]["code"] == "frozen"

        def refused_after_restart(u: str) -> dict[str, Any] | None:
            last = status(u)["last_reconciliation"] or {}
            reason = (last.get("refused") or {}).get("reason") or ""
            fresh = last.get("at") and parse_ts(last["at"]) > restarted
            return last if fresh and "frozen" in reason else None

        for u in url.values():
            wait_until(lambda u=u: refused_after_restart(u), timeout=15,
                       what="a pass refused against the frozen Registry")
            assert status(u)["tenants"].get("pending_purge", 0) == 0

        # Gone entirely: unreachable, the Cores carry on; a restarted Core serves at once.
        registry.kill()
        for u in url.values():
            wait_until(lambda u=u: status(u)["registry"]["state"] == "unreachable",
                       what="registry unreachable")
            wait_until(lambda u=u: (status(u)["last_reconciliation"] or {}).get("outcome")
                       == "unreachable", timeout=15, what="an unreachable pass")
        rotations = status(url[R2])["rotations"]
        cores[R1].restart()
        url[R1] = cores[R1].url or ""
        for tid, home in homes.items():
            for p, w in deks[tid]:
                assert unwrapped(url[home], tid, w) == p
        wait_until(lambda: status(url[R2])["rotations"] >= rotations + 2, what="R2 rotating")
        wait_until(lambda: status(url[R1])["rotations"] > 0 and status(url[R1])["registry"][
            "state"] == "unreachable", what="R1 rotating after its restart")
        for region, u in url.items():
            st = status(u)
            assert st["reconciliation"]["passes"] >= 1
            assert st["tenants"].get("pending_purge", 0) == 0 and st["tenants"].get(
                "purged", 0) == 0
            for tid, home in homes.items():
                if home == region:
                    assert keys(u, tid)["status"] == "active"
        assert sum(passes.values()) >= 4  # periodic passes ran (and were refused)
        for core in cores.values():
            core.stop()
        # Nothing on the key timeline speaks of a purge.
        timeline = asyncio.run(read_topic(broker, topics.CORE_KEYS))
        types = {json.loads(r.value)["type"] for r in timeline}
        assert "TenantPurgeScheduled" not in types and "TenantPurged" not in types
        assert {"TenantInitialized", "KeyRotated"} <= types
        print(f"\nregistry-loss figures: {json.dumps(FIGURES)}")
