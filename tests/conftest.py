"""Shared test set-up.

* ``reference`` fixture: import a reference library (transformers, diffusers, tensorflow …)
  inside the test that needs it. Missing → skip locally, but **fail** when ``CI`` is set: a
  parity test that skips proves nothing.
* The same rule for ``pytest.importorskip``: under ``CI`` its skips become failures.
* ``@pytest.mark.gpu`` tests skip without CUDA.
* Under pytest-xdist each worker uses one torch thread (2 workers on 2 cores).
"""

from __future__ import annotations

import importlib
import os

import pytest

os.environ.setdefault("MLATLAS_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

IN_CI = bool(os.environ.get("CI"))
_IMPORT_SKIP = "could not import"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    if not torch.cuda.is_available():  # before any test imports triton (transformers does):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run interpreted
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def reference():
    """``reference("transformers")`` → the imported module (fail under CI when missing)."""

    def load(name: str):
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            msg = f"reference library {name!r} is not installed ({exc})"
            if IN_CI:
                pytest.fail(f"{msg}; CI requires every reference (pip install -e .[ref])")
            pytest.skip(msg)

    return load


@pytest.fixture
def fake_method(monkeypatch):
    """Register the stand-in experiments of ``tests/fake_experiment.py`` in the catalog."""
    import fake_experiment

    return fake_experiment.register(monkeypatch)


def _fail_import_skips(report) -> None:
    if IN_CI and report.skipped and _IMPORT_SKIP in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = (f"{report.longrepr}\nA reference import was skipped under CI; "
                           "CI requires every reference library (pip install -e .[ref]).")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_import_skips(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_import_skips(outcome.get_result())
