"""The synthetic census generator and the experiments' no-TensorFlow paths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mlatlas.datasets.census import EDUCATION, make_census
from mlatlas.experiments.features import tfrecord as tfrecord_experiment


def test_census_is_seeded_and_well_formed():
    a, b, c = make_census(300, seed=1), make_census(300, seed=1), make_census(300, seed=2)
    assert a.rows == b.rows and a.rows != c.rows
    np.testing.assert_array_equal(a.labels, [r["income_50k"] for r in a.rows])
    assert 0.1 < a.labels.mean() < 0.4  # imbalanced like the real table
    assert a.bayes_accuracy > max(a.labels.mean(), 1 - a.labels.mean())
    for r in a.rows:
        assert EDUCATION[r["education_num"] - 1] == r["education"]
        assert 0 <= len(r["languages"]) <= 3 and 18 <= r["age"] <= 90
    assert any("occupation" not in r for r in make_census(2000).rows)  # missing values
    assert make_census(0).rows == []
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        make_census(-1)


def test_bench_reports_clearly_without_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setattr(tfrecord_experiment, "load_tensorflow", lambda: None)
    cfg = dataclasses.replace(tfrecord_experiment.Config(), bench_records=50,
                              bench_repeats=1)
    rep = tfrecord_experiment.bench(cfg, tmp_path)
    assert any("not importable" in n for n in rep.notes)
    assert not rep.claims  # nothing to compare with
    assert all(v > 0 for v in rep.metrics.values()) and rep.figures[0].is_file()
