"""Regional vault stores: where a Core keeps wrapped L2/L3 blobs (never plaintext).

Interface only here; implementations in `plugins/vault_rocksdb.py` and `plugins/vault_fs.py`,
chosen by URI through `open_vault` (`rocksdb:PATH`, `fs:PATH`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Protocol

from events.ids import is_tenant_id

Layer = Literal["L2", "L3"]
LAYERS: tuple[Layer, ...] = ("L2", "L3")
KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,63}$"
_KEY_ID_RE = re.compile(KEY_ID_PATTERN)


def check_tenant(tenant_id: str) -> None:
    if not isinstance(tenant_id, str) or not is_tenant_id(tenant_id):
        raise ValueError(f"malformed tenant id {tenant_id!r}")


def check_name(tenant_id: str, layer: str, key_id: str) -> None:
    """Validate a vault entry's name: a tenant id of events.ids, a layer L2/L3 and a key id
    such as `e1v3`. Names become file names and RocksDB keys, so nothing else is accepted."""
    check_tenant(tenant_id)
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, not {layer!r}")
    if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
        raise ValueError(f"malformed key id {key_id!r} (expected {KEY_ID_PATTERN})")


class Vault(Protocol):
    def put(self, tenant_id: str, layer: Layer, key_id: str, blob: bytes) -> None:
        """Store a wrapped blob durably (synced before returning)."""
        ...

    def put_many(self, items: list[tuple[str, Layer, str, bytes]]) -> None:
        """Store several wrapped blobs in one durable write."""
        ...

    def get(self, tenant_id: str, layer: Layer, key_id: str) -> bytes | None: ...

    def list(self, tenant_id: str) -> list[tuple[Layer, str]]: ...

    def destroy_tenant(self, tenant_id: str) -> int:
        """Crypto-shredding: remove every blob of the tenant so that no copy remains on disk
        (compaction/flush included). Returns how many were destroyed."""
        ...

    def close(self) -> None: ...


def open_vault(uri: str | None, default_dir: Path) -> Vault:
    """`rocksdb:PATH`, `fs:PATH`, or None for a RocksDB vault at `default_dir`."""
    if uri is None:
        from plugins.vault_rocksdb import RocksVault

        return RocksVault(default_dir)
    scheme, _, rest = uri.partition(":")
    if scheme == "rocksdb":
        from plugins.vault_rocksdb import RocksVault

        return RocksVault(Path(rest))
    if scheme == "fs":
        from plugins.vault_fs import FsVault

        return FsVault(Path(rest))
    raise ValueError(f"unknown vault {uri!r} (expected rocksdb:PATH or fs:PATH)")
