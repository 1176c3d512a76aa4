"""One-shot: create the `local` L1 keyrings of the compose deployment, each serving only the
regions named for it (sovereignty), before any Core opens them.

Usage: python /opt/openkcm/l1_init.py PATH=REGION[,REGION...] [PATH=...]

Idempotent: an existing keyring keeps its keys; only its region list is brought in line with
the argument (so editing docker-compose.yml narrows or widens a keyring on the next `up`).
Prints each keyring's regions and key check values, never key bytes.

The `local` provider is a software stand-in for the customer's KMS/HSM: the keyring file holds
the L1 root keys (mode 0600). Production uses `--l1 pkcs11:...` against an HSM instead.
"""

from __future__ import annotations

import json
import sys

from events.ids import is_region
from plugins.l1_local import create_keyring, keyring_info, set_regions


def parse(spec: str) -> tuple[str, list[str]]:
    path, sep, regions_text = spec.partition("=")
    regions = [r.strip() for r in regions_text.split(",") if r.strip()]
    if not sep or not path or not regions or not all(is_region(r) for r in regions):
        raise ValueError(f"expected PATH=REGION[,REGION...], got {spec!r}")
    return path, regions


def ensure(path: str, regions: list[str]) -> dict[str, object]:
    created = create_keyring(path, regions, exist_ok=True)
    if not created and keyring_info(path)["regions"] != regions:
        set_regions(path, regions)
    info = keyring_info(path)
    return {"path": path, "created": created, **info}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        specs = [parse(a) for a in argv]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, regions in specs:
        print(json.dumps(ensure(path, regions), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
