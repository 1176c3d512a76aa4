"""The envelope every event travels in, and its wire form.

Wire form: the canonical JSON bytes of the whole envelope (auth included). The bytes that are
signed or hashed ("the body") are the canonical bytes of the envelope without `auth`, exactly as
received, so events of an older schema version stay verifiable after upcasting.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    StringConstraints,
    ValidationError,
    model_validator,
)

from events.canonical import canonical_bytes
from events.ids import Producer, TenantId, UtcDatetime, utcnow
from events.models import PAYLOADS, REGION_SCOPED_TYPES, SCHEMA_VERSIONS, Payload
from events.upcasting import upcast

MAX_EVENT_BYTES = 1_000_000
"""Upper bound of one encoded event (Kafka's default message size)."""

KEY_ID_PATTERN = r"^[a-z0-9-]{2,40}\.[0-9a-f]{16}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
SIG_PATTERN = r"^[A-Za-z0-9+/]{86}==$"


class Auth(BaseModel):
    """Authentication of one event.

    `prev` links the event into its producer's hash chain (None: the event stands alone).
    `sig` is an Ed25519 signature over the event's digest; an event without `sig` is
    authenticated by the next signed event of its chain (a checkpoint).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: Annotated[str, StringConstraints(pattern=KEY_ID_PATTERN)]
    prev: Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)] | None = None
    sig: Annotated[str, StringConstraints(pattern=SIG_PATTERN)] | None = None


class Envelope(BaseModel):
    """One event. Maps one to one onto CloudEvents 1.0 (see `to_cloudevent`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: UUID
    type: str
    schema_version: Annotated[int, Field(ge=1, le=1000)]
    tenant_id: TenantId | None
    producer: Producer
    seq: Annotated[int, Field(ge=1, le=2**62)]
    occurred_at: UtcDatetime
    payload: SerializeAsAny[Payload]
    auth: Auth | None = None

    _signed_body: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _typed_payload(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("payload"), dict):
            model = PAYLOADS.get(data.get("type"))  # type: ignore[arg-type]
            if model is None:
                raise ValueError(f"unknown event type {data.get('type')!r}")
            data = {**data, "payload": model.model_validate(data["payload"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Envelope:
        model = PAYLOADS.get(self.type)
        if model is None:
            raise ValueError(f"unknown event type {self.type!r}")
        if type(self.payload) is not model:
            raise ValueError(f"payload of {self.type} must be a {model.__name__}")
        if self.schema_version != SCHEMA_VERSIONS[self.type]:
            raise ValueError(
                f"{self.type} schema_version {self.schema_version} is not current "
                f"({SCHEMA_VERSIONS[self.type]}); upcast before validating"
            )
        if self.type in REGION_SCOPED_TYPES:
            if self.tenant_id is not None:
                raise ValueError(f"{self.type} is about a region: tenant_id must be null")
        elif self.tenant_id is None:
            raise ValueError(f"{self.type} needs a tenant_id")
        return self

    def __eq__(self, other: object) -> bool:
        # The cached body is a private detail; two envelopes are equal when their fields are.
        if not isinstance(other, Envelope):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(self.event_id)

    def body(self) -> bytes:
        """The bytes that are hashed and signed: as received, or canonical if built here."""
        if self._signed_body is None:
            self._signed_body = canonical_bytes(self.model_dump(mode="json", exclude={"auth"}))
        return self._signed_body

    def to_cloudevent(self) -> dict[str, Any]:
        """CloudEvents 1.0 structured form (JSON): id, source, type, time, subject."""
        return {
            "specversion": "1.0",
            "id": str(self.event_id),
            "source": f"openkcm/{self.producer}",
            "type": f"io.openkcm.{self.type}.v{self.schema_version}",
            "time": self.occurred_at.isoformat().replace("+00:00", "Z"),
            "subject": self.tenant_id,
            "datacontenttype": "application/json",
            "openkcmseq": self.seq,
            "data": self.payload.model_dump(mode="json"),
        }


class DecodeError(ValueError):
    """Raised for bytes that are not a valid event; the message is the reason for the DLQ."""


def new_envelope(
    payload: Payload,
    *,
    producer: str,
    seq: int,
    tenant_id: str | None,
    occurred_at: datetime | None = None,
    event_id: UUID | None = None,
) -> Envelope:
    type_ = type(payload).__name__
    return Envelope(
        event_id=event_id or uuid.uuid4(),
        type=type_,
        schema_version=SCHEMA_VERSIONS[type_],
        tenant_id=tenant_id,
        producer=producer,
        seq=seq,
        occurred_at=occurred_at or utcnow(),
        payload=payload,
    )


def encode(env: Envelope) -> bytes:
    """Wire bytes of an event (canonical JSON of the whole envelope)."""
    data = canonical_bytes(env.model_dump(mode="json"))
    if len(data) > MAX_EVENT_BYTES:
        raise ValueError(f"event of {len(data)} bytes exceeds {MAX_EVENT_BYTES}")
    return data


def decode(raw: bytes | None) -> Envelope:
    """Parse, upcast and validate wire bytes. Authentication is `events.signing`'s job."""
    if raw is None:
        raise DecodeError("empty record (tombstone) where an event was expected")
    if len(raw) > MAX_EVENT_BYTES:
        raise DecodeError(f"event of {len(raw)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError("an event must be a JSON object")
    try:
        signed_body = canonical_bytes({k: v for k, v in data.items() if k != "auth"})
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"not canonicalisable: {exc}") from None
    type_, version, payload = data.get("type"), data.get("schema_version"), data.get("payload")
    if not isinstance(type_, str) or type_ not in PAYLOADS:
        raise DecodeError(f"unknown event type {type_!r}")
    if not isinstance(version, int) or not isinstance(payload, dict):
        raise DecodeError("schema_version must be an integer and payload an object")
    try:
        version, payload = upcast(type_, version, payload)
    except ValueError as exc:
        raise DecodeError(f"cannot upcast: {exc}") from None
    try:
        env = Envelope.model_validate({**data, "schema_version": version, "payload": payload})
    except ValidationError as exc:
        raise DecodeError(_summarise(exc)) from None
    env._signed_body = signed_body
    return env


def partition_key(env: Envelope) -> bytes:
    """Kafka key: the tenant id, or for region-scoped events the region they are about."""
    if env.tenant_id is not None:
        return env.tenant_id.encode()
    return str(getattr(env.payload, "from_region", env.producer)).encode()


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "invalid event: " + "; ".join(parts)
