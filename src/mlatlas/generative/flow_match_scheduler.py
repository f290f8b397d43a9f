"""The flow-matching Euler scheduler with the diffusers interface (rectified-flow sampling).

Rectified flows and flow-matching models (SD3, Flux) are sampled in diffusers by
``FlowMatchEulerDiscreteScheduler``: time runs in ``σ`` from 1 (noise) to 0 (data) on
``x_σ = σ·noise + (1 − σ)·x_data``, the model predicts the velocity ``noise − data`` and each
step is one Euler step ``x ← x + (σ_next − σ)·v``. The sigma schedule can be shifted,
``σ ← s·σ / (1 + (s − 1)·σ)``, to spend more steps at high noise, or shifted by a resolution-
dependent ``μ`` (Flux's dynamic shifting), stretched to a terminal value, or redistributed
(Karras ρ = 7 or exponential spacing). This class reproduces the reference's numbers
(schedule, every option above, custom sigmas/timesteps, step-index bookkeeping,
``scale_noise``, optional stochastic re-noising) and its interface (``config``,
``from_config``, ``step(...).prev_sample``), so a diffusers sampling loop runs unchanged.

Papers: Liu, Gong, Liu 2023, arXiv:2209.03003 (rectified flow); Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv:2403.03206
(the shifted schedule); Karras et al. 2022, arXiv:2206.00364 (eq. 5, the ρ-spaced sigmas).

==================  =======================================================================
symbol              meaning
==================  =======================================================================
``σ``               noise level, ``1 − t`` in rectified-flow time
``timesteps``       ``σ · num_train_timesteps`` (what the model is conditioned on)
``shift``           schedule shift ``s`` (1 = none)
``μ`` (``mu``)      dynamic shift: ``σ ← e^μ / (e^μ + (1/σ − 1))`` ("exponential") or
                    ``μ / (μ + (1/σ − 1))`` ("linear")
``model_output``    velocity ``dx_σ/dσ = noise − data``
==================  =======================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mlatlas.generative.noise_schedule import SchedulerOutput, randn_like_diffusers
from mlatlas.generative.scheduler_config import SchedulerConfigMixin

__all__ = ["FlowMatchEulerDiscreteScheduler"]


class FlowMatchEulerDiscreteScheduler(SchedulerConfigMixin):
    """Flow-matching Euler scheduler, numerically equal to ``diffusers``' one.

    Time runs in ``σ`` from 1 (noise) to 0 (data): ``x_σ = σ noise + (1 − σ) x_data``; the
    model output is the velocity ``d x_σ / dσ = noise − data``.

    Args:
        num_train_timesteps: ``N``; timesteps are ``σ · N``.
        shift: Time shift ``σ ← shift σ / (1 + (shift − 1) σ)`` (SD3); 1 = none.
        use_dynamic_shifting: Shift by ``mu`` given to :meth:`set_timesteps` instead.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: Read by pipelines to
            compute ``mu`` from the image size (stored in ``config`` only).
        invert_sigmas: Run σ from 0 to 1 (``σ ← 1 − σ``, final σ = 1).
        shift_terminal: Stretch the shifted schedule so it ends at this σ.
        use_karras_sigmas: Karras ρ = 7 spacing between the schedule's ends.
        use_exponential_sigmas: Log-uniform spacing between the schedule's ends.
        use_beta_sigmas: Refused (needs scipy's beta quantiles; not computed here).
        time_shift_type: ``"exponential"`` or ``"linear"`` dynamic shift.
        stochastic_sampling: Re-noise to ``σ_next`` from the predicted data instead of Euler.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float | None = 0.5,
                 max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False,
                 shift_terminal: float | None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be a positive int, got "
                             f"{num_train_timesteps!r}")
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift!r}")
        if use_beta_sigmas:
            raise ValueError("use_beta_sigmas=True is not supported (beta-quantile sigmas are "
                             "not computed here); use use_karras_sigmas or "
                             "use_exponential_sigmas")
        if use_karras_sigmas and use_exponential_sigmas:
            raise ValueError("use_karras_sigmas and use_exponential_sigmas exclude each other, "
                             "got both True")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got "
                             f"{time_shift_type!r}")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in [0, 1), got {shift_terminal!r}")
        self.num_train_timesteps = num_train_timesteps
        self.stochastic_sampling = stochastic_sampling
        self._shift = float(shift)
        n = num_train_timesteps
        ts = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy())
        sigmas = ts / n
        if not use_dynamic_shifting:
            # SD3 shift: σ' = s σ / (1 + (s - 1) σ)
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self.sigmas = sigmas
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def shift(self) -> float:
        """The time shift."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Change the time shift used by later :meth:`set_timesteps` calls."""
        self._shift = shift

    @property
    def step_index(self) -> int | None:
        """Index of the next step (None before the first :meth:`step`)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index, when set by :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at ``begin_index`` (img2img-style partial sampling)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep: object = None) -> Tensor:
        """Identity (the model takes ``x_σ`` unscaled); part of the diffusers interface."""
        return sample

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        """Dynamic shift of σ-values ``t`` by ``mu`` (``config.time_shift_type``)."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)  # e^μ/(e^μ + (1/σ−1))
        return mu / (mu + (1 / t - 1) ** sigma)

    def _spread(self, sig: np.ndarray, n: int) -> np.ndarray:
        """Karras (ρ = 7) or exponential spacing between the schedule's ends."""
        lo, hi = self.config.get("sigma_min"), self.config.get("sigma_max")
        lo = float(sig[-1]) if lo is None else lo
        hi = float(sig[0]) if hi is None else hi
        if self.config.use_karras_sigmas:
            ramp = np.linspace(0, 1, n)
            rho = 7.0  # Karras eq. (5): σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
            return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      sigmas: Sequence[float] | None = None, mu: float | None = None,
                      timesteps: Sequence[float] | None = None) -> None:
        """Sampling schedule: ``num_inference_steps`` sigmas from ``σ_max`` to ``σ_min``
        (or the given ``sigmas`` / ``timesteps``), shifted, plus a final 0.

        Args:
            num_inference_steps: Number of steps (may be omitted with ``sigmas``/``timesteps``).
            device: Where the schedule lives.
            sigmas: Custom σ-values (before shifting).
            mu: The dynamic shift (required with ``use_dynamic_shifting``).
            timesteps: Custom timesteps fed to the model as given; without ``sigmas`` the
                sigmas are ``timesteps / N``, shifted.

        Raises:
            ValueError: no or non-positive step count, lengths that disagree, or ``mu``
                missing with ``use_dynamic_shifting``.
        """
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True "
                             "(the pipeline computes it from the image size), got None")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"sigmas and timesteps must have the same length, got "
                             f"{len(sigmas)} and {len(timesteps)}")
        for name, given in (("sigmas", sigmas), ("timesteps", timesteps)):
            if given is None:
                continue
            if num_inference_steps is not None and len(given) != num_inference_steps:
                raise ValueError(f"{name} must have num_inference_steps={num_inference_steps} "
                                 f"entries, got {len(given)}")
            num_inference_steps = len(given)
        if (not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool)
                or num_inference_steps <= 0):
            raise ValueError(f"num_inference_steps must be a positive int, got "
                             f"{num_inference_steps!r}")
        if num_inference_steps > self.num_train_timesteps and sigmas is None and timesteps is None:
            raise ValueError(f"num_inference_steps={num_inference_steps} exceeds "
                             f"num_train_timesteps={self.num_train_timesteps}")
        self.num_inference_steps = num_inference_steps
        n = self.num_train_timesteps
        ts_given = None if timesteps is None else np.array(timesteps).astype(np.float32)
        if sigmas is not None:
            sig = np.array(sigmas).astype(np.float32)
        elif ts_given is not None:
            sig = ts_given / n
        else:
            sig = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps) / n
        if cfg.use_dynamic_shifting:
            sig = self.time_shift(mu, 1.0, sig)
        else:
            sig = self.shift * sig / (1 + (self.shift - 1) * sig)  # σ' = s σ / (1 + (s−1) σ)
        if cfg.shift_terminal:
            one_minus = 1 - sig  # stretch so that the last σ equals shift_terminal
            sig = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            sig = self._spread(sig, num_inference_steps)
        sig_t = torch.from_numpy(sig).to(dtype=torch.float32, device=device)
        if ts_given is not None:
            self.timesteps = torch.from_numpy(ts_given).to(dtype=torch.float32, device=device)
        else:
            self.timesteps = sig_t * n
        if cfg.invert_sigmas:
            sig_t = 1.0 - sig_t
            self.timesteps = sig_t * n
            self.sigmas = torch.cat([sig_t, torch.ones(1, device=sig_t.device)])
        else:
            self.sigmas = torch.cat([sig_t, torch.zeros(1, device=sig_t.device)])
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | Tensor,
                           schedule_timesteps: Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule (the second match when it repeats)."""
        sched = self.timesteps if schedule_timesteps is None else schedule_timesteps
        idx = (sched == timestep).nonzero()
        if len(idx) == 0:
            raise ValueError(f"timestep {float(timestep)!r} is not in the schedule; pass one "
                             "of scheduler.timesteps")
        return int(idx[1 if len(idx) > 1 else 0].item())

    def _init_step_index(self, timestep: float | Tensor) -> None:
        if self._begin_index is None:
            if isinstance(timestep, Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """Forward process ``x_σ = σ noise + (1 − σ) sample`` at ``timestep [B]``."""
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got "
                             f"{tuple(noise.shape)}")
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        timestep = timestep.to(sample.device).reshape(-1)
        if self._begin_index is None:
            sched = self.timesteps.to(sample.device)
            indices = [self.index_for_timestep(t, sched) for t in timestep]
        elif self._step_index is not None:
            indices = [self._step_index] * timestep.shape[0]
        else:
            indices = [self._begin_index] * timestep.shape[0]
        sigma = sigmas[indices].flatten().reshape(-1, *([1] * (sample.ndim - 1)))
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
             s_noise: float = 1.0, generator: torch.Generator | None = None,
             per_token_timesteps: Tensor | None = None, return_dict: bool = True
             ) -> SchedulerOutput | tuple[Tensor]:
        """One Euler step ``x ← x + (σ_next − σ) · model_output``.

        Args:
            model_output: ``[B, ...]`` velocity ``noise − data`` at ``(sample, σ)``.
            timestep: One of :attr:`timesteps` (a float; integer indices are rejected).
            sample: ``[B, ...]``.
            s_churn, s_tmin, s_tmax, s_noise: Accepted and unused, as in diffusers.
            generator: Noise for ``stochastic_sampling``.
            per_token_timesteps: Refused (per-token schedules are not computed here).
            return_dict: Return a :class:`SchedulerOutput` (else the tuple ``(prev_sample,)``).

        Returns:
            ``prev_sample`` in ``model_output``'s dtype.
        """
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported (per-token sigma schedules "
                             "are not computed here); pass None")
        if isinstance(timestep, int) or (isinstance(timestep, Tensor)
                                         and not timestep.is_floating_point()):
            raise ValueError("timestep must be one of scheduler.timesteps (a float), not an "
                             f"integer index; got {timestep!r}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the shape of sample {tuple(sample.shape)}"
                             f", got {tuple(model_output.shape)}")
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.sigmas) - 1:
            raise ValueError(f"step() called {self._step_index + 1} times for "
                             f"{len(self.sigmas) - 1} timesteps")
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        if self.stochastic_sampling:
            x0 = sample - sigma * model_output
            noise = randn_like_diffusers(sample.shape, generator, sample)
            prev = (1.0 - sigma_next) * x0 + sigma_next * noise
        else:
            # Euler in σ: x_{σ'} = x_σ + (σ' - σ) v_σ
            prev = sample + (sigma_next - sigma) * model_output
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def __len__(self) -> int:
        return self.num_train_timesteps
