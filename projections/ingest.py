"""From records to audited events: decoding, chain verification, chain continuity.

`Ingest.feed(record)` takes one Kafka record of a source topic and returns what became
decidable: events now authenticated (in chain order, ready for the fold), findings for what
failed (undecodable, unauthenticated, broken chain) and the records that may be acknowledged.
Unsigned events wait for their chain's checkpoint; their records are not acknowledged until
then, so the committed offset never passes an event that was not yet verified and a restart
re-reads (and re-verifies) them. Chain heads live in the caller's table (`chains`), so the
check that a verified run continues from the last verified event survives restarts.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from events.envelope import DecodeError, Envelope, decode
from events.fastpath import RawEvent, read_raw
from events.models import KEY_TIMELINE_TYPES, LIFECYCLE_TYPES
from events.signing import ChainVerifier, TrustStore, event_digest
from events.topics import CORE_KEYS, LIFECYCLE
from projections.rules import Event, Finding, iso, parse_time

EXPECTED = {LIFECYCLE: LIFECYCLE_TYPES, CORE_KEYS: KEY_TIMELINE_TYPES}


@dataclass
class Record:
    """One Kafka record and an opaque reference the caller acknowledges (a faust event)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    timestamp: float
    ref: Any = None


@dataclass
class Received:
    """A decoded record as the chain verifier sees it (it reads producer, auth, body)."""

    record: Record
    event: RawEvent | Envelope

    @property
    def producer(self) -> str:
        return self.event.producer

    @property
    def auth(self) -> Any:
        return self.event.auth

    def body(self) -> bytes:
        return self.event.body()

    @property
    def event_id(self) -> str:
        return str(self.event.event_id)

    @property
    def tenant_id(self) -> str | None:
        return self.event.tenant_id


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    ack: list[Record] = field(default_factory=list)
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Chain records to store (key -> {head, offset}), after the events are applied."""


def chain_key(topic: str, partition: int, producer: str) -> str:
    return f"c:{topic}:{partition}:{producer}"


@dataclass
class Ingest:
    trust: TrustStore
    chains: MutableMapping[str, dict[str, Any]]
    """Chain records by key: {"head": hex digest, "offset": last verified offset}."""
    verifier: ChainVerifier = field(init=False)

    def __post_init__(self) -> None:
        self.verifier = ChainVerifier(self.trust)

    def feed(self, record: Record) -> Outcome:
        out = Outcome()
        try:
            ev: RawEvent | Envelope = _read(record.value)
        except DecodeError as exc:
            out.findings.append(_undecodable(record, str(exc)))
            out.ack.append(record)
            return out
        received = Received(record, ev)
        chain = (record.topic, record.partition, received.producer)
        verified, rejected = self.verifier.feed(chain, received)
        for bad, reason in rejected:
            out.findings.append(
                Finding(bad.tenant_id, bad.event_id, "auth_failure", reason,
                        _time_of(bad, record))
            )
            out.ack.append(bad.record)
        if not verified:
            if not rejected and received.auth is not None and received.auth.sig is None:
                return out  # waits for its checkpoint, not acknowledged yet
            return out
        key = chain_key(*chain)
        stored = out.chains.get(key) or self.chains.get(key)
        head = stored["head"] if stored else None
        last_offset = stored["offset"] if stored else -1
        first = True
        for item in verified:
            out.ack.append(item.record)
            digest = event_digest(item).hex()
            if item.record.offset <= last_offset or digest == head:
                continue  # already applied before a restart, or a producer's retry
            prev = item.auth.prev if item.auth is not None else None
            if first and prev is not None and prev != head:
                out.findings.append(
                    Finding(item.tenant_id, item.event_id, "broken_chain",
                            "chain does not continue from the producer's last verified event"
                            + (" (none seen)" if head is None else ""),
                            _time_of(item, record))
                )
            first = False
            head, last_offset = digest, item.record.offset
            event = _to_event(item, out)
            if event is not None:
                out.events.append(event)
        out.chains[key] = {"head": head, "offset": last_offset}
        return out


def _read(value: bytes | None) -> RawEvent | Envelope:
    try:
        return read_raw(value)
    except DecodeError:
        return decode(value)  # older schema versions are upcast here, or fail for good


def _to_event(item: Received, out: Outcome) -> Event | None:
    record = item.record
    try:
        env = item.event.envelope() if isinstance(item.event, RawEvent) else item.event
    except DecodeError as exc:
        out.findings.append(
            Finding(item.tenant_id, item.event_id, "invalid_event", str(exc),
                    _time_of(item, record))
        )
        return None
    if env.type not in EXPECTED.get(record.topic, frozenset({env.type})):
        out.findings.append(
            Finding(env.tenant_id, str(env.event_id), "invalid_event",
                    f"{env.type} does not belong on {record.topic}",
                    iso(env.occurred_at.timestamp()))
        )
        return None
    return Event(
        event_id=str(env.event_id),
        type=env.type,
        tenant_id=env.tenant_id,
        producer=env.producer,
        time=env.occurred_at.timestamp(),
        payload=env.payload.model_dump(mode="json"),
        source=f"{record.topic}/{record.partition}",
        offset=record.offset,
    )


def _time_of(item: Received, record: Record) -> str:
    data = getattr(item.event, "data", None)
    occurred = data.get("occurred_at") if isinstance(data, dict) else None
    if occurred is None and isinstance(item.event, Envelope):
        return iso(item.event.occurred_at.timestamp())
    try:
        return iso(parse_time(str(occurred)))
    except ValueError:
        return iso(record.timestamp)


def _undecodable(record: Record, reason: str) -> Finding:
    tenant, event_id = None, f"{record.topic}:{record.partition}:{record.offset}"
    try:
        data = orjson.loads(record.value or b"")
        if isinstance(data, dict):
            tenant = data.get("tenant_id") if isinstance(data.get("tenant_id"), str) else None
            if isinstance(data.get("event_id"), str):
                event_id = data["event_id"]
    except orjson.JSONDecodeError:
        pass
    return Finding(tenant, event_id, "invalid_event", reason, iso(record.timestamp))
