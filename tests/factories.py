"""One valid payload of every event type, for tests."""

from __future__ import annotations

from datetime import UTC, datetime

from events import models as m
from events.envelope import Envelope, new_envelope

T0 = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def key_version(layer: str = "L3", version: int = 1, epoch: int = 1) -> m.KeyVersion:
    return m.KeyVersion(
        layer=layer,  # type: ignore[arg-type]
        version=version,
        epoch=epoch,
        key_id=f"e{epoch}v{version}",
        parent_key_id="e1v1" if layer == "L3" else None,
        kcv="a1b2c3d4e5f6",
        created_at=T0,
    )


def sample_payloads() -> list[m.Payload]:
    return [
        m.TenantCreated(regions=["eu-central-1", "eu-west-1"], home_region="eu-central-1"),
        m.TenantDeleted(reason="offboarded"),
        m.TenantRestored(),
        m.TenantRegionsChanged(regions=["eu-central-1"], home_region="eu-central-1"),
        m.RegionFailover(from_region="eu-central-1", to_region="eu-west-1", epoch=2),
        m.TenantDefinition(
            regions=["eu-central-1", "eu-west-1"], home_region="eu-west-1", registry_seq=9
        ),
        m.TenantInitialized(
            region="eu-central-1",
            epoch=1,
            l1_ref="local:default",
            l2=key_version("L2"),
            l3=key_version("L3"),
        ),
        m.KeyRotated(region="eu-central-1", epoch=1, key=key_version("L3", 2), trigger="scheduled"),
        m.TenantPurgeScheduled(
            region="eu-central-1", epoch=1, purge_at=T0, cause_event_id="x"
        ),
        m.TenantPurgeCancelled(region="eu-central-1", epoch=1, cause_event_id="y"),
        m.TenantPurged(
            region="eu-central-1",
            epoch=1,
            destroyed=["e1v1", "e1v1"],
            destroyed_layers=["L2", "L3"],
        ),
        m.TenantHydrated(
            region="eu-west-1",
            epoch=2,
            from_region="eu-central-1",
            l2_versions=1,
            l3_versions=2,
            cause_event_id="z",
        ),
        m.TenantL1Bound(
            region="eu-central-1",
            epoch=1,
            previous_l1_ref="local:default",
            l1_ref="local:customer-7",
            rewrapped=["e1v1"],
        ),
        m.KeyMaterial(
            region="eu-central-1",
            epoch=1,
            layer="L3",
            key_id="e1v2",
            wrapped_by="e1v1",
            blob="AAECAwQFBgcICQoLDA0ODw==",
        ),
    ]


def sample_envelopes(producer_for_core: str = "eu-central-1") -> list[Envelope]:
    out = []
    for seq, payload in enumerate(sample_payloads(), start=1):
        name = type(payload).__name__
        lifecycle = name in m.LIFECYCLE_TYPES or name == "TenantDefinition"
        producer = ("operator" if name == "RegionFailover" else "registry") if lifecycle else (
            producer_for_core
        )
        tenant = None if name in m.REGION_SCOPED_TYPES else "tenant-1"
        out.append(
            new_envelope(payload, producer=producer, seq=seq, tenant_id=tenant, occurred_at=T0)
        )
    return out
