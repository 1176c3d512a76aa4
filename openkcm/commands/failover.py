"""`openkcm failover --from R1 --to R2`: declare a region failover (works without the Registry)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from events.ids import is_region, is_tenant_id
from events.kafka import KafkaSettings
from openkcm.failover import DEFAULT_OPERATOR_KEY_DIR, as_row, declare_failover
from openkcm.options import add_common, require
from openkcm.output import emit


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("failover", help="declare a region failover (RegionFailover event)")
    p.add_argument("--from", dest="from_region", required=True, help="the lost region")
    p.add_argument("--to", dest="to_region", required=True, help="the survivor region")
    p.add_argument("--tenant", action="append", dest="tenants", default=None,
                   help="move only this tenant (repeatable); default: every tenant")
    p.add_argument("--epoch", type=int, default=None,
                   help="new ownership epoch (default: one above any declared so far)")
    p.add_argument("--operator-key-dir", type=Path, default=DEFAULT_OPERATOR_KEY_DIR,
                   help="where the operator signing key lives (created on first use; its "
                        "public key is published into --trust-dir)")
    add_common(p, "bootstrap", "trust-dir", "format")
    p.set_defaults(handler=run, parser=p)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    require(parser, args, "bootstrap-servers", "trust-dir")
    for region in (args.from_region, args.to_region):
        if not is_region(region):
            parser.error(f"not a region name: {region!r} (like eu-central-1)")
    if args.from_region == args.to_region:
        parser.error("--from and --to must differ")
    for tenant in args.tenants or []:
        if not is_tenant_id(tenant):
            parser.error(f"not a tenant id: {tenant!r}")
    if args.epoch is not None and args.epoch < 2:
        parser.error("--epoch must be at least 2")
    try:
        declared = asyncio.run(
            declare_failover(
                KafkaSettings(args.bootstrap_servers),
                from_region=args.from_region,
                to_region=args.to_region,
                trust_dir=args.trust_dir,
                key_dir=args.operator_key_dir,
                tenants=args.tenants,
                epoch=args.epoch,
            )
        )
    except Exception as exc:  # noqa: BLE001 - report any failure as exit 1 with its reason
        print(f"error: failover not declared: {exc}", file=sys.stderr)
        return 1
    emit(as_row(declared), args.format, title="failover declared")
    return 0
