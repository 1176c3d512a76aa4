"""The canonical JSON of `events.canonical` (sorted keys, no whitespace, UTF-8, no floats),
produced with orjson: byte-identical for the values the Core's events carry (strings, ints,
booleans, None, lists, objects), several times faster. `tests/test_core_state.py` checks the
identity; signatures are verified against `events.canonical` by every consumer."""

from __future__ import annotations

from typing import Any

import orjson

_OPTS = orjson.OPT_SORT_KEYS


def canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=_OPTS)
