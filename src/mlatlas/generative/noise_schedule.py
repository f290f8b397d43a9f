"""The forward process of discrete-time diffusion: β schedules, q(x_t | x_0), ε-loss, timesteps.

Shared by every sampler of :mod:`mlatlas.generative` (DDPM, DDIM, guidance). A fixed Markov
chain q(x_t | x_{t-1}) = N(√(1−β_t) x_{t-1}, β_t I) turns data into noise in T steps; its
marginal has the closed form q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I), so training draws x_t in one
step and regresses the added noise. Ho, Jain, Abbeel 2020, arXiv:2006.11239 (eqs. 4, 14); the
cosine schedule is Nichol & Dhariwal 2021, arXiv:2102.09672 (eq. 17); zero terminal SNR is
Lin et al. 2024, arXiv:2305.08891 (Alg. 1); dynamic thresholding is Saharia et al. 2022
(Imagen), arXiv:2205.11487 (Sec. 2.3).

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
    "dynamic_threshold",
    "epsilon_loss",
    "inference_timesteps",
    "make_betas",
    "randn_like_diffusers",
    "rescale_zero_terminal_snr",
]

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine",
                                   "sigmoid", "laplace")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def _cosine_alpha_bar(u: float) -> float:
    # Nichol & Dhariwal eq. (17): ᾱ(u) = cos²((u + s)/(1 + s) · π/2), s = 0.008
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(u: float) -> float:
    # log-SNR λ(u) = −½ sign(½ − u) log(1 − 2|½ − u| + 1e-6), ᾱ = √(SNR / (1 + SNR))
    lam = -0.5 * math.copysign(1, 0.5 - u) * math.log(1 - 2 * math.fabs(0.5 - u) + 1e-6)
    snr = math.exp(lam)
    return math.sqrt(snr / (1 + snr))


def make_betas(num_train_timesteps: int = 1000, schedule: str = "linear",
               beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
               ) -> Tensor:
    """The noise schedule β_0 … β_{T−1} as float32 ``[T]``.

    Args:
        num_train_timesteps: T.
        schedule: ``"linear"`` (DDPM: β from ``beta_start`` to ``beta_end``),
            ``"scaled_linear"`` (linear in √β), or ``"squaredcos_cap_v2"``/``"cosine"``
            (β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), ``max_beta``) with the cosine ᾱ), ``"sigmoid"``
            (β = β_start + (β_end − β_start)·sigmoid(linspace(−6, 6, T))) or ``"laplace"``
            (the ``max_beta``-capped ratio of a Laplace log-SNR ᾱ).
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
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    if schedule == "laplace":
        betas = [min(1 - _laplace_alpha_bar((i + 1) / T) / _laplace_alpha_bar(i / T), max_beta)
                 for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """β rescaled so the last step has SNR 0 (ᾱ_{T−1} = 0), ᾱ_0 unchanged.

    Lin et al. 2024, Alg. 1: shift √ᾱ so its last value is 0 and scale it back to √ᾱ_0, then
    undo the cumulative product.
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # Alg. 1: √ᾱ_T → 0, √ᾱ_0 kept
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])  # undo Π
    return 1 - alphas


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding of a predicted ``x̂_0`` ``[B, C, ...]``.

    Per sample, s = the ``ratio`` quantile of |x̂_0| clamped to ``[1, max_value]``; x̂_0 is
    clamped to ``[−s, s]`` and divided by s (s = 1 is plain clipping to [−1, 1]).
    """
    if x0.ndim < 2:
        raise ValueError(f"thresholding needs a sample [B, C, ...], got shape {tuple(x0.shape)}")
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs fp32/fp64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)  # x̂_0 ← clip(x̂_0, ±s)/s


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
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps outside [0, {T}) with "
                         f"timestep_spacing={spacing!r}, num_inference_steps={n}: got "
                         f"[{int(ts.min())}, {int(ts.max())}]")
    return torch.from_numpy(ts)


@dataclass
class SchedulerOutput:
    """What a scheduler ``step`` returns (the fields of diffusers' ``*SchedulerOutput``).

    Also indexes and unpacks like diffusers' outputs (``out[0]``, ``prev, x0 = out``), over
    the fields that are not None.

    Attributes:
        prev_sample: ``x_{t−1}`` (or the next sample of a shortened chain), like ``sample``.
        pred_original_sample: ``x̂_0`` predicted at this step, like ``sample`` (None for
            schedulers that do not predict it, e.g. flow-matching Euler).
    """

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None

    def to_tuple(self) -> tuple[Tensor, ...]:
        """The fields that are set, in order (what ``return_dict=False`` returns)."""
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, key: int | str) -> Tensor:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):  # noqa: ANN204 - unpacking like a tuple
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


def randn_like_diffusers(shape: torch.Size, generator: torch.Generator | list | None,
                         like: Tensor) -> Tensor:
    """Gaussian noise drawn exactly as diffusers' ``randn_tensor`` draws it.

    ``generator`` may be one generator or a list of one per batch row (each row drawn from
    its own generator, as diffusers' pipelines do).
    """
    device = like.device
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"generator must be one generator or a list of {shape[0]} "
                                 f"(one per batch row), got a list of {len(generator)}")
            return torch.cat([randn_like_diffusers((1, *shape[1:]), g, like)
                              for g in generator])
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
        trained_betas: Explicit β_0 … β_{T−1} (overrides the schedule; length T).
        rescale_betas_zero_snr: Rescale β to zero terminal SNR (:func:`rescale_zero_terminal_snr`).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02,
                 trained_betas: Tensor | np.ndarray | list[float] | None = None,
                 rescale_betas_zero_snr: bool = False):
        self.num_train_timesteps = num_train_timesteps
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64)).float()
            if betas.shape != (num_train_timesteps,):
                raise ValueError(f"trained_betas must hold num_train_timesteps="
                                 f"{num_train_timesteps} values, got shape {tuple(betas.shape)}")
            self.betas = betas
        else:
            self.betas = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
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

    def validated_timesteps(self, num_inference_steps: int | None,
                            timesteps: list[int] | Tensor | None) -> Tensor | None:
        """``set_timesteps``' argument check: exactly one of the two; custom ones validated.

        Returns:
            The custom timesteps as an int64 tensor ``[S]``, or ``None`` when
            ``num_inference_steps`` was given.

        Raises:
            ValueError: both or neither argument; custom timesteps empty, not integers, not
                strictly descending or outside ``[0, T)``.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"pass exactly one of num_inference_steps and timesteps, got "
                             f"num_inference_steps={num_inference_steps!r}, timesteps={timesteps!r}")
        if timesteps is None:
            return None
        ts = torch.as_tensor(np.asarray(timesteps)).reshape(-1)
        if ts.numel() == 0 or ts.is_floating_point():
            raise ValueError(f"timesteps must be a non-empty list of ints, got {timesteps!r}")
        if bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
        return self.check_timesteps(ts).to(torch.int64)

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

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target ``v = √ᾱ_t ε − √(1−ᾱ_t) x_0`` (Salimans & Ho 2022, eq. 11).

        Args:
            sample: ``x_0``, ``[B, ...]``.
            noise: ``ε``, same shape.
            timesteps: ``[B]`` int64 timesteps (or one shared scalar).
        """
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got "
                             f"{tuple(noise.shape)}")
        timesteps = self.check_timesteps(timesteps).to(sample.device)
        ac = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[timesteps]
        return (_broadcast((ac ** 0.5).flatten(), sample) * noise
                - _broadcast(((1 - ac) ** 0.5).flatten(), sample) * sample)

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
