"""A stack of real processes for drills and end-to-end tests: the embedded broker, the
Registry and regional Cores, each on a free port, with faults to inject (SIGKILL, SIGSTOP) and
a guarantee that nothing is left running afterwards, on failure or Ctrl-C included.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from openkcm.broker import EmbeddedBroker, free_port

_LIVE: weakref.WeakSet[Service] = weakref.WeakSet()


def _kill_all_live() -> None:
    for service in list(_LIVE):
        service.kill()


atexit.register(_kill_all_live)


class ServiceFailed(RuntimeError):
    """A service exited or did not announce its URL in time; the message quotes its log."""


def _url_from_line(line: str) -> str | None:
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for value in data.values():
            if isinstance(value, str) and value.startswith("http"):
                return value.rstrip("/")
        return None
    for word in line.split():
        if word.startswith("http://") or word.startswith("https://"):
            return word.rstrip("/")
    return None


@dataclass(eq=False)
class Service:
    """One `openkcm` process. `start` waits for the URL it announces on stdout."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)
    url: str | None = None
    starts: int = 0

    def start(self, timeout: float = 60.0) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openkcm.cli", *self.argv],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        _LIVE.add(self)
        found: list[str] = []
        ready = threading.Event()
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            with open(self.log_path.with_suffix(".stdout"), "a") as out:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    if not ready.is_set():
                        url = _url_from_line(line)
                        if url:
                            found.append(url)
                            ready.set()
            ready.set()

        threading.Thread(target=pump, name=f"{self.name}-stdout", daemon=True).start()
        if not ready.wait(timeout) or not found:
            self.kill()
            raise ServiceFailed(f"{self.name} did not announce its URL:\n{self.tail()}")
        self.url = found[0]
        return self

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL: the crash an operator fears, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: a process that is there but does not answer (a partition)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def restart(self, timeout: float = 60.0) -> Service:
        self.stop()
        return self.start(timeout)


@dataclass
class Stack:
    """The broker plus any number of services under one work directory."""

    root: Path
    broker: EmbeddedBroker | None = None
    bootstrap: str | None = None
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.trust_dir.mkdir(exist_ok=True)

    def start_broker(self) -> str:
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if external:
            self.bootstrap = external
            return external
        self.broker = EmbeddedBroker(log_path=self.root / "broker.log").start()
        self.bootstrap = self.broker.bootstrap
        return self.bootstrap

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, argv, self.root / "logs" / f"{name}.log", env or {})
        self.services[name] = service
        return service

    def registry(
        self, regions: list[str], *, purge_grace: str = "7d", extra: list[str] | None = None
    ) -> Service:
        assert self.bootstrap is not None, "start the broker first"
        argv = [
            "registry",
            "--data-dir", str(self.root / "registry"),
            "--bootstrap-servers", self.bootstrap,
            "--http", f"127.0.0.1:{free_port()}",
            "--regions", ",".join(regions),
            "--trust-dir", str(self.trust_dir),
            "--purge-grace", purge_grace,
            "--format", "json",
            *(extra or []),
        ]
        return self.add("registry", argv)

    def core(
        self,
        region: str,
        *,
        registry_url: str,
        l1: str,
        l3_period: str = "90d",
        l2_period: str = "365d",
        purge_grace: str = "7d",
        extra: list[str] | None = None,
    ) -> Service:
        assert self.bootstrap is not None, "start the broker first"
        argv = [
            "core",
            "--region", region,
            "--data-dir", str(self.root / f"core-{region}"),
            "--bootstrap-servers", self.bootstrap,
            "--registry-url", registry_url,
            "--trust-dir", str(self.trust_dir),
            "--l1", l1,
            "--http", f"127.0.0.1:{free_port()}",
            "--l3-period", l3_period,
            "--l2-period", l2_period,
            "--purge-grace", purge_grace,
            "--format", "json",
            *(extra or []),
        ]
        return self.add(f"core-{region}", argv)

    def close(self) -> None:
        for service in self.services.values():
            service.kill()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_for(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate()` until true or `timeout` seconds pass; exceptions count as false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return True
        except Exception:  # noqa: BLE001
            pass
        time.sleep(interval)
    return False
