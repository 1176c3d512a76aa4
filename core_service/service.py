"""The Core process: HTTP (uvicorn), lifecycle consumer, scheduler, relay and the registry
probe in one asyncio loop around one Engine. `openkcm core` (openkcm/commands/core.py) builds a
ServiceConfig from its options and calls `run`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from core_service import state as st
from core_service.api import RotationQueue, create_app
from core_service.clock import DAY, Clock, ScaledClock, SystemClock, iso
from core_service.engine import CoreConfig, Engine, TenantUnavailable
from core_service.follower import Follower
from core_service.hydration import Hydrator
from core_service.lifecycle import LifecycleConsumer
from core_service.log import EventLog
from core_service.reconcile import Reconciler
from core_service.relay import Relay
from core_service.scheduler import Scheduler
from events.kafka import KafkaSettings
from events.signing import TrustStore, load_or_create_signing_key
from plugins.l1 import open_l1
from plugins.vault import open_vault

log = logging.getLogger("openkcm.core")


@dataclass(frozen=True)
class ServiceConfig:
    region: str
    data_dir: Path
    bootstrap_servers: str
    trust_dir: Path
    l1: str
    vault: str | None = None
    registry_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    l3_period: float = 90 * DAY
    l2_period: float = 365 * DAY
    purge_grace: float = 7 * DAY
    tick: float = 1.0
    clock_speed: float | None = None
    reconcile_interval: float = 600.0
    reconcile_max_purge_share: float = 0.1


class CoreService:
    def __init__(self, cfg: ServiceConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.clock: Clock = clock or (
            ScaledClock(cfg.clock_speed) if cfg.clock_speed else SystemClock())
        self.settings = KafkaSettings(cfg.bootstrap_servers, client_id=f"core-{cfg.region}")
        key = load_or_create_signing_key(cfg.data_dir, cfg.region, cfg.trust_dir)
        self.trust = TrustStore(cfg.trust_dir)
        self.log = EventLog(cfg.data_dir / "log")
        self.vault = open_vault(cfg.vault, cfg.data_dir / "vault")
        self.l1 = open_l1(cfg.l1, cfg.region)
        self.engine = Engine(
            CoreConfig(cfg.region, cfg.data_dir, cfg.l3_period, cfg.l2_period, cfg.purge_grace,
                       self.settings.partitions),
            self.log, self.vault, self.l1, key, self.clock)
        self.scheduler = Scheduler(self.engine, cfg.tick)
        self.relay = Relay(self.engine, self.settings)
        self.consumer = LifecycleConsumer(self.engine, self.settings, self.trust)
        self.rotations = RotationQueue(self.engine)
        self.hydrator = Hydrator(self.engine, self.settings, self.trust, cfg.registry_url,
                                 int(os.environ.get("OPENKCM_HYDRATION_BATCH", "2000")))
        self.follower = Follower(self.engine, self.settings, self.trust)
        self.reconciler = Reconciler(self.engine, self.consumer, self.trust, cfg.registry_url,
                                     cfg.reconcile_interval, cfg.reconcile_max_purge_share)
        self.consumer.on_link_up.append(lambda: self.reconciler.request("kafka link back"))
        self.registry_reachable: bool | None = None
        self.registry_state: str | None = None
        self.registry_checked_at: float | None = None
        self.warm = 0

    # -- views -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        e = self.engine
        counts = e.counts()
        served = sum(1 for t in e.state.tenants.values()
                     if t.status == st.ACTIVE and t.owner == e.region)
        meta = self.log.meta
        return {
            "region": e.region,
            "tenants_served": served,
            "tenants": {"served": served, **counts, "known": len(e.state.tenants)},
            "registry": {"url": self.cfg.registry_url, "reachable": self.registry_reachable,
                         "state": self.registry_state,
                         "checked_at": iso(self.registry_checked_at)
                         if self.registry_checked_at else None},
            "consumer": {"connected": self.consumer.connected,
                         "link_up": self.consumer.link_up, "lag": self.consumer.lag,
                         "dead_letters": self.consumer.dead_letters,
                         "offsets": meta.offsets, "last_error": self.consumer.last_error},
            "relay": {"connected": self.relay.connected, "log_position": meta.pos,
                      "published_position": self.log.relay.pos, "backlog": self.relay.backlog,
                      "last_error": self.relay.last_error},
            "last_rotation": iso(meta.last_rotation) if meta.last_rotation else None,
            "rotations": meta.rotations,
            "failover": self.hydrator.status(),
            "follower": self.follower.status(),
            "last_reconciliation": self.reconciler.last,
            "reconciliation": self.reconciler.view(),
            "scheduler": {"last_tick": iso(self.scheduler.last_tick)
                          if self.scheduler.last_tick else None,
                          "interval_s": self.cfg.tick, "ticks": self.scheduler.ticks,
                          "max_gap_s": self.scheduler.max_gap},
            "keys_unsealed_tenants": len(e.cache.l3),
            "clock": iso(self.clock.now()),
            "l1": self.l1.health(),
        }

    def metrics_text(self) -> str:
        e = self.engine
        lines = []

        def metric(name: str, kind: str, value: float | None, help_: str) -> None:
            lines.append(f"# HELP openkcm_core_{name} {help_}")
            lines.append(f"# TYPE openkcm_core_{name} {kind}")
            lines.append(f'openkcm_core_{name}{{region="{e.region}"}} '
                         f"{0 if value is None else value}")

        for name, value in e.counters.items():
            metric(f"{name}_total", "counter", value, name.replace("_", " "))
        for status_, n in e.counts().items():
            lines.append(f'openkcm_core_tenants{{region="{e.region}",status="{status_}"}} {n}')
        metric("consumer_lag", "gauge", self.consumer.lag, "lifecycle records not yet applied")
        metric("dead_letters_total", "counter", self.consumer.dead_letters, "records to kcm.dlq")
        metric("relay_backlog", "gauge", self.relay.backlog, "log entries not yet published")
        metric("log_position", "gauge", self.log.meta.pos, "last local log position")
        metric("registry_reachable", "gauge",
               None if self.registry_reachable is None else int(self.registry_reachable),
               "1 when the Registry answered its last probe")
        return "\n".join(lines) + "\n"

    # -- background --------------------------------------------------------------------
    async def probe_registry(self) -> None:
        if not self.cfg.registry_url:
            return
        url = self.cfg.registry_url.rstrip("/") + "/healthz"
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                was = self.registry_reachable
                try:
                    r = await client.get(url)
                    self.registry_reachable = r.status_code == 200
                    self.registry_state = _health_state(r)
                except httpx.HTTPError:
                    self.registry_reachable = False
                    self.registry_state = "unreachable"
                if self.registry_reachable and was is False:
                    # The link is back: reconcile once the backlog seen now is applied.
                    self.reconciler.request("registry reachable again")
                self.registry_checked_at = self.clock.now()
                await asyncio.sleep(2.0)

    async def warm_up(self) -> None:
        """Unseal every served tenant in the background after serving started (a request
        for a tenant not unsealed yet unseals it at once)."""
        ids = [t.tenant_id for t in self.engine.state.tenants.values()
               if t.status == st.ACTIVE and t.owner == self.engine.region]
        for i, tid in enumerate(ids):
            if tid not in self.engine.cache.l3:
                try:
                    self.engine.unseal(tid)
                    self.warm += 1
                except TenantUnavailable as exc:
                    log.warning("cannot unseal %s: %s", tid, exc.message)
            if i % 200 == 199:
                await asyncio.sleep(0)

    def close(self) -> None:
        for closer in (getattr(self.l1, "close", None), self.vault.close, self.log.close):
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001
                    log.exception("close failed")

    async def serve(self, announce: Callable[[str], None]) -> None:
        app = create_app(self)
        # proto=TCP so asyncio sets TCP_NODELAY on accepted connections (no 40 ms stalls)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.host, self.cfg.port))
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               lifespan="off"))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [
            asyncio.create_task(self.consumer.run(), name="lifecycle"),
            asyncio.create_task(self.scheduler.run(), name="scheduler"),
            asyncio.create_task(self.relay.run(), name="relay"),
            asyncio.create_task(self.rotations.run(), name="rotations"),
            asyncio.create_task(self.probe_registry(), name="registry-probe"),
            asyncio.create_task(self.hydrator.run(), name="hydration"),
            asyncio.create_task(self.follower.run(), name="follower"),
            asyncio.create_task(self.reconciler.run(), name="reconcile"),
        ]
        http = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        while not server.started:
            if http.done():
                http.result()
                return
            await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(self.warm_up(), name="warm-up"))
        announce(f"http://{host}:{port}")
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, http], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(http, 5)
        except (TimeoutError, Exception):  # noqa: BLE001
            pass
        waiter.cancel()


def _health_state(r: httpx.Response) -> str:
    """ok, degraded or frozen from the Registry's /healthz answer."""
    try:
        return str(r.json().get("status") or r.status_code)
    except ValueError:
        return f"http {r.status_code}"


def run(cfg: ServiceConfig, announce: Callable[[str], None]) -> int:
    service = CoreService(cfg)
    try:
        asyncio.run(service.serve(announce))
    finally:
        service.close()
    return 0
