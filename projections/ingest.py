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

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

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


def chain_key(topic: str, partition: int, producer: str) -> str:
    return f"c:{topic}:{partition}:{producer}"


def stash_key(chain: str, offset: int) -> str:
    return f"p:{chain[2:]}:{offset}"


class Store(Protocol):
    def get_json(self, key: str) -> dict[str, Any] | None: ...

    def stashed(self) -> list[tuple[str, bytes]]:
        """Every stashed event (`p:` keys) of the table, read once at start."""
        ...

    def chain_offsets(self) -> dict[str, int]:
        """The offset of every chain record, whatever partition holds it."""
        ...


def _parse_stash_key(key: str) -> tuple[str, int]:
    chain, _sep, offset = key[2:].rpartition(":")
    return "c:" + chain, int(offset)


@dataclass
class Ingest:
    """Chain records (`c:` keys) are {"head": hex digest of the last verified event,
    "offset": its offset}. Each unsigned event waiting for its checkpoint is stashed under a
    `p:` key (one table write), so a restarted process rebuilds its verifier from the table
    instead of depending on where the consumer's committed offset happens to be. Stashed
    events at or below their chain's offset are dead and removed by `collect`."""

    trust: TrustStore
    store: Store
    verifier: ChainVerifier = field(init=False)
    _fed: dict[str, int] = field(default_factory=dict)
    _waiting: dict[str, list[tuple[float, Received]]] = field(default_factory=dict)
    """Unsigned events waiting per chain, with the (monotonic) time they were read."""
    _restored: bool = False

    def __post_init__(self) -> None:
        self.verifier = ChainVerifier(self.trust)

    def _restore(self) -> None:
        """Feed the stash back into the verifier: the state it had when the process died."""
        self._restored = True
        by_chain: dict[str, list[tuple[int, bytes]]] = {}
        for key, raw in self.store.stashed():
            chain, offset = _parse_stash_key(key)
            by_chain.setdefault(chain, []).append((offset, raw))
        offsets = self.store.chain_offsets() if by_chain else {}
        for chain, entries in by_chain.items():
            topic, partition, producer = _chain_parts(chain)
            for offset, raw in sorted(entries):
                if offset <= offsets.get(chain, -1):
                    continue
                try:
                    ev = _read(raw)
                except DecodeError:
                    continue
                record = Record(topic, partition, offset, raw, 0.0)
                received = Received(record, ev)
                self.verifier.feed((topic, partition, producer), received)
                self._waiting.setdefault(chain, []).append((time.monotonic(), received))
                self._fed[chain] = max(self._fed.get(chain, -1), offset)

    def feed(self, record: Record) -> Outcome:
        if not self._restored:
            self._restore()
        out = Outcome()
        try:
            ev: RawEvent | Envelope = _read(record.value)
        except DecodeError as exc:
            out.findings.append(_undecodable(record, str(exc)))
            return out
        received = Received(record, ev)
        chain = (record.topic, record.partition, received.producer)
        key = chain_key(*chain)
        rec = None
        if key not in self._fed:
            rec = self.store.get_json(key)
            self._fed[key] = rec["offset"] if rec else -1
        if record.offset <= self._fed[key]:
            return out  # fed before a restart: its outcome is in the table already
        self._fed[key] = record.offset
        verified, rejected = self.verifier.feed(chain, received)
        if not verified and not rejected:
            out.stash = (stash_key(key, record.offset), record.value or b"")
            self._waiting.setdefault(key, []).append((time.monotonic(), received))
            return out
        if verified:
            self._waiting.pop(key, None)  # a checkpoint settles every waiting event
        for bad, reason in rejected:
            out.findings.append(
                Finding(bad.tenant_id, bad.event_id, "auth_failure", reason,
                        _time_of(bad, record))
            )
        if rec is None:
            rec = self.store.get_json(key)
        head = rec["head"] if rec else None
        last_offset = rec["offset"] if rec else -1
        first = True
        for item in verified:
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
        if verified:
            out.chain = (key, {"head": head, "offset": last_offset})
        return out


    def unconfirmed(self, partition: int, older_than: float) -> list[Finding]:
        """Findings for unsigned events of one partition that no checkpoint has covered for
        `older_than` seconds (a producer that never signed its batch). They stay waiting: a
        checkpoint arriving later still verifies and applies them."""
        now = time.monotonic()
        out = []
        for chain, waiting in self._waiting.items():
            if _chain_parts(chain)[1] != partition:
                continue
            for since, item in waiting:
                if now - since >= older_than:
                    out.append(Finding(
                        item.tenant_id, item.event_id, "auth_failure",
                        f"no signed checkpoint covered it within {older_than:.0f}s",
                        _time_of(item, item.record)))
        return out


def collect(stashed: list[tuple[str, bytes]], chains: dict[str, int], partition: int) -> list[str]:
    """Stash keys of one partition that a verified checkpoint has made dead."""
    dead = []
    for key, _raw in stashed:
        chain, offset = _parse_stash_key(key)
        if _chain_parts(chain)[1] == partition and offset <= chains.get(chain, -1):
            dead.append(key)
    return dead


def _chain_parts(chain: str) -> tuple[str, int, str]:
    _c, topic, partition, producer = chain.split(":", 3)
    return topic, int(partition), producer


def _read(value: bytes | None) -> RawEvent | Envelope:
    try:
        return read_raw(value)
    except DecodeError:
        return decode(value)  # older schema versions are upcast here, or fail for good


def _to_event(item: Received, out: Outcome) -> Event | None:
    record = item.record
    try:
        env = _validated(item.event)
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


def _validated(ev: RawEvent | Envelope) -> Envelope:
    """Strict validation of an authenticated event (the fast path parsed it already, in the
    current schema version, so the model is validated from that parse)."""
    if isinstance(ev, Envelope):
        return ev
    try:
        return Envelope.model_validate(ev.data)
    except ValidationError as exc:
        raise DecodeError(f"invalid event: {exc.errors()[0]['msg']}") from None


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
