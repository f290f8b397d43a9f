"""Discrete predictor–corrector sampler of the VE SDE with the diffusers scheduler interface.

The variance-exploding SDE's reverse process, discretised on a geometric ladder of noise
scales (SMLD/NCSN): the predictor is the reverse-diffusion step
``x ← x + (σ_i² − σ_{i−1}²) s + √(σ_i² − σ_{i−1}²) z`` and the corrector a Langevin step with
a step size set by a target signal-to-noise ratio. Method names, arguments and numbers follow
``diffusers.ScoreSdeVeScheduler`` (``set_timesteps``, ``set_sigmas``, ``step_pred``,
``step_correct``, ``add_noise``, ``config``/``from_config``, ``return_dict``), so a loop or
pipeline written for diffusers runs unchanged; the model output is the *score* ``∇ log p_σ(x)``.

Paper: Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021, arXiv:2011.13456 (Alg. 2, 4).

============================  ===============================================================
symbol                        meaning
============================  ===============================================================
``timesteps``                 continuous times ``linspace(1, sampling_eps, N)``
``sigmas``                    ``σ_min (σ_max/σ_min)^t`` at ``timesteps`` (fed to the model)
``discrete_sigmas``           geometric ladder ``exp(linspace(log σ_min, log σ_max, N))``
``snr``                       corrector signal-to-noise ratio ``r``
============================  ===============================================================
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from mlatlas.generative.noise_schedule import SchedulerOutput
from mlatlas.generative.scheduler_config import SchedulerConfigMixin

__all__ = ["ScoreSdeVeScheduler", "SdeVeStep"]


class SdeVeStep(NamedTuple):
    """Result of one step: the next sample and its noise-free mean (both ``[B, ...]``)."""

    prev_sample: Tensor
    prev_sample_mean: Tensor


def _check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_pair(model_output: object, sample: object) -> None:
    for name, v in (("model_output", model_output), ("sample", sample)):
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got "
                            f"{v.dtype if isinstance(v, Tensor) else type(v).__name__}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output must have the shape of sample {tuple(sample.shape)}, "
                         f"got {tuple(model_output.shape)}")


class ScoreSdeVeScheduler(SchedulerConfigMixin):
    """VE-SDE predictor–corrector scheduler, numerically equal to diffusers' one.

    Args:
        num_train_timesteps: Ladder length used until :meth:`set_timesteps` is called.
        snr: Corrector signal-to-noise ratio.
        sigma_min: Smallest noise scale.
        sigma_max: Largest noise scale (the prior std, ``init_noise_sigma``).
        sampling_eps: Final continuous time.
        correct_steps: Corrector steps per predictor step (read by sampling loops).
    """

    def __init__(self, num_train_timesteps: int = 2000, snr: float = 0.15,
                 sigma_min: float = 0.01, sigma_max: float = 1348.0,
                 sampling_eps: float = 1e-5, correct_steps: int = 1):
        _check_positive_int(num_train_timesteps, "num_train_timesteps")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        if not 0 < sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {sampling_eps!r}")
        if snr <= 0:
            raise ValueError(f"snr must be positive, got {snr!r}")
        self.num_train_timesteps = num_train_timesteps
        self.snr = float(snr)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sampling_eps = float(sampling_eps)
        self.correct_steps = correct_steps
        self.init_noise_sigma = self.sigma_max
        self.timesteps: Tensor | None = None
        self.set_sigmas(num_train_timesteps)

    def scale_model_input(self, sample: Tensor, timestep: object = None) -> Tensor:
        """Identity (interface compatibility)."""
        return sample

    def set_timesteps(self, num_inference_steps: int, sampling_eps: float | None = None,
                      device: str | torch.device | None = None) -> None:
        """Continuous times ``linspace(1, sampling_eps, num_inference_steps)``."""
        _check_positive_int(num_inference_steps, "num_inference_steps")
        eps = self.sampling_eps if sampling_eps is None else sampling_eps
        self.timesteps = torch.linspace(1, eps, num_inference_steps, device=device)

    def set_sigmas(self, num_inference_steps: int, sigma_min: float | None = None,
                   sigma_max: float | None = None, sampling_eps: float | None = None) -> None:
        """Noise scales at :attr:`timesteps` and the discrete geometric ladder.

        As in diffusers, :attr:`timesteps` are created only when not set yet, so call
        :meth:`set_timesteps` first with the same ``num_inference_steps``.
        """
        _check_positive_int(num_inference_steps, "num_inference_steps")
        lo = self.sigma_min if sigma_min is None else sigma_min
        hi = self.sigma_max if sigma_max is None else sigma_max
        eps = self.sampling_eps if sampling_eps is None else sampling_eps
        if self.timesteps is None:
            self.set_timesteps(num_inference_steps, eps)
        # σ_i = exp(linspace(log σ_min, log σ_max, N)): the SMLD ladder
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(lo), math.log(hi),
                                                        num_inference_steps))
        # σ(t) = σ_min (σ_max/σ_min)^t, element by element (as the reference computes it)
        self.sigmas = torch.tensor([lo * (hi / lo) ** t for t in self.timesteps])

    def get_adjacent_sigma(self, timesteps: Tensor, t: Tensor) -> Tensor:
        """``σ_{i−1}`` for ladder indices ``timesteps`` (0 at the bottom of the ladder)."""
        return torch.where(timesteps == 0, torch.zeros_like(t.to(timesteps.device)),
                           self.discrete_sigmas[timesteps - 1].to(timesteps.device))

    def _require_timesteps(self) -> Tensor:
        if self.timesteps is None:
            raise ValueError("timesteps are not set: call set_timesteps() and set_sigmas() first")
        return self.timesteps

    def step_pred(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor,
                  generator: torch.Generator | None = None, return_dict: bool = True
                  ) -> SdeVeStep | tuple[Tensor, Tensor]:
        """Reverse-diffusion predictor from continuous time ``timestep``.

        Args:
            model_output: ``[B, ...]`` score at ``(sample, σ)``.
            timestep: One of :attr:`timesteps` (a float in ``[0, 1]``).
            sample: ``[B, ...]`` current sample.
            generator: Draws the noise ``z``.
            return_dict: Return a :class:`SdeVeStep` (else a plain tuple).

        Returns:
            :class:`SdeVeStep` (``prev_sample``, ``prev_sample_mean``).
        """
        steps = self._require_timesteps()
        _check_pair(model_output, sample)
        tval = float(timestep)
        if not 0.0 <= tval <= 1.0:
            raise ValueError(f"timestep must be a continuous time in [0, 1], got {tval!r}")
        timestep = timestep * torch.ones(sample.shape[0], device=sample.device)
        idx = (timestep * (len(steps) - 1)).long().to(self.discrete_sigmas.device)
        sigma = self.discrete_sigmas[idx].to(sample.device)
        adjacent = self.get_adjacent_sigma(idx, timestep).to(sample.device)
        # Alg. 2: g_i² = σ_i² − σ_{i−1}²
        diffusion = (sigma**2 - adjacent**2) ** 0.5
        diffusion = diffusion.flatten().reshape(-1, *([1] * (sample.ndim - 1)))
        drift = -(diffusion**2) * model_output
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                            layout=sample.layout, device=sample.device)
        # x_{i−1} = x_i + g_i² s + g_i z  (reverse time: subtract the drift)
        mean = sample - drift
        if not return_dict:
            return mean + diffusion * noise, mean
        return SdeVeStep(mean + diffusion * noise, mean)

    def step_correct(self, model_output: Tensor, sample: Tensor,
                     generator: torch.Generator | None = None, return_dict: bool = True
                  ) -> SdeVeStep | tuple[Tensor, Tensor]:
        """Langevin corrector step at the current noise level.

        Args:
            model_output: ``[B, ...]`` score at ``sample``.
            sample: ``[B, ...]``.
            generator: Draws the noise ``z``.
            return_dict: Return a :class:`SchedulerOutput` (else ``(prev_sample,)``).

        Returns:
            ``prev_sample``: the corrected sample (as diffusers, no mean).
        """
        self._require_timesteps()
        _check_pair(model_output, sample)
        noise = torch.randn(sample.shape, generator=generator, layout=sample.layout
                            ).to(sample.device)
        b = sample.shape[0]
        grad_norm = torch.norm(model_output.reshape(b, -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(b, -1), dim=-1).mean()
        # Alg. 4: ε = 2 (r ‖z‖ / ‖s‖)²
        step = (self.snr * noise_norm / grad_norm) ** 2 * 2
        step = (step * torch.ones(b).to(sample.device)).reshape(-1, *([1] * (sample.ndim - 1)))
        # x ← x + ε s + √(2ε) z
        mean = sample + step * model_output
        prev = mean + ((step * 2) ** 0.5) * noise
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x + σ_i z`` for ladder indices ``timesteps [B]`` (int)."""
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise must have the shape of original_samples "
                             f"{tuple(original_samples.shape)}, got {tuple(noise.shape)}")
        if timesteps.dtype.is_floating_point or timesteps.shape != (original_samples.shape[0],):
            raise ValueError(f"timesteps must be an int tensor [{original_samples.shape[0]}] of "
                             f"ladder indices, got {timesteps.dtype} {tuple(timesteps.shape)}")
        n = len(self.discrete_sigmas)
        if bool(((timesteps < 0) | (timesteps >= n)).any()):
            raise ValueError(f"timesteps must lie in [0, {n - 1}], got "
                             f"[{int(timesteps.min())}, {int(timesteps.max())}]")
        sig = self.discrete_sigmas.to(original_samples.device)[timesteps]
        return original_samples + noise * sig.reshape(-1, *([1] * (noise.ndim - 1)))

    def __len__(self) -> int:
        return self.num_train_timesteps
