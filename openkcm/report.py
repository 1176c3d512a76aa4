"""Drill reports: `report.json` (the record) and `report.html` (one self-contained page with a
timeline chart of rotations per region, the fault window shaded, and the checks as a table)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class ScenarioResult:
    scenario: str
    passed: bool = False
    checks: list[Check] = field(default_factory=list)
    rto_seconds: float | None = None
    rto_target_seconds: float | None = None
    rpo_key_versions_lost: int | None = None
    rpo_deks_lost: int | None = None
    tenants_moved: int = 0
    tenants_refused: list[dict[str, str]] = field(default_factory=list)
    deks_verified: int = 0
    rotations_during_outage: int = 0
    stale_events_fenced: int = 0
    fault_window: tuple[float, float] | None = None
    """Seconds since the scenario's start: (fault injected, fault healed or end)."""
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """Actions: {"t": seconds since start, "action": text}."""
    rotations: list[dict[str, Any]] = field(default_factory=list)
    """Rotations seen on kcm.core.keys: {"t", "region", "layer", "epoch", "tenant"}."""
    duration_seconds: float = 0.0
    error: str | None = None

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(passed), detail))
        return bool(passed)

    def finish(self) -> ScenarioResult:
        self.passed = self.error is None and bool(self.checks) and all(
            c.passed for c in self.checks
        )
        return self

    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]


def write_reports(results: list[ScenarioResult], report_dir: Path, meta: dict[str, Any]) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "generated_at": datetime.now(UTC).isoformat(),
        "passed": bool(results) and all(r.passed for r in results),
        **meta,
        "scenarios": [asdict(r) for r in results],
    }
    (report_dir / "report.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (report_dir / "report.html").write_text(render_html(document))


def _svg_timeline(scenario: dict[str, Any], width: int = 860, height: int = 220) -> str:
    rotations = scenario.get("rotations") or []
    regions = sorted({r["region"] for r in rotations})
    end = max([scenario.get("duration_seconds") or 1.0] + [r["t"] for r in rotations]) or 1.0
    left, right, top, bottom = 110, 20, 20, 30
    lane = (height - top - bottom) / max(1, len(regions))
    x = lambda t: left + (width - left - right) * max(0.0, t) / end  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="rotations per region over time">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
    ]
    window = scenario.get("fault_window")
    if window:
        x0, x1 = x(window[0]), x(window[1])
        parts.append(
            f'<rect x="{x0:.1f}" y="{top}" width="{max(1.0, x1 - x0):.1f}" '
            f'height="{height - top - bottom}" fill="#f4cccc"><title>fault window</title></rect>'
            f'<text x="{x0 + 3:.1f}" y="{top + 12}" font-size="11" fill="#990000">fault</text>'
        )
    for i, region in enumerate(regions):
        y = top + lane * (i + 0.5)
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="12" text-anchor="end">'
            f"{html.escape(region)}</text>"
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        for r in rotations:
            if r["region"] != region:
                continue
            shape_y = y - 6 if r.get("layer") == "L2" else y
            stale = r.get("stale")
            parts.append(
                f'<circle cx="{x(r["t"]):.1f}" cy="{shape_y:.1f}" '
                f'r="{4 if r.get("layer") == "L2" else 2.5}" '
                f'fill="{"#000" if stale else color}" fill-opacity="0.7"/>'
            )
    for k in range(6):
        t = end * k / 5
        parts.append(
            f'<text x="{x(t):.1f}" y="{height - 10}" font-size="11" text-anchor="middle">'
            f"{t:.0f}s</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(document: dict[str, Any]) -> str:
    esc = html.escape
    status = "PASSED" if document["passed"] else "FAILED"
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>OpenKCM DR drill report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:960px;color:#222}",
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;",
        "padding:4px 8px;text-align:left;font-size:14px}.ok{color:#1a7f37}.bad{color:#c00}",
        "h2{margin-top:2em}.fig td:first-child{font-weight:600}</style></head><body>",
        f"<h1>DR drill report: <span class='{'ok' if document['passed'] else 'bad'}'>"
        f"{status}</span></h1>",
        f"<p>Generated {esc(str(document['generated_at']))}. "
        f"{esc(str(document.get('summary', '')))}</p>",
    ]
    for s in document["scenarios"]:
        ok = s["passed"]
        out.append(
            f"<h2>{esc(s['scenario'])}: <span class='{'ok' if ok else 'bad'}'>"
            f"{'passed' if ok else 'FAILED'}</span></h2>"
        )
        if s.get("error"):
            out.append(f"<p class='bad'>Error: {esc(s['error'])}</p>")
        figures = [
            ("RTO", _fmt_rto(s)),
            ("RPO: key versions lost", s.get("rpo_key_versions_lost")),
            ("RPO: DEKs lost", s.get("rpo_deks_lost")),
            ("tenants moved", s.get("tenants_moved")),
            ("tenants refused", len(s.get("tenants_refused") or [])),
            ("DEKs verified", s.get("deks_verified")),
            ("rotations during the outage", s.get("rotations_during_outage")),
            ("stale events fenced", s.get("stale_events_fenced")),
            ("duration", f"{s.get('duration_seconds', 0):.1f} s"),
        ]
        out.append("<table class='fig'>")
        out += [
            f"<tr><td>{esc(k)}</td><td>{esc('n/a' if v is None else str(v))}</td></tr>"
            for k, v in figures
        ]
        out.append("</table>")
        out.append("<p>Rotations per region (dots: L3; larger dots: L2; black: stale epoch); "
                   "the shaded band is the fault window.</p>")
        out.append(_svg_timeline(s))
        out.append("<table><tr><th>check</th><th>result</th><th>detail</th></tr>")
        for c in s["checks"]:
            cls = "ok" if c["passed"] else "bad"
            out.append(
                f"<tr><td>{esc(c['name'])}</td><td class='{cls}'>"
                f"{'pass' if c['passed'] else 'FAIL'}</td><td>{esc(c['detail'])}</td></tr>"
            )
        out.append("</table>")
        if s.get("tenants_refused"):
            out.append("<details><summary>tenants refused</summary><table>"
                       "<tr><th>tenant</th><th>reason</th></tr>")
            out += [
                f"<tr><td>{esc(r['tenant'])}</td><td>{esc(r['reason'])}</td></tr>"
                for r in s["tenants_refused"]
            ]
            out.append("</table></details>")
        out.append("<details><summary>timeline of actions</summary><table>")
        out += [
            f"<tr><td>{a['t']:.2f} s</td><td>{esc(a['action'])}</td></tr>"
            for a in s.get("timeline") or []
        ]
        out.append("</table></details>")
    out.append("</body></html>\n")
    return "".join(out)


def _fmt_rto(s: dict[str, Any]) -> str:
    if s.get("rto_seconds") is None:
        return "n/a"
    target = s.get("rto_target_seconds")
    return f"{s['rto_seconds']:.2f} s" + (f" (target {target:.0f} s)" if target else "")
