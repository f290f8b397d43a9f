"""``mlatlas train`` — one training command for the atlas's parts, on 1 … N processes.

    mlatlas train llama [--strategy ddp|zero1|zero2|fsdp2] [--nproc N] [--steps K]
                        [--out DIR] [--packing] [--attention sdpa|flash|flash_triton|math]
                        [--checkpointing every_k|sqrt] [--lora r=8,alpha=16] [--resume] …

Pretrains the tiny Llama on the embedded corpus, data-parallel under one strategy of
:func:`mlatlas.llm.zero.distribute`, with packing, the attention backend, gradient
checkpointing and LoRA composed in any combination: the run itself is
:func:`mlatlas.llm.parallel_pretraining.train`; this module is its command line.

Processes come from PyTorch's own launcher: ``--nproc N`` re-runs this command under
``torchrun --standalone --nproc-per-node N``; any ``torchrun`` line works too (several
machines: ``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``). gloo on the CPU,
NCCL on GPUs (one per process). Output (rank 0): ``metrics.json`` (``final_loss``,
``val_loss``, losses, tokens/s, the model-state bytes each rank held against
:func:`~mlatlas.llm.zero.model_state_bytes`), ``model/`` (a Hugging Face folder) or
``adapter/`` (a peft folder, with ``--lora``), and sharded checkpoints in ``checkpoints/``
that ``--resume`` continues from on any number of processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from typing import NoReturn

from mlatlas.llm.parallel_pretraining import (
    DistributedSetupError,
    TrainConfig,
    default_out,
    parse_lora,
    train,
)
from mlatlas.llm.zero import STRATEGIES
from mlatlas.nn.attention import BACKENDS

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line naming the argument, exit 2
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``mlatlas train`` (see the module docstring)."""
    d = TrainConfig()
    p = _Parser(prog="mlatlas train", description="Pretrain the tiny Llama on "
                                "the embedded corpus, data-parallel on 1 … N processes.")
    p.add_argument("model", choices=("llama",), help="what to train")
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="ddp (ZeRO stage 0), zero1, zero2 (our ZeRO optimizer) or fsdp2 (stage 3)")
    p.add_argument("--nproc", type=int, help="launch N processes on this machine (torchrun)")
    for name in ("steps", "batch", "seq_len", "warmup", "hidden_size", "intermediate_size",
                 "layers", "heads", "kv_heads", "vocab_size", "checkpointing_k", "save_every",
                 "until", "eval_windows", "seed", "bucket_numel"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "clip_norm", "timeout"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--tokenizer", choices=("bpe", "bytes"), default=d.tokenizer)
    p.add_argument("--packing", action="store_true", help="pack whole documents per row")
    p.add_argument("--attention", choices=BACKENDS, default=d.attention)
    p.add_argument("--checkpointing", choices=("every_k", "sqrt"),
                   help="recompute the layers in backward (every_k uses --checkpointing-k)")
    p.add_argument("--lora", metavar="r=8,alpha=16", help="train LoRA factors only")
    p.add_argument("--init", metavar="DIR", help="start from this Hugging Face Llama folder")
    p.add_argument("--out", help="output folder (default runs/train/<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    return p


def _config(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    for name in ("steps", "batch", "seq_len", "hidden_size", "intermediate_size", "layers",
                 "heads", "kv_heads", "checkpointing_k", "eval_windows", "bucket_numel"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.until is not None and not 1 <= cfg.until <= cfg.steps:
        raise ValueError(f"--until must lie in [1, --steps={cfg.steps}], got {cfg.until}")
    if cfg.lora:
        parse_lora(cfg.lora)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``mlatlas train …``; launches torchrun for ``--nproc N > 1``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        cfg = _config(args)
        under_launcher = "LOCAL_RANK" in os.environ or "RANK" in os.environ
        if args.nproc is not None and args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc and args.nproc > 1 and not under_launcher:
            return _launch(list(sys.argv[1:] if argv is None else argv), args.nproc, cfg)
        train(cfg)
        return EXIT_OK
    except (ValueError, FileNotFoundError, DistributedSetupError) as exc:
        rank = os.environ.get("RANK")
        print(f"mlatlas train: error{f' (rank {rank})' if rank else ''}: {exc}",
              file=sys.stderr)
        return EXIT_USAGE


def _launch(argv: list[str], nproc: int, cfg: TrainConfig) -> int:
    """Re-run this command under ``torchrun --standalone`` (a free local port)."""
    argv = [a for i, a in enumerate(argv) if a != "--nproc" and not a.startswith("--nproc=")
            and (i == 0 or argv[i - 1] != "--nproc")]
    if cfg.out is None:  # one folder for every rank
        argv += ["--out", str(default_out())]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "mlatlas", "train", *argv]
    return subprocess.run(cmd).returncode


