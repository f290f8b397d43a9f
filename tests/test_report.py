"""Claims and reports: verdicts, serialisation, writers."""

from __future__ import annotations

import json
import math

import pytest

from mlatlas.report import Claim, Report, write_run, write_tour


@pytest.mark.parametrize(("measured", "op", "target", "holds"), [
    (1.0, ">=", 1.0, True), (0.99, ">=", 1.0, False), (0.5, "<=", 0.6, True),
    (0.6, "<", 0.6, False), (2.0, ">", 1.0, True), (3.0, "==", 3.0, True),
    (math.nan, "<=", 1.0, False),
])
def test_claim_verdict(measured, op, target, holds):
    assert Claim("c", measured, target, op).holds is holds


def test_claim_explicit_verdict_and_bad_op():
    assert Claim("c", 1.0, 2.0, ">=", holds=True).holds is True
    with pytest.raises(ValueError, match="Claim op must be one of .* got '=>'"):
        Claim("c", 1.0, 2.0, "=>")


def test_report_fill_and_holds():
    rep = Report(method="m")
    assert rep.metric("loss", 0.25) == 0.25
    rep.claim("loss small", 0.25, 0.5, "<=", unit="nats")
    assert rep.holds and rep.metrics == {"loss": 0.25}
    rep.claim("never", 0.0, 1.0, ">=")
    assert not rep.holds
    assert "DOES NOT HOLD" in rep.claims[-1].describe()


def test_write_run_and_tour(tmp_path):
    fig = tmp_path / "a" / "fig.png"
    fig.parent.mkdir()
    fig.write_bytes(b"\x89PNG")
    rep = Report(method="m", seed=3, config={"steps": 2, "shape": (2, 3)})
    rep.metric("nan metric", math.nan)
    rep.claim("x", 1.0, 0.5, ">=")
    rep.figure(fig)
    rep.note("a note")
    write_run(rep, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert data["figures"] == ["fig.png"] and data["metrics"]["nan metric"] is None
    assert data["config"]["shape"] == [2, 3] and data["claims"][0]["holds"] is True
    failed = Report(method="broken", error="RuntimeError: boom")
    md = write_tour([rep, failed], tmp_path).read_text()
    assert "![fig](a/fig.png)" in md and "| broken | run failed: RuntimeError: boom |" in md
    assert "1 of 1 claims hold across 2 run(s)." in md


def test_metric_units_are_written():
    rep = Report(method="m")
    assert rep.metric("step time", 0.5, unit="s") == 0.5
    rep.metric("count", 3)
    data = rep.to_dict()
    assert data["metric_units"] == {"step time": "s"} and data["metrics"]["count"] == 3


def test_a_claim_has_three_outcomes():
    from mlatlas.report import Claim, Report

    rep = Report(method="m")
    rep.claim("fast", 2.0, 1.0, ">=")
    assert rep.holds
    c = rep.not_measured("same as TF", 0.0, "<=", reason="TensorFlow is not importable")
    assert c.status == "not measured" and c.holds is False and c.measured is None
    assert not rep.holds and rep.unmeasured == [c]  # a not-measured claim never reads "all hold"
    assert "not measured: TensorFlow is not importable" in c.describe()
    assert Claim("x", float("nan"), 1.0).status == "fails"
    with pytest.raises(ValueError, match="detail must say why"):
        Claim("x", None, 1.0)
    data = rep.to_dict()
    assert [d["status"] for d in data["claims"]] == ["holds", "not measured"]
    assert data["claims"][1]["measured"] is None


def test_runner_marks_a_target_changed_by_set(fake_method, tmp_path):
    import json

    from mlatlas import runner

    rep = runner.run_method("fake-method", out=tmp_path, overrides=["target=0.5"])
    assert rep.claims[0].target_changed and rep.overrides == {"target": 0.5}
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["claims"][0]["target_changed"] is True and data["overrides"] == {"target": 0.5}
    assert "(changed by --set)" in (tmp_path / "report.md").read_text()
    rep = runner.run_method("fake-method", out=tmp_path, overrides=["steps=4"])
    assert not rep.claims[0].target_changed  # other fields do not touch the target
