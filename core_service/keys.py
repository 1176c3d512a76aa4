"""Unsealed keys in memory and the wrapped-DEK format (docs/wrapped-dek.md).

Raw key bytes stay inside `plugins.crypto.KeyHandle`; this module only holds handles.

Wrapped DEK (version 1):
    0x01 | len(tenant) (1 byte) | tenant id (ASCII) | len(key id) (1 byte) | L3 key id (ASCII)
    | nonce (12) | AES-256-GCM ciphertext of the 32-byte DEK (32) | tag (16)
The AAD is the header (everything before the nonce), so the tenant and the L3 version are
authenticated with the DEK.
"""

from __future__ import annotations

from dataclasses import dataclass

from plugins.crypto import KeyHandle

DEK_FORMAT = 0x01
_L3_AAD_LABEL = b"openkcm/l3-under-l2/v1"

try:  # the L1 interface defines the AAD of an L2 version; the same bytes here otherwise
    from plugins.l1 import l2_aad
except ImportError:  # pragma: no cover - older plugins package
    def l2_aad(tenant_id: str, l1_ref: str, key_id: str) -> bytes:
        return b"\0".join(
            (b"openkcm/l2-under-l1/v1", tenant_id.encode(), l1_ref.encode(), key_id.encode())
        )


def l3_aad(tenant_id: str, l3_key_id: str, l2_key_id: str) -> bytes:
    return b"\0".join(
        (_L3_AAD_LABEL, tenant_id.encode(), l3_key_id.encode(), l2_key_id.encode())
    )


class BadWrappedDek(ValueError):
    pass


def dek_header(tenant_id: str, key_id: str) -> bytes:
    t = tenant_id.encode()
    k = key_id.encode()
    return bytes((DEK_FORMAT, len(t))) + t + bytes((len(k),)) + k


@dataclass(frozen=True, slots=True)
class ParsedDek:
    tenant_id: str
    key_id: str
    header: bytes
    sealed: bytes


def parse_wrapped(blob: bytes) -> ParsedDek:
    """Split a wrapped DEK into header fields and the sealed part. Raises BadWrappedDek."""
    try:
        if blob[0] != DEK_FORMAT:
            raise BadWrappedDek(f"unknown wrapped-DEK format {blob[0]}")
        tl = blob[1]
        tenant = blob[2 : 2 + tl].decode("ascii")
        kl = blob[2 + tl]
        end = 3 + tl + kl
        key_id = blob[3 + tl : end].decode("ascii")
    except (IndexError, UnicodeDecodeError):
        raise BadWrappedDek("malformed wrapped DEK") from None
    if len(tenant) != tl or len(key_id) != kl or not tenant or not key_id:
        raise BadWrappedDek("malformed wrapped DEK")
    if len(blob) - end != 12 + 32 + 16:
        raise BadWrappedDek("malformed wrapped DEK (length)")
    return ParsedDek(tenant, key_id, blob[:end], blob[end:])


class KeyCache:
    """Unsealed L2 and L3 handles per tenant (by key id)."""

    def __init__(self) -> None:
        self.l2: dict[str, dict[str, KeyHandle]] = {}
        self.l3: dict[str, dict[str, KeyHandle]] = {}

    def has(self, tenant_id: str) -> bool:
        return tenant_id in self.l3

    def put(self, tenant_id: str, layer: str, key_id: str, handle: KeyHandle) -> None:
        (self.l2 if layer == "L2" else self.l3).setdefault(tenant_id, {})[key_id] = handle

    def drop(self, tenant_id: str) -> None:
        """Forget and overwrite every handle of a tenant (purge)."""
        for table in (self.l2, self.l3):
            for handle in table.pop(tenant_id, {}).values():
                handle.destroy()

    def count(self) -> int:
        return sum(len(v) for v in self.l3.values()) + sum(len(v) for v in self.l2.values())
