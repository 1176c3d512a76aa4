"""`openkcm replay`: verify a Core's data dir against its own log and the topics
(`--verify`), or rebuild a region's state from the topics into an empty data dir."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from contextlib import nullcontext
from typing import Any

from core_service.replay import verify_against_topics, verify_local
from events.kafka import KafkaSettings
from events.signing import TrustStore
from openkcm.options import add_common, duration, require
from openkcm.output import emit


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("replay", help="verify a Core's state against its log and the topics "
                                      "(--verify), or rebuild a region from the topics")
    p.add_argument("--verify", action="store_true",
                   help="recompute the state of --data-dir from its log and compare; with "
                        "--bootstrap-servers also compare its timeline with kcm.core.keys")
    p.add_argument("--region", default=None,
                   help="rebuild this region into the empty --data-dir (with --verify: check "
                        "the data dir belongs to it)")
    p.add_argument("--l1", default=None, help="L1 provider URI for a rebuild (local:PATH, "
                                              "pkcs11:...)")
    p.add_argument("--vault", default=None, help="vault URI for a rebuild (default: RocksDB "
                                                 "vault inside the data dir)")
    p.add_argument("--purge-grace", type=duration, default=duration("7d"),
                   help="grace of purges a rebuild has to schedule (default 7d)")
    add_common(p, "bootstrap", "data-dir", "trust-dir", "format")
    p.set_defaults(handler=run, parser=p)


def _progress(enabled: bool) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("replaying log"), BarColumn(), MofNCompleteColumn(),
                    transient=True)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.data_dir is None:
        parser.error("missing --data-dir")
    if not args.verify:
        return run_rebuild(parser, args)
    if not (args.data_dir / "log").is_dir():
        parser.error(f"{args.data_dir} holds no Core event log")
    trust = TrustStore(args.trust_dir) if args.trust_dir else None
    show = args.format != "json" and sys.stderr.isatty()
    with _progress(show) as bar:
        task = bar.add_task("replay", total=None) if bar is not None else None

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.update(task, completed=done, total=total)

        try:
            report, own, relay_pos = verify_local(args.data_dir, trust, progress)
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {args.data_dir}: {exc}", file=sys.stderr)
            return 1
    if args.region and args.region != report.region:
        parser.error(f"--region {args.region} but the data dir belongs to {report.region}")
    if args.bootstrap_servers:
        if trust is None:
            parser.error("comparing with the topics needs --trust-dir")
        asyncio.run(verify_against_topics(
            report, own, relay_pos, KafkaSettings(args.bootstrap_servers), trust))
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        emit({k: v for k, v in report.as_dict().items() if k != "differences"}, "table",
             title=f"replay --verify {report.region}")
        if report.differences:
            emit([{"kind": d.kind, "tenant": d.tenant_id, "detail": d.detail}
                  for d in report.differences], "table", title="differences")
    return 0 if report.clean else 1


def run_rebuild(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from core_service.rebuild import rebuild
    from events.ids import is_region

    require(parser, args, "region", "bootstrap-servers", "trust-dir", "l1")
    if not is_region(args.region):
        parser.error(f"not a region name: {args.region!r}")
    log_dir = args.data_dir / "log"
    if log_dir.exists() and any(log_dir.iterdir()):
        parser.error(f"{args.data_dir} already holds a Core event log: rebuild into an empty "
                     "dir (or use --verify)")

    def say(message: str) -> None:
        if args.format != "json":
            print(message, file=sys.stderr, flush=True)

    try:
        report = asyncio.run(rebuild(
            args.region, args.data_dir, KafkaSettings(args.bootstrap_servers), args.trust_dir,
            args.l1, args.vault, args.purge_grace.total_seconds(), say))
    except (OSError, ValueError) as exc:
        print(f"error: rebuild failed: {exc}", file=sys.stderr)
        return 1
    result = {**report.__dict__, "ok": report.ok}
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        emit({k: v for k, v in result.items() if k != "refused"}, "table",
             title=f"replay {args.region} into {args.data_dir}")
        if report.refused:
            emit(report.refused, "table", title="tenants not rebuilt")
    return 0 if report.ok else 1
