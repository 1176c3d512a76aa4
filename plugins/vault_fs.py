"""The `fs` vault: one file per wrapped blob under a directory (e.g. a replicated mount).

URI: `fs:PATH`. Layout: `PATH/<tenant>/<layer>/<key_id>` (mode 0600 files, 0700 dirs), each
file holding exactly the wrapped blob. Every write is atomic and durable: a private temp file
in the same directory (`.<key_id>.<pid>.<random>.tmp`), fsync, rename over the final name,
fsync of the directory. `put_many` syncs all its temp files before renaming any, so a crash
leaves each blob either old or new, never torn (a batch is not atomic as a whole).

`destroy_tenant` overwrites each of the tenant's files (blobs and stray temp files) with
zeros, syncs, unlinks them and removes the tenant's directories. On copy-on-write or
snapshotting file systems the overwrite cannot reach earlier copies of the blocks; the blobs
are wrapped keys, so shredding the L1/L2 keys above them is what makes them unreadable.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from plugins.vault import LAYERS, Layer, check_name, check_tenant


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shred_file(path: Path) -> None:
    """Overwrite a file with zeros, sync, unlink."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        zeros = b"\0" * 65536
        written = 0
        while written < size:
            written += os.write(fd, zeros[: min(len(zeros), size - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)


class FsVault:
    """Vault over a directory tree, one file per blob."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    def _file(self, tenant_id: str, layer: Layer, key_id: str) -> Path:
        check_name(tenant_id, layer, key_id)
        return self.path / tenant_id / layer / key_id

    def _stage(self, final: Path, blob: bytes) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(bytes(blob))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _commit(self, staged: list[tuple[Path, Path]]) -> None:
        dirs: set[Path] = set()
        for tmp, final in staged:
            os.replace(tmp, final)
            dirs.add(final.parent)
            dirs.add(final.parent.parent)
            dirs.add(final.parent.parent.parent)
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(d)

    def put(self, tenant_id: str, layer: Layer, key_id: str, blob: bytes) -> None:
        self.put_many([(tenant_id, layer, key_id, blob)])

    def put_many(self, items: list[tuple[str, Layer, str, bytes]]) -> None:
        finals = [(self._file(t, layer, k), blob) for t, layer, k, blob in items]
        with self._lock:
            staged: list[tuple[Path, Path]] = []
            try:
                for final, blob in finals:
                    staged.append((self._stage(final, blob), final))
            except BaseException:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                raise
            self._commit(staged)

    def get(self, tenant_id: str, layer: Layer, key_id: str) -> bytes | None:
        try:
            return self._file(tenant_id, layer, key_id).read_bytes()
        except FileNotFoundError:
            return None

    def list(self, tenant_id: str) -> list[tuple[Layer, str]]:
        check_tenant(tenant_id)
        out: list[tuple[Layer, str]] = []
        for layer in LAYERS:
            d = self.path / tenant_id / layer
            if d.is_dir():
                out.extend((layer, f.name) for f in d.iterdir() if not f.name.startswith("."))
        return sorted(out)

    def destroy_tenant(self, tenant_id: str) -> int:
        check_tenant(tenant_id)
        root = self.path / tenant_id
        count = 0
        with self._lock:
            if not root.is_dir():
                return 0
            for layer_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                for f in sorted(layer_dir.iterdir()):
                    if not f.name.startswith("."):
                        count += 1
                    _shred_file(f)
                _fsync_dir(layer_dir)
                layer_dir.rmdir()
            for f in root.iterdir():  # nothing else is ever written there; shred anyway
                _shred_file(f)
            root.rmdir()
            _fsync_dir(self.path)
        return count

    def close(self) -> None:
        pass
