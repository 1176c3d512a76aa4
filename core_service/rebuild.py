"""Rebuilding a region's Core from the topics into an empty data dir (`openkcm replay
--region R --data-dir NEW`), for a region whose disk is lost but whose keys were replicated.

1. The verified lifecycle topic is applied as facts only (`Engine.rebuilding`): tenants,
   allow-lists, deletions, consumed offsets; nothing minted, nothing scheduled.
2. The verified key log says who owns each tenant now (the region of its latest
   `TenantInitialized` / `TenantHydrated`). Every live tenant this region owned is imported the
   way a survivor hydrates (`hydration.plan_tenant`: every L2 unwrapped through L1, every L3
   through its L2, each key check value matched against the timeline) and takes a new epoch:
   the rebuilt Core is a new incarnation, so a version it mints can never collide with one the
   lost incarnation minted but never published. Tenants this region once owned that moved
   elsewhere are recorded as moved (fenced).
3. A tenant deleted in the Registry keeps its purge: the imported `TenantPurgeScheduled`, or a
   new one (normal grace) where the lost incarnation had not scheduled it yet.

The rebuilt Core serves every DEK its region ever wrapped (and that reached Kafka).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from core_service import state as st
from core_service.clock import SystemClock, iso
from core_service.engine import CoreConfig, Engine
from core_service.hydration import apply_plan, plan_tenant
from core_service.log import EventLog
from core_service.replicated import TenantKeyLog, read_key_log
from events import topics
from events.envelope import DecodeError, decode
from events.fastpath import read_raw
from events.kafka import KafkaSettings, assign_from_offsets, make_consumer, read_to_end
from events.signing import ChainVerifier, TrustStore, load_or_create_signing_key
from plugins.l1 import open_l1
from plugins.vault import open_vault

Progress = Callable[[str], None]
CHUNK = 2_000


@dataclass
class RebuildReport:
    region: str
    data_dir: str
    lifecycle_events: int = 0
    key_log_events: int = 0
    key_log_events_per_second: float = 0.0
    tenants_rebuilt: int = 0
    tenants_moved_elsewhere: int = 0
    purges_kept: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)
    rejected_records: int = 0
    epoch_note: str = "rebuilt tenants take a new epoch (a new incarnation of the region)"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.refused


def latest_owner(keylog: TenantKeyLog) -> tuple[str | None, int]:
    """(region, epoch) of the tenant's latest initialisation or takeover on the key log."""
    owner, top = None, 0
    for ev in keylog.events:
        if ev["type"] in ("TenantInitialized", "TenantHydrated"):
            epoch = int(ev["payload"]["epoch"])
            if epoch >= top:
                owner, top = ev["payload"]["region"], epoch
    return owner, top


async def read_lifecycle(
    settings: KafkaSettings, trust: TrustStore
) -> tuple[list[tuple[dict[str, Any], bytes, int]], dict[int, tuple[int, int]], int]:
    """Every verified lifecycle event once, in partition order; the end offsets; rejects."""
    verifier = ChainVerifier(trust)
    accepted: list[tuple[dict[str, Any], bytes, int]] = []
    seen: set[str] = set()
    ends: dict[int, tuple[int, int]] = {}
    rejected = 0
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await assign_from_offsets(consumer, topics.LIFECYCLE, {})
        async for tp, records in read_to_end(consumer, tps):
            for rec in records:
                ends[tp.partition] = (rec.offset + 1, rec.offset + 1)
                try:
                    try:
                        event: Any = read_raw(rec.value)
                    except DecodeError:
                        event = decode(rec.value)  # an older schema version: strict path
                except DecodeError:
                    rejected += 1
                    continue
                good, bad = verifier.feed((topics.LIFECYCLE, tp.partition, event.producer), event)
                rejected += len(bad)
                for ok in good:
                    raw = ok.raw if hasattr(ok, "raw") else rec.value
                    eid = str(ok.event_id)
                    if eid in seen:
                        continue
                    seen.add(eid)
                    accepted.append((orjson.loads(raw), raw, tp.partition))
    finally:
        await consumer.stop()
    return accepted, ends, rejected


async def rebuild(
    region: str,
    data_dir: Path,
    settings: KafkaSettings,
    trust_dir: Path,
    l1_uri: str,
    vault_uri: str | None = None,
    purge_grace: float = 7 * 86400,
    progress: Progress | None = None,
) -> RebuildReport:
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    if (data_dir / "log").exists() and any((data_dir / "log").iterdir()):
        raise ValueError(f"{data_dir} already holds a Core event log: rebuild needs an empty dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    trust = TrustStore(trust_dir)
    report = RebuildReport(region, str(data_dir))
    engine = Engine(
        CoreConfig(region, data_dir, purge_grace=purge_grace),
        EventLog(data_dir / "log"),
        open_vault(vault_uri, data_dir / "vault"),
        open_l1(l1_uri, region),
        load_or_create_signing_key(data_dir, region, trust_dir),
        SystemClock(),
    )
    try:
        say("reading the lifecycle topic")
        accepted, ends, rejected = await read_lifecycle(settings, trust)
        report.lifecycle_events, report.rejected_records = len(accepted), rejected
        engine.rebuilding = True
        for i in range(0, max(1, len(accepted)), 5_000):
            chunk = accepted[i : i + 5_000]
            last = i + 5_000 >= len(accepted)
            engine.apply_lifecycle(chunk, ends if last else {})
        engine.rebuilding = False
        deleted_by = {e["tenant_id"]: str(e["event_id"]) for e, _, _ in accepted
                      if e["type"] == "TenantDeleted"}
        say("reading the key log")
        keylogs, stats = await read_key_log(settings, trust)
        report.key_log_events = stats.events
        report.key_log_events_per_second = round(stats.events_per_second)
        report.rejected_records += stats.rejected
        take, moved = [], []
        for tid, keylog in sorted(keylogs.items()):
            owner, top = latest_owner(keylog)
            t = engine.state.tenants.get(tid)
            if t is None:
                continue
            if owner == region and not keylog.purged:
                take.append(tid)
            elif owner is not None and owner != region and t.home_region == region:
                moved.append((tid, owner, top))
        say(f"importing {len(take)} tenants")
        cause = f"rebuild:{uuid.uuid4()}"
        for i in range(0, len(take), CHUNK):
            _commit(engine, take[i : i + CHUNK], keylogs, cause, report, deleted_by,
                    purge_grace)
        if moved:
            txn = engine.begin()
            now = engine.clock.now()
            for tid, owner, top in moved:
                engine._local(txn, st.OWNERSHIP_MOVED, tid, {  # noqa: SLF001 - fold record
                    "from_region": region, "to_region": owner, "epoch": top,
                    "cause_event_id": cause}, now)
            engine.commit(txn)
            report.tenants_moved_elsewhere = len(moved)
    finally:
        engine.vault.close()
        engine.log.close()
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _commit(engine: Engine, tenants: list[str], keylogs: dict[str, TenantKeyLog], cause: str,
            report: RebuildReport, deleted_by: dict[str, str], purge_grace: float) -> None:
    at = engine.clock.now()
    txn = engine.begin()
    for tid in tenants:
        t = engine.tenant(txn, tid)
        definition = None if t is None else {"regions": list(t.regions),
                                             "home_region": t.home_region}
        plan = plan_tenant(tid, engine.region, 0, definition, keylogs.get(tid), t, engine.l1)
        if isinstance(plan, str):
            report.refused.append({"tenant": tid, "reason": plan})
            continue
        apply_plan(engine, txn, plan, engine.region, cause, at)
        after = engine.tenant(txn, tid)
        if after is not None and after.deleted and after.status == st.ACTIVE:
            engine.emit(txn, "TenantPurgeScheduled", tid, {
                "region": engine.region, "epoch": plan.epoch,
                "purge_at": iso(at + purge_grace),
                "cause_event_id": deleted_by.get(tid, cause)}, at)
        if after is not None and after.deleted:
            report.purges_kept += 1
        report.tenants_rebuilt += 1
    engine.commit(txn)
