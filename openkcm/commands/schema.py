"""`openkcm schema`: write the JSON Schema of every event and the AsyncAPI 3.0 document."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from events.contract import asyncapi, event_schemas
from openkcm.options import add_common
from openkcm.output import emit


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("schema", help="write the events' JSON Schemas and the AsyncAPI document")
    p.add_argument("--out", type=Path, default=Path("contract"), help="output directory")
    add_common(p, "format")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    (out / "schemas").mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in event_schemas().items():
        path = out / "schemas" / f"{name}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append({"file": str(path), "event": name})
    path = out / "asyncapi.json"
    path.write_text(json.dumps(asyncapi(), indent=2, sort_keys=True) + "\n")
    written.append({"file": str(path), "event": "(all topics)"})
    emit(written, args.format, title="contract written")
    return 0
