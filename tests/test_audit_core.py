"""The audit app against the real thing: a Registry and a regional Core (subprocesses) that
create tenants, rotate their keys every few seconds and purge an offboarded one after its
grace; the audit finds nothing wrong."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from openkcm.stack import Stack
from tests.test_audit_app import EU, WEST, start_audit, wait_for


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                    reason="runs its own embedded stack")
def test_real_core_rotations_give_zero_findings(tmp_path: Path) -> None:
    with Stack(tmp_path / "stack") as stack:
        bootstrap = stack.start_broker()
        registry = stack.registry([EU, WEST], purge_grace="3s").start()
        core = stack.core(EU, registry_url=str(registry.url),
                          l1=f"local:{tmp_path / 'keyring.json'}",
                          l3_period="2s", l2_period="5s", purge_grace="3s",
                          extra=["--tick", "0.2"]).start()
        tenants = [f"core-{i}" for i in range(5)]
        for tenant in tenants:
            r = httpx.post(f"{registry.url}/v1/tenants", timeout=10, json={
                "tenant_id": tenant, "regions": [EU, WEST], "home_region": EU})
            assert r.status_code == 201, r.text
        audit = start_audit(bootstrap, tmp_path / "audit", stack.trust_dir, "audit-core",
                            "--l3-period", "2s", "--l2-period", "5s", "--overdue-grace", "5s")
        try:
            def rotated_enough() -> bool:
                for tenant in tenants:
                    view = httpx.get(f"{audit.url}/v1/audit/tenants/{tenant}", timeout=5)
                    if view.status_code != 200 or view.json()["l3_versions"] < 5:
                        return False
                return True

            wait_for(rotated_enough, 90, "five L3 versions per tenant seen by the audit")
            # Offboard one tenant: the Core stops rotating it and purges it after the grace.
            gone = tenants.pop()
            r = httpx.delete(f"{registry.url}/v1/tenants/{gone}", timeout=10)
            assert r.status_code == 202, r.text
            wait_for(lambda: audit.get(f"/v1/audit/tenants/{gone}")["status"] == "purged", 60,
                     "the purge seen by the audit")
            time.sleep(3)  # a few ticks
            assert audit.findings() == []
            view = audit.get(f"/v1/audit/tenants/{tenants[0]}")
            assert view["owner_region"] == EU and view["epoch"] == 1 and view["compliant"]
            assert view["l2_versions"] >= 2
            summary = audit.get("/v1/audit/summary")
            assert summary["tenants"] == 5 and summary["compliant_share"] == 1.0
            assert summary["tenants_by_status"] == {"active": 4, "purged": 1}
        finally:
            audit.stop()
            core.stop()
