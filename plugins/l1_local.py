"""The `local` L1 provider: a software KMS whose root keys sit in a separate keyring file.

URI: `local:PATH`. The keyring is shared by the regions that may use it (e.g. on a mount they
all see); it lists the regions it serves (`null` = all) and its named AES-256 keys:

    {"version": 1, "regions": ["eu-central-1", "eu-west-1"] | null,
     "keys": {"default": "<base64 of 32 bytes>", "customer-7": "..."}}

The L1 reference of a key is its name (`default` until the customer binds its own key).
Opening a provider on a missing keyring creates it with a `default` key, atomically (the
complete file is published with a hard link, which fails if another process won the race),
mode 0600. Changes (`add_key`, `set_regions`) are read-modify-write under an `flock` and an
atomic rename; running providers pick them up on their next call.

Wrapped blob: `0x01 || nonce (12) || AES-256-GCM ciphertext of the key (32) || tag (16)`,
61 bytes, authenticated with AAD = `openkcm/l1-local/v1 \\0 l1_ref \\0 caller_aad`.
Key bytes are parsed and serialised by `plugins.crypto` only.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plugins.crypto import (
    KeyHandle,
    Keyring,
    KeyringError,
    UnwrapError,
    keyring_dumps,
    keyring_loads,
)
from plugins.l1 import DEFAULT_L1_REF, L1Refused, check_l1_ref

BLOB_FORMAT = 0x01
_AAD_LABEL = b"openkcm/l1-local/v1"


def _aad_prefix(l1_ref: str) -> bytes:
    return bytes([BLOB_FORMAT]) + _AAD_LABEL + b"\0" + l1_ref.encode() + b"\0"


_BLOB_PREFIX = bytes([BLOB_FORMAT])
_MAX_REFS = 1024  # bound of the validated-reference cache


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(path: Path, content: bytes) -> Path:
    """Write `content` to a fresh private sibling of `path` (O_EXCL, 0600), synced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _publish_new(path: Path, content: bytes) -> bool:
    """Create `path` with `content` unless it exists. True if this call created it.
    Readers never see a partial file: the synced temp file is hard-linked into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_tmp(path, content)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock for read-modify-write of a keyring (a sibling `.lock` file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> Keyring:
    with open(path, "rb") as fh:
        return keyring_loads(fh.read())


def _replace(path: Path, keyring: Keyring) -> None:
    tmp = _write_tmp(path, keyring_dumps(keyring.regions, keyring.keys))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_regions(regions: Iterable[str] | None) -> tuple[str, ...] | None:
    if regions is None:
        return None
    out = tuple(regions)
    if not out or not all(isinstance(r, str) and r for r in out):
        raise ValueError("regions must be None (all) or a non-empty list of region names")
    return out


def create_keyring(
    path: str | os.PathLike[str], regions: Iterable[str] | None = None, *, exist_ok: bool = False
) -> bool:
    """Create a keyring with a fresh `default` key, serving `regions` (None = all).
    Returns True if created; False if it existed and `exist_ok`, else FileExistsError."""
    p = Path(path)
    keyring = Keyring(_check_regions(regions), {DEFAULT_L1_REF: KeyHandle.generate()})
    try:
        created = _publish_new(p, keyring_dumps(keyring.regions, keyring.keys))
    finally:
        keyring.destroy()
    if not created and not exist_ok:
        raise FileExistsError(f"keyring {p} already exists")
    return created


def add_key(path: str | os.PathLike[str], name: str, *, exist_ok: bool = False) -> str:
    """Add a fresh named customer key to a keyring (created if missing) and return its L1
    reference (the name). An existing name raises FileExistsError unless `exist_ok`."""
    check_l1_ref(name)
    p = Path(path)
    create_keyring(p, exist_ok=True)
    with _locked(p):
        keyring = _read(p)
        try:
            if name in keyring.keys:
                if not exist_ok:
                    raise FileExistsError(f"keyring {p} already has a key named {name!r}")
                return name
            new = KeyHandle.generate()
            _replace(p, Keyring(keyring.regions, {**keyring.keys, name: new}))
            new.destroy()
        finally:
            keyring.destroy()
    return name


def set_regions(path: str | os.PathLike[str], regions: Iterable[str] | None) -> None:
    """Change the regions an existing keyring serves (None = all). Keys are untouched."""
    p = Path(path)
    wanted = _check_regions(regions)
    with _locked(p):
        keyring = _read(p)
        try:
            _replace(p, Keyring(wanted, keyring.keys))
        finally:
            keyring.destroy()


def keyring_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The regions and key names of a keyring, with each key's check value; no key bytes."""
    keyring = _read(Path(path))
    try:
        return {
            "regions": list(keyring.regions) if keyring.regions is not None else None,
            "keys": {name: key.kcv for name, key in sorted(keyring.keys.items())},
        }
    finally:
        keyring.destroy()


class LocalL1:
    """L1Provider over a keyring file, acting for one region."""

    scheme = "local"

    def __init__(self, path: Path, region: str) -> None:
        self.path = path
        self.region = region
        self._lock = threading.Lock()
        self._keyring: Keyring | None = None
        self._stamp: tuple[int, int, int, int] | None = None
        self._fspath = os.fspath(path)
        self._prefixes: dict[str, bytes] = {}  # validated l1_ref -> its AAD prefix

    @classmethod
    def open(cls, rest: str, region: str) -> LocalL1:
        """`rest` is the keyring path of `local:PATH`; created (serving all regions) if absent."""
        if not rest:
            raise ValueError("local L1 URI needs a keyring path: local:PATH")
        path = Path(rest).expanduser().absolute()
        create_keyring(path, exist_ok=True)
        provider = cls(path, region)
        provider._current()
        return provider

    # -- keyring cache ---------------------------------------------------------------
    def _current(self) -> Keyring:
        """The keyring, re-read when the file changed (another process added a key or
        changed the regions). Raises L1Refused when it is unreadable."""
        with self._lock:
            try:
                st = os.stat(self._fspath)
                stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                if self._keyring is None or stamp != self._stamp:
                    # The previous keyring is dropped, not destroyed: another thread may be
                    # using one of its keys right now.
                    self._keyring, self._stamp = _read(self.path), stamp
            except OSError as exc:
                raise L1Refused(
                    f"local L1 keyring {self.path} unreadable: {exc.strerror}"
                ) from None
            except KeyringError as exc:
                raise L1Refused(f"local L1 keyring {self.path} is malformed: {exc}") from None
            return self._keyring

    def _aad(self, l1_ref: str, aad: bytes) -> bytes:
        """The effective AAD; `l1_ref` is validated (once per distinct reference)."""
        prefix = self._prefixes.get(l1_ref) if isinstance(l1_ref, str) else None
        if prefix is None:
            check_l1_ref(l1_ref)
            if len(self._prefixes) >= _MAX_REFS:
                self._prefixes.clear()
            prefix = self._prefixes[l1_ref] = _aad_prefix(l1_ref)
        return prefix + aad

    def _key(self, l1_ref: str) -> KeyHandle:
        keyring = self._current()
        if keyring.regions is not None and self.region not in keyring.regions:
            raise L1Refused(
                f"local L1 keyring {self.path} does not serve region {self.region!r} "
                f"(serves {', '.join(keyring.regions)})"
            )
        key = keyring.keys.get(l1_ref)
        if key is None:
            raise L1Refused(f"local L1 keyring {self.path} has no key {l1_ref!r}")
        return key

    # -- L1Provider ------------------------------------------------------------------
    def default_ref(self, tenant_id: str) -> str:
        return DEFAULT_L1_REF

    def allows_region(self, region: str) -> bool:
        regions = self._current().regions
        return regions is None or region in regions

    def wrap(self, l1_ref: str, key: KeyHandle, aad: bytes) -> bytes:
        full_aad = self._aad(l1_ref, aad)
        return _BLOB_PREFIX + self._key(l1_ref).wrap(key, full_aad)

    def unwrap(self, l1_ref: str, blob: bytes, aad: bytes) -> KeyHandle:
        full_aad = self._aad(l1_ref, aad)
        root = self._key(l1_ref)
        if not blob or blob[0] != BLOB_FORMAT:
            raise UnwrapError("blob was not wrapped by the local L1 provider")
        return root.unwrap(blob[1:], full_aad)

    def health(self) -> dict[str, Any]:
        try:
            keyring = self._current()
        except L1Refused as exc:
            return {"ok": False, "scheme": self.scheme, "detail": str(exc)}
        serves = keyring.regions is None or self.region in keyring.regions
        return {
            "ok": serves,
            "scheme": self.scheme,
            "detail": f"keyring {self.path}: {len(keyring.keys)} key(s), "
            + (f"serves {self.region}" if serves else f"does not serve {self.region}"),
            "regions": list(keyring.regions) if keyring.regions is not None else None,
            "refs": sorted(keyring.keys),
        }

    def close(self) -> None:
        with self._lock:
            if self._keyring is not None:
                self._keyring.destroy()
            self._keyring = None
            self._stamp = None

    def __repr__(self) -> str:
        return f"<LocalL1 {self.path} region={self.region}>"
