"""Data-parallel pretraining of the tiny Llama: one run, one rank of it (``mlatlas train``).

:func:`train` runs :class:`TrainConfig` in this process — one rank of the process group
``torchrun`` formed (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), or alone — with
the recipe of :mod:`mlatlas.llm.pretraining` (AdamW, warm-up + cosine, clipping) under one
strategy of :func:`mlatlas.llm.zero.distribute` (DDP, ZeRO-1/2, FSDP2). The atlas's parts
compose: sequence packing (:mod:`mlatlas.llm.packing`), the attention backend, gradient
checkpointing (:mod:`mlatlas.llm.gradient_checkpointing`) and LoRA (:mod:`mlatlas.peft.lora`).
The global batch of step ``k`` is drawn from a generator seeded by ``(seed, k)`` and split
over the ranks, and each rank's loss is its share of the *global* token mean
(``Σ_rank loss_sum · N / tokens``, then the strategy averages over the N ranks), so N
processes compute the same steps as one process on the whole batch. Rank 0 writes
``metrics.json``, ``model/`` (Hugging Face) or ``adapter/`` (peft, with LoRA); every rank
writes its shards of the checkpoints (:mod:`mlatlas.llm.sharded_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mlatlas.datasets.corpus import Corpus, load_corpus, sample_windows
from mlatlas.llm.gradient_checkpointing import enable_checkpointing
from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.packing import IGNORE_INDEX, pack
from mlatlas.llm.pretraining import PretrainSchedule, adamw_for, evaluate_loss, warmup_cosine_lr
from mlatlas.llm.sharded_checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_sharded,
    read_meta,
    save_sharded,
)
from mlatlas.llm.zero import STAGES, distribute, model_state_parts
from mlatlas.peft.lora import LoraConfig, apply_lora
from mlatlas.runtime import machine_info, new_run_folder, progress, versions

__all__ = ["DistributedSetupError", "TrainConfig", "default_out", "parse_lora", "train"]


@dataclass
class TrainConfig:
    """One training run (the options of ``mlatlas train``; defaults: the zoo's tiny Llama)."""

    model: str = "llama"
    strategy: str = "ddp"
    steps: int = 300  # optimizer steps of the schedule
    batch: int = 16  # global windows (rows) per step, split over the ranks
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    hidden_size: int = 128
    intermediate_size: int = 352
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    tokenizer: str = "bpe"  # "bpe" (512 tokens) or "bytes"
    vocab_size: int = 512
    packing: bool = False
    attention: str = "sdpa"
    checkpointing: str | None = None  # "every_k" or "sqrt"
    checkpointing_k: int = 1
    lora: str | None = None  # "r=8,alpha=16[,dropout=0.0][,targets=q_proj+v_proj]"
    init: str | None = None  # a Hugging Face Llama folder to start from
    out: str | None = None
    resume: bool = False
    save_every: int = 0  # also checkpoint every k steps (always at the end)
    until: int | None = None  # stop after this step (an interrupted run; --resume goes on)
    eval_windows: int = 32
    seed: int = 0
    device: str = "auto"
    timeout: float = 300.0  # seconds for the rendezvous and every collective
    bucket_numel: int = 2**23


def parse_lora(text: str) -> LoraConfig:
    """``"r=8,alpha=16[,dropout=0.05][,targets=q_proj+v_proj]"`` → :class:`LoraConfig`.

    Raises:
        ValueError: an unknown key or a malformed value (named).
    """
    kw: dict[str, Any] = {}
    names = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "targets": "target_modules"}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--lora expects key=value items with keys {sorted(names)}, got "
                             f"{item!r}")
        try:
            kw[names[key]] = (value.split("+") if key == "targets" else
                              int(value) if key == "r" else float(value))
        except ValueError:
            raise ValueError(f"--lora {key} expects a number, got {value!r}") from None
    return LoraConfig(**kw)


def default_out() -> Path:
    """A new folder ``runs/train/<timestamp>``, created here (``…-2`` when a run started in the
    same second holds the name: its checkpoints are never another run's)."""
    return new_run_folder(Path("runs") / "train")


class DistributedSetupError(RuntimeError):
    """The process group could not be formed (missing variables, unreachable rendezvous)."""


def _init_process_group(cfg: TrainConfig) -> torch.device:
    """Join torchrun's process group (or make a 1-process one); returns the device."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    backend = "nccl" if use_cuda else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.timeout)
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return device
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise DistributedSetupError(f"a multi-process run needs the environment variables "
                                    f"{', '.join(missing)} (torchrun sets them)")
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:  # DistNetworkError / DistStoreError included
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistributedSetupError(
            f"the rendezvous at {where} did not form within --timeout {cfg.timeout:g} s "
            f"({os.environ['WORLD_SIZE']} processes expected): start every process, check "
            f"the address ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return device


@dataclass
class _Batch:
    """This rank's rows of the global batch of one step."""

    input_ids: Tensor
    labels: Tensor  # IGNORE_INDEX where nothing is predicted
    position_ids: Tensor | None
    cu_seqlens: Tensor | None
    global_tokens: int  # predicted tokens in the whole global batch


def _documents(stream: Tensor, eot: int) -> list[Tensor]:
    ends = (stream == eot).nonzero().flatten().tolist()
    starts = [0, *(e + 1 for e in ends[:-1])]
    return [stream[s:e + 1] for s, e in zip(starts, ends) if e + 1 - s >= 2]


def _batch(cfg: TrainConfig, corpus: Corpus, docs: list[Tensor] | None, step: int,
           rank: int, world: int) -> _Batch:
    """Rows ``[r·B/N, (r+1)·B/N)`` of step ``step``'s global batch (the same on every rank)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows = cfg.batch // world
    if docs is None:  # random windows of the token stream
        x, y = sample_windows(corpus.train, cfg.batch, cfg.seq_len, g)
        sl = slice(rank * rows, (rank + 1) * rows)
        return _Batch(x[sl], y[sl], None, None, y.numel())
    seqs: list[Tensor] = []  # whole documents (a random crop of long ones) until B rows fill
    while sum(len(s) for s in seqs) < cfg.batch * cfg.seq_len:
        for i in torch.randint(0, len(docs), (cfg.batch,), generator=g).tolist():
            d = docs[i]
            if len(d) > cfg.seq_len:
                start = int(torch.randint(0, len(d) - cfg.seq_len + 1, (1,), generator=g))
                d = d[start:start + cfg.seq_len]
            seqs.append(d)
    packed = pack(seqs, cfg.seq_len).split(cfg.batch)[0].split(rows)
    part = packed[rank]
    total = sum(int((p.labels != IGNORE_INDEX).sum()) for p in packed)
    return _Batch(part.input_ids, part.labels, part.position_ids, part.cu_seqlens, total)


def _model(cfg: TrainConfig, vocab: int) -> Llama:
    """The Llama of this run (seeded: identical on every rank), with LoRA and recompute."""
    torch.manual_seed(cfg.seed)
    if cfg.init:
        loaded = Llama.from_pretrained(cfg.init)
        if loaded.config.vocab_size != vocab:
            raise ValueError(f"--init {cfg.init} has vocab_size {loaded.config.vocab_size}, "
                             f"the {cfg.tokenizer} tokenizer {vocab}")
        model = Llama(dataclasses.replace(loaded.config, attn_backend=cfg.attention))
        model.load_state_dict(loaded.state_dict())
    else:
        model = Llama(LlamaConfig(
            vocab_size=vocab, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_layers=cfg.layers,
            num_heads=cfg.heads, num_kv_heads=cfg.kv_heads,
            max_position_embeddings=max(1024, cfg.seq_len), tie_word_embeddings=True,
            attn_backend=cfg.attention))
    if cfg.lora:
        torch.manual_seed(cfg.seed + 1)
        apply_lora(model, parse_lora(cfg.lora))
    if cfg.checkpointing:
        enable_checkpointing(model, cfg.checkpointing, cfg.checkpointing_k)
    return model


def _identity(cfg: TrainConfig, model: Llama) -> dict[str, Any]:
    """What a checkpoint's state belongs to (compared on --resume)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "attn_backend"}
    lora = dataclasses.asdict(parse_lora(cfg.lora)) if cfg.lora else None
    # ZeRO's flat buckets are the checkpoint's layout (the world size is not)
    buckets = cfg.bucket_numel if cfg.strategy in ("zero1", "zero2") else None
    return {"model": config, "lora": lora, "zero_bucket_numel": buckets}


def train(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run the training of ``cfg`` in this process (one rank of torchrun's group, or alone).

    Returns:
        The metrics (rank 0), None on the other ranks.

    Raises:
        ValueError: a batch the world size does not divide, a checkpoint of another model,
            a bad option — on every rank, before any collective.
        DistributedSetupError: the process group could not be formed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; checked before the rendezvous
    if cfg.batch % world:  # so that no rank leaves while another is still joining
        raise ValueError(f"--batch {cfg.batch} must be divisible by the number of processes "
                         f"({world}): every rank trains on batch / processes rows")
    device = _init_process_group(cfg)
    try:
        return _train(cfg, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # the group dies with its last holder: free reference cycles now (FSDP2's modules and
        # states, the frames torch.fx keeps while DDP imports it), not in a collection at
        # interpreter exit, where gloo aborted a rank ("terminate called without an active
        # exception"). FSDP2's finalizers free more: a second pass collects that.
        for _ in range(4):
            if not gc.collect():
                break


def _train(cfg: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = [str(cfg.out or default_out()) if rank == 0 else None]
    dist.broadcast_object_list(out, src=0)  # one folder for every rank
    out_dir = Path(out[0])
    corpus = load_corpus(cfg.tokenizer, cfg.vocab_size)
    docs = _documents(corpus.train, corpus.tokenizer.eot_id) if cfg.packing else None
    model = _model(cfg, corpus.tokenizer.vocab_size)
    identity = _identity(cfg, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ckpt, resumed, losses = None, None, []
    if cfg.resume:
        ckpt = latest_checkpoint(out_dir / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in "
                                    f"{out_dir / 'checkpoints'}")
        check_compatible(read_meta(ckpt), identity, cfg.strategy, ckpt)
    schedule = PretrainSchedule(steps=cfg.steps, batch=cfg.batch, seq_len=cfg.seq_len,
                                lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                                clip_norm=cfg.clip_norm)
    d = distribute(model.to(device), lambda m: adamw_for(m, schedule), cfg.strategy,
                   bucket_numel=cfg.bucket_numel)
    start = 0
    if ckpt is not None:
        meta = load_sharded(d, ckpt)
        start, losses, resumed = meta["step"], list(meta["losses"]), meta["step"]
    stop = cfg.until or cfg.steps
    held, tokens, t0 = None, 0, time.perf_counter()
    for step in progress(range(start, stop), stop - start, f"train {cfg.strategy} ×{world}",
                         enabled=None if rank == 0 else False):
        for group in d.optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(schedule, step)
        b = _batch(cfg, corpus, docs, step, rank, world)
        logits = d.model(b.input_ids.to(device), position_ids=None if b.position_ids is None
                         else b.position_ids.to(device),
                         cu_seqlens=None if b.cu_seqlens is None else b.cu_seqlens.to(device))
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), b.labels.to(device).flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        # this rank's share of the global mean; the strategies average over the N ranks
        (loss_sum * world / b.global_tokens).backward()
        d.clip_grad_norm_(cfg.clip_norm)
        d.step()
        if step == stop - 1:
            held = d.state_bytes()  # after the step, before zero_grad: all three exist
        d.zero_grad()
        total = loss_sum.detach().reshape(1)
        dist.all_reduce(total)
        losses.append(float(total) / b.global_tokens)
        tokens += b.global_tokens
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < stop:
            save_sharded(d, out_dir / "checkpoints", step + 1, {**identity, "losses": losses})
    elapsed = time.perf_counter() - t0
    if stop > start:
        save_sharded(d, out_dir / "checkpoints", stop, {**identity, "losses": losses})
    val = evaluate_loss(d.module, corpus.val.to(device), cfg.seq_len,
                        max_windows=cfg.eval_windows)
    held_all: list[Any] = [None] * world
    dist.all_gather_object(held_all, None if held is None else dataclasses.asdict(held))
    full = d.full_state_dict() if stop == cfg.steps else None
    if rank != 0:
        return None
    metrics = _metrics(cfg, world, device, losses, val, tokens, elapsed, held_all, resumed,
                       stop, trainable)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if full is not None:
        _save_model(cfg, corpus.tokenizer.vocab_size, full, out_dir)
    print(f"{cfg.strategy} on {world} process(es): step {stop}/{cfg.steps}, train loss "
          f"{metrics['final_loss']:.4f}, val loss {val:.4f}; {out_dir / 'metrics.json'}")
    return metrics


def _metrics(cfg: TrainConfig, world: int, device: torch.device, losses: list[float],
             val: float, tokens: int, elapsed: float, held_all: list[Any],
             resumed: int | None, stop: int, trainable: int) -> dict[str, Any]:
    return {
        "model": cfg.model, "strategy": cfg.strategy, "stage": STAGES[cfg.strategy],
        "world_size": world, "backend": dist.get_backend(), "device": str(device),
        "steps": stop, "completed": stop == cfg.steps, "resumed_from": resumed,
        "final_loss": losses[-1] if losses else float("nan"), "val_loss": val,
        "losses": losses, "tokens": tokens, "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"),
        "trainable_params": trainable,
        "state_bytes_per_rank": held_all,
        "memory_model_fp32_adam": model_state_parts(trainable, STAGES[cfg.strategy], world,
                                                    param_bytes=4, grad_bytes=4,
                                                    optim_bytes=8),
        "config": dataclasses.asdict(cfg), "versions": versions(), "machine": machine_info(),
    }


def _save_model(cfg: TrainConfig, vocab: int, full: dict[str, Tensor], out_dir: Path) -> None:
    """``model/`` (Hugging Face folder) or, with LoRA, ``adapter/`` (peft folder)."""
    plain = dataclasses.replace(cfg, checkpointing=None)
    model = _model(plain, vocab)
    model.load_state_dict({k: v.cpu() for k, v in full.items()})
    if cfg.lora:
        from mlatlas.peft.peft_format import save_adapter

        save_adapter(model, out_dir / "adapter")
    else:
        model.save_pretrained(out_dir / "model")
