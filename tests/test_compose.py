"""The docker compose deployment (compose/), checked without Docker.

Docker does not run where the suite runs, so the deployment is made correct by construction:
the YAML is parsed, every service's command goes through the project's real argparse parser
(a renamed or removed flag fails here), and volumes, ports, healthchecks, the L1 keyrings and
the Dockerfile are checked against what the services need. The two helper scripts the image
ships (healthcheck, L1 keyring init) are run for real.
"""

from __future__ import annotations

import argparse
import fnmatch
import http.server
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from events.ids import is_region

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
DOCKERIGNORE = COMPOSE_DIR / "Dockerfile.dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

IMAGE_PREFIX = "openkcm-global-resilience:"
CORE_REGIONS = {"eu-central-1", "eu-west-1", "us-east-1"}
LONG_RUNNING = ("registry", "audit", *(f"core-{r}" for r in sorted(CORE_REGIONS)))

_INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, *, allow_required: bool = False) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?message}` with an empty environment:
    defaults are taken, required variables become a marker (or fail when not allowed)."""

    def sub(match: re.Match[str]) -> str:
        op, arg = match.group("op"), match.group("arg")
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            if not allow_required:
                raise AssertionError(f"required variable in a command: {match.group(0)}")
            return f"<required {match.group('name')}>"
        return ""

    return _INTERP.sub(sub, value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def parser() -> Iterator[argparse.ArgumentParser]:
    """The real `openkcm` parser, built with no OPENKCM_* variable set (defaults read them)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("OPENKCM_") or name == "KAFKA_BOOTSTRAP_SERVERS":
                mp.delenv(name)
        from openkcm.cli import build_parser

        yield build_parser()


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return set(action.choices)
    raise AssertionError("openkcm has no subcommands")


def project_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in services.items()
        if str(svc.get("image", "")).startswith(IMAGE_PREFIX)
    }


def argv_of(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command")
    assert isinstance(command, list), "use the list form so arguments are never re-split"
    return [interpolate(str(a)) for a in command]


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on an unknown or malformed flag
        raise AssertionError(f"openkcm rejects {argv!r} (exit {exc.code})") from None


def named_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Mount target -> named volume (short syntax `name:/path[:mode]` or long syntax)."""
    out: dict[str, str] = {}
    for vol in svc.get("volumes", []):
        if isinstance(vol, str):
            source, _, rest = vol.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = vol.get("source", ""), vol["target"]
        assert not source.startswith((".", "/", "~")), f"bind mount {vol!r}: use named volumes"
        out[target] = source
    return out


def volume_holding(svc: dict[str, Any], path: str | Path) -> str | None:
    """The named volume whose mount contains `path`, or None (= the read-only image fs)."""
    p = PurePosixPath(str(path))
    best: tuple[int, str] | None = None
    for target, source in named_mounts(svc).items():
        t = PurePosixPath(target)
        if (p == t or t in p.parents) and (best is None or len(t.parts) > best[0]):
            best = (len(t.parts), source)
    return best[1] if best else None


def flag_services(
    parser: argparse.ArgumentParser, services: dict[str, dict[str, Any]]
) -> dict[str, argparse.Namespace]:
    """Parsed arguments of every project service that runs an `openkcm` command."""
    known = subcommands(parser)
    out = {}
    for name, svc in project_services(services).items():
        if "entrypoint" in svc or svc.get("profiles"):
            continue
        argv = argv_of(svc)
        if argv[0] == "audit" and "audit" not in known:
            continue
        out[name] = parse(parser, argv)
    return out


# --- the set of services -------------------------------------------------------------------


def test_expected_services_and_project_image(services: dict[str, dict[str, Any]]) -> None:
    expected = {"kafka", "registry", "audit", "l1-init", "openkcm"} | {
        f"core-{r}" for r in CORE_REGIONS
    }
    assert expected <= set(services), f"missing services: {expected - set(services)}"
    project = project_services(services)
    assert expected - {"kafka"} <= set(project)
    for name, svc in project.items():
        build = svc.get("build")
        assert isinstance(build, dict), f"{name}: builds the project image"
        assert (COMPOSE_DIR / build["context"]).resolve() == ROOT, f"{name}: context = repo"
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE.resolve()


# --- every command goes through the real parser ----------------------------------------------


@pytest.mark.parametrize("name", ["registry", *(f"core-{r}" for r in sorted(CORE_REGIONS))])
def test_service_flags_parse(
    name: str, services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    argv = argv_of(services[name])
    args = parse(parser, argv)
    assert args.command == argv[0]
    assert args.bootstrap_servers == "kafka:19092"
    assert args.http == ("0.0.0.0", 8080), "listen on all interfaces inside the container"
    assert args.data_dir is not None and args.trust_dir is not None
    if argv[0] == "core":
        assert name == f"core-{args.region}"
        for required in ("region", "l1", "registry_url"):
            assert getattr(args, required), f"{name}: --{required} is required by openkcm core"
        assert args.registry_url == "http://registry:8080"
        assert args.l3_period.total_seconds() > 0 and args.l2_period > args.l3_period
    else:
        assert argv[0] == "registry" and args.regions


def test_audit_service_flags_parse(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    argv = argv_of(services["audit"])
    assert argv[0] == "audit"
    for flag in ("--bootstrap-servers", "--data-dir", "--http", "--trust-dir"):
        assert flag in argv, f"audit service lacks {flag} (DESIGN.md's common options)"
    args = parse(parser, argv)
    assert args.command == "audit"
    assert args.bootstrap_servers == "kafka:19092" and args.http == ("0.0.0.0", 8080)


def test_a_renamed_flag_would_fail(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    """The check above has teeth: the same argv with one flag misspelt is rejected."""
    argv = argv_of(services["core-eu-west-1"])
    broken = [("--l1-uri" if a == "--l1" else a) for a in argv]
    with pytest.raises(AssertionError, match="rejects"):
        parse(parser, broken)


def test_tools_service_runs_openkcm(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    tools = services["openkcm"]
    assert tools.get("profiles") == ["tools"], "on demand only (docker compose run)"
    assert tools.get("restart") == "no"
    env = tools["environment"]
    assert env["OPENKCM_BOOTSTRAP_SERVERS"] == "kafka:19092"
    assert volume_holding(tools, env["OPENKCM_TRUST_DIR"]) == "trust"
    assert "failover" in subcommands(parser)


# --- Kafka -----------------------------------------------------------------------------------


def test_kafka_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    image = interpolate(kafka["image"])
    assert image.startswith("apache/kafka:"), "the official Apache Kafka image"
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in env), "KRaft, no ZooKeeper"
    assert env["CLUSTER_ID"] and env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith("1@kafka:")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "services create their topics"
    for key in ("KAFKA_DEFAULT_REPLICATION_FACTOR", "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "KAFKA_MIN_INSYNC_REPLICAS",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", f"{key}: one broker"
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "INTERNAL://kafka:19092" in advertised, "what the services bootstrap from"
    assert volume_holding(kafka, env["KAFKA_LOG_DIRS"]) == "kafka-data"
    assert kafka.get("healthcheck", {}).get("test"), "services wait for a healthy broker"


def test_services_use_the_advertised_internal_listener(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    parsed = flag_services(parser, services)
    assert {"registry", *(f"core-{r}" for r in CORE_REGIONS)} <= set(parsed)
    for name, args in parsed.items():
        assert args.bootstrap_servers == "kafka:19092", name
        depends = services[name].get("depends_on", {})
        assert depends.get("kafka", {}).get("condition") == "service_healthy", name


def test_idempotent_producer_everywhere(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from events.kafka import idempotence_default

    for name, svc in project_services(services).items():
        value = str(svc.get("environment", {}).get("OPENKCM_KAFKA_IDEMPOTENCE"))
        assert value == "1", f"{name}: OPENKCM_KAFKA_IDEMPOTENCE=1 on real Kafka"
        monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
        monkeypatch.setenv("OPENKCM_KAFKA_IDEMPOTENCE", value)
        assert idempotence_default() is True


# --- regions, volumes, L1 --------------------------------------------------------------------


def test_regions_are_valid_and_match_the_registry_catalogue(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    parsed = flag_services(parser, services)
    core_regions = {a.region for a in parsed.values() if a.command == "core"}
    assert core_regions == CORE_REGIONS
    assert all(is_region(r) for r in core_regions)
    assert set(parsed["registry"].regions) == core_regions


def test_each_core_has_its_own_data_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    parsed = flag_services(parser, services)
    owners: dict[str, str] = {}
    for name, args in parsed.items():
        volume = volume_holding(services[name], args.data_dir)
        assert volume, f"{name}: --data-dir {args.data_dir} is not on a named volume"
        assert volume in compose["volumes"], f"{name}: volume {volume} not declared"
        assert volume not in owners, f"{name} and {owners.get(volume)} share data volume {volume}"
        owners[volume] = name
        if args.command == "core":
            assert volume == f"{name}-data"
            vault = args.vault.removeprefix("rocksdb:").removeprefix("fs:")
            assert volume_holding(services[name], vault) == volume, f"{name}: vault on its volume"
    for name, svc in services.items():  # nobody else mounts a service's data volume
        for volume in named_mounts(svc).values():
            if volume in owners:
                assert owners[volume] == name, f"{name} mounts {owners[volume]}'s {volume}"


def test_trust_dir_is_one_shared_volume(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    parsed = flag_services(parser, services)
    volumes = {volume_holding(services[n], a.trust_dir) for n, a in parsed.items()}
    assert volumes == {"trust"}, f"every service must see the same trust dir: {volumes}"
    assert all(a.trust_dir != a.data_dir for a in parsed.values())


def _keyring_specs(services: dict[str, dict[str, Any]]) -> dict[str, tuple[str, list[str]]]:
    """l1-init's `PATH=REGIONS` arguments: volume -> (path, regions)."""
    init = services["l1-init"]
    assert init["entrypoint"] == ["python", "/opt/openkcm/l1_init.py"]
    out = {}
    for spec in init["command"]:
        path, _, regions = spec.partition("=")
        volume = volume_holding(init, path)
        assert volume, f"l1-init writes {path} outside a volume"
        out[volume] = (path, regions.split(","))
    return out


def test_l1_keyrings_follow_sovereignty(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    specs = _keyring_specs(services)
    parsed = flag_services(parser, services)
    by_volume: dict[str, set[str]] = {}
    for name, args in parsed.items():
        if args.command != "core":
            continue
        scheme, _, path = args.l1.partition(":")
        assert scheme == "local", f"{name}: the compose deployment uses the local L1 keyring"
        volume = volume_holding(services[name], path)
        assert volume in specs, f"{name}: its keyring volume {volume} is not initialised"
        assert args.region in specs[volume][1], f"{name}: keyring does not serve {args.region}"
        by_volume.setdefault(volume, set()).add(args.region)
        depends = services[name]["depends_on"]
        assert depends["l1-init"]["condition"] == "service_completed_successfully"
    # The EU regions can take over each other's tenants; us-east-1 never holds EU roots.
    assert by_volume == {"l1-eu": {"eu-central-1", "eu-west-1"}, "l1-us": {"us-east-1"}}
    assert {v: set(r) for v, (_, r) in specs.items()} == by_volume
    assert services["l1-init"]["restart"] == "no"


def test_l1_init_script_creates_the_keyrings(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    from plugins.l1_local import keyring_info

    specs = _keyring_specs(services)
    args = [f"{tmp_path / volume / 'keyring.json'}={','.join(regions)}"
            for volume, (_, regions) in specs.items()]
    script = COMPOSE_DIR / "l1_init.py"
    for _ in range(2):  # idempotent: the second run keeps the keys
        run = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                             text=True, cwd=ROOT, timeout=60, check=False)
        assert run.returncode == 0, run.stderr
    first = {}
    for volume, (_, regions) in specs.items():
        path = tmp_path / volume / "keyring.json"
        info = keyring_info(path)
        assert info["regions"] == regions
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        first[volume] = info["keys"]
    assert first["l1-eu"] != first["l1-us"], "separate roots of trust"
    bad = subprocess.run([sys.executable, str(script), f"{tmp_path}/x.json=Not_A_Region"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert bad.returncode == 2


def test_volume_mount_points_exist_in_the_image(services: dict[str, dict[str, Any]]) -> None:
    """A named volume takes the ownership of the image directory it is first mounted on, so
    every project mount point must be created (owned by the service user) in the Dockerfile."""
    dockerfile = DOCKERFILE.read_text()
    for name, svc in project_services(services).items():
        for target in named_mounts(svc):
            assert target in dockerfile, f"{name}: mount point {target} not made in the image"


# --- ports, health, restart, secrets ---------------------------------------------------------


def _published(entry: Any) -> tuple[str, str]:
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "")), str(entry.get("published", ""))
    text = str(entry)
    parts = text.split(":")
    assert len(parts) == 3, f"{text!r}: publish as 127.0.0.1:HOST:CONTAINER"
    return parts[0], parts[1]


def test_ports_bind_to_localhost_only(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    published = 0
    for name, svc in services.items():
        for entry in svc.get("ports", []):
            host_ip, port = _published(entry)
            assert host_ip == "127.0.0.1", f"{name}: {entry!r} is reachable from the network"
            assert port not in seen, f"{name} and {seen.get(port)} both publish {port}"
            seen[port] = name
            published += 1
    assert published >= len(LONG_RUNNING) + 1  # every HTTP service and Kafka's host listener


def test_healthchecks_probe_healthz(
    services: dict[str, dict[str, Any]], parser: argparse.ArgumentParser
) -> None:
    for name in LONG_RUNNING:
        svc = services[name]
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:3] == ["python", "/opt/openkcm/healthcheck.py"]
        url = test[3]
        assert url.endswith("/healthz")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        argv = argv_of(svc)
        assert argv[argv.index("--http") + 1] == f"0.0.0.0:{port}", f"{name}: probes its port"
        container_ports = {str(p).rsplit(":", 1)[1] for p in svc["ports"]}
        assert container_ports == {str(port)}


def test_restart_policies(services: dict[str, dict[str, Any]]) -> None:
    for name in ("kafka", *LONG_RUNNING):
        assert services[name].get("restart") in ("unless-stopped", "always"), name
    for name in ("l1-init", "openkcm"):
        assert services[name].get("restart") == "no", f"{name} is one-shot"


def test_no_secret_is_written_into_the_deployment(services: dict[str, dict[str, Any]]) -> None:
    secretish = re.compile(r"TOKEN|PIN|PASSWORD|SECRET|PRIVATE", re.IGNORECASE)
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if secretish.search(key):
                text = str(value)
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", text), (
                    f"{name}: {key} must come from the operator's environment, not the file"
                )
    token = services["registry"]["environment"]["OPENKCM_ADMIN_TOKEN"]
    assert interpolate(token, allow_required=True) == "<required OPENKCM_ADMIN_TOKEN>"
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().upper().startswith(("ENV", "ARG")):
            assert not secretish.search(line), f"Dockerfile bakes a secret: {line!r}"
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split(), "compose/.env stays local"


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_installs_the_project() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", text, re.M)
    assert re.search(r"^COPY \. /src$", text, re.M)
    assert re.search(r"pip install [^\n]*\"\.\[pkcs11\]\"", text), "pip install .[pkcs11]"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "openkcm" in scripts
    assert re.search(r'^ENTRYPOINT \["openkcm"\]$', text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    for helper in ("healthcheck.py", "l1_init.py"):
        assert (COMPOSE_DIR / helper).is_file()
        assert f"compose/{helper}" in text and "/opt/openkcm/" in text


def _ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            result = not negate
    return result


def test_build_context_keeps_what_pip_install_needs() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.rstrip("*") for p in include]
    needed = ["pyproject.toml", pyproject["project"]["readme"], "compose/healthcheck.py",
              "compose/l1_init.py", *(f"{p}/__init__.py" for p in packages)]
    for path in needed:
        assert not _ignored(path, patterns), f"{path} is excluded from the build context"
    for junk in (".venv/bin/python", ".git/HEAD", "events/__pycache__/x.pyc"):
        assert _ignored(junk, patterns), f"{junk} would be sent to the builder"


# --- the helper scripts, run for real ---------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_script_exit_codes() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    script = str(COMPOSE_DIR / "healthcheck.py")

    def run(url: str) -> int:
        return subprocess.run([sys.executable, script, url, "2"], capture_output=True,
                              timeout=30, check=False).returncode

    try:
        assert run(f"{base}/healthz") == 0
        assert run(f"{base}/frozen") == 1  # a 503 (frozen Registry) is unhealthy
    finally:
        server.shutdown()
        server.server_close()
    assert run(f"{base}/healthz") == 1  # nothing listening


# --- the deployment guide --------------------------------------------------------------------


def test_deploy_doc_commands_parse(parser: argparse.ArgumentParser) -> None:
    """Every `docker compose ... run --rm openkcm <command>` in docs/deploy.md is a valid
    openkcm command line (the tools service adds --bootstrap-servers/--trust-dir by env)."""
    text = DEPLOY_DOC.read_text().replace("\\\n", " ")
    found = 0
    for match in re.finditer(r"run --rm openkcm ([^\n`|;&>]+)", text):
        argv = match.group(1).split()
        if argv and argv[0] in {"--help", "-h"}:
            continue
        args = parse(parser, argv)
        assert args.command == argv[0]
        found += 1
    assert found >= 1, "docs/deploy.md shows how to declare a failover"
    assert "docker kill -s KILL" in text and "/v1/status" in text


def test_deploy_doc_describes_every_volume(compose: dict[str, Any]) -> None:
    text = DEPLOY_DOC.read_text()
    for volume in compose["volumes"]:
        assert f"`{volume}`" in text, f"docs/deploy.md does not say what {volume} holds"
