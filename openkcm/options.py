"""Common command-line options; each also reads an `OPENKCM_*` environment variable."""

from __future__ import annotations

import argparse
import os
import re
from datetime import timedelta
from pathlib import Path

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `2s`, `500ms`, `0s` (a bare number means seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90d, 12h, 2s)")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"OPENKCM_{name}", default)


def add_common(parser: argparse.ArgumentParser, *which: str) -> None:
    """Add the named common options: bootstrap, data-dir, http, trust-dir, format, log-level."""
    if "bootstrap" in which:
        parser.add_argument(
            "--bootstrap-servers",
            default=_env("BOOTSTRAP_SERVERS", os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
            help="Kafka bootstrap servers (env OPENKCM_BOOTSTRAP_SERVERS)",
        )
    if "data-dir" in which:
        parser.add_argument(
            "--data-dir", type=Path, default=_env("DATA_DIR"), help="state directory"
        )
    if "http" in which:
        parser.add_argument(
            "--http",
            type=host_port,
            default=host_port(_env("HTTP", "127.0.0.1:0") or "127.0.0.1:0"),
            help="HOST:PORT to serve HTTP on (env OPENKCM_HTTP)",
        )
    if "trust-dir" in which:
        parser.add_argument(
            "--trust-dir",
            type=Path,
            default=_env("TRUST_DIR"),
            help="directory of trusted public keys (env OPENKCM_TRUST_DIR)",
        )
    if "format" in which:
        parser.add_argument(
            "--format",
            choices=("table", "json"),
            default=_env("FORMAT", "table"),
            help="output format",
        )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
    )


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit 2 with a usage message if a required option (flag or env) is missing."""
    missing = [n for n in names if getattr(args, n.replace("-", "_"), None) in (None, "")]
    if missing:
        parser.error("missing " + ", ".join(f"--{n}" for n in missing))
