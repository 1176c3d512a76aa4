"""The Registry process minus HTTP: the store (or the reason it is frozen), the group-commit
writer that serialises every command, the relay, the signing key and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from events.kafka import DEFAULT_PARTITIONS, KafkaSettings
from events.signing import SigningKey, load_or_create_signing_key
from registry_service.metrics import Metrics
from registry_service.relay import Relay, RelayConfig
from registry_service.store import (
    ChangeRegions,
    Command,
    CreateTenant,
    DeleteTenant,
    Outcome,
    Policy,
    RegistryStore,
    RestoreTenant,
    StoreError,
)

log = logging.getLogger("openkcm.registry")

MAX_GROUP_COMMIT = 256

COMMAND_NAMES: dict[type, str] = {
    CreateTenant: "create",
    DeleteTenant: "delete",
    RestoreTenant: "restore",
    ChangeRegions: "change_regions",
}


class Frozen(Exception):
    """Tier 3: the store is unusable; every management call is refused."""


@dataclass
class RegistryConfig:
    data_dir: Path
    regions: frozenset[str]
    bootstrap_servers: str | None = None
    trust_dir: Path | None = None
    purge_grace: timedelta = timedelta(days=7)
    admin_token: str | None = None
    max_body_bytes: int = 64 * 1024
    partitions: int | None = None
    relay: RelayConfig = field(default_factory=RelayConfig)

    @property
    def store_path(self) -> Path:
        return self.data_dir / "store"


class RegistryService:
    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.policy = Policy(config.regions, config.purge_grace)
        self.metrics = Metrics()
        self.frozen_reason: str | None = None
        self.store: RegistryStore | None = None
        self.key: SigningKey | None = None
        self.relay: Relay | None = None
        had_key = (config.data_dir / "signing-registry.pem").exists()
        try:
            self.store = RegistryStore(config.store_path, self.policy)
        except StoreError as exc:
            self._freeze(str(exc))
        if self.store is not None and had_key and self.store.seq == 0:
            # This Registry has signed events before, yet its store is empty: the store was
            # lost or replaced. Starting over would re-issue sequence numbers that every Core
            # rejects as replays; restore the store instead.
            self._freeze("the store is empty but this Registry has signed events before "
                         "(lost or replaced store): restore it from a backup")
        if self.store is not None:
            try:
                self.key = load_or_create_signing_key(config.data_dir, "registry", config.trust_dir)
            except (OSError, ValueError) as exc:
                self._freeze(f"cannot load the Registry signing key: {exc}")
        if self.store is not None and self.key is not None and config.bootstrap_servers:
            settings = KafkaSettings(
                config.bootstrap_servers,
                partitions=config.partitions or DEFAULT_PARTITIONS,
                client_id="openkcm-registry",
            )
            self.relay = Relay(self.store, settings, self.key, self.metrics, config.relay)
        self._queue: asyncio.Queue[tuple[Command, asyncio.Future[Outcome]]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._refresh_gauges()

    def _freeze(self, reason: str) -> None:
        self.frozen_reason = reason
        self.metrics.frozen.set(1)
        log.error("registry frozen (tier 3): %s", reason)
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.relay is not None:
            self.relay = None

    @property
    def frozen(self) -> bool:
        return self.frozen_reason is not None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        if self.frozen:
            return
        self._writer = asyncio.create_task(self._write_loop(), name="registry-writer")
        if self.relay is not None:
            self.relay.start()

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer
        if self.relay is not None:
            await self.relay.stop()
        if self.store is not None:
            self.store.close()

    async def submit(self, cmd: Command) -> Outcome:
        """Queue a command for the single writer; its outcome once durably written."""
        if self.frozen or self._queue is None or self._writer is None:
            raise Frozen(self.frozen_reason or "the Registry is not running")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        await self._queue.put((cmd, future))
        outcome = await future
        name = COMMAND_NAMES[type(cmd)]
        result = "rejected" if outcome.error else ("accepted" if outcome.event_id else "noop")
        self.metrics.commands.labels(name, result).inc()
        return outcome

    async def _write_loop(self) -> None:
        assert self._queue is not None and self.store is not None
        queue, store = self._queue, self.store
        while True:
            batch = [await queue.get()]
            while len(batch) < MAX_GROUP_COMMIT and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                outcomes = await asyncio.to_thread(store.execute, [c for c, _ in batch])
            except Exception as exc:  # noqa: BLE001 - a failed synced write: freeze
                if self.relay is not None:
                    await self.relay.stop()
                self._freeze(f"store write failed: {exc}")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(Frozen(self.frozen_reason or "frozen"))
                while not queue.empty():
                    _, fut = queue.get_nowait()
                    fut.set_exception(Frozen(self.frozen_reason or "frozen"))
                return
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(outcome)
            self.metrics.write_batches.observe(len(batch))
            self._refresh_gauges()
            if self.relay is not None:
                self.relay.notify()

    def _refresh_gauges(self) -> None:
        if self.store is not None:
            self.metrics.store_seq.set(self.store.seq)
            self.metrics.relay_seq.set(self.store.relay.seq)
