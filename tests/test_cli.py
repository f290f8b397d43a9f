"""The ``mlatlas`` command line: list, run, tour, bench, exit codes and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlatlas import catalog
from mlatlas.cli import EXIT_CLAIM, EXIT_OK, EXIT_USAGE, main


def test_list_shows_every_method(capsys):
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"of {len(catalog.METHODS)} methods built" in out
    for m in catalog.METHODS:
        assert m.id[:12] in out


def test_list_field_filters(capsys):
    assert main(["list", "--field", "features"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "tfrecord" in out and "gridworld" not in out


def test_list_does_not_import_torch():
    code = ("import sys; from mlatlas.cli import main; rc = main(['list']); "
            "assert 'torch' not in sys.modules, 'listing imported torch'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_unknown_id_exits_2_with_suggestions(capsys):
    assert main(["run", "gridwrld"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown method id 'gridwrld'" in err and "gridworld" in err


def test_unknown_field_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["list", "--field", "astrology"])
    assert exc.value.code == EXIT_USAGE


def test_unbuilt_method_exits_2(capsys, monkeypatch):
    row = catalog.Method("not-built", "rl", "t", "p", "r", "c", None)
    monkeypatch.setitem(catalog._BY_ID, "not-built", row)
    assert main(["run", "not-built"]) == EXIT_USAGE
    assert "not built yet" in capsys.readouterr().err


def test_run_writes_metrics_report_and_figures(fake_method, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "fake-method", "--out", str(out), "--seed", "7",
                 "--set", "steps=4", "--set", "mode=b"]) == EXIT_OK
    data = json.loads((out / "metrics.json").read_text())
    assert data["seed"] == 7 and data["config"]["steps"] == 4 and data["config"]["mode"] == "b"
    assert data["metrics"]["steps_run"] == 4 and data["holds"] is True
    assert data["figures"] == ["curve.png"] and (out / "curve.png").stat().st_size > 0
    assert {"python", "cpu_count"} <= set(data["machine"]) and "torch" in data["versions"]
    assert (out / "report.md").read_text().startswith("# mlatlas fake-method")
    printed = capsys.readouterr().out
    assert "✓" in printed and "loss[bracketed]" in printed


def test_run_is_deterministic_for_a_seed(fake_method, tmp_path):
    for name in ("a", "b"):
        assert main(["run", "fake-method", "--out", str(tmp_path / name), "--seed", "3"]) == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"]


def test_full_and_smoke(fake_method, tmp_path):
    assert main(["run", "fake-method", "--full", "--out", str(tmp_path / "f")]) == EXIT_OK
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["config"]["steps"] == 10
    assert main(["run", "fake-method", "--smoke", "--out", str(tmp_path / "s")]) == EXIT_OK
    data = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert data["smoke"] is True and data["metrics"]["steps_run"] == 1


def test_strict_exits_1_when_a_claim_does_not_hold(fake_method, tmp_path, capsys):
    args = ["run", "fake-method", "--out", str(tmp_path), "--set", "target=99"]
    assert main(args) == EXIT_OK
    assert main([*args, "--strict"]) == EXIT_CLAIM
    assert "DOES NOT HOLD" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "message"), [
    ("nosuch=1", "unknown config field 'nosuch'"),
    ("steps=abc", "config field 'steps' expects int, got 'abc'"),
    ("noisy=maybe", "config field 'noisy' expects bool"),
    ("mode=c", "config field 'mode' expects"),
    ("steps", "--set expects field=value"),
])
def test_bad_set_exits_2_naming_the_field(fake_method, tmp_path, capsys, override, message):
    assert main(["run", "fake-method", "--out", str(tmp_path), "--set", override]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_set_converts_types(fake_method):
    from mlatlas import runner

    mod = runner.load_experiment("fake-method")
    cfg = runner.make_config(mod, overrides=["lr=0.25", "noisy=yes", "sizes=3,4,5"])
    assert (cfg.lr, cfg.noisy, cfg.sizes) == (0.25, True, (3, 4, 5))


def test_tour_writes_html_and_md_and_survives_a_failure(fake_method, tmp_path, capsys):
    rc = main(["tour", "--field", "rl", "--out", str(tmp_path)])
    assert rc == EXIT_CLAIM  # one experiment raised
    page = (tmp_path / "report.html").read_text()
    assert "fake-method" in page and "<img src='fake-method/curve.png'" in page
    assert "run failed: RuntimeError: boom" in page
    md = (tmp_path / "report.md").read_text()
    assert "| fake-method | steps reach target |" in md
    assert (tmp_path / "fake-method" / "metrics.json").exists()


def test_bench_runs_and_missing_bench_exits_2(fake_method, tmp_path, capsys):
    assert main(["bench", "fake-method", "--out", str(tmp_path / "b")]) == EXIT_OK
    data = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert data["kind"] == "bench" and data["metrics"]["ratio"] == 2.0
    assert main(["bench", "fake-broken", "--out", str(tmp_path / "c")]) == EXIT_USAGE
    assert "has no benchmark" in capsys.readouterr().err


def test_console_script_is_installed():
    res = subprocess.run([sys.executable, "-m", "mlatlas.cli", "--version"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "mlatlas" in res.stdout
