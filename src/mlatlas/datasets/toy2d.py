"""Two-dimensional toy densities with exact samplers (and exact log-densities where they exist).

These are the standard test beds of generative modelling papers (FFJORD, flow matching,
rectified flow, diffusion tutorials): small enough to train in seconds on a CPU, and known
exactly, so a model's samples can be compared with *fresh* samples from the true distribution
and its likelihood with the true log-density.

=============  ==========================================================  ==========  =======
name           what                                                        log_prob    classes
=============  ==========================================================  ==========  =======
8gaussians     8 isotropic Gaussians, std 0.25, centres on a circle r = 2  exact       8
two_moons      two interleaved half circles + N(0, 0.1²) noise, ×1.5       —           2
checkerboard   uniform on the 8 dark squares of a 4×4 board on [-2, 2]²    exact       8
swiss_roll     a noisy spiral (t cos t, t sin t)/5, t ∈ [1.5π, 4.5π]       —           3
=============  ==========================================================  ==========  =======

Every sampler draws only from the ``torch.Generator`` it is given, so ``sample(name, n, g)``
with a freshly seeded ``g`` is reproducible. All tensors are float32 on the CPU.

Labels (:func:`sample_labeled`): 8gaussians — the mixture component (counter-clockwise from
angle 0); checkerboard — the index of the dark square, row-major from the bottom-left;
two_moons — which moon; swiss_roll — which third of the spiral (inner, middle, outer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DENSITIES",
    "classify",
    "entropy",
    "gaussian_centers",
    "log_prob",
    "mixture_class_log_posterior",
    "mixture_sample_labeled",
    "num_classes",
    "sample",
    "sample_labeled",
]

DENSITIES: tuple[str, ...] = ("8gaussians", "two_moons", "checkerboard", "swiss_roll")

_GAUSS_RADIUS = 2.0  # distance of each of the 8 centres from the origin
_GAUSS_STD = 0.25  # per-coordinate standard deviation of each component
_MOON_NOISE = 0.1  # std of the Gaussian noise added to each moon point (before scaling)
_MOON_SCALE = 1.5
_ROLL_NOISE = 0.1  # std of the Gaussian noise added to the (scaled) swiss roll
_CLASSES = {"8gaussians": 8, "two_moons": 2, "checkerboard": 8, "swiss_roll": 3}


def _check_name(name: str) -> None:
    if name not in DENSITIES:
        raise ValueError(f"name must be one of {DENSITIES}, got {name!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _check_points(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape [n, 2], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def num_classes(name: str) -> int:
    """Number of class labels :func:`sample_labeled` returns for ``name``."""
    _check_name(name)
    return _CLASSES[name]


def gaussian_centers() -> Tensor:
    """The 8 component means of ``8gaussians``, ``[8, 2]`` (component k at angle 2πk/8)."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return (_GAUSS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def sample_labeled(name: str, n: int, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Draw ``n`` exact samples of density ``name`` together with their class labels.

    Args:
        name: One of :data:`DENSITIES`.
        n: Number of samples.
        generator: Source of randomness (the global generator when None).

    Returns:
        ``(x, y)``: points ``[n, 2]`` float32 and labels ``[n]`` int64 in
        ``[0, num_classes(name))``.
    """
    _check_name(name)
    _check_n(n)
    g = generator
    if name == "8gaussians":
        y = torch.randint(0, 8, (n,), generator=g)
        x = gaussian_centers()[y] + _GAUSS_STD * torch.randn(n, 2, generator=g)
    elif name == "checkerboard":
        y = torch.randint(0, 8, (n,), generator=g)
        row = y // 2
        col = 2 * (y % 2) + row % 2  # dark squares: (row + col) even
        corner = torch.stack([col, row], dim=1).float() - 2.0
        x = corner + torch.rand(n, 2, generator=g)
    elif name == "two_moons":
        y = torch.randint(0, 2, (n,), generator=g)
        t = math.pi * torch.rand(n, generator=g)
        upper = torch.stack([t.cos(), t.sin()], dim=1)
        lower = torch.stack([1.0 - t.cos(), 0.5 - t.sin()], dim=1)
        x = torch.where(y[:, None] == 0, upper, lower)
        x = x + _MOON_NOISE * torch.randn(n, 2, generator=g)
        x = (x - torch.tensor([0.5, 0.25])) * _MOON_SCALE
    else:  # swiss_roll
        u = torch.rand(n, generator=g)
        t = 1.5 * math.pi * (1.0 + 2.0 * u)
        x = torch.stack([t * t.cos(), t * t.sin()], dim=1) / 5.0
        x = x + _ROLL_NOISE * torch.randn(n, 2, generator=g)
        y = torch.clamp((u * 3).long(), max=2)
    return x.float().contiguous(), y.long()


def sample(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``n`` exact samples of density ``name``.

    Args:
        name: One of :data:`DENSITIES`.
        n: Number of samples.
        generator: Source of randomness (the global generator when None).

    Returns:
        ``[n, 2]`` float32.
    """
    return sample_labeled(name, n, generator)[0]


def _component_log_prob(x: Tensor, means: Tensor, std: float) -> Tensor:
    """``log N(x; μ_k, σ²I)`` for every component k: ``[n, K]``."""
    d2 = ((x[:, None, :] - means.to(x)[None]) ** 2).sum(-1)
    # log N(x; μ, σ²I) in d dimensions = -|x-μ|²/(2σ²) - (d/2) log(2πσ²)
    return -d2 / (2 * std**2) - 0.5 * x.shape[1] * math.log(2 * math.pi * std**2)


def _gauss_component_log_prob(x: Tensor) -> Tensor:
    return _component_log_prob(x, gaussian_centers(), _GAUSS_STD)


def mixture_sample_labeled(means: Tensor, std: float, n: int,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Exact labelled samples of an equal-weight isotropic Gaussian mixture.

    The generic form of ``8gaussians`` for experiments that need a mixture of their own
    (e.g. overlapping classes, whose Bayes accuracy is below 1).

    Args:
        means: ``[K, d]`` component means.
        std: Component standard deviation.
        n: Number of samples.
        generator: Source of randomness.

    Returns:
        ``(x [n, d] float32, y [n] int64)``, y the component.
    """
    _check_n(n)
    y = torch.randint(0, means.shape[0], (n,), generator=generator)
    x = means.float()[y] + std * torch.randn(n, means.shape[1], generator=generator)
    return x, y


def mixture_class_log_posterior(x: Tensor, means: Tensor, std: float) -> Tensor:
    """``log p(k | x)`` of an equal-weight isotropic Gaussian mixture, ``[n, K]`` (Bayes' rule).

    Its argmax is the Bayes-optimal classifier; at a point of the data its value is the best
    achievable confidence.
    """
    lp = _component_log_prob(x, means, std)
    return lp - torch.logsumexp(lp, dim=1, keepdim=True)


def _board_cell(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Column, row (floored, may be outside 0..3) and whether the point lies on the board."""
    col = torch.floor(x[:, 0] + 2.0).long()
    row = torch.floor(x[:, 1] + 2.0).long()
    inside = (col >= 0) & (col <= 3) & (row >= 0) & (row <= 3)
    return col, row, inside


def log_prob(name: str, x: Tensor) -> Tensor:
    """Exact log-density of ``name`` at points ``x``.

    Args:
        name: ``"8gaussians"`` or ``"checkerboard"`` (the densities with a closed form).
        x: ``[n, 2]`` points.

    Returns:
        ``[n]`` log-densities in ``x``'s dtype (``-inf`` off the checkerboard's dark squares).

    Raises:
        NotImplementedError: for ``two_moons`` and ``swiss_roll`` (noise convolved with a
            curve has no closed-form density).
    """
    _check_name(name)
    _check_points(x)
    if name == "8gaussians":
        # p(x) = (1/8) Σ_k N(x; μ_k, σ²I)
        return torch.logsumexp(_gauss_component_log_prob(x), dim=1) - math.log(8)
    if name == "checkerboard":
        col, row, inside = _board_cell(x)
        dark = inside & ((col + row) % 2 == 0)
        # uniform on 8 unit squares: p = 1/8 on the dark squares, 0 elsewhere
        return torch.where(dark, torch.full_like(x[:, 0], -math.log(8)),
                           torch.full_like(x[:, 0], -math.inf))
    raise NotImplementedError(f"density {name!r} has no closed-form log-density; "
                              "log_prob exists for '8gaussians' and 'checkerboard'")


def classify(name: str, x: Tensor, nearest: bool = False) -> Tensor:
    """Bayes-optimal class of each point under the true labelled density.

    For ``8gaussians`` the most probable component (the nearest centre); for
    ``checkerboard`` the dark square the point lies in, and for points on a light square or
    off the board ``-1`` (so they count as wrong for any target class) — or, with
    ``nearest=True``, the dark square at the smallest Euclidean distance (a total classifier
    that labels every point, as an image classifier labels every image).

    Args:
        name: ``"8gaussians"`` or ``"checkerboard"``.
        x: ``[n, 2]`` points.
        nearest: Checkerboard only: label off-support points by the nearest dark square.

    Returns:
        ``[n]`` int64 labels.

    Raises:
        NotImplementedError: for densities without an exact labelled density.
    """
    _check_name(name)
    _check_points(x)
    if name == "8gaussians":
        return _gauss_component_log_prob(x).argmax(dim=1)
    if name == "checkerboard":
        if nearest:
            ids = torch.arange(8)
            row = ids // 2
            lo = torch.stack([2 * (ids % 2) + row % 2, row], dim=1).to(x) - 2.0  # [8, 2]
            # Euclidean distance from each point to each dark unit square (0 inside)
            gap = torch.clamp(lo[None] - x[:, None], min=0) + torch.clamp(
                x[:, None] - (lo[None] + 1.0), min=0)
            return gap.square().sum(-1).argmin(dim=1)
        col, row, inside = _board_cell(x)
        dark = inside & ((col + row) % 2 == 0)
        return torch.where(dark, row * 2 + col // 2, torch.full_like(row, -1))
    raise NotImplementedError(f"density {name!r} has no exact class posterior; classify "
                              "exists for '8gaussians' and 'checkerboard'")


def entropy(name: str, n: int = 200_000, generator: torch.Generator | None = None) -> float:
    """Differential entropy ``H = -E[log p(x)]`` of ``name`` in nats.

    Exact for ``checkerboard`` (``log 8``); a Monte-Carlo estimate from ``n`` exact samples for
    ``8gaussians`` (standard error ≈ 1e-3 at the default ``n``).

    Raises:
        NotImplementedError: for densities without a closed-form log-density.
    """
    _check_name(name)
    if name == "checkerboard":
        return math.log(8)
    if name == "8gaussians":
        x = sample(name, n, generator).double()
        return float(-log_prob(name, x).mean())
    raise NotImplementedError(f"density {name!r} has no closed-form log-density, so no "
                              "entropy; entropy exists for '8gaussians' and 'checkerboard'")
