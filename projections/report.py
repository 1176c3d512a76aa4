"""`openkcm audit report`: the summary, the findings and the rotation cadence per region,
as JSON or as one self-contained HTML page with an inline SVG chart (no external assets)."""

from __future__ import annotations

import html
from typing import Any

from projections import views
from projections.rules import State

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def report_data(
    tenants: dict[str, State], findings: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    return {
        "summary": views.summary(tenants, findings, now).model_dump(mode="json"),
        "findings": findings,
        "cadence": views.cadence(tenants),
    }


def cadence_svg(cadence: dict[str, Any], width: int = 760, height: int = 280) -> str:
    """Rotations per month, one line per region."""
    regions = cadence.get("regions", {})
    months = sorted({m for r in regions.values() for m in r["per_month"]})
    left, right, top, bottom = 50, 160, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Rotations per month per region">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
    ]
    if not months:
        parts.append(f'<text x="{left}" y="{top + 20}">no rotations recorded</text></svg>')
        return "".join(parts)
    peak = max(max(r["per_month"].values()) for r in regions.values()) or 1
    step = plot_w / max(len(months) - 1, 1)

    def x(i: int) -> float:
        return left + i * step

    def y(v: float) -> float:
        return top + plot_h - v / peak * plot_h

    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="#333"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>'
        f'<text x="{left - 8}" y="{top + 4}" text-anchor="end" font-size="11">{peak}</text>'
        f'<text x="{left - 8}" y="{top + plot_h}" text-anchor="end" font-size="11">0</text>'
        f'<text x="14" y="{top + plot_h / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">rotations per month</text>'
    )
    label_every = max(1, len(months) // 8)
    for i, month in enumerate(months):
        if i % label_every == 0:
            parts.append(
                f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                f'font-size="10">{month}</text>'
            )
    for n, (region, data) in enumerate(sorted(regions.items())):
        colour = COLOURS[n % len(COLOURS)]
        points = " ".join(
            f"{x(i):.1f},{y(data['per_month'].get(m, 0)):.1f}" for i, m in enumerate(months)
        )
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
            f'<rect x="{left + plot_w + 14}" y="{top + n * 18}" width="12" height="12" '
            f'fill="{colour}"/><text x="{left + plot_w + 32}" y="{top + n * 18 + 10}" '
            f'font-size="11">{html.escape(region)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(data: dict[str, Any]) -> str:
    s = data["summary"]
    kinds = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
        for k, v in s["findings_by_kind"].items()
    )
    rows = "".join(
        "<tr>" + "".join(
            f"<td>{html.escape(str(f.get(c) or ''))}</td>"
            for c in ("time", "kind", "tenant_id", "event_id", "layer", "reason")
        ) + "</tr>"
        for f in data["findings"]
    )
    regions = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{d['rotations']}</td>"
        f"<td>{html.escape(', '.join(f'{k}: {v} d' for k, v in d['median_interval_days'].items()))}"
        "</td></tr>"
        for r, d in data["cadence"]["regions"].items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>OpenKCM rotation audit</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;
margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}
th{{background:#f3f3f3}}.big{{font-size:1.4em}}</style></head><body>
<h1>OpenKCM rotation audit</h1>
<p>Generated {html.escape(s['generated_at'])}</p>
<p class="big">{s['tenants']} tenants &middot; {s['compliant']} compliant
({s['compliant_share'] * 100:.1f}%) &middot; {s['findings_total']} findings</p>
<h2>Findings by kind</h2><table><tr><th>kind</th><th>count</th></tr>{kinds}</table>
<h2>Rotation cadence per region</h2>{cadence_svg(data['cadence'])}
<table><tr><th>region</th><th>rotations</th><th>median interval</th></tr>{regions}</table>
<h2>Findings</h2>
<table><tr><th>time</th><th>kind</th><th>tenant</th><th>event</th><th>layer</th><th>reason</th>
</tr>{rows}</table>
</body></html>
"""
