"""The README is generated where it lists methods, and its commands and snippets run as written.

Every fenced ``bash`` and ``python`` block of README.md is extracted and run in a scratch
folder. Long commands run as smoke runs: ``mlatlas run/bench`` get ``--smoke`` (instead of
``--full``), ``mlatlas tour`` becomes a smoke tour of one method of its field; ``make …`` lines
are skipped (they install the environment this test already runs in). A command passes when it
exits 0 — or 1 for a run whose smoke-sized claims did not all hold — and prints no traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mlatlas import catalog

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
_FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
_SKIP = {"make", "git", "xdg-open", "open", "cd"}


def blocks(lang: str) -> list[str]:
    """The README's fenced blocks of ``lang``."""
    return [body for tag, body in _FENCE.findall(README) if tag == lang]


def smoke_command(line: str) -> list[str] | None:
    """The argv that runs ``line`` of a bash block quickly (None: skip the line)."""
    words = shlex.split(line, comments=True)
    if not words or words[0] in _SKIP:
        return None
    if Path(words[0]).name == "python":
        return [sys.executable, *words[1:]]
    if Path(words[0]).name != "mlatlas":
        return words
    cmd, args = words[1], [w for w in words[2:] if w != "--full"]
    if cmd in ("run", "bench", "tour") and "--smoke" not in args:
        args.append("--smoke")
    if cmd == "tour" and not [a for a in args if not a.startswith("-") and
                              not _is_option_value(args, a)]:
        field = args[args.index("--field") + 1] if "--field" in args else None
        args.insert(0, next(m.id for m in catalog.by_field(field) if m.built))
    return [sys.executable, "-m", "mlatlas.cli", cmd, *args]


def _is_option_value(args: list[str], word: str) -> bool:
    i = args.index(word)
    return i > 0 and args[i - 1] in ("--field", "--out", "--set", "--seed")


def bash_commands() -> list[list[str]]:
    """The README's bash lines worth running, block by block (a block is what a reader pastes:
    its lines run in order, later ones read what earlier ones wrote); a smoke command already
    run by an earlier block is left out."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for body in blocks("bash"):
        lines = []
        for line in body.splitlines():
            argv = smoke_command(line)
            if argv and tuple(argv) not in seen:
                seen.add(tuple(argv))
                lines.append(line)
        if lines:
            out.append(lines)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLATLAS_NO_PROGRESS": "1",
            "MPLBACKEND": "Agg"}


def test_readme_method_table_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_readme.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + " — run `make readme` and commit README.md"


def test_readme_names_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_readme_has_commands_and_snippets():
    assert any("mlatlas run" in c for block in bash_commands() for c in block)
    assert blocks("python")


def test_smoke_rewriting():
    assert smoke_command(".venv/bin/mlatlas run ddim --full  # x")[3:] == ["run", "ddim",
                                                                          "--smoke"]
    assert smoke_command("mlatlas tour --field rl")[3:] == ["tour", "gridworld", "--field", "rl",
                                                            "--smoke"]
    assert smoke_command("make demo   # all") is None


@pytest.fixture(scope="session")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("block", bash_commands(), ids=lambda b: b[0].split("#")[0].strip())
def test_readme_bash_block_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/ is written there
    for line in block:
        argv = smoke_command(line)
        if argv[1:3] != ["-m", "mlatlas.cli"]:
            res = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True,
                                 text=True, timeout=600)
            assert res.returncode == 0, f"{line!r}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
            continue
        from mlatlas.cli import main

        cmd = argv[3:]
        rc = main(cmd)  # in-process: no torch import per line
        err = capsys.readouterr().err
        allowed = (0, 1) if cmd[0] in ("run", "bench", "tour") else (0,)
        assert rc in allowed, f"{line!r} ran as `mlatlas {' '.join(cmd)}` → exit {rc}:\n{err}"


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_snippet_runs(index, scratch):
    code = blocks("python")[index]
    res = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"README python block {index}:\n{code}\n{res.stderr[-3000:]}"
