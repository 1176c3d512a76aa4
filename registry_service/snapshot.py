"""`GET /v1/snapshot`: every live tenant definition, signed, streamed as NDJSON.

Line 1 is a header (`type: header`, the store `seq` it reflects, the number of tenants, the
signing key id), then one `type: tenant` line per live tenant in tenant-id order, then a
trailer (`type: trailer`) with `lines` (how many lines precede it), `sha256` (hex) over the
exact bytes of every preceding line including its newline, and `sig`: the Registry key's
Ed25519 signature over that digest, made like an event signature (`SigningKey.sign`, i.e. over
the signing domain prefix plus the 32-byte digest). Every line is canonical JSON.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from datetime import datetime

from events.canonical import canonical_bytes
from events.ids import utcnow
from events.signing import SigningKey
from registry_service.models import SNAPSHOT_FORMAT
from registry_service.store import TenantState

CHUNK_LINES = 1000


def snapshot_lines(
    seq: int,
    tenants: Sequence[TenantState],
    key: SigningKey,
    generated_at: datetime | None = None,
) -> Iterator[bytes]:
    """The snapshot's bytes, in chunks of up to CHUNK_LINES lines."""
    digest = hashlib.sha256()
    header = {
        "type": "header",
        "format": SNAPSHOT_FORMAT,
        "seq": seq,
        "tenants": len(tenants),
        "key_id": key.key_id,
        "generated_at": (generated_at or utcnow()).isoformat().replace("+00:00", "Z"),
    }
    chunk = [canonical_bytes(header) + b"\n"]
    lines = 1
    for state in tenants:
        chunk.append(
            canonical_bytes(
                {
                    "type": "tenant",
                    "tenant_id": state.tenant_id,
                    "regions": list(state.regions),
                    "home_region": state.home_region,
                    "registry_seq": state.version,
                }
            )
            + b"\n"
        )
        lines += 1
        if len(chunk) >= CHUNK_LINES:
            data = b"".join(chunk)
            digest.update(data)
            yield data
            chunk = []
    data = b"".join(chunk)
    digest.update(data)
    sha = digest.digest()
    trailer = {
        "type": "trailer",
        "lines": lines,
        "sha256": sha.hex(),
        "key_id": key.key_id,
        "sig": key.sign(sha),
    }
    yield data + canonical_bytes(trailer) + b"\n"
