"""DDIM — denoising diffusion implicit models.

DDIM keeps DDPM's training (same ε-network, same marginals q(x_t | x_0)) but samples through a
family of non-Markovian processes indexed by η: η = 1 recovers DDPM's ancestral sampler,
η = 0 gives a deterministic map from noise to data (a discretisation of the probability-flow
ODE). Because the update only needs the marginals, it can jump over timesteps: 50 steps do
the work of 1000. Running the deterministic map backwards encodes data into noise
(DDIM inversion). Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models",
arXiv:2010.02502.

=====================  ===================================================================
t, t' = prev           current and next timestep of the (shortened) chain, t' < t
ᾱ_t                    ``alphas_cumprod[t]``; ᾱ_{−1} = 1 (``set_alpha_to_one``)
x̂_0                   (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                                 (eq. 12)
σ_t(η)                 η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})                  (eq. 16)
x_{t'}                 √ᾱ_{t'} x̂_0 + √(1−ᾱ_{t'}−σ_t²) ε̂ + σ_t z                  (eq. 12)
=====================  ===================================================================

:class:`DDIMScheduler` and :class:`DDIMInverseScheduler` follow the diffusers interface
(``config``, ``from_config``, ``order``, ``step(...).prev_sample``) and are tested step by step
against ``diffusers.DDIMScheduler`` / ``DDIMInverseScheduler`` and inside ``DDIMPipeline``.
Like diffusers, the next timestep is ``t − ⌊T/n⌋`` (exact for ``"leading"`` and for
``"trailing"`` when n divides T); ``follow_schedule=True`` instead takes the next entry of
``timesteps``, which is what the paper's sub-sequence τ means for any spacing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from mlatlas.generative.ddpm import denoise, predict_x0_eps
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

__all__ = ["DDIMInverseScheduler", "DDIMScheduler", "ddim_invert", "ddim_sample"]


class _DDIMBase(NoiseSchedule, SchedulerConfigMixin):
    def __init__(self, num_train_timesteps: int, beta_start: float, beta_end: float,
                 beta_schedule: str, trained_betas: np.ndarray | list[float] | None,
                 clip_sample: bool, set_alpha_to_one: bool, steps_offset: int,
                 prediction_type: str, thresholding: bool, dynamic_thresholding_ratio: float,
                 clip_sample_range: float, sample_max_value: float, timestep_spacing: str,
                 rescale_betas_zero_snr: bool, spacings: tuple[str, ...]):
        super().__init__(num_train_timesteps, beta_schedule, beta_start, beta_end,
                         trained_betas, rescale_betas_zero_snr)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got "
                             f"{prediction_type!r}")
        if timestep_spacing not in spacings:
            raise ValueError(f"timestep_spacing must be one of {spacings}, got "
                             f"{timestep_spacing!r}")
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value
        self.set_alpha_to_one = set_alpha_to_one
        self.steps_offset = steps_offset
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        # ᾱ "before" the first step: 1 (a clean sample) or ᾱ_0
        self.final_alpha_cumprod = (torch.tensor(1.0) if set_alpha_to_one
                                    else self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None

    def scale_model_input(self, sample: Tensor, timestep: int | None = None) -> Tensor:
        """Identity; part of the diffusers interface."""
        return sample

    def _require_timesteps(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is not set: call set_timesteps(n) first")
        return self.num_train_timesteps // self.num_inference_steps

    def _check_in_schedule(self, t: int) -> None:
        if not bool((self.timesteps == t).any()):
            raise ValueError(f"timestep {t} is not in the schedule set by set_timesteps "
                             f"({self.timesteps.tolist()[:6]}…)")

    def _clip(self, x0: Tensor) -> Tensor:
        if self.thresholding:
            return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0


class DDIMScheduler(_DDIMBase):
    """The DDIM sampler (η-family) with the diffusers scheduler interface.

    Args:
        num_train_timesteps: T.
        beta_start: First β of the linear schedules.
        beta_end: Last β of the linear schedules.
        beta_schedule: One of :data:`~mlatlas.generative.noise_schedule.BETA_SCHEDULES`.
        trained_betas: Explicit β (overrides the schedule).
        clip_sample: Clamp x̂_0 to ``[−clip_sample_range, clip_sample_range]``.
        set_alpha_to_one: ᾱ after the last step is 1 (else ᾱ_0).
        steps_offset: Added to ``"leading"`` timesteps.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        thresholding: Dynamic thresholding of x̂_0 (instead of ``clip_sample``).
        dynamic_thresholding_ratio: Quantile of |x̂_0| used as the threshold.
        clip_sample_range: Clamp bound.
        sample_max_value: Largest threshold.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.
        rescale_betas_zero_snr: Rescale β to zero terminal SNR (use with v-prediction).
        follow_schedule: Take the next timestep from ``timesteps`` instead of
            ``t − ⌊T/n⌋`` (diffusers' rule; they agree for "leading" and divisible "trailing").
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: np.ndarray | list[float] | None = None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, follow_schedule: bool = False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         clip_sample, set_alpha_to_one, steps_offset, prediction_type,
                         thresholding, dynamic_thresholding_ratio, clip_sample_range,
                         sample_max_value, timestep_spacing, rescale_betas_zero_snr, SPACINGS)
        self.follow_schedule = follow_schedule
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the descending timesteps of the sampling chain (``self.timesteps``).

        Args:
            num_inference_steps: Evenly spaced chain of this length (``timestep_spacing``).
            device: Where ``self.timesteps`` lives.
            timesteps: A custom strictly descending chain in ``[0, T)`` instead (the paper's
                sub-sequence τ; each step lands on the next entry, then on ᾱ = 1).
                ``diffusers.DDIMScheduler`` has no such argument.

        Raises:
            ValueError: both or neither argument, ``num_inference_steps`` outside
                ``[1, num_train_timesteps]``, custom timesteps not strictly descending.
        """
        ts = self.validated_timesteps(num_inference_steps, timesteps)
        if ts is not None:
            self.timesteps = ts.to(device)
            self.num_inference_steps = len(ts)
            self.custom_timesteps = True
            return
        self.timesteps = inference_timesteps(self.num_train_timesteps, num_inference_steps,
                                             self.timestep_spacing, self.steps_offset).to(device)
        self.num_inference_steps = num_inference_steps
        self.custom_timesteps = False

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """The timestep the step from ``timestep`` lands on (negative: the clean end)."""
        ratio = self._require_timesteps()
        t = int(timestep)
        if not (self.follow_schedule or self.custom_timesteps):
            return t - ratio
        idx = int((self.timesteps == t).nonzero(as_tuple=True)[0][0])
        return -1 if idx == len(self.timesteps) - 1 else int(self.timesteps[idx + 1])

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
             eta: float = 0.0, use_clipped_model_output: bool | None = False,
             generator: torch.Generator | None = None, variance_noise: Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One DDIM step x_t → x_{t'} (eq. 12).

        Args:
            model_output: Network output at (``sample``, ``timestep``), shaped like ``sample``.
            timestep: Current timestep t, one of ``self.timesteps``.
            sample: ``x_t``, ``[B, ...]``.
            eta: η ≥ 0: 0 deterministic, 1 the DDPM posterior variance.
            use_clipped_model_output: Re-derive ε̂ from the clipped x̂_0 (GLIDE); None (what
                ``DDIMPipeline`` passes by default) means False.
            generator: Source of the noise z when η > 0.
            variance_noise: The noise z itself instead of drawing it (excludes ``generator``).
            return_dict: Return a :class:`SchedulerOutput` (else a tuple).

        Returns:
            ``prev_sample`` = x_{t'} and ``pred_original_sample`` = x̂_0.

        Raises:
            ValueError: for η < 0, a timestep outside the schedule, ``set_timesteps`` not
                called, mismatched shapes, or both ``generator`` and ``variance_noise``.
        """
        if not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0 (0 = DDIM, 1 = DDPM-like), got {eta!r}")
        self._require_timesteps()
        t = self._check_step(model_output, timestep, sample)
        self._check_in_schedule(t)
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        x0, eps = predict_x0_eps(model_output, sample, alpha_prod_t, self.prediction_type)
        x0 = self._clip(x0)
        # eq. (16): σ_t(η)² = η² (1−ᾱ_{t'})/(1−ᾱ_t) (1 − ᾱ_t/ᾱ_{t'})
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance ** (0.5)
        if float(1 - alpha_prod_t_prev - std_dev_t**2) < 0:
            raise ValueError(f"eta={eta} is too large at timestep {t}: σ_t² exceeds 1 − ᾱ_prev")
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        # eq. (12): x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
        prev = alpha_prod_t_prev ** (0.5) * x0 + direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_like_diffusers(model_output.shape, generator, model_output)
            elif variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise must have the shape of sample "
                                 f"{tuple(sample.shape)}, got {tuple(variance_noise.shape)}")
            prev = prev + std_dev_t * variance_noise
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class DDIMInverseScheduler(_DDIMBase):
    """Deterministic DDIM run backwards: x_{t−⌊T/n⌋} → x_t, data → noise (DDIM inversion).

    Same arguments as :class:`DDIMScheduler` (spacings ``"leading"`` and ``"trailing"``; no
    thresholding, as in diffusers);
    ``timesteps`` ascend. ``step(ε̂, t, x)`` moves a sample at level ``t − ⌊T/n⌋`` (ᾱ = 1
    below 0 with ``set_alpha_to_one``) to level ``t``; as in diffusers' pipelines, callers
    evaluate the network at the target timestep ``t``.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: np.ndarray | list[float] | None = None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", clip_sample_range: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         clip_sample, set_alpha_to_one, steps_offset, prediction_type, False,
                         0.995, clip_sample_range, 1.0, timestep_spacing,
                         rescale_betas_zero_snr, ("leading", "trailing"))
        self.initial_alpha_cumprod = self.final_alpha_cumprod
        self.timesteps = torch.arange(0, num_train_timesteps, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None
                      ) -> None:
        """Ascending timesteps: the reverse of :class:`DDIMScheduler`'s for the same spacing."""
        self.timesteps = inference_timesteps(self.num_train_timesteps, num_inference_steps,
                                             self.timestep_spacing, self.steps_offset
                                             ).flip(0).contiguous().to(device)
        self.num_inference_steps = num_inference_steps

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One inversion step (eq. 12 with η = 0, solved for the noisier sample).

        Returns:
            ``prev_sample`` = the sample at level ``timestep`` and ``pred_original_sample``.
        """
        ratio = self._require_timesteps()
        target = self._check_step(model_output, timestep, sample)
        self._check_in_schedule(target)
        current = min(target - ratio, self.num_train_timesteps - 1)
        alpha_prod_t = (self.alphas_cumprod[current] if current >= 0
                        else self.initial_alpha_cumprod)
        alpha_prod_next = self.alphas_cumprod[target]
        x0, eps = predict_x0_eps(model_output, sample, alpha_prod_t, self.prediction_type)
        x0 = self._clip(x0)
        # x_t = √ᾱ_t x̂_0 + √(1−ᾱ_t) ε̂: the same ODE step, towards more noise
        nxt = alpha_prod_next ** (0.5) * x0 + (1 - alpha_prod_next) ** (0.5) * eps
        if not return_dict:
            return nxt, x0
        return SchedulerOutput(prev_sample=nxt, pred_original_sample=x0)


@torch.no_grad()
def ddim_sample(model_fn: Callable[[Tensor, Tensor], Tensor], scheduler: DDIMScheduler,
                noise: Tensor, eta: float = 0.0, generator: torch.Generator | None = None
                ) -> Tensor:
    """DDIM sampling from ``noise`` over ``scheduler.timesteps`` (one network call per step).

    Args:
        model_fn: ``(x_t [B, ...], timestep) → ε̂``.
        scheduler: A :class:`DDIMScheduler` after ``set_timesteps``.
        noise: x_T, ``[B, ...]``.
        eta: η of every step.
        generator: Noise source when η > 0.

    Returns:
        x_0, shaped like ``noise``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return denoise(model_fn, scheduler, noise, generator=generator if eta > 0 else None, eta=eta)


@torch.no_grad()
def ddim_invert(model_fn: Callable[[Tensor, Tensor], Tensor], scheduler: DDIMInverseScheduler,
                sample: Tensor) -> Tensor:
    """Encode data into DDIM latents: run the η = 0 map backwards over ``scheduler.timesteps``.

    ``ddim_sample`` with a :class:`DDIMScheduler` of the same configuration and step count
    maps the result back to ``sample`` up to the discretisation error (exact as n → T with an
    exact ε-model).

    Args:
        model_fn: ``(x [B, ...], timestep) → ε̂``, evaluated at the target timestep.
        scheduler: A :class:`DDIMInverseScheduler` after ``set_timesteps``.
        sample: x_0, ``[B, ...]``.

    Returns:
        x_T, shaped like ``sample``.
    """
    x = sample
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t), t, x).prev_sample
    return x
