"""The Registry over HTTP as a real subprocess on a broker of this module's own: CRUD, what
lands on the topics, bad input, authentication, concurrency, snapshot = compacted = fold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from events import topics
from events.signing import TrustStore
from openkcm.broker import EmbeddedBroker
from registry_service.client import (
    AsyncRegistryClient,
    Conflict,
    NotFound,
    RegistryClient,
)
from tests.test_registry_support import (
    RegistryProcess,
    compacted_view,
    copies_by_event_id,
    fold_lifecycle,
    live_of,
    read_topic,
    verified_lifecycle,
)

TOKEN = "s3cret-admin-token"
GRACE_SECONDS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryProcess, str]]:
    base = tmp_path_factory.mktemp("registry-http")
    with EmbeddedBroker(log_path=base / "broker.log") as broker:
        registry = RegistryProcess(
            data_dir=base / "data",
            bootstrap=broker.bootstrap,
            trust_dir=base / "trust",
            extra=["--admin-token", TOKEN, "--purge-grace", f"{GRACE_SECONDS}s"],
        ).start()
        try:
            yield registry, broker.bootstrap
        finally:
            code = registry.terminate()
        assert code == 0, "the Registry must exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def registry(stack: tuple[RegistryProcess, str]) -> RegistryProcess:
    return stack[0]


@pytest.fixture
def client(registry: RegistryProcess) -> Iterator[RegistryClient]:
    with RegistryClient(registry.url, token=TOKEN) as c:
        yield c


def trust_of(registry: RegistryProcess) -> TrustStore:
    return TrustStore(registry.trust_dir)


async def test_crud_each_command_once_on_the_topic_signed_in_order(
    stack: tuple[RegistryProcess, str], client: RegistryClient
) -> None:
    registry, bootstrap = stack
    accepted: list[tuple[str, str, str]] = []  # (tenant, type, event_id) in command order

    def record(kind: str, result) -> None:  # noqa: ANN001
        assert result.event_id is not None
        accepted.append((result.tenant.tenant_id, kind, result.event_id))

    r = client.create("crud-acme", ["eu-central-1", "eu-west-1"], "eu-central-1")
    assert r.tenant.status == "live" and r.tenant.version == r.seq
    record("TenantCreated", r)
    record("TenantCreated", client.create("crud-beta", ["us-east-1"], "us-east-1"))
    got = client.get("crud-acme")
    assert got.regions == ["eu-central-1", "eu-west-1"] and got.home_region == "eu-central-1"
    assert {t.tenant_id for t in client.list_by_region("eu-west-1")} >= {"crud-acme"}
    assert "crud-beta" not in {t.tenant_id for t in client.list_by_region("eu-west-1")}
    record(
        "TenantRegionsChanged",
        client.change_regions("crud-acme", ["eu-central-1", "us-east-1"]),
    )
    assert "crud-acme" in {t.tenant_id for t in client.list_by_region("us-east-1")}
    assert "crud-acme" not in {t.tenant_id for t in client.list_by_region("eu-west-1")}
    # The same allow-list again changes nothing and emits nothing.
    assert client.change_regions("crud-acme", ["us-east-1", "eu-central-1"]).event_id is None
    deleted = client.delete("crud-acme", reason="offboarded")
    assert deleted.tenant.status == "deleted" and deleted.tenant.purge_after is not None
    record("TenantDeleted", deleted)
    assert "crud-acme" not in {t.tenant_id for t in client.list_by_region("eu-central-1")}
    with pytest.raises(Conflict):
        client.delete("crud-acme")
    record("TenantRestored", client.restore("crud-acme"))
    with pytest.raises(Conflict):
        client.restore("crud-acme")
    record("TenantDeleted", client.delete("crud-beta"))
    with pytest.raises(NotFound):
        client.get("crud-nobody")
    # A paged listing walks every tenant.
    client.create("crud-gamma", ["eu-west-1", "eu-central-1"], "eu-west-1")
    page = client.list_page("eu-central-1", limit=1)
    assert len(page.tenants) == 1 and page.next_after is not None

    registry.wait_relayed()
    events = verified_lifecycle(await read_topic(bootstrap, topics.LIFECYCLE), trust_of(registry))
    mine = [(p, e) for p, e in events if e.tenant_id in {"crud-acme", "crud-beta"}]
    copies = copies_by_event_id(mine)
    assert sorted(copies) == sorted(eid for _, _, eid in accepted)
    assert all(len(c) == 1 for c in copies.values()), "each accepted command exactly once"
    for tenant in ("crud-acme", "crud-beta"):
        on_topic = [(e.type, str(e.event_id)) for _, e in mine if e.tenant_id == tenant]
        assert on_topic == [(k, eid) for t, k, eid in accepted if t == tenant]
    for _, env in mine:
        assert env.producer == "registry" and env.auth is not None


def test_restore_after_the_purge_grace_is_refused(client: RegistryClient) -> None:
    client.create("grace-t", ["eu-central-1"], "eu-central-1")
    client.delete("grace-t")
    time.sleep(GRACE_SECONDS + 0.2)
    with pytest.raises(Conflict) as err:
        client.restore("grace-t")
    assert err.value.status == 409 and err.value.code == "purge_grace_over"
    assert client.get("grace-t").status == "deleted"


def _post(url: str, **kwargs) -> httpx.Response:  # noqa: ANN003
    headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/v1/tenants", headers=headers, timeout=30, **kwargs)


GOOD = {"tenant_id": "bad-x", "regions": ["eu-central-1"], "home_region": "eu-central-1"}

BAD_CREATES = [
    ("malformed JSON", {"content": b'{"tenant_id": "bad-x",'}, 422, "malformed_json"),
    ("not an object", {"json": ["bad-x"]}, 422, "invalid_request"),
    ("unknown field", {"json": {**GOOD, "l1_ref": "kms:1"}}, 422, "unknown_field"),
    ("missing field", {"json": {"tenant_id": "bad-x"}}, 422, "invalid_request"),
    ("41-char id", {"json": {**GOOD, "tenant_id": "a" * 41}}, 422, "invalid_request"),
    ("non-ASCII id", {"json": {**GOOD, "tenant_id": "bad-tenänt"}}, 422, "invalid_request"),
    ("empty id", {"json": {**GOOD, "tenant_id": ""}}, 422, "invalid_request"),
    ("empty regions", {"json": {**GOOD, "regions": []}}, 422, "invalid_request"),
    (
        "unknown region",
        {"json": {**GOOD, "regions": ["eu-central-1", "ap-south-1"]}},
        422,
        "unknown_region",
    ),
    ("malformed region", {"json": {**GOOD, "regions": ["EU"]}}, 422, "invalid_request"),
    (
        "home outside list",
        {"json": {**GOOD, "regions": ["eu-west-1"], "home_region": "eu-central-1"}},
        422,
        "home_region_outside_regions",
    ),
    (
        "repeated region",
        {"json": {**GOOD, "regions": ["eu-central-1", "eu-central-1"]}},
        422,
        "invalid_regions",
    ),
    (
        "10 MB body",
        {"content": b'{"tenant_id":"' + b"a" * 10_000_000 + b'"}'},
        413,
        "request_too_large",
    ),
    (
        "10 MB chunked body",
        {"content": [b'{"tenant_id":"'] + [b"a" * 65536] * 160 + [b'"}']},
        413,
        "request_too_large",
    ),
    ("no token", {"json": GOOD, "headers": {"Authorization": ""}}, 401, "unauthorized"),
    (
        "wrong token",
        {"json": GOOD, "headers": {"Authorization": "Bearer nope"}},
        401,
        "unauthorized",
    ),
]


@pytest.mark.parametrize(
    ("case", "request_kwargs", "status", "code"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES]
)
def test_bad_input_gets_a_typed_4xx_and_writes_nothing(
    registry: RegistryProcess, case: str, request_kwargs: dict, status: int, code: str
) -> None:
    before = registry.health()["store_seq"]
    kwargs = dict(request_kwargs)
    if isinstance(kwargs.get("content"), list):
        kwargs["content"] = iter(kwargs["content"])  # streamed: no Content-Length
    if "content" in kwargs:
        kwargs.setdefault("headers", {})["Content-Type"] = "application/json"
    response = _post(registry.url, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and len(error["message"]) > 5
    assert registry.health()["store_seq"] == before
    missing = httpx.get(f"{registry.url}/v1/tenants/bad-x", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "tenant_not_found"


BAD_OTHERS = [
    ("DELETE", "/v1/tenants/" + "a" * 41, None, 422, "invalid_request"),
    ("DELETE", "/v1/tenants/nobody", None, 404, "tenant_not_found"),
    ("POST", "/v1/tenants/nobody/restore", None, 404, "tenant_not_found"),
    ("PUT", "/v1/tenants/nobody/regions", {"regions": ["eu-west-1"]}, 404, "tenant_not_found"),
    ("PUT", "/v1/tenants/crud-x/regions", {"regions": [], "x": 1}, 422, "unknown_field"),
    ("GET", "/v1/tenants?region=Nowhere", None, 422, "invalid_request"),
    ("GET", "/v1/nothing-here", None, 404, "not_found"),
    ("PATCH", "/v1/tenants", None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_OTHERS)
def test_other_refusals_are_typed(
    registry: RegistryProcess, method: str, path: str, body, status: int, code: str  # noqa: ANN001
) -> None:
    before = registry.health()["store_seq"]
    response = httpx.request(
        method,
        registry.url + path,
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert registry.health()["store_seq"] == before


def test_the_home_region_cannot_leave_the_allow_list(client: RegistryClient) -> None:
    client.create("home-t", ["eu-central-1", "eu-west-1"], "eu-central-1")
    with pytest.raises(Conflict) as err:
        client.change_regions("home-t", ["eu-west-1"])
    assert err.value.code == "home_region_required" and "home region" in err.value.message
    version = client.get("home-t").version
    with pytest.raises(Conflict) as stale:
        client.change_regions("home-t", ["eu-central-1"], expected_version=version - 1)
    assert stale.value.code == "version_conflict"
    assert client.change_regions("home-t", ["eu-central-1"], expected_version=version).event_id


async def test_concurrent_duplicate_creates_give_one_201_and_one_409(
    registry: RegistryProcess,
) -> None:
    async with httpx.AsyncClient(
        base_url=registry.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as http:

        async def create(tid: str) -> int:
            body = {"tenant_id": tid, "regions": ["eu-west-1"], "home_region": "eu-west-1"}
            return (await http.post("/v1/tenants", json=body)).status_code

        ids = [f"race-{i:02d}" for i in range(25)]
        statuses = await asyncio.gather(*(create(t) for t in ids for _ in range(2)))
    for i in range(len(ids)):
        assert sorted(statuses[2 * i : 2 * i + 2]) == [201, 409]


async def test_async_client_round_trip(registry: RegistryProcess) -> None:
    async with AsyncRegistryClient(registry.url, token=TOKEN) as c:
        created = await c.create("async-t", ["eu-west-1", "us-east-1"], "us-east-1")
        assert created.tenant.home_region == "us-east-1"
        assert (await c.get("async-t")).version == created.seq
        assert "async-t" in {t.tenant_id for t in await c.list_by_region("eu-west-1")}
        await c.change_regions("async-t", ["us-east-1"])
        await c.delete("async-t")
        await c.restore("async-t")
        assert (await c.health()).status == "ok"
        snap = await c.snapshot(trust_of(registry))
        assert "async-t" in {t.tenant_id for t in snap.tenants}


def test_openapi_health_and_metrics(registry: RegistryProcess) -> None:
    spec = httpx.get(f"{registry.url}/openapi.json", timeout=5).json()
    assert {
        "/v1/tenants",
        "/v1/tenants/{tenant_id}",
        "/v1/tenants/{tenant_id}/restore",
        "/v1/tenants/{tenant_id}/regions",
        "/v1/snapshot",
        "/healthz",
        "/metrics",
    } <= set(spec["paths"])
    assert "CreateTenantRequest" in spec["components"]["schemas"]
    health = registry.health()
    assert health["status"] == "ok" and health["kafka"] == "connected"
    text = httpx.get(f"{registry.url}/metrics", timeout=5).text
    assert "openkcm_registry_commands_total" in text and "openkcm_registry_relay_seq" in text


async def test_compacted_topic_and_snapshot_equal_the_fold_of_the_lifecycle(
    stack: tuple[RegistryProcess, str], client: RegistryClient
) -> None:
    registry, bootstrap = stack
    for i in range(30):
        client.create(f"fold-{i:02d}", ["eu-central-1", "eu-west-1"], "eu-west-1")
    for i in range(0, 30, 3):
        client.delete(f"fold-{i:02d}")
    for i in range(0, 30, 6):
        client.restore(f"fold-{i:02d}")
    for i in range(2, 30, 4):
        client.change_regions(f"fold-{i:02d}", ["eu-west-1", "us-east-1"])
    registry.wait_relayed()
    trust = trust_of(registry)
    lifecycle = verified_lifecycle(await read_topic(bootstrap, topics.LIFECYCLE), trust)
    folded = live_of(fold_lifecycle([e for _, e in lifecycle]))
    compacted = compacted_view(await read_topic(bootstrap, topics.TENANTS), trust)
    snap = client.snapshot(trust)
    from_snapshot = {
        t.tenant_id: {
            "regions": t.regions,
            "home_region": t.home_region,
            "version": t.registry_seq,
        }
        for t in snap.tenants
    }
    assert snap.seq == registry.health()["store_seq"]
    assert len(folded) >= 25
    assert compacted == folded
    assert from_snapshot == folded
    streamed = list(client.iter_snapshot(trust))
    assert [t.tenant_id for t in streamed] == sorted(folded)


def test_writes_need_the_token_reads_do_not(registry: RegistryProcess) -> None:
    with RegistryClient(registry.url) as anonymous:
        with pytest.raises(Exception) as err:
            anonymous.create("anon-t", ["eu-west-1"], "eu-west-1")
        assert getattr(err.value, "status", None) == 401
        assert anonymous.health().status == "ok"
        assert isinstance(anonymous.list_by_region("eu-west-1"), list)


def test_the_trust_dir_holds_the_registry_public_key(registry: RegistryProcess) -> None:
    keys = [p.name for p in Path(registry.trust_dir).glob("registry.*.pub")]
    assert len(keys) == 1
    assert not list(Path(registry.trust_dir).glob("*.pem")), "no private key in the trust dir"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    missing = subprocess.run(
        [sys.executable, "-m", "openkcm.cli", "registry", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "--regions" in missing.stderr
