"""`openkcm core`: run a Regional Core (lifecycle consumer, scheduler, relay, Gateway HTTP)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from openkcm.options import add_common, duration, require


def share(text: str) -> float:
    """A fraction between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("core", help="run a Regional Core")
    env = os.environ.get
    p.add_argument("--region", default=env("OPENKCM_REGION"), help="this Core's region")
    p.add_argument("--registry-url", default=env("OPENKCM_REGISTRY_URL"),
                   help="the Registry's base URL (health probe; signed snapshot for "
                        "reconciliation and hydration)")
    p.add_argument("--l1", default=env("OPENKCM_L1"),
                   help="L1 provider URI: local:PATH, pkcs11:...")
    p.add_argument("--vault", default=env("OPENKCM_VAULT"),
                   help="vault URI: rocksdb:PATH or fs:PATH (default: RocksDB in the data dir)")
    p.add_argument("--l3-period", type=duration, default=duration(env("OPENKCM_L3_PERIOD", "90d")))
    p.add_argument("--l2-period", type=duration,
                   default=duration(env("OPENKCM_L2_PERIOD", "365d")))
    p.add_argument("--purge-grace", type=duration,
                   default=duration(env("OPENKCM_PURGE_GRACE", "7d")))
    p.add_argument("--reconcile-interval", type=duration,
                   default=duration(env("OPENKCM_RECONCILE_INTERVAL", "10m")),
                   help="how often to reconcile the tenant set against a Registry snapshot "
                        "(also at startup and when a link comes back); 0 = only then")
    p.add_argument("--reconcile-max-purge-share", type=share,
                   default=share(env("OPENKCM_RECONCILE_MAX_PURGE_SHARE", "0.1")),
                   help="refuse a reconciliation pass that would schedule the purge of more "
                        "than this share of the served tenants (at least one is allowed)")
    # Drills and tests: a faster clock and a shorter scheduler tick.
    p.add_argument("--clock-speed", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tick", type=float, default=float(env("OPENKCM_CORE_TICK", "1.0")),
                   help=argparse.SUPPRESS)
    add_common(p, "bootstrap", "data-dir", "http", "trust-dir", "format")
    p.set_defaults(handler=run, parser=p)


class QuietRepeats(logging.Filter):
    """Lets the first record of each (logger, message template) of the Kafka client through,
    then at most one per `window` seconds with the count it stood for: while a link is cut for
    days, aiokafka retries every 100 ms and would log ~100 lines a second."""

    def __init__(self, prefix: str = "aiokafka", window: float = 60.0) -> None:
        super().__init__()
        self.prefix = prefix
        self.window = window
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last, suppressed = self._seen.get(key, (-1e18, 0))
        if now - last < self.window:
            self._seen[key] = (last, suppressed + 1)
            return False
        self._seen[key] = (now, 0)
        if suppressed:
            record.msg = f"{record.msg} [{suppressed} like it in the last {self.window:.0f} s]"
        return True


def run(args: argparse.Namespace) -> int:
    require(args.parser, args, "region", "data-dir", "bootstrap-servers", "trust-dir", "l1")
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietRepeats())
    from core_service.service import ServiceConfig
    from core_service.service import run as run_core

    host, port = args.http
    cfg = ServiceConfig(
        region=args.region,
        data_dir=args.data_dir,
        bootstrap_servers=args.bootstrap_servers,
        trust_dir=args.trust_dir,
        l1=args.l1,
        vault=args.vault,
        registry_url=args.registry_url,
        host=host,
        port=port,
        l3_period=args.l3_period.total_seconds(),
        l2_period=args.l2_period.total_seconds(),
        purge_grace=args.purge_grace.total_seconds(),
        tick=args.tick,
        clock_speed=args.clock_speed,
        reconcile_interval=args.reconcile_interval.total_seconds(),
        reconcile_max_purge_share=args.reconcile_max_purge_share,
    )

    def announce(url: str) -> None:
        if args.format == "json":
            print(json.dumps({"region": args.region, "url": url}), flush=True)
        else:
            print(f"core {args.region} serving: {url}", flush=True)

    try:
        return run_core(cfg, announce)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
