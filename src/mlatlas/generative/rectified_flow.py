"""Rectified flow: straight-path flow matching, few-step Euler/Heun sampling and reflow.

Rectified flow learns an ODE ``dz/dt = v(z, t)`` that transports noise ``x0`` to data ``x1``
by regressing ``v`` on the straight line between them: ``x_t = t x1 + (1 − t) x0`` with target
velocity ``x1 − x0``. Where independent pairs cross, the learned field averages them and the
trajectories bend; *reflow* re-trains on the couplings ``(x0, ODE(x0))`` the first flow
produces, which no longer cross, so the second flow is nearly straight and one or two Euler
steps land close to where a hundred do.

Paper: Liu, Gong, Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data
with Rectified Flow", arXiv:2209.03003 (ICLR 2023).

==============  ===========================================================================
symbol          meaning
==============  ===========================================================================
``x0``          noise sample ``N(0, I)`` (``t = 0``)
``x1``          data sample (``t = 1``)
``x_t``         ``t x1 + (1 − t) x0``
``v(x, t)``     learned velocity, target ``x1 − x0``
``k``-RF        the flow after ``k − 1`` reflows (1-RF: independent coupling)
``S``           straightness ``∫ E ‖(Z1 − Z0) − v(Z_t, t)‖² dt`` along the ODE paths (0 = straight)
``σ``           diffusers' time: ``σ = 1 − t`` (1 = noise); its model output is ``x0 − x1 = −v``
==============  ===========================================================================

:class:`~mlatlas.generative.flow_match_scheduler.FlowMatchEulerDiscreteScheduler` (re-exported
here) reproduces ``diffusers.FlowMatchEulerDiscreteScheduler`` (``set_timesteps``, ``step``,
``scale_noise``, with ``shift``) so a rectified flow can be sampled by a diffusers loop;
:func:`sample_with_scheduler` does the time/sign conversion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mlatlas.generative.flow_match_scheduler import FlowMatchEulerDiscreteScheduler

__all__ = [
    "FlowMatchEulerDiscreteScheduler",
    "interpolate",
    "path_times",
    "rectified_flow_loss",
    "reflow_couplings",
    "sample_euler",
    "sample_heun",
    "sample_with_scheduler",
    "straightness",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def _check_x(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor [B, ...], got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [B, ...] with ndim >= 2, got {tuple(x.shape)}")
    return x


def _check_steps(n_steps: object) -> int:
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps <= 0:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    return n_steps


def _velocity(model: VelocityFn, x: Tensor, t: float) -> Tensor:
    v = model(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
    if v.shape != x.shape:
        raise ValueError(f"model output must have the shape of x {tuple(x.shape)}, got "
                         f"{tuple(v.shape)}")
    return v


def path_times(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """Check the inputs of a path between noise and data; return ``t`` shaped to broadcast.

    Args:
        x0: ``[B, ...]`` float noise.
        x1: ``[B, ...]`` float data, the shape of ``x0``.
        t: ``[B]`` times in ``[0, 1]``.

    Returns:
        ``[B, 1, ..., 1]`` times in the dtype of ``x0``.

    Raises:
        TypeError: ``x0``/``x1`` not float tensors.
        ValueError: shapes that differ, ``t`` not ``[B]``, times outside ``[0, 1]`` or NaN.
    """
    _check_x(x0, "x0")
    _check_x(x1, "x1")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and "
                         f"{tuple(x1.shape)}")
    if not isinstance(t, Tensor) or t.shape != (x0.shape[0],):
        raise ValueError(f"t must be a tensor of shape [{x0.shape[0]}], got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if bool(((t < 0) | (t > 1)).any()) or bool(t.isnan().any()):
        raise ValueError(f"t must lie in [0, 1], got values in [{t.min():.4g}, {t.max():.4g}]")
    return t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """The straight path ``x_t = t x1 + (1 − t) x0``.

    Args:
        x0: ``[B, ...]`` noise.
        x1: ``[B, ...]`` data.
        t: ``[B]`` times in ``[0, 1]``.

    Returns:
        ``[B, ...]``.
    """
    tb = path_times(x0, x1, t)
    # eq. (1): X_t = t X_1 + (1 - t) X_0
    return tb * x1 + (1 - tb) * x0


def rectified_flow_loss(model: VelocityFn, x1: Tensor, x0: Tensor | None = None, *,
                        generator: torch.Generator | None = None) -> Tensor:
    """``E_t ‖(x1 − x0) − v(x_t, t)‖²`` with ``t ~ U(0, 1)`` (mean over batch and dims).

    Args:
        model: ``model(x [B, ...], t [B]) -> [B, ...]``.
        x1: ``[B, ...]`` data (for reflow: the endpoints ``ODE(x0)`` of the previous flow).
        x0: ``[B, ...]`` the noise paired with ``x1``; drawn independently when None (1-RF).
        generator: Draws ``t`` (and ``x0`` when None).

    Returns:
        Scalar loss.
    """
    _check_x(x1, "x1")
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator).to(x1)
    elif not isinstance(x0, Tensor) or x0.shape != x1.shape:
        raise ValueError(f"x0 must have the shape of x1 {tuple(x1.shape)}, got "
                         f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
    t = torch.rand(x1.shape[0], generator=generator).to(x1)
    xt = interpolate(x0, x1, t)
    # eq. (1): min_v ∫ E ‖(X_1 - X_0) - v(X_t, t)‖² dt
    v = model(xt, t)
    if v.shape != x1.shape:
        raise ValueError(f"model output must have the shape of x1 {tuple(x1.shape)}, got "
                         f"{tuple(v.shape)}")
    return ((x1 - x0 - v) ** 2).mean()


@torch.no_grad()
def sample_euler(model: VelocityFn, x0: Tensor, n_steps: int) -> Tensor:
    """Euler from ``t = 0`` to 1 in ``n_steps`` uniform steps (``n_steps`` evaluations).

    Args:
        model: Velocity ``model(x, t)``.
        x0: ``[B, ...]`` noise.
        n_steps: Number of steps.

    Returns:
        ``[B, ...]`` samples at ``t = 1``.
    """
    x = _check_x(x0, "x0").clone()
    h = 1.0 / _check_steps(n_steps)
    for i in range(n_steps):
        # z_{t+h} = z_t + h v(z_t, t)
        x = x + h * _velocity(model, x, i * h)
    return x


@torch.no_grad()
def sample_heun(model: VelocityFn, x0: Tensor, n_steps: int) -> Tensor:
    """Heun (explicit trapezoid) from ``t = 0`` to 1 (``2 n_steps`` evaluations).

    Args:
        model: Velocity ``model(x, t)``.
        x0: ``[B, ...]`` noise.
        n_steps: Number of steps.

    Returns:
        ``[B, ...]`` samples at ``t = 1``.
    """
    x = _check_x(x0, "x0").clone()
    h = 1.0 / _check_steps(n_steps)
    for i in range(n_steps):
        v0 = _velocity(model, x, i * h)
        v1 = _velocity(model, x + h * v0, (i + 1) * h)
        # z_{t+h} = z_t + h (v(z_t, t) + v(z̃_{t+h}, t+h)) / 2
        x = x + 0.5 * h * (v0 + v1)
    return x


@torch.no_grad()
def reflow_couplings(model: VelocityFn, x0: Tensor, n_steps: int = 100,
                     solver: str = "euler") -> tuple[Tensor, Tensor]:
    """The deterministic coupling ``(x0, ODE_v(x0))`` a flow induces: the reflow data.

    Args:
        model: The k-RF velocity.
        x0: ``[B, ...]`` noise.
        n_steps: ODE steps.
        solver: ``"euler"`` or ``"heun"``.

    Returns:
        ``(x0, x1)`` both ``[B, ...]``.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    x1 = (sample_euler if solver == "euler" else sample_heun)(model, x0, n_steps)
    return x0, x1


@torch.no_grad()
def straightness(model: VelocityFn, x0: Tensor, n_steps: int = 100) -> tuple[float, Tensor]:
    """Straightness ``S = ∫_0^1 E ‖(Z1 − Z0) − v(Z_t, t)‖² dt`` of the flow's own paths.

    The trajectory is simulated with ``n_steps`` Euler steps from ``x0``; ``S`` is the mean
    over the steps (a Riemann sum). ``S = 0`` iff every path is a straight line.

    Args:
        model: Velocity ``model(x, t)``.
        x0: ``[B, ...]`` noise.
        n_steps: Euler steps.

    Returns:
        ``(S, per-step curve [n_steps])`` — the curve is ``E ‖(Z1 − Z0) − v(Z_t, t)‖²`` at
        ``t = i / n_steps``.
    """
    x = _check_x(x0, "x0").clone()
    h = 1.0 / _check_steps(n_steps)
    vs = []
    for i in range(n_steps):
        v = _velocity(model, x, i * h)
        vs.append(v)
        x = x + h * v
    disp = x - x0
    curve = torch.stack([((disp - v) ** 2).reshape(x.shape[0], -1).sum(1).mean() for v in vs])
    # Def. 3.1 / eq. (5): S(Z) = ∫ E ‖(Z_1 - Z_0) - dZ_t/dt‖² dt
    return float(curve.mean()), curve


@torch.no_grad()
def sample_with_scheduler(model: VelocityFn, scheduler: FlowMatchEulerDiscreteScheduler,
                          x0: Tensor, num_inference_steps: int) -> Tensor:
    """Sample a rectified flow through the diffusers-style scheduler loop.

    Converts times and signs: the scheduler's ``σ`` is ``1 − t`` and its model output is
    ``−v(x, 1 − σ)``.

    Args:
        model: Velocity ``model(x, t)`` in rectified-flow time.
        scheduler: A :class:`FlowMatchEulerDiscreteScheduler` (or diffusers' own).
        x0: ``[B, ...]`` noise.
        num_inference_steps: Steps.

    Returns:
        ``[B, ...]`` samples.
    """
    x = _check_x(x0, "x0").clone()
    _check_steps(num_inference_steps)
    scheduler.set_timesteps(num_inference_steps)
    n = scheduler.config.num_train_timesteps if hasattr(scheduler, "config") \
        else scheduler.num_train_timesteps
    for ts in scheduler.timesteps:
        t = 1.0 - float(ts) / n
        x = scheduler.step(-_velocity(model, x, t), ts, x)[0]
    return x
