"""Container healthcheck: exit 0 if GET URL answers 2xx within the timeout, else 1.

python:3.11-slim has no curl; this uses the standard library only.
Usage: python /opt/openkcm/healthcheck.py http://127.0.0.1:8080/healthz [timeout_s]
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 3.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local URL
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: healthcheck.py URL [TIMEOUT_S]", file=sys.stderr)
        return 2
    return check(argv[0], float(argv[1]) if len(argv) == 2 else 3.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
