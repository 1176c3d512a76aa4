"""Dead letters: what a consumer could not accept, with the reason. Topic `kcm.dlq`.

A consumer never crashes on one bad record and never applies it: it publishes a DeadLetter
(key = consumer name) and moves on. The original bytes travel base64-encoded (bounded).
"""

from __future__ import annotations

import base64
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from events.canonical import canonical_bytes
from events.ids import UtcDatetime, utcnow

MAX_ORIGINAL_BYTES = 64 * 1024


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    consumer: Annotated[str, Field(max_length=100)]
    """Who rejected it, e.g. `core:eu-central-1` or `audit`."""
    topic: Annotated[str, Field(max_length=249)]
    partition: int
    offset: int
    reason: Annotated[str, Field(max_length=2000)]
    event_id: str | None = None
    event_type: str | None = None
    key_b64: str | None = None
    value_b64: str | None = None
    value_truncated: bool = False
    received_at: UtcDatetime


def dead_letter(
    *,
    consumer: str,
    topic: str,
    partition: int,
    offset: int,
    reason: str,
    key: bytes | None,
    value: bytes | None,
    event_id: str | None = None,
    event_type: str | None = None,
) -> DeadLetter:
    truncated = value is not None and len(value) > MAX_ORIGINAL_BYTES
    return DeadLetter(
        consumer=consumer,
        topic=topic,
        partition=partition,
        offset=offset,
        reason=reason[:2000],
        event_id=event_id,
        event_type=event_type,
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        value_b64=(
            base64.b64encode(value[:MAX_ORIGINAL_BYTES]).decode() if value is not None else None
        ),
        value_truncated=truncated,
        received_at=utcnow(),
    )


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return canonical_bytes(letter.model_dump(mode="json"))
