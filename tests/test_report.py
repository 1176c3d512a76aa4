"""Drill reports: JSON record and a self-contained HTML page."""

from __future__ import annotations

import json

from openkcm.report import ScenarioResult, write_reports


def test_reports_record_checks_figures_and_chart(tmp_path) -> None:
    good = ScenarioResult("region-loss", rto_seconds=2.5, rto_target_seconds=30,
                          rpo_key_versions_lost=0, rpo_deks_lost=0, fault_window=(3.0, 6.0),
                          rotations=[{"t": 1.0, "region": "eu-west-1", "layer": "L3", "epoch": 2},
                                     {"t": 5.0, "region": "eu-west-1", "layer": "L2", "epoch": 2}])
    good.check("every DEK unwraps", True, "24 DEKs")
    bad = ScenarioResult("split-brain")
    bad.check("old owner fenced", False, "eu-central-1 still rotates <drill-0001>")
    write_reports([good.finish(), bad.finish()], tmp_path, {"summary": "two scenarios"})
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["passed"] is False
    assert [s["passed"] for s in doc["scenarios"]] == [True, False]
    assert doc["scenarios"][1]["checks"][0]["name"] == "old owner fenced"
    assert doc["scenarios"][0]["rto_seconds"] == 2.5
    page = (tmp_path / "report.html").read_text()
    assert "<svg" in page and "fault window" in page and "FAILED" in page
    assert "&lt;drill-0001&gt;" in page  # escaped, never raw markup
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no external assets


def test_a_scenario_without_checks_or_with_an_error_fails() -> None:
    assert ScenarioResult("x").finish().passed is False
    r = ScenarioResult("y")
    r.check("fine", True)
    r.error = "RuntimeError: boom"
    assert r.finish().passed is False
