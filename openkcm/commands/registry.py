"""`openkcm registry`: run the Global Registry (HTTP API + relay) in one process.

Prints its bound URL once listening (one line; `{"url": ...}` in json mode), so a port-0 server
can be found. SIGTERM or SIGINT stop it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from datetime import timedelta

from events.ids import is_region
from openkcm.options import _env, add_common, duration, require

log = logging.getLogger("openkcm.registry")


def _regions(text: str) -> frozenset[str]:
    names = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in names if not is_region(r)]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of region names, got {text!r}"
        )
    return frozenset(names)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("registry", help="run the Global Registry (HTTP API + relay to Kafka)")
    add_common(p, "bootstrap", "data-dir", "http", "trust-dir", "format")
    p.add_argument(
        "--regions",
        type=_regions,
        default=_env("REGIONS"),
        help="catalogue of valid regions, comma-separated (env OPENKCM_REGIONS)",
    )
    p.add_argument(
        "--purge-grace",
        type=duration,
        default=duration(_env("PURGE_GRACE", "7d") or "7d"),
        help="how long a deleted tenant can be restored (default 7d; env OPENKCM_PURGE_GRACE)",
    )
    p.add_argument(
        "--admin-token",
        default=_env("ADMIN_TOKEN"),
        help="bearer token required for writes (env OPENKCM_ADMIN_TOKEN; default: none)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=64 * 1024,
        help="largest accepted request body in bytes (default 65536)",
    )
    p.set_defaults(handler=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    require(parser, args, "data-dir", "regions", "bootstrap-servers")
    if isinstance(args.regions, str):
        args.regions = _regions(args.regions)
    try:
        return asyncio.run(_serve(args))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from registry_service.api import create_app
    from registry_service.service import RegistryConfig, RegistryService

    grace: timedelta = args.purge_grace
    config = RegistryConfig(
        data_dir=args.data_dir,
        regions=args.regions,
        bootstrap_servers=args.bootstrap_servers,
        trust_dir=args.trust_dir,
        purge_grace=grace,
        admin_token=args.admin_token or None,
        max_body_bytes=args.max_body,
    )
    service = RegistryService(config)
    app = create_app(service)

    host, port = args.http
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    bound_port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{bound_port}"

    server = _Server(
        uvicorn.Config(
            app,
            log_level=args.log_level.lower() if args.log_level != "INFO" else "warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_exit)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        if args.format == "json":
            line = json.dumps(
                {"url": url, "frozen": service.frozen, "reason": service.frozen_reason}
            )
        else:
            line = f"registry listening on {url}" + (" (FROZEN)" if service.frozen else "")
        print(line, flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()
        sock.close()
    return 0 if server.started else 1


class _Server:
    """uvicorn.Server without its own signal capture (we exit 0 on SIGTERM, not re-raise)."""

    def __init__(self, config: object) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self._server = Server(config)  # type: ignore[arg-type]

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    @property
    def should_exit(self) -> bool:
        return bool(self._server.should_exit)

    def request_exit(self) -> None:
        self._server.should_exit = True

    async def serve(self, sockets: list[socket.socket]) -> None:
        await self._server.serve(sockets=sockets)
