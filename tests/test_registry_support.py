"""Helpers for the Registry tests: the Registry as a real subprocess, reading and verifying
its topics. (No tests here; the test modules import these.)"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiokafka.structs import ConsumerRecord

from events.envelope import Envelope, decode
from events.kafka import KafkaSettings, assign_from_offsets, make_consumer, read_to_end
from events.signing import ChainVerifier, TrustStore, verify_event

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ("eu-central-1", "eu-west-1", "us-east-1")


@dataclass
class RegistryProcess:
    """`python -m openkcm.cli registry ...` with a port-0 HTTP server."""

    data_dir: Path
    bootstrap: str
    trust_dir: Path
    extra: list[str] = field(default_factory=list)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    announced: dict[str, Any] = field(default_factory=dict)
    startup_seconds: float = 0.0

    def start(self, timeout: float = 30.0) -> RegistryProcess:
        log_path = self.log_path or self.data_dir.parent / f"{self.data_dir.name}.log"
        started = time.monotonic()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "openkcm.cli",
                    "registry",
                    "--data-dir",
                    str(self.data_dir),
                    "--bootstrap-servers",
                    self.bootstrap,
                    "--http",
                    "127.0.0.1:0",
                    "--regions",
                    ",".join(REGIONS),
                    "--trust-dir",
                    str(self.trust_dir),
                    "--format",
                    "json",
                    *self.extra,
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                # Our brokers are embedded (Tansu), which rejects idempotent producers even
                # when the suite also points at an external Kafka.
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OPENKCM_KAFKA_IDEMPOTENCE": "0"},
            )
        line = _read_line(self.proc, timeout)
        self.startup_seconds = time.monotonic() - started
        self.announced = json.loads(line)
        self.url = self.announced["url"]
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/healthz", timeout=5).json()  # type: ignore[no-any-return]

    def wait_relayed(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the relay published everything in the store."""
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            health = self.health()
            if health.get("relay_lag") == 0 and health.get("kafka") == "connected":
                return health
            time.sleep(0.1)
        raise TimeoutError(f"relay did not catch up: {health}")


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None and not sel.select(0):
            proc.kill()
            raise RuntimeError(f"registry did not announce itself (exit {proc.poll()})")
        if sel.select(min(remaining, 0.2)):
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(5)
                raise RuntimeError(f"registry exited early ({proc.returncode})")
            buf += chunk
    sel.close()
    return buf.split(b"\n", 1)[0].decode()


async def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a topic, partition by partition in offset order ([] if absent)."""
    settings = KafkaSettings(bootstrap)
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        topics = await consumer.topics()
        if topic not in topics:
            return []
        tps = await assign_from_offsets(consumer, topic, {})
        out: list[ConsumerRecord[bytes, bytes]] = []
        async for _, records in read_to_end(consumer, tps):
            out += records
        out.sort(key=lambda r: (r.partition, r.offset))
        return out
    finally:
        await consumer.stop()


def verified_lifecycle(
    records: list[ConsumerRecord[bytes, bytes]], trust: TrustStore
) -> list[tuple[int, Envelope]]:
    """Decode and authenticate lifecycle records the way a Core does (ChainVerifier per
    (topic, partition, producer)); every record must verify. Returns (partition, event) in
    per-partition order, duplicates included."""
    verifier = ChainVerifier(trust)
    out: list[tuple[int, Envelope]] = []
    for record in records:
        env = decode(record.value)
        assert env.auth is not None and env.auth.key_id.startswith("registry.")
        ok, rejected = verifier.feed((record.topic, record.partition, env.producer), env)
        assert rejected == [], [reason for _, reason in rejected]
        out += [(record.partition, e) for e in ok]
    pending = {
        chain: n
        for chain in {(r.topic, r.partition, "registry") for r in records}
        if (n := verifier.pending(chain))
    }
    assert pending == {}, f"events left without a signed checkpoint: {pending}"
    return out


def fold_lifecycle(events: list[Envelope]) -> dict[str, dict[str, Any]]:
    """An independent fold of lifecycle events (deduplicated by event_id, in seq order):
    {tenant_id: {regions, home_region, live, version}}."""
    unique = {e.event_id: e for e in events}
    state: dict[str, dict[str, Any]] = {}
    for env in sorted(unique.values(), key=lambda e: e.seq):
        tid, p = env.tenant_id, env.payload
        assert tid is not None
        if env.type == "TenantCreated":
            assert tid not in state
            state[tid] = {"regions": list(p.regions), "home_region": p.home_region, "live": True}
        elif env.type == "TenantDeleted":
            assert state[tid]["live"]
            state[tid]["live"] = False
        elif env.type == "TenantRestored":
            assert not state[tid]["live"]
            state[tid]["live"] = True
        elif env.type == "TenantRegionsChanged":
            state[tid].update(regions=list(p.regions), home_region=p.home_region)
        state[tid]["version"] = env.seq
    return state


def compacted_view(
    records: list[ConsumerRecord[bytes, bytes]], trust: TrustStore
) -> dict[str, dict[str, Any]]:
    """The last value per key of the compacted topic (tombstones remove), each verified."""
    latest: dict[str, bytes | None] = {}
    for record in records:
        latest[record.key.decode()] = record.value
    out: dict[str, dict[str, Any]] = {}
    for tid, value in latest.items():
        if value is None:
            continue
        env = decode(value)
        verify_event(env, trust)
        assert env.type == "TenantDefinition" and env.tenant_id == tid
        out[tid] = {
            "regions": list(env.payload.regions),
            "home_region": env.payload.home_region,
            "version": env.payload.registry_seq,
        }
    return out


def live_of(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        t: {"regions": s["regions"], "home_region": s["home_region"], "version": s["version"]}
        for t, s in state.items()
        if s["live"]
    }


def copies_by_event_id(events: list[tuple[int, Envelope]]) -> dict[str, list[Envelope]]:
    out: dict[str, list[Envelope]] = defaultdict(list)
    for _, env in events:
        out[str(env.event_id)].append(env)
    return out
