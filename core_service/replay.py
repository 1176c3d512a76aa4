"""Verifying a Core's data dir: recompute its state from its own log, and compare its own
timeline with what is on `kcm.core.keys`. Read-only: safe on the data dir of a running Core.

Differences reported:
- `log-gap`: log positions do not run 1..N without gaps, or the head disagrees;
- `seq-gap`: the Core's own events do not count 1..n;
- `chain`: an own event fails authentication (hash chain or checkpoint signature);
- `state`: the stored projection of a tenant differs from the fold of the log (field by field);
- `unpublished`: an own event the relay recorded as published is missing from the topic;
- `foreign`: an event on the topic signed with this data dir's key that its log does not have.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core_service.log import OWN, EventLog, event_of
from core_service.replicated import read_key_log
from core_service.state import TenantState, replay
from events import topics
from events.fastpath import read_raw
from events.kafka import KafkaSettings, partition_for
from events.signing import ChainVerifier, TrustStore, load_or_create_signing_key

Progress = Callable[[int, int], None]


@dataclass
class Difference:
    kind: str
    detail: str
    tenant_id: str | None = None


@dataclass
class VerifyReport:
    region: str
    data_dir: str
    log_entries: int = 0
    own_events: int = 0
    tenants: int = 0
    events_per_second: float = 0.0
    topic_events_checked: int | None = None
    differences: list[Difference] = field(default_factory=list)
    imported_event_ids: set[str] = field(default_factory=set, repr=False)
    """Timeline events of earlier incarnations or other regions this log imported."""

    @property
    def clean(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "clean": self.clean}
        out["imported_events"] = len(out.pop("imported_event_ids"))
        return out


def region_of(data_dir: Path) -> str:
    """A Core's region, from the signing key it keeps in its data dir."""
    keys = sorted(data_dir.glob("signing-*.pem"))
    if len(keys) != 1:
        raise ValueError(f"{data_dir} is not a Core data dir (no single signing-<region>.pem)")
    return keys[0].name[len("signing-") : -len(".pem")]


def _tenant_diff(stored: TenantState, folded: TenantState) -> str:
    names = getattr(stored, "_fields", None) or list(getattr(stored, "__dataclass_fields__", ()))
    changed = [name for name in names if getattr(stored, name) != getattr(folded, name)]
    return "fields differ: " + ", ".join(changed)


def verify_local(
    data_dir: Path, trust: TrustStore | None = None, progress: Progress | None = None
) -> tuple[VerifyReport, list[dict[str, Any]], int]:
    """Recompute the state from the log and compare. Also returns the own events (for the
    topic comparison) and the relay's published position."""
    region = region_of(data_dir)
    report = VerifyReport(region, str(data_dir))
    log = EventLog(data_dir / "log", read_only=True)
    started = time.perf_counter()
    try:
        events: list[dict[str, Any]] = []
        own: list[dict[str, Any]] = []
        imported: set[str] = set()
        verifier = ChainVerifier(trust) if trust is not None else None
        expected = 1
        parts = log_partitions(log)
        total = log.meta.pos
        for pos, entry in log.iter_events():
            if pos != expected:
                report.differences.append(Difference("log-gap", f"position {expected} missing"))
                expected = pos
            expected += 1
            event = event_of(entry)
            events.append(event)
            if event.get("type") == "TimelineImported":  # another incarnation's event
                imported.add(str(event["payload"]["event"]["event_id"]))
            if entry[:1] == OWN:
                own.append({**event, "_pos": pos})
                if verifier is not None:
                    raw = read_raw(entry[1:])
                    chain = partition_for(str(event["tenant_id"]).encode(), parts)
                    _, bad = verifier.feed(chain, raw)
                    for ev, reason in bad:
                        report.differences.append(
                            Difference("chain", f"{ev.event_id}: {reason}", ev.tenant_id))
            if progress is not None and pos % 10_000 == 0:
                progress(pos, total)
        if verifier is not None:
            for p in range(parts):
                if verifier.pending(p):
                    report.differences.append(Difference(
                        "chain", f"{verifier.pending(p)} own events on partition {p} are not "
                                 "covered by a signed checkpoint"))
        report.log_entries = len(events)
        if report.log_entries != log.meta.pos:
            report.differences.append(Difference(
                "log-gap", f"head says {log.meta.pos} entries, the log holds {len(events)}"))
        seqs = [int(e["seq"]) for e in own]
        if seqs != list(range(1, len(seqs) + 1)):
            report.differences.append(Difference("seq-gap", "own event seqs are not 1..n"))
        if seqs and seqs[-1] != log.meta.seq:
            report.differences.append(Difference(
                "seq-gap", f"head says seq {log.meta.seq}, last own event has {seqs[-1]}"))
        report.own_events = len(own)
        folded = replay(events, region).tenants
        stored = log.load_tenants()
        report.tenants = len(stored)
        for tid in sorted(set(folded) | set(stored)):
            if tid not in stored:
                report.differences.append(Difference("state", "missing from stored state", tid))
            elif tid not in folded:
                report.differences.append(Difference("state", "stored but not in the log", tid))
            elif stored[tid] != folded[tid]:
                report.differences.append(
                    Difference("state", _tenant_diff(stored[tid], folded[tid]), tid))
        relay_pos = log.relay.pos
        report.imported_event_ids = imported
    finally:
        log.close()
    elapsed = time.perf_counter() - started
    report.events_per_second = round(report.log_entries / elapsed) if elapsed > 0 else 0.0
    return report, own, relay_pos


def log_partitions(log: EventLog) -> int:
    """How many `kcm.core.keys` partitions the Core chained over (from its head)."""
    heads = [int(p) for p in log.meta.heads] if log.meta.heads else []
    from events.kafka import DEFAULT_PARTITIONS

    return max([DEFAULT_PARTITIONS, *(h + 1 for h in heads)])


_TIMELINE_TYPES = frozenset(
    {"TenantInitialized", "KeyRotated", "TenantPurgeScheduled", "TenantPurgeCancelled",
     "TenantPurged", "TenantHydrated", "TenantL1Bound"}
)


async def verify_against_topics(
    report: VerifyReport,
    own: list[dict[str, Any]],
    relay_pos: int,
    settings: KafkaSettings,
    trust: TrustStore,
) -> None:
    """Compare the region's own timeline with `kcm.core.keys`."""
    logs, stats = await read_key_log(settings, trust)
    on_topic: dict[str, dict[str, Any]] = {}
    for tenant_log in logs.values():
        for event in tenant_log.events:
            if event.get("producer") == report.region:
                on_topic[str(event["event_id"])] = event
    report.topic_events_checked = stats.events
    local_ids = {str(e["event_id"]) for e in own} | report.imported_event_ids
    for event in own:
        if event["type"] in _TIMELINE_TYPES and event["_pos"] <= relay_pos:
            if str(event["event_id"]) not in on_topic:
                report.differences.append(Difference(
                    "unpublished", f"{event['type']} {event['event_id']} (log position "
                                   f"{event['_pos']}) is not on {topics.CORE_KEYS}",
                    event.get("tenant_id")))
    # Only events signed with this data dir's own key must be in its log: an earlier
    # incarnation of the region (a lost disk, rebuilt) signed with a key that is gone.
    own_key = load_or_create_signing_key(Path(report.data_dir), report.region).key_id
    for eid, event in on_topic.items():
        if eid not in local_ids and (event.get("auth") or {}).get("key_id") == own_key:
            report.differences.append(Difference(
                "foreign", f"{event['type']} {eid} on {topics.CORE_KEYS} is not in the local log",
                event.get("tenant_id")))
