"""The Registry's HTTP API (FastAPI): one router per resource, typed JSON errors.

Every error is `{"error": {"code", "message"}}`. Writes need `Authorization: Bearer <token>`
when the Registry runs with `--admin-token`. Request bodies are capped (413). When the store is
frozen (tier 3) every management call, reads included, gets 503: a Registry that cannot trust
its own state must not feed reconciliation either.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from events.ids import REGION_PATTERN, TENANT_ID_PATTERN
from registry_service.models import (
    ChangeRegionsRequest,
    CommandResult,
    CreateTenantRequest,
    ErrorResponse,
    Health,
    Tenant,
    TenantPage,
)
from registry_service.service import Frozen, RegistryService
from registry_service.snapshot import snapshot_lines
from registry_service.store import (
    ChangeRegions,
    Command,
    CreateTenant,
    DeleteTenant,
    Outcome,
    RegistryStore,
    RestoreTenant,
    TenantState,
    parse_time,
    purge_after,
)

FROZEN_MESSAGE = (
    "the platform is frozen: the Registry store is unavailable or failed its integrity "
    "check ({reason}); tenant creates, deletes and changes are refused until an operator "
    "repairs it; regional Cores keep rotating and serving keys"
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 422, 503)
}

TenantIdPath = Annotated[
    str, Path(pattern=TENANT_ID_PATTERN, description="1-40 of A-Z a-z 0-9 . _ ~ -")
]


# --- dependencies ---------------------------------------------------------------------------


async def service_of(request: Request) -> RegistryService:
    return request.app.state.service  # type: ignore[no-any-return]


def frozen_error(service: RegistryService) -> ApiError:
    return ApiError(503, "frozen", FROZEN_MESSAGE.format(reason=service.frozen_reason))


async def live_store(service: Annotated[RegistryService, Depends(service_of)]) -> RegistryStore:
    if service.frozen or service.store is None:
        raise frozen_error(service)
    return service.store


async def admin(
    service: Annotated[RegistryService, Depends(service_of)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    token = service.config.admin_token
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "unauthorized", "a valid bearer token is required for writes")


Service = Annotated[RegistryService, Depends(service_of)]
Store = Annotated[RegistryStore, Depends(live_store)]


def tenant_model(state: TenantState, service: RegistryService) -> Tenant:
    deadline = purge_after(state, service.policy)
    return Tenant(
        tenant_id=state.tenant_id,
        regions=list(state.regions),
        home_region=state.home_region,
        status=state.status,
        created_at=parse_time(state.created_at),
        deleted_at=parse_time(state.deleted_at) if state.deleted_at else None,
        purge_after=deadline,
        version=state.version,
    )


async def run_command(service: RegistryService, cmd: Command) -> CommandResult:
    try:
        outcome: Outcome = await service.submit(cmd)
    except Frozen:
        raise frozen_error(service) from None
    if outcome.error is not None:
        raise ApiError(outcome.error.status, outcome.error.code, outcome.error.message)
    assert outcome.state is not None
    return CommandResult(
        tenant=tenant_model(outcome.state, service), event_id=outcome.event_id, seq=outcome.seq
    )


# --- routers --------------------------------------------------------------------------------

tenants = APIRouter(prefix="/v1/tenants", tags=["tenants"], responses=ERRORS)


@tenants.post("", status_code=201, dependencies=[Depends(admin)])
async def create_tenant(
    body: CreateTenantRequest, service: Service, _: Store, response: Response
) -> CommandResult:
    """Create a tenant with its region allow-list and home region (its first owner)."""
    result = await run_command(
        service, CreateTenant(body.tenant_id, tuple(body.regions), body.home_region)
    )
    response.headers["Location"] = f"/v1/tenants/{body.tenant_id}"
    return result


@tenants.get("")
async def list_tenants(
    service: Service,
    store: Store,
    region: Annotated[str | None, Query(pattern=REGION_PATTERN)] = None,
    after: Annotated[str | None, Query(pattern=TENANT_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    include_deleted: bool = False,
) -> TenantPage:
    """Tenants (by id) whose allow-list admits `region`; pages via `after`/`next_after`."""
    seq, page, next_after = store.by_region(region, after, limit, include_deleted)
    return TenantPage(
        tenants=[tenant_model(s, service) for s in page], seq=seq, next_after=next_after
    )


@tenants.get("/{tenant_id}")
async def get_tenant(tenant_id: TenantIdPath, service: Service, store: Store) -> Tenant:
    state = store.get(tenant_id)
    if state is None:
        raise ApiError(404, "tenant_not_found", f"no tenant {tenant_id}")
    return tenant_model(state, service)


@tenants.delete("/{tenant_id}", status_code=202, dependencies=[Depends(admin)])
async def delete_tenant(
    tenant_id: TenantIdPath,
    service: Service,
    _: Store,
    reason: Annotated[str | None, Query(max_length=500)] = None,
) -> CommandResult:
    """Delete a tenant: its owner disables its keys and purges them after the purge grace."""
    return await run_command(service, DeleteTenant(tenant_id, reason))


@tenants.post("/{tenant_id}/restore", dependencies=[Depends(admin)])
async def restore_tenant(tenant_id: TenantIdPath, service: Service, _: Store) -> CommandResult:
    """Withdraw a deletion within the purge grace (409 after it)."""
    return await run_command(service, RestoreTenant(tenant_id))


@tenants.put("/{tenant_id}/regions", dependencies=[Depends(admin)])
async def change_regions(
    tenant_id: TenantIdPath,
    body: ChangeRegionsRequest,
    service: Service,
    _: Store,
    if_match: Annotated[str | None, Header(pattern=r'^"?[0-9]{1,19}"?$')] = None,
) -> CommandResult:
    """Replace the allow-list (must keep the home region). `If-Match: <version>` makes it
    conditional on the tenant's current version (409 otherwise)."""
    expected = int(if_match.strip('"')) if if_match else None
    return await run_command(
        service, ChangeRegions(tenant_id, tuple(body.regions), expected_version=expected)
    )


snapshot = APIRouter(tags=["snapshot"], responses=ERRORS)


@snapshot.get(
    "/v1/snapshot",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def get_snapshot(service: Service, store: Store) -> StreamingResponse:
    """Every live tenant definition and the store sequence it reflects, signed (NDJSON)."""
    seq, live = store.live_snapshot()
    assert service.key is not None
    return StreamingResponse(
        snapshot_lines(seq, live, service.key),
        media_type="application/x-ndjson",
        headers={"X-Registry-Seq": str(seq)},
    )


ops = APIRouter(tags=["operations"])


@ops.get("/healthz", responses={503: {"model": Health}})
async def healthz(service: Service) -> JSONResponse:
    if service.frozen or service.store is None:
        health = Health(status="frozen", reason=FROZEN_MESSAGE.format(reason=service.frozen_reason))
        return JSONResponse(health.model_dump(mode="json"), status_code=503)
    store, relay = service.store, service.relay
    kafka = "off" if relay is None else ("connected" if relay.connected else "disconnected")
    health = Health(
        status="ok" if kafka != "disconnected" else "degraded",
        reason=relay.last_error if relay is not None and not relay.connected else None,
        store_seq=store.seq,
        relay_seq=store.relay.seq,
        relay_lag=store.seq - store.relay.seq,
        kafka=kafka,
        tenants_live=store.live_count(),
    )
    return JSONResponse(health.model_dump(mode="json"))


@ops.get("/metrics", response_class=Response)
async def metrics(service: Service) -> Response:
    if service.store is not None:
        service.metrics.tenants_live.set(service.store.live_count())
        service.metrics.store_seq.set(service.store.seq)
        service.metrics.relay_seq.set(service.store.relay.seq)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- errors and limits ----------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "invalid JSON")
        return "malformed_json", f"the request body is not valid JSON: {reason}"
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            parts.append(f"{loc}: unknown field")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    code = (
        "unknown_field"
        if any(e.get("type") == "extra_forbidden" for e in errors)
        else "invalid_request"
    )
    return code, "; ".join(parts) or "invalid request"


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.status == 503:
            headers["Retry-After"] = "60"
        return error_response(exc.status, exc.code, exc.message, **headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        code, message = _validation_message(exc)
        return error_response(422, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal", f"internal error ({type(exc).__name__})")


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


DRAIN_LIMIT = 32 * 1024 * 1024


class BodyLimit:
    """Pure ASGI middleware: bodies over `limit` bytes get 413 before the app sees them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send, bool(message.get("more_body")))
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, more: bool = True
    ) -> None:
        # Read and discard the rest of the upload (up to DRAIN_LIMIT) before answering:
        # closing a socket with unread data resets the connection, and the client would
        # lose our answer. Beyond the limit the client may see a reset instead.
        budget = DRAIN_LIMIT
        while more and budget > 0:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            budget -= len(message.get("body", b""))
            more = bool(message.get("more_body"))
        response = error_response(
            413,
            "request_too_large",
            f"request bodies are limited to {self.limit} bytes",
            Connection="close",
        )
        await response(scope, receive, send)


# --- the app --------------------------------------------------------------------------------


def create_app(service: RegistryService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="OpenKCM Global Registry",
        version="1",
        description=(
            "Who exists and where: tenant ids, region allow-lists and home regions. "
            "Errors are {\"error\": {\"code\", \"message\"}}."
        ),
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(tenants)
    app.include_router(snapshot)
    app.include_router(ops)
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes)  # type: ignore[arg-type]
    return app
