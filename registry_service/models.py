"""The Registry's HTTP contract as pure pydantic models (requests, responses, errors).

Imports nothing of the project but `events`, so `registry_service.client` (the only module of
the Registry that other services may import) can share these models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.ids import Region, ShortText, TenantId
from events.models import MAX_REGIONS

RegionList = Annotated[list[Region], Field(min_length=1, max_length=MAX_REGIONS)]
TenantStatus = Literal["live", "deleted"]

SNAPSHOT_FORMAT = "openkcm-registry-snapshot/1"
"""The `format` of a snapshot's header line (see docs/registry.md)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateTenantRequest(Strict):
    tenant_id: TenantId
    regions: RegionList
    home_region: Region


class DeleteTenantRequest(Strict):
    """Optional body of `DELETE /v1/tenants/{id}`."""

    reason: ShortText | None = None


class ChangeRegionsRequest(Strict):
    """Body of `PUT /v1/tenants/{id}/regions`: the complete new allow-list.

    The home region cannot be changed here (ownership moves by RegionFailover only) and must
    stay in the list."""

    regions: RegionList


class Tenant(Strict):
    tenant_id: TenantId
    regions: list[Region]
    home_region: Region
    status: TenantStatus
    created_at: datetime
    deleted_at: datetime | None = None
    purge_after: datetime | None = None
    """When a deleted tenant can no longer be restored (deleted_at + purge grace)."""
    version: int
    """The store sequence of the last event of this tenant (optimistic concurrency)."""


class CommandResult(Strict):
    """Answer to an accepted write: the tenant afterwards and the event that recorded it."""

    tenant: Tenant
    event_id: str | None
    """None when the command changed nothing (e.g. the same allow-list again)."""
    seq: int
    """The store sequence the answer reflects."""


class TenantPage(Strict):
    tenants: list[Tenant]
    seq: int
    """The store sequence the page reflects."""
    next_after: str | None = None
    """Pass as `after` to get the next page; None on the last page."""


class Health(Strict):
    status: Literal["ok", "degraded", "frozen"]
    reason: str | None = None
    store_seq: int | None = None
    relay_seq: int | None = None
    relay_lag: int | None = None
    kafka: Literal["connected", "disconnected", "off"] = "off"
    tenants_live: int | None = None


class ErrorBody(Strict):
    code: str
    message: str


class ErrorResponse(Strict):
    error: ErrorBody


class SnapshotHeader(Strict):
    type: Literal["header"]
    format: str
    seq: int
    tenants: int
    key_id: str
    generated_at: datetime


class SnapshotTenant(Strict):
    type: Literal["tenant"]
    tenant_id: TenantId
    regions: list[Region]
    home_region: Region
    registry_seq: int


class SnapshotTrailer(Strict):
    type: Literal["trailer"]
    lines: int
    sha256: str
    key_id: str
    sig: str
