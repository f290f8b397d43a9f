"""DDPM — denoising diffusion probabilistic models.

A fixed Markov chain q(x_t | x_{t-1}) = N(√(1−β_t) x_{t-1}, β_t I) turns data into noise in T
steps; a network ε_θ(x_t, t) learns to predict the noise that was added, and ancestral
sampling runs the learned reverse chain p_θ(x_{t-1} | x_t) from pure noise back to data.
Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239; the
cosine schedule is Nichol & Dhariwal 2021, arXiv:2102.09672.

=================  ===============================================================
β_t, α_t = 1−β_t   per-step noise variance and its complement, t = 0 … T−1
ᾱ_t = Π_{s≤t} α_s  ``alphas_cumprod``: signal kept after t+1 steps
x_t                √ᾱ_t x_0 + √(1−ᾱ_t) ε,  ε ~ N(0, I)            (eq. 4)
x̂_0               (x_t − √(1−ᾱ_t) ε_θ) / √ᾱ_t  ``pred_original_sample``  (eq. 15)
μ̃_t               posterior mean of q(x_{t−1} | x_t, x_0)                   (eq. 7)
β̃_t               (1−ᾱ_{t−1})/(1−ᾱ_t) β_t  posterior variance ("fixed_small")
v                  learned-range output: log σ² = ((v+1)/2) log β_t + (1−(v+1)/2) log β̃_t
=================  ===============================================================

:class:`DDPMScheduler` follows the diffusers scheduler interface (``config``, ``from_config``,
``set_timesteps``, ``step(model_output, timestep, sample, generator=...)``, ``add_noise``)
step for step, so it replaces ``diffusers.DDPMScheduler`` in a diffusers pipeline and is
tested against it. The learned-range variance is Nichol & Dhariwal 2021 (eq. 15).
Timesteps are integers in ``[0, T)``; networks receive ``t / T`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mlatlas.generative.noise_schedule import (
    PREDICTION_TYPES,
    SPACINGS,
    NoiseSchedule,
    SchedulerOutput,
    dynamic_threshold,
    inference_timesteps,
    randn_like_diffusers,
)
from mlatlas.generative.scheduler_config import SchedulerConfigMixin

__all__ = [
    "VARIANCE_TYPES",
    "DDPMScheduler",
    "denoise",
    "mixture_epsilon",
    "network_fn",
    "predict_x0_eps",
]

VARIANCE_TYPES: tuple[str, ...] = ("fixed_small", "fixed_small_log", "fixed_large", "learned",
                                   "learned_range")


class DDPMScheduler(NoiseSchedule, SchedulerConfigMixin):
    """Ancestral sampler of DDPM with the diffusers scheduler interface.

    Args:
        num_train_timesteps: T.
        beta_start: First β of the linear schedules.
        beta_end: Last β of the linear schedules.
        beta_schedule: One of :data:`~mlatlas.generative.noise_schedule.BETA_SCHEDULES`.
        trained_betas: Explicit β (overrides the schedule).
        variance_type: ``"fixed_small"`` (σ² = β̃_t), ``"fixed_small_log"`` (the same,
            through the log), ``"fixed_large"`` (σ² = β_t), ``"learned"`` (the network's
            second half of channels is σ²) or ``"learned_range"`` (it is v, see the table).
        clip_sample: Clamp x̂_0 to ``[−clip_sample_range, clip_sample_range]``.
        prediction_type: What the network outputs: ``"epsilon"``, ``"sample"`` (x_0) or
            ``"v_prediction"`` (v = √ᾱ ε − √(1−ᾱ) x_0).
        thresholding: Dynamic thresholding of x̂_0 (instead of ``clip_sample``).
        dynamic_thresholding_ratio: Quantile of |x̂_0| used as the threshold.
        clip_sample_range: Clamp bound.
        sample_max_value: Largest threshold.
        timestep_spacing: See :func:`inference_timesteps`.
        steps_offset: Added to ``"leading"`` timesteps.
        rescale_betas_zero_snr: Rescale β to zero terminal SNR.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: np.ndarray | list[float] | None = None,
                 variance_type: str = "fixed_small", clip_sample: bool = True,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        super().__init__(num_train_timesteps, beta_schedule, beta_start, beta_end,
                         trained_betas, rescale_betas_zero_snr)
        if variance_type == "fixed_large_log":
            raise ValueError("variance_type='fixed_large_log' is not supported: diffusers takes "
                             "the square root of log β_t < 0 there (NaN noise)")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got "
                             f"{variance_type!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got "
                             f"{prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got "
                             f"{timestep_spacing!r}")
        self.variance_type = variance_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the timesteps of the sampling chain (``self.timesteps``).

        Args:
            num_inference_steps: Evenly spaced chain of this length (``timestep_spacing``).
            device: Where ``self.timesteps`` lives.
            timesteps: A custom strictly descending chain in ``[0, T)`` instead.

        Raises:
            ValueError: both or neither of ``num_inference_steps`` and ``timesteps``, custom
                timesteps not strictly descending or outside ``[0, T)``.
        """
        ts = self.validated_timesteps(num_inference_steps, timesteps)
        if ts is not None:
            self.timesteps = ts.to(device)
            self.custom_timesteps = True
            return
        self.timesteps = inference_timesteps(self.num_train_timesteps, num_inference_steps,
                                             self.timestep_spacing, self.steps_offset).to(device)
        self.num_inference_steps = num_inference_steps
        self.custom_timesteps = False

    def scale_model_input(self, sample: Tensor, timestep: int | None = None) -> Tensor:
        """Identity (DDPM feeds x_t to the network unscaled); part of the diffusers interface."""
        return sample

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """The timestep after ``timestep`` in the chain (−1 after the last)."""
        t = int(timestep)
        if self.num_inference_steps is None and not self.custom_timesteps:
            return t - 1
        hits = (self.timesteps == t).nonzero(as_tuple=True)[0]
        if hits.numel() == 0:
            raise ValueError(f"timestep {t} is not in the schedule set by set_timesteps "
                             f"({self.timesteps.tolist()[:6]}…)")
        idx = int(hits[0])
        return -1 if idx == len(self.timesteps) - 1 else int(self.timesteps[idx + 1])

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True
             ) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One ancestral step x_t → x_{t'} (t' = the previous timestep of the chain).

        Args:
            model_output: Network output at (``sample``, ``timestep``), shaped like ``sample``
                (twice the channels for the learned variance types: output, then variance).
            timestep: Current integer timestep t (one of ``self.timesteps``).
            sample: ``x_t``, ``[B, ...]``.
            generator: Source of the step's Gaussian noise (none is drawn at t = 0).
            return_dict: Return a :class:`SchedulerOutput` (else a tuple).

        Returns:
            ``prev_sample`` = x_{t'} and ``pred_original_sample`` = x̂_0.

        Raises:
            ValueError: for a timestep outside ``[0, T)`` or not in the schedule, or a
                ``model_output`` whose shape differs from ``sample``'s.
        """
        predicted_variance = None
        if self.variance_type in ("learned", "learned_range"):
            if (not isinstance(model_output, Tensor) or model_output.ndim < 2
                    or model_output.shape[1] != 2 * sample.shape[1]):
                raise ValueError(f"variance_type={self.variance_type!r} needs a model_output "
                                 f"with 2×{sample.shape[1]} channels (output, variance), got "
                                 f"{tuple(getattr(model_output, 'shape', ()))}")
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
        t = self._check_step(model_output, timestep, sample)
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev  # α between t' and t
        current_beta_t = 1 - current_alpha_t

        x0, _ = predict_x0_eps(model_output, sample, alpha_prod_t, self.prediction_type)
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        # eq. (7): μ̃_t = √ᾱ_{t'} β_t/(1−ᾱ_t) x̂_0 + √α_t (1−ᾱ_{t'})/(1−ᾱ_t) x_t
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        prev = x0_coeff * x0 + xt_coeff * sample
        if t > 0:
            noise = randn_like_diffusers(model_output.shape, generator, model_output)
            # β̃_t = (1−ᾱ_{t'})/(1−ᾱ_t) β_t (eq. 7), or β_t for "fixed_large"
            small = torch.clamp(beta_prod_t_prev / beta_prod_t * current_beta_t, min=1e-20)
            if self.variance_type == "fixed_small":
                std = small ** 0.5
            elif self.variance_type == "fixed_small_log":
                std = torch.exp(0.5 * torch.log(small))
            elif self.variance_type == "fixed_large":
                std = current_beta_t ** 0.5
            elif self.variance_type == "learned":
                std = predicted_variance ** 0.5
            else:  # learned_range, Nichol & Dhariwal eq. (15): interpolate log β̃_t … log β_t
                frac = (predicted_variance + 1) / 2
                std = torch.exp(0.5 * (frac * torch.log(current_beta_t)
                                       + (1 - frac) * torch.log(small)))
            prev = prev + std * noise  # x_{t'} = μ̃_t + σ_t z
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def predict_x0_eps(model_output: Tensor, sample: Tensor, alpha_prod_t: Tensor,
                   prediction_type: str = "epsilon") -> tuple[Tensor, Tensor]:
    """x̂_0 and ε̂ from a network output at ᾱ_t (before any clipping).

    Args:
        model_output: ε̂, x̂_0 or v̂ (``prediction_type``), shaped like ``sample``.
        sample: ``x_t``.
        alpha_prod_t: ᾱ_t (a scalar tensor).
        prediction_type: One of :data:`PREDICTION_TYPES`.
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)  # eq. (15)
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022)
        x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        eps = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got "
                         f"{prediction_type!r}")
    return x0, eps


def network_fn(model: nn.Module, num_train_timesteps: int, y: Tensor | None = None
               ) -> Callable[[Tensor, Tensor], Tensor]:
    """Adapt ``model(x, t/T, y)`` to the ``f(x, timestep)`` a sampling loop calls."""

    def fn(x: Tensor, timestep: Tensor) -> Tensor:
        t = torch.full((x.shape[0],), float(timestep) / num_train_timesteps, device=x.device)
        return model(x, t, y) if y is not None else model(x, t)

    return fn


@torch.no_grad()
def denoise(model_fn: Callable[[Tensor, Tensor], Tensor], scheduler: NoiseSchedule,
            sample: Tensor, generator: torch.Generator | None = None, **step_kwargs: object
            ) -> Tensor:
    """Run a scheduler's chain from ``sample`` (x_T) over ``scheduler.timesteps``.

    Works for any scheduler with the diffusers interface (:class:`DDPMScheduler`,
    :class:`mlatlas.generative.ddim.DDIMScheduler`): ``model_fn(x, t)`` is evaluated once
    per timestep (``len(scheduler.timesteps)`` network evaluations).

    Args:
        model_fn: ``(x_t [B, ...], timestep) → model output [B, ...]``.
        scheduler: Its ``timesteps`` set by ``set_timesteps``.
        sample: Starting noise ``[B, ...]`` (multiplied by ``init_noise_sigma`` = 1).
        generator: Passed to every ``step``.
        **step_kwargs: Extra ``step`` arguments (``eta=`` for DDIM).

    Returns:
        The final sample x_0.
    """
    x = sample
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


def mixture_epsilon(x_t: Tensor, alpha_bar: Tensor | float, means: Tensor, std: float,
                    weights: Tensor | None = None) -> Tensor:
    """The exact (Bayes-optimal) ε-predictor ``E[ε | x_t]`` for isotropic Gaussian-mixture data.

    With x_0 ~ Σ_k w_k N(μ_k, s²I) the noisy marginal is Σ_k w_k N(√ᾱ μ_k, (ᾱ s² + 1−ᾱ) I), and
    ``E[ε | x_t] = −√(1−ᾱ) ∇ log p(x_t)``. A "perfect network" for tests and for measuring
    sampler error separately from training error.

    Args:
        x_t: ``[B, d]`` noisy points.
        alpha_bar: ᾱ of each point, ``[B]`` or a scalar.
        means: ``[K, d]`` component means μ_k.
        std: Component standard deviation s.
        weights: ``[K]`` mixture weights (uniform when None).

    Returns:
        ``[B, d]`` ε̂.
    """
    ab = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    ab = ab.expand(x_t.shape[0]) if ab.ndim == 0 else ab
    var = ab * std**2 + (1 - ab)  # [B] marginal variance of each component
    mu = ab.sqrt()[:, None, None] * means.to(x_t)[None]  # [B, K, d]
    diff = x_t[:, None, :] - mu
    logw = (weights.to(x_t).log() if weights is not None
            else torch.zeros(means.shape[0], dtype=x_t.dtype, device=x_t.device))
    logits = logw[None] - (diff**2).sum(-1) / (2 * var[:, None])  # shared variance: no log|Σ|
    resp = logits.softmax(dim=1)  # p(k | x_t)
    score = -(resp[..., None] * diff).sum(1) / var[:, None]  # ∇ log p(x_t)
    return -(1 - ab).sqrt()[:, None] * score
