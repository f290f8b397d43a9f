"""Stochastic approximation: finding roots and minima from noisy samples only.

The Robbins–Monro algorithm solves ``g(w) = 0`` when only noisy observations
``g~(w, eta) = g(w) + eta`` are available: ``w_{k+1} = w_k - a_k g~(w_k, eta_k)``. It
converges (with probability 1, for increasing ``g`` with bounded slope and bounded noise
variance) when the step sizes satisfy ``sum a_k = inf`` and ``sum a_k^2 < inf`` — ``a_k = 1/k``
does; a constant step (``sum a_k^2 = inf``) keeps a noise floor; ``a_k = 1/k^2``
(``sum a_k < inf``) stops short of the root. The incremental mean and stochastic gradient
descent are special cases: estimating ``E[X]`` is finding the root of ``g(w) = w - E[X]``, the
gradient of ``J(w) = E[||w - X||^2] / 2``; SGD, mini-batch GD and batch GD differ only in how
many samples estimate that gradient per step.

Source: H. Robbins and S. Monro 1951, "A Stochastic Approximation Method", *Ann. Math.
Statist.* 22(3):400-407; S. Zhao 2025, *Mathematical Foundations of Reinforcement Learning*,
ch. 6.

Notation:

============  ================================================================
``w_k``        estimate after ``k - 1`` updates (``w_1`` is the start)
``a_k``        step size of update ``k`` (k = 1, 2, ...)
``g~``         noisy observation of ``g`` at ``w_k``
``m``          mini-batch size (1 = SGD, n = BGD)
============  ================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "gradient_descent_mean",
    "incremental_mean",
    "power_steps",
    "rm_conditions",
    "robbins_monro",
]


def incremental_mean(x: torch.Tensor) -> torch.Tensor:
    """Running means of a sample sequence, computed incrementally.

    Args:
        x: ``(N, ...)`` samples ``x_1 .. x_N`` along the first dimension.

    Returns:
        ``(N, ...)`` where row ``k - 1`` is ``w_{k+1} = mean(x_1 .. x_k)``.

    Raises:
        ValueError: ``x`` has no samples.
        TypeError: ``x`` is not floating point.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not torch.is_tensor(x) else ' of dtype ' + str(x.dtype)}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    out = torch.empty_like(x)
    w = torch.zeros_like(x[0])
    for k in range(1, x.shape[0] + 1):
        w = w - (w - x[k - 1]) / k  # w_{k+1} = w_k - (1/k) (w_k - x_k)
        out[k - 1] = w
    return out


def power_steps(n: int, p: float = 1.0, c: float = 1.0, dtype: torch.dtype = torch.float64
                ) -> torch.Tensor:
    """Step sizes ``a_k = c / k^p`` for ``k = 1..n`` (``p = 0`` is a constant step ``c``).

    Returns:
        ``(n,)`` tensor.

    Raises:
        ValueError: ``n < 1``, ``c <= 0`` or ``p < 0``.
    """
    if n < 1 or c <= 0 or p < 0:
        raise ValueError(f"need n >= 1, c > 0 and p >= 0, got n={n}, c={c}, p={p}")
    k = torch.arange(1, n + 1, dtype=dtype)
    return c / k**p


def rm_conditions(p: float) -> tuple[bool, bool]:
    """Whether ``a_k = c / k^p`` meets the two Robbins–Monro step-size conditions.

    Returns:
        ``(sum a_k = inf, sum a_k^2 < inf)``: the first holds for ``p <= 1``, the second
        for ``p > 1/2``; both hold exactly for ``p`` in ``(1/2, 1]``.
    """
    return p <= 1.0, p > 0.5


def robbins_monro(g_tilde: Callable[[torch.Tensor, int], torch.Tensor], w1: torch.Tensor,
                  steps: torch.Tensor) -> torch.Tensor:
    """Run the Robbins–Monro iteration ``w_{k+1} = w_k - a_k g~(w_k, eta_k)``.

    Args:
        g_tilde: ``g_tilde(w, k)`` returns a noisy observation of ``g(w)`` with ``w``'s
            shape (``k`` is the 1-based update index). Batch independent runs by giving
            ``w1`` a leading run dimension.
        w1: Start value, any shape ``(...)``.
        steps: ``(K,)`` step sizes ``a_1 .. a_K``.

    Returns:
        ``(K + 1, ...)`` iterates ``w_1 .. w_{K+1}``.

    Raises:
        ValueError: ``steps`` is not 1-D or holds a negative step.
    """
    if steps.dim() != 1:
        raise ValueError(f"steps must have shape (K,), got {tuple(steps.shape)}")
    if bool((steps < 0).any()):
        raise ValueError("steps must be non-negative")
    out = torch.empty((steps.shape[0] + 1, *w1.shape), dtype=w1.dtype)
    w = w1.clone()
    out[0] = w
    for k in range(1, steps.shape[0] + 1):
        w = w - steps[k - 1] * g_tilde(w, k)  # eq. RM: w_{k+1} = w_k - a_k g~(w_k, eta_k)
        out[k] = w
    return out


def gradient_descent_mean(samples: torch.Tensor, steps: torch.Tensor, batch_size: int | None = None,
                          w1: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimate the mean of ``samples`` by minimising ``J(w) = mean_i ||w - x_i||^2 / 2``.

    ``batch_size=None`` (or ``n``) is batch GD with the exact gradient ``w - mean(x)``;
    ``batch_size=m < n`` is mini-batch GD on ``m`` indices drawn uniformly with replacement
    each step; ``m = 1`` is SGD. Independent runs go side by side when ``w1`` is ``(R, d)``.

    Args:
        samples: ``(n, d)`` data set.
        steps: ``(K,)`` step sizes.
        batch_size: Mini-batch size ``m`` in ``[1, n]``, or None for batch GD.
        w1: ``(d,)`` or ``(R, d)`` start (zeros ``(d,)`` by default).
        generator: Draws the mini-batches.

    Returns:
        ``(K + 1, d)`` or ``(K + 1, R, d)`` iterates ``w_1 .. w_{K+1}``.

    Raises:
        ValueError: wrong ``samples``/``w1`` shape or ``batch_size`` out of range.
    """
    if samples.dim() != 2 or samples.shape[0] < 1:
        raise ValueError(f"samples must have shape (n, d) with n >= 1, got {tuple(samples.shape)}")
    n, d = samples.shape
    if batch_size is not None and not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] or None, got {batch_size}")
    w = torch.zeros(d, dtype=samples.dtype) if w1 is None else w1.to(samples.dtype).clone()
    if w.shape[-1:] != (d,) or w.dim() > 2:
        raise ValueError(f"w1 must have shape ({d},) or (R, {d}), got {tuple(w.shape)}")
    runs = w.shape[:-1]  # () or (R,)
    full = batch_size is None or batch_size == n
    mean = samples.mean(0)
    K = steps.shape[0]
    idx = None if full else torch.randint(n, (K, *runs, batch_size), generator=generator)
    out = torch.empty(K + 1, *w.shape, dtype=samples.dtype)
    out[0] = w
    for k in range(K):
        batch_mean = mean if full else samples[idx[k]].mean(-2)
        w = w - steps[k] * (w - batch_mean)  # w_{k+1} = w_k - a_k (1/m) sum_{i in I_k} (w_k - x_i)
        out[k + 1] = w
    return out
