"""docs/results.md: built by scripts/results_table.py from tour folders; lists every built method."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mlatlas import catalog

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = ("mlatlas tour ID --full --out runs/full-ID && mlatlas tour ID --out runs/default-ID"
              " && python scripts/results_table.py --update runs/full-ID runs/default-ID")


def _script():
    spec = importlib.util.spec_from_file_location("results_table",
                                                  ROOT / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ids_in_table(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\| `([a-z0-9-]+)`", text, re.M)}


def test_results_md_lists_every_built_method():
    text = (ROOT / "docs" / "results.md").read_text()
    missing = [m.id for m in catalog.METHODS if m.built and m.id not in _ids_in_table(text)]
    assert not missing, (f"docs/results.md lacks {', '.join(missing)}: run, per method, "
                         f"`{REGENERATE}`")
    assert "commit `" in text and "| method | claim | target | default |" in text
    assert "[docs/results.md](docs/results.md)" in (ROOT / "README.md").read_text()


def test_script_builds_the_table_from_tours(fake_method, tmp_path, monkeypatch):
    from mlatlas.cli import main

    assert main(["tour", "fake-method", "--full", "--out", str(tmp_path / "full")]) == 0
    assert main(["tour", "fake-method", "--out", str(tmp_path / "default")]) == 0
    assert main(["tour", "fake-broken", "--full", "--out", str(tmp_path / "broken")]) == 1
    script = _script()
    docs = tmp_path / "docs"
    assert script.main([str(tmp_path / "full"), str(tmp_path / "default"),
                        "--docs", str(docs)]) == 0
    text = (docs / "results.md").read_text()
    assert "full runs at commit `" in text and "Placeholder" not in text
    assert "- default column: runs at commit `" in text  # the default values' commit too
    # full steps = 10, default steps = 3, target 1: default and full values side by side
    assert re.search(r"^\| `fake-method` \| steps reach target \| >= 1 \| 3 \| 10 \| ✓ holds \| "
                     r"\d+\.\d s \|$", text, re.M), text
    assert "| `fake-method` (bench) | ours vs baseline speed-up | >= 1 x | 2 x | 2 x |" in text
    assert "| `fake-broken` | not run yet |" in text
    assert script.main(["--update", str(tmp_path / "broken"), "--docs", str(docs)]) == 0
    text = (docs / "results.md").read_text()
    assert "| `fake-broken` | run failed: RuntimeError: boom |" in text
    assert "| `fake-method` | steps reach target |" in text  # kept by --update
    assert set(json.loads((docs / "results.json").read_text())) == {"fake-method", "fake-broken"}


def test_script_marks_smoke_runs_as_a_placeholder(fake_method, tmp_path):
    from mlatlas.cli import main

    assert main(["tour", "fake-method", "--smoke", "--out", str(tmp_path / "s")]) == 0
    script = _script()
    assert script.main([str(tmp_path / "s"), "--docs", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "these numbers are not results" in text and "| holds (smoke) |" in text
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "nowhere"), "--docs", str(tmp_path / "docs")])
