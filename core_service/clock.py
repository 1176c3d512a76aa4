"""Time for the Core: an injectable clock, timestamps and durations.

Inside the Core a time is a float of UTC seconds since the epoch; on events it is an ISO 8601
string with microseconds and `Z`. The fold always parses the string, so the live path and a
replay of the log compute identical state.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Protocol

DAY = 86_400.0
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


class Clock(Protocol):
    def now(self) -> float:
        """UTC seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock a test moves by hand."""

    def __init__(self, start: float) -> None:
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


class ScaledClock:
    """Runs `speed` times faster than real time from `start` (drills and tests: a simulated
    year in seconds)."""

    def __init__(self, speed: float, start: float | None = None) -> None:
        self.speed = float(speed)
        self.start = time.time() if start is None else float(start)
        self._m0 = time.monotonic()

    def now(self) -> float:
        return self.start + (time.monotonic() - self._m0) * self.speed


def iso(ts: float) -> str:
    """The event form of a timestamp (microsecond precision, UTC, `Z`)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_duration(text: str | int | float) -> float:
    """Seconds of `90d`, `12h`, `30m`, `2s`, `500ms` (a bare number means seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 90d, 12h, 2s)")
    return int(match.group(1)) * _UNITS[match.group(2)]
