"""Worker processes of tests/llm/test_zero.py (importable by name, so they also spawn).

One spawn of ``world`` gloo ranks trains every strategy K steps on the same global batches
(each rank on its ``1/N`` of the rows) and rank 0 writes what the test asserts: the
parameters after training and the per-step losses (``results.pt``) and the bytes each rank
held (``rank<r>.json``). Workers never assert — a failing rank would only show as a dead
process; an exception is written out instead.
"""

from __future__ import annotations

import json
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.pretraining import PretrainSchedule, adamw_for, warmup_cosine_lr
from mlatlas.llm.sharded_checkpoint import save_sharded
from mlatlas.llm.zero import distribute

#: Ψ = 1 530 parameters: not a multiple of 4, nor are the norm weights (18) or the tied
#: embedding (61 × 18); FSDP2 pads 61 rows to N · ⌈61/N⌉.
CONFIG = LlamaConfig(vocab_size=61, hidden_size=18, intermediate_size=30, num_layers=2,
                     num_heads=3, num_kv_heads=1, tie_word_embeddings=True,
                     max_position_embeddings=64)
SCHEDULE = PretrainSchedule(steps=3, batch=8, seq_len=11, lr=1e-2, warmup=1,
                            clip_norm=0.05)  # the norm is clipped on every step
BUCKET = 200  # small ZeRO buckets: several per group, uneven lengths
STRATEGIES = ("ddp", "zero1", "zero2", "fsdp2", "zero_redundancy")


def model() -> Llama:
    torch.manual_seed(0)
    return Llama(CONFIG)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CONFIG.vocab_size, (SCHEDULE.batch, SCHEDULE.seq_len + 1),
                          generator=g) for _ in range(SCHEDULE.steps)]


def loss_of(m: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = m(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


def single_process() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Full-batch training on this process alone: the reference (parameters, losses)."""
    m = model()
    opt = adamw_for(m, SCHEDULE)
    losses = []
    for step, rows in enumerate(batches()):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(SCHEDULE, step)
        loss = loss_of(m, rows)
        loss.backward()
        losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(m.parameters(), SCHEDULE.clip_norm)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, torch.stack(losses)


def train(strategy: str, ckpt: Path) -> tuple[dict, torch.Tensor, dict]:
    """K steps of ``strategy`` on this rank's rows; (full parameters, global losses, held)."""
    n, r = dist.get_world_size(), dist.get_rank()
    if strategy == "zero_redundancy":  # torch's stage 1, on DDP's averaged gradients
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        m = model()
        ddp = DistributedDataParallel(m)
        groups = adamw_for(m, SCHEDULE).param_groups
        opt = ZeroRedundancyOptimizer(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
            optimizer_class=torch.optim.AdamW, lr=SCHEDULE.lr, betas=(0.9, 0.95))
        fwd, step, zero = ddp, opt.step, opt.zero_grad

        def clip():
            torch.nn.utils.clip_grad_norm_(m.parameters(), SCHEDULE.clip_norm)
    else:
        d = distribute(model(), lambda mod: adamw_for(mod, SCHEDULE), strategy,
                       bucket_numel=BUCKET)
        opt = d.optimizer
        fwd, step, zero = d.model, d.step, d.zero_grad

        def clip():
            d.clip_grad_norm_(SCHEDULE.clip_norm)
    rows_per = SCHEDULE.batch // n
    held, losses = {}, []
    for k, rows in enumerate(batches()):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(SCHEDULE, k)
        loss = loss_of(fwd, rows[r * rows_per:(r + 1) * rows_per])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.AVG)  # equal rows per rank: the batch mean
        losses.append(total)
        clip()
        step()
        if k == SCHEDULE.steps - 1 and strategy != "zero_redundancy":
            b = d.state_bytes()
            held = {"params": b.params, "grads": b.grads, "optimizer": b.optimizer,
                    "state_tensors": len(d.optimizer.state),
                    "param_tensors": len(list(d.module.parameters()))}
        zero()
    if strategy == "zero_redundancy":
        state = m.state_dict()
    else:
        state = d.full_state_dict()
        if strategy == "zero2":
            save_sharded(d, ckpt, SCHEDULE.steps, {"model": CONFIG.to_dict(), "lora": None})
    return {k: v.detach().clone() for k, v in state.items()}, torch.stack(losses), held


def parity_worker(rank: int, world: int, store: str, out: str) -> None:
    """Entry point of ``torch.multiprocessing.spawn`` (``rank`` comes first)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    held: dict = {}
    try:
        torch.set_num_threads(1)
        results: dict = {}
        if rank == 0:
            results["single"] = single_process()
        for s in STRATEGIES:
            params, losses, held[s] = train(s, Path(out, "ckpt"))
            results[s] = (params, losses)
        if rank == 0:
            torch.save(results, Path(out, "results.pt"))
        dist.barrier()
    except Exception:
        held["error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(held))
    dist.destroy_process_group()


def train_worker(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    """One rank of ``mlatlas train`` as torchrun would start it (its environment variables);
    writes the exit code and stderr to ``train<rank>.json``."""
    import contextlib
    import io
    import os

    from mlatlas.train import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
    except Exception:
        code, err = -1, io.StringIO(traceback.format_exc())
    Path(out, f"train{rank}.json").write_text(json.dumps({"code": code,
                                                          "stderr": err.getvalue()}))
