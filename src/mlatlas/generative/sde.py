"""Score-based generative modelling with SDEs: VP/VE SDEs, reverse SDE, probability-flow ODE.

A forward SDE ``dx = f(x, t) dt + g(t) dw`` turns data into noise; it has the closed-form
Gaussian marginals ``x_t ~ N(m(t) x_0, s(t)² I)``. Knowing the score ``∇ log p_t`` (here from
an ε-prediction network: ``score = −ε/s(t)``), the reverse-time SDE
``dx = [f − g² ∇log p_t] dt + g dw̄`` samples the data, and so does the deterministic
probability-flow ODE ``dx/dt = f − ½ g² ∇log p_t``, which has the same marginals and gives an
exact likelihood by the instantaneous change of variables (:mod:`mlatlas.generative.cnf`).

Paper: Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", arXiv:2011.13456.

=================  =======================================================================
symbol             meaning
=================  =======================================================================
``f(x, t)``        drift (VP: ``−½ β(t) x``; VE: 0)
``g(t)``           diffusion (VP: ``√β(t)``; VE: ``σ(t) √(2 log(σ_max/σ_min))``)
``m(t), s(t)``     marginal mean coefficient and std: ``x_t = m(t) x_0 + s(t) ε``
``β(t)``           VP rate, linear from ``β_min`` to ``β_max`` on ``t ∈ [0, 1]``
``σ(t)``           VE noise scale ``σ_min (σ_max/σ_min)^t``
``ε_θ(x, t)``      network predicting the noise; ``score = −ε_θ / s(t)``
``eps``            smallest time sampled / integrated to (avoids ``s(0) = 0``)
=================  =======================================================================

The diffusers-compatible discrete VE sampler (``ScoreSdeVeScheduler``) lives in
:mod:`mlatlas.generative.sde_ve_scheduler`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mlatlas.generative.cnf import log_likelihood, odeint

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "denoising_score_loss",
    "pf_ode_log_likelihood",
    "pf_ode_sample",
    "probability_flow_drift",
    "reverse_sde_sample",
    "score_from_eps",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class SDE:
    """A forward SDE on ``t ∈ [0, T]`` with Gaussian marginals (subclasses: VP, VE)."""

    T = 1.0

    def check_t(self, t: object, batch: int | None = None) -> Tensor:
        """Validate ``t`` (float tensor ``[B]`` in ``[0, T]``) and return it."""
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"t must be a float tensor of shape [B], got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.ndim != 1 or (batch is not None and t.shape[0] != batch):
            raise ValueError(f"t must have shape [{batch if batch is not None else 'B'}], got "
                             f"{tuple(t.shape)}")
        if bool(((t < 0) | (t > self.T)).any()) or bool(t.isnan().any()):
            raise ValueError(f"t must lie in [0, {self.T}], got values in "
                             f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        return t

    def _check_xt(self, x: object, t: object) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a float tensor [B, ...], got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape [B, ...] with ndim >= 2, got {tuple(x.shape)}")
        return x, self.check_t(t, x.shape[0])

    # -- to be provided by subclasses ------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f(x, t)``: ``[B, ...]``."""
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        """``g(t)``: ``[B]``."""
        raise NotImplementedError

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(m(t), s(t))``, each ``[B]``: ``x_t = m(t) x_0 + s(t) ε``."""
        raise NotImplementedError

    def prior_std(self) -> float:
        """Std of the Gaussian prior at ``t = T``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[B, ...]`` and std ``[B]`` of ``p(x_t | x_0)``."""
        x0, t = self._check_xt(x0, t)
        m, s = self.marginal_coeffs(t)
        return _bcast(m, x0).to(x0) * x0, s.to(x0)

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw ``x_t = m(t) x_0 + s(t) ε`` with the given noise ``ε`` (same shape as x0)."""
        if not isinstance(noise, Tensor) or noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else noise!r}")
        mean, std = self.marginal(x0, t)
        return mean + _bcast(std, x0) * noise

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``x_T ~ N(0, prior_std² I)`` of the given shape."""
        return self.prior_std() * torch.randn(shape, generator=generator, dtype=dtype)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, prior_std² I)`` summed over non-batch dims: ``[B]``."""
        flat = z.reshape(z.shape[0], -1)
        s = self.prior_std()
        return (-0.5 * (flat / s) ** 2).sum(1) - flat.shape[1] * (math.log(s)
                                                                  + 0.5 * math.log(2 * math.pi))


class VPSDE(SDE):
    """Variance-preserving SDE, the continuous limit of DDPM.

    Args:
        beta_min: ``β(0)``.
        beta_max: ``β(1)``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, "
                             f"beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """``β(t) = β_min + t (β_max − β_min)``: ``[B]``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        x, t = self._check_xt(x, t)
        # eq. (32): f(x, t) = -½ β(t) x
        return -0.5 * _bcast(self.beta(t), x).to(x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        # eq. (32): g(t) = √β(t)
        return self.beta(self.check_t(t)).sqrt()

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = self.check_t(t)
        # eq. (33): log m(t) = -¼ t² (β_max - β_min) - ½ t β_min ; s(t)² = 1 - m(t)²
        log_m = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return log_m.exp(), (-torch.expm1(2 * log_m)).sqrt()

    def prior_std(self) -> float:
        return 1.0


class VESDE(SDE):
    """Variance-exploding SDE, the continuous limit of SMLD / NCSN.

    The marginal std is taken as ``σ(t)`` (the data at ``t = 0`` already carries the
    ``σ_min`` noise), as in the paper.

    Args:
        sigma_min: ``σ(0)``.
        sigma_max: ``σ(1)``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        """``σ(t) = σ_min (σ_max/σ_min)^t``: ``[B]``."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        x, t = self._check_xt(x, t)
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        # eq. (30): g(t) = √(dσ²/dt) = σ(t) √(2 log(σ_max/σ_min))
        return self.sigma(self.check_t(t)) * math.sqrt(2 * math.log(self.sigma_max /
                                                                    self.sigma_min))

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = self.check_t(t)
        return torch.ones_like(t), self.sigma(t)

    def prior_std(self) -> float:
        return self.sigma_max


def score_from_eps(eps_model: Callable[..., Tensor], sde: SDE) -> ScoreFn:
    """Turn an ε-prediction network into a score function ``s(x, t) = −ε_θ(x, t) / s(t)``.

    Args:
        eps_model: ``eps_model(x [B, ...], t [B]) -> [B, ...]`` (t in ``[0, T]``).
        sde: The SDE the network was trained on.

    Returns:
        ``score(x, t) -> [B, ...]``.
    """

    def score(x: Tensor, t: Tensor) -> Tensor:
        _, std = sde.marginal_coeffs(t)
        eps = eps_model(x, t)
        if eps.shape != x.shape:
            raise ValueError(f"eps_model output must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(eps.shape)}")
        # ∇ log p_t(x) = -ε / s(t)
        return -eps / _bcast(std, x).to(x)

    return score


def _checked(score_fn: ScoreFn) -> ScoreFn:
    def score(x: Tensor, t: Tensor) -> Tensor:
        s = score_fn(x, t)
        if s.shape != x.shape:
            raise ValueError(f"score_fn output must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(s.shape)}")
        return s

    return score


def denoising_score_loss(eps_model: Callable[..., Tensor], sde: SDE, x0: Tensor, *,
                         eps: float = 1e-3, t_sampling: str = "uniform",
                         generator: torch.Generator | None = None) -> Tensor:
    """Continuous-time denoising score matching in the ε parametrisation.

    ``E_{t ~ q, ε} ‖ε_θ(m(t) x_0 + s(t) ε, t) − ε‖²`` (mean over dims). With ``q`` uniform this
    is the usual "simple" weighting. The likelihood weighting ``λ(t) = g(t)²`` of Song et al.
    2021 ("Maximum likelihood training of score-based diffusion models", arXiv:2101.09258)
    reads ``g²/s²`` in ε-space, ``≈ 1/t`` for the VP SDE; drawing ``t`` log-uniformly is its
    importance-sampled form, which sharpens the model at small ``t`` where the likelihood is
    decided.

    Args:
        eps_model: ``eps_model(x, t) -> ε̂``.
        sde: The forward SDE.
        x0: ``[B, ...]`` data batch.
        eps: Smallest training time.
        t_sampling: ``"uniform"`` on ``[eps, T]``, ``"log-uniform"`` (density ∝ 1/t) or
            ``"mixed"`` (half of the batch each).
        generator: Draws ``t`` and ``ε``.

    Returns:
        Scalar loss.
    """
    if not isinstance(x0, Tensor) or x0.ndim < 2:
        raise ValueError(f"x0 must be a tensor [B, ...], got "
                         f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
    if t_sampling not in ("uniform", "log-uniform", "mixed"):
        raise ValueError(f"t_sampling must be 'uniform', 'log-uniform' or 'mixed', got "
                         f"{t_sampling!r}")
    u = torch.rand(x0.shape[0], generator=generator).to(x0)
    t = eps + (sde.T - eps) * u
    t_log = eps * (sde.T / eps) ** u  # density ∝ 1/t on [eps, T]
    if t_sampling == "log-uniform":
        t = t_log
    elif t_sampling == "mixed":
        t = torch.where(torch.arange(x0.shape[0], device=x0.device) % 2 == 0, t, t_log)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    xt = sde.perturb(x0, t, noise)
    return ((eps_model(xt, t) - noise) ** 2).mean()


def probability_flow_drift(score_fn: ScoreFn, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """The probability-flow ODE field ``f(x, t) − ½ g(t)² ∇log p_t(x)`` (eq. 13)."""

    score_fn = _checked(score_fn)

    def field(x: Tensor, t: Tensor) -> Tensor:
        g = _bcast(sde.diffusion(t), x).to(x)
        return sde.drift(x, t) - 0.5 * g**2 * score_fn(x, t)

    return field


def _check_run(x_T: object, n_steps: object, eps: float, sde: SDE) -> Tensor:
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 2:
        raise ValueError(f"x_T must be a float tensor [B, ...], got "
                         f"{tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__}")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps <= 0:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must be in (0, {sde.T}), got {eps!r}")
    return x_T


@torch.no_grad()
def reverse_sde_sample(score_fn: ScoreFn, sde: SDE, x_T: Tensor, n_steps: int, *,
                       eps: float = 1e-3, corrector_steps: int = 0, snr: float = 0.16,
                       generator: torch.Generator | None = None) -> Tensor:
    """Sample by integrating the reverse-time SDE with Euler–Maruyama (optionally + Langevin).

    Predictor (eq. 6, discretised backwards from ``T`` to ``eps``)::

        x ← x − [f(x, t) − g(t)² s(x, t)] Δt + g(t) √Δt z,   Δt = (T − eps)/n_steps

    Corrector (Alg. 4/5 of the paper), ``corrector_steps`` times before each predictor step::

        x ← x + δ s(x, t) + √(2δ) z,   δ = 2 α (snr ‖z‖ / ‖s‖)²

    with ``α = 1 − β(t) Δt`` for VP and 1 otherwise. The last step returns the noise-free mean.

    Args:
        score_fn: ``score_fn(x, t) -> ∇ log p_t(x)``.
        sde: The forward SDE.
        x_T: ``[B, ...]`` prior samples.
        n_steps: Number of predictor steps.
        eps: End time.
        corrector_steps: Langevin corrector steps per predictor step (0: plain EM).
        snr: Corrector signal-to-noise ratio.
        generator: Draws every ``z``.

    Returns:
        ``[B, ...]`` samples at ``t = eps``.
    """
    x = _check_run(x_T, n_steps, eps, sde).clone()
    score_fn = _checked(score_fn)
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be a non-negative int, got {corrector_steps!r}")
    dt = (sde.T - eps) / n_steps
    b = x.shape[0]
    for i in range(n_steps):
        t = torch.full((b,), sde.T - i * dt, dtype=x.dtype)
        for _ in range(corrector_steps):
            s = score_fn(x, t)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            alpha = 1.0 - sde.beta(t[:1]).item() * dt if isinstance(sde, VPSDE) else 1.0
            s_norm = s.reshape(b, -1).norm(dim=1).mean()
            z_norm = z.reshape(b, -1).norm(dim=1).mean()
            delta = 2 * alpha * (snr * z_norm / s_norm) ** 2
            x = x + delta * s + (2 * delta).sqrt() * z
        g = _bcast(sde.diffusion(t), x).to(x)
        # reverse SDE, eq. (6): dx = [f - g² ∇log p_t] dt + g dw̄, with dt = -Δt
        mean = x - (sde.drift(x, t) - g**2 * score_fn(x, t)) * dt
        if i == n_steps - 1:
            return mean
        x = mean + g * math.sqrt(dt) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


def pf_ode_sample(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, eps: float = 1e-3,
                  rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45"
                  ) -> tuple[Tensor, int]:
    """Sample by solving the probability-flow ODE from ``T`` to ``eps`` with scipy.

    Args:
        score_fn: ``score_fn(x, t)``.
        sde: The forward SDE.
        x_T: ``[B, ...]`` prior samples.
        eps: End time.
        rtol: Solver relative tolerance.
        atol: Solver absolute tolerance.
        method: ``solve_ivp`` method.

    Returns:
        ``(samples [B, ...], number of network evaluations)``.
    """
    x = _check_run(x_T, 1, eps, sde)
    return odeint(probability_flow_drift(score_fn, sde), x, sde.T, eps, rtol=rtol, atol=atol,
                  method=method)


def pf_ode_log_likelihood(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, eps: float = 1e-3,
                          trace: str = "auto", n_probes: int = 1,
                          generator: torch.Generator | None = None, rtol: float = 1e-5,
                          atol: float = 1e-5,
                          prior_log_prob: Callable[[Tensor], Tensor] | None = None
                          ) -> tuple[Tensor, int]:
    """Exact ``log p_eps(x0)`` through the probability-flow ODE (Sec. 4.3 / App. D.2).

    ``log p_0(x_0) = log p_T(x_T) + ∫_0^T ∇·f̃(x_t, t) dt`` with ``f̃`` the PF-ODE field; the
    trace is exact in low dimension and Hutchinson above it (see
    :func:`mlatlas.generative.cnf.divergence`).

    Args:
        score_fn: ``score_fn(x, t)``.
        sde: The forward SDE.
        x0: ``[B, ...]`` data points.
        eps: Start time (the density is that of ``x_eps``, ``≈ p_0`` for small ``eps``).
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"``.
        n_probes: Hutchinson probes.
        generator: Draws the probes.
        rtol: Solver relative tolerance.
        atol: Solver absolute tolerance.
        prior_log_prob: ``log p_T`` ``[B, ...] -> [B]``; default ``sde.prior_log_prob``. The
            Gaussian prior is only approximately ``p_T`` (VP: ``m(T) > 0``; VE: the data
            mean is not 0), which biases the likelihood by ``O(m(T)‖μ‖‖x_T‖)`` resp.
            ``O(‖μ‖/σ_max)`` nats.

    Returns:
        ``(log_prob [B], number of function evaluations)``.
    """
    x = _check_run(x0, 1, eps, sde)
    lp, _, nfe = log_likelihood(probability_flow_drift(score_fn, sde), x, t_data=eps,
                                t_prior=sde.T, trace=trace,
                                prior_log_prob=prior_log_prob or sde.prior_log_prob,
                                n_probes=n_probes, generator=generator, rtol=rtol, atol=atol)
    return lp, nfe
