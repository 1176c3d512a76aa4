"""Tier 1 of ACD-402, partition, on real processes: the broker, the Registry and a Core as
subprocesses, the Core's Kafka traffic through a Tansu proxy and its Registry traffic through a
TCP forwarder that the test cuts; real RocksDB, crypto and signatures.

- The Core's Kafka and Registry links cut for several rotation periods (`--l3-period 2s`):
  rotations continue on schedule, L4 keeps answering, creates and deletes made at the Registry
  meanwhile arrive in order after the heal (the consumer recovers from the dropped link
  without a restart), and drift injected during the partition is repaired and reported in
  `/v1/status`:
  a "ghost" TenantCreated the Registry's store never saw (published straight to the lifecycle
  topic, signed with the Registry's own key) gets its purge scheduled after the grace, and a
  tenant whose TenantCreated the Core never received (its stored offsets moved past it) is
  initialised by reconciliation.
- The Registry SIGSTOPped: the same, with the ghost applied while the Registry is frozen in
  place and repaired when it answers again.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from core_service.clock import parse_ts
from core_service.log import LIFECYCLE, EventLog, event_of
from core_service.state import replay
from events import topics
from events.kafka import DEFAULT_PARTITIONS, partition_for
from events.models import TenantCreated
from events.signing import load_or_create_signing_key
from openkcm.links import KafkaLink, TcpLink
from openkcm.stack import Service, Stack
from registry_service.client import RegistryClient
from tests.test_core_helpers import (
    R1,
    R2,
    Lifecycle,
    core_service,
    keys,
    new_dek,
    publish_events,
    read_topic,
    status,
    unwrapped,
    wait_until,
)

PERIOD = 2.0  # --l3-period
FIGURES: dict[str, Any] = {}




def tenant_status(url: str, tenant: str) -> str | None:
    r = httpx.get(f"{url}/v1/tenants/{tenant}/keys", timeout=5)
    return r.json()["status"] if r.status_code == 200 else None




def l4_round(http: httpx.Client, url: str, tenant: str, made: list[tuple[str, str]],
             latencies: list[float]) -> None:
    """One DEK generated and unwrapped over HTTP (one kept-alive connection); records the DEK
    and the latency of each call."""
    for _ in range(2):
        t0 = time.perf_counter()
        r = http.post(f"{url}/v1/tenants/{tenant}/deks")
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
        plaintext, wrapped = r.json()["plaintext"], r.json()["wrapped"]
        t0 = time.perf_counter()
        r = http.post(f"{url}/v1/tenants/{tenant}/deks/unwrap", json={"wrapped": wrapped})
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200 and r.json()["plaintext"] == plaintext, r.text
    made.append((plaintext, wrapped))


def ms(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2), "calls": len(ordered)}


def registry_seq(url: str) -> int:
    health = httpx.get(f"{url}/healthz", timeout=5).json()
    return int(health["store_seq"])


def registry_published(url: str) -> bool:
    health = httpx.get(f"{url}/healthz", timeout=5).json()
    return health["relay_seq"] == health["store_seq"] and health["kafka"] == "connected"


def ghost_id(avoid: int, prefix: str = "ghost") -> str:
    """A tenant id whose lifecycle partition differs from `avoid`."""
    for i in range(100):
        tid = f"{prefix}-{i}"
        if partition_for(tid.encode(), DEFAULT_PARTITIONS) != avoid:
            return tid
    raise AssertionError("no id found")


def publish_ghost(bootstrap: str, registry_dir: Path, tenant_id: str, seq: int) -> None:
    """A TenantCreated signed with the Registry's own key that its store never saw, straight
    to `kcm.registry.lifecycle`. `seq` is the Registry's current store seq: not a replay on
    the ghost's partition (the event with that seq went to another one) and below every seq
    the Registry will publish later."""
    key = load_or_create_signing_key(registry_dir, "registry")
    env = Lifecycle(key, seq - 1).envelope(TenantCreated(regions=[R1], home_region=R1),
                                           tenant_id)
    asyncio.run(publish_events(bootstrap, [env], key))


def rotation_lateness(url: str, tenant: str, start: float, end: float) -> list[float]:
    """Seconds each scheduled L3 rotation in [start, end] came after its due time."""
    l3 = keys(url, tenant)["versions"]["L3"]
    out = []
    for prev, cur in zip(l3, l3[1:], strict=False):
        at = parse_ts(cur["created_at"])
        if start <= at <= end and cur["trigger"] == "scheduled":
            out.append(at - (parse_ts(prev["created_at"]) + PERIOD))
    return out


def skip_past(core: Service, data_dir: Path, bootstrap: str, tenant: str) -> None:
    """With the Core stopped, store its lifecycle offsets past `tenant`'s TenantCreated (with
    the Core's own log API), so the Core never receives it."""
    records = [r for r in asyncio.run(read_topic(bootstrap, topics.LIFECYCLE))
               if r.key == tenant.encode()]
    assert len(records) == 1 and json.loads(records[0].value)["type"] == "TenantCreated"
    rec = records[0]
    assert not core.alive()
    log = EventLog(data_dir / "log")
    try:
        meta = log.meta.copy()
        nxt, hwm = meta.offsets.get(str(rec.partition), [0, 0])
        assert nxt == rec.offset, "the Core had consumed everything before it"
        meta.offsets[str(rec.partition)] = [rec.offset + 1, max(hwm, rec.offset + 1)]
        log.insert_events([], {}, meta)
    finally:
        log.close()


def lifecycle_in_log(data_dir: Path) -> list[dict[str, Any]]:
    log = EventLog(data_dir / "log", read_only=True)
    try:
        return [event_of(v) for _, v in log.iter_events() if v[:1] == LIFECYCLE]
    finally:
        log.close()


# --- the Core's Kafka and Registry links cut -------------------------------------------


def test_partition_links_cut_rotation_and_l4_continue_backlog_in_order_drift_repaired(
    tmp_path: Path,
) -> None:
    with Stack(tmp_path) as stack:
        broker = stack.start_broker()
        registry = stack.registry([R1, R2]).start()
        host, port = (registry.url or "").removeprefix("http://").split(":")
        kafka_link = KafkaLink(broker, log_path=tmp_path / "link.log").start()
        registry_link = TcpLink(host, int(port)).start()
        data_dir = tmp_path / f"core-{R1}"
        core = core_service(tmp_path, R1, kafka_link.bootstrap, stack.trust_dir,
                            registry_url=registry_link.url, l3=f"{int(PERIOD)}s",
                            purge_grace="1h", extra=["--reconcile-interval", "1h"])
        stack.services[core.name] = core
        core.start()
        url = core.url or ""
        client = RegistryClient(registry.url or "")
        served = ["t1", "t2", "t3", "doomed"]
        for t in served:
            client.create(t, [R1, R2], R1)
        wait_until(lambda: status(url)["tenants_served"] == 4, what="4 tenants served")
        wait_until(lambda: (status(url)["last_reconciliation"] or {}).get("outcome") == "clean",
                   what="the startup reconciliation")
        before = [new_dek(url, "t1") for _ in range(3)]
        http = httpx.Client(timeout=5)
        baseline: list[float] = []
        for _ in range(10):
            l4_round(http, url, "t2", [], baseline)

        # The Registry link goes first. The Core restarts while it is cut, after its stored
        # offsets were moved past a TenantCreated it will never receive; its startup pass
        # cannot reach the Registry, so that drift stays.
        registry_link.cut()
        cut_at = time.monotonic()
        core.stop()
        client.create("missed", [R1], R1)
        wait_until(lambda: registry_published(registry.url or ""), what="missed published")
        skip_past(core, data_dir, broker, "missed")
        core.start()
        url = core.url or ""
        wait_until(lambda: (status(url)["last_reconciliation"] or {}).get("outcome")
                   == "unreachable", what="the startup pass finds no Registry")
        assert status(url)["consumer"]["link_up"] is True
        # Then the Kafka link drops under the running process: both links cut.
        kafka_link.cut()
        kafka_cut_at = time.monotonic()
        window_start = parse_ts(status(url)["clock"])

        # Meanwhile at the Registry: creates and deletes, in this order.
        client.create("new1", [R1, R2], R1)
        client.create("new2", [R2, R1], R2)
        client.delete("doomed", reason="offboarded")
        client.create("fleeting", [R1], R1)
        client.delete("fleeting")
        wait_until(lambda: registry_published(registry.url or ""), what="published")
        fleeting_partition = partition_for(b"fleeting", DEFAULT_PARTITIONS)
        ghost = ghost_id(avoid=fleeting_partition)
        seq_at_ghost = registry_seq(registry.url or "")
        publish_ghost(broker, tmp_path / "registry", ghost, seq_at_ghost)

        made: list[tuple[str, str]] = []
        latencies: list[float] = []
        while time.monotonic() - kafka_cut_at < 5 * PERIOD:
            l4_round(http, url, "t2", made, latencies)
            assert all(unwrapped(url, "t1", w) == p for p, w in before)
            time.sleep(0.25)
        during = status(url)
        assert during["registry"]["reachable"] is False
        assert during["tenants_served"] == 4  # nothing of the backlog arrived yet
        assert during["consumer"]["link_up"] is False
        window_end = parse_ts(during["clock"])
        lateness = rotation_lateness(url, "t1", window_start, window_end)
        assert len(lateness) >= int((window_end - window_start) / PERIOD) - 1 >= 3
        assert all(0 <= x <= 1.0 for x in lateness), lateness

        # Heal: the backlog arrives in order, then reconciliation repairs the drift.
        kafka_link.heal()
        registry_link.heal()
        healed = time.monotonic()

        def reconciled() -> dict[str, Any] | None:
            last = status(url)["last_reconciliation"] or {}
            return last if last.get("outcome") == "repaired" else None

        report = wait_until(reconciled, timeout=30, what="reconciliation after the heal")
        FIGURES["heal_to_reconciled_s"] = round(time.monotonic() - healed, 2)
        # the reachability probe and link tracking run on their own period: give them one
        wait_until(lambda: (lambda st: st["registry"]["reachable"] is True
                            and st["consumer"]["link_up"] is True)(status(url)),
                   timeout=15, what="registry reachable and consumer link up")
        assert core.starts == 2  # the consumer recovered from the dropped link in-process
        # The Kafka client's retries every 100 ms are logged once a minute, not 100 times a
        # second.
        assert len(core.log_path.read_text().splitlines()) < 50
        assert report["snapshot_seq"] >= report["applied_seq"] >= seq_at_ghost
        assert report["drift"]["gone"]["tenants"] == [ghost]
        assert report["drift"]["missing"]["tenants"] == ["missed"]
        assert report["drift"]["total"] == 2 and report["refused"] is None
        assert report["repaired"]["purges_scheduled"]["tenants"] == [ghost]
        assert report["repaired"]["initialized"]["tenants"] == ["missed"]
        assert "registry reachable again" in report["trigger"] or "kafka" in report["trigger"]

        # What the Registry did meanwhile is there, with its effects.
        assert keys(url, "new1")["status"] == "active"
        assert keys(url, "new2")["status"] == "standby"
        doomed = keys(url, "doomed")
        assert doomed["status"] == "pending_purge" and doomed["versions"]["L3"]
        assert keys(url, "fleeting")["status"] == "pending_purge"
        missed = keys(url, "missed")
        assert missed["status"] == "active"
        assert [k["version"] for k in missed["versions"]["L2"]] == [1]
        assert missed["versions"]["L3"][0]["trigger"] == "initial"
        # The ghost: initialised from the backlog, then its purge scheduled with the grace.
        g = keys(url, ghost)
        assert g["status"] == "pending_purge" and g["purged_at"] is None
        assert parse_ts(g["purge_at"]) - parse_ts(report["at"]) == 3600
        assert httpx.post(f"{url}/v1/tenants/{ghost}/deks", timeout=5).json()["error"][
            "code"] == "pending_purge"
        # L4 after the heal: every DEK of before and during still unwraps.
        for p, w in made:
            assert unwrapped(url, "t2", w) == p
        for p, w in before:
            assert unwrapped(url, "t1", w) == p
        wait_until(lambda: status(url)["relay"]["backlog"] == 0, what="relay caught up")
        assert status(url)["tenants"].get("purged", 0) == 0
        assert status(url)["consumer"]["dead_letters"] == 0
        # The relay resumed where it was: nothing published twice after the heal.
        published = [json.loads(r.value)["event_id"]
                     for r in asyncio.run(read_topic(broker, topics.CORE_KEYS))]
        assert len(published) == len(set(published))
        # A second pass finds nothing left.
        again = httpx.post(f"{url}/v1/reconcile", timeout=30).json()
        assert again["outcome"] == "clean" and again["drift"]["total"] == 0
        core.stop()

        # The Core's log: the Registry's events of the partition all applied, in the order
        # of each lifecycle partition (= per tenant), e.g. the create of "fleeting" before its
        # delete; a replay gives the stored state.
        lifecycle = lifecycle_in_log(data_dir)
        from_registry = [e for e in lifecycle if e["producer"] == "registry"
                         and e["tenant_id"] != ghost]
        window = [(e["tenant_id"], e["type"]) for e in from_registry
                  if e["tenant_id"] in ("new1", "new2", "fleeting")
                  or (e["tenant_id"], e["type"]) == ("doomed", "TenantDeleted")]
        assert sorted(window) == sorted([
            ("new1", "TenantCreated"), ("new2", "TenantCreated"), ("doomed", "TenantDeleted"),
            ("fleeting", "TenantCreated"), ("fleeting", "TenantDeleted")])
        assert window.index(("fleeting", "TenantCreated")) < window.index(
            ("fleeting", "TenantDeleted"))
        per_partition: dict[int, list[int]] = {}
        for e in from_registry:
            p = partition_for(e["tenant_id"].encode(), DEFAULT_PARTITIONS)
            per_partition.setdefault(p, []).append(e["seq"])
        for seqs in per_partition.values():
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert "missed" not in {e["tenant_id"] for e in lifecycle}
        log = EventLog(data_dir / "log", read_only=True)
        try:
            entries = [event_of(v) for _, v in log.iter_events()]
            assert replay(entries, R1).tenants == log.load_tenants()
            assert sum(e["type"] == "TenantReconciled" for e in entries) == 2
        finally:
            log.close()
        FIGURES["registry_link_cut_s"] = round(healed - cut_at, 1)
        FIGURES["kafka_link_cut_s"] = round(healed - kafka_cut_at, 1)
        FIGURES["l4_http_before"] = ms(baseline)
        FIGURES["l4_http_during_partition"] = ms(latencies)
        FIGURES["rotation_lateness_max_s"] = round(max(lateness), 3)
        http.close()
        registry_link.close()
        kafka_link.cut()
        print(f"\npartition figures: {json.dumps(FIGURES)}")


# --- the Registry SIGSTOPped -----------------------------------------------------------


def test_registry_sigstopped_core_carries_on_and_repairs_drift_when_it_answers(
    tmp_path: Path,
) -> None:
    with Stack(tmp_path) as stack:
        broker = stack.start_broker()
        registry = stack.registry([R1, R2]).start()
        core = core_service(tmp_path, R1, broker, stack.trust_dir,
                            registry_url=registry.url or "", l3=f"{int(PERIOD)}s",
                            purge_grace="1h", extra=["--reconcile-interval", "1h"])
        stack.services[core.name] = core
        core.start()
        url = core.url or ""
        client = RegistryClient(registry.url or "")
        for t in ("s1", "s2"):
            client.create(t, [R1], R1)
        wait_until(lambda: status(url)["tenants_served"] == 2, what="served")
        wait_until(lambda: registry_published(registry.url or ""), what="published")
        last_partition = partition_for(b"s2", DEFAULT_PARTITIONS)
        ghost = ghost_id(avoid=last_partition, prefix="stopped-ghost")
        seq = registry_seq(registry.url or "")

        registry.pause()  # SIGSTOP: there, but silent
        stopped = time.monotonic()
        publish_ghost(broker, tmp_path / "registry", ghost, seq)
        wait_until(lambda: tenant_status(url, ghost) == "active", what="ghost applied")
        made: list[tuple[str, str]] = []
        latencies: list[float] = []
        window_start = parse_ts(status(url)["clock"])
        with httpx.Client(timeout=5) as http:
            while time.monotonic() - stopped < 4 * PERIOD:
                l4_round(http, url, "s1", made, latencies)
                time.sleep(0.25)
        FIGURES["l4_http_registry_stopped"] = ms(latencies)
        during = status(url)
        assert during["registry"]["reachable"] is False
        assert during["registry"]["state"] == "unreachable"
        lateness = rotation_lateness(url, "s1", window_start, parse_ts(during["clock"]))
        assert len(lateness) >= 2 and all(0 <= x <= 1.0 for x in lateness), lateness
        assert keys(url, ghost)["status"] == "active"  # nothing repaired without a snapshot

        registry.resume()
        resumed = time.monotonic()

        def reconciled() -> dict[str, Any] | None:
            last = status(url)["last_reconciliation"] or {}
            return last if last.get("outcome") == "repaired" else None

        report = wait_until(reconciled, timeout=30, what="reconciliation after SIGCONT")
        FIGURES["sigcont_to_reconciled_s"] = round(time.monotonic() - resumed, 2)
        assert "registry reachable again" in report["trigger"]
        assert report["repaired"]["purges_scheduled"]["tenants"] == [ghost]
        assert report["snapshot_seq"] == seq == report["applied_seq"]
        assert keys(url, ghost)["status"] == "pending_purge"
        assert status(url)["registry"]["state"] == "ok"
        for p, w in made:
            assert unwrapped(url, "s1", w) == p
        assert keys(url, "s2")["status"] == "active"
        core.stop()
        print(f"\nsigstop figures: {json.dumps(FIGURES)}")
