"""Continuous normalizing flows (neural ODEs with an exact likelihood) and flow matching.

A continuous normalizing flow moves samples with an ODE ``dz/dt = v(z, t)`` between a simple
prior and the data; the log-density changes along a trajectory by minus the divergence of the
field (instantaneous change of variables), so the exact likelihood of a point is one ODE solve
of the augmented state ``(z, Δ)``. The divergence is an exact trace of the Jacobian in low
dimension and Hutchinson's unbiased estimate ``εᵀ (∂v/∂z) ε`` above it. Flow matching trains
the same field without any ODE solve, by regressing it onto the velocity of a conditional
optimal-transport path between a noise sample and a data point.

Papers: Chen, Rubanova, Bettencourt, Duvenaud 2018, "Neural Ordinary Differential Equations",
arXiv:1806.07366; Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud 2019, "FFJORD",
arXiv:1810.01367 (Hutchinson trace); Lipman, Chen, Ben-Hamu, Nickel, Le 2023, "Flow Matching
for Generative Modeling", arXiv:2210.02747.

==============  ===========================================================================
symbol          meaning
==============  ===========================================================================
``v(z, t)``     velocity field (a network ``forward(x, t)``), ``t`` a float tensor ``[B]``
``t_data``      time at which the flow is at the data (1 for flow matching, 0 for SDEs)
``t_prior``     time at which the flow is at the prior (0 for flow matching, T for SDEs)
``Δ``           accumulated divergence, ``dΔ/dt = ∇·v``
``σ_min``       width of the conditional OT path at the data end (flow matching)
==============  ===========================================================================

Solvers: evaluation uses ``scipy.integrate.solve_ivp`` (adaptive RK45, tight tolerances) —
a well-kept solver, not a hand-rolled one. Training a CNF by maximum likelihood needs
gradients through the solve, so :func:`odeint_rk4` gives a fixed-step classical RK4 that
autograd differentiates (a documented discretisation: its likelihood is exact only up to the
RK4 error; evaluate with ``solver="scipy"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mlatlas.generative.rectified_flow import path_times

__all__ = [
    "CNF",
    "VelocityFn",
    "divergence",
    "flow_matching_loss",
    "log_likelihood",
    "odeint",
    "odeint_rk4",
    "ot_path",
    "standard_normal_log_prob",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
_TRACES = ("auto", "exact", "hutchinson")
#: ``trace="auto"`` computes the exact trace up to this many dimensions, Hutchinson above.
EXACT_TRACE_MAX_DIM = 8


def _check_x(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be batched, shape [B, ...] with ndim >= 2, got "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_tol(rtol: float, atol: float) -> None:
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"{name} must be a positive float, got {tol!r}")


def _time(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension.

    Args:
        z: ``[B, ...]``.

    Returns:
        ``[B]``.
    """
    _check_x(z, "z")
    flat = z.reshape(z.shape[0], -1)
    # log N(z; 0, I) = -|z|²/2 - (D/2) log 2π
    return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def divergence(fn: VelocityFn, x: Tensor, t: Tensor, *, method: str = "auto",
               probes: Tensor | None = None, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Velocity and its divergence ``∇·v = tr(∂v/∂x)`` at ``(x, t)``.

    Each sample's velocity must depend on that sample only (no batch statistics), which is
    what lets one backward pass per coordinate (or per probe) serve the whole batch.

    Args:
        fn: Velocity field ``fn(x [B, ...], t [B]) -> [B, ...]``.
        x: ``[B, ...]`` points.
        t: ``[B]`` times.
        method: ``"exact"`` (one backward pass per dimension), ``"hutchinson"`` (one per
            probe) or ``"auto"`` (exact up to ``EXACT_TRACE_MAX_DIM`` dimensions).
        probes: ``[K, B, ...]`` Hutchinson probes with ``E[εεᵀ] = I`` (required for
            ``"hutchinson"``; averaged over ``K``).
        create_graph: Keep the graph so the divergence can be differentiated (training).

    Returns:
        ``(v [B, ...], div [B])``.

    Raises:
        ValueError: unknown ``method``, missing probes or probes of the wrong shape.
    """
    _check_x(x)
    if method not in _TRACES:
        raise ValueError(f"method must be one of {_TRACES}, got {method!r}")
    dim = x[0].numel()
    if method == "auto":
        method = "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"
    if method == "hutchinson":
        if probes is None:
            raise ValueError("method='hutchinson' needs probes [K, B, ...]; got None")
        if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
            raise ValueError(f"probes must have shape [K, {', '.join(map(str, x.shape))}], got "
                             f"{tuple(probes.shape)}")
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        v = fn(xg, t)
        if v.shape != x.shape:
            raise ValueError(f"velocity fn must return the shape of x {tuple(x.shape)}, got "
                             f"{tuple(v.shape)}")
        if method == "exact":
            vf = v.reshape(v.shape[0], -1)
            div = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
            for i in range(dim):
                # tr(J) = Σ_i ∂v_i/∂x_i
                (g,) = torch.autograd.grad(vf[:, i].sum(), xg, create_graph=create_graph,
                                           retain_graph=True)
                div = div + g.reshape(g.shape[0], -1)[:, i]
        else:
            div = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
            for eps in probes:
                # Hutchinson: tr(J) = E_ε[εᵀ J ε]
                (g,) = torch.autograd.grad((v * eps).sum(), xg, create_graph=create_graph,
                                           retain_graph=True)
                div = div + (g * eps).reshape(x.shape[0], -1).sum(1)
            div = div / probes.shape[0]
    if not create_graph:
        v, div = v.detach(), div.detach()
    return v, div


def odeint(fn: VelocityFn, x: Tensor, t0: float, t1: float, *, rtol: float = 1e-5,
           atol: float = 1e-5, method: str = "RK45") -> tuple[Tensor, int]:
    """Solve ``dx/dt = fn(x, t)`` from ``t0`` to ``t1`` with ``scipy.integrate.solve_ivp``.

    The whole batch is one state vector (float64 in scipy, ``x.dtype`` in ``fn``); no
    gradients flow through the solve.

    Args:
        fn: ``fn(x [B, ...], t [B]) -> [B, ...]``.
        x: ``[B, ...]`` initial state at ``t0``.
        t0: Start time.
        t1: End time (may be smaller than ``t0``: integrate backwards).
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        method: A ``solve_ivp`` method (``"RK45"``, ``"DOP853"``, ...).

    Returns:
        ``(x(t1) [B, ...], number of function evaluations)``.

    Raises:
        RuntimeError: when the solver fails.
    """
    from scipy.integrate import solve_ivp

    _check_x(x)
    _check_tol(rtol, atol)
    shape, dtype, device = x.shape, x.dtype, x.device

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).to(dtype=dtype, device=device).reshape(shape)
        with torch.no_grad():
            v = fn(xt, _time(t, xt))
        return v.reshape(-1).double().cpu().numpy()

    y0 = x.detach().reshape(-1).double().cpu().numpy()
    if t0 == t1:
        return x.detach().clone(), 0
    sol = solve_ivp(rhs, (float(t0), float(t1)), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    out = torch.from_numpy(sol.y[:, -1]).to(dtype=dtype, device=device).reshape(shape)
    return out, int(sol.nfev)


def odeint_rk4(fn: VelocityFn, x: Tensor, t0: float, t1: float, n_steps: int) -> Tensor:
    """Fixed-step classical Runge–Kutta 4 from ``t0`` to ``t1``; autograd flows through it.

    Args:
        fn: ``fn(x [B, ...], t [B]) -> [B, ...]``.
        x: ``[B, ...]`` state at ``t0``.
        t0: Start time.
        t1: End time.
        n_steps: Number of RK4 steps (4 evaluations each).

    Returns:
        ``[B, ...]`` state at ``t1``.
    """
    _check_x(x)
    _check_positive_int(n_steps, "n_steps")
    h = (t1 - t0) / n_steps
    for i in range(n_steps):
        t = t0 + i * h
        # k1..k4 of the classical RK4 tableau
        k1 = fn(x, _time(t, x))
        k2 = fn(x + 0.5 * h * k1, _time(t + 0.5 * h, x))
        k3 = fn(x + 0.5 * h * k2, _time(t + 0.5 * h, x))
        k4 = fn(x + h * k3, _time(t + h, x))
        x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def log_likelihood(fn: VelocityFn, x: Tensor, *, t_data: float, t_prior: float,
                   prior_log_prob: Callable[[Tensor], Tensor] = standard_normal_log_prob,
                   trace: str = "auto", n_probes: int = 1, generator: torch.Generator | None = None,
                   solver: str = "scipy", rtol: float = 1e-5, atol: float = 1e-5,
                   n_steps: int = 8) -> tuple[Tensor, Tensor, int]:
    """Exact log-likelihood of ``x`` under the flow of ``fn`` (instantaneous change of variables).

    Integrates the augmented ODE ``d(z, Δ)/dt = (v(z, t), ∇·v(z, t))`` from ``t_data`` (with
    ``z = x, Δ = 0``) to ``t_prior``; then ``log p_data(x) = log p_prior(z) + Δ``.

    Args:
        fn: Velocity field ``fn(x, t) -> v``.
        x: ``[B, ...]`` data points.
        t_data: Time at which the flow is at the data.
        t_prior: Time at which the flow is at the prior.
        prior_log_prob: ``[B, ...] -> [B]`` log-density of the prior.
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (see :func:`divergence`).
        n_probes: Rademacher probes for Hutchinson, fixed for the whole solve.
        generator: Draws the probes.
        solver: ``"scipy"`` (adaptive RK45, no gradients) or ``"rk4"`` (fixed steps,
            differentiable: the training path).
        rtol: ``scipy`` relative tolerance.
        atol: ``scipy`` absolute tolerance.
        n_steps: RK4 steps.

    Returns:
        ``(log_prob [B], z at t_prior [B, ...], function evaluations)``.
    """
    _check_x(x)
    if solver not in ("scipy", "rk4"):
        raise ValueError(f"solver must be 'scipy' or 'rk4', got {solver!r}")
    if trace not in _TRACES:
        raise ValueError(f"trace must be one of {_TRACES}, got {trace!r}")
    _check_positive_int(n_probes, "n_probes")
    dim = x[0].numel()
    resolved = ("exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson") if trace == "auto" \
        else trace
    probes = None
    if resolved == "hutchinson":
        # Rademacher ε ∈ {±1}: E[εεᵀ] = I, lowest-variance Hutchinson probe
        bits = torch.randint(0, 2, (n_probes, *x.shape), generator=generator)
        probes = (2.0 * bits - 1.0).to(dtype=x.dtype, device=x.device)
    batch = x.shape[0]

    if solver == "rk4":
        create = torch.is_grad_enabled()
        nfe = 0

        def aug(s: Tensor, t: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            z = s[:, :dim].reshape(x.shape)
            v, div = divergence(fn, z, t, method=resolved, probes=probes, create_graph=create)
            return torch.cat([v.reshape(batch, dim), div[:, None]], dim=1)

        s0 = torch.cat([x.reshape(batch, dim), x.new_zeros(batch, 1)], dim=1)
        s1 = odeint_rk4(aug, s0, t_data, t_prior, n_steps)
    else:
        _check_tol(rtol, atol)

        def aug(s: Tensor, t: Tensor) -> Tensor:
            z = s[:, :dim].reshape(x.shape)
            v, div = divergence(fn, z, t, method=resolved, probes=probes)
            return torch.cat([v.reshape(batch, dim), div[:, None]], dim=1)

        s0 = torch.cat([x.detach().reshape(batch, dim), x.new_zeros(batch, 1)], dim=1)
        s1, nfe = odeint(aug, s0, t_data, t_prior, rtol=rtol, atol=atol)
    z = s1[:, :dim].reshape(x.shape)
    # log p_data(x) = log p_prior(z(t_prior)) + ∫_{t_data}^{t_prior} ∇·v dt
    return prior_log_prob(z) + s1[:, dim], z, nfe


class CNF(nn.Module):
    """A continuous normalizing flow around a velocity network.

    Args:
        velocity: Module with ``forward(x [B, D], t [B]) -> [B, D]``.
        t_data: Time at the data end (1 by the flow-matching convention).
        t_prior: Time at the standard-normal prior end.
    """

    def __init__(self, velocity: nn.Module, t_data: float = 1.0, t_prior: float = 0.0):
        super().__init__()
        if t_data == t_prior:
            raise ValueError(f"t_data and t_prior must differ, got both {t_data}")
        self.velocity = velocity
        self.t_data = float(t_data)
        self.t_prior = float(t_prior)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity ``[B, D]`` at points ``x [B, D]`` and times ``t [B]``."""
        return self.velocity(x, t)

    def log_prob(self, x: Tensor, *, solver: str = "scipy", n_steps: int = 8, **kw) -> Tensor:
        """Exact ``log p(x)`` ``[B]`` (see :func:`log_likelihood`; ``rk4`` keeps gradients)."""
        lp, _, _ = log_likelihood(self.velocity, x, t_data=self.t_data, t_prior=self.t_prior,
                                  solver=solver, n_steps=n_steps, **kw)
        return lp

    @torch.no_grad()
    def sample(self, z: Tensor, *, solver: str = "scipy", n_steps: int = 8,
               rtol: float = 1e-5, atol: float = 1e-5) -> Tensor:
        """Push prior samples ``z [B, D]`` to the data end of the flow."""
        if solver == "rk4":
            return odeint_rk4(self.velocity, z, self.t_prior, self.t_data, n_steps)
        if solver != "scipy":
            raise ValueError(f"solver must be 'scipy' or 'rk4', got {solver!r}")
        return odeint(self.velocity, z, self.t_prior, self.t_data, rtol=rtol, atol=atol)[0]


def ot_path(x0: Tensor, x1: Tensor, t: Tensor, sigma_min: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Conditional optimal-transport path of flow matching and its velocity.

    Args:
        x0: ``[B, ...]`` noise samples (``t = 0``).
        x1: ``[B, ...]`` data samples (``t = 1``).
        t: ``[B]`` times in ``[0, 1]``.
        sigma_min: Width of the conditional path at ``t = 1``.

    Returns:
        ``(x_t, u_t)``, both ``[B, ...]``.
    """
    tb = path_times(x0, x1, t)
    if not 0 <= sigma_min < 1:
        raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min!r}")
    # Lipman et al. eq. (22): ψ_t(x0) = (1 - (1 - σ_min) t) x0 + t x1
    xt = (1 - (1 - sigma_min) * tb) * x0 + tb * x1
    # eq. (23): u_t = x1 - (1 - σ_min) x0
    ut = x1 - (1 - sigma_min) * x0
    return xt, ut


def flow_matching_loss(model: VelocityFn, x1: Tensor, *, sigma_min: float = 1e-4,
                       generator: torch.Generator | None = None) -> Tensor:
    """Conditional flow-matching loss ``E ‖v(ψ_t(x0), t) − u_t‖²`` with the OT path.

    Args:
        model: Velocity field ``model(x, t)``.
        x1: ``[B, ...]`` a data batch.
        sigma_min: See :func:`ot_path`.
        generator: Draws ``x0 ~ N(0, I)`` and ``t ~ U(0, 1)``.

    Returns:
        Scalar loss (mean over batch and dimensions).
    """
    _check_x(x1, "x1")
    x0 = torch.randn(x1.shape, generator=generator).to(x1)
    t = torch.rand(x1.shape[0], generator=generator).to(x1)
    xt, ut = ot_path(x0, x1, t, sigma_min)
    return ((model(xt, t) - ut) ** 2).mean()
