"""The one module that touches raw key bytes. Everything else holds `KeyHandle`s.

AES-256-GCM throughout: a wrapped blob is nonce (12 bytes) || ciphertext || tag (16 bytes),
with additional authenticated data binding what the key is (tenant, layer, version, ...).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_KCV_LABEL = b"openkcm-kcv-v1"


class UnwrapError(ValueError):
    """A blob did not authenticate under this key and AAD (wrong key, AAD or tampering)."""


class KeyHandle:
    """An AES-256 key in process memory. Its bytes are reachable only inside this module;
    `repr` shows the key check value, never the key."""

    __slots__ = ("_raw", "_aead")

    def __init__(self, raw: bytes | bytearray) -> None:
        if len(raw) != KEY_BYTES:
            raise ValueError("an AES-256 key is 32 bytes")
        self._raw: bytearray | None = bytearray(raw)
        self._aead: AESGCM | None = None  # built on first use (most L3 keys wait for a DEK)

    @classmethod
    def generate(cls) -> KeyHandle:
        return cls(os.urandom(KEY_BYTES))

    def _gcm(self) -> AESGCM:
        aead = self._aead
        if aead is None:
            if self._raw is None:
                raise ValueError("key was destroyed")
            # a race builds two equivalent objects; either is fine
            aead = self._aead = AESGCM(bytes(self._raw))
        return aead

    @property
    def kcv(self) -> str:
        """Key check value: 12 hex digits of HMAC-SHA256(key, label). Reveals nothing useful."""
        if self._raw is None:
            raise ValueError("key was destroyed")
        return hmac.digest(bytes(self._raw), _KCV_LABEL, "sha256").hex()[:12]

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._gcm().encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise UnwrapError("blob too short")
        try:
            return self._gcm().decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise UnwrapError("blob does not authenticate under this key and AAD") from None

    def wrap(self, child: KeyHandle, aad: bytes) -> bytes:
        """Encrypt another key under this one."""
        return self.seal(child._bytes(), aad)

    def unwrap(self, blob: bytes, aad: bytes) -> KeyHandle:
        return KeyHandle(self.open(blob, aad))

    def wrap_with(self, encrypt: Callable[[bytes], bytes]) -> bytes:
        """Hand this key's bytes to an external wrapping function (an HSM's encrypt) and
        return its blob. The seam for L1 providers whose root key lives elsewhere."""
        return encrypt(self._bytes())

    @classmethod
    def from_external(cls, decrypt: Callable[[], bytes]) -> KeyHandle:
        """Build a key from an external unwrapping function (an HSM's decrypt)."""
        raw = bytearray(decrypt())
        try:
            return cls(raw)
        finally:
            raw[:] = b"\0" * len(raw)

    def destroy(self) -> None:
        """Overwrite the key in memory (best effort in Python) and make the handle unusable."""
        if self._raw is not None:
            self._raw[:] = b"\0" * len(self._raw)
        self._raw = None
        self._aead = None

    @property
    def destroyed(self) -> bool:
        return self._raw is None

    def _bytes(self) -> bytes:
        if self._raw is None:
            raise ValueError("key was destroyed")
        return bytes(self._raw)

    def __repr__(self) -> str:
        return "<KeyHandle destroyed>" if self._raw is None else f"<KeyHandle kcv={self.kcv}>"

    def __reduce__(self) -> str:
        raise TypeError("key handles cannot be pickled")


def new_dek() -> bytes:
    """A fresh 256-bit data key: the only key material ever handed out (to its caller)."""
    return os.urandom(KEY_BYTES)






# --- The local L1 provider's keyring file -------------------------------------------------
# The keyring is a small JSON document. Its key entries are the only place where L1 root key
# bytes exist outside a HSM, so its (de)serialisation lives here, next to the other byte-level
# code; `plugins/l1_local.py` only moves the file's opaque content around.

KEYRING_FORMAT_VERSION = 1


class KeyringError(ValueError):
    """A keyring file is malformed (never says anything about key bytes)."""


@dataclass(frozen=True)
class Keyring:
    """A parsed keyring: the regions it serves (None = every region) and its named L1 keys."""

    regions: tuple[str, ...] | None
    keys: Mapping[str, KeyHandle]

    def destroy(self) -> None:
        for key in self.keys.values():
            key.destroy()


def keyring_loads(data: bytes) -> Keyring:
    """Parse a keyring file's content into key handles."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyringError("keyring is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != KEYRING_FORMAT_VERSION:
        raise KeyringError(f"keyring must be a JSON object with version {KEYRING_FORMAT_VERSION}")
    regions = doc.get("regions")
    if regions is not None and not (
        isinstance(regions, list) and all(isinstance(r, str) for r in regions)
    ):
        raise KeyringError("keyring 'regions' must be null or a list of region names")
    entries = doc.get("keys")
    if not isinstance(entries, dict):
        raise KeyringError("keyring 'keys' must be an object of name -> base64 key")
    keys: dict[str, KeyHandle] = {}
    for name, text in entries.items():
        if not isinstance(text, str):
            raise KeyringError(f"keyring key {name!r} is not a base64 string")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"keyring key {name!r} is not valid base64") from None
        if len(raw) != KEY_BYTES:
            raise KeyringError(f"keyring key {name!r} is not a 32-byte AES-256 key")
        keys[name] = KeyHandle(raw)
    return Keyring(tuple(regions) if regions is not None else None, keys)


def keyring_dumps(regions: Sequence[str] | None, keys: Mapping[str, KeyHandle]) -> bytes:
    """Serialise a keyring (for the local L1 provider's own file only)."""
    doc = {
        "version": KEYRING_FORMAT_VERSION,
        "regions": list(regions) if regions is not None else None,
        "keys": {name: base64.b64encode(k._bytes()).decode("ascii") for name, k in keys.items()},
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
