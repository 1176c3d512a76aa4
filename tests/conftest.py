"""Shared fixtures: brokers, trust dirs, signing keys.

Broker backends, in order: `KAFKA_BOOTSTRAP_SERVERS` (a real Kafka), testcontainers' Kafka when
`OPENKCM_TEST_BROKER=testcontainers` and Docker answers, otherwise the embedded Tansu broker.
Tests never need Docker.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from events.signing import SigningKey, TrustStore, publish_public_key
from openkcm.broker import EmbeddedBroker


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One broker for the whole session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if os.environ.get("OPENKCM_TEST_BROKER") == "testcontainers" and _docker_works():
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of this test's own (starts in milliseconds), which the test may stop and
    restart. Skipped against an external Kafka, which a test cannot restart."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("needs a broker the test can stop and restart (embedded only)")
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        yield broker


@pytest.fixture
def trust_dir(tmp_path: Path) -> Path:
    path = tmp_path / "trust"
    path.mkdir()
    return path


@pytest.fixture
def registry_key(trust_dir: Path) -> SigningKey:
    key = SigningKey.generate("registry")
    publish_public_key(key, trust_dir)
    return key


@pytest.fixture
def trust(trust_dir: Path, registry_key: SigningKey) -> TrustStore:
    return TrustStore(trust_dir)
