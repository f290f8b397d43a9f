"""The ``mlatlas`` command line: list, run, tour, bench, exit codes and errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlatlas import catalog
from mlatlas.cli import EXIT_CLAIM, EXIT_OK, EXIT_USAGE, main


def test_list_in_a_pipe_is_tab_separated_and_never_cuts_an_id(capsys):
    assert main(["list"]) == EXIT_OK  # capsys: stdout is not a terminal
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [m.id for m in catalog.METHODS]
    for line, m in zip(lines, catalog.METHODS):
        assert line.split("\t") == [m.id, m.field, "built" if m.built else "-", m.title]


def test_list_pipe_through_cut_prints_every_whole_id():
    res = subprocess.run(f"{sys.executable} -m mlatlas.cli list | cut -f1", shell=True,
                         capture_output=True, text=True, check=True)
    assert res.stdout.split() == [m.id for m in catalog.METHODS]


def test_list_long_and_json(capsys):
    assert main(["list", "--long", "--built"]) == EXIT_OK
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    built = [m for m in catalog.METHODS if m.built]
    assert [r[0] for r in rows] == [m.id for m in built]
    assert all(r[4:] == [m.paper, m.reference, m.claim] for r, m in zip(rows, built))
    assert main(["list", "--json", "--field", "rl"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == [m.id for m in catalog.by_field("rl")]
    assert {"claim", "paper", "reference", "experiment", "built"} <= set(data[0])


@pytest.mark.parametrize("long", [False, True])
def test_list_table_keeps_id_field_built_whole_at_80_columns(long):
    import io

    from rich.console import Console

    from mlatlas.cli import list_table

    buf = io.StringIO()
    Console(file=buf, width=80, force_terminal=False).print(
        list_table(catalog.METHODS, long=long))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert f"{sum(m.built for m in catalog.METHODS)} of {len(catalog.METHODS)} methods built" \
        in text
    for m in catalog.METHODS:
        assert re.search(rf"[│ ]{re.escape(m.id)}[│ ]+{m.field}[│ ]+[✓·][│ ]", text), m.id


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


@pytest.mark.parametrize(("argv", "names"), [
    (["list", "--field", "astrology"], "argument --field: invalid choice: 'astrology'"),
    (["run", "ddim", "--smoke", "--seed", "-5"], "argument --seed: expected a non-negative "
     "integer, got '-5'"),
    (["run", "ddim", "--seed", "x"], "argument --seed"),
    (["run", "ddim", "--full", "--smoke"], "argument --smoke: not allowed with argument --full"),
    (["tour", "--field", "nope"], "argument --field"),
    (["tour", "gridwrld"], "unknown method id 'gridwrld'"),
    (["bench", "nosuch"], "unknown method id 'nosuch'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run"], "the following arguments are required: id"),
])
def test_bad_arguments_get_one_line_and_exit_2(capsys, argv, names):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert names in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_arguments_from_the_console_never_print_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (["run", "ddim", "--smoke", "--seed", "-5"],
                 ["run", "gridworld", "--smoke", "--out", str(blocker / "sub")],
                 ["tour", "--smoke", "--out", str(blocker / "sub")],
                 ["bench", "ddim", "--smoke", "--seed", "1.5"]):
        res = subprocess.run([sys.executable, "-m", "mlatlas.cli", *argv], capture_output=True,
                             text=True)
        assert res.returncode == EXIT_USAGE, (argv, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_uncreatable_out_names_the_folder(fake_method, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "fake-method", "--out", str(blocker / "x")]) == EXIT_USAGE
    assert f"--out {str(blocker / 'x')!r} cannot be created: {str(blocker)!r} is not a folder" \
        in capsys.readouterr().err
    assert main(["tour", "--out", str(blocker / "y")]) == EXIT_USAGE
    assert "--out" in capsys.readouterr().err
    from mlatlas import runner

    with pytest.raises(runner.ConfigError, match="cannot create output folder"):
        runner.run_method("fake-method", out=blocker / "z")


def test_a_value_the_run_refuses_is_a_usage_error(fake_method, tmp_path, capsys, monkeypatch):
    import fake_experiment

    from mlatlas import runner

    def picky(cfg, out):
        if cfg.steps > 5:
            raise ValueError(f"steps must be <= 5, got {cfg.steps}")
        return fake_experiment.run(cfg, out)

    monkeypatch.setattr(runner.load_experiment("fake-method"), "run", picky)
    assert main(["run", "fake-method", "--out", str(tmp_path), "--set", "steps=9"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--set steps=9" in err and "steps must be <= 5, got 9" in err


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
    index = (tmp_path / "index.html").read_text()
    assert 'href="fake-method.html"' in index and "run failed" in index
    page = (tmp_path / "fake-method.html").read_text()
    assert '<img src="fake-method/curve.png"' in page
    assert "RuntimeError: boom" in (tmp_path / "fake-broken.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "| fake-method | steps reach target |" in md
    assert "| fake-method (bench) | ours vs baseline speed-up | 2 x |" in md
    assert (tmp_path / "fake-method" / "metrics.json").exists()
    bench = json.loads((tmp_path / "fake-method" / "bench" / "metrics.json").read_text())
    assert bench["kind"] == "bench" and bench["mode"] == "default"
    broken = json.loads((tmp_path / "fake-broken" / "metrics.json").read_text())
    assert broken["error"] == "RuntimeError: boom" and broken["holds"] is False
    out = capsys.readouterr().out
    assert "fake-method bench: 1 of 1 claims hold" in out
    assert "2 of 2 claims hold across 2 methods and 1 benchmarks" in out
    assert out.splitlines()[-1] == str((tmp_path / "index.html").resolve())


def test_tour_no_bench_and_modes(fake_method, tmp_path):
    assert main(["tour", "fake-method", "--no-bench", "--full", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "fake-method" / "bench").exists()
    data = json.loads((tmp_path / "fake-method" / "metrics.json").read_text())
    assert data["mode"] == "full" and data["config"]["steps"] == 10
    assert data["commit"] is None or len(data["commit"]) >= 7
    assert data["date"][:2] == "20"


def test_not_measured_never_reads_all_hold_and_fails_strict(fake_method, tmp_path, capsys,
                                                           monkeypatch):
    import fake_experiment

    from mlatlas import runner

    def half_measured(cfg, out):
        rep = fake_experiment.run(cfg, out)
        rep.not_measured("same as TF", 0.0, "<=", reason="TensorFlow is not importable")
        return rep

    monkeypatch.setattr(runner.load_experiment("fake-method"), "run", half_measured)
    assert main(["run", "fake-method", "--out", str(tmp_path / "a")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "1 of 2 claims hold, 1 not measured" in out
    assert "not measured: TensorFlow is not importable" in out
    assert main(["run", "fake-method", "--strict", "--out", str(tmp_path / "b")]) == EXIT_CLAIM
    assert main(["tour", "fake-method", "--strict", "--out", str(tmp_path / "c")]) == EXIT_CLAIM
    assert "2 of 3 claims hold, 1 not measured" in capsys.readouterr().out


def test_bench_runs_and_missing_bench_exits_2(fake_method, tmp_path, capsys):
    assert main(["bench", "fake-method", "--out", str(tmp_path / "b")]) == EXIT_OK
    data = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert data["kind"] == "bench" and data["metrics"]["ratio"] == 2.0
    assert main(["bench", "fake-method", "--smoke", "--out", str(tmp_path / "s")]) == EXIT_OK
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["mode"] == "smoke"
    assert main(["bench", "fake-broken", "--out", str(tmp_path / "c")]) == EXIT_USAGE
    assert "has no benchmark" in capsys.readouterr().err


def test_tour_of_chosen_ids(fake_method, tmp_path, capsys):
    assert main(["tour", "fake-method", "--smoke", "--out", str(tmp_path)]) == EXIT_OK
    assert (tmp_path / "fake-method" / "metrics.json").exists()
    assert not (tmp_path / "fake-broken").exists()
    assert main(["tour", "fake-method", "--field", "llm", "--out", str(tmp_path)]) == EXIT_USAGE


def test_console_script_is_installed():
    res = subprocess.run([sys.executable, "-m", "mlatlas.cli", "--version"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "mlatlas" in res.stdout


def test_two_runs_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Default output folders are per run even within one second: the README's `run ddim
    --seed 3` then `run ddim` once shared a folder, and the second refused the first's
    checkpoint."""
    from mlatlas import runner, runtime
    from mlatlas.llm import parallel_pretraining

    class Frozen(runtime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 30, 17, 19, 53)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "datetime", Frozen)
    first, second = runner.default_out("ddim"), runner.default_out("ddim")
    assert first.name == "20261130-171953" and second.name == "20261130-171953-2"
    assert first.is_dir() and second.is_dir()
    assert runner.default_out("ddim", "bench").name == "bench-20261130-171953"
    # `mlatlas train` (no --out) twice in one second: a second folder, not the first's
    # checkpoints overwritten
    trains = parallel_pretraining.default_out(), parallel_pretraining.default_out()
    assert [p.name for p in trains] == ["20261130-171953", "20261130-171953-2"]
    assert all(p.is_dir() and p.parent == Path("runs") / "train" for p in trains)
