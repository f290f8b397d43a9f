"""The 2-D benchmark the diffusion experiments share: the ε-network, its trainer, its score.

DDPM (Ho et al. 2020, arXiv:2006.11239), DDIM (Song, Meng & Ermon 2020, arXiv:2010.02502)
and guidance (Dhariwal & Nichol 2021, arXiv:2105.05233; Ho & Salimans 2022, arXiv:2207.12598)
are shown on one set-up: a small MLP ε-network trained with DDPM's simplified loss
``E‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖²`` on a toy 2-D density, and samples scored by the
sliced Wasserstein distance SW₂ to a large true sample, next to the noise floor that exact
samples of the same size score (a perfect model is not at 0). The set-up lives here so each
experiment passes its own settings explicitly.

===================  ===========================================================
``density``          a 2-D density of :mod:`mlatlas.datasets.toy2d`
``n_sub``            points per scored subset (SW₂ depends on the sample size)
``n_reference``      size of the true reference sample (m ≫ n_sub)
floor                mean SW₂ of ``n_sub`` exact samples vs the reference
s.e.                 standard error of a mean over subsets (or over floor repeats)
===================  ===========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from mlatlas.datasets import toy2d
from mlatlas.generative import metrics
from mlatlas.generative.networks import MLPDenoiser
from mlatlas.generative.noise_schedule import NoiseSchedule, epsilon_loss
from mlatlas.generative.training import TrainResult, train_denoiser

__all__ = ["SubsetScore", "ToyDenoiserSettings", "ToyDensityScore", "toy_model",
           "train_toy_denoiser"]

N_PROJECTIONS = 256  # directions of every SW₂ estimate (fixed per seed)


def toy_model(hidden: int, depth: int, num_classes: int | None = None) -> MLPDenoiser:
    """The 2-D ε-network: an :class:`MLPDenoiser` with a 32-dim time embedding.

    Args:
        hidden: Width of the hidden layers.
        depth: Number of hidden layers.
        num_classes: Class labels of a conditional model (plus the null label), or None.
    """
    return MLPDenoiser(dim=2, hidden=hidden, depth=depth, time_dim=32, num_classes=num_classes)


@dataclass(frozen=True)
class ToyDenoiserSettings:
    """How :func:`train_toy_denoiser` trains the 2-D ε-network.

    Attributes:
        density: The toy2d density trained on.
        steps: AdamW steps (linear warm-up over ``min(100, steps // 10)``, cosine to 0.1·lr).
        batch_size: Points per step.
        lr: Peak learning rate.
        hidden: MLP width.
        depth: MLP hidden layers.
        ema_decay: EMA of the weights (the EMA model is the one to sample from).
        seed: Seeds the initialisation, the data and the noise.
    """

    density: str = "8gaussians"
    steps: int = 2000
    batch_size: int = 2048
    lr: float = 8e-3
    hidden: int = 48
    depth: int = 3
    ema_decay: float = 0.995
    seed: int = 0


def train_toy_denoiser(settings: ToyDenoiserSettings, schedule: NoiseSchedule, *,
                       checkpoint: str | Path | None = None, desc: str = "train ε(x, t)"
                       ) -> TrainResult:
    """Train :func:`toy_model` on ``settings.density`` with the ε-loss of ``schedule``.

    Args:
        settings: Density, optimiser and network settings.
        schedule: The forward process (a :class:`NoiseSchedule` or a scheduler built on it).
        checkpoint: A ``.safetensors`` path to resume from and write (None: no checkpoint).
            A checkpoint of other settings or another β schedule is refused.
        desc: Progress-bar text.

    Returns:
        The :class:`TrainResult`; its ``ema`` is the model to sample from.
    """
    s = settings
    g = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    model = toy_model(s.hidden, s.depth)
    betas = f"T{schedule.num_train_timesteps}-beta{float(schedule.betas[-1]):.6g}"
    return train_denoiser(
        model, lambda m, x0, gen: epsilon_loss(m, x0, schedule, gen),
        lambda n, gen: toy2d.sample(s.density, n, gen), s.steps, s.lr,
        batch_size=s.batch_size, generator=g, warmup=min(100, s.steps // 10),
        schedule="cosine", ema_decay=s.ema_decay, checkpoint=checkpoint,
        tag=f"{s.density}/{s.hidden}x{s.depth}/{betas}/{s.batch_size}/{s.lr}/{s.seed}",
        show_progress=True, desc=desc)


class SubsetScore(NamedTuple):
    """What :class:`ToyDensityScore` returns for one batch of points."""

    mean: float  # mean SW₂ over the subsets
    se: float  # its standard error (NaN for a single subset)


class ToyDensityScore:
    """SW₂ of generated points to a large true sample, with error bars and a noise floor.

    A generated batch is split into subsets of ``n_sub`` points; ``score(x)`` is the mean SW₂
    of the subsets and its standard error — the run's own estimate of the metric's noise.
    ``floor`` / ``floor_std`` are the mean and spread of the SW₂ that ``n_sub`` *exact*
    samples score against the same reference (the noise floor), ``floor_se`` its standard
    error. All estimates use the same 256 directions.

    Args:
        density: The toy2d density.
        n_sub: Points per scored subset.
        n_reference: Size of the true reference sample.
        repeats: Exact subsets scored for the floor (>= 2).
        seed: Seeds the reference (``10_000 + seed``), the floor draws (``20_000 + seed``)
            and the directions (``seed``).
    """

    def __init__(self, density: str, n_sub: int, n_reference: int, repeats: int, seed: int):
        ref = toy2d.sample(density, n_reference, torch.Generator().manual_seed(10_000 + seed))
        self.sw = metrics.SlicedWassersteinReference(ref, n_projections=N_PROJECTIONS, seed=seed)
        self.floor, self.floor_std = metrics.sw_noise_floor(
            lambda k, gen: toy2d.sample(density, k, gen), n_sub, ref, repeats=repeats,
            n_projections=N_PROJECTIONS, seed=20_000 + seed, projection_seed=seed)
        self.floor_se = self.floor_std / math.sqrt(repeats)
        self.n_sub = n_sub
        self.reference = ref

    def __call__(self, x: torch.Tensor) -> SubsetScore:
        """Mean SW₂ over the ``len(x) // n_sub`` subsets of ``x`` ``[n, 2]`` and its s.e.

        Raises:
            ValueError: fewer than ``n_sub`` points.
        """
        r = x.shape[0] // self.n_sub
        if r < 1:
            raise ValueError(f"x must hold at least n_sub={self.n_sub} points, got {x.shape[0]}")
        vals = torch.tensor([self.sw(x[i * self.n_sub:(i + 1) * self.n_sub])
                             for i in range(r)], dtype=torch.float64)
        se = float(vals.std() / math.sqrt(r)) if r > 1 else float("nan")
        return SubsetScore(float(vals.mean()), se)
