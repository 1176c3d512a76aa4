"""L1 providers: the customer's external root of trust. L1 keys never leave the provider.

Interface only here; implementations live in `plugins/l1_local.py` and `plugins/l1_pkcs11.py`,
chosen by URI through `open_l1` (`local:PATH`, `pkcs11:...`).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from plugins.crypto import KeyHandle

L1_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,63}$"
"""An L1 reference is the name of a key inside the provider: the keyring entry of the `local`
provider, the CKA_LABEL of the `pkcs11` one. `default` is every provider's default."""

DEFAULT_L1_REF = "default"
_REF_RE = re.compile(L1_REF_PATTERN)
_L2_AAD_LABEL = b"openkcm/l2-under-l1/v1"


class L1Refused(Exception):
    """The provider will not serve: region outside its sovereignty, unknown L1 reference,
    or the root of trust is unreachable. The message says which."""


def is_l1_ref(value: str) -> bool:
    return bool(_REF_RE.match(value))


def check_l1_ref(l1_ref: str) -> None:
    """Raise L1Refused for a string that cannot be an L1 reference."""
    if not isinstance(l1_ref, str) or not is_l1_ref(l1_ref):
        raise L1Refused(f"malformed L1 reference {l1_ref!r} (expected {L1_REF_PATTERN})")


def l2_aad(tenant_id: str, l1_ref: str, key_id: str) -> bytes:
    """The additional authenticated data the Core passes to `wrap`/`unwrap` of an L2 version:
    binds the tenant, the L1 reference and the L2 version id (e.g. `e1v3`), so a blob cannot be
    replayed as another tenant's key, another version, or under another L1 binding.
    Deliberately region-free: a survivor region must unwrap what another region wrapped."""
    for name, value in (("tenant_id", tenant_id), ("l1_ref", l1_ref), ("key_id", key_id)):
        if not value or "\0" in value:
            raise ValueError(f"{name} must be a non-empty string without NUL")
    return b"\0".join((_L2_AAD_LABEL, tenant_id.encode(), l1_ref.encode(), key_id.encode()))


class L1Provider(Protocol):
    scheme: str

    def default_ref(self, tenant_id: str) -> str:
        """The L1 reference a tenant starts with, until the customer binds its own key."""
        ...

    def allows_region(self, region: str) -> bool:
        """Whether this provider serves `region` (sovereignty)."""
        ...

    def wrap(self, l1_ref: str, key: KeyHandle, aad: bytes) -> bytes:
        """Wrap an L2 key under the L1 key `l1_ref`. Raises L1Refused."""
        ...

    def unwrap(self, l1_ref: str, blob: bytes, aad: bytes) -> KeyHandle:
        """Unwrap an L2 blob. Raises L1Refused, or crypto.UnwrapError if it doesn't verify."""
        ...

    def health(self) -> dict[str, Any]:
        """{"ok": bool, "scheme": ..., "detail": ...} without any secret."""
        ...


def open_l1(uri: str, region: str) -> L1Provider:
    """Open the provider a `--l1` URI names, for use by `region`."""
    scheme, _, rest = uri.partition(":")
    if scheme == "local":
        from plugins.l1_local import LocalL1

        return LocalL1.open(rest, region)
    if scheme == "pkcs11":
        from plugins.l1_pkcs11 import Pkcs11L1

        return Pkcs11L1.open(rest, region)
    raise ValueError(f"unknown L1 provider {uri!r} (expected local:PATH or pkcs11:...)")
