"""A small, resumable training loop shared by the generative methods.

DDPM/DDIM (ε-prediction), guidance (conditional ε with label dropout), score SDEs, rectified
flow and flow matching (velocity regression) all train a denoiser the same way: draw a batch of
data, draw noise and times inside a method-specific loss, take an Adam step. Only the loss
differs, so the loop lives here once: :func:`train_denoiser` takes the loss as a function,
keeps an optional exponential moving average (EMA) of the weights (Polyak averaging, as DDPM
samples from), and writes a safetensors checkpoint from which a resumed run ends at exactly
the numbers of an uninterrupted one.

=================  ==========================================================
``data_sampler``   ``(batch_size, generator) → batch`` (a tensor or a tuple)
``loss_fn``        ``(model, batch, generator) → scalar loss``
``generator``      the one ``torch.Generator`` both draw from (saved in the checkpoint)
=================  ==========================================================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlatlas.runtime import progress
from mlatlas.training_state import checkpoint_info, load_checkpoint, save_checkpoint

__all__ = ["TrainResult", "lr_at", "train_denoiser"]


def lr_at(step: int, steps: int, lr: float, warmup: int = 0, schedule: str = "constant"
          ) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant or cosine to 0.1·lr.

    Raises:
        ValueError: for an unknown ``schedule``.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@dataclass
class TrainResult:
    """What :func:`train_denoiser` returns.

    Attributes:
        losses: Loss of every step from 0 to ``steps`` (restored from the checkpoint for
            steps done before a resume).
        steps: Steps completed.
        resumed_from: Step the run resumed from (0 when it started fresh).
        ema: The EMA copy of the model (eval mode), or None without ``ema_decay``.
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    ema: nn.Module | None = None

    @property
    def sampling_model(self) -> nn.Module | None:
        """The EMA model when there is one (what to sample from), else None."""
        return self.ema


def train_denoiser(model: nn.Module, loss_fn: Callable[[nn.Module, Any, torch.Generator], Tensor],
                   data_sampler: Callable[[int, torch.Generator], Any], steps: int, lr: float, *,
                   batch_size: int = 256, generator: torch.Generator | None = None,
                   weight_decay: float = 0.0, grad_clip: float | None = 1.0, warmup: int = 0,
                   schedule: str = "constant", ema_decay: float | None = None,
                   checkpoint: str | Path | None = None, checkpoint_every: int = 0,
                   tag: str = "", show_progress: bool = False, desc: str = "train"
                   ) -> TrainResult:
    """Train ``model`` for ``steps`` AdamW steps on ``loss_fn`` over batches of ``data_sampler``.

    Args:
        model: The network; trained in place (left in train mode).
        loss_fn: ``loss_fn(model, batch, generator)`` → scalar loss; draws its own noise and
            times from ``generator``.
        data_sampler: ``data_sampler(batch_size, generator)`` → one batch.
        steps: Total number of optimiser steps (including any done before a resume).
        lr: Peak learning rate.
        batch_size: Passed to ``data_sampler``.
        generator: The generator batches and noise are drawn from (a fresh one seeded 0 when
            None). Its state is checkpointed.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: Max global gradient norm, or None for no clipping.
        warmup: Linear warm-up steps.
        schedule: ``"constant"`` or ``"cosine"`` (to 0.1·lr at ``steps``).
        ema_decay: Keep ``ema ← d·ema + (1−d)·model`` after every step when given.
        checkpoint: A ``.safetensors`` path. If it exists the run resumes from it; it is
            (re)written at the end and every ``checkpoint_every`` steps.
        checkpoint_every: Save period in steps (0: only at the end).
        tag: A string identifying the configuration; a checkpoint written under another tag
            is refused instead of silently resumed.
        show_progress: Show a progress bar (when stderr is a terminal).
        desc: Progress bar text.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: for non-positive ``steps``/``lr``/``batch_size``, an ``ema_decay``
            outside [0, 1), or a checkpoint from another ``tag`` or with more steps.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay is not None else None
    bundle = nn.ModuleDict({"model": model, **({"ema": ema} if ema is not None else {})})
    # fused: one kernel for all parameters (on a CPU the per-parameter loop of the default
    # implementation costs more than the arithmetic for networks this small)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    losses: list[float] = []
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        saved_tag = checkpoint_info(path)["extra"].get("tag", "")  # before touching the model
        if saved_tag != tag:
            raise ValueError(f"checkpoint {path} was written for tag {saved_tag!r}, this run "
                             f"has tag {tag!r}; delete it or use another path")
        info = load_checkpoint(path, bundle, opt, generators={"data": g})
        start = info["step"]
        if start > steps:
            raise ValueError(f"checkpoint {path} holds {start} steps, more than steps={steps}")
        losses = list(info["extra"].get("losses", []))

    def save(step: int) -> None:
        if path is not None:
            save_checkpoint(path, bundle, opt, step=step, generators={"data": g},
                            extra={"tag": tag, "losses": losses})

    model.train()
    for step in progress(range(start, steps), total=steps - start, description=desc,
                         enabled=None if show_progress else False):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, schedule)
        loss = loss_fn(model, data_sampler(batch_size, g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                # ema ← d·ema + (1−d)·θ
                torch._foreach_lerp_(list(ema.parameters()),
                                     [p.detach() for p in model.parameters()], 1.0 - ema_decay)
        losses.append(float(loss.detach()))
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    if path is not None and (start < steps or not path.is_file()):
        save(steps)
    return TrainResult(losses=losses, steps=steps, resumed_from=start, ema=ema)
