"""A small typed client of the Registry's HTTP API, for onboarding systems and regional Cores.

This is the only module of `registry_service` other services may import; it depends on nothing
of the Registry but its pure models (`registry_service.models`) and on `events`.

    with RegistryClient("http://127.0.0.1:8080", token="...") as registry:
        registry.create("acme", ["eu-central-1", "eu-west-1"], home_region="eu-central-1")
        for tenant in registry.iter_snapshot(trust):  # verified against the trailer signature
            ...

`AsyncRegistryClient` offers the same calls with `await`. Every failure is a `RegistryError`
carrying the HTTP status (0 when the Registry could not be reached), the error code and message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from events.signing import TrustStore, VerificationError, owner_of, verify_digest
from registry_service.models import (
    SNAPSHOT_FORMAT,
    CommandResult,
    Health,
    SnapshotHeader,
    SnapshotTenant,
    SnapshotTrailer,
    Tenant,
    TenantPage,
)


class RegistryError(Exception):
    """A refused or failed call: `status` (0: unreachable), `code` and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class NotFound(RegistryError):
    pass


class Conflict(RegistryError):
    pass


class Invalid(RegistryError):
    pass


class Unauthorized(RegistryError):
    pass


class Frozen(RegistryError):
    """503: the Registry is in tier 3 (its store is unusable); management is impossible."""


class Unreachable(RegistryError):
    pass


class SnapshotError(RegistryError):
    """The snapshot stream is truncated, malformed or fails its signature."""


_BY_STATUS: dict[int, type[RegistryError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: Invalid,
    422: Invalid,
    503: Frozen,
}


def _error(response: httpx.Response) -> RegistryError:
    code, message = "error", response.text[:500]
    try:
        body = response.json()
        code = str(body["error"]["code"])
        message = str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    cls = _BY_STATUS.get(response.status_code, RegistryError)
    return cls(response.status_code, code, message)


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error(response)
    return response.json()


@dataclass
class Snapshot:
    """A verified snapshot: the store sequence it reflects and every live tenant."""

    seq: int
    key_id: str
    tenants: list[SnapshotTenant]


class SnapshotVerifier:
    """Checks a snapshot stream line by line: format, order, digest and signature."""

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust
        self.digest = hashlib.sha256()
        self.lines = 0
        self.header: SnapshotHeader | None = None
        self.trailer: SnapshotTrailer | None = None

    def feed(self, line: bytes) -> SnapshotTenant | None:
        """One line including its newline; returns a tenant line once its shape is valid
        (the caller must not act on tenants before `finish()` succeeded)."""
        if self.trailer is not None:
            raise SnapshotError(0, "snapshot_invalid", "data after the trailer")
        try:
            data = json.loads(line)
        except ValueError:
            raise SnapshotError(0, "snapshot_invalid", "a line is not JSON") from None
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "trailer":
            self.trailer = SnapshotTrailer.model_validate(data)
            return None
        self.digest.update(line)
        self.lines += 1
        if self.header is None:
            if kind != "header":
                raise SnapshotError(0, "snapshot_invalid", "the first line is not a header")
            self.header = SnapshotHeader.model_validate(data)
            if self.header.format != SNAPSHOT_FORMAT:
                raise SnapshotError(
                    0, "snapshot_invalid", f"unknown snapshot format {self.header.format}"
                )
            return None
        if kind != "tenant":
            raise SnapshotError(0, "snapshot_invalid", f"unexpected line type {kind!r}")
        return SnapshotTenant.model_validate(data)

    def finish(self) -> SnapshotHeader:
        header, trailer = self.header, self.trailer
        if header is None or trailer is None:
            raise SnapshotError(0, "snapshot_truncated", "the snapshot has no header or trailer")
        sha = self.digest.digest()
        if trailer.lines != self.lines or trailer.sha256 != sha.hex():
            raise SnapshotError(0, "snapshot_invalid", "the digest does not match the lines")
        if self.lines - 1 != header.tenants:
            raise SnapshotError(0, "snapshot_invalid", "tenant count does not match the header")
        if trailer.key_id != header.key_id or owner_of(trailer.key_id) != "registry":
            raise SnapshotError(0, "snapshot_invalid", "not signed by a Registry key")
        if self.trust.get(trailer.key_id) is None:
            raise SnapshotError(0, "snapshot_untrusted", f"unknown signer {trailer.key_id}")
        try:
            verify_digest(self.trust, trailer.key_id, sha, trailer.sig)
        except VerificationError:
            raise SnapshotError(0, "snapshot_invalid", "bad snapshot signature") from None
        return header


class _LineSplitter:
    """Split a byte stream into lines that keep their b"\\n" (what the digest covers)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._rest + chunk
        parts = data.split(b"\n")
        self._rest = parts.pop()
        return [p + b"\n" for p in parts]

    def finish(self) -> None:
        if self._rest:
            raise SnapshotError(0, "snapshot_truncated", "the snapshot ends mid-line")


def _create_body(tenant_id: str, regions: list[str], home_region: str) -> dict[str, Any]:
    return {"tenant_id": tenant_id, "regions": list(regions), "home_region": home_region}


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class RegistryClient:
    """Synchronous client."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(token), timeout=timeout, transport=transport
        )

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from None
        return _checked(response)

    def create(self, tenant_id: str, regions: list[str], home_region: str) -> CommandResult:
        data = self._call("POST", "/v1/tenants", json=_create_body(tenant_id, regions, home_region))
        return CommandResult.model_validate(data)

    def delete(self, tenant_id: str, reason: str | None = None) -> CommandResult:
        params = {"reason": reason} if reason else None
        data = self._call("DELETE", f"/v1/tenants/{tenant_id}", params=params)
        return CommandResult.model_validate(data)

    def restore(self, tenant_id: str) -> CommandResult:
        return CommandResult.model_validate(self._call("POST", f"/v1/tenants/{tenant_id}/restore"))

    def change_regions(
        self, tenant_id: str, regions: list[str], expected_version: int | None = None
    ) -> CommandResult:
        headers = {"If-Match": str(expected_version)} if expected_version is not None else None
        data = self._call(
            "PUT", f"/v1/tenants/{tenant_id}/regions", json={"regions": regions}, headers=headers
        )
        return CommandResult.model_validate(data)

    def get(self, tenant_id: str) -> Tenant:
        return Tenant.model_validate(self._call("GET", f"/v1/tenants/{tenant_id}"))

    def list_page(
        self,
        region: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        include_deleted: bool = False,
    ) -> TenantPage:
        params: dict[str, Any] = {"limit": limit}
        if region:
            params["region"] = region
        if after:
            params["after"] = after
        if include_deleted:
            params["include_deleted"] = "true"
        return TenantPage.model_validate(self._call("GET", "/v1/tenants", params=params))

    def list_by_region(self, region: str | None = None, page_size: int = 10_000) -> list[Tenant]:
        """Every live tenant whose allow-list admits `region` (all pages)."""
        out: list[Tenant] = []
        after: str | None = None
        while True:
            page = self.list_page(region, after, page_size)
            out += page.tenants
            if page.next_after is None:
                return out
            after = page.next_after

    def health(self) -> Health:
        try:
            response = self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from None
        if response.status_code not in (200, 503):
            raise _error(response)
        return Health.model_validate(response.json())

    def iter_snapshot(self, trust: TrustStore) -> Iterator[SnapshotTenant]:
        """Stream the snapshot. Tenants are yielded as they arrive, but the LAST step
        verifies the trailer and raises `SnapshotError` if it fails: collect first (or use
        `snapshot()`), act after the iteration completed."""
        yield from self._stream(SnapshotVerifier(trust))

    def snapshot(self, trust: TrustStore) -> Snapshot:
        """The whole snapshot, verified before it is returned."""
        verifier = SnapshotVerifier(trust)
        tenants = list(self._stream(verifier))
        assert verifier.header is not None
        return Snapshot(verifier.header.seq, verifier.header.key_id, tenants)

    def _stream(self, verifier: SnapshotVerifier) -> Iterator[SnapshotTenant]:
        try:
            with self._http.stream("GET", "/v1/snapshot") as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                lines = _LineSplitter()
                for chunk in response.iter_bytes():
                    for line in lines.feed(chunk):
                        tenant = verifier.feed(line)
                        if tenant is not None:
                            yield tenant
                lines.finish()
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from None
        verifier.finish()


class AsyncRegistryClient:
    """Asynchronous client (same calls, awaited)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=_headers(token),
            timeout=timeout,
            transport=transport,
            limits=limits or httpx.Limits(max_connections=100),
        )

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from None
        return _checked(response)

    async def create(self, tenant_id: str, regions: list[str], home_region: str) -> CommandResult:
        data = await self._call(
            "POST", "/v1/tenants", json=_create_body(tenant_id, regions, home_region)
        )
        return CommandResult.model_validate(data)

    async def delete(self, tenant_id: str, reason: str | None = None) -> CommandResult:
        params = {"reason": reason} if reason else None
        data = await self._call("DELETE", f"/v1/tenants/{tenant_id}", params=params)
        return CommandResult.model_validate(data)

    async def restore(self, tenant_id: str) -> CommandResult:
        data = await self._call("POST", f"/v1/tenants/{tenant_id}/restore")
        return CommandResult.model_validate(data)

    async def change_regions(
        self, tenant_id: str, regions: list[str], expected_version: int | None = None
    ) -> CommandResult:
        headers = {"If-Match": str(expected_version)} if expected_version is not None else None
        data = await self._call(
            "PUT", f"/v1/tenants/{tenant_id}/regions", json={"regions": regions}, headers=headers
        )
        return CommandResult.model_validate(data)

    async def get(self, tenant_id: str) -> Tenant:
        return Tenant.model_validate(await self._call("GET", f"/v1/tenants/{tenant_id}"))

    async def list_by_region(
        self, region: str | None = None, page_size: int = 10_000
    ) -> list[Tenant]:
        out: list[Tenant] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if region:
                params["region"] = region
            if after:
                params["after"] = after
            page = TenantPage.model_validate(await self._call("GET", "/v1/tenants", params=params))
            out += page.tenants
            if page.next_after is None:
                return out
            after = page.next_after

    async def health(self) -> Health:
        try:
            response = await self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from None
        if response.status_code not in (200, 503):
            raise _error(response)
        return Health.model_validate(response.json())

    async def iter_snapshot(self, trust: TrustStore) -> AsyncIterator[SnapshotTenant]:
        """As `RegistryClient.iter_snapshot`: verification completes at the end."""
        async for tenant in self._stream(SnapshotVerifier(trust)):
            yield tenant

    async def snapshot(self, trust: TrustStore) -> Snapshot:
        """The whole snapshot, verified before it is returned."""
        verifier = SnapshotVerifier(trust)
        tenants = [t async for t in self._stream(verifier)]
        assert verifier.header is not None
        return Snapshot(verifier.header.seq, verifier.header.key_id, tenants)

    async def _stream(self, verifier: SnapshotVerifier) -> AsyncIterator[SnapshotTenant]:
        try:
            async with self._http.stream("GET", "/v1/snapshot") as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error(response)
                lines = _LineSplitter()
                async for chunk in response.aiter_bytes():
                    for line in lines.feed(chunk):
                        tenant = verifier.feed(line)
                        if tenant is not None:
                            yield tenant
                lines.finish()
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from None
        verifier.finish()
