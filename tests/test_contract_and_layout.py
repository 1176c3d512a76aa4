"""The generated contract, the package dependency rules of DESIGN.md, and the CLI surface."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from events.contract import asyncapi, event_schemas
from events.envelope import encode
from events.models import PAYLOADS
from tests.factories import sample_envelopes

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["events", "plugins", "registry_service", "core_service", "projections", "openkcm"]

# What each package may import of the project (DESIGN.md, "Packages").
ALLOWED = {
    "events": set(),
    "plugins": {"events"},
    "registry_service": {"events"},
    "core_service": {"events", "plugins", "registry_service.client"},
    "projections": {"events"},
    "openkcm": set(PACKAGES),
}


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_rules(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    violations = []
    for path in (ROOT / package).rglob("*.py"):
        for name in _project_imports(path):
            top = name.split(".")[0]
            if top in allowed or any(name == a or name.startswith(a + ".") for a in allowed):
                continue
            violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def test_nothing_imports_openkcm_outside_itself() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        if pkg != "openkcm"
        for p in (ROOT / pkg).rglob("*.py")
        if any(n.split(".")[0] == "openkcm" for n in _project_imports(p))
    ]
    assert offenders == []


def test_every_event_has_a_json_schema_that_accepts_its_sample() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = event_schemas()
    assert set(PAYLOADS) <= set(schemas)
    for env in sample_envelopes():
        instance = json.loads(encode(env))
        jsonschema.validate(instance, schemas[env.type])
        wrong = {**instance, "type": "Nope"}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schemas[env.type])


def test_asyncapi_document_names_every_topic_and_message() -> None:
    doc = asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {
        "kcm.registry.lifecycle", "kcm.registry.tenants", "kcm.core.keys",
        "kcm.core.material", "kcm.dlq",
    }
    referenced = {
        ref["$ref"].rsplit("/", 1)[1]
        for c in doc["channels"].values()
        for ref in c["messages"].values()
    }
    assert set(PAYLOADS) <= referenced
    assert referenced <= set(doc["components"]["messages"])


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openkcm.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def test_cli_help_and_usage_errors() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    assert "broker" in out.stdout and "schema" in out.stdout
    assert _cli("no-such-command").returncode == 2
    assert _cli().returncode == 2


def test_schema_command_writes_the_contract(tmp_path: Path) -> None:
    out = _cli("schema", "--out", str(tmp_path), "--format", "json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert len(listed) == len(PAYLOADS) + 2
    doc = json.loads((tmp_path / "asyncapi.json").read_text())
    assert doc["asyncapi"] == "3.0.0"
    assert (tmp_path / "schemas" / "TenantCreated.json").exists()


def test_broker_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal

    from openkcm.broker import wait_until_ready

    proc = subprocess.Popen(
        [sys.executable, "-m", "openkcm.cli", "broker", "--port", "0", "--format", "json",
         "--log-file", str(tmp_path / "b.log")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        bootstrap = json.loads(line)["bootstrap_servers"]
        wait_until_ready(bootstrap, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        host, port = bootstrap.rsplit(":", 1)
        import socket

        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()
