"""Deformable convolution v1 / modulated v2 vs torchvision.ops.deform_conv2d: outputs and
gradients for input, weight, bias, offsets and mask over stride, padding, dilation, groups,
offset groups and odd sizes; zero offsets = conv2d; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlatlas.vision.deform_conv import DeformConv2d, OffsetDeformConv2d, deform_conv2d

# (C_in, C_out, k, stride, padding, dilation, groups, offset_groups, H, W)
CASES = [
    (3, 5, 3, 1, 1, 1, 1, 1, 7, 9),
    (4, 6, 3, 2, 1, 1, 2, 2, 9, 7),
    (6, 4, 3, 1, 2, 2, 1, 3, 11, 10),
    (2, 3, (2, 3), (2, 1), (0, 1), (1, 2), 1, 1, 8, 9),
    (6, 6, 1, 1, 0, 1, 3, 2, 5, 5),
    (4, 2, 5, 3, 2, 1, 2, 4, 13, 11),
]


def _make(case, dtype, modulated, seed=0):
    c_in, c_out, k, s, p, d, g, og, h, w = case
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (s, s) if isinstance(s, int) else s
    ph, pw = (p, p) if isinstance(p, int) else p
    dh, dw = (d, d) if isinstance(d, int) else d
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, h, w, generator=gen, dtype=dtype)
    offset = torch.randn(2, 2 * og * kh * kw, ho, wo, generator=gen, dtype=dtype) * 2.0
    weight = torch.randn(c_out, c_in // g, kh, kw, generator=gen, dtype=dtype)
    bias = torch.randn(c_out, generator=gen, dtype=dtype)
    mask = torch.rand(2, og * kh * kw, ho, wo, generator=gen, dtype=dtype) if modulated else None
    return dict(x=x, offset=offset, weight=weight, bias=bias, mask=mask,
                stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))


def _run(fn, t):
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()
              if isinstance(v, torch.Tensor)}
    out = fn(leaves["x"], leaves["offset"], leaves["weight"], leaves["bias"],
             stride=t["stride"], padding=t["padding"], dilation=t["dilation"],
             mask=leaves.get("mask"))
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), cot)
    return out, dict(zip(leaves, grads))


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_torchvision(reference, case, modulated, dtype, atol):
    tv = reference("torchvision")
    t = _make(case, dtype, modulated)
    out, grads = _run(deform_conv2d, t)
    ref, ref_grads = _run(tv.ops.deform_conv2d, t)
    # fp32: sums of up to C·K products of O(1) values; rtol covers the summation order
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5 if dtype == torch.float32 else 0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol,
                                   rtol=1e-5 if dtype == torch.float32 else 0,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_zero_offsets_is_conv2d_and_modules():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 7, generator=gen)
    layer = DeformConv2d(4, 6, 3, stride=2, padding=1, groups=2)
    zeros = torch.zeros(2, 18, 5, 4)
    ref = F.conv2d(x, layer.weight, layer.bias, stride=2, padding=1, groups=2)
    torch.testing.assert_close(layer(x, zeros), ref, atol=1e-5, rtol=1e-5)
    # a fresh offset-predicting layer starts as a plain conv; v2 starts with masks of 0.5
    for modulated, scale in ((False, 1.0), (True, 0.5)):
        od = OffsetDeformConv2d(4, 6, 3, padding=1, offset_groups=2, modulated=modulated)
        out, off = od(x, return_offset=True)
        plain = F.conv2d(x, od.conv.weight, None, padding=1) * scale + od.conv.bias[:, None, None]
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
        assert off.shape == (2, 36, 9, 7) and not off.any()


def test_integer_offsets_shift_the_input():
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    w = torch.ones(1, 1, 1, 1)
    off = torch.zeros(1, 2, 6, 6)
    off[:, 0], off[:, 1] = 1.0, -2.0  # read x[h+1, w−2]
    out = deform_conv2d(x, off, w)
    torch.testing.assert_close(out[0, 0, :5, 2:], x[0, 0, 1:, :4], atol=0, rtol=0)
    assert not out[0, 0, 5].any() and not out[0, 0, :, :2].any()  # outside: zero


def test_bad_input():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(5, 4, 3, 3)
    with pytest.raises(ValueError, match=r"offset must be \[B=1, 2·G·kh·kw .*got \(1, 17, 4, 4\)"):
        deform_conv2d(x, torch.zeros(1, 17, 4, 4), w)
    with pytest.raises(ValueError, match=r"H'=4, W'=4\], got \(1, 18, 6, 6\)"):
        deform_conv2d(x, torch.zeros(1, 18, 6, 6), w)
    with pytest.raises(ValueError, match="G dividing C=4"):
        deform_conv2d(x, torch.zeros(1, 54, 4, 4), w)  # 3 offset groups for 4 channels
    with pytest.raises(ValueError, match=r"mask must be \[B, G·kh·kw, H', W'\]"):
        deform_conv2d(x, torch.zeros(1, 18, 4, 4), w, mask=torch.ones(1, 18, 4, 4))
    with pytest.raises(ValueError, match="input channels 4 must be a multiple of weight.shape"):
        deform_conv2d(x, torch.zeros(1, 18, 4, 4), torch.randn(5, 3, 3, 3))
    with pytest.raises(ValueError, match="input must be a 4-D tensor"):
        deform_conv2d(x[0], torch.zeros(1, 18, 4, 4), w)
    with pytest.raises(ValueError, match="output would be empty"):
        deform_conv2d(torch.randn(1, 4, 2, 2), torch.zeros(1, 18, 1, 1), w)
