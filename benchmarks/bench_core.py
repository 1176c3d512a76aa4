"""The Regional Core's figures against raw baselines measured in the same run:

- DEK unwrap in process (Engine.unwrap_dek: parse, tenant check, cached L3 handle, AES-GCM)
  against raw AESGCM.decrypt, p50 per call;
- rotations/s through the log (key generation, wrapping, vault, events, signatures, fold and
  one synced WriteBatch) against raw rocksdict batched puts of the same number of records;
- restart: opening a Core's log and state with N tenants until it can serve (the projection is
  loaded directly, not re-folded) and the data dir's size;
- end to end with the embedded broker (unless --no-kafka): rotations/s until the relay has
  published them to kcm.core.keys and kcm.core.material, and DEK unwrap p50 over HTTP against a
  running `openkcm core`.

    .venv/bin/python -m benchmarks.bench_core [--tenants 100000] [--no-kafka]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from benchmarks.common import report
from core_service.clock import SystemClock
from core_service.engine import CoreConfig, Engine
from core_service.log import EventLog, size_on_disk
from events.envelope import encode, new_envelope
from events.models import TenantCreated
from events.signing import SigningKey, sign_event
from plugins.l1 import open_l1
from plugins.vault import open_vault

R = "eu-central-1"
REPEATS = 5


def engine(root: Path, key: SigningKey) -> Engine:
    return Engine(CoreConfig(R, root), EventLog(root / "log"), open_vault(None, root / "vault"),
                  open_l1(f"local:{root / 'keyring.json'}", R), key, SystemClock())


def close(e: Engine) -> None:
    e.vault.close()
    e.log.close()


def create(e: Engine, n: int, reg: SigningKey, start: int = 0, batch: int = 5_000) -> None:
    seq = start
    for i in range(0, n, batch):
        accepted = []
        for j in range(i, min(n, i + batch)):
            seq += 1
            env = sign_event(new_envelope(TenantCreated(regions=[R], home_region=R),
                                          producer="registry", seq=seq, tenant_id=f"t{j:06d}"),
                             reg)
            raw = encode(env)
            accepted.append((orjson.loads(raw), raw, 0))
        e.apply_lifecycle(accepted, {0: (seq, seq)})


def bench_ingest(n: int) -> dict[str, Any]:
    """Lifecycle ingest through the engine (verified events as the consumer hands them over),
    the signed events prepared beforehand: plain facts (a tenant homed elsewhere) and
    TenantCreated at home (two keys minted, an L1 wrap, signed timeline events)."""
    reg = SigningKey.generate("registry")

    def events(regions: list[str]) -> list[tuple[dict[str, Any], bytes, int]]:
        out = []
        for j in range(n):
            env = sign_event(new_envelope(TenantCreated(regions=regions, home_region=regions[0]),
                                          producer="registry", seq=j + 1, tenant_id=f"t{j:06d}"),
                             reg)
            raw = encode(env)
            out.append((orjson.loads(raw), raw, 0))
        return out

    results: dict[str, Any] = {"events": n, "target_per_s": 20_000}
    for name, regions in (("facts_only_per_s", ["us-east-1"]), ("created_at_home_per_s", [R])):
        accepted = events(regions)
        with tempfile.TemporaryDirectory() as d:
            e = engine(Path(d) / "core", SigningKey.generate(R))
            t0 = time.perf_counter()
            for i in range(0, n, 5_000):
                e.apply_lifecycle(accepted[i : i + 5_000], {0: (i + 5_000, i + 5_000)})
            results[name] = round(n / (time.perf_counter() - t0))
            close(e)
    return results


def p50_ns(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples)


def bench_unwrap(e: Engine) -> dict[str, Any]:
    _, wrapped = e.generate_dek("t000001")
    raw = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    ct = raw.encrypt(nonce, os.urandom(32), b"aad")
    core, base = [], []
    for _ in range(REPEATS):
        core.append(p50_ns(lambda: e.unwrap_dek("t000001", wrapped), 20_000))
        base.append(p50_ns(lambda: raw.decrypt(nonce, ct, b"aad"), 20_000))
    c, b = statistics.median(core), statistics.median(base)
    return {"core_p50_us": round(c / 1000, 2), "raw_aesgcm_p50_us": round(b / 1000, 2),
            "ratio": round(c / b, 1), "target_p50_us": 20}


def bench_rotations(e: Engine, tenants: int, root: Path) -> dict[str, Any]:
    ids = [f"t{i:06d}" for i in range(tenants)]
    core, base = [], []
    db = Rdict(str(root / "raw"), options=_raw_opts())
    sync = WriteOptions()
    sync.sync = True
    value = os.urandom(600)
    k = 0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        e.rotate_many([(t, "L3", "on-demand") for t in ids])
        core.append(tenants / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        wb = WriteBatch(raw_mode=True)
        for _ in range(tenants):
            k += 1
            wb.put(k.to_bytes(8, "big"), value)
        db.write(wb, sync)
        base.append(tenants / (time.perf_counter() - t0))
    db.close()
    c, b = statistics.median(core), statistics.median(base)
    return {"core_rotations_per_s": round(c), "raw_rocksdict_puts_per_s": round(b),
            "ratio_raw_over_core": round(b / c, 1), "batch": tenants, "target_per_s": 10_000}


def _raw_opts() -> Options:
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    return o


def bench_restart(root: Path, key: SigningKey, tenants: int) -> dict[str, Any]:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        e = engine(root, key)
        e.generate_dek("t000007")  # serving: the first request unseals its tenant
        times.append(time.perf_counter() - t0)
        assert len(e.state.tenants) >= tenants
        close(e)
    return {"tenants": tenants, "restart_to_serving_s": round(statistics.median(times), 3),
            "target_s_for_100k": 1.0, "data_dir_mb": round(size_on_disk(root) / 1e6, 1),
            **_rss_of_a_loaded_core(root)}


_RSS_PROBE = """
import sys
from pathlib import Path
from benchmarks.bench_core import engine, R
from events.signing import SigningKey

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
e = engine(Path(sys.argv[1]), SigningKey.generate(R))
e.generate_dek("t000007")
print(before, rss_mb(), len(e.state.tenants))
"""


def _rss_of_a_loaded_core(root: Path) -> dict[str, Any]:
    """Resident memory of a process holding the Core's state of every tenant (the process
    with every module imported, then after loading the state and serving)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(root)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    before, after, n = out.stdout.split()
    return {"rss_mb_process": round(float(after)), "rss_mb_for_state": round(
        float(after) - float(before)), "rss_tenants": int(n), "target_rss_mb_for_100k": 500}


async def bench_relay(e: Engine, tenants: int) -> dict[str, Any]:
    from core_service.relay import Relay
    from events.kafka import KafkaSettings
    from openkcm.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        relay = Relay(e, KafkaSettings(broker.bootstrap))
        await relay._connect()
        while await relay.publish_once():
            pass  # publish what earlier benchmarks logged
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            e.rotate_many([(f"t{i:06d}", "L3", "on-demand") for i in range(tenants)])
            while await relay.publish_once():
                pass
            rates.append(tenants / (time.perf_counter() - t0))
        await relay._close()
    return {"rotations_published_per_s": round(statistics.median(rates)), "batch": tenants,
            "target_per_s": 10_000}


def bench_http(tmp: Path) -> dict[str, Any]:
    import httpx

    from events.signing import publish_public_key
    from openkcm.broker import EmbeddedBroker, free_port
    from openkcm.stack import Service
    from tests.test_core_helpers import publish

    trust = tmp / "trust"
    reg = SigningKey.generate("registry")
    publish_public_key(reg, trust)
    with EmbeddedBroker() as broker:
        svc = Service("core", [
            "core", "--region", R, "--data-dir", str(tmp / "http-core"), "--bootstrap-servers",
            broker.bootstrap, "--trust-dir", str(trust), "--l1", f"local:{tmp / 'kr.json'}",
            "--http", f"127.0.0.1:{free_port()}", "--format", "json"], tmp / "core.log")
        svc.start()
        try:
            env = sign_event(new_envelope(TenantCreated(regions=[R], home_region=R),
                                          producer="registry", seq=1, tenant_id="h"), reg)
            asyncio.run(publish(broker.bootstrap, [(b"h", encode(env))]))
            import socket

            nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]  # no Nagle/delayed-ACK stall
            transport = httpx.HTTPTransport(socket_options=nodelay)
            with httpx.Client(base_url=svc.url or "", timeout=5, transport=transport) as client:
                deadline = time.monotonic() + 20
                while client.post("/v1/tenants/h/deks").status_code != 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                wrapped = client.post("/v1/tenants/h/deks").json()["wrapped"]
                body = {"wrapped": wrapped}
                for _ in range(200):
                    client.post("/v1/tenants/h/deks/unwrap", json=body)
                p50 = p50_ns(lambda: client.post("/v1/tenants/h/deks/unwrap", json=body), 3000)
        finally:
            svc.stop()
    return {"http_unwrap_p50_ms": round(p50 / 1e6, 3), "target_ms": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=20_000, help="tenants for restart/size")
    ap.add_argument("--batch", type=int, default=10_000, help="rotations per batch")
    ap.add_argument("--no-kafka", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "core"
        key, reg = SigningKey.generate(R), SigningKey.generate("registry")
        e = engine(root, key)
        t0 = time.perf_counter()
        create(e, args.tenants, reg)
        results["initialise"] = {"tenants": args.tenants, "tenants_per_s": round(
            args.tenants / (time.perf_counter() - t0))}
        results["lifecycle_ingest"] = bench_ingest(min(args.tenants, 20_000))
        results["dek_unwrap_in_process"] = bench_unwrap(e)
        results["rotations_through_log"] = bench_rotations(e, min(args.batch, args.tenants),
                                                           Path(d))
        if not args.no_kafka:
            results["rotations_end_to_end"] = asyncio.run(
                bench_relay(e, min(args.batch, args.tenants)))
        close(e)
        results["restart"] = bench_restart(root, key, args.tenants)
        if not args.no_kafka:
            results["dek_unwrap_over_http"] = bench_http(Path(d))
    report("core", results)


if __name__ == "__main__":
    main()
