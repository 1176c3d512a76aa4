"""Upcasters: bring a stored or received payload of an older schema version up to date.

Each upcaster takes the payload dict of version N and returns the payload dict of version N+1.
They run on plain dicts before validation, after the signature over the original bytes has
been checked, so old signed events stay verifiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events.models import SCHEMA_VERSIONS

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _tenant_created_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """Older registries created a tenant in one `region`; v2 has an allow-list and a home."""
    rest = {k: v for k, v in payload.items() if k != "region"}
    region = payload.get("region")
    if not isinstance(region, str):
        raise ValueError("TenantCreated v1 needs a string 'region'")
    return {**rest, "regions": [region], "home_region": region}


UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("TenantCreated", 1): _tenant_created_v1_to_v2,
}


def upcast(event_type: str, version: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Upcast `payload` from `version` to the current version of `event_type`."""
    current = SCHEMA_VERSIONS.get(event_type)
    if current is None:
        raise ValueError(f"unknown event type {event_type!r}")
    if version > current:
        raise ValueError(f"{event_type} schema_version {version} is newer than {current}")
    if version < 1:
        raise ValueError(f"schema_version must be >= 1, got {version}")
    while version < current:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise ValueError(f"no upcaster for {event_type} v{version}")
        payload = step(payload)
        version += 1
    return version, payload
