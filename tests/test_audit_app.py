"""The audit app as a real subprocess on a real broker: normal operation gives no findings,
each kind of bad event put on the topics gives exactly its finding once, and a SIGKILL
mid-stream followed by a restart ends with the same findings and tables as an uninterrupted
run, without re-reading the topics from the start."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from events import models as m
from events.envelope import Envelope, encode, new_envelope, partition_key
from events.kafka import KafkaSettings, ensure_topics, make_producer, partition_for
from events.signing import (
    ChainSigner,
    SigningKey,
    load_or_create_signing_key,
    publish_public_key,
    sign_event,
)
from events.topics import CORE_KEYS, LIFECYCLE
from projections import views

ROOT = Path(__file__).resolve().parent.parent
OPENKCM = [sys.executable, "-m", "openkcm.cli"]
EU, WEST, US = "eu-central-1", "eu-west-1", "us-east-1"
PARTITIONS = 6
NOW = datetime.now(UTC)
VOLATILE = {"unchecked", "suspects", "purges", "partition", "applied", "recent_ids"}

Item = tuple[str, m.Payload, str, str | None, datetime]
"""(topic, payload, producer, tenant, occurred_at)"""


@dataclass
class Publisher:
    """Signs like the real producers: one hash chain per (topic, partition, producer), a
    signed checkpoint at the end of every batch per chain; operator events stand alone."""

    bootstrap: str
    keys: dict[str, SigningKey]
    signers: dict[str, ChainSigner] = field(default_factory=dict)
    seq: Counter[str] = field(default_factory=Counter)

    def envelope(self, item: Item) -> Envelope:
        _topic, payload, producer, tenant, at = item
        self.seq[producer] += 1
        return new_envelope(payload, producer=producer, seq=self.seq[producer],
                            tenant_id=tenant, occurred_at=at)

    def sign_batch(self, items: list[Item]) -> list[tuple[str, int, bytes, bytes]]:
        envs = [(item[0], self.envelope(item)) for item in items]
        placed = [(t, e, partition_for(partition_key(e), PARTITIONS)) for t, e in envs]
        last: dict[tuple[str, int, str], int] = {}
        for i, (topic, env, part) in enumerate(placed):
            last[(topic, part, env.producer)] = i
        out = []
        for i, (topic, env, part) in enumerate(placed):
            if env.producer == "operator":
                signed = sign_event(env, self.keys["operator"])
            else:
                signer = self.signers.setdefault(env.producer, ChainSigner(self.keys[env.producer]))
                chain = (topic, part)
                signed = signer.sign(env, chain, checkpoint=last[(topic, part, env.producer)] == i)
            out.append((topic, part, partition_key(env), encode(signed)))
        return out

    async def send_raw(self, records: list[tuple[str, int, bytes, bytes]]) -> None:
        producer = make_producer(KafkaSettings(self.bootstrap))
        await producer.start()
        try:
            futures = [await producer.send(t, value=v, key=k, partition=p)
                       for t, p, k, v in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    def publish(self, items: list[Item]) -> None:
        asyncio.run(self.send_raw(self.sign_batch(items)))


def kv(layer: str, version: int, epoch: int, at: datetime) -> m.KeyVersion:
    return m.KeyVersion(layer=layer, version=version, epoch=epoch,  # type: ignore[arg-type]
                        key_id=f"e{epoch}v{version}", kcv="0a1b2c3d4e5f",
                        parent_key_id=None if layer == "L2" else f"e{epoch}v1", created_at=at)


def tenant_history(tenant: str, start: datetime, l3_every: timedelta, until: datetime,
                   region: str = EU, regions: tuple[str, ...] = (EU, WEST)) -> list[Item]:
    """TenantCreated, TenantInitialized and scheduled rotations as a Core makes them."""
    items: list[Item] = [
        (LIFECYCLE, m.TenantCreated(regions=list(regions), home_region=region), "registry",
         tenant, start),
        (CORE_KEYS, m.TenantInitialized(region=region, epoch=1, l1_ref="local:default",
                                        l2=kv("L2", 1, 1, start + timedelta(seconds=1)),
                                        l3=kv("L3", 1, 1, start + timedelta(seconds=1))),
         region, tenant, start + timedelta(seconds=1)),
    ]
    l3, l2, t = 1, 1, start
    while t + l3_every < until:
        t += l3_every
        l3 += 1
        if l3 % 6 == 0:
            l2 += 1
            items.append((CORE_KEYS, m.KeyRotated(region=region, epoch=1,
                                                  key=kv("L2", l2, 1, t), trigger="scheduled"),
                          region, tenant, t))
        items.append((CORE_KEYS, m.KeyRotated(region=region, epoch=1,
                                              key=kv("L3", l3, 1, t), trigger="scheduled"),
                      region, tenant, t))
    return items


def rotation(tenant: str, layer: str, version: int, at: datetime, region: str = EU,
             epoch: int = 1) -> Item:
    return (CORE_KEYS, m.KeyRotated(region=region, epoch=epoch, key=kv(layer, version, epoch, at),
                                    trigger="on-demand"), region, tenant, at)


@dataclass
class AuditProcess:
    proc: subprocess.Popen[str]
    url: str
    data_dir: Path

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=10).json()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def findings(self) -> list[dict[str, Any]]:
        return list(self.get("/v1/audit/findings")["findings"])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def start_audit(bootstrap: str, data_dir: Path, trust_dir: Path, app_id: str,
                *extra: str) -> AuditProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(data_dir.parent / f"{data_dir.name}.log", "a")  # noqa: SIM115
    proc = subprocess.Popen(
        [*OPENKCM, "audit", "--bootstrap-servers", bootstrap, "--data-dir", str(data_dir),
         "--trust-dir", str(trust_dir), "--http", "127.0.0.1:0", "--app-id", app_id,
         "--tick-interval", "1s", "--settle", "3s", "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    audit = AuditProcess(proc, url, data_dir)
    try:
        assert url.startswith("http://"), f"audit did not announce its URL: {url!r}"
        wait_for(lambda: httpx.get(url + "/healthz", timeout=5).status_code == 200, 60, "ready")
    except BaseException:
        audit.kill()
        raise
    return audit


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def settle(audit: AuditProcess, applied: int, quiet: float = 5.0, timeout: float = 60) -> None:
    """Wait until `applied` events were folded and the findings stop changing."""
    wait_for(lambda: audit.metric("audit_events_applied_total") >= applied, timeout,
             f"{applied} events applied")
    last, since = None, time.monotonic()
    while time.monotonic() - since < quiet:
        now = audit.get("/v1/audit/summary")["findings_total"]
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.3)


@pytest.fixture
def keys(tmp_path: Path, trust_dir: Path, registry_key: SigningKey) -> dict[str, SigningKey]:
    out = {r: load_or_create_signing_key(tmp_path / "keys", r, trust_dir) for r in (EU, WEST, US)}
    operator = SigningKey.generate("operator")
    publish_public_key(operator, trust_dir)
    return {**out, "registry": registry_key, "operator": operator}


@pytest.fixture
def broker(fresh_broker: Any) -> Iterator[str]:
    asyncio.run(ensure_topics(KafkaSettings(fresh_broker.bootstrap), [LIFECYCLE, CORE_KEYS]))
    yield fresh_broker.bootstrap


def tenant_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


def test_normal_operation_over_many_rotations_has_zero_findings(
    broker: str, keys: dict[str, SigningKey], trust_dir: Path, tmp_path: Path
) -> None:
    pub = Publisher(broker, keys)
    start = NOW - timedelta(days=400)
    items: list[Item] = []
    for i, tenant in enumerate(tenant_ids("ok", 300)):
        region = (EU, WEST)[i % 2]
        regions = (region, EU if region == WEST else WEST)
        items += tenant_history(tenant, start + timedelta(minutes=i), timedelta(days=30),
                                NOW - timedelta(days=1), region=region, regions=regions)
    items.sort(key=lambda it: it[4])
    for chunk in range(0, len(items), 500):  # one publish batch per 500 events, like a relay
        pub.publish(items[chunk:chunk + 500])
    audit = start_audit(broker, tmp_path / "audit", trust_dir, "audit-ok")
    try:
        t0 = time.monotonic()
        wait_for(lambda: audit.metric("audit_events_applied_total") >= len(items), 120,
                 "all events applied")
        elapsed = time.monotonic() - t0
        print(f"\naudit projection: {len(items)} events in {elapsed:.2f}s = "
              f"{len(items) / elapsed:.0f} events/s (catch-up, incl. verification)")
        time.sleep(4)  # a few ticks: overdue and settled checks
        assert audit.findings() == []
        summary = audit.get("/v1/audit/summary")
        assert summary["tenants"] == 300 and summary["compliant_share"] == 1.0
        view = audit.get("/v1/audit/tenants/ok-0001")
        assert view["owner_region"] == WEST and view["epoch"] == 1 and view["compliant"]
        assert view["l3_versions"] >= 13 and view["l3"]["key_id"] == f"e1v{view['l3_versions']}"
        assert set(view["next_due"]) == {"L2", "L3"}
        # The report, from the running app and from the data dir, JSON and HTML.
        out_json, out_html = tmp_path / "report.json", tmp_path / "report.html"
        for args in (["--format", "json", "--out", str(out_json), "--url", audit.url],
                     ["--format", "html", "--out", str(out_html), "--data-dir",
                      str(audit.data_dir)]):
            done = subprocess.run([*OPENKCM, "audit", "report", *args], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        page = out_html.read_text()
        assert "<svg" in page and "<polyline" in page and "http" not in page.split("<svg")[0]
        assert '"compliant_share": 1.0' in out_json.read_text()
    finally:
        audit.stop()


def bad_stream(prefix: str, keys: dict[str, SigningKey]) -> tuple[list[list[Item]], dict[str, str]]:
    """Good histories for a dozen tenants, then one kind of bad event per tenant.
    Returns publish batches and the expected finding kind per tenant."""
    t = {k: f"{prefix}-{k}" for k in ("gap", "repeat", "region", "stale", "overdue", "purge",
                                      "deleted", "fine", "restored")}
    start = NOW - timedelta(days=20)
    base: list[Item] = []
    for name, tenant in t.items():
        if name == "overdue":
            base += tenant_history(tenant, NOW - timedelta(days=100), timedelta(days=200), NOW)
        else:
            base += tenant_history(tenant, start, timedelta(days=5), NOW - timedelta(days=1))
    h = NOW - timedelta(hours=2)
    bad: list[Item] = [
        rotation(t["gap"], "L3", 6, h),  # history ends at v4: v5 skipped
        rotation(t["repeat"], "L3", 4, h),  # v4 again, another event
        rotation(t["region"], "L3", 5, h, region=US),  # outside the allow-list
        (LIFECYCLE, m.RegionFailover(from_region=EU, to_region=WEST, epoch=2,
                                     tenants=[t["stale"]]), "operator", None, h),
        (CORE_KEYS, m.TenantHydrated(region=WEST, epoch=2, from_region=EU, l2_versions=1,
                                     l3_versions=4, cause_event_id="failover"),
         WEST, t["stale"], h + timedelta(minutes=1)),
        rotation(t["stale"], "L3", 5, h + timedelta(minutes=2), region=WEST, epoch=2),
        rotation(t["stale"], "L3", 5, h + timedelta(minutes=3), region=EU, epoch=1),  # stale
        (CORE_KEYS, m.TenantPurged(region=EU, epoch=1, destroyed=["e1v1"],
                                   destroyed_layers=["L3"]), EU, t["purge"], h),
        (LIFECYCLE, m.TenantDeleted(), "registry", t["deleted"], h),
        rotation(t["deleted"], "L3", 5, h + timedelta(hours=1)),
        (LIFECYCLE, m.TenantDeleted(), "registry", t["restored"], h),
        (LIFECYCLE, m.TenantRestored(), "registry", t["restored"], h + timedelta(minutes=10)),
        rotation(t["restored"], "L3", 5, h + timedelta(hours=1)),
        rotation(t["fine"], "L3", 5, h),
    ]
    expected = {t["gap"]: "version_gap", t["repeat"]: "version_repeat",
                t["region"]: "region_not_allowed", t["stale"]: "stale_epoch",
                t["overdue"]: "rotation_overdue", t["purge"]: "purge_without_delete",
                t["deleted"]: "rotated_after_delete"}
    return [base, bad], expected


def forged_records(prefix: str, pub: Publisher, tmp_path: Path) -> tuple[list[Any], dict[str, str]]:
    """Hand-built records that fail authentication or break a chain, plus garbage."""
    wrong = SigningKey.generate(EU)  # right owner name, key not in the trust dir
    tenant_wrong, tenant_chain = f"{prefix}-wrongkey", f"{prefix}-chain"
    at = NOW - timedelta(hours=1)
    env = pub.envelope(rotation(tenant_wrong, "L3", 2, at))
    part = partition_for(tenant_wrong.encode(), PARTITIONS)
    records = [(CORE_KEYS, part, tenant_wrong.encode(), encode(sign_event(env, wrong)))]
    # Broken chain: the region's chain skips an event (signed, never published).
    signer = pub.signers.setdefault(EU, ChainSigner(pub.keys[EU]))
    part = partition_for(tenant_chain.encode(), PARTITIONS)
    missing = pub.envelope(rotation(tenant_chain, "L3", 5, at))
    signer.sign(missing, (CORE_KEYS, part), checkpoint=True)
    after = pub.envelope(rotation(tenant_chain, "L3", 5, at + timedelta(minutes=1)))
    records.append((CORE_KEYS, part, tenant_chain.encode(),
                    encode(signer.sign(after, (CORE_KEYS, part), checkpoint=True))))
    records.append((CORE_KEYS, 0, b"garbage", b"{not an event"))
    return records, {tenant_wrong: "auth_failure", tenant_chain: "broken_chain"}


def test_each_bad_event_gives_exactly_its_finding_once(
    broker: str, keys: dict[str, SigningKey], trust_dir: Path, tmp_path: Path
) -> None:
    pub = Publisher(broker, keys)
    batches, expected = bad_stream("bad", keys)
    pub.publish(batches[0])
    chain_base = tenant_history("bad-chain", NOW - timedelta(days=20), timedelta(days=5),
                                NOW - timedelta(days=1))
    wrong_base = tenant_history("bad-wrongkey", NOW - timedelta(days=20), timedelta(days=5),
                                NOW - timedelta(days=1))
    pub.publish(chain_base + wrong_base)
    audit = start_audit(broker, tmp_path / "audit", trust_dir, "audit-bad")
    try:
        pub.publish(batches[1])
        forged, more = forged_records("bad", pub, tmp_path)
        asyncio.run(pub.send_raw(forged))
        expected |= more
        applied = sum(len(b) for b in batches) + len(chain_base) + len(wrong_base) + 1
        settle(audit, applied - 1)
        findings = audit.findings()
        got = Counter((f["tenant_id"], f["kind"]) for f in findings)
        want = Counter(expected.items()) + Counter({(None, "invalid_event"): 1})
        assert got == want, findings
        by_kind = audit.get("/v1/audit/summary")["findings_by_kind"]
        assert sum(by_kind.values()) == len(want)
        for f in findings:
            assert f["event_id"] and f["reason"] and f["time"]
        stale = audit.get("/v1/audit/tenants/bad-stale")
        assert stale["owner_region"] == WEST and stale["epoch"] == 2
        assert stale["l3"]["key_id"] == "e2v5"  # the stale rotation never replaced it
        assert audit.get("/v1/audit/tenants/bad-fine")["compliant"] is True
        since = audit.get("/v1/audit/findings?since=" + (NOW + timedelta(days=1)).isoformat()
                          .replace("+00:00", "Z"))
        assert since["count"] == 0
        assert httpx.get(audit.url + "/v1/audit/findings?since=nope").status_code == 422
        assert httpx.get(audit.url + "/v1/audit/tenants/nobody").json()["error"]["code"] == (
            "not_found")
    finally:
        audit.stop()


def tables(data_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tenants, findings = views.split(views.read_store(data_dir))
    stable = {t: {k: v for k, v in s.items() if k not in VOLATILE} for t, s in tenants.items()}
    return stable, findings


def test_sigkill_mid_stream_then_restart_equals_uninterrupted_run(
    broker: str, keys: dict[str, SigningKey], trust_dir: Path, tmp_path: Path
) -> None:
    pub = Publisher(broker, keys)
    items: list[Item] = []
    # Rotations every 2 days over 60 days: whatever prefix of the stream has been read, no
    # timeline looks overdue (the stream stands for events published as they happen).
    for tenant in tenant_ids("kill", 60):
        items += tenant_history(tenant, NOW - timedelta(days=60), timedelta(days=2),
                                NOW - timedelta(days=1))
    items.sort(key=lambda it: it[4])
    last = max(it[1].key.version for it in items  # type: ignore[attr-defined]
               if it[3] == "kill-0001" and isinstance(it[1], m.KeyRotated)
               and it[1].key.layer == "L3")
    h = NOW - timedelta(hours=1)
    items += [rotation("kill-0001", "L3", last + 10, h), rotation("kill-0002", "L3", last, h),
              rotation("kill-0003", "L3", last + 1, h, region=US)]
    batches = [pub.sign_batch(items[i:i + 150]) for i in range(0, len(items), 150)]
    total = sum(len(b) for b in batches)
    # Run B: live, killed mid-stream, restarted.
    run_b = start_audit(broker, tmp_path / "b", trust_dir, "audit-b")
    half = len(batches) // 2
    for batch in batches[:half]:
        asyncio.run(pub.send_raw(batch))
    wait_for(lambda: run_b.metric("audit_events_applied_total") >= total // 4, 60, "progress")
    time.sleep(2.5)  # at least one offset commit (every second), as in any long-running app
    run_b.kill()
    for batch in batches[half:]:
        asyncio.run(pub.send_raw(batch))
    t0 = time.monotonic()
    run_b = start_audit(broker, tmp_path / "b", trust_dir, "audit-b")
    print(f"\nrestart after SIGKILL: ready in {time.monotonic() - t0:.1f}s")
    # Run A: the whole stream in one uninterrupted run.
    run_a = start_audit(broker, tmp_path / "a", trust_dir, "audit-a")
    try:
        settle(run_a, total)
        wait_for(lambda: run_b.get("/v1/audit/summary")["findings_total"]
                 == run_a.get("/v1/audit/summary")["findings_total"], 60, "run B caught up")
        settle(run_b, 1)
        a_tenants, a_findings = tables(run_a.data_dir)
        b_tenants, b_findings = tables(run_b.data_dir)
        assert len(a_tenants) == 60
        assert sorted(f["kind"] for f in a_findings) == [
            "region_not_allowed", "version_gap", "version_repeat"]
        assert b_findings == a_findings
        assert b_tenants == a_tenants
        read_after_restart = run_b.metric("audit_records_total")
        assert 0 < read_after_restart <= total - sum(len(b) for b in batches[:half]) + 50, (
            "the restarted app re-read the topics from the start")
    finally:
        run_a.stop()
        run_b.stop()
