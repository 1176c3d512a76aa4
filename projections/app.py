"""The rotation-audit projection as a faust-streaming app: I/O around `projections.rules`.

One agent reads `kcm.registry.lifecycle` and `kcm.core.keys` (co-partitioned by tenant),
verifies (projections.ingest), folds (projections.rules) and writes the `audit` table
(rocksdict). A control topic of the app carries what must run in a partition's context:
periodic ticks (overdue rotations, checks that settled) and the fan-out of region-scoped
RegionFailover events to every partition. HTTP is faust's own web server (aiohttp).
See docs/audit.md for the faust caveats this module works around.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from events.kafka import (
    KafkaSettings,
    ensure_topics,
    make_consumer,
    partition_for,
    partitions_of,
)
from events.signing import TrustStore
from events.topics import CORE_KEYS, LIFECYCLE
from projections import rules, views
from projections.ingest import Ingest, Record, collect
from projections.rules import Event, Finding, Policy

log = logging.getLogger("openkcm.audit")

TABLE = "audit"
STOP_GRACE = 5.0
"""faust's graceful stop can hang in its fetcher; after this many seconds the process exits
(state is crash-safe by construction)."""


@dataclass
class AuditConfig:
    bootstrap_servers: str
    data_dir: Path
    trust_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    policy: Policy = field(default_factory=Policy)
    tick_interval: float = 5.0
    app_id: str = "openkcm-audit"
    checkpoint_timeout: float = 300.0
    """Seconds an unsigned event may wait for its chain's checkpoint before it is a finding."""
    clock: Callable[[], float] = time.time
    announce: Callable[[str], None] | None = None


@dataclass
class Stats:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.records = Counter("audit_records_total", "Records read", ["topic"],
                               registry=self.registry)
        self.events = Counter("audit_events_applied_total", "Verified events folded",
                              registry=self.registry)
        self.findings = Counter("audit_findings_total", "New findings", ["kind"],
                                registry=self.registry)
        self.ready = Gauge("audit_ready", "1 once recovery completed", registry=self.registry)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def build_app(cfg: AuditConfig, partitions: int) -> faust.App:
    app = faust.App(
        cfg.app_id,
        broker=f"kafka://{cfg.bootstrap_servers}",
        store="rocksdb://",
        datadir=str(cfg.data_dir / "faust"),
        topic_partitions=partitions,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        broker_rebalance_timeout=5,
        broker_commit_interval=1.0,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_linger=0.005,  # batch the changelog writes (one send per table write)
        producer_max_batch_size=1 << 20,
        web_enabled=True,
        web_bind=cfg.host,
        web_host=cfg.host,
        web_port=cfg.port,
        web_in_thread=False,
        consumer_auto_offset_reset="earliest",
    )
    # raw serializers: faust would otherwise JSON-decode (and crash on) whatever is on a topic
    source = app.topic(LIFECYCLE, CORE_KEYS, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
    control = app.topic(
        f"{cfg.app_id}-control", partitions=partitions, internal=True,
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
    )
    table = app.Table(
        TABLE, default=None, partitions=partitions, key_type=bytes, value_type=bytes,
        options={"driver": "rocksdict"},
    )
    trust = TrustStore(cfg.trust_dir)
    stats = Stats()
    policy = cfg.policy

    class TableStore:
        """What the ingest reads of the table (in the current event's partition)."""

        def get_json(self, key: str) -> dict[str, Any] | None:
            return views.loads(table.get(key.encode()))

        def stashed(self) -> list[tuple[str, bytes]]:
            return [(k.decode(), bytes(v)) for k, v in table.items()
                    if k.startswith(views.STASH) and v is not None]

        def chain_offsets(self) -> dict[str, int]:
            return {k.decode(): views.loads(v)["offset"] for k, v in table.items()
                    if k.startswith(views.CHAIN) and v is not None}

    ingest = Ingest(trust, TableStore())
    activity = {"last": 0.0, "stashed": 0.0}
    gc_mark: dict[int, int] = {}

    class ReadModel:
        """What the HTTP routes read, kept in memory next to the table: every finding and
        each tenant's status (small), loaded once from the table after recovery and then
        updated with every write. Tenant states themselves are read from the table by key."""

        def __init__(self) -> None:
            self.loaded = False
            self.findings: dict[bytes, dict[str, Any]] = {}
            self.status: dict[str, str] = {}
            self.partitions: dict[int, set[str]] = {}

        def load(self) -> bool:
            if not self.loaded and ready():
                for k, v in table.items():
                    if v is None:
                        continue
                    if k.startswith(views.FINDING):
                        self.findings[k] = views.loads(v)
                    elif k.startswith(views.TENANT):
                        self._tenant(k, views.loads(v))
                self.loaded = True
            return self.loaded

        def finding(self, key: bytes, value: dict[str, Any]) -> None:
            if self.loaded:
                self.findings[key] = value

        def tenant(self, key: bytes, state: dict[str, Any]) -> None:
            if self.loaded:
                self._tenant(key, state)

        def _tenant(self, key: bytes, state: dict[str, Any]) -> None:
            tenant = key[len(views.TENANT):].decode()
            self.status[tenant] = state["status"]
            if "partition" in state:
                self.partitions.setdefault(int(state["partition"]), set()).add(tenant)

        def sorted_findings(self) -> list[dict[str, Any]]:
            return sorted(self.findings.values(), key=lambda f: (
                f["time"], f["kind"], f["event_id"], f.get("layer") or ""))

    model = ReadModel()

    def put_tenant(key: bytes, state: dict[str, Any]) -> None:
        table[key] = views.dumps(state)
        model.tenant(key, state)

    def save_findings(found: list[Finding]) -> None:
        for f in found:
            key = views.finding_key(f.key)
            if table.get(key) is None:
                value = f.to_dict()
                table[key] = views.dumps(value)
                model.finding(key, value)
                stats.findings.labels(f.kind).inc()

    def failover_parts(ev: Event) -> list[tuple[int, dict[str, Any]]]:
        """One control message per partition; a tenant list is split by partition so no
        message grows beyond a partition's share (100k tenants would exceed 1 MB)."""
        listed = ev.payload.get("tenants")
        out = []
        for p in range(partitions):
            body = dict(ev.__dict__)
            if listed is not None:
                mine = [t for t in listed if partition_for(t.encode(), partitions) == p]
                if not mine:
                    continue
                body["payload"] = {**ev.payload, "tenants": mine}
            out.append((p, body))
        return out

    def fold(ev: Event, partition: int, now: float, states: dict[bytes, Any]) -> None:
        key = views.tenant_key(ev.tenant_id or "")
        state = states[key] if key in states else views.loads(table.get(key))
        new, found = rules.audit(state, ev, now, policy)
        new["partition"] = partition
        save_findings(found)
        states[key] = new
        stats.events.inc()

    @app.agent(source)
    async def audit_source(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            activity["last"] = time.monotonic()
            stats.records.labels(msg.topic).inc()
            record = Record(msg.topic, msg.partition, msg.offset, msg.value, msg.timestamp)
            outcome = ingest.feed(record)
            now = cfg.clock()
            # Order matters for a kill at any instant: the stash, findings and tenant states
            # first, then the chain record (which makes them "done"); dead stash at ticks.
            if outcome.stash is not None:
                table[outcome.stash[0].encode()] = outcome.stash[1]
                activity["stashed"] += 1
            save_findings(outcome.findings)
            states: dict[bytes, Any] = {}  # one write per tenant per verified run
            for ev in outcome.events:
                if ev.tenant_id is None:  # RegionFailover: to every partition's tenants
                    for p, part_ev in failover_parts(ev):
                        payload = views.dumps({"kind": "failover", "event": part_ev})
                        await control.send(key=b"failover", value=payload, partition=p)
                    stats.events.inc()
                else:
                    fold(ev, msg.partition, now, states)
            for key, state in states.items():
                put_tenant(key, state)
            if outcome.chain is not None:
                table[outcome.chain[0].encode()] = views.dumps(outcome.chain[1])

    def tenants_of(partition: int) -> list[tuple[bytes, dict[str, Any]]]:
        """The tenant states stored in one partition (by the read model's index once loaded,
        else by a scan)."""
        if model.load():
            out = []
            for tenant in model.partitions.get(partition, ()):
                key = views.tenant_key(tenant)
                value = table.get(key)
                if value is not None:
                    out.append((key, views.loads(value)))
            return out
        return [
            (k, st) for k, v in list(table.items())
            if k.startswith(views.TENANT) and v is not None
            and (st := views.loads(v)).get("partition") == partition
        ]

    @app.agent(control)
    async def audit_control(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            body = views.loads(msg.value) or {}
            now = float(body.get("now") or cfg.clock())
            if body.get("kind") == "failover":
                ev = Event(**body["event"])
                for key, state in tenants_of(msg.partition):
                    new, found = rules.apply_failover(state, ev, now, policy)
                    save_findings(found)
                    if new != state:
                        put_tenant(key, new)
            elif body.get("kind") == "tick":
                stashed = []
                if activity["stashed"] > gc_mark.get(msg.partition, 0):
                    gc_mark[msg.partition] = int(activity["stashed"])
                    stashed = ingest.store.stashed()
                if stashed:
                    chains = ingest.store.chain_offsets()
                    for key in collect(stashed, chains, msg.partition):
                        table.pop(key.encode(), None)
                save_findings(ingest.unconfirmed(msg.partition, cfg.checkpoint_timeout))
                for key, state in tenants_of(msg.partition):
                    new, found = rules.tick(state, now, policy)
                    save_findings(found)
                    if new != state:
                        put_tenant(key, new)

    async def caught_up() -> bool:
        """Ticks judge "now" against the timelines: only when the backlog is read, or an
        audit catching up would call a rotation overdue that is merely not read yet."""
        if time.monotonic() - activity["last"] < min(1.0, cfg.tick_interval):
            return False
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic not in (LIFECYCLE, CORE_KEYS):
                continue
            highwater = consumer.highwater(tp)
            position = await consumer.position(tp)
            if highwater is None or position is None or position < highwater:
                return False
        return True

    @app.timer(cfg.tick_interval)
    async def audit_tick() -> None:
        if not ready() or not await caught_up():
            return
        payload = views.dumps({"kind": "tick", "now": cfg.clock()})
        for p in range(partitions):
            await control.send(key=b"tick", value=payload, partition=p)

    def ready() -> bool:
        recovery = app.tables.recovery
        done = recovery.completed.is_set() and not recovery.in_recovery
        stats.ready.set(1 if done else 0)
        return done

    def snapshot() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return views.split((k, v) for k, v in table.items() if v is not None)

    def error(web: Any, status: int, code: str, message: str) -> Any:
        body = views.ErrorResponse(error=views.ErrorBody(code=code, message=message))
        return web.json(body.model_dump(), status=status)

    def findings_now() -> list[dict[str, Any]]:
        if model.load():
            return model.sorted_findings()
        return snapshot()[1]

    @app.page("/v1/audit/tenants/{tenant_id}")
    async def tenant_route(web: Any, request: Any, tenant_id: str) -> Any:
        raw = table.get(views.tenant_key(tenant_id))
        if raw is None:
            return error(web, 404, "not_found", f"no audit record for tenant {tenant_id}")
        view = views.tenant_view(views.loads(raw), findings_now(), policy)
        return web.json(view.model_dump(mode="json"))

    @app.page("/v1/audit/findings")
    async def findings_route(web: Any, request: Any) -> Any:
        since = request.query.get("since")
        try:
            selected = views.findings_since(findings_now(), since)
        except ValueError:
            return error(web, 422, "invalid_since", f"since must be an ISO-8601 time: {since!r}")
        page = views.FindingsPage(
            since=since, count=len(selected),
            findings=[views.FindingModel(**f) for f in selected],
        )
        return web.json(page.model_dump(mode="json"))

    @app.page("/v1/audit/summary")
    async def summary_route(web: Any, request: Any) -> Any:
        if model.load():
            statuses = {t: {"tenant_id": t, "status": st} for t, st in model.status.items()}
            body = views.summary(statuses, model.sorted_findings(), cfg.clock())
        else:
            tenants, findings = snapshot()
            body = views.summary(tenants, findings, cfg.clock())
        return web.json(body.model_dump(mode="json"))

    @app.page("/v1/audit/report")
    async def report_route(web: Any, request: Any) -> Any:
        from projections.report import report_data

        tenants, findings = snapshot()
        return web.json(report_data(tenants, findings, cfg.clock()))

    @app.page("/healthz")
    async def health_route(web: Any, request: Any) -> Any:
        ok = ready()
        return web.json({"status": "ok" if ok else "starting", "ready": ok},
                        status=200 if ok else 503)

    @app.page("/metrics")
    async def metrics_route(web: Any, request: Any) -> Any:
        ready()
        return web.bytes(generate_latest(stats.registry),
                         content_type="text/plain; version=0.0.4")

    @app.task
    async def announce() -> None:
        url = f"http://{cfg.host}:{cfg.port}"
        while True:
            try:
                _r, w = await asyncio.open_connection(cfg.host, cfg.port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        if cfg.announce is not None:
            cfg.announce(url)

    return app


async def _prepare(cfg: AuditConfig) -> int:
    """Topics exist; the source partition count; changelog offsets clamped (see docs)."""
    settings = KafkaSettings(cfg.bootstrap_servers)
    await ensure_topics(settings, [LIFECYCLE, CORE_KEYS])
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        counts = {len(await partitions_of(consumer, t)) for t in (LIFECYCLE, CORE_KEYS)}
        if len(counts) != 1:
            raise RuntimeError(f"{LIFECYCLE} and {CORE_KEYS} must be co-partitioned: {counts}")
        partitions = counts.pop()
        changelog = f"{cfg.app_id}-{TABLE}-changelog"
        cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001
        parts = cluster.partitions_for_topic(changelog)
        if parts:
            from aiokafka import TopicPartition

            tps = [TopicPartition(changelog, p) for p in parts]
            ends = await consumer.end_offsets(tps)
            clamp_persisted_offsets(cfg, {tp.partition: ends[tp] for tp in tps})
    finally:
        await consumer.stop()
    return partitions


def clamp_persisted_offsets(cfg: AuditConfig, ends: dict[int, int]) -> None:
    """The embedded broker under-reports a partition's end offset when its last batch held
    several records; faust then refuses to start ("persisted offset is higher than the
    highwater"). The local RocksDB already holds everything up to the persisted offset, so
    lowering the persisted offset to the reported highwater skips nothing that is missing."""
    import rocksdict

    base = cfg.data_dir / "faust" / "v1" / "tables"
    offset_key = b"__faust\0offset__"
    for partition, end in ends.items():
        path = base / f"{TABLE}-{partition}.db"
        if not path.exists():
            continue
        db = rocksdict.Rdict(str(path))
        try:
            raw = db.get(offset_key)
            if raw is not None and int(raw) > end - 1:
                log.info("clamping persisted changelog offset of partition %d: %s -> %d",
                         partition, raw, end - 1)
                if end > 0:
                    db[offset_key] = str(end - 1).encode()
                else:
                    del db[offset_key]
        finally:
            db.close()


class AuditWorker(faust.Worker):
    """faust's worker with a bounded graceful stop: exits after STOP_GRACE seconds."""

    def _on_sigterm(self) -> None:
        _watchdog()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        _watchdog()
        super()._on_sigint()


def _watchdog() -> None:
    timer = threading.Timer(STOP_GRACE, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def run(cfg: AuditConfig, log_level: str = "INFO") -> int:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    if cfg.port == 0:
        cfg.port = free_port(cfg.host)
    partitions = asyncio.run(_prepare(cfg))
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = build_app(cfg, partitions)
    worker = AuditWorker(
        app, loglevel=log_level, redirect_stdouts=False, quiet=True, stdout=sys.stderr
    )
    worker.execute_from_commandline()
    return 0

