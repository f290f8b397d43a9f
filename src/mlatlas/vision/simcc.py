"""SimCC: keypoints as two 1-D classifications, against the 2-D heatmap they replace.

Heatmap methods regress a ``H/s × W/s`` Gaussian per keypoint and take its argmax, so their
precision is bounded by the heatmap's stride ``s`` (a quarter-cell shift towards the higher
neighbour is the classic patch). SimCC (Li, Yang, Liu, Zhang, Yuan 2022, arXiv:2107.03332)
flattens each keypoint's feature map into a vector and classifies its x and y coordinates
separately into ``W·k`` and ``H·k`` bins — the split ratio ``k ≥ 1`` makes a bin finer than a
pixel — with Gaussian label smoothing (targets are a discretised Gaussian around the true
coordinate, loss = KL divergence), and decodes by argmax. The head is two linear layers:
no upsampling, and its cost does not grow with a heatmap's area.

=============  ===========================================================================
``x``          backbone features ``[B, C, h, w]`` of an ``H × W`` input
``K``          keypoints; ``k`` split ratio; ``σ`` label-smoothing width in pixels
bins           bin ``i`` of the x axis stands for ``x = (i + 0.5) / k`` (pixel units)
targets        ``t_i ∝ exp(−((i + 0.5)/k − x)² / 2σ²)``, ``Σ t_i = 1`` (eq. 3)
loss           ``KL(t ‖ softmax(logits))`` summed over bins, mean over keypoints
heatmap        cell ``j`` of a stride-``s`` map stands for ``(j + 0.5)·s``
=============  ===========================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HeatmapHead", "SimCCHead", "heatmap_decode", "heatmap_loss", "heatmap_targets",
           "simcc_decode", "simcc_loss", "simcc_targets"]


def _check_keypoints(keypoints: Tensor) -> None:
    if not isinstance(keypoints, Tensor) or keypoints.dim() != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must be a [B, K, 2] tensor of (x, y) pixels, got "
                         f"{getattr(keypoints, 'shape', type(keypoints).__name__)}")


class SimCCHead(nn.Module):
    """Per-keypoint 1×1 conv, flatten, then a linear x classifier and a linear y classifier.

    Args:
        in_channels: Backbone channels ``C``.
        feature_size: ``(h, w)`` of the backbone map.
        num_keypoints: ``K``.
        input_size: ``(H, W)`` of the input image.
        split_ratio: ``k`` bins per pixel.
    """

    def __init__(self, in_channels: int, feature_size: tuple[int, int], num_keypoints: int,
                 input_size: tuple[int, int], split_ratio: float = 2.0):
        super().__init__()
        if split_ratio < 1:
            raise ValueError(f"split_ratio must be >= 1, got {split_ratio}")
        self.k, self.input_size = split_ratio, input_size
        h, w = feature_size
        self.keypoint_conv = nn.Conv2d(in_channels, num_keypoints, 1)
        self.x_classifier = nn.Linear(h * w, int(input_size[1] * split_ratio))
        self.y_classifier = nn.Linear(h * w, int(input_size[0] * split_ratio))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C, h, w]`` → x logits ``[B, K, W·k]``, y logits ``[B, K, H·k]``."""
        v = self.keypoint_conv(x).flatten(2)  # each keypoint's map as a vector
        return self.x_classifier(v), self.y_classifier(v)


def _gaussian_bins(coord: Tensor, n_bins: int, k: float, sigma: float) -> Tensor:
    centres = (torch.arange(n_bins, dtype=coord.dtype, device=coord.device) + 0.5) / k
    t = torch.exp(-((centres - coord[..., None]) ** 2) / (2 * sigma ** 2))  # eq. (3)
    return t / t.sum(-1, keepdim=True).clamp_min(1e-12)


def simcc_targets(keypoints: Tensor, input_size: tuple[int, int], split_ratio: float = 2.0,
                  sigma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Gaussian-smoothed 1-D label distributions of both axes (eq. 3).

    Args:
        keypoints: ``[B, K, 2]`` pixel coordinates ``(x, y)``.
        input_size: ``(H, W)`` of the input image.
        split_ratio: ``k`` bins per pixel.
        sigma: Gaussian width ``σ`` in pixels.

    Returns:
        ``(t_x, t_y)``: ``[B, K, W·k]`` and ``[B, K, H·k]``, each summing to 1 over bins.

    Raises:
        ValueError: ``keypoints`` not ``[B, K, 2]`` or ``sigma <= 0``.
    """
    _check_keypoints(keypoints)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    h, w = input_size
    return (_gaussian_bins(keypoints[..., 0], int(w * split_ratio), split_ratio, sigma),
            _gaussian_bins(keypoints[..., 1], int(h * split_ratio), split_ratio, sigma))


def simcc_loss(logits_x: Tensor, logits_y: Tensor, target_x: Tensor, target_y: Tensor) -> Tensor:
    """``KL(t ‖ softmax(logits))`` of both axes, summed over bins, averaged over keypoints.

    Args:
        logits_x, logits_y: ``[B, K, W·k]`` and ``[B, K, H·k]`` from :class:`SimCCHead`.
        target_x, target_y: The same shapes, from :func:`simcc_targets`.

    Returns:
        Scalar loss.
    """
    kl = lambda lg, t: F.kl_div(F.log_softmax(lg, -1), t, reduction="none").sum(-1)  # noqa: E731
    return (kl(logits_x, target_x) + kl(logits_y, target_y)).mean()


def simcc_decode(logits_x: Tensor, logits_y: Tensor, split_ratio: float = 2.0) -> Tensor:
    """Argmax bins → pixel coordinates ``((i + 0.5)/k, (j + 0.5)/k)``.

    Args:
        logits_x, logits_y: ``[B, K, W·k]`` and ``[B, K, H·k]``.
        split_ratio: ``k`` the logits were built with.

    Returns:
        ``[B, K, 2]`` keypoints ``(x, y)`` in pixels.
    """
    x = (logits_x.argmax(-1).to(logits_x.dtype) + 0.5) / split_ratio
    y = (logits_y.argmax(-1).to(logits_y.dtype) + 0.5) / split_ratio
    return torch.stack([x, y], -1)


class HeatmapHead(nn.Module):
    """The baseline: transposed convolutions up to stride ``s``, then one heatmap per keypoint
    (SimpleBaseline, Xiao, Wu, Wei 2018, arXiv:1804.06208, scaled down).

    Args:
        in_channels: Backbone channels.
        num_keypoints: ``K``.
        deconv_channels: Width of each 4×4 stride-2 transposed convolution (one per entry).
    """

    def __init__(self, in_channels: int, num_keypoints: int,
                 deconv_channels: tuple[int, ...] = (64,)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for d in deconv_channels:
            layers += [nn.ConvTranspose2d(c, d, 4, stride=2, padding=1), nn.ReLU()]
            c = d
        self.deconv = nn.Sequential(*layers)
        self.final = nn.Conv2d(c, num_keypoints, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, h, w]`` → heatmaps ``[B, K, h·2^L, w·2^L]``."""
        return self.final(self.deconv(x))


def heatmap_targets(keypoints: Tensor, heatmap_size: tuple[int, int], stride: float,
                    sigma: float = 1.0) -> Tensor:
    """Unnormalised Gaussian heatmaps (peak 1) at the keypoints.

    Args:
        keypoints: ``[B, K, 2]`` pixel coordinates ``(x, y)``.
        heatmap_size: ``(h, w)`` cells; cell ``j`` stands for pixel ``(j + 0.5)·stride``.
        stride: Input pixels per heatmap cell ``s``.
        sigma: Gaussian width in cells.

    Returns:
        ``[B, K, h, w]``.

    Raises:
        ValueError: ``keypoints`` not ``[B, K, 2]``.
    """
    _check_keypoints(keypoints)
    h, w = heatmap_size
    cy = (torch.arange(h, dtype=keypoints.dtype) + 0.5) * stride
    cx = (torch.arange(w, dtype=keypoints.dtype) + 0.5) * stride
    dx = (cx - keypoints[..., 0, None]) / stride  # [B, K, w] in cells
    dy = (cy - keypoints[..., 1, None]) / stride
    return torch.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * sigma ** 2))


def heatmap_loss(heatmaps: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error (the standard heatmap loss)."""
    return F.mse_loss(heatmaps, targets)


def heatmap_decode(heatmaps: Tensor, stride: float) -> Tensor:
    """Argmax + a quarter-cell shift towards the higher neighbour, per axis.

    Args:
        heatmaps: ``[B, K, h, w]``.
        stride: Input pixels per heatmap cell ``s``.

    Returns:
        ``[B, K, 2]`` keypoints ``(x, y)`` in pixels.

    Raises:
        ValueError: ``heatmaps`` is not 4-D.
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be [B, K, h, w], got shape {tuple(heatmaps.shape)}")
    b, k, h, w = heatmaps.shape
    idx = heatmaps.flatten(2).argmax(-1)
    py, px = idx // w, idx % w
    flat = heatmaps.reshape(b * k, h, w)
    rows = torch.arange(b * k)
    pyf, pxf = py.reshape(-1), px.reshape(-1)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat[rows, yy.clamp(0, h - 1), xx.clamp(0, w - 1)]

    dx = torch.sign(at(pyf, pxf + 1) - at(pyf, pxf - 1))
    dy = torch.sign(at(pyf + 1, pxf) - at(pyf - 1, pxf))
    dx = torch.where((pxf > 0) & (pxf < w - 1), dx, torch.zeros_like(dx))
    dy = torch.where((pyf > 0) & (pyf < h - 1), dy, torch.zeros_like(dy))
    x = (pxf.to(heatmaps.dtype) + 0.25 * dx + 0.5) * stride  # the quarter offset
    y = (pyf.to(heatmaps.dtype) + 0.25 * dy + 0.5) * stride
    return torch.stack([x, y], -1).view(b, k, 2)
