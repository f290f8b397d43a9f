"""RoI pooling, PS-RoI pooling and RoIAlign vs torchvision.ops (values and gradients): random,
tiny, out-of-image and negative boxes, spatial scales, adaptive and fixed sampling, aligned;
the one place torchvision's ps_roi_pool backward departs from its own forward; bad input."""

from __future__ import annotations

import pytest
import torch

from mlatlas.vision.roi_pool import ps_roi_pool, roi_align, roi_pool

ATOL = 1e-5  # fp32


def _rois(n_img: int, r: int, extent: float, gen: torch.Generator, dtype=torch.float32):
    xy = torch.rand(r, 2, generator=gen, dtype=dtype) * extent * 1.1 - extent * 0.1
    wh = torch.rand(r, 2, generator=gen, dtype=dtype) * extent * 0.7
    idx = torch.randint(0, n_img, (r, 1), generator=gen).to(dtype)
    rois = torch.cat([idx, xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([3.0, 2.0, 3.2, 2.1])  # tiny: forced to 1×1
    rois[1, 1:] = torch.tensor([-9.0, -9.0, -2.0, -3.0])  # outside the image: empty bins
    return rois


def _compare(ours_fn, ref_fn, x, rois, atol=ATOL, grad=True):
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ours_fn(xa, rois), ref_fn(xb, rois)
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    if grad:
        cot = torch.randn(a.shape, generator=torch.Generator().manual_seed(11), dtype=a.dtype)
        ga, = torch.autograd.grad(a, xa, cot)
        gb, = torch.autograd.grad(b, xb, cot)
        torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("out,scale", [((7, 7), 1.0), ((3, 5), 0.5), ((2, 2), 0.25)])
def test_roi_pool_matches_torchvision(reference, out, scale):
    tv = reference("torchvision")
    gen = torch.Generator().manual_seed(int(scale * 8) + out[0])
    x = torch.randn(2, 5, 13, 11, generator=gen)
    rois = _rois(2, 23, 12 / scale, gen)
    _compare(lambda a, r: roi_pool(a, r, out, scale), lambda a, r: tv.ops.roi_pool(a, r, out,
                                                                                   scale), x, rois)


def test_roi_pool_ties_and_box_lists(reference):
    tv = reference("torchvision")
    x = torch.zeros(2, 3, 6, 7)  # every bin tied: the gradient goes to the first maximum
    x[0, :, 2:, 3:] = 1.0
    boxes = [torch.tensor([[0.0, 0, 6, 5], [1.0, 1, 4, 4]]), torch.tensor([[2.0, 0, 6, 3]])]
    rois = torch.tensor([[0.0, 0, 0, 6, 5], [0, 1, 1, 4, 4], [1, 2, 0, 6, 3]])
    _compare(lambda a, r: roi_pool(a, boxes, 3), lambda a, r: tv.ops.roi_pool(a, r, 3), x, rois,
             atol=0)


@pytest.mark.parametrize("k,scale", [(3, 1.0), (2, 0.5), ((2, 3), 0.25)])
def test_ps_roi_pool_values_match_torchvision(reference, k, scale):
    tv = reference("torchvision")
    ph, pw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(ph * 10 + pw)
    x = torch.randn(2, 4 * ph * pw, 11, 13, generator=gen)
    rois = _rois(2, 31, 12 / scale, gen)
    _compare(lambda a, r: ps_roi_pool(a, r, k, scale),
             lambda a, r: tv.ops.ps_roi_pool(a, r, k, scale), x, rois, grad=False)


@pytest.mark.parametrize("k", [3, (2, 3)])
def test_ps_roi_pool_gradients_match_inside_the_map(reference, k):
    tv = reference("torchvision")
    ph, pw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3 * ph * pw, 12, 14, generator=gen)
    xy = torch.rand(17, 2, generator=gen) * 5
    rois = torch.cat([torch.randint(0, 2, (17, 1), generator=gen).float(), xy,
                      xy + torch.rand(17, 2, generator=gen) * 5 + 0.5], 1)  # ends < 11
    _compare(lambda a, r: ps_roi_pool(a, r, k), lambda a, r: tv.ops.ps_roi_pool(a, r, k), x, rois)


def test_ps_roi_pool_gradient_is_its_forwards_at_the_border(reference):
    tv = reference("torchvision")
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], dtype=torch.float64)  # reaches row/col 5
    ours = ps_roi_pool(x, rois, 2)
    torch.testing.assert_close(ours, tv.ops.ps_roi_pool(x, rois, 2), atol=1e-12, rtol=0)
    g_ours, = torch.autograd.grad(ours.sum(), x)
    g_ref, = torch.autograd.grad(tv.ops.ps_roi_pool(x, rois, 2).sum(), x)
    eps, fd = 1e-6, torch.zeros_like(x)
    for i in range(x.numel()):  # central differences of the (shared) forward
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = eps
        fd.view(-1)[i] = (ps_roi_pool(x.detach() + e.view_as(x), rois, 2).sum()
                          - ps_roi_pool(x.detach() - e.view_as(x), rois, 2).sum()) / (2 * eps)
    torch.testing.assert_close(g_ours, fd, atol=1e-8, rtol=0)
    assert float((g_ref - fd).abs().max()) > 0.5  # torchvision's backward clips at 5, not 4


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling,scale,out", [(-1, 1.0, (7, 7)), (2, 0.5, (3, 4)),
                                                (0, 0.25, (2, 2)), (3, 1.0, (1, 5))])
def test_roi_align_matches_torchvision(reference, aligned, sampling, scale, out):
    tv = reference("torchvision")
    gen = torch.Generator().manual_seed(sampling + 7)
    x = torch.randn(2, 3, 10, 13, generator=gen)
    rois = _rois(2, 19, 12 / scale, gen)
    _compare(lambda a, r: roi_align(a, r, out, scale, sampling, aligned),
             lambda a, r: tv.ops.roi_align(a, r, out, scale, sampling, aligned), x, rois)


def test_roi_align_float64(reference):
    tv = reference("torchvision")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 9, 9, generator=gen, dtype=torch.float64)
    rois = _rois(1, 11, 9, gen, torch.float64)
    _compare(lambda a, r: roi_align(a, r, 3, 1.0, -1, True),
             lambda a, r: tv.ops.roi_align(a, r, 3, 1.0, -1, True), x, rois, atol=1e-12)


def test_empty_and_bad_input():
    x = torch.randn(2, 8, 6, 6)
    none = torch.zeros(0, 5)
    assert roi_pool(x, none, 2).shape == (0, 8, 2, 2)
    assert ps_roi_pool(x, none, 2).shape == (0, 2, 2, 2)
    assert roi_align(x, none, 2).shape == (0, 8, 2, 2)
    with pytest.raises(ValueError, match="channels must be a multiple of ph·pw = 9, got 8"):
        ps_roi_pool(x, torch.tensor([[0.0, 0, 0, 4, 4]]), 3)
    with pytest.raises(ValueError, match=r"boxes must be \[R, 5\]"):
        roi_pool(x, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match=r"boxes\[1\] must be \[R_n, 4\]"):
        roi_align(x, [torch.zeros(1, 4), torch.zeros(2, 5)], 2)
    with pytest.raises(ValueError, match=r"image indices must lie in \[0, 1\]"):
        roi_pool(x, torch.tensor([[2.0, 0, 0, 4, 4]]), 2)
    with pytest.raises(TypeError, match="boxes must have the input's dtype"):
        roi_align(x, torch.zeros(1, 5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"input must be \[N, C, H, W\]"):
        roi_pool(x[0], torch.zeros(1, 5), 2)
