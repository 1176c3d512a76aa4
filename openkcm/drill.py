"""DR drills: every tier of ACD-402 on real processes, measured and verified by the drill itself.

Each scenario runs on a fresh stack (embedded broker, the Registry, one Core per region, each
Core reaching Kafka and the Registry through links the drill can cut), loads tenants with mixed
allow-lists, wraps DEKs, injects its fault, measures, and checks its invariants:

- `partition`: one region's links to Kafka and the Registry are cut for several rotation
  periods while the Registry keeps taking creates and deletes.
- `region-loss`: a region is SIGKILLed and failed over; the survivor hydrates its tenants.
- `registry-loss`: the Registry is SIGKILLed and its store corrupted; Cores carry on.
- `split-brain`: a region is cut off and failed over while it keeps running; then healed.

DEK plaintexts are never kept: the drill remembers a SHA-256 of each and compares digests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from core_service.replicated import read_key_log
from events.kafka import KafkaSettings
from events.signing import TrustStore
from openkcm.failover import declare_failover
from openkcm.links import KafkaLink, TcpLink
from openkcm.report import ScenarioResult
from openkcm.stack import Service, Stack, wait_for

REGION_NAMES = ["eu-central-1", "eu-west-1", "us-east-1", "ap-south-1", "sa-east-1"]
SCENARIOS = ("partition", "region-loss", "registry-loss", "split-brain")

Progress = Callable[[str], None]


@dataclass
class DrillConfig:
    tenants: int = 24
    regions: int = 3
    deks_per_tenant: int = 2
    l3_period: str = "3s"
    l2_period: str = "20s"
    purge_grace: str = "5s"
    rto_target_seconds: float = 30.0
    outage_seconds: float = 8.0
    deny_survivor_l1: bool = False
    """Fault of the drill itself (tests): the survivor region is refused by the L1 keyring."""
    work_dir: Path = Path("drill-report/work")

    @property
    def l3_seconds(self) -> float:
        from openkcm.options import duration

        return duration(self.l3_period).total_seconds()


@dataclass
class Tenant:
    tenant_id: str
    regions: list[str]
    home: str
    deks: list[tuple[str, str]] = field(default_factory=list)
    """(wrapped, sha256 of plaintext) of every DEK the drill wrapped."""


class Drill:
    """One scenario's live stack and bookkeeping."""

    def __init__(self, scenario: str, config: DrillConfig, progress: Progress) -> None:
        self.config = config
        self.progress = progress
        self.result = ScenarioResult(scenario)
        self.regions = REGION_NAMES[: config.regions]
        root = config.work_dir / scenario
        shutil.rmtree(root, ignore_errors=True)
        self.stack = Stack(root)
        self.keyring = root / "l1-keyring.json"
        self.kafka_links: dict[str, KafkaLink] = {}
        self.registry_links: dict[str, TcpLink] = {}
        self.cores: dict[str, Service] = {}
        self.registry: Service | None = None
        self.tenants: dict[str, Tenant] = {}
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.http = httpx.Client(timeout=10.0)

    # --- bookkeeping -------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, action: str) -> None:
        self.result.timeline.append({"t": round(self.now(), 3), "action": action})
        self.progress(f"{self.result.scenario}: {action}")

    # --- the stack ----------------------------------------------------------------------

    def start(self) -> None:
        from plugins.l1_local import create_keyring

        bootstrap = self.stack.start_broker()
        self.log(f"broker up at {bootstrap}")
        create_keyring(self.keyring, self.regions)
        self.registry = self.stack.registry(self.regions, purge_grace=self.config.purge_grace)
        self.registry.start()
        self.log(f"registry up at {self.registry.url}")
        host, port = self.registry.url.removeprefix("http://").rsplit(":", 1)
        for region in self.regions:
            link = KafkaLink(bootstrap, self.stack.root / "logs" / f"link-{region}.log").start()
            self.kafka_links[region] = link
            self.registry_links[region] = TcpLink(host, int(port)).start()
            self._start_core(region)

    def _start_core(self, region: str) -> Service:
        core = self.stack.core(
            region,
            registry_url=self.registry_links[region].url,
            l1=f"local:{self.keyring}",
            l3_period=self.config.l3_period,
            l2_period=self.config.l2_period,
            purge_grace=self.config.purge_grace,
        )
        core.argv[core.argv.index("--bootstrap-servers") + 1] = self.kafka_links[region].bootstrap
        core.start()
        self.cores[region] = core
        self.log(f"core {region} up at {core.url}")
        return core

    def close(self) -> None:
        self.http.close()
        for link in self.kafka_links.values():
            link.cut()
        for tcp in self.registry_links.values():
            tcp.close()
        self.stack.close()

    def cut(self, region: str) -> None:
        self.kafka_links[region].cut()
        self.registry_links[region].cut()
        self.log(f"links of {region} cut (Kafka and Registry)")

    def heal(self, region: str) -> None:
        self.kafka_links[region].heal()
        self.registry_links[region].heal()
        self.log(f"links of {region} healed")

    # --- HTTP ---------------------------------------------------------------------------

    def _registry_url(self) -> str:
        assert self.registry is not None and self.registry.url
        return self.registry.url

    def create_tenant(self, tenant: Tenant) -> httpx.Response:
        return self.http.post(
            f"{self._registry_url()}/v1/tenants",
            json={"tenant_id": tenant.tenant_id, "regions": tenant.regions,
                  "home_region": tenant.home},
        )

    def delete_tenant(self, tenant_id: str) -> httpx.Response:
        return self.http.delete(f"{self._registry_url()}/v1/tenants/{tenant_id}")

    def core_url(self, region: str) -> str:
        url = self.cores[region].url
        assert url
        return url

    def wrap(self, region: str, tenant: Tenant) -> bool:
        r = self.http.post(f"{self.core_url(region)}/v1/tenants/{tenant.tenant_id}/deks")
        if r.status_code not in (200, 201):
            return False
        body = r.json()
        tenant.deks.append(
            (body["wrapped"], hashlib.sha256(base64.b64decode(body["plaintext"])).hexdigest())
        )
        return True

    def unwrap(self, region: str, tenant_id: str, wrapped: str) -> tuple[int, str]:
        """(status, sha256 of plaintext or the error message)."""
        try:
            r = self.http.post(
                f"{self.core_url(region)}/v1/tenants/{tenant_id}/deks/unwrap",
                json={"wrapped": wrapped},
            )
        except httpx.HTTPError as exc:
            return 0, f"unreachable: {exc}"
        if r.status_code == 200:
            return 200, hashlib.sha256(base64.b64decode(r.json()["plaintext"])).hexdigest()
        try:
            return r.status_code, str(r.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return r.status_code, r.text[:200]

    def serves(self, region: str, tenant: Tenant) -> bool:
        """Every DEK of the tenant unwraps at `region` to its original bytes."""
        return all(self.unwrap(region, tenant.tenant_id, w) == (200, h) for w, h in tenant.deks)

    def verify_deks(self, region: str, tenants: list[Tenant]) -> tuple[int, list[str]]:
        ok, bad = 0, []
        for tenant in tenants:
            for wrapped, digest in tenant.deks:
                status, got = self.unwrap(region, tenant.tenant_id, wrapped)
                if (status, got) == (200, digest):
                    ok += 1
                else:
                    bad.append(f"{tenant.tenant_id}@{region}: {status} {got}"[:200])
        return ok, bad

    def keys(self, region: str, tenant_id: str) -> dict[str, Any]:
        r = self.http.get(f"{self.core_url(region)}/v1/tenants/{tenant_id}/keys")
        r.raise_for_status()
        return dict(r.json())

    def timeline(self, region: str, tenant_id: str) -> list[dict[str, Any]]:
        """Every key version the region holds for the tenant (both layers, stale ones
        included), no material."""
        body = self.keys(region, tenant_id)
        versions = body["versions"]
        return [*versions.get("L2", []), *versions.get("L3", []), *body.get("stale", [])]

    def timeline_any(self, region: str, tenant_id: str) -> list[dict[str, Any]]:
        """Like `timeline`, empty where the region refuses to show the tenant."""
        try:
            return self.timeline(region, tenant_id)
        except httpx.HTTPStatusError:
            return []

    def status(self, region: str) -> dict[str, Any]:
        r = self.http.get(f"{self.core_url(region)}/v1/status")
        r.raise_for_status()
        return dict(r.json())

    # --- load ---------------------------------------------------------------------------

    def load(self) -> None:
        """Tenants with mixed allow-lists: pinned to home, home + next region, everywhere."""
        k = len(self.regions)
        for i in range(self.config.tenants):
            home = self.regions[i % k]
            nxt = self.regions[(i + 1) % k]
            shape = i // k % 3
            regions = [home] if shape == 0 else [home, nxt] if shape == 1 else list(self.regions)
            tenant = Tenant(f"drill-{i:04d}", regions, home)
            r = self.create_tenant(tenant)
            if r.status_code != 201:
                raise RuntimeError(f"create {tenant.tenant_id}: {r.status_code} {r.text[:200]}")
            self.tenants[tenant.tenant_id] = tenant
        self.log(f"{len(self.tenants)} tenants created with mixed allow-lists")
        pending = list(self.tenants.values())
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            pending = [t for t in pending if not self.wrap(t.home, t)]
            if pending:
                time.sleep(0.2)
        if pending:
            raise RuntimeError(f"{len(pending)} tenants never became servable at home")
        for tenant in self.tenants.values():
            while len(tenant.deks) < self.config.deks_per_tenant:
                if not self.wrap(tenant.home, tenant):
                    raise RuntimeError(f"wrap failed for {tenant.tenant_id}")
        self.log(f"{sum(len(t.deks) for t in self.tenants.values())} DEKs wrapped at home")

    def homed_at(self, region: str) -> list[Tenant]:
        return [t for t in self.tenants.values() if t.home == region]

    # --- the key log --------------------------------------------------------------------

    def rotations(self) -> list[dict[str, Any]]:
        """Every authenticated KeyRotated on kcm.core.keys, as {t, region, layer, epoch,
        tenant}, in time order."""
        assert self.stack.bootstrap is not None
        logs, _ = asyncio.run(read_key_log(KafkaSettings(self.stack.bootstrap),
                                           TrustStore(self.stack.trust_dir)))
        seen: dict[str, dict[str, Any]] = {}
        for log in logs.values():
            for ev in log.events:
                if ev["type"] != "KeyRotated":
                    continue
                p = ev["payload"]
                when = datetime.fromisoformat(ev["occurred_at"]).timestamp()
                seen[ev["event_id"]] = {"t": round(when - self.wall0, 3), "region": p["region"],
                                        "layer": p["key"]["layer"], "epoch": p["epoch"],
                                        "tenant": ev["tenant_id"]}
        return sorted(seen.values(), key=lambda r: r["t"])


# --- scenarios ------------------------------------------------------------------------------


def scenario_partition(d: Drill) -> None:
    cfg, res = d.config, d.result
    region = d.regions[0]
    tenants = d.homed_at(region)
    before = {t.tenant_id: len(d.timeline(region, t.tenant_id)) for t in tenants}
    d.cut(region)
    fault = d.now()
    new = Tenant("drill-new-0001", [region], region)
    created = d.create_tenant(new)
    victim = tenants[-1]
    deleted = d.delete_tenant(victim.tenant_id)
    res.check("registry accepts creates and deletes during the partition",
              created.status_code == 201 and deleted.status_code == 202,
              f"create {created.status_code}, delete {deleted.status_code}")
    d.log(f"created {new.tenant_id} and deleted {victim.tenant_id} while {region} is cut off")
    served_during: list[str] = []
    end = time.monotonic() + cfg.outage_seconds
    while time.monotonic() < end:
        ok, bad = d.verify_deks(region, [t for t in tenants if t is not victim])
        served_during += bad
        time.sleep(1.0)
    res.check("L4 keeps answering during the partition", not served_during,
              f"{len(served_during)} failures"
              + (f", e.g. {served_during[0]}" if served_during else ""))
    after = {t.tenant_id: len(d.timeline(region, t.tenant_id)) for t in tenants}
    rotated = sum(after[k] - before[k] for k in before)
    res.rotations_during_outage = rotated
    res.check("rotation continues during the partition", all(
        after[t.tenant_id] > before[t.tenant_id] for t in tenants if t is not victim),
        f"{rotated} new key versions at {region} during {cfg.outage_seconds:.0f}s")
    d.heal(region)
    res.fault_window = (fault, d.now())
    d.tenants[new.tenant_id] = new
    arrived = wait_for(lambda: d.wrap(region, new), 60)
    res.check("a create made during the partition is applied after heal", arrived,
              f"{new.tenant_id} servable at {region}")
    refused = wait_for(
        lambda: d.unwrap(region, victim.tenant_id, victim.deks[0][0])[0] in (409, 410, 404), 60)
    res.check("a delete made during the partition is applied after heal (pending purge)",
              refused, f"unwrap answers {d.unwrap(region, victim.tenant_id, victim.deks[0][0])}")
    del d.tenants[victim.tenant_id]
    ok, bad = d.verify_deks(region, [t for t in tenants if t is not victim])
    res.deks_verified = ok
    res.rpo_deks_lost = len(bad)
    res.rpo_key_versions_lost = 0
    res.check("every DEK of the served tenants unwraps after heal", not bad, "; ".join(bad[:3]))


def scenario_region_loss(d: Drill) -> None:
    cfg, res = d.config, d.result
    lost, survivor = d.regions[0], d.regions[1]
    tenants = d.homed_at(lost)
    movable = [t for t in tenants if survivor in t.regions]
    pinned = [t for t in tenants if survivor not in t.regions]
    versions_before = {t.tenant_id: {v.get("key_id", str(v)) + v.get("layer", "")
                                     for v in d.timeline(lost, t.tenant_id)} for t in movable}
    time.sleep(1.0)  # let the relay publish what the lost region minted last
    d.cores[lost].kill()
    fault = d.now()
    d.log(f"core {lost} SIGKILLed ({len(movable)} tenants movable, {len(pinned)} pinned)")
    if cfg.deny_survivor_l1:  # a fault of the drill itself: the survivor lost its L1 access
        from plugins.l1_local import set_regions

        set_regions(d.keyring, [r for r in d.regions if r != survivor])
        d.log(f"L1 keyring no longer serves {survivor}")
    assert d.stack.bootstrap is not None
    declared = asyncio.run(declare_failover(
        KafkaSettings(d.stack.bootstrap), from_region=lost, to_region=survivor,
        trust_dir=d.stack.trust_dir, key_dir=d.stack.root / "operator"))
    d.log(f"failover {lost} -> {survivor} declared (epoch {declared.epoch})")
    remaining = list(movable)
    deadline = time.monotonic() + cfg.rto_target_seconds * 2
    while remaining and time.monotonic() < deadline:
        remaining = [t for t in remaining if not d.serves(survivor, t)]
        if remaining:
            time.sleep(0.2)
    rto = d.now() - fault
    res.rto_seconds = round(rto, 3)
    res.rto_target_seconds = cfg.rto_target_seconds
    res.fault_window = (fault, d.now())
    d.log(f"every moved tenant serving at {survivor} after {rto:.2f}s" if not remaining
          else f"{len(remaining)} tenants still not serving at {survivor}")
    res.tenants_moved = len(movable) - len(remaining)
    res.check("every movable tenant serves all its pre-failure DEKs at the survivor",
              not remaining, f"{len(remaining)} not serving" if remaining else "")
    res.check("RTO within target", rto <= cfg.rto_target_seconds,
              f"{rto:.2f}s (target {cfg.rto_target_seconds:.0f}s)")
    ok, bad = d.verify_deks(survivor, movable)
    res.deks_verified = ok
    res.rpo_deks_lost = len(bad)
    refused = []
    for t in pinned:
        status, message = d.unwrap(survivor, t.tenant_id, t.deks[0][0])
        refused.append({"tenant": t.tenant_id, "reason": f"{status}: {message}"})
    res.tenants_refused = refused
    res.check("pinned tenants are refused at the survivor",
              all(not r["reason"].startswith("200") for r in refused),
              f"{len(refused)} refused")
    listed = d.status(survivor)
    listed_text = str(listed)
    res.check("the survivor lists the tenants it did not take, with a reason",
              all(t.tenant_id in listed_text for t in pinned) or not pinned,
              f"status mentions {sum(t.tenant_id in listed_text for t in pinned)}/{len(pinned)}")
    lost_versions = 0
    for t in movable:
        now_there = {v.get("key_id", str(v)) + v.get("layer", "")
                     for v in d.timeline(survivor, t.tenant_id)}
        lost_versions += len(versions_before[t.tenant_id] - now_there)
    res.rpo_key_versions_lost = lost_versions
    res.check("RPO: no key version lost", lost_versions == 0, f"{lost_versions} lost")
    res.check("RPO: no DEK lost", not bad, "; ".join(bad[:3]))
    before = {t.tenant_id: len(d.timeline(survivor, t.tenant_id)) for t in movable}
    resumed = wait_for(lambda: all(len(d.timeline(survivor, t.tenant_id)) > before[t.tenant_id]
                                   for t in movable), max(10.0, 4 * cfg.l3_seconds), interval=0.5)
    res.check("rotation resumes on the survivor", resumed)
    res.rotations = d.rotations()
    res.rotations_during_outage = sum(
        1 for r in res.rotations if r["region"] == survivor and r["t"] > fault)


def scenario_registry_loss(d: Drill) -> None:
    cfg, res = d.config, d.result
    assert d.registry is not None
    d.registry.kill()
    fault = d.now()
    d.log("registry SIGKILLed")
    corrupted = _corrupt_store(d.stack.root / "registry")
    d.log(f"registry store corrupted ({corrupted} files)")
    d.registry.start()
    d.log(f"registry restarted on a corrupted store at {d.registry.url}")
    r = d.create_tenant(Tenant("drill-frozen", [d.regions[0]], d.regions[0]))
    res.check("management is refused (503) while the store is unusable", r.status_code == 503,
              f"create answered {r.status_code}: {r.text[:120]}")
    victim = next(iter(d.tenants))
    r = d.delete_tenant(victim)
    res.check("deletes are refused too", r.status_code == 503, f"delete answered {r.status_code}")
    before = {t.tenant_id: len(d.timeline(t.home, t.tenant_id)) for t in d.tenants.values()}
    time.sleep(cfg.outage_seconds)
    after = {t.tenant_id: len(d.timeline(t.home, t.tenant_id)) for t in d.tenants.values()}
    res.rotations_during_outage = sum(after[k] - before[k] for k in before)
    res.check("Cores keep rotating without the Registry",
              all(after[k] > before[k] for k in before), f"{res.rotations_during_outage} versions")
    bad: list[str] = []
    ok = 0
    for region in d.regions:
        n, b = d.verify_deks(region, d.homed_at(region))
        ok, bad = ok + n, bad + b
    res.deks_verified = ok
    res.rpo_deks_lost = len(bad)
    res.rpo_key_versions_lost = 0
    res.check("Cores keep serving every DEK; nothing is purged", not bad, "; ".join(bad[:3]))
    res.fault_window = (fault, d.now())


def scenario_split_brain(d: Drill) -> None:
    cfg, res = d.config, d.result
    old, new = d.regions[0], d.regions[1]
    movable = [t for t in d.homed_at(old) if new in t.regions]
    d.cut(old)
    fault = d.now()
    assert d.stack.bootstrap is not None
    declared = asyncio.run(declare_failover(
        KafkaSettings(d.stack.bootstrap), from_region=old, to_region=new,
        trust_dir=d.stack.trust_dir, key_dir=d.stack.root / "operator"))
    d.log(f"{old} cut off but alive; failover {old} -> {new} declared (epoch {declared.epoch})")
    taken = wait_for(lambda: all(d.serves(new, t) for t in movable), 60, interval=0.3)
    res.check("the new owner takes the tenants over during the split", taken)
    for t in movable:  # both sides wrap during the split
        d.wrap(old, t)
        d.wrap(new, t)
    d.log("DEKs wrapped on both sides of the split")
    time.sleep(cfg.outage_seconds)
    d.heal(old)
    res.fault_window = (fault, d.now())
    time.sleep(3.0)
    fenced = wait_for(lambda: all(_not_owner(d, old, t.tenant_id) for t in movable), 60, 0.5)
    res.check("after heal the old owner stops owning the moved tenants", fenced)
    ok, bad = 0, []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ok, bad = d.verify_deks(new, movable)
        if not bad:
            break
        time.sleep(0.5)
    res.deks_verified = ok
    res.rpo_deks_lost = len(bad)
    res.tenants_moved = len(movable)
    res.check("every DEK from both sides unwraps at the owner", not bad, "; ".join(bad[:3]))
    flagged, current_ok = 0, True
    for t in movable:
        view = d.keys(new, t.tenant_id)
        flagged += len(view.get("stale") or [])
        current = str(view["current"]["L3"])
        current_ok = current_ok and current.startswith(f"e{view['epoch']}v")
    res.stale_events_fenced = flagged
    res.check("stale-epoch versions are flagged at the owner and never current",
              flagged > 0 and current_ok,
              f"{flagged} stale versions imported decrypt-only; current keys carry the new epoch")
    moved_ids = {t.tenant_id for t in movable}
    rotations = d.rotations()
    for r in rotations:
        r["stale"] = r["region"] == old and r["tenant"] in moved_ids and r["t"] > fault
    res.rotations = rotations
    res.rotations_during_outage = sum(
        1 for r in rotations if res.fault_window and fault < r["t"] <= res.fault_window[1])
    lost = 0
    for t in movable:  # every version the old side minted is known to the owner
        owner_ids = {v["key_id"] + v["layer"] for v in d.timeline(new, t.tenant_id)}
        old_ids = {v["key_id"] + v["layer"] for v in d.timeline_any(old, t.tenant_id)}
        lost += len(old_ids - owner_ids)
    res.rpo_key_versions_lost = lost
    res.check("no key version of either side is lost", lost == 0, f"{lost} unknown to the owner")


def _not_owner(d: Drill, region: str, tenant_id: str) -> bool:
    r = d.http.post(f"{d.core_url(region)}/v1/tenants/{tenant_id}/rotate")
    return r.status_code in (404, 409)


def _corrupt_store(path: Path) -> int:
    """Overwrite the Registry's store files with garbage, as a failed disk would."""
    count = 0
    for file in path.rglob("*"):
        if file.is_file() and not file.name.endswith(".pem"):
            size = max(64, file.stat().st_size)
            file.write_bytes(os.urandom(min(size, 1 << 20)))
            count += 1
    return count


RUNNERS: dict[str, Callable[[Drill], None]] = {
    "partition": scenario_partition,
    "region-loss": scenario_region_loss,
    "registry-loss": scenario_registry_loss,
    "split-brain": scenario_split_brain,
}


def run_scenario(name: str, config: DrillConfig, progress: Progress) -> ScenarioResult:
    drill = Drill(name, config, progress)
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        drill.start()
        drill.load()
        RUNNERS[name](drill)
        drill.result.check("replay --verify is clean on every Core", *verify_replays(drill))
        if not drill.result.rotations:
            drill.result.rotations = drill.rotations()
    except KeyboardInterrupt:
        drill.result.error = "interrupted"
        raise
    except Exception as exc:  # noqa: BLE001 - a drill reports what broke, then cleans up
        drill.result.error = f"{type(exc).__name__}: {exc}"
        drill.log(f"error: {drill.result.error}")
    finally:
        drill.result.duration_seconds = round(drill.now(), 3)
        drill.close()
        signal.signal(signal.SIGTERM, previous)
    return drill.result.finish()


def verify_replays(d: Drill) -> tuple[bool, str]:
    """Stop each live Core cleanly and run `openkcm replay --verify` on its data dir."""
    import subprocess
    import sys

    problems = []
    for region, core in d.cores.items():
        if not core.alive():
            continue
        core.stop()
        out = subprocess.run(
            [sys.executable, "-m", "openkcm.cli", "replay", "--verify", "--region", region,
             "--data-dir", str(d.stack.root / f"core-{region}"), "--format", "json"],
            capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            problems.append(
                f"{region}: exit {out.returncode} {out.stdout[-200:]}{out.stderr[-200:]}")
    return (not problems, "; ".join(problems) or f"{len(d.cores)} Cores verified")
