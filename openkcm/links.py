"""Network links a drill can cut: a Kafka link (Tansu's proxy, which advertises itself, so a
client's whole Kafka traffic goes through it) and a TCP link (for HTTP to the Registry).
Cutting refuses new connections and drops open ones; healing listens again on the same port.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from openkcm.broker import broker_binary, free_port


@dataclass
class KafkaLink:
    """A Kafka-protocol proxy in front of the broker for one client (a Core)."""

    origin: str
    log_path: Path | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> KafkaLink:
        if self.port == 0:
            self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [broker_binary(), "proxy", "--listener-url", url,
                 "--advertised-listener-url", url, "--origin-url", f"tcp://{self.origin}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        from openkcm.broker import wait_until_ready

        wait_until_ready(self.bootstrap, timeout=15)
        return self

    def cut(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def heal(self) -> None:
        if self.process is None:
            self.start()

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None


class TcpLink:
    """A TCP forwarder on 127.0.0.1 running in its own thread and event loop."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._conns.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._conns.difference_update({writer, up_writer})

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._conns):
            writer.close()
        self._conns.clear()

    def start(self) -> TcpLink:
        self._call(self._listen())
        return self

    def cut(self) -> None:
        self._call(self._close())

    def heal(self) -> None:
        if self._server is None:
            self._call(self._listen())

    @property
    def up(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
