"""The rotation scheduler: what is due now, from the log's own times (pure), and the loop
that runs it. Nothing on this path calls the Registry.

Due times are `created_at` of the current version plus the tenant's period (the per-tenant
override or the region's default): after downtime an overdue tenant rotates once, and the next
due time counts from that rotation. An L2 rotation issues a new L3 under it, so it also resets
the L3 clock. A period of 0 means "never".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from core_service import state as st
from core_service.state import TenantState

log = logging.getLogger("openkcm.core.scheduler")


@dataclass(frozen=True)
class Due:
    rotations: list[tuple[str, str]]
    """(tenant, "L2" | "L3")."""
    purges: list[str]
    inits: list[str]


def due(tenants: Iterable[TenantState], now: float, region: str, l3_period: float,
        l2_period: float) -> Due:
    rotations: list[tuple[str, str]] = []
    purges: list[str] = []
    inits: list[str] = []
    for t in tenants:
        status = t.status
        if status == st.ACTIVE:
            if t.owner != region or not t.l2 or not t.l3:
                continue
            l2p = t.l2_period if t.l2_period is not None else l2_period
            l3p = t.l3_period if t.l3_period is not None else l3_period
            if l2p > 0 and now >= t.l2[-1].created_at + l2p:
                rotations.append((t.tenant_id, "L2"))
            elif l3p > 0 and now >= t.l3[-1].created_at + l3p:
                rotations.append((t.tenant_id, "L3"))
        elif status == st.PENDING_PURGE:
            if t.purge_at is not None and now >= t.purge_at and t.deleted and t.purge_cause:
                purges.append(t.tenant_id)
        elif status == st.INITIALIZING and not t.deleted:
            inits.append(t.tenant_id)
    return Due(rotations, purges, inits)


class Scheduler:
    """`tick(now)` runs everything due at `now` (callable directly by tests);
    `run()` ticks every `interval` real seconds."""

    def __init__(self, engine, interval: float = 1.0, init_retry: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.interval = interval
        self.init_retry = init_retry
        self.last_tick: float | None = None
        self.ticks = 0
        self.max_gap = 0.0
        """Longest time between two ticks so far (clock seconds)."""
        self._last_init_try = -1e18

    def tick(self, now: float | None = None) -> int:
        e = self.engine
        now = e.clock.now() if now is None else now
        d = due(e.state.tenants.values(), now, e.region, e.config.l3_period, e.config.l2_period)
        mono = time.monotonic()
        inits = d.inits if mono - self._last_init_try >= self.init_retry else []
        if inits:
            self._last_init_try = mono
        done = e.run_due(now, d.rotations, d.purges, inits)
        if self.last_tick is not None:
            self.max_gap = max(self.max_gap, now - self.last_tick)
        self.last_tick = now
        self.ticks += 1
        return done

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the scheduler never dies; next tick retries
                log.exception("scheduler tick failed")
            await asyncio.sleep(self.interval)
