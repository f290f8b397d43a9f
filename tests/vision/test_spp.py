"""SPP: the adaptive rule equals adaptive_max_pool2d / adaptive_avg_pool2d (values and
gradients) at every size; He et al.'s window/stride rule equals max_pool2d(⌈a/n⌉, ⌊a/n⌋) and
agrees with adaptive pooling when n divides the size; fixed length for any size; bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlatlas.vision.spp import SpatialPyramidPooling, pyramid_bins, spatial_pyramid_pool

LEVELS = (1, 2, 4)


def _reference(x, levels, mode):
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(x, n).flatten(1) for n in levels], 1)


def _check(ours, ref, x, atol=1e-6):
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    cot = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5))
    g1, = torch.autograd.grad(ours, x, cot, retain_graph=True)
    g2, = torch.autograd.grad(ref, x, cot, retain_graph=True)
    torch.testing.assert_close(g1, g2, atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("h,w", [(4, 4), (5, 7), (13, 13), (9, 11), (16, 6)])
def test_adaptive_rule_matches_torch(mode, h, w):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w), requires_grad=True)
    _check(spatial_pyramid_pool(x, LEVELS, mode, rule="adaptive"), _reference(x, LEVELS, mode), x)


@pytest.mark.parametrize("h,w", [(4, 4), (5, 7), (13, 13), (10, 9), (16, 8)])
def test_he_rule_is_the_window_stride_pool(h, w):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h + w), requires_grad=True)
    parts = []
    for n in LEVELS:
        k = (math.ceil(h / n), math.ceil(w / n))
        s = (h // n, w // n)
        parts.append(F.max_pool2d(x, k, s)[..., :n, :n].flatten(1))  # the first n × n windows
    _check(spatial_pyramid_pool(x, LEVELS, rule="he"), torch.cat(parts, 1), x)
    if h % 4 == 0 and w % 4 == 0:  # every level divides the size: both rules coincide
        _check(spatial_pyramid_pool(x, LEVELS, rule="he"), _reference(x, LEVELS, "max"), x)


def test_bins_and_fixed_length():
    assert pyramid_bins(13, 4, "he") == [(0, 4), (3, 7), (6, 10), (9, 13)]  # the paper's 13×13
    assert pyramid_bins(7, 4, "he") == [(0, 2), (1, 3), (2, 4), (3, 5)]  # 5, 6 not covered
    assert pyramid_bins(7, 4, "adaptive") == [(0, 2), (1, 4), (3, 6), (5, 7)]
    layer = SpatialPyramidPooling(LEVELS)
    for size in [(4, 4), (11, 6), (30, 17)]:
        assert layer(torch.randn(3, 5, *size)).shape == (3, layer.output_dim(5)) == (3, 105)


def test_ties_route_gradient_to_the_first_maximum():
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)  # all tied (a ReLU map of zeros)
    ours = spatial_pyramid_pool(x, (1, 2), rule="adaptive")
    ref = _reference(x, (1, 2), "max")
    _check(ours, ref, x, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="feature map size 3 is below the pyramid level 4"):
        spatial_pyramid_pool(torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="rule must be one of"):
        spatial_pyramid_pool(torch.randn(1, 2, 8, 8), rule="caffe")
    with pytest.raises(ValueError, match=r"x must be a \[B, C, H, W\] tensor, got \(2, 8, 8\)"):
        spatial_pyramid_pool(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="mode must be 'max' or 'avg'"):
        spatial_pyramid_pool(torch.randn(1, 2, 8, 8), mode="sum")
    with pytest.raises(ValueError, match="levels must be positive ints"):
        spatial_pyramid_pool(torch.randn(1, 2, 8, 8), levels=(0, 2))
