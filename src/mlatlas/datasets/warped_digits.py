"""Handwritten digits under random affine and elastic warps: a task whose geometry varies.

The 8×8 scikit-learn digits (:mod:`mlatlas.datasets.digits`) are enlarged to ``content``
pixels, centred on a ``size × size`` canvas and warped, each by its own random transform:
rotation, anisotropic scale, shear and translation (an affine map), then an elastic field
(uniform noise smoothed by a Gaussian, Simard, Steinkraus, Platt 2003), sampled bilinearly.
Train and test images come from the two halves of the fixed digits split, so a test digit
was never seen, warped or not. Deterministic per seed.

=============  ===========================================================================
``x``          ``[n, 1, size, size]`` float32 in ``[0, 1]``
``y``          ``[n]`` int64 digit 0..9
rotation       uniform in ``±max_rotation`` degrees
scale          log-uniform in ``scale`` per axis;  shear uniform in ``±max_shear``
elastic        displacement field with per-pixel std ``elastic_px`` (pixels), smoothness
               ``elastic_sigma`` (pixels)
=============  ===========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mlatlas.datasets.digits import load_digits

__all__ = ["WarpSpec", "warped_digits"]


@dataclass(frozen=True)
class WarpSpec:
    """How strongly digits are warped (see the module table)."""

    size: int = 32
    content: int = 20
    max_rotation: float = 45.0
    scale: tuple[float, float] = (0.7, 1.3)
    max_shear: float = 0.3
    max_shift: float = 3.0
    elastic_px: float = 1.5
    elastic_sigma: float = 3.0

    def __post_init__(self) -> None:
        if not 8 <= self.content <= self.size:
            raise ValueError(f"need 8 <= content <= size, got {self.content} and {self.size}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if self.elastic_px < 0 or self.elastic_sigma <= 0:
            raise ValueError(f"elastic_px must be >= 0 and elastic_sigma > 0, got "
                             f"{self.elastic_px}, {self.elastic_sigma}")


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = int(math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(
        c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(
        c, 1, 1, 1), groups=c)


def warped_digits(split: str = "train", n: int = 1000, spec: WarpSpec | None = None,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` warped digits drawn (with replacement) from ``split`` of the digits.

    Args:
        split: ``"train"`` or ``"test"`` half of the fixed digits split.
        n: Number of images.
        spec: Warp strengths; default :class:`WarpSpec`.
        seed: Seeds which digits are drawn and their warps.

    Returns:
        ``(x [n, 1, size, size], y [n])``.

    Raises:
        ValueError: unknown split or ``n < 1``.
    """
    spec = WarpSpec() if spec is None else spec
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    digits, labels = load_digits(split, scale="[0,1]")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(labels), (n,), generator=g)
    big = F.interpolate(digits[pick], size=(spec.content, spec.content), mode="bilinear",
                        align_corners=False)
    pad = spec.size - spec.content
    canvas = F.pad(big, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    angle = uniform(-spec.max_rotation, spec.max_rotation, n) * math.pi / 180
    log_lo, log_hi = math.log(spec.scale[0]), math.log(spec.scale[1])
    sx, sy = torch.exp(uniform(log_lo, log_hi, n)), torch.exp(uniform(log_lo, log_hi, n))
    shear = uniform(-spec.max_shear, spec.max_shear, n)
    shift = uniform(-spec.max_shift, spec.max_shift, n, 2) * 2 / spec.size  # normalised
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output → input map: the inverse of rotate·shear·scale (so content is scaled by s)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shr = torch.stack([torch.stack([torch.ones(n), shear], 1),
                       torch.stack([torch.zeros(n), torch.ones(n)], 1)], 1)
    scl = torch.diag_embed(torch.stack([sx, sy], 1))
    inv = torch.linalg.inv(rot @ shr @ scl)
    theta = torch.cat([inv, shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    if spec.elastic_px > 0:
        field = _gaussian_blur(uniform(-1, 1, n, 2, spec.size, spec.size), spec.elastic_sigma)
        field = field / field.std((1, 2, 3), keepdim=True).clamp_min(1e-8)
        grid = grid + (field * spec.elastic_px * 2 / spec.size).permute(0, 2, 3, 1)
    x = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x.clamp(0, 1), labels[pick]
