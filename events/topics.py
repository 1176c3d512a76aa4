"""Topic names of the platform (DESIGN.md, "Topics")."""

LIFECYCLE = "kcm.registry.lifecycle"
"""Registry and DR tooling: TenantCreated, TenantDeleted, TenantRestored, TenantRegionsChanged,
RegionFailover (key = region)."""

TENANTS = "kcm.registry.tenants"
"""Compacted: current definition of every tenant, tombstone on delete."""

CORE_KEYS = "kcm.core.keys"
"""Each Core's key timeline, kept forever; no key material of any kind."""

CORE_MATERIAL = "kcm.core.material"
"""Compacted, key = tenant/layer/key-version-id: L1-wrapped L2 and L2-wrapped L3 blobs."""

DLQ = "kcm.dlq"
"""Whatever could not be accepted, with the reason."""

COMPACTED = frozenset({TENANTS, CORE_MATERIAL})
ALL = (LIFECYCLE, TENANTS, CORE_KEYS, CORE_MATERIAL, DLQ)
