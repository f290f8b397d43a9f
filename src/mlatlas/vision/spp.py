"""Spatial pyramid pooling: a fixed-length vector from a feature map of any size.

SPP-net (He, Zhang, Ren, Sun 2014, arXiv:1406.4729) replaces the last pooling layer of a CNN
by max-pooling over an ``n × n`` grid of bins for each pyramid level ``n`` (1, 2, 4 here) and
concatenates the results, so the fully connected layers see ``C·Σ n²`` numbers whatever the
input size: the network trains and tests on images at their own sizes instead of warping
them to one. The paper sizes level ``n``'s bins on an ``a × a`` map with a sliding window of
``⌈a/n⌉`` and a stride of ``⌊a/n⌋`` (rule ``"he"``); adaptive pooling (PyTorch's
``adaptive_max_pool2d``) uses bins ``[⌊i·a/n⌋, ⌈(i+1)·a/n⌉)`` (rule ``"adaptive"``). The two
agree when ``n`` divides ``a``; otherwise the paper's last bins stop short of the border
(for ``a = 7, n = 4``: bins ``[0,2) [1,3) [2,4) [3,5)``, columns 5 and 6 unseen).

=========  ============================================================================
x          ``[B, C, H, W]`` feature map
n          a pyramid level: ``n × n`` bins
bin i      rows ``[start_i, end_i)`` (and columns alike)
out        ``[B, C·Σ_n n²]``: level by level, each ``[B, C, n, n]`` flattened channel-major
=========  ============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["RULES", "SpatialPyramidPooling", "pyramid_bins", "spatial_pyramid_pool"]

RULES = ("he", "adaptive")


def pyramid_bins(size: int, n: int, rule: str = "he") -> list[tuple[int, int]]:
    """The ``n`` bins ``[start, end)`` of one axis of length ``size``.

    Args:
        size: Feature-map length ``a`` (``>= n``).
        n: Pyramid level.
        rule: ``"he"`` (window ``⌈a/n⌉``, stride ``⌊a/n⌋``) or ``"adaptive"``.

    Raises:
        ValueError: unknown rule, ``n < 1`` or ``size < n``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if n < 1 or size < n:
        raise ValueError(f"feature map size {size} is below the pyramid level {n}: every one "
                         f"of the {n} bins needs at least one pixel (need size >= {n})")
    if rule == "he":
        win, stride = math.ceil(size / n), size // n  # the paper's window and stride
        return [(i * stride, i * stride + win) for i in range(n)]
    return [((i * size) // n, -((-(i + 1) * size) // n)) for i in range(n)]


def _pool_axis(x: Tensor, dim: int, bins: list[tuple[int, int]], mode: str) -> Tensor:
    parts = []
    for start, end in bins:
        piece = x.narrow(dim, start, end - start)
        # max via values of max(dim): the gradient goes to one (the first) maximum, as
        # adaptive_max_pool2d's; two passes (columns, then rows) pick the row-major first
        parts.append(piece.max(dim).values if mode == "max" else piece.mean(dim))
    return torch.stack(parts, dim)


def spatial_pyramid_pool(x: Tensor, levels: Sequence[int] = (1, 2, 4), mode: str = "max",
                         rule: str = "he") -> Tensor:
    """Pool ``[B, C, H, W]`` over each level's ``n × n`` bins and concatenate.

    Args:
        x: Feature map ``[B, C, H, W]``; ``H, W >= max(levels)``.
        levels: Pyramid levels ``n``.
        mode: ``"max"`` (the paper) or ``"avg"``.
        rule: Bin rule, ``"he"`` or ``"adaptive"`` (see the module docstring).

    Returns:
        ``[B, C·Σ n²]``.

    Raises:
        ValueError: not 4-D, empty ``levels``, unknown mode/rule, or a map smaller than the
            finest level.
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a [B, C, H, W] tensor, got {got}")
    if not levels or any(int(n) < 1 for n in levels):
        raise ValueError(f"levels must be positive ints, got {tuple(levels)}")
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    h, w = x.shape[-2:]
    out = []
    for n in levels:
        rows, cols = pyramid_bins(h, int(n), rule), pyramid_bins(w, int(n), rule)
        pooled = _pool_axis(_pool_axis(x, 3, cols, mode), 2, rows, mode)  # [B, C, n, n]
        out.append(pooled.flatten(1))
    return torch.cat(out, 1)


class SpatialPyramidPooling(nn.Module):
    """:func:`spatial_pyramid_pool` as a layer; ``output_dim(C)`` gives ``C·Σ n²``."""

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max", rule: str = "he"):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.levels, self.mode, self.rule = tuple(int(n) for n in levels), mode, rule

    def output_dim(self, channels: int) -> int:
        return channels * sum(n * n for n in self.levels)

    def forward(self, x: Tensor) -> Tensor:
        return spatial_pyramid_pool(x, self.levels, self.mode, self.rule)
