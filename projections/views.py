"""Read side of the audit table: key layout, the HTTP/report models, summary and cadence.

Table keys: `t:<tenant>` tenant state, `f:<kind>:<event_id>[:<layer>]` one finding,
`c:<topic>:<partition>:<producer>` a chain head, `p:<topic>:<partition>:<producer>:<offset>` an
unsigned event waiting for its checkpoint. Values are JSON (orjson). The same functions
serve the live HTTP routes (over the faust table) and the offline report (over the RocksDB
files of a stopped or running app, opened read-only).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from projections.rules import KINDS, Policy, State, iso, next_due, parse_time

TENANT = b"t:"
FINDING = b"f:"
CHAIN = b"c:"
STASH = b"p:"


def tenant_key(tenant_id: str) -> bytes:
    return TENANT + tenant_id.encode()


def finding_key(key: str) -> bytes:
    return FINDING + key.encode()


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(raw: bytes | None) -> Any:
    return None if raw is None else orjson.loads(raw)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class FindingModel(BaseModel):
    tenant_id: str | None
    event_id: str
    kind: str
    reason: str
    time: str
    layer: str | None = None


class KeyVersionView(BaseModel):
    version: int
    epoch: int
    key_id: str
    created_at: str
    region: str
    event_id: str


class TenantView(BaseModel):
    tenant_id: str
    status: str
    owner_region: str | None
    epoch: int
    allow_list: list[str] | None
    home_region: str | None
    l2: KeyVersionView | None
    l3: KeyVersionView | None
    l2_versions: int
    l3_versions: int
    last_rotation: str | None
    next_due: dict[str, str]
    compliant: bool
    findings: list[FindingModel]


class SummaryModel(BaseModel):
    tenants: int
    compliant: int
    compliant_share: float
    findings_total: int
    findings_by_kind: dict[str, int]
    tenants_by_status: dict[str, int]
    generated_at: str


class FindingsPage(BaseModel):
    since: str | None
    count: int
    findings: list[FindingModel]


def split(items: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, State], list[dict[str, Any]]]:
    tenants: dict[str, State] = {}
    findings: list[dict[str, Any]] = []
    for key, value in items:
        if key.startswith(TENANT):
            tenants[key[len(TENANT):].decode()] = loads(value)
        elif key.startswith(FINDING):
            findings.append(loads(value))
    findings.sort(key=lambda f: (f["time"], f["kind"], f["event_id"], f.get("layer") or ""))
    return tenants, findings


def tenant_view(state: State, findings: list[dict[str, Any]], policy: Policy) -> TenantView:
    def version(layer: str) -> KeyVersionView | None:
        rec = state["layers"].get(layer)
        if rec is None:
            return None
        return KeyVersionView(
            version=rec["version"], epoch=rec["epoch"], key_id=rec["key_id"],
            created_at=iso(rec["created_at"]), region=rec["region"], event_id=rec["event_id"],
        )

    own = [FindingModel(**f) for f in findings if f["tenant_id"] == state["tenant_id"]]
    return TenantView(
        tenant_id=state["tenant_id"],
        status=state["status"],
        owner_region=state["owner"],
        epoch=state["epoch"],
        allow_list=state["regions"],
        home_region=state["home_region"],
        l2=version("L2"),
        l3=version("L3"),
        l2_versions=(state["layers"].get("L2") or {}).get("count", 0),
        l3_versions=(state["layers"].get("L3") or {}).get("count", 0),
        last_rotation=iso(state["last_rotation"]) if state["last_rotation"] else None,
        next_due=next_due(state, policy),
        compliant=state["status"] in ("active", "unknown") and not own,
        findings=own,
    )


def summary(
    tenants: dict[str, State], findings: list[dict[str, Any]], now: float | None = None
) -> SummaryModel:
    with_findings = {f["tenant_id"] for f in findings}
    live = [t for t in tenants.values() if t["status"] in ("active", "unknown")]
    ok = sum(1 for t in live if t["tenant_id"] not in with_findings)
    by_kind = dict.fromkeys(KINDS, 0)
    by_kind.update(Counter(f["kind"] for f in findings))
    return SummaryModel(
        tenants=len(tenants),
        compliant=ok,
        compliant_share=round(ok / len(live), 4) if live else 1.0,
        findings_total=len(findings),
        findings_by_kind=by_kind,
        tenants_by_status=dict(Counter(t["status"] for t in tenants.values())),
        generated_at=iso(now if now is not None else datetime.now(UTC).timestamp()),
    )


def findings_since(findings: list[dict[str, Any]], since: str | None) -> list[dict[str, Any]]:
    if not since:
        return findings
    cutoff = parse_time(since)
    return [f for f in findings if parse_time(f["time"]) >= cutoff]


def cadence(tenants: dict[str, State]) -> dict[str, Any]:
    """Rotations per region: count per month and the median interval per layer (days)."""
    per_month: dict[str, Counter[str]] = defaultdict(Counter)
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for state in tenants.values():
        for layer, _v, _e, _id, t, region, trigger in state["history"]:
            if not trigger:
                continue
            month = datetime.fromtimestamp(t, UTC).strftime("%Y-%m")
            per_month[region][month] += 1
            times[(region, state["tenant_id"], layer)].append(t)
    intervals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (region, _tenant, layer), ts in times.items():
        ts.sort()
        intervals[region][layer].extend((b - a) / 86400 for a, b in zip(ts, ts[1:], strict=False))
    regions = sorted(per_month)
    return {
        "regions": {
            r: {
                "rotations": sum(per_month[r].values()),
                "per_month": dict(sorted(per_month[r].items())),
                "median_interval_days": {
                    layer: round(statistics.median(v), 2)
                    for layer, v in sorted(intervals[r].items())
                    if v
                },
            }
            for r in regions
        }
    }


def read_store(data_dir: Path) -> list[tuple[bytes, bytes]]:
    """Every key and value of the audit table's RocksDB files, opened read-only."""
    import rocksdict

    items: list[tuple[bytes, bytes]] = []
    paths = sorted((data_dir / "faust" / "v1" / "tables").glob("audit-*.db"))
    if not paths:
        raise FileNotFoundError(f"no audit table under {data_dir}")
    for path in paths:
        db = rocksdict.Rdict(str(path), access_type=rocksdict.AccessType.read_only())
        try:
            for key, value in db.items():
                if isinstance(key, bytes) and isinstance(value, bytes):
                    items.append((key, value))
        finally:
            db.close()
    return items
