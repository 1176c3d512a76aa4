"""Region loss, on real processes: the embedded broker, the Registry and three regional Cores
(`python -m openkcm.cli ...`), real RocksDB, real crypto, SIGKILL for the lost region.

- 3 regions: the tenants whose allow-list admits the survivor serve every DEK wrapped before the
  failure there; the others are refused and listed (status and `openkcm failover` output); a
  tenant purged before the disaster stays purged; the survivor rotates the moved tenants on its
  own schedule with the new epoch, continuing the version count.
- The Registry down too: definitions come from the compacted `kcm.registry.tenants`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from openkcm.stack import Stack
from registry_service.client import RegistryClient
from tests.test_core_helpers import (
    R1,
    R2,
    R3,
    dek_status,
    keys,
    new_dek,
    status,
    unwrap,
    wait_until,
)
from tests.test_dr_failover_helpers import (
    hydration_done,
)

ROOT = Path(__file__).resolve().parent.parent


def _failover_cli(bootstrap: str, trust_dir: Path, key_dir: Path, src: str, dst: str
                  ) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "openkcm.cli", "failover", "--from", src, "--to", dst,
         "--bootstrap-servers", bootstrap, "--trust-dir", str(trust_dir),
         "--operator-key-dir", str(key_dir), "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _region_loss(tmp_path: Path, registry_down: bool) -> None:
    moved = [f"m{i}" for i in range(6)]
    excluded = ["x1", "x2"]
    with Stack(tmp_path) as stack:
        b = stack.start_broker()
        registry = stack.registry([R1, R2, R3]).start()
        l1 = f"local:{tmp_path / 'keyring.json'}"
        cores = {r: stack.core(r, registry_url=registry.url or "", l1=l1, l3_period="2s",
                               purge_grace="1s", extra=["--tick", "0.2"]).start()
                 for r in (R1, R2, R3)}
        url = {r: c.url or "" for r, c in cores.items()}
        with RegistryClient(registry.url or "") as client:
            for i, t in enumerate(moved):  # half of them allowed in R3 as well
                client.create(t, [R1, R2] if i % 2 else [R1, R2, R3], R1)
            for t in excluded:
                client.create(t, [R1, R3], R1)
            client.create("purged", [R1, R2], R1)
            wait_until(lambda: status(url[R1])["tenants_served"] == 9, timeout=30,
                       what="home region serves every tenant")
            client.delete("purged")
        wait_until(lambda: keys(url[R1], "purged")["status"] == "purged", timeout=20,
                   what="purged before the disaster")
        # DEKs wrapped under several L3 versions (L3 rotates every 2 s) and one L2 rotation.
        deks: dict[str, list[tuple[str, str]]] = {t: [] for t in moved + excluded}
        for t in moved:
            deks[t].append(new_dek(url[R1], t))
        wait_until(lambda: all(len(keys(url[R1], t)["versions"]["L3"]) >= 2 for t in moved),
                   timeout=15, what="scheduled rotations at the home region")
        for t in moved:
            r = httpx.post(f"{url[R1]}/v1/tenants/{t}/rotate",
                           json={"layer": "L2"}, timeout=10)
            assert r.status_code == 200, r.text
            deks[t].append(new_dek(url[R1], t))
        for t in excluded:
            deks[t].append(new_dek(url[R1], t))
        wait_until(lambda: status(url[R1])["relay"]["backlog"] == 0, what="R1 published")
        before = {t: keys(url[R1], t) for t in moved}

        cores[R1].kill()  # the region is lost
        if registry_down:
            registry.kill()
        fault = time.monotonic()
        declared = _failover_cli(b, stack.trust_dir, tmp_path / "operator", R1, R2)
        assert declared["epoch"] == 2
        expected = {r["tenant"]: r["reason"] for r in declared["expected_refused"]}
        assert set(expected) == set(excluded)
        assert all(f"excludes {R2}" in reason for reason in expected.values())

        fo = wait_until(lambda: hydration_done(url[R2]), timeout=30, what="hydration done")
        wait_until(lambda: all(dek_status(url[R2], t)[0] == 200 for t in moved), timeout=10,
                   what="every moved tenant serving")
        rto = time.monotonic() - fault
        last = fo["last"]
        assert last["hydrated"] == len(moved)
        assert last["definitions_from"] == ("kcm.registry.tenants" if registry_down
                                            else "registry")
        refused = {r["tenant"]: r["reason"] for r in fo["refused"]}
        assert set(refused) == {*excluded, "purged"}
        assert all(f"excludes {R2}" in refused[t] for t in excluded)
        assert "deleted" in refused["purged"] or "purged" in refused["purged"]

        # Every DEK wrapped before the failure unwraps at the survivor.
        for t in moved:
            for plaintext, wrapped in deks[t]:
                r = unwrap(url[R2], t, wrapped)
                assert r.status_code == 200 and r.json()["plaintext"] == plaintext, r.text
            tl = keys(url[R2], t)
            assert tl["owner"] == R2 and tl["epoch"] == 2 and tl["status"] == "active"
            old = before[t]["versions"]
            for layer in ("L2", "L3"):
                have = [(k["key_id"], k["kcv"]) for k in tl["versions"][layer]]
                assert have[: len(old[layer])] == [(k["key_id"], k["kcv"]) for k in old[layer]]
        # Not allowed in the survivor: refused there, never served.
        for t in excluded:
            code, body = dek_status(url[R2], t)
            assert code == 404 and body["error"]["code"] == "not_allowed_in_region"
            assert unwrap(url[R2], t, deks[t][0][1]).status_code == 404
        code, _ = dek_status(url[R2], "purged")
        assert code in (404, 409)
        # The third region learned the new owner of the moved tenants; it serves none.
        wait_until(lambda: keys(url[R3], moved[0])["owner"] == R2, what="R3 saw the move")
        assert dek_status(url[R3], moved[0])[0] == 409

        # Rotation resumes on the survivor with the new epoch, continuing the count.
        def rotated_at_epoch_2() -> bool:
            return all(keys(url[R2], t)["versions"]["L3"][-1]["epoch"] == 2 for t in moved)

        wait_until(rotated_at_epoch_2, timeout=15, what="survivor rotations at epoch 2")
        for t in moved:
            tl = keys(url[R2], t)
            l3 = tl["versions"]["L3"]
            assert [k["version"] for k in l3] == list(range(1, len(l3) + 1))
            first_new = next(k for k in l3 if k["epoch"] == 2)
            assert first_new["key_id"] == f"e2v{len(before[t]['versions']['L3']) + 1}"
            assert first_new["trigger"] == "scheduled"
            plaintext, wrapped = new_dek(url[R2], t)
            assert unwrap(url[R2], t, wrapped).json()["plaintext"] == plaintext
            for plaintext, wrapped in deks[t]:
                assert unwrap(url[R2], t, wrapped).json()["plaintext"] == plaintext
        print(f"region loss (registry {'down' if registry_down else 'up'}): "
              f"{len(moved)} tenants serving {rto:.2f}s after the fault "
              f"(hydration {last['seconds']}s, key log {last['key_log_events']} events)")


def test_region_loss_three_regions(tmp_path: Path) -> None:
    _region_loss(tmp_path, registry_down=False)


def test_region_loss_with_the_registry_down(tmp_path: Path) -> None:
    _region_loss(tmp_path, registry_down=True)
