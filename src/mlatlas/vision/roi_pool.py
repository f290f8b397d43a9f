"""RoI pooling, position-sensitive RoI pooling and RoIAlign as masked sums and maxima.

Two-stage detectors turn each region of interest (a box on the feature map) into a fixed
``ph × pw`` grid of features. RoI pooling (Girshick 2015, Fast R-CNN, arXiv:1504.08083)
rounds the box to feature cells and max-pools each bin. Position-sensitive RoI pooling
(Dai, Li, He, Sun 2016, R-FCN, arXiv:1605.06409) average-pools bin ``(i, j)`` from its own
channel group, so a ``k × k`` bank of score maps votes on which part of an object lies where.
RoIAlign (He et al. 2017, Mask R-CNN, arXiv:1703.06870) does not round: it averages bilinear
samples on a regular grid inside each bin. Here each op is written as separable bin masks:
a bin's rows and columns are ``[R, ph, H]`` and ``[R, pw, W]`` weights (0/1 for pooling,
bilinear for RoIAlign), so RoIAlign is one ``einsum`` and a max two masked reductions;
position-sensitive sums are four lookups in a summed-area table;
the integer and float rules are torchvision's (``torchvision.ops``), bit for bit where the
arithmetic allows.

=============  ===========================================================================
x              feature map ``[N, C, H, W]``
boxes          ``[R, 5]`` ``(image index, x1, y1, x2, y2)`` or a list of ``[R_n, 4]`` per image
scale          ``spatial_scale``: feature cells per input pixel (1/stride)
ph, pw         output bins (``output_size``)
round          C's ``round`` (halves away from zero), as the reference kernels
=============  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ps_roi_pool", "roi_align", "roi_pool", "to_rois"]


def to_rois(boxes: Tensor | Sequence[Tensor]) -> Tensor:
    """``[R, 5]`` rois from ``[R, 5]`` or a per-image list of ``[R_n, 4]`` boxes."""
    if isinstance(boxes, Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be [R, 5] (image index, x1, y1, x2, y2) or a list "
                             f"of [R_n, 4], got {tuple(boxes.shape)}")
        return boxes
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.ndim != 2 or b.shape[1] != 4:
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be [R_n, 4], got {got}")
        parts.append(torch.cat([torch.full_like(b[:, :1], i), b], 1))
    return torch.cat(parts) if parts else torch.zeros(0, 5)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check(x: Tensor, rois: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"input must be [N, C, H, W], got {got}")
    if rois.dtype != x.dtype:
        raise TypeError(f"boxes must have the input's dtype {x.dtype}, got {rois.dtype}")
    if len(rois) and (int(rois[:, 0].min()) < 0 or int(rois[:, 0].max()) >= x.shape[0]):
        raise ValueError(f"box image indices must lie in [0, {x.shape[0] - 1}], got "
                         f"{rois[:, 0].min().item()} .. {rois[:, 0].max().item()}")


def _c_round(v: Tensor) -> Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)  # C round(): halves away from zero


def _int_bounds(start: Tensor, length: Tensor, bins: int, hi: int) -> tuple[Tensor, Tensor]:
    """``[R, bins]`` integer bin bounds ``[lo, up)`` along one axis (torchvision's rule).

    ``start``: rounded roi start (int-valued), ``length``: roi length in cells (≥ 1); bin
    ``i`` spans ``[⌊i·len/bins⌋, ⌈(i+1)·len/bins⌉) + start``, clipped to ``[0, hi]``.
    """
    bin_size = length.to(start.dtype) / bins  # in the boxes' float type, as the kernels
    i = torch.arange(bins, dtype=start.dtype)
    lo = (torch.floor(i[None] * bin_size[:, None]) + start[:, None]).clamp(0, hi)
    up = (torch.ceil((i[None] + 1) * bin_size[:, None]) + start[:, None]).clamp(0, hi)
    return lo.long(), up.long()


def _int_bins(start: Tensor, length: Tensor, bins: int, size: int, hi: int) -> Tensor:
    """``[R, bins, size]`` 0/1 membership of the cells in each bin of :func:`_int_bounds`."""
    lo, up = _int_bounds(start, length, bins, hi)
    cells = torch.arange(size)
    return (cells[None, None] >= lo[..., None]) & (cells[None, None] < up[..., None])


def roi_pool(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
             spatial_scale: float = 1.0) -> Tensor:
    """Max-pool each rounded box into ``ph × pw`` bins (``torchvision.ops.roi_pool``).

    Args:
        input: ``[N, C, H, W]``.
        boxes: ``[R, 5]`` or a list of ``[R_n, 4]`` (input-pixel coordinates).
        output_size: ``(ph, pw)``.
        spatial_scale: Feature cells per input pixel.

    Returns:
        ``[R, C, ph, pw]``; an empty bin gives 0 and no gradient. The gradient of a bin goes
        to its first maximum in row-major order, as the reference's argmax.
    """
    rois = to_rois(boxes)
    _check(input, rois)
    ph, pw = _pair(output_size)
    _, c, h, w = input.shape
    s = torch.tensor(spatial_scale, dtype=rois.dtype)
    x1, y1, x2, y2 = (_c_round(rois[:, i] * s) for i in range(1, 5))
    rows = _int_bins(y1, (y2 - y1 + 1).clamp(min=1), ph, h, h)  # [R, ph, H]
    cols = _int_bins(x1, (x2 - x1 + 1).clamp(min=1), pw, w, w)  # [R, pw, W]
    feat = input[rois[:, 0].long()]  # [R, C, H, W]
    neg = torch.finfo(input.dtype).min
    # max over each bin's columns, then over its rows (row-major first maximum)
    by_col = feat[:, :, :, None, :].masked_fill(~cols[:, None, None], neg).max(-1).values
    out = by_col.transpose(2, 3)[:, :, None].masked_fill(~rows[:, None, :, None], neg)
    out = out.max(-1).values  # [R, C, ph, pw]
    empty = ~(rows.any(-1)[:, :, None] & cols.any(-1)[:, None, :])
    return out.masked_fill(empty[:, None], 0.0)


def ps_roi_pool(input: Tensor, boxes: Tensor | Sequence[Tensor],
                output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> Tensor:
    """Position-sensitive average RoI pooling (``torchvision.ops.ps_roi_pool``).

    Bin ``(i, j)`` of output channel ``c`` averages input channel ``(c·ph + i)·pw + j``.

    Args:
        input: ``[N, C_out·ph·pw, H, W]``.
        boxes: ``[R, 5]`` or a list of ``[R_n, 4]``.
        output_size: ``(ph, pw)``.
        spatial_scale: Feature cells per input pixel.

    Returns:
        ``[R, C_out, ph, pw]`` (an empty bin gives 0). Bins end at row ``H − 1`` and column
        ``W − 1`` at the latest, as the reference's forward; the gradient here is that
        forward's exact gradient (torchvision's backward kernel clips at ``H``/``W`` instead,
        so the two gradients differ for bins that reach the last row or column).
    """
    rois = to_rois(boxes)
    _check(input, rois)
    ph, pw = _pair(output_size)
    _, c, h, w = input.shape
    if c % (ph * pw):
        raise ValueError(f"input channels must be a multiple of ph·pw = {ph * pw}, got {c}")
    s = torch.tensor(spatial_scale, dtype=rois.dtype)
    x1, y1, x2, y2 = (_c_round(rois[:, i] * s) for i in range(1, 5))
    y_lo, y_up = _int_bounds(y1, (y2 - y1).clamp(min=1), ph, h - 1)  # [R, ph]
    x_lo, x_up = _int_bounds(x1, (x2 - x1).clamp(min=1), pw, w - 1)  # [R, pw]
    # rectangle sums from a summed-area table (float64: no cancellation error in fp32)
    table = F.pad(input.double().cumsum(2).cumsum(3), (1, 0, 1, 0))  # [N, C, H+1, W+1]
    b = rois[:, 0].long()[:, None, None, None]
    ch = torch.arange(c).reshape(1, c // (ph * pw), ph, pw)  # bin (i, j) reads (c·ph + i)·pw + j
    ylo, yup = y_lo[:, None, :, None], y_up[:, None, :, None]
    xlo, xup = x_lo[:, None, None, :], x_up[:, None, None, :]
    total = (table[b, ch, yup, xup] - table[b, ch, ylo, xup] - table[b, ch, yup, xlo]
             + table[b, ch, ylo, xlo])  # eq. (1) of R-FCN: Σ over the bin, [R, C_out, ph, pw]
    area = ((yup - ylo).clamp(min=0) * (xup - xlo).clamp(min=0)).to(torch.float64)
    return torch.where(area > 0, total / area.clamp(min=1), 0.0).to(input.dtype)


def _bilinear_rows(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, size: int,
                   g_max: int) -> Tensor:
    """``[R, bins, size]``: summed bilinear weights of RoIAlign's samples along one axis."""
    dtype = start.dtype
    i = torch.arange(bins, dtype=dtype)[None, :, None]
    g = torch.arange(g_max, dtype=dtype)[None, None, :]
    gr = grid.to(dtype)[:, None, None]
    # sample iy of bin i: start + i·bin + (iy + ½)·bin / grid
    pos = start[:, None, None] + i * bin_size[:, None, None] + (g + 0.5) * bin_size[
        :, None, None] / gr
    used = g < gr  # per-roi sample count (adaptive sampling_ratio)
    inside = (pos >= -1.0) & (pos <= size)  # outside [-1, size]: the sample counts as 0
    pos = pos.clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    pos = torch.where(low >= size - 1, low, pos)  # at the far border: no interpolation
    high = (low + 1).clamp(max=size - 1)
    frac = pos - low
    cells = torch.arange(size, dtype=dtype)
    wts = ((1 - frac)[..., None] * (cells == low[..., None]) +
           frac[..., None] * (cells == high[..., None]))  # [R, bins, g_max, size]
    return (wts * (used & inside)[..., None]).sum(2)


def roi_align(input: Tensor, boxes: Tensor | Sequence[Tensor],
              output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign: average of bilinear samples per bin (``torchvision.ops.roi_align``).

    Args:
        input: ``[N, C, H, W]``.
        boxes: ``[R, 5]`` or a list of ``[R_n, 4]``.
        output_size: ``(ph, pw)``.
        spatial_scale: Feature cells per input pixel.
        sampling_ratio: Samples per bin and axis; ``<= 0``: ``⌈roi size / bins⌉`` per roi.
        aligned: Shift boxes by −½ cell (pixel-centre convention); without it boxes are at
            least 1×1 cell.

    Returns:
        ``[R, C, ph, pw]``.
    """
    rois = to_rois(boxes)
    _check(input, rois)
    ph, pw = _pair(output_size)
    _, c, h, w = input.shape
    if len(rois) == 0:
        return input.new_zeros(0, c, ph, pw)
    s = torch.tensor(spatial_scale, dtype=rois.dtype)
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * s - off for i in range(1, 5))
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bin_h, bin_w = rh / ph, rw / pw
    if sampling_ratio > 0:
        gh = gw = torch.full((len(rois),), sampling_ratio, dtype=torch.int64)
    else:
        gh, gw = torch.ceil(rh / ph).long(), torch.ceil(rw / pw).long()
    rows = _bilinear_rows(y1, bin_h, gh, ph, h, max(int(gh.max()), 1)).to(input.dtype)
    cols = _bilinear_rows(x1, bin_w, gw, pw, w, max(int(gw.max()), 1)).to(input.dtype)
    count = (gh * gw).clamp(min=1).to(input.dtype)
    feat = input[rois[:, 0].long()]
    out = torch.einsum("riy,rcyx,rjx->rcij", rows, feat, cols)
    return out / count[:, None, None, None]
