"""The `pkcs11` L1 provider: root keys inside an HSM (SoftHSM2 or any PKCS#11 token).

URI: `pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=openkcm;pin=1234;regions=a,b`
(attributes separated by `;`; RFC 7512 spellings `module-path`, `pin-value` and `token`
accepted). `pin` may come from `OPENKCM_PKCS11_PIN` instead of the URI; `module` defaults to
`OPENKCM_PKCS11_MODULE` or SoftHSM2's library; no `regions` means every region.

L1 keys are AES-256 secret keys generated inside the token: token objects, private,
sensitive, non-extractable, CKA_LABEL = the L1 reference. `default` is generated when a
provider opens a token that lacks it (under a host-local lock, so concurrent starts make
one key); customer keys are created with `add_key`. Wrap and unwrap run in the token with
CKM_AES_GCM; the key's bytes pass through `KeyHandle.wrap_with` / `KeyHandle.from_external`.

Wrapped blob: `0x02 || nonce (12) || AES-256-GCM ciphertext of the key (32) || tag (16)`,
61 bytes, authenticated with AAD = `0x02 openkcm/l1-pkcs11/v1 \\0 l1_ref \\0 caller_aad`.

PKCS#11 logs in once per token per process, so providers on the same module and token in one
process share one logged-in session (guarded by a lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    GeneralError,
    PKCS11Error,
)
from pkcs11.types import DecryptMixin, EncryptMixin

from plugins.crypto import KEY_BYTES, NONCE_BYTES, KeyHandle, UnwrapError
from plugins.l1 import DEFAULT_L1_REF, L1Refused, check_l1_ref

BLOB_FORMAT = 0x02
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN_ENV = "OPENKCM_PKCS11_PIN"
MODULE_ENV = "OPENKCM_PKCS11_MODULE"
_AAD_LABEL = b"openkcm/l1-pkcs11/v1"
# What a token answers when a GCM tag does not verify (SoftHSM2: CKR_GENERAL_ERROR).
_AUTH_FAILURES = (GeneralError, EncryptedDataInvalid, EncryptedDataLenRange)


def _effective_aad(l1_ref: str, aad: bytes) -> bytes:
    return bytes([BLOB_FORMAT]) + _AAD_LABEL + b"\0" + l1_ref.encode() + b"\0" + aad


@dataclass(frozen=True)
class Pkcs11Config:
    module: str
    token: str
    pin: str | None
    regions: tuple[str, ...] | None

    def __repr__(self) -> str:  # never show the PIN
        return (
            f"Pkcs11Config(module={self.module!r}, token={self.token!r}, regions={self.regions!r})"
        )


def parse_uri(rest: str) -> Pkcs11Config:
    """Parse the part of a `pkcs11:` URI after the scheme (the scheme itself is tolerated)."""
    if rest.startswith("pkcs11:"):
        rest = rest[len("pkcs11:") :]
    attrs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"pkcs11 URI attribute {name!r} has no value")
        name = {"module-path": "module", "pin-value": "pin"}.get(name, name)
        if name not in ("module", "token", "pin", "regions"):
            raise ValueError(f"unknown pkcs11 URI attribute {name!r}")
        attrs[name] = value
    token = attrs.get("token")
    if not token:
        raise ValueError("pkcs11 URI needs token=LABEL")
    regions = attrs.get("regions")
    if regions is not None and not [r for r in regions.split(",") if r]:
        raise ValueError("pkcs11 URI regions= is empty (leave it out to serve every region)")
    return Pkcs11Config(
        module=attrs.get("module") or os.environ.get(MODULE_ENV) or DEFAULT_MODULE,
        token=token,
        pin=attrs.get("pin") or os.environ.get(PIN_ENV),
        regions=tuple(r for r in regions.split(",") if r) if regions else None,
    )


class _TokenSession:
    """One logged-in read-write session on a token, shared inside the process."""

    def __init__(self, session: pkcs11.Session, pin_digest: str) -> None:
        self.session = session
        self.pin_digest = pin_digest
        self.lock = threading.Lock()
        self.users = 0


_SESSIONS: dict[tuple[str, str], _TokenSession] = {}
_SESSIONS_LOCK = threading.Lock()


def _pin_digest(pin: str | None) -> str:
    return hashlib.sha256((pin or "").encode()).hexdigest()


def _acquire(cfg: Pkcs11Config) -> _TokenSession:
    key = (os.path.realpath(cfg.module), cfg.token)
    with _SESSIONS_LOCK:
        shared = _SESSIONS.get(key)
        if shared is not None:
            if shared.pin_digest != _pin_digest(cfg.pin):
                raise L1Refused(
                    f"pkcs11 token {cfg.token!r} is already open in this process with another PIN"
                )
            shared.users += 1
            return shared
        if cfg.pin is None:
            raise L1Refused(f"pkcs11 token {cfg.token!r}: no PIN (pin=... or ${PIN_ENV})")
        try:
            # SoftHSM2's file store is not safe against logins racing from several processes
            # (CKR_GENERAL_ERROR): processes on one host log in one at a time.
            with _host_lock(cfg):
                lib = pkcs11.lib(cfg.module)
                token = lib.get_token(token_label=cfg.token)
                session = token.open(user_pin=cfg.pin, rw=True)
        except PKCS11Error as exc:
            raise L1Refused(
                f"pkcs11 token {cfg.token!r} via {cfg.module} unreachable: "
                f"{type(exc).__name__} {_detail(exc)}".rstrip()
            ) from None
        shared = _TokenSession(session, _pin_digest(cfg.pin))
        shared.users = 1
        _SESSIONS[key] = shared
        return shared


def _release(cfg: Pkcs11Config, shared: _TokenSession) -> None:
    key = (os.path.realpath(cfg.module), cfg.token)
    with _SESSIONS_LOCK:
        shared.users -= 1
        if shared.users <= 0 and _SESSIONS.get(key) is shared:
            del _SESSIONS[key]
            try:
                shared.session.close()
            except PKCS11Error:
                pass


def _detail(exc: Exception) -> str:
    """An exception's message, which for PKCS#11 never carries the PIN (it is not passed in)."""
    text = str(exc)
    return text if len(text) < 200 else text[:200]


def _one_shot(out: bytes | Iterator[bytes]) -> bytes:
    """python-pkcs11 returns bytes for a bytes input (an iterator only for streamed input)."""
    if isinstance(out, bytes):
        return out
    return b"".join(out)


@contextmanager
def _host_lock(cfg: Pkcs11Config) -> Iterator[None]:
    """Serialise key creation on this host, so concurrent starts make one `default` key."""
    digest = hashlib.sha256(f"{os.path.realpath(cfg.module)}\0{cfg.token}".encode()).hexdigest()
    lock_path = os.path.join(tempfile.gettempdir(), f"openkcm-pkcs11-{digest[:16]}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_Root = tuple[EncryptMixin, DecryptMixin]  # one token key object, seen through both faces


def _find(session: pkcs11.Session, label: str) -> list[_Root]:
    found = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
    return [
        (obj, obj)
        for obj in found
        if isinstance(obj, EncryptMixin) and isinstance(obj, DecryptMixin)
    ]


def _generate(session: pkcs11.Session, label: str) -> None:
    session.generate_key(
        KeyType.AES,
        KEY_BYTES * 8,
        label=label,
        id=label.encode(),
        store=True,
        template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
        },
    )


def _ensure_key(cfg: Pkcs11Config, shared: _TokenSession, label: str, exist_ok: bool) -> bool:
    """Generate `label` in the token unless present. True if this call generated it."""
    with _host_lock(cfg), shared.lock:
        if _find(shared.session, label):
            if not exist_ok:
                raise FileExistsError(f"pkcs11 token {cfg.token!r} already has key {label!r}")
            return False
        _generate(shared.session, label)
        return True


def add_key(uri: str, label: str, *, exist_ok: bool = False) -> str:
    """Generate a named customer L1 key in the token of `uri` (`pkcs11:...` or its rest);
    returns its L1 reference (the label)."""
    check_l1_ref(label)
    cfg = parse_uri(uri)
    shared = _acquire(cfg)
    try:
        _ensure_key(cfg, shared, label, exist_ok)
    finally:
        _release(cfg, shared)
    return label


class Pkcs11L1:
    """L1Provider over a PKCS#11 token, acting for one region."""

    scheme = "pkcs11"

    def __init__(self, cfg: Pkcs11Config, region: str) -> None:
        self.cfg = cfg
        self.region = region
        self._shared: _TokenSession | None = _acquire(cfg)
        self._keys: dict[str, _Root] = {}

    @classmethod
    def open(cls, rest: str, region: str) -> Pkcs11L1:
        provider = cls(parse_uri(rest), region)
        try:
            _ensure_key(provider.cfg, provider._session(), DEFAULT_L1_REF, exist_ok=True)
        except PKCS11Error as exc:
            provider.close()
            raise L1Refused(
                f"pkcs11 token {provider.cfg.token!r}: cannot provision {DEFAULT_L1_REF!r}: "
                f"{type(exc).__name__}"
            ) from None
        return provider

    def _session(self) -> _TokenSession:
        if self._shared is None:
            raise L1Refused("pkcs11 provider was closed")
        return self._shared

    def _key(self, l1_ref: str) -> tuple[_TokenSession, _Root]:
        check_l1_ref(l1_ref)
        if not self.allows_region(self.region):
            raise L1Refused(
                f"pkcs11 token {self.cfg.token!r} does not serve region {self.region!r} "
                f"(serves {', '.join(self.cfg.regions or ())})"
            )
        shared = self._session()
        key = self._keys.get(l1_ref)
        if key is None:
            with shared.lock:
                try:
                    found = _find(shared.session, l1_ref)
                except PKCS11Error as exc:
                    raise L1Refused(
                        f"pkcs11 token {self.cfg.token!r} unreachable: {type(exc).__name__}"
                    ) from None
            if not found:
                raise L1Refused(f"pkcs11 token {self.cfg.token!r} has no key {l1_ref!r}")
            if len(found) > 1:
                raise L1Refused(
                    f"pkcs11 token {self.cfg.token!r} has {len(found)} keys labelled {l1_ref!r}"
                )
            key = self._keys[l1_ref] = found[0]
        return shared, key

    # -- L1Provider ------------------------------------------------------------------
    def default_ref(self, tenant_id: str) -> str:
        return DEFAULT_L1_REF

    def allows_region(self, region: str) -> bool:
        return self.cfg.regions is None or region in self.cfg.regions

    def wrap(self, l1_ref: str, key: KeyHandle, aad: bytes) -> bytes:
        shared, root = self._key(l1_ref)
        nonce = os.urandom(NONCE_BYTES)
        params = GCMParams(nonce, _effective_aad(l1_ref, aad), 128)

        def encrypt(raw: bytes) -> bytes:
            with shared.lock:
                out = root[0].encrypt(raw, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            return _one_shot(out)

        try:
            sealed = key.wrap_with(encrypt)
        except PKCS11Error as exc:
            self._keys.pop(l1_ref, None)  # the handle may be stale; look it up again next time
            raise L1Refused(
                f"pkcs11 token {self.cfg.token!r} refused to wrap: {type(exc).__name__}"
            ) from None
        return bytes([BLOB_FORMAT]) + nonce + sealed

    def unwrap(self, l1_ref: str, blob: bytes, aad: bytes) -> KeyHandle:
        shared, root = self._key(l1_ref)
        if len(blob) != 1 + NONCE_BYTES + KEY_BYTES + 16 or blob[0] != BLOB_FORMAT:
            raise UnwrapError("blob was not wrapped by the pkcs11 L1 provider")
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        params = GCMParams(nonce, _effective_aad(l1_ref, aad), 128)

        def decrypt() -> bytes:
            with shared.lock:
                out = root[1].decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            return _one_shot(out)

        try:
            return KeyHandle.from_external(decrypt)
        except _AUTH_FAILURES:
            raise UnwrapError("blob does not authenticate under this L1 key and AAD") from None
        except PKCS11Error as exc:
            self._keys.pop(l1_ref, None)
            raise L1Refused(
                f"pkcs11 token {self.cfg.token!r} refused to unwrap: {type(exc).__name__}"
            ) from None

    def health(self) -> dict[str, Any]:
        base = {"scheme": self.scheme, "token": self.cfg.token, "module": self.cfg.module}
        try:
            shared = self._session()
            with shared.lock:
                present = bool(_find(shared.session, DEFAULT_L1_REF))
        except (L1Refused, PKCS11Error) as exc:
            return {**base, "ok": False, "detail": f"token unreachable: {type(exc).__name__}"}
        serves = self.allows_region(self.region)
        return {
            **base,
            "ok": present and serves,
            "detail": (
                f"token {self.cfg.token}: default key {'present' if present else 'missing'}, "
                + (f"serves {self.region}" if serves else f"does not serve {self.region}")
            ),
            "regions": list(self.cfg.regions) if self.cfg.regions is not None else None,
        }

    def close(self) -> None:
        if self._shared is not None:
            self._keys.clear()
            _release(self.cfg, self._shared)
            self._shared = None

    def __repr__(self) -> str:
        return f"<Pkcs11L1 token={self.cfg.token} region={self.region}>"
