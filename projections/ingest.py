"""From records to audited events: decoding, chain verification, chain continuity.

`Ingest.feed(record)` takes one Kafka record of a source topic and returns what became
decidable: events now authenticated (in chain order, ready for the fold), findings for what
failed (undecodable, unauthenticated, broken chain) and what to write to the table.
Unsigned events wait for their chain's checkpoint; they are stashed in the caller's table with
the chain's head, so a restarted process resumes verification from the table (records are
acknowledged at once and the committed offset may pass them). The check that a verified run
continues from the last verified event survives restarts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
    stash: tuple[str, bytes] | None = None
    """An unsigned event to keep until its checkpoint (key, wire bytes): write it first."""
    chain: tuple[str, dict[str, Any]] | None = None
    """The chain record to write after the events are applied."""
    unstash: list[str] = field(default_factory=list)
    """Kept events to delete, after the chain record is written."""


def chain_key(topic: str, partition: int, producer: str) -> str:
    return f"c:{topic}:{partition}:{producer}"


def stash_key(chain: str, offset: int) -> str:
    return f"p:{chain[2:]}:{offset}"


class Store(Protocol):
    def get_json(self, key: str) -> dict[str, Any] | None: ...

    def get_raw(self, key: str) -> bytes | None: ...


@dataclass
class Ingest:
    """Chain records (`c:` keys) are {"head": hex digest of the last verified event,
    "offset": its offset, "fed": the last offset fed to the verifier, "pending": offsets of
    unsigned events waiting for a checkpoint}; each waiting event is stashed under a `p:` key
    so a restarted process rebuilds its verifier from the table, not by re-reading the topic."""

    trust: TrustStore
    store: Store
    verifier: ChainVerifier = field(init=False)
    _loaded: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.verifier = ChainVerifier(self.trust)

    def _chain_record(self, key: str, chain: tuple[str, int, str]) -> dict[str, Any]:
        rec = self.store.get_json(key) or {"head": None, "offset": -1, "fed": -1, "pending": []}
        if key not in self._loaded:
            self._loaded.add(key)
            kept = []
            for offset in rec["pending"]:
                raw = self.store.get_raw(stash_key(key, offset))
                if raw is None:
                    continue
                ev = _read(raw)
                self.verifier.feed(chain, Received(Record(chain[0], chain[1], offset, raw, 0), ev))
                kept.append(offset)
            rec["pending"] = kept
        return rec

    def feed(self, record: Record) -> Outcome:
        out = Outcome()
        try:
            ev: RawEvent | Envelope = _read(record.value)
        except DecodeError as exc:
            out.findings.append(_undecodable(record, str(exc)))
            return out
        received = Received(record, ev)
        chain = (record.topic, record.partition, received.producer)
        key = chain_key(*chain)
        rec = self._chain_record(key, chain)
        if record.offset <= rec["fed"]:
            return out  # fed before a restart: its outcome is in the table already
        rec = {**rec, "fed": record.offset}
        verified, rejected = self.verifier.feed(chain, received)
        done: set[int] = set()
        for bad, reason in rejected:
            out.findings.append(
                Finding(bad.tenant_id, bad.event_id, "auth_failure", reason,
                        _time_of(bad, record))
            )
            done.add(bad.record.offset)
        if not verified and not rejected and self.verifier.pending(chain) and (
            received.auth is not None and received.auth.sig is None
        ):
            out.stash = (stash_key(key, record.offset), record.value or b"")
            rec["pending"] = [*rec["pending"], record.offset]
            out.chain = (key, rec)
            return out
        head, last_offset = rec["head"], rec["offset"]
        first = True
        for item in verified:
            done.add(item.record.offset)
            digest = event_digest(item).hex()
            if item.record.offset <= last_offset or digest == head:
                continue  # already applied, or a producer's retry
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
        out.unstash = [stash_key(key, o) for o in rec["pending"] if o in done]
        rec.update(head=head, offset=last_offset,
                   pending=[o for o in rec["pending"] if o not in done])
        out.chain = (key, rec)
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
