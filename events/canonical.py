"""One stable JSON form for everything that is signed or hashed.

Keys sorted, no insignificant whitespace, UTF-8, no floats (the models carry none).
"""

from __future__ import annotations

import json
from typing import Any


def canonical_bytes(obj: Any) -> bytes:
    """Canonical JSON bytes of a JSON-compatible value (dicts, lists, str, int, bool, None)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
