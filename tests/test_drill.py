"""`openkcm drill`: each scenario end to end at small size, and a drill whose fault breaks an
invariant exits non-zero naming the failing check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--tenants", "6", "--regions", "2", "--outage", "4", "--l3-period", "2s",
         "--deks-per-tenant", "2"]


def _drill(scenario: str, report_dir: Path, *extra: str) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "openkcm.cli", "drill", scenario, "--report-dir", str(report_dir),
         "--format", "json", *SMALL, *extra],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    assert out.returncode in (0, 1), out.stderr[-2000:]
    report = json.loads((report_dir / "report.json").read_text())
    return out.returncode, report


def _failed(report: dict) -> list[str]:
    return [f"{s['scenario']}: {c['name']} ({c['detail']})" for s in report["scenarios"]
            for c in s["checks"] if not c["passed"]] + [
        f"{s['scenario']}: {s['error']}" for s in report["scenarios"] if s["error"]]


@pytest.mark.parametrize("scenario", ["partition", "region-loss", "registry-loss", "split-brain"])
def test_scenario_passes_at_small_size(scenario: str, tmp_path: Path) -> None:
    code, report = _drill(scenario, tmp_path)
    assert code == 0, _failed(report)
    (only,) = report["scenarios"]
    assert only["scenario"] == scenario and only["passed"]
    assert only["deks_verified"] > 0
    assert only["rpo_deks_lost"] == 0 and only["rpo_key_versions_lost"] == 0
    assert any(c["name"].startswith("replay --verify") and c["passed"] for c in only["checks"])
    page = (tmp_path / "report.html").read_text()
    assert "<svg" in page and scenario in page
    if scenario == "region-loss":
        assert only["rto_seconds"] is not None and only["rto_seconds"] <= only["rto_target_seconds"]
        assert only["tenants_moved"] > 0 and only["tenants_refused"]
    if scenario in ("partition", "registry-loss"):
        assert only["rotations_during_outage"] > 0


def test_a_broken_invariant_fails_the_drill_and_names_the_check(tmp_path: Path) -> None:
    """The survivor region has no access to the L1 root of trust: it cannot hydrate."""
    code, report = _drill("region-loss", tmp_path, "--deny-survivor-l1", "--rto-target", "5")
    assert code == 1
    assert report["passed"] is False
    failed = [c["name"] for c in report["scenarios"][0]["checks"] if not c["passed"]]
    assert "every movable tenant serves all its pre-failure DEKs at the survivor" in failed


def test_nothing_is_left_running(tmp_path: Path) -> None:
    code, report = _drill("registry-loss", tmp_path)
    assert code in (0, 1)
    actions = [a["action"] for a in report["scenarios"][0]["timeline"]]
    broker = next(a for a in actions if a.startswith("broker up at ")).rsplit(" ", 1)[1]
    port = broker.rsplit(":", 1)[1]
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    left = [line for line in out.splitlines()
            if str(tmp_path) in line or ("tansu" in line and f":{port}" in line)]
    assert left == [], "drill processes left running"
