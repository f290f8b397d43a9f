"""The CI rule of conftest: a missing reference fails under CI and skips locally."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _pytest(tmp_path, body: str, ci: bool) -> subprocess.CompletedProcess:
    import os
    from pathlib import Path

    (tmp_path / "conftest.py").write_text(
        (Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER")}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


FIXTURE = """
def test_needs_missing(reference):
    reference("a_reference_library_that_does_not_exist")
"""
IMPORTORSKIP = """
import pytest
missing = pytest.importorskip("a_reference_library_that_does_not_exist")
def test_never():
    pass
"""


def test_missing_reference_skips_locally(tmp_path):
    res = _pytest(tmp_path, FIXTURE, ci=False)
    assert res.returncode == 0 and "1 skipped" in res.stdout, res.stdout


def test_missing_reference_fails_under_ci(tmp_path):
    res = _pytest(tmp_path, FIXTURE, ci=True)
    assert res.returncode == 1 and "1 failed" in res.stdout, res.stdout


def test_module_importorskip_fails_under_ci(tmp_path):
    res = _pytest(tmp_path, IMPORTORSKIP, ci=True)
    assert res.returncode != 0 and "skipped" not in res.stdout.splitlines()[-1], res.stdout
