"""Regional vault stores: where a Core keeps wrapped L2/L3 blobs (never plaintext).

Interface only here; implementations in `plugins/vault_rocksdb.py` and `plugins/vault_fs.py`,
chosen by URI through `open_vault` (`rocksdb:PATH`, `fs:PATH`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

Layer = Literal["L2", "L3"]


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
