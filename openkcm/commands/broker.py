"""`openkcm broker`: run the embedded Kafka-compatible broker in the foreground."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openkcm.broker import BrokerUnavailable, run_foreground
from openkcm.options import add_common


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("broker", help="start the embedded Kafka-compatible broker (Tansu)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9092, help="0 picks a free port")
    p.add_argument("--log-file", type=Path, default=None, help="broker log (default: discard)")
    add_common(p, "format")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    def announce(bootstrap: str) -> None:
        if args.format == "json":
            print(json.dumps({"bootstrap_servers": bootstrap}), flush=True)
        else:
            print(f"broker ready: {bootstrap}", flush=True)

    try:
        return run_foreground(args.host, args.port, args.log_file, announce)
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
