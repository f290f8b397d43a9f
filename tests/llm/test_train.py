"""``mlatlas train``: the atlas's parts composed, on 1 and 2 processes, with every strategy.

Two ranks are forked processes that set the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` …) and call :func:`mlatlas.train.main`, so the whole
command runs — rendezvous, sharding, checkpoints, metrics — without re-importing torch per
process (the README's ``--nproc 2`` line runs a real ``torchrun``). The reference is the
same command on one process: the global batch of a step is split over the ranks and each
rank's loss is its share of the global token mean, so the runs agree to rounding
(fp32 rounding, amplified by Adam, is ≤ 1e-6 here; atol 1e-5 on the losses).
"""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import zero_workers
from torch.nn.parallel import DistributedDataParallel

from mlatlas.llm.llama import Llama
from mlatlas.llm.parallel_pretraining import parse_lora
from mlatlas.llm.zero_optimizer import ZeroOptimizer
from mlatlas.train import main

TINY = ["llama", "--steps", "3", "--batch", "4", "--seq-len", "24", "--hidden-size", "24",
        "--intermediate-size", "40", "--layers", "2", "--heads", "2", "--kv-heads", "1",
        "--eval-windows", "2", "--warmup", "1", "--timeout", "60"]
#: every part that composes: packing, the atlas's flash attention, recompute, LoRA
PARTS = ["--packing", "--attention", "flash", "--checkpointing", "sqrt", "--lora",
         "r=4,alpha=8"]
LOSS_ATOL = 1e-5
README = Path(__file__).resolve().parents[2] / "README.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(argv: list[str], tmp: Path) -> list[dict]:
    mp.start_processes(zero_workers.train_worker, args=(2, _free_port(), argv, str(tmp)),
                       nprocs=2, join=True, start_method="fork")
    return [json.loads((tmp / f"train{r}.json").read_text()) for r in range(2)]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the same command, every part on, on one process."""
    out = tmp_path_factory.mktemp("single")
    assert main([*TINY, *PARTS, "--out", str(out)]) == 0
    return _metrics(out)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2"])
def test_nothing_that_holds_the_process_group_outlives_the_run(strategy, tmp_path):
    """Without a garbage collection: a model or optimizer left in a reference cycle kept the
    group alive until interpreter exit, where gloo aborted a torchrun rank."""
    def alive() -> int:
        return sum(isinstance(o, (Llama, ZeroOptimizer, DistributedDataParallel))
                   for o in gc.get_objects())

    gc.collect()
    before = alive()
    gc.disable()
    try:
        assert main([*TINY, "--strategy", strategy, "--out", str(tmp_path)]) == 0
        assert alive() == before, f"{strategy}: the run's model or optimizer is still alive"
    finally:
        gc.enable()


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "fsdp2"])
def test_two_processes_with_every_part_end_where_one_process_ends(single, strategy, tmp_path):
    out = tmp_path / "run"
    ranks = _two_ranks([*TINY, *PARTS, "--strategy", strategy, "--out", str(out)], tmp_path)
    assert [r["code"] for r in ranks] == [0, 0], ranks
    m = _metrics(out)
    assert (m["world_size"], m["strategy"], m["completed"]) == (2, strategy, True)
    torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(single["losses"]),
                               atol=LOSS_ATOL, rtol=0.0)
    assert abs(m["val_loss"] - single["val_loss"]) <= LOSS_ATOL
    assert (out / "adapter" / "adapter_config.json").is_file()  # a peft folder (LoRA)
    # what each rank held, against the paper's memory model (fp32 Adam) of the trainable Ψ
    held, model = m["state_bytes_per_rank"], m["memory_model_fp32_adam"]
    for h in held:
        assert h["optimizer"] == pytest.approx(model["optimizer"], rel=0.05, abs=256)
        if strategy in ("zero2", "fsdp2"):
            assert h["grads"] == pytest.approx(model["grads"], rel=0.05, abs=256)


def test_checkpoint_of_two_processes_resumes_on_one(tmp_path):
    """An interrupted 2-process ZeRO-2 run (step 2 of 3) finishes on one process."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*TINY, "--strategy", "zero1", "--out", str(whole)]) == 0
    ranks = _two_ranks([*TINY, "--strategy", "zero2", "--until", "2", "--out", str(cut)],
                       tmp_path)
    assert [r["code"] for r in ranks] == [0, 0], ranks
    assert _metrics(cut)["completed"] is False
    assert main([*TINY, "--strategy", "zero1", "--resume", "--out", str(cut)]) == 0
    m, ref = _metrics(cut), _metrics(whole)
    assert (m["resumed_from"], m["steps"], m["world_size"]) == (2, 3, 1)
    torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(ref["losses"]),
                               atol=LOSS_ATOL, rtol=0.0)


def test_resume_refuses_another_model_and_another_layout(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--strategy", "zero1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*TINY, "--steps", "1", "--hidden-size", "16", "--strategy", "zero1",
                 "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "was written for another model: " in err
    assert "hidden_size=24 (checkpoint) vs 16 (this run)" in err
    assert main([*TINY, "--steps", "1", "--strategy", "fsdp2", "--resume",
                 "--out", str(out)]) == 2
    assert "written by --strategy zero1" in capsys.readouterr().err
    assert main([*TINY, "--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "--resume: no complete checkpoint" in capsys.readouterr().err


def test_a_batch_the_processes_do_not_divide_fails_on_every_rank(tmp_path):
    ranks = _two_ranks([*TINY, "--batch", "3", "--out", str(tmp_path / "run")], tmp_path)
    assert [r["code"] for r in ranks] == [2, 2]
    for r in ranks:
        assert "--batch 3 must be divisible by the number of processes (2)" in r["stderr"]


def test_missing_or_unreachable_rendezvous_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main([*TINY, "--out", "unused"]) == 2
    assert "needs the environment variables MASTER_ADDR, MASTER_PORT" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # nobody listens there
    assert main([*TINY, "--timeout", "2", "--out", "unused"]) == 2
    assert "did not form within --timeout 2 s" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--lora", "rank=8"], "--lora expects key=value items with keys"),
    (["--lora", "r=eight"], "--lora r expects a number, got 'eight'"),
    (["--strategy", "zero3"], "argument --strategy: invalid choice: 'zero3'"),
])
def test_bad_options_get_one_line_and_exit_2(argv, message, capsys):
    assert main([*TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parse_lora():
    cfg = parse_lora("r=8,alpha=16,targets=q_proj+v_proj")
    assert (cfg.r, cfg.lora_alpha, list(cfg.target_modules)) == (8, 16.0, ["q_proj", "v_proj"])


def test_nproc_relaunches_under_torchrun(monkeypatch, tmp_path):
    """``--nproc 2`` re-runs the same command under ``torchrun --standalone`` (the README runs
    it for real: tests/test_readme.py)."""
    import mlatlas.train as train_module

    calls = []
    monkeypatch.setattr(train_module.subprocess, "run",
                        lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main([*TINY, "--nproc", "2", "--strategy", "fsdp2", "--out", str(tmp_path)]) == 0
    (cmd,) = calls
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node=2", "-m"]
    assert cmd[6:8] == ["mlatlas", "train"] and "--nproc" not in cmd
    assert cmd[8:] == [*TINY, "--strategy", "fsdp2", "--out", str(tmp_path)]


def test_the_cli_dispatches_train(capsys):
    from mlatlas.cli import main as cli_main

    assert cli_main(["train", "--help"]) == 0
    assert "--strategy {ddp,zero1,zero2,fsdp2}" in capsys.readouterr().out


def _readme_torchrun_lines() -> list[list[str]]:
    """The ``torchrun`` lines of the README's ``sh`` block (continuations joined)."""
    (block,) = re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.M | re.S)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
            if "torchrun" in line]


def test_readme_several_machines_lines_run_on_two_local_nodes(tmp_path):
    """The README's two ``torchrun`` lines, as written, on this machine: the standalone line,
    then the several-machines line started twice — two "machines" of one process each
    (``--nproc-per-node 4`` → 1 on 2 cores), meeting at a c10d rendezvous on localhost in
    place of ``HOST:29500`` — with the tiny model's options appended. Both nodes exit 0 and
    rank 0 writes a completed 2-process run."""
    standalone, nodes = _readme_torchrun_lines()
    assert "--standalone" in standalone and "--nnodes" in nodes and "HOST:29500" in nodes
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": str(README.parent / "src"), "MLATLAS_NO_PROGRESS": "1"}
    # standalone: 2 processes on this machine (its default --out is runs/train/<timestamp>)
    res = subprocess.run([*torchrun, *standalone[1:], *TINY[1:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "train").iterdir()
    assert _metrics(run)["world_size"] == 2
    # several machines: the same line on each node
    out = tmp_path / "shared" / "runs" / "llama"
    swap = {"HOST:29500": f"127.0.0.1:{_free_port()}", "4": "1", "/shared/runs/llama": str(out)}
    argv = [*torchrun, *[swap.get(w, w) for w in nodes[1:]], *TINY[1:]]
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    m = _metrics(out)
    assert (m["world_size"], m["strategy"], m["completed"]) == (2, "fsdp2", True)
