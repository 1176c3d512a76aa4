"""Validated identifier and time types shared by every model."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, StringConstraints

TENANT_ID_PATTERN = r"^[A-Za-z0-9._~-]{1,40}$"
REGION_PATTERN = r"^[a-z]{2,10}(?:-[a-z]{2,16}){1,3}-[0-9]{1,3}$"
PRODUCER_PATTERN = r"^(?:registry|operator|[a-z]{2,10}(?:-[a-z]{2,16}){1,3}-[0-9]{1,3})$"
KEY_VERSION_ID_PATTERN = r"^e[1-9][0-9]{0,8}v[1-9][0-9]{0,8}$"

_REGION_RE = re.compile(REGION_PATTERN)
_TENANT_RE = re.compile(TENANT_ID_PATTERN)

TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
Region = Annotated[str, StringConstraints(pattern=REGION_PATTERN)]
Producer = Annotated[str, StringConstraints(pattern=PRODUCER_PATTERN)]
KeyVersionId = Annotated[str, StringConstraints(pattern=KEY_VERSION_ID_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=500)]
Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,128}$")]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware timestamp, normalised to UTC (naive timestamps are rejected)."""


def is_tenant_id(value: str) -> bool:
    return bool(_TENANT_RE.match(value))


def is_region(value: str) -> bool:
    return bool(_REGION_RE.match(value))


def key_version_id(epoch: int, version: int) -> str:
    """The identifier of one key version: unique across owners because it names the epoch."""
    return f"e{epoch}v{version}"


def utcnow() -> datetime:
    return datetime.now(UTC)
