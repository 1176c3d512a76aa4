"""L1 providers: the customer's external root of trust. L1 keys never leave the provider.

Interface only here; implementations live in `plugins/l1_local.py` and `plugins/l1_pkcs11.py`,
chosen by URI through `open_l1` (`local:PATH`, `pkcs11:...`).
"""

from __future__ import annotations

from typing import Any, Protocol

from plugins.crypto import KeyHandle


class L1Refused(Exception):
    """The provider will not serve: region outside its sovereignty, unknown L1 reference,
    or the root of trust is unreachable. The message says which."""


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
