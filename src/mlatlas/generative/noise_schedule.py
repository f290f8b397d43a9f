"""The forward process of discrete-time diffusion: β schedules, q(x_t | x_0), ε-loss, timesteps.

Shared by every sampler of :mod:`mlatlas.generative` (DDPM, DDIM, guidance). A fixed Markov
chain q(x_t | x_{t-1}) = N(√(1−β_t) x_{t-1}, β_t I) turns data into noise in T steps; its
marginal has the closed form q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I), so training draws x_t in one
step and regresses the added noise. Ho, Jain, Abbeel 2020, arXiv:2006.11239 (eqs. 4, 14); the
cosine schedule is Nichol & Dhariwal 2021, arXiv:2102.09672 (eq. 17).

=================  ===============================================================
β_t, α_t = 1−β_t   per-step noise variance and its complement, t = 0 … T−1
ᾱ_t = Π_{s≤t} α_s  ``alphas_cumprod``: signal kept after t+1 steps
x_t                √ᾱ_t x_0 + √(1−ᾱ_t) ε,  ε ~ N(0, I)            (eq. 4)
=================  ===============================================================

Names and defaults follow diffusers (``beta_schedule``, ``timestep_spacing``,
``steps_offset``), so schedules match ``diffusers`` schedulers value for value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "SPACINGS",
    "NoiseSchedule",
    "SchedulerOutput",
    "epsilon_loss",
    "inference_timesteps",
    "make_betas",
    "randn_like_diffusers",
]

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def _cosine_alpha_bar(u: float) -> float:
    # Nichol & Dhariwal eq. (17): ᾱ(u) = cos²((u + s)/(1 + s) · π/2), s = 0.008
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(num_train_timesteps: int = 1000, schedule: str = "linear",
               beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
               ) -> Tensor:
    """The noise schedule β_0 … β_{T−1} as float32 ``[T]``.

    Args:
        num_train_timesteps: T.
        schedule: ``"linear"`` (DDPM: β from ``beta_start`` to ``beta_end``),
            ``"scaled_linear"`` (linear in √β), or ``"squaredcos_cap_v2"``/``"cosine"``
            (β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), ``max_beta``) with the cosine ᾱ).
        beta_start: First β of the linear schedules.
        beta_end: Last β of the linear schedules.
        max_beta: Cap of the cosine schedule's β.

    Raises:
        ValueError: for an unknown ``schedule`` or ``num_train_timesteps < 1``.
    """
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    T = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if schedule in ("squaredcos_cap_v2", "cosine"):
        betas = [min(1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T), max_beta)
                 for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int,
                        spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """Descending int64 timesteps of a shortened sampling chain.

    ``"leading"``: ``k·⌊T/n⌋ + steps_offset`` for k = n−1 … 0; ``"trailing"``:
    ``round(T − k·T/n) − 1`` for k = 0 … n−1 (always starts at T−1); ``"linspace"``:
    ``round(linspace(0, T−1, n))`` reversed (Lin et al. 2024, arXiv:2305.08891, Table 2).

    Raises:
        ValueError: for ``num_inference_steps`` outside ``[1, num_train_timesteps]`` or an
            unknown ``spacing``.
    """
    T, n = num_train_timesteps, num_inference_steps
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
    if n > T:
        raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={T}: the "
                         f"model was trained on {T} timesteps only")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps outside [0, {T})")
    return torch.from_numpy(ts)


@dataclass
class SchedulerOutput:
    """What a scheduler ``step`` returns (the fields of diffusers' ``*SchedulerOutput``).

    Attributes:
        prev_sample: ``x_{t−1}`` (or the next sample of a shortened chain), like ``sample``.
        pred_original_sample: ``x̂_0`` predicted at this step, like ``sample``.
    """

    prev_sample: Tensor
    pred_original_sample: Tensor


def randn_like_diffusers(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Gaussian noise drawn exactly as diffusers' ``randn_tensor`` draws it for one generator."""
    device = like.device
    if generator is not None and generator.device.type != device.type:
        return torch.randn(shape, generator=generator, device=generator.device,
                           dtype=like.dtype).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype)


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a discrete-time diffusion (no sampler).

    Args:
        num_train_timesteps: T.
        beta_schedule: See :func:`make_betas`.
        beta_start: First β of the linear schedules.
        beta_end: Last β of the linear schedules.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_train_timesteps = num_train_timesteps
        self.betas = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t
        self.one = torch.tensor(1.0)

    def check_timesteps(self, timesteps: Tensor | int) -> Tensor:
        """``timesteps`` as an integer tensor, or a clear error if any lies outside ``[0, T)``.

        Raises:
            TypeError: floating-point timesteps.
            ValueError: a timestep below 0 or at/above ``T``.
        """
        if not isinstance(timesteps, Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point():
            raise TypeError(f"timesteps must be integers in [0, {self.num_train_timesteps}), "
                            f"got dtype {timesteps.dtype}")
        if timesteps.numel() and (int(timesteps.min()) < 0
                                  or int(timesteps.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got values "
                             f"in [{int(timesteps.min())}, {int(timesteps.max())}]")
        return timesteps

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Sample q(x_t | x_0): ``√ᾱ_t x_0 + √(1−ᾱ_t) ε`` (eq. 4).

        Args:
            original_samples: ``x_0``, ``[B, ...]``.
            noise: ``ε``, same shape.
            timesteps: ``[B]`` int64 timesteps (or one shared scalar).

        Returns:
            ``x_t``, same shape as ``original_samples``.
        """
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise must have the shape of original_samples "
                             f"{tuple(original_samples.shape)}, got {tuple(noise.shape)}")
        timesteps = self.check_timesteps(timesteps).to(original_samples.device)
        ac = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        sqrt_ac = _broadcast((ac[timesteps] ** 0.5).flatten(), original_samples)
        sqrt_1m = _broadcast(((1 - ac[timesteps]) ** 0.5).flatten(), original_samples)
        return sqrt_ac * original_samples + sqrt_1m * noise  # eq. (4)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n]`` timesteps uniform on ``{0, …, T−1}``."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def normalized(self, timesteps: Tensor) -> Tensor:
        """Integer timesteps → the float ``t / T`` in [0, 1) that the networks take."""
        return timesteps.float() / self.num_train_timesteps

    def __len__(self) -> int:
        return self.num_train_timesteps

    def _check_step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor) -> int:
        if not isinstance(sample, Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point tensor, got "
                            f"{getattr(sample, 'dtype', type(sample).__name__)}")
        if not isinstance(model_output, Tensor) or model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the shape of sample {tuple(sample.shape)}, "
                             f"got {tuple(getattr(model_output, 'shape', ()))}")
        if isinstance(timestep, Tensor) and (timestep.numel() != 1
                                             or timestep.is_floating_point()):
            raise ValueError(f"timestep must be one integer, got {timestep!r}")
        if isinstance(timestep, float):
            raise TypeError(f"timestep must be an integer, got {timestep!r}")
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must lie in [0, {self.num_train_timesteps}), got {t}")
        return t


def epsilon_loss(model: nn.Module, x0: Tensor, schedule: NoiseSchedule,
                 generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
    """DDPM's simplified objective ``E_{t,ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²`` (eq. 14).

    Args:
        model: ``model(x_t, t/T, y)`` → ``ε̂`` shaped like ``x0``.
        x0: ``[B, ...]`` clean data.
        schedule: The forward process.
        generator: Source of ``t`` and ``ε``.
        y: Optional ``[B]`` labels passed to the model.

    Returns:
        Scalar mean squared error.
    """
    t = schedule.sample_timesteps(x0.shape[0], generator).to(x0.device)
    eps = randn_like_diffusers(x0.shape, generator, x0)
    x_t = schedule.add_noise(x0, eps, t)
    pred = model(x_t, schedule.normalized(t), y) if y is not None else model(
        x_t, schedule.normalized(t))
    return nn.functional.mse_loss(pred, eps)  # eq. (14): L_simple
