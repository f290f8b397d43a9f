"""SimCC: targets are normalised Gaussians centred on the keypoint (sub-bin accurate), the KL
loss equals torch's KLDivLoss and vanishes at the target, decoding inverts the targets to the
bin size, gradients flow through the head; the heatmap baseline's targets peak at the right
cell and its argmax + quarter-offset decoding is within a quarter cell (vs a brute-force
reference); the data's keypoints are where they are drawn; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from mlatlas.datasets.keypoint_scenes import make_keypoint_images, make_stick_figures
from mlatlas.vision.simcc import (
    HeatmapHead,
    SimCCHead,
    heatmap_decode,
    heatmap_targets,
    simcc_decode,
    simcc_loss,
    simcc_targets,
)


def _kp(seed=0, b=3, k=5, size=30):
    gen = torch.Generator().manual_seed(seed)
    return 1 + torch.rand(b, k, 2, generator=gen, dtype=torch.float64) * (size - 2)


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_targets_are_gaussians_centred_on_the_keypoint(k):
    kp = _kp()
    tx, ty = simcc_targets(kp, (30, 26), split_ratio=k, sigma=1.5)
    assert tx.shape == (3, 5, int(26 * k)) and ty.shape == (3, 5, int(30 * k))
    torch.testing.assert_close(tx.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    centres = (torch.arange(tx.shape[-1], dtype=torch.float64) + 0.5) / k
    inside = (kp[..., 0] > 5) & (kp[..., 0] < 21)  # Gaussian not cut by the border
    mean = (tx * centres).sum(-1)
    torch.testing.assert_close(mean[inside], kp[..., 0][inside], atol=1e-3, rtol=0)  # tails cut


def test_loss_is_kl_divergence_and_zero_at_the_target():
    gen = torch.Generator().manual_seed(1)
    lx = torch.randn(2, 4, 52, generator=gen, requires_grad=True)
    ly = torch.randn(2, 4, 60, generator=gen, requires_grad=True)
    tx, ty = simcc_targets(_kp(1, 2, 4).float(), (30, 26), 2.0, 1.0)
    kl = torch.nn.KLDivLoss(reduction="none")
    ref = (kl(lx.log_softmax(-1), tx).sum(-1) + kl(ly.log_softmax(-1), ty).sum(-1)).mean()
    ours = simcc_loss(lx, ly, tx, ty)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    g1 = torch.autograd.grad(ours, (lx, ly), retain_graph=True)
    g2 = torch.autograd.grad(ref, (lx, ly))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert simcc_loss(tx.clamp_min(1e-30).log(), ty.clamp_min(1e-30).log(), tx, ty).abs() < 1e-5


@pytest.mark.parametrize("k", [1.0, 2.0, 4.0])
def test_decoding_inverts_the_targets_to_half_a_bin(k):
    kp = _kp(2).float()
    tx, ty = simcc_targets(kp, (30, 30), k, 1.0)
    err = (simcc_decode(tx.log(), ty.log(), k) - kp).abs()
    assert err.max() <= 0.5 / k + 1e-5


def test_head_shapes_and_gradients():
    head = SimCCHead(16, (3, 5), num_keypoints=4, input_size=(24, 40), split_ratio=2.0)
    x = torch.randn(2, 16, 3, 5, requires_grad=True)
    lx, ly = head(x)
    assert lx.shape == (2, 4, 80) and ly.shape == (2, 4, 48)
    tx, ty = simcc_targets(_kp(3, 2, 4, 20).float(), (24, 40), 2.0, 1.0)
    simcc_loss(lx, ly, tx, ty).backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in head.parameters())


def test_heatmap_targets_and_quarter_offset_decoding():
    kp = _kp(4, 2, 6, 32)
    hm = heatmap_targets(kp, (8, 8), stride=4.0, sigma=1.0)
    assert hm.shape == (2, 6, 8, 8)
    # brute force: the cell whose centre (j + 0.5)·4 is nearest holds the peak
    cell = ((kp / 4) - 0.5).round().clamp(0, 7)
    flat = hm.flatten(2).argmax(-1)
    torch.testing.assert_close(torch.stack([flat % 8, flat // 8], -1).double(), cell)
    err = (heatmap_decode(hm, 4.0) - kp).abs()
    assert err.max() <= 4 * 0.75 + 1e-6  # a quarter-cell step from the peak cell
    plain = ((cell + 0.5) * 4 - kp).abs()  # argmax alone
    assert (err.mean() < plain.mean())  # the quarter offset helps on average


def test_heatmap_head_upsamples():
    head = HeatmapHead(16, 5, (8, 8))
    assert head(torch.randn(1, 16, 3, 4)).shape == (1, 5, 12, 16)


def test_datasets_draw_keypoints_where_they_say():
    data = make_keypoint_images(6, size=24, num_keypoints=3, noise=0.0, seed=5)
    assert data.images.shape == (6, 3, 24, 24) and data.keypoints.shape == (6, 3, 2)
    for img, kp in zip(data.images, data.keypoints):
        x, y = kp[0].long()  # keypoint 0 is the red blob
        assert img[0, y, x] > 0.7 and img[1, y, x] < 0.45
    figs = make_stick_figures(3, size=64, people=(2, 3), seed=6)
    assert all(k.shape[1:] == (9, 2) and 2 <= len(k) <= 3 for k in figs.keypoints)
    assert all(((k >= 0) & (k <= 64)).all() for k in figs.keypoints)
    for k in make_stick_figures(20, people=(3, 4), seed=8).keypoints:  # torsos kept apart
        torso = (k[:, 1] + k[:, 2]) / 2
        d = torch.cdist(torso, torso) + 1e3 * torch.eye(len(k))
        assert d.min() >= 12.0 - 1e-4
    assert torch.equal(make_keypoint_images(2, seed=7).images, make_keypoint_images(2, seed=7).images)


def test_bad_input():
    with pytest.raises(ValueError, match=r"keypoints must be a \[B, K, 2\] tensor"):
        simcc_targets(torch.zeros(3, 2), (8, 8))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        simcc_targets(torch.zeros(1, 1, 2), (8, 8), sigma=0.0)
    with pytest.raises(ValueError, match="split_ratio must be >= 1, got 0.5"):
        SimCCHead(4, (2, 2), 1, (8, 8), split_ratio=0.5)
    with pytest.raises(ValueError, match=r"keypoints must be a \[B, K, 2\]"):
        heatmap_targets(torch.zeros(1, 1, 3), (4, 4), 2.0)
    with pytest.raises(ValueError, match="num_keypoints"):
        make_keypoint_images(1, num_keypoints=12)
    with pytest.raises(ValueError, match="people"):
        make_stick_figures(1, people=(0, 2))
    with pytest.raises(ValueError, match=r"heatmaps must be \[B, K, h, w\], got shape \(4, 4\)"):
        heatmap_decode(torch.zeros(4, 4), 2.0)
