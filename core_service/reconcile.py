"""Reconciliation of a Core's tenant set against a verified Registry snapshot (ACD-402 tier 1).

After a partition heals the lifecycle backlog is applied in order; what can still differ
between the Core and the Registry afterwards is drift (an event the Core never received, one
it should never have accepted, an allow-list it missed). The Core then compares its tenant set
with a signed Registry snapshot and repairs the difference:

- `reconcile` (pure): the drift between the Core's state and the snapshot's definitions;
- `plan_repairs` (pure): which repairs one pass may make, and what the safety rails refuse;
- `repair`: one log transaction of the Core recording the drift and its repairs (local
  `TenantReconciled` records folded by `state.apply`, the normal timeline events
  `TenantPurgeScheduled` / `TenantInitialized` / `TenantPurgeCancelled`, and a `Reconciled`
  summary), so a replay of the log recomputes the same state;
- `Reconciler`: the I/O around it in the service (when to run, fetching and verifying the
  snapshot, the rails that refuse a pass).

Safety rails: never against a Registry that answers 503 (frozen) or a snapshot that fails
verification, or one older than the Registry events this Core already applied; never an
immediate purge (a tenant gone in the Registry gets its purge scheduled with the normal grace,
caused by the snapshot's signed sequence, and a `TenantRestored` within the grace cancels it as
usual); and never more scheduled purges in one pass than `max_purge_share` of the tenants this
region serves (the pass reports them as refused instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from core_service import state as st
from core_service.clock import iso
from core_service.state import CoreState, TenantState
from registry_service.client import (
    AsyncRegistryClient,
    Frozen,
    RegistryError,
    SnapshotError,
    Unreachable,
)

log = logging.getLogger("openkcm.core.reconcile")

RECONCILED = "Reconciled"  # local summary record of one pass (no tenant)
TENANT_RECONCILED = st.TENANT_RECONCILED  # local per-tenant repair record, folded by state.apply
MARKER = b"m/reconciled"  # the last pass's report, written with its transaction
LIST_LIMIT = 100  # tenant ids listed per category in reports (the log has every one)


@dataclass(frozen=True, slots=True)
class Definition:
    """A tenant as the Registry defines it (from the snapshot)."""

    tenant_id: str
    regions: tuple[str, ...]
    home_region: str


@dataclass(frozen=True)
class Drift:
    gone: tuple[str, ...] = ()
    """Known here and not deleted, absent from the Registry: deleted there (or never created
    there), so the Core must treat it as deleted."""
    missing: tuple[Definition, ...] = ()
    """Live in the Registry with an allow-list admitting this region, unknown here."""
    regions: tuple[Definition, ...] = ()
    """Known here, but the allow-list or home region differs (the Registry's definition)."""
    restored: tuple[str, ...] = ()
    """Deleted here (pending purge, or deleted without keys), live in the Registry."""
    purged_but_live: tuple[str, ...] = ()
    """Purged here, live in the Registry: nothing to repair (the keys are destroyed)."""

    @property
    def total(self) -> int:
        return (len(self.gone) + len(self.missing) + len(self.regions) + len(self.restored)
                + len(self.purged_but_live))

    def summary(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "gone": _listing(self.gone),
            "missing": _listing(d.tenant_id for d in self.missing),
            "regions": _listing(d.tenant_id for d in self.regions),
            "restored": _listing(self.restored),
            "purged_but_live": _listing(self.purged_but_live),
        }


def _listing(ids: Iterable[str]) -> dict[str, Any]:
    items = list(ids)
    return {"count": len(items), "tenants": items[:LIST_LIMIT]}


def _definition(d: Any) -> Definition:
    if isinstance(d, Definition):
        return d
    if isinstance(d, Mapping):
        return Definition(str(d["tenant_id"]), tuple(d["regions"]), str(d["home_region"]))
    return Definition(str(d.tenant_id), tuple(d.regions), str(d.home_region))


def reconcile(core_state: CoreState | Mapping[str, TenantState],
              snapshot_definitions: Iterable[Any], region: str) -> Drift:
    """The drift between the Core's tenants and the Registry's live definitions (pure).

    `snapshot_definitions`: every live tenant of the snapshot (objects or mappings with
    `tenant_id`, `regions`, `home_region`). Results are sorted by tenant id."""
    tenants = core_state.tenants if isinstance(core_state, CoreState) else core_state
    defs = {d.tenant_id: d for d in map(_definition, snapshot_definitions)}
    gone, restored, purged = [], [], []
    for tid, t in tenants.items():
        d = defs.get(tid)
        if d is None:
            if not t.deleted and t.status not in (st.PURGED, st.DELETED, st.PENDING_PURGE):
                gone.append(tid)
        elif t.status == st.PURGED:
            purged.append(tid)
        elif t.deleted and t.status in (st.DELETED, st.PENDING_PURGE):
            restored.append(tid)
    missing, changed = [], []
    for tid, d in defs.items():
        t = tenants.get(tid)
        if t is None:
            if region in d.regions:
                missing.append(d)
        elif (t.status != st.PURGED
              and (set(t.regions) != set(d.regions) or t.home_region != d.home_region)):
            changed.append(d)
    by_id = lambda d: d.tenant_id  # noqa: E731
    return Drift(tuple(sorted(gone)), tuple(sorted(missing, key=by_id)),
                 tuple(sorted(changed, key=by_id)), tuple(sorted(restored)), tuple(sorted(purged)))


@dataclass(frozen=True)
class Plan:
    """What one pass repairs; `refused_gone` with `refused_reason` when a rail tripped."""

    drift: Drift
    gone: tuple[str, ...]
    purges: tuple[str, ...]
    """Of `gone`: tenants whose keys this region holds: their purge gets scheduled."""
    refused_gone: tuple[str, ...] = ()
    refused_reason: str | None = None
    served: int = 0


def served_here(t: TenantState, region: str) -> bool:
    return t.status == st.ACTIVE and t.owner == region


def plan_repairs(drift: Drift, core_state: CoreState | Mapping[str, TenantState], region: str,
                 max_purge_share: float) -> Plan:
    """Apply the purge rail (pure): when scheduling the purges of every gone tenant would
    touch more than `max_purge_share` of the tenants this region serves (at least one is
    always allowed), no gone tenant is repaired in this pass; they are reported instead."""
    tenants = core_state.tenants if isinstance(core_state, CoreState) else core_state
    served = sum(1 for t in tenants.values() if served_here(t, region))
    purges = tuple(tid for tid in drift.gone if served_here(tenants[tid], region))
    allowed = max(1, int(max_purge_share * served))
    if len(purges) > allowed:
        reason = (f"{len(purges)} purges would exceed the limit of {allowed} per pass "
                  f"({max_purge_share:.0%} of {served} tenants served here); nothing was "
                  "scheduled: check the Registry, then reconcile with a higher "
                  "--reconcile-max-purge-share")
        return Plan(drift, (), (), drift.gone, reason, served)
    return Plan(drift, drift.gone, purges, served=served)


def repair(engine: Any, plan: Plan, snapshot_seq: int, *, applied_seq: int, trigger: str,
           snapshot_tenants: int, key_id: str | None = None, started: float | None = None
           ) -> dict[str, Any]:
    """Record the drift and repair it in ONE transaction of the engine; returns the report.
    Synchronous (no await), so no lifecycle event can interleave with the pass."""
    now = engine.clock.now()
    region = engine.region
    cause = f"registry-snapshot:{snapshot_seq}"
    drift = plan.drift
    scheduled, deleted, initialized, known, updated, cancelled = [], [], [], [], [], []
    txn = engine.begin()

    def record(tid: str, action: str, extra: dict[str, Any] | None = None) -> None:
        engine._local(txn, TENANT_RECONCILED, tid,
                      {"action": action, "snapshot_seq": snapshot_seq, **(extra or {})}, now)

    for tid in plan.gone:
        record(tid, "gone")
        t = engine.tenant(txn, tid)
        if tid in plan.purges and t is not None and served_here(t, region):
            engine._own(txn, "TenantPurgeScheduled", tid, {
                "region": region, "epoch": t.epoch,
                "purge_at": iso(now + engine.config.purge_grace), "cause_event_id": cause}, now)
            scheduled.append(tid)
        else:
            deleted.append(tid)
    for d in drift.missing:
        record(d.tenant_id, "missing", {"regions": list(d.regions), "home_region": d.home_region})
        if d.home_region == region and engine._initialize(txn, d.tenant_id, now):
            initialized.append(d.tenant_id)
        else:
            known.append(d.tenant_id)
    for d in drift.regions:
        record(d.tenant_id, "regions", {"regions": list(d.regions), "home_region": d.home_region})
        updated.append(d.tenant_id)
    for tid in drift.restored:
        record(tid, "restored")
        t = engine.tenant(txn, tid)
        if t is not None and t.status == st.PENDING_PURGE and t.owner == region:
            engine._own(txn, "TenantPurgeCancelled", tid, {
                "region": region, "epoch": t.epoch, "cause_event_id": cause}, now)
            cancelled.append(tid)
    repaired = {
        "total": len(plan.gone) + len(drift.missing) + len(drift.regions) + len(drift.restored),
        "purges_scheduled": _listing(scheduled),
        "marked_deleted": _listing(deleted),
        "initialized": _listing(initialized),
        "recorded": _listing(known),
        "regions_updated": _listing(updated),
        "purges_cancelled": _listing(cancelled),
    }
    refused = None
    if plan.refused_reason:
        refused = {"reason": plan.refused_reason, "tenants": _listing(plan.refused_gone)}
    outcome = "clean" if drift.total == 0 else ("partial" if refused else "repaired")
    if drift.total and repaired["total"] == 0 and refused:
        outcome = "refused"
    report = {
        "at": iso(now),
        "trigger": trigger,
        "outcome": outcome,
        "snapshot_seq": snapshot_seq,
        "snapshot_key_id": key_id,
        "snapshot_tenants": snapshot_tenants,
        "applied_seq": applied_seq,
        "tenants_served": plan.served,
        "drift": drift.summary(),
        "repaired": repaired,
        "refused": refused,
        "error": None,
        "duration_ms": round((time.monotonic() - started) * 1000, 1) if started else None,
    }
    if drift.total:
        engine._local(txn, RECONCILED, None, {k: report[k] for k in (
            "trigger", "outcome", "snapshot_seq", "snapshot_key_id", "applied_seq", "drift",
            "repaired", "refused")}, now)
    txn.puts[MARKER] = orjson.dumps(report)
    engine.commit(txn)
    for key, n in (("reconcile_purges_scheduled", len(scheduled)),
                   ("reconcile_initialized", len(initialized)),
                   ("reconcile_repairs", repaired["total"])):
        engine.counters[key] = engine.counters.get(key, 0) + n
    return report


def applied_registry_seq(meta: Any) -> int:
    """The highest Registry store sequence this Core applied from the lifecycle topic (the
    Registry's envelope seq is its store seq, gap-free across partitions)."""
    return max((v for k, v in meta.pseq.items() if k.rsplit("/", 1)[-1] == "registry"),
               default=0)


# --- I/O: when to reconcile, fetching the snapshot, the rails ------------------------------


@dataclass
class Reconciler:
    """Runs passes: at startup once the consumer caught up, when the Registry or the Kafka link
    comes back (after the backlog seen at that moment is applied), every `interval` seconds,
    and on request (`POST /v1/reconcile`)."""

    engine: Any
    consumer: Any
    trust: Any
    registry_url: str | None
    interval: float = 600.0
    max_purge_share: float = 0.1
    timeout: float = 30.0
    last: dict[str, Any] | None = None
    passes: int = 0
    pending: str | None = None
    waiting: str | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        raw = self.engine.log.get(MARKER)
        if raw:
            self.last = orjson.loads(raw)

    def request(self, trigger: str) -> None:
        """Ask for a pass; triggers that arrive while one waits join it (`a + b`)."""
        if self.pending is None:
            self.pending = trigger
        elif trigger not in self.pending.split(" + "):
            self.pending = f"{self.pending} + {trigger}"
        self._wake.set()

    def view(self) -> dict[str, Any]:
        return {"passes": self.passes, "interval_s": self.interval,
                "max_purge_share": self.max_purge_share, "pending": self.pending,
                "waiting_for": self.waiting}

    async def caught_up(self) -> None:
        """Wait until the consumer applied everything up to the end offsets it saw in a fetch
        answered after this call (the backlog present when the trigger fired)."""
        c = self.consumer
        mark = c.responses
        self.waiting = "a fetch from the lifecycle topic"
        while c.responses <= mark:
            await asyncio.sleep(0.1)
        target = dict(c.highwater)
        self.waiting = "the lifecycle backlog to be applied"
        while any(c.applied.get(p, 0) < hw for p, hw in target.items()):
            await asyncio.sleep(0.1)
        self.waiting = None

    async def run(self) -> None:
        self.request("startup")
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       self.interval if self.interval > 0 else None)
            except TimeoutError:
                self.pending = self.pending or "periodic"
            self._wake.clear()
            try:
                await self.caught_up()
                trigger, self.pending = self.pending or "periodic", None
                await self.run_once(trigger)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next trigger retries
                log.exception("reconciliation failed")
                self.last = self._refusal("failed", None, f"{type(exc).__name__}: {exc}",
                                          "periodic")

    def _refusal(self, outcome: str, reason: str | None, error: str | None, trigger: str
                 ) -> dict[str, Any]:
        return {"at": iso(self.engine.clock.now()), "trigger": trigger, "outcome": outcome,
                "snapshot_seq": None, "applied_seq": applied_registry_seq(self.engine.log.meta),
                "drift": None, "repaired": None,
                "refused": {"reason": reason} if reason else None, "error": error}

    async def run_once(self, trigger: str = "on-demand", max_purge_share: float | None = None
                       ) -> dict[str, Any]:
        """One pass now (the caller has ensured the backlog is applied). `max_purge_share`
        overrides the rail for this pass only (an operator's explicit decision)."""
        share = self.max_purge_share if max_purge_share is None else max_purge_share
        self.passes += 1
        started = time.monotonic()
        if not self.registry_url:
            self.last = self._refusal("skipped", "no --registry-url configured", None, trigger)
            return self.last
        try:
            async with AsyncRegistryClient(self.registry_url, timeout=self.timeout) as client:
                snap = await client.snapshot(self.trust)
        except Frozen as exc:
            self.last = self._refusal(
                "refused", "the Registry is frozen (503): its store is unavailable, no "
                "reconciliation against it", exc.message, trigger)
            log.warning("reconciliation refused: the Registry is frozen")
            return self.last
        except SnapshotError as exc:
            self.last = self._refusal(
                "refused", f"the snapshot failed verification ({exc.code})", exc.message, trigger)
            log.warning("reconciliation refused: snapshot failed verification: %s", exc.message)
            return self.last
        except Unreachable as exc:
            self.last = self._refusal("unreachable", None, exc.message, trigger)
            return self.last
        except RegistryError as exc:
            self.last = self._refusal("refused", f"the Registry answered {exc.status}",
                                      f"{exc.code}: {exc.message}", trigger)
            return self.last
        # From here to the commit nothing awaits: no lifecycle event can be applied between
        # the sequence check and the repair.
        applied = applied_registry_seq(self.engine.log.meta)
        if snap.seq < applied:
            self.last = self._refusal(
                "refused", f"the snapshot reflects Registry seq {snap.seq}, older than seq "
                f"{applied} this Core already applied", None, trigger)
            self.last["snapshot_seq"] = snap.seq
            log.warning("reconciliation refused: stale snapshot %s < %s", snap.seq, applied)
            return self.last
        region = self.engine.region
        drift = reconcile(self.engine.state, snap.tenants, region)
        plan = plan_repairs(drift, self.engine.state, region, share)
        self.last = repair(self.engine, plan, snap.seq, applied_seq=applied, trigger=trigger,
                           snapshot_tenants=len(snap.tenants), key_id=snap.key_id,
                           started=started)
        if drift.total:
            log.warning("reconciliation against Registry seq %s: drift %s, repaired %s%s",
                        snap.seq, drift.total, self.last["repaired"]["total"],
                        f", refused: {plan.refused_reason}" if plan.refused_reason else "")
        return self.last
