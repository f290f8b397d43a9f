"""The flow-matching Euler scheduler with the diffusers interface (rectified-flow sampling).

Rectified flows and flow-matching models (SD3, Flux) are sampled in diffusers by
``FlowMatchEulerDiscreteScheduler``: time runs in ``σ`` from 1 (noise) to 0 (data) on
``x_σ = σ·noise + (1 − σ)·x_data``, the model predicts the velocity ``noise − data`` and each
step is one Euler step ``x ← x + (σ_next − σ)·v``. The sigma schedule can be shifted,
``σ ← s·σ / (1 + (s − 1)·σ)``, to spend more steps at high noise. This class reproduces the
reference's numbers (schedule, ``shift``, custom sigmas, step-index bookkeeping,
``scale_noise``, optional stochastic re-noising) so a diffusers sampling loop runs unchanged.

Papers: Liu, Gong, Liu 2023, arXiv:2209.03003 (rectified flow); Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv:2403.03206
(the shifted schedule).

==================  =======================================================================
symbol              meaning
==================  =======================================================================
``σ``               noise level, ``1 − t`` in rectified-flow time
``timesteps``       ``σ · num_train_timesteps`` (what the model is conditioned on)
``shift``           schedule shift ``s`` (1 = none)
``model_output``    velocity ``dx_σ/dσ = noise − data``
==================  =======================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["FlowMatchEulerDiscreteScheduler"]


class FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler scheduler, numerically equal to ``diffusers``' one (sigma schedule,
    ``shift``, optional stochastic sampling).

    Time runs in ``σ`` from 1 (noise) to 0 (data): ``x_σ = σ noise + (1 − σ) x_data``; the
    model output is the velocity ``d x_σ / dσ = noise − data``.

    Args:
        num_train_timesteps: ``N``; timesteps are ``σ · N``.
        shift: Time shift ``σ ← shift σ / (1 + (shift − 1) σ)`` (SD3); 1 = none.
        stochastic_sampling: Re-noise to ``σ_next`` from the predicted data instead of Euler.
    """

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 stochastic_sampling: bool = False):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be a positive int, got "
                             f"{num_train_timesteps!r}")
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift!r}")
        self.num_train_timesteps = num_train_timesteps
        self.stochastic_sampling = stochastic_sampling
        self._shift = float(shift)
        n = num_train_timesteps
        ts = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy())
        sigmas = ts / n
        # SD3 shift: σ' = s σ / (1 + (s - 1) σ)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self.sigmas = sigmas
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def shift(self) -> float:
        """The time shift."""
        return self._shift

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

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      sigmas: Sequence[float] | None = None) -> None:
        """Sampling schedule: ``num_inference_steps`` sigmas from ``σ_max`` to ``σ_min``
        (or the given ``sigmas``), shifted, plus a final 0.

        Raises:
            ValueError: no or non-positive step count, more steps than ``num_train_timesteps``,
                or ``sigmas`` whose length disagrees with ``num_inference_steps``.
        """
        if sigmas is not None:
            if num_inference_steps is not None and len(sigmas) != num_inference_steps:
                raise ValueError(f"sigmas must have num_inference_steps={num_inference_steps} "
                                 f"entries, got {len(sigmas)}")
            num_inference_steps = len(sigmas)
        if (not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool)
                or num_inference_steps <= 0):
            raise ValueError(f"num_inference_steps must be a positive int, got "
                             f"{num_inference_steps!r}")
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps={num_inference_steps} exceeds "
                             f"num_train_timesteps={self.num_train_timesteps}")
        self.num_inference_steps = num_inference_steps
        n = self.num_train_timesteps
        if sigmas is None:
            ts = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps)
            sig = ts / n
        else:
            sig = np.array(sigmas).astype(np.float32)
        sig = self.shift * sig / (1 + (self.shift - 1) * sig)
        sig_t = torch.from_numpy(sig).to(dtype=torch.float32, device=device)
        self.timesteps = sig_t * n
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
             generator: torch.Generator | None = None) -> tuple[Tensor]:
        """One Euler step ``x ← x + (σ_next − σ) · model_output``.

        Args:
            model_output: ``[B, ...]`` velocity ``noise − data`` at ``(sample, σ)``.
            timestep: One of :attr:`timesteps` (a float; integer indices are rejected).
            sample: ``[B, ...]``.
            generator: Noise for ``stochastic_sampling``.

        Returns:
            ``(prev_sample,)`` in ``model_output``'s dtype.
        """
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
            noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                                device=sample.device)
            prev = (1.0 - sigma_next) * x0 + sigma_next * noise
        else:
            # Euler in σ: x_{σ'} = x_σ + (σ' - σ) v_σ
            prev = sample + (sigma_next - sigma) * model_output
        self._step_index += 1
        return (prev.to(model_output.dtype),)
