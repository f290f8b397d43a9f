"""The synthetic census generator and the experiments' no-TensorFlow paths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mlatlas.datasets.census import EDUCATION, make_census
from mlatlas.experiments.features import feature_columns as feature_columns_experiment
from mlatlas.experiments.features import tfrecord as tfrecord_experiment
from mlatlas.features.tensorflow_reference import TensorFlowUnavailable


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


def _hide_tensorflow(monkeypatch, *modules) -> None:
    def unavailable():
        raise TensorFlowUnavailable("TensorFlow is not importable: hidden by the test")

    for module in modules:
        monkeypatch.setattr(module, "load_tensorflow", unavailable)


def test_tfrecord_run_reports_tf_claims_as_not_measured_without_tensorflow(tmp_path,
                                                                           monkeypatch):
    _hide_tensorflow(monkeypatch, tfrecord_experiment)
    cfg = dataclasses.replace(tfrecord_experiment.Config.smoke(), compare_tf=True)
    rep = tfrecord_experiment.run(cfg, tmp_path)
    missing = [c for c in rep.claims if c.status == "not measured"]
    assert [c.name for c in missing] == [name for name, _, _ in tfrecord_experiment.TF_CLAIMS]
    assert all(c.detail == "TensorFlow is not importable: hidden by the test" for c in missing)
    assert all(c.holds for c in rep.claims if c not in missing)  # the TF-free claims
    assert not rep.holds  # a run with a claim not measured never reads "all hold"


def test_feature_columns_run_reports_tf_claim_as_not_measured_without_tensorflow(
        tmp_path, monkeypatch):
    _hide_tensorflow(monkeypatch, feature_columns_experiment)
    cfg = dataclasses.replace(feature_columns_experiment.Config.smoke(), compare_tf=True,
                              n_train=200, n_test=100, epochs=1)
    rep = feature_columns_experiment.run(cfg, tmp_path)
    (missing,) = [c for c in rep.claims if c.status == "not measured"]
    assert missing.name == feature_columns_experiment.TF_CLAIM
    assert missing.target == 1e-5 and missing.op == "<="
    assert missing.detail.startswith("TensorFlow is not importable")


def test_tf_claims_are_not_stated_when_switched_off(tmp_path, monkeypatch):
    _hide_tensorflow(monkeypatch, tfrecord_experiment)  # must not even be asked for
    rep = tfrecord_experiment.run(tfrecord_experiment.Config.smoke(), tmp_path)
    assert rep.claims and all(c.status == "holds" for c in rep.claims)
    assert any("compare_tf=False" in n for n in rep.notes)


def test_bench_reports_tf_claims_as_not_measured_without_tensorflow(tmp_path, monkeypatch):
    _hide_tensorflow(monkeypatch, tfrecord_experiment)
    rep = tfrecord_experiment.bench(tfrecord_experiment.Config.smoke(), tmp_path)
    assert any("not importable" in n for n in rep.notes)
    assert len(rep.claims) == 4 and all(c.status == "not measured" for c in rep.claims)
    assert all(v > 0 for v in rep.metrics.values()) and rep.figures[0].is_file()


def test_load_tensorflow_turns_any_import_failure_into_a_reason(monkeypatch):
    from mlatlas.features import tensorflow_reference

    def broken(name):
        raise AttributeError("module 'google.protobuf' has no attribute 'runtime_version'")

    monkeypatch.setattr(tensorflow_reference.importlib, "import_module", broken)
    with pytest.raises(TensorFlowUnavailable,
                       match="^TensorFlow is not importable: AttributeError: module"):
        tensorflow_reference.load_tensorflow()
