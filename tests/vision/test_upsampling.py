"""Upsampling: values and gradients vs F.interpolate (nearest, nearest-exact, bilinear,
bicubic, both align_corners), nn.ConvTranspose2d, PixelShuffle/Unshuffle and MaxUnpool2d;
the checkerboard measure; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.vision.upsampling import (
    ResizeConv2d,
    TransposedConv2d,
    checkerboard_energy,
    conv_transpose2d,
    interpolate,
    max_unpool2d,
    pixel_shuffle,
    pixel_unshuffle,
)

ATOL = 1e-5  # fp32; bicubic sums 16 weighted taps


def _grads_match(ours, ref, inputs, atol=ATOL):
    torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-5)
    cot = torch.randn(ours.shape, generator=torch.Generator().manual_seed(9))
    g1 = torch.autograd.grad(ours, inputs, cot, retain_graph=True)
    g2 = torch.autograd.grad(ref, inputs, cot, retain_graph=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


CASES = [  # (size, scale_factor)
    ((14, 22), None), ((5, 3), None), ((7, 9), None), (None, 2.0), (None, 1.7), (None, (3.0, 0.6)),
]


@pytest.mark.parametrize("mode,align", [("nearest", None), ("nearest-exact", None),
                                        ("bilinear", False), ("bilinear", True),
                                        ("bicubic", False), ("bicubic", True)])
@pytest.mark.parametrize("size,scale", CASES)
def test_interpolate_matches_torch(mode, align, size, scale):
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ours = interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=align)
    ref = F.interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=align)
    _grads_match(ours, ref, (x,))


def test_interpolate_float64_exact():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for mode in ("bilinear", "bicubic"):
        torch.testing.assert_close(interpolate(x, size=(11, 13), mode=mode, align_corners=False),
                                   F.interpolate(x, size=(11, 13), mode=mode,
                                                 align_corners=False), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k,s,p,op,g,d", [(4, 2, 1, 0, 1, 1), (3, 2, 1, 1, 1, 1), (3, 3, 0, 2, 1, 1),
                                          (5, 2, 2, 1, 2, 1), (3, 1, 1, 0, 3, 2), (2, 2, 0, 0, 1, 1)])
def test_conv_transpose_matches_torch(k, s, p, op, g, d):
    torch.manual_seed(0)
    c_out = 9 if g != 2 else 8  # divisible by the groups
    ref = nn.ConvTranspose2d(6, c_out, k, s, p, op, groups=g, dilation=d)
    ours = TransposedConv2d(6, c_out, k, s, p, op, groups=g, dilation=d)
    sd = ref.state_dict()
    missing, unexpected = ours.load_state_dict({"weight": sd["weight"], "bias": sd["bias"]},
                                               strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(2), requires_grad=True)
    a, b = ours(x), ref(x)
    _grads_match(a, b, (x,))
    cot = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    gw1 = torch.autograd.grad(a, (ours.weight, ours.bias), cot)
    gw2 = torch.autograd.grad(b, (ref.weight, ref.bias), cot)
    for u, v in zip(gw1, gw2):
        torch.testing.assert_close(u, v, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_pixel_shuffle_roundtrip_and_parity(r):
    x = torch.randn(2, 5 * r * r, 3, 4, generator=torch.Generator().manual_seed(r),
                    requires_grad=True)
    _grads_match(pixel_shuffle(x, r), nn.PixelShuffle(r)(x), (x,), atol=0)
    y = torch.randn(2, 5, 3 * r, 4 * r, generator=torch.Generator().manual_seed(r),
                    requires_grad=True)
    _grads_match(pixel_unshuffle(y, r), nn.PixelUnshuffle(r)(y), (y,), atol=0)
    torch.testing.assert_close(pixel_unshuffle(pixel_shuffle(x, r), r), x, atol=0, rtol=0)


@pytest.mark.parametrize("k,s,p,size", [(2, 2, 0, (11, 13)), (3, 2, 1, (9, 7)), (3, 3, 0, (9, 12)),
                                         (2, 2, 0, (10, 6))])
def test_max_unpool_matches_torch(k, s, p, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    pooled, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    pooled.requires_grad_(True)
    ours = max_unpool2d(pooled, idx, k, s, p, output_size=size)
    ref = nn.MaxUnpool2d(k, s, p)(pooled, idx, output_size=size)
    _grads_match(ours, ref, (pooled,), atol=0)
    if all((n + 2 * p - k) % s == 0 for n in size):  # the default size is the input's
        default = max_unpool2d(pooled, idx, k, s, p)
        torch.testing.assert_close(default, F.max_unpool2d(pooled, idx, k, s, p), atol=0, rtol=0)


def test_checkerboard_energy():
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    stripes = torch.arange(8)[None].repeat(8, 1) % 2
    smooth = torch.linspace(0, 1, 8)[None].repeat(8, 1)
    imgs = torch.stack([checker, stripes, smooth]).float()[:, None]
    e = checkerboard_energy(imgs)
    assert e[0] == pytest.approx(1.0) and e[1] == pytest.approx(1.0) and e[2] < 0.05
    # nearest ×2 of anything has no energy at Nyquist
    up = interpolate(torch.randn(3, 2, 5, 6, generator=torch.Generator().manual_seed(0)),
                     scale_factor=2.0)
    assert float(checkerboard_energy(up).max()) < 1e-20
    assert ResizeConv2d(2, 4)(torch.randn(1, 2, 5, 6)).shape == (1, 4, 10, 12)


def test_bad_input():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="mode must be one of"):
        interpolate(x, size=7, mode="area")
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        interpolate(x)
    with pytest.raises(ValueError, match="align_corners only applies"):
        interpolate(x, size=7, mode="nearest", align_corners=True)
    with pytest.raises(ValueError, match=r"input must be a \[B, C, H, W\] tensor, got \(4, 5, 5\)"):
        interpolate(x[0], size=7)
    with pytest.raises(ValueError, match="channels must be divisible by r²=9, got C=4"):
        pixel_shuffle(x, 3)
    with pytest.raises(ValueError, match="divisible by r=2"):
        pixel_unshuffle(x, 2)
    with pytest.raises(ValueError, match="weight must be"):
        conv_transpose2d(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="output_padding must be smaller"):
        conv_transpose2d(x, torch.randn(4, 2, 3, 3), stride=2, output_padding=2)
    with pytest.raises(ValueError, match="indices must lie in"):
        max_unpool2d(x, torch.full(x.shape, 999, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="even H and W"):
        checkerboard_energy(x)
