"""`openkcm drill SCENARIO`: a DR drill end to end on an embedded stack of real processes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from openkcm.drill import SCENARIOS, DrillConfig, run_scenario
from openkcm.options import add_common
from openkcm.report import ScenarioResult, write_reports


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("drill", help="run a DR drill (partition, region-loss, registry-loss, "
                                     "split-brain or all) on real processes, with reports")
    p.add_argument("scenario", choices=(*SCENARIOS, "all"))
    p.add_argument("--tenants", type=int, default=24, help="tenants to load (default 24)")
    p.add_argument("--regions", type=int, default=3, choices=(2, 3, 4, 5))
    p.add_argument("--deks-per-tenant", type=int, default=2)
    p.add_argument("--report-dir", type=Path, default=Path("drill-report"))
    p.add_argument("--rto-target", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--outage", type=float, default=8.0,
                   help="seconds each fault lasts where it has a duration (default 8)")
    p.add_argument("--l3-period", default="3s", help="rotation period during the drill")
    p.add_argument("--deny-survivor-l1", action="store_true", help=argparse.SUPPRESS)
    add_common(p, "format")
    p.set_defaults(handler=run, parser=p)


def run(args: argparse.Namespace) -> int:
    if args.tenants < args.regions * 3:
        args.parser.error(f"--tenants must be at least {args.regions * 3} (three allow-list "
                          "shapes per region)")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    config = DrillConfig(
        tenants=args.tenants, regions=args.regions, deks_per_tenant=args.deks_per_tenant,
        rto_target_seconds=args.rto_target, outage_seconds=args.outage,
        l3_period=args.l3_period, deny_survivor_l1=args.deny_survivor_l1,
        work_dir=args.report_dir / "work",
    )
    quiet = args.format == "json" or not sys.stderr.isatty()
    results: list[ScenarioResult] = []
    started = time.monotonic()

    def progress(message: str) -> None:
        if not quiet:
            from rich.console import Console

            Console(stderr=True).log(message)
        elif args.format != "json":
            print(message, file=sys.stderr, flush=True)

    try:
        for name in names:
            results.append(run_scenario(name, config, progress))
    except KeyboardInterrupt:
        print("interrupted: every process of the drill was stopped", file=sys.stderr)
        write_reports(results, args.report_dir, _meta(args, started))
        return 130
    write_reports(results, args.report_dir, _meta(args, started))
    passed = all(r.passed for r in results)
    if args.format == "json":
        print(json.dumps({"passed": passed, "report": str(args.report_dir / "report.json"),
                          "scenarios": {r.scenario: r.passed for r in results}}))
    else:
        from openkcm.output import emit

        emit([{"scenario": r.scenario, "passed": r.passed,
               "rto_s": r.rto_seconds, "rpo_versions_lost": r.rpo_key_versions_lost,
               "rpo_deks_lost": r.rpo_deks_lost, "deks_verified": r.deks_verified,
               "failed_checks": ", ".join(r.failed_checks()) or (r.error or "")}
              for r in results], "table", title="DR drill")
        print(f"reports: {args.report_dir / 'report.json'}, {args.report_dir / 'report.html'}")
    return 0 if passed else 1


def _meta(args: argparse.Namespace, started: float) -> dict[str, object]:
    return {
        "summary": f"scenario {args.scenario}, {args.tenants} tenants, {args.regions} regions, "
                   f"{time.monotonic() - started:.0f}s",
        "config": {"tenants": args.tenants, "regions": args.regions,
                   "deks_per_tenant": args.deks_per_tenant, "l3_period": args.l3_period,
                   "rto_target_seconds": args.rto_target, "outage_seconds": args.outage},
    }
