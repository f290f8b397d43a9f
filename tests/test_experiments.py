"""Every built catalog row's experiment (and benchmark) runs end to end with ``Config.smoke()``.

This keeps the experiments honest between releases: a smoke run exercises the whole path
(config → run → Report → metrics.json/report.md/figures) in a few seconds per method. The
default (≤ 30 s) runs are what ``mlatlas tour`` executes. Under ``CI`` a claim that was not
measured fails the smoke run (unless it needs a GPU): CI has every reference library, so "not
measured" there means a reference went missing.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re

import pytest

from mlatlas import catalog, runner
from mlatlas.report import Report

BUILT = [m.id for m in catalog.METHODS if m.built]
IN_CI = bool(os.environ.get("CI"))


def test_something_is_built():
    assert BUILT, "no catalog row has an experiment yet"


@pytest.mark.parametrize("method_id", BUILT)
def test_experiment_contract(method_id):
    module = runner.load_experiment(method_id)
    assert dataclasses.is_dataclass(module.Config), "Config must be a dataclass"
    cfg = module.Config()
    assert isinstance(getattr(cfg, "seed", None), int), "Config needs an int `seed` field"
    assert module.Config.__doc__, "Config needs a docstring"
    assert callable(module.run)
    assert isinstance(module.Config.smoke(), module.Config), "Config.smoke() is required"
    for fn in (module.run, getattr(module, "bench", None)):
        if fn is not None:  # run modes live in the Config: no `smoke` parameter
            assert "smoke" not in inspect.signature(fn).parameters, fn.__name__
    if hasattr(module.Config, "full"):
        assert isinstance(module.Config.full(), module.Config)


@pytest.mark.parametrize("method_id", BUILT)
def test_experiment_smoke_run(method_id, tmp_path):
    report = runner.run_method(method_id, out=tmp_path, smoke=True)
    assert isinstance(report, Report) and report.method == method_id
    assert report.claims, "an experiment must state at least one claim"
    for claim in report.claims:
        assert claim.name and claim.op in ("<=", "<", ">=", ">", "==")
        assert not math.isnan(claim.target), f"claim {claim.name!r} has no target"
    for fig in report.figures:
        assert fig.is_file() and fig.suffix == ".png" and fig.stat().st_size > 0, fig
        assert tmp_path.resolve() in fig.resolve().parents, f"{fig} written outside out/"
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["method"] == method_id and data["smoke"] is True
    assert data["config"] == json.loads(json.dumps(data["config"]))
    assert (tmp_path / "report.md").is_file()
    _no_unmeasured_claims_in_ci(report)


def _no_unmeasured_claims_in_ci(report: Report) -> None:
    # CI runs on a CPU: a claim that needs a GPU may stay unmeasured there, nothing else may
    missing = [c for c in report.unmeasured if not re.search(r"\b(GPU|CUDA)\b", c.detail)]
    if IN_CI and missing:
        pytest.fail("claims not measured under CI (a reference library is missing?): " +
                    "; ".join(c.describe() for c in missing))


@pytest.mark.parametrize("method_id", BUILT)
def test_bench_smoke_run(method_id, tmp_path):
    module = runner.load_experiment(method_id)
    if not hasattr(module, "bench"):
        pytest.skip(f"{method_id} has no benchmark")
    report = runner.run_bench(method_id, out=tmp_path, smoke=True)
    assert isinstance(report, Report) and report.kind == "bench"
    assert report.claims, "a benchmark states its claims (a ratio against a named baseline)"
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["kind"] == "bench" and data["mode"] == "smoke"
    _no_unmeasured_claims_in_ci(report)


def test_ci_fails_a_claim_not_measured_unless_it_needs_a_gpu(monkeypatch):
    monkeypatch.setitem(globals(), "IN_CI", True)
    rep = Report(method="m")
    rep.not_measured("TFLOP/s vs SDPA flash", 0.9, ">=", reason="no CUDA device")
    _no_unmeasured_claims_in_ci(rep)  # a CPU-only CI cannot measure it: fine
    rep.not_measured("same as TF", 0.0, "<=", reason="TensorFlow is not importable")
    with pytest.raises(pytest.fail.Exception, match="TensorFlow is not importable"):
        _no_unmeasured_claims_in_ci(rep)
