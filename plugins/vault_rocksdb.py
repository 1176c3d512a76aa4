"""The regional `rocksdb` vault: wrapped L2/L3 blobs in a RocksDB of their own.

URI: `rocksdb:PATH` (or the Core's default directory). Keys are `tenant/layer/key_id`
(ASCII; tenant ids cannot contain `/`), values the wrapped blobs. Every write is synced
(`WriteOptions.sync`); `put_many` is one WriteBatch.

Crypto-shredding (`destroy_tenant`) leaves no copy of the tenant's blobs in any file of the
database directory: the keys are deleted in a synced batch, then the memtable is flushed (so
the write-ahead log that held the puts becomes obsolete and is deleted; WAL recycling and
archiving are disabled), and the tenant's key range is compacted down to the bottommost
level with `BottommostLevelCompaction.force`, which drops the deleted values and the
tombstones and removes the SST files that held them.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rocksdict import (
    BottommostLevelCompaction,
    CompactOptions,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from plugins.vault import Layer, check_name, check_tenant

_SEP = b"/"


def _key(tenant_id: str, layer: Layer, key_id: str) -> bytes:
    check_name(tenant_id, layer, key_id)
    return _SEP.join((tenant_id.encode(), layer.encode(), key_id.encode()))


def _tenant_range(tenant_id: str) -> tuple[bytes, bytes]:
    """[`tenant/`, `tenant0`): every key of the tenant and no other (`0` follows `/`)."""
    check_tenant(tenant_id)
    prefix = tenant_id.encode() + _SEP
    return prefix, prefix[:-1] + bytes([_SEP[0] + 1])


class RocksVault:
    """Vault over RocksDB. One process opens a vault directory at a time (RocksDB's LOCK)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        # No recycled or archived WAL files: a shredded blob must not survive in one.
        opts.set_recycle_log_file_num(0)
        opts.set_wal_ttl_seconds(0)
        opts.set_wal_size_limit_mb(0)
        self._db = Rdict(str(self.path), options=opts)
        self._wo = WriteOptions()
        self._wo.sync = True
        self._db.set_write_options(self._wo)
        self._lock = threading.Lock()

    def put(self, tenant_id: str, layer: Layer, key_id: str, blob: bytes) -> None:
        self._db.put(_key(tenant_id, layer, key_id), bytes(blob), self._wo)

    def put_many(self, items: list[tuple[str, Layer, str, bytes]]) -> None:
        batch = WriteBatch(raw_mode=True)
        for tenant_id, layer, key_id, blob in items:
            batch.put(_key(tenant_id, layer, key_id), bytes(blob))
        if items:
            self._db.write(batch, self._wo)

    def get(self, tenant_id: str, layer: Layer, key_id: str) -> bytes | None:
        value = self._db.get(_key(tenant_id, layer, key_id))
        return None if value is None else bytes(value)

    def _tenant_keys(self, tenant_id: str) -> list[bytes]:
        begin, end = _tenant_range(tenant_id)
        out: list[bytes] = []
        it = self._db.iter()
        try:
            it.seek(begin)
            while it.valid():
                k = bytes(it.key())
                if k >= end:
                    break
                out.append(k)
                it.next()
        finally:
            del it
        return out

    def list(self, tenant_id: str) -> list[tuple[Layer, str]]:
        out: list[tuple[Layer, str]] = []
        for k in self._tenant_keys(tenant_id):
            _, layer, key_id = k.decode().split("/", 2)
            out.append(("L2" if layer == "L2" else "L3", key_id))
        return sorted(out)

    def destroy_tenant(self, tenant_id: str) -> int:
        begin, end = _tenant_range(tenant_id)
        with self._lock:
            keys = self._tenant_keys(tenant_id)
            if keys:
                batch = WriteBatch(raw_mode=True)
                for k in keys:
                    batch.delete(k)
                self._db.write(batch, self._wo)
            self._shred_range(begin, end)
        return len(keys)

    def _shred_range(self, begin: bytes, end: bytes) -> None:
        """Push deleted values out of the memtable, the WAL and every SST of the range."""
        self._db.flush(wait=True)
        self._db.flush_wal(sync=True)
        copts = CompactOptions()
        copts.set_exclusive_manual_compaction(True)
        copts.set_bottommost_level_compaction(BottommostLevelCompaction.force())
        self._db.compact_range(begin, end, copts)

    def close(self) -> None:
        self._db.flush(wait=True)
        self._db.close()
