"""The Core's HTTP face: Gateway (L4) routes, key timeline, rotation, L1 binding, policy,
status, health and metrics. Handlers are `async def` so they run on the Core's one loop, next
to the consumer, the scheduler and the relay; the DEK routes touch in-memory state only.
Errors are `{"error": {"code", "message"}}`. Key material never appears in a response except
the DEK returned to its caller.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from core_service.clock import iso, parse_duration
from core_service.engine import TenantUnavailable


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: Literal["L2", "L3"] = "L3"


class PolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l3_period: str | int | None = Field(default=None, description="e.g. 90d; null = default")
    l2_period: str | int | None = Field(default=None, description="e.g. 365d; null = default")


class L1Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l1_ref: str = Field(min_length=1, max_length=200)


class UnwrapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wrapped: str = Field(min_length=4, max_length=1000)


class ReconcileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_purge_share: float | None = Field(
        default=None, ge=0, le=1,
        description="this pass only: the share of served tenants whose purge it may schedule")


class DekResponse(BaseModel):
    plaintext: str
    wrapped: str
    key_id: str


class PlaintextResponse(BaseModel):
    plaintext: str


class FastJSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class RotationQueue:
    """Group commit of on-demand rotations: requests that arrive together share one log
    transaction (one synced WriteBatch)."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self._pending: list[tuple[str, str, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()

    async def submit(self, tenant_id: str, layer: str) -> list[dict[str, Any]]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((tenant_id, layer, fut))
        self._wake.set()
        return await fut  # type: ignore[no-any-return]

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let concurrent requests join this batch
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                results = self.engine.rotate_many(
                    [(tid, layer, "on-demand") for tid, layer, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter learns it failed
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (*_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


def create_app(core) -> FastAPI:  # type: ignore[no-untyped-def]
    """`core` is the running service (core_service.service.CoreService)."""
    engine = core.engine
    app = FastAPI(title=f"OpenKCM Core {engine.region}", default_response_class=FastJSON,
                  docs_url=None, redoc_url=None)

    @app.exception_handler(TenantUnavailable)
    async def _unavailable(_: Request, exc: TenantUnavailable) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, "internal", type(exc).__name__)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "region": engine.region}

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return core.status()

    @app.post("/v1/reconcile")
    async def reconcile_now(body: ReconcileRequest | None = None) -> dict[str, Any]:
        """Reconcile against a Registry snapshot now, once the lifecycle backlog seen at this
        moment is applied; answers the pass's report (also `last_reconciliation` in status)."""
        try:
            await asyncio.wait_for(core.reconciler.caught_up(), 30)
        except TimeoutError:
            raise TenantUnavailable(503, "lifecycle_behind", "the lifecycle consumer has not "
                                    "caught up with the topic (is Kafka reachable?)") from None
        share = body.max_purge_share if body is not None else None
        return await core.reconciler.run_once("on-demand", share)  # type: ignore[no-any-return]

    @app.get("/v1/tenants/{tenant_id}/keys")
    async def keys(tenant_id: str) -> dict[str, Any]:
        return engine.timeline(tenant_id)  # type: ignore[no-any-return]

    @app.post("/v1/tenants/{tenant_id}/rotate")
    async def rotate(tenant_id: str, body: RotateRequest | None = None) -> dict[str, Any]:
        layer = body.layer if body is not None else "L3"
        engine._check_owner(engine.state.tenants.get(tenant_id), tenant_id)
        created = await core.rotations.submit(tenant_id, layer)
        return {"tenant_id": tenant_id, "rotated": created,
                "current": engine.timeline(tenant_id)["current"]}

    @app.put("/v1/tenants/{tenant_id}/policy")
    async def policy(tenant_id: str, body: PolicyRequest) -> dict[str, Any]:
        try:
            l3 = parse_duration(body.l3_period) if body.l3_period is not None else None
            l2 = parse_duration(body.l2_period) if body.l2_period is not None else None
        except ValueError as exc:
            raise TenantUnavailable(422, "invalid_duration", str(exc)) from None
        engine.set_policy(tenant_id, l3, l2)
        return engine.timeline(tenant_id)["policy"]  # type: ignore[no-any-return]

    @app.put("/v1/tenants/{tenant_id}/l1")
    async def bind_l1(tenant_id: str, body: L1Request) -> dict[str, Any]:
        return {"tenant_id": tenant_id, **engine.bind_l1(tenant_id, body.l1_ref)}

    @app.post("/v1/tenants/{tenant_id}/deks", response_model=DekResponse)
    async def generate(tenant_id: str) -> Any:
        dek, wrapped = engine.generate_dek(tenant_id)
        return FastJSON({
            "plaintext": base64.b64encode(dek).decode(),
            "wrapped": base64.b64encode(wrapped).decode(),
            "key_id": engine.state.tenants[tenant_id].l3[-1].key_id,
        })

    @app.post("/v1/tenants/{tenant_id}/deks/unwrap", response_model=PlaintextResponse)
    async def unwrap(tenant_id: str, body: UnwrapRequest) -> Any:
        try:
            wrapped = base64.b64decode(body.wrapped, validate=True)
        except (binascii.Error, ValueError):
            raise TenantUnavailable(422, "bad_wrapped_dek", "wrapped is not base64") from None
        dek = engine.unwrap_dek(tenant_id, wrapped)
        return FastJSON({"plaintext": base64.b64encode(dek).decode()})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(core.metrics_text(), media_type="text/plain; version=0.0.4")

    _ = iso  # timestamps in responses come from engine views
    return app
