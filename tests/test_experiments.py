"""Every built catalog row's experiment runs end to end with ``smoke=True``.

This keeps the experiments honest between releases: a smoke run exercises the whole path
(config → run → Report → metrics.json/report.md/figures) in a few seconds per method. The
default (≤ 30 s) runs are what ``mlatlas tour`` executes.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from mlatlas import catalog, runner
from mlatlas.report import Report

BUILT = [m.id for m in catalog.METHODS if m.built]


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
