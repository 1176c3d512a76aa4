"""`openkcm audit`: run the rotation-audit projection; `openkcm audit report`: write its report.

    openkcm audit --bootstrap-servers B --data-dir D --http H:P --trust-dir T \\
                  [--l3-period 90d --l2-period 365d --overdue-grace 1d \\
                   --region-policy eu-central-1:L3=30d,L2=180d ...]
    openkcm audit report --format json|html --out FILE (--data-dir D | --url URL)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

from openkcm.options import add_common, duration, require


def _region_policy(text: str) -> tuple[str, dict[str, timedelta]]:
    region, sep, rest = text.partition(":")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected REGION:L3=90d,L2=365d, got {text!r}")
    periods: dict[str, timedelta] = {}
    for part in rest.split(","):
        layer, eq, value = part.partition("=")
        if not eq or layer.upper() not in ("L2", "L3"):
            raise argparse.ArgumentTypeError(f"expected L2=... or L3=..., got {part!r}")
        periods[layer.upper()] = duration(value)
    return region, periods


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "audit",
        help="run the rotation-audit projection (faust); `audit report` writes its report",
        description="Without a subcommand: run the audit app. `openkcm audit report` writes "
        "the summary, findings and cadence chart as JSON or HTML.",
    )
    add_common(p, "bootstrap", "data-dir", "http", "trust-dir")
    p.add_argument("--l3-period", type=duration, default=duration("90d"))
    p.add_argument("--l2-period", type=duration, default=duration("365d"))
    p.add_argument("--overdue-grace", type=duration, default=duration("1d"))
    p.add_argument("--region-policy", type=_region_policy, action="append", default=[],
                   metavar="REGION:L3=D,L2=D", help="rotation periods of one region")
    p.add_argument("--lifecycle-lag", type=duration, default=duration("60s"),
                   help="how long a Core may rotate after a deletion before it is flagged")
    p.add_argument("--settle", type=duration, default=duration("15s"),
                   help="how long a check waiting for the other topic stays open")
    p.add_argument("--tick-interval", type=duration, default=duration("5s"))
    p.add_argument("--checkpoint-timeout", type=duration, default=duration("5m"),
                   help="how long an unsigned event may wait for its signed checkpoint")
    p.add_argument("--app-id", default="openkcm-audit",
                   help="consumer group and table namespace (one per audit deployment)")
    p.set_defaults(handler=lambda args: _run(p, args))
    reports = p.add_subparsers(dest="audit_command", metavar="report")
    r = reports.add_parser("report", help="write the audit report (JSON or HTML)")
    r.add_argument("--format", choices=("json", "html"), default="json")
    r.add_argument("--out", type=Path, required=True, help="file to write")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", type=Path, dest="report_data_dir",
                     help="read the audit table of this data dir (read-only)")
    src.add_argument("--url", help="ask a running audit app, e.g. http://127.0.0.1:8088")
    r.add_argument("--log-level", default="WARNING", type=str.upper)
    r.set_defaults(handler=_report)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    require(parser, args, "bootstrap-servers", "data-dir", "trust-dir")
    from projections.app import AuditConfig, run
    from projections.rules import Policy

    policy = Policy(
        l3_period=args.l3_period,
        l2_period=args.l2_period,
        grace=args.overdue_grace,
        regions=dict(args.region_policy),
        lifecycle_lag=args.lifecycle_lag,
        settle=args.settle,
    )
    host, port = args.http

    def announce(url: str) -> None:
        print(url, flush=True)

    cfg = AuditConfig(
        bootstrap_servers=args.bootstrap_servers,
        data_dir=Path(args.data_dir),
        trust_dir=Path(args.trust_dir),
        host=host,
        port=port,
        policy=policy,
        tick_interval=max(args.tick_interval.total_seconds(), 0.2),
        app_id=args.app_id,
        checkpoint_timeout=args.checkpoint_timeout.total_seconds(),
        announce=announce,
    )
    try:
        return run(cfg, args.log_level)
    except Exception as exc:  # noqa: BLE001 - reported, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _report(args: argparse.Namespace) -> int:
    from projections import views
    from projections.report import render_html, report_data

    try:
        if args.url:
            import httpx

            resp = httpx.get(args.url.rstrip("/") + "/v1/audit/report", timeout=30)
            resp.raise_for_status()
            data = resp.json()
        else:
            tenants, findings = views.split(views.read_store(args.report_data_dir))
            data = report_data(tenants, findings, time.time())
        text = render_html(data) if args.format == "html" else json.dumps(data, indent=2)
        args.out.write_text(text)
    except Exception as exc:  # noqa: BLE001 - reported, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), **data["summary"]}), flush=True)
    return 0
