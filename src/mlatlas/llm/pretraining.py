"""Next-token pretraining of a causal language model on a token stream.

The loop every tiny pretraining in mlatlas shares (the llama experiment, the shared models of
:mod:`mlatlas.llm.zoo`): random windows of the training stream (:func:`sample_windows`),
the mean next-token cross-entropy

    L(θ) = -1/(B·T) Σ_b Σ_t log p_θ(x_{b,t+1} | x_{b,≤t})

minimised with AdamW (decoupled weight decay on matrices only, Loshchilov & Hutter 2019,
arXiv:1711.05101) under a linear warm-up and cosine decay of the learning rate (Loshchilov &
Hutter 2017, arXiv:1608.03983), with the gradient norm clipped to 1 — the GPT-3 / LLaMA
recipe at toy scale (Touvron et al. 2023, arXiv:2302.13971, §2.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.datasets.corpus import sample_windows
from mlatlas.runtime import progress

__all__ = ["PretrainSchedule", "adamw_for", "evaluate_loss", "pretrain", "warmup_cosine_lr"]


@dataclass(frozen=True)
class PretrainSchedule:
    """What :func:`pretrain` runs.

    Attributes:
        steps: Optimizer steps in total (the schedule's length).
        batch: Windows per step ``B``.
        seq_len: Window length ``T``.
        lr: Peak learning rate.
        warmup: Linear warm-up steps.
        min_lr_ratio: The cosine decays to ``lr · min_lr_ratio``.
        weight_decay: AdamW decoupled weight decay (matrices only).
        clip_norm: Global gradient-norm clip.
    """

    steps: int
    batch: int
    seq_len: int
    lr: float = 3e-3
    warmup: int = 16
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0


def warmup_cosine_lr(schedule: PretrainSchedule, step: int) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then cosine to ``lr·min_lr_ratio``."""
    s = schedule
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup  # η_t = η (t+1) / warmup
    t = min((step - s.warmup) / max(1, s.steps - s.warmup), 1.0)
    # η_t = η (r + (1 - r) · ½ (1 + cos πt)),  r = min_lr_ratio
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def adamw_for(model: nn.Module, schedule: PretrainSchedule) -> torch.optim.AdamW:
    """AdamW with β = (0.9, 0.95), weight decay on ≥ 2-D parameters only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=schedule.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate_loss(model: nn.Module, tokens: Tensor, seq_len: int,
                  max_windows: int | None = None, batch: int = 64) -> float:
    """Mean next-token loss (nats/token) over consecutive non-overlapping windows.

    Args:
        model: ``input_ids [B, T] → logits [B, T, V]``.
        tokens: int64 stream ``[N]``.
        seq_len: Window length ``T``.
        max_windows: Evaluate at most this many windows (the first ones).
        batch: Windows per forward.
    """
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"tokens must hold more than seq_len={seq_len} tokens, got "
                         f"{tokens.numel()}")
    if max_windows is not None:
        n = min(n, max_windows)
    inputs = tokens[:n * seq_len].view(n, seq_len)
    targets = tokens[1:n * seq_len + 1].view(n, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        logits = model(inputs[i:i + batch])
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets[i:i + batch].flatten(),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n * seq_len)


def pretrain(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: Tensor,
             schedule: PretrainSchedule, generator: torch.Generator, *, start: int = 0,
             stop: int | None = None, description: str = "pretrain",
             on_step: Callable[[int, float], None] | None = None,
             starts: Tensor | None = None) -> list[float]:
    """Run optimizer steps ``start … stop-1`` of ``schedule`` in place (resumable).

    Args:
        model: ``input_ids [B, T] → logits [B, T, V]``.
        optimizer: Its learning rate is set every step from :func:`warmup_cosine_lr`.
        tokens: int64 training stream ``[N]``.
        schedule: The :class:`PretrainSchedule`.
        generator: The only randomness of the data order (save it to resume exactly).
        start: First step (after a resume).
        stop: One past the last step; default ``schedule.steps``.
        description: Progress-bar label.
        on_step: Called as ``on_step(step + 1, loss)`` after every step.
        starts: Positions windows may start at (see :func:`sample_windows`); default all.

    Returns:
        The training loss of every step run.
    """
    stop = schedule.steps if stop is None else stop
    model.train()
    losses = []
    for step in progress(range(start, stop), stop - start, description):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(schedule, step)
        x, y = sample_windows(tokens, schedule.batch, schedule.seq_len, generator, starts)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # L(θ)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip_norm)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses
