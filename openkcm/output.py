"""Printing results as a table (rich) or JSON, per `--format`."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def emit(
    result: Mapping[str, Any] | Sequence[Mapping[str, Any]], fmt: str, title: str = ""
) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        sys.stdout.flush()
        return
    # a pipe or a CI log has no width: do not squeeze the table into 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=160)
    rows = [result] if isinstance(result, Mapping) else list(result)
    if not rows:
        console.print(f"{title}: nothing" if title else "nothing")
        return
    table = Table(title=title or None)
    columns = list(rows[0].keys())
    for col in columns:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)
