"""Payload models of every event, one class per event type, strict (unknown fields rejected).

`SCHEMA_VERSIONS` gives the current schema version of each type; older versions are brought up
to date by `events.upcasting` before validation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from events.ids import Hex, KeyVersionId, Region, ShortText, TenantId, UtcDatetime

MAX_REGIONS = 32
MAX_TENANTS_PER_FAILOVER = 100_000

Layer = Literal["L2", "L3"]
RegionList = Annotated[list[Region], Field(min_length=1, max_length=MAX_REGIONS)]


class Payload(BaseModel):
    """Base of every payload: strict, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _check_allow_list(regions: list[str], home_region: str) -> None:
    if len(set(regions)) != len(regions):
        raise ValueError("regions must not repeat")
    if home_region not in regions:
        raise ValueError(f"home_region {home_region!r} is not in regions {regions!r}")


# --- Registry lifecycle (topic kcm.registry.lifecycle) -----------------------------------


class TenantCreated(Payload):
    """A tenant exists; `regions` is its allow-list and `home_region` its first owner."""

    regions: RegionList
    home_region: Region

    @model_validator(mode="after")
    def _home_in_regions(self) -> TenantCreated:
        _check_allow_list(self.regions, self.home_region)
        return self


class TenantDeleted(Payload):
    """The tenant is gone: its owner schedules the purge after the grace period."""

    reason: ShortText | None = None


class TenantRestored(Payload):
    """A deletion is withdrawn within the purge grace."""


class TenantRegionsChanged(Payload):
    """The allow-list changed; the home region always stays in it."""

    regions: RegionList
    home_region: Region

    @model_validator(mode="after")
    def _home_in_regions(self) -> TenantRegionsChanged:
        _check_allow_list(self.regions, self.home_region)
        return self


class RegionFailover(Payload):
    """Ownership of the tenants of `from_region` (all, or those listed) moves to `to_region`.

    `epoch` is the new ownership epoch; each moved tenant's epoch becomes max(its epoch + 1,
    `epoch`). Tenants whose allow-list excludes `to_region` are not moved.
    """

    from_region: Region
    to_region: Region
    epoch: Annotated[int, Field(ge=2, le=1_000_000_000)]
    tenants: Annotated[list[TenantId], Field(max_length=MAX_TENANTS_PER_FAILOVER)] | None = None

    @model_validator(mode="after")
    def _distinct_regions(self) -> RegionFailover:
        if self.from_region == self.to_region:
            raise ValueError("from_region and to_region must differ")
        return self


class TenantDefinition(Payload):
    """The current definition of a live tenant: the value on the compacted
    `kcm.registry.tenants` (key = tenant id; a deletion is a tombstone)."""

    regions: RegionList
    home_region: Region
    registry_seq: Annotated[int, Field(ge=1)]
    """The Registry store sequence this definition reflects."""

    @model_validator(mode="after")
    def _home_in_regions(self) -> TenantDefinition:
        _check_allow_list(self.regions, self.home_region)
        return self


# --- Core key timeline (topic kcm.core.keys): no key material of any kind ----------------


class KeyVersion(Payload):
    """One version of an L2 or L3 key as the timeline records it (never its bytes)."""

    layer: Layer
    version: Annotated[int, Field(ge=1, le=1_000_000_000)]
    epoch: Annotated[int, Field(ge=1, le=1_000_000_000)]
    key_id: KeyVersionId
    parent_key_id: KeyVersionId | None = None
    """L3: the L2 version that wraps it. L2: None (wrapped by L1)."""
    kcv: Hex
    """Key check value: lets a survivor prove it unwrapped the right key, reveals nothing."""
    created_at: UtcDatetime


class TenantInitialized(Payload):
    region: Region
    epoch: Annotated[int, Field(ge=1)]
    l1_ref: ShortText
    l2: KeyVersion
    l3: KeyVersion


class KeyRotated(Payload):
    region: Region
    epoch: Annotated[int, Field(ge=1)]
    key: KeyVersion
    trigger: Literal["scheduled", "on-demand", "l2-rotation", "policy"]


class TenantPurgeScheduled(Payload):
    region: Region
    epoch: Annotated[int, Field(ge=1)]
    purge_at: UtcDatetime
    cause_event_id: ShortText
    """The event_id of the verified TenantDeleted (or reconciliation) that scheduled it."""


class TenantPurgeCancelled(Payload):
    region: Region
    epoch: Annotated[int, Field(ge=1)]
    cause_event_id: ShortText


class TenantPurged(Payload):
    region: Region
    epoch: Annotated[int, Field(ge=1)]
    destroyed: Annotated[list[KeyVersionId], Field(max_length=100_000)]
    """Key-version ids destroyed, per layer prefix is implicit in the material tombstones."""
    destroyed_layers: Annotated[list[Layer], Field(max_length=100_000)]


class TenantHydrated(Payload):
    region: Region
    epoch: Annotated[int, Field(ge=2)]
    from_region: Region
    l2_versions: Annotated[int, Field(ge=0)]
    l3_versions: Annotated[int, Field(ge=0)]
    cause_event_id: ShortText


class TenantL1Bound(Payload):
    """Customer-driven L1 rotation: every L2 version re-wrapped under `l1_ref`."""

    region: Region
    epoch: Annotated[int, Field(ge=1)]
    previous_l1_ref: ShortText
    l1_ref: ShortText
    rewrapped: Annotated[list[KeyVersionId], Field(max_length=100_000)]


# --- Replicated wrapped material (topic kcm.core.material, compacted) --------------------


class KeyMaterial(Payload):
    """A wrapped key blob: L2 wrapped by L1 (`wrapped_by` = l1_ref) or L3 by an L2 version."""

    region: Region
    epoch: Annotated[int, Field(ge=1)]
    layer: Layer
    key_id: KeyVersionId
    wrapped_by: ShortText
    """L2: the L1 reference. L3: the key_id of the wrapping L2 version."""
    blob: Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[A-Za-z0-9+/=]+$")]
    """Base64 of nonce || AES-256-GCM ciphertext || tag. Never plaintext."""


PAYLOADS: dict[str, type[Payload]] = {
    cls.__name__: cls
    for cls in (
        TenantCreated,
        TenantDeleted,
        TenantRestored,
        TenantRegionsChanged,
        RegionFailover,
        TenantDefinition,
        TenantInitialized,
        KeyRotated,
        TenantPurgeScheduled,
        TenantPurgeCancelled,
        TenantPurged,
        TenantHydrated,
        TenantL1Bound,
        KeyMaterial,
    )
}

SCHEMA_VERSIONS: dict[str, int] = {name: 1 for name in PAYLOADS}
SCHEMA_VERSIONS["TenantCreated"] = 2  # v1 carried a single `region` (see events.upcasting)

LIFECYCLE_TYPES = frozenset(
    {"TenantCreated", "TenantDeleted", "TenantRestored", "TenantRegionsChanged", "RegionFailover"}
)
KEY_TIMELINE_TYPES = frozenset(
    {
        "TenantInitialized",
        "KeyRotated",
        "TenantPurgeScheduled",
        "TenantPurgeCancelled",
        "TenantPurged",
        "TenantHydrated",
        "TenantL1Bound",
    }
)
REGION_SCOPED_TYPES = frozenset({"RegionFailover"})
"""Events about a region rather than one tenant: envelope tenant_id is None, key = region."""
