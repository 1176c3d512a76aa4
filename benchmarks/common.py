"""Shared helpers for benchmarks: repeat a measurement, report medians as JSON."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def rate(fn: Callable[[], int], repeats: int = 5) -> dict[str, float]:
    """Run `fn` (returns how many operations it did) `repeats` times; median ops/s."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return {"median_per_s": round(statistics.median(rates)), "min_per_s": round(min(rates)),
            "max_per_s": round(max(rates)), "repeats": repeats}


def report(name: str, results: dict[str, Any]) -> None:
    out = {
        "benchmark": name,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
