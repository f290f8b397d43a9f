"""Upsampling: interpolation, transposed convolution, pixel shuffle and max-unpooling.

Decoders, segmentation heads and generators grow feature maps back to a higher resolution.
Fixed upsampling resamples: each output pixel is a weighted sum of the nearest 1, 2×2 or 4×4
input pixels (nearest, bilinear, bicubic). A transposed convolution *paints* a learned
``k × k`` kernel per input pixel onto a grid ``s`` times finer and sums the overlaps; when
``k`` is not a multiple of ``s`` the overlap is uneven and the output carries a checkerboard
at the Nyquist frequency (Odena, Dumoulin, Olah 2016, Distill, doi:10.23915/distill.00003),
which resize-then-convolve avoids. Sub-pixel convolution (Shi et al. 2016, arXiv:1609.05158)
rearranges ``C·r²`` channels into an ``r``-times larger map; max-unpooling puts values back at
the positions a max-pool took them from.

===========  ==============================================================================
x            ``[B, C, H, W]`` input;  ``H', W'`` the output size
scale        input pixels per output pixel along an axis (``in/out``, or ``1/scale_factor``)
src(i)       input coordinate of output pixel ``i`` (align_corners: ``i·(in−1)/(out−1)``,
             else ``(i + ½)·scale − ½``; nearest: ``⌊i·scale⌋``)
A            bicubic kernel parameter, −0.75 (as PyTorch and OpenCV)
k, s, p      kernel size, stride and padding of the transposed convolution
r            pixel-shuffle factor
===========  ==============================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResizeConv2d", "TransposedConv2d", "checkerboard_energy", "conv_transpose2d",
           "interpolate", "max_unpool2d", "pixel_shuffle", "pixel_unshuffle"]

_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")
_A = -0.75


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_4d(x: Tensor, name: str = "input") -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got {got}")


def _taps(n_in: int, n_out: int, scale: float | None, mode: str, align_corners: bool,
          dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Input indices and weights ``[n_out, taps]`` of one axis (PyTorch's CPU rules)."""
    if mode.startswith("nearest"):
        dtype = torch.float32  # PyTorch computes nearest indices in float32 for every dtype
    i = torch.arange(n_out, dtype=dtype)
    if align_corners and mode in ("bilinear", "bicubic"):
        ratio = (torch.tensor(n_in - 1, dtype=dtype) / (n_out - 1) if n_out > 1
                 else torch.tensor(0.0, dtype=dtype))
    elif scale is not None and scale > 0:  # PyTorch maps with 1/scale_factor when given
        ratio = torch.tensor(1.0 / scale, dtype=dtype)
    else:
        ratio = torch.tensor(n_in, dtype=dtype) / n_out
    if mode in ("nearest", "nearest-exact"):
        shift = 0.5 if mode == "nearest-exact" else 0.0
        src = ((i + shift) * ratio).floor().long().clamp(max=n_in - 1)  # src(i) = ⌊(i + δ)·scale⌋
        if mode == "nearest" and n_out == n_in:
            src = i.long()
        return src[:, None], torch.ones(n_out, 1)
    src = i * ratio if align_corners else (i + 0.5) * ratio - 0.5
    if mode == "bilinear":
        if n_out == n_in:
            return i.long()[:, None].repeat(1, 2), torch.tensor([1.0, 0.0], dtype=dtype).repeat(
                n_out, 1)
        src = src.clamp(min=0)
        lo = src.floor().long().clamp(max=n_in - 1)
        lam = (src - lo).clamp(0, 1)
        hi = torch.where(lo < n_in - 1, lo + 1, lo)
        return torch.stack([lo, hi], 1), torch.stack([1 - lam, lam], 1)  # linear: (1−λ, λ)
    lo = src.floor()
    t = src - lo
    idx = (lo.long()[:, None] + torch.arange(-1, 3)).clamp(0, n_in - 1)  # border replicated

    def near(d: Tensor) -> Tensor:  # |d| ≤ 1: ((A+2)|d| − (A+3))|d|² + 1
        return ((_A + 2) * d - (_A + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:  # 1 < |d| < 2: ((A|d| − 5A)|d| + 8A)|d| − 4A
        return ((_A * d - 5 * _A) * d + 8 * _A) * d - 4 * _A

    return idx, torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1)


def _resample(x: Tensor, dim: int, idx: Tensor, w: Tensor) -> Tensor:
    """``y[..., i, ...] = Σ_t w[i, t] · x[..., idx[i, t], ...]`` along ``dim``."""
    n_out, taps = idx.shape
    g = x.index_select(dim, idx.reshape(-1))
    g = g.unflatten(dim, (n_out, taps))
    shape = [1] * g.ndim
    shape[dim], shape[dim + 1] = n_out, taps
    return (g * w.reshape(shape).to(x.dtype)).sum(dim + 1)


def interpolate(x: Tensor, size: int | tuple[int, int] | None = None,
                scale_factor: float | tuple[float, float] | None = None, mode: str = "nearest",
                align_corners: bool | None = None) -> Tensor:
    """Resize ``[B, C, H, W]`` like ``F.interpolate`` (nearest, nearest-exact, bilinear, bicubic).

    Args:
        x: Input ``[B, C, H, W]``.
        size: Output ``(H', W')`` (or one int for both).
        scale_factor: Or a factor per axis; ``H' = ⌊H·factor⌋`` and the coordinate mapping
            uses ``1/factor`` (PyTorch's default ``recompute_scale_factor=None``).
        mode: One of ``nearest``, ``nearest-exact``, ``bilinear``, ``bicubic``.
        align_corners: Bilinear/bicubic only: map corner pixel centres onto each other.

    Returns:
        ``[B, C, H', W']``, differentiable in ``x``.

    Raises:
        ValueError: not 4-D, unknown mode, both or neither of size/scale_factor,
            align_corners with a nearest mode, non-positive sizes.
    """
    _check_4d(x)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if (size is None) == (scale_factor is None):
        raise ValueError("give exactly one of size and scale_factor, got "
                         f"size={size!r}, scale_factor={scale_factor!r}")
    if align_corners is not None and mode.startswith("nearest"):
        raise ValueError(f"align_corners only applies to bilinear/bicubic, got mode={mode!r}")
    h, w = x.shape[-2:]
    if size is not None:
        out, scales = _pair(size), (None, None)
    else:
        scales = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else \
            tuple(scale_factor)
        out = (int(math.floor(h * scales[0])), int(math.floor(w * scales[1])))
    if min(out) <= 0:
        raise ValueError(f"output size must be positive, got {out}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    ac = bool(align_corners)
    idx_w, wt_w = _taps(w, out[1], scales[1], mode, ac, dtype)
    idx_h, wt_h = _taps(h, out[0], scales[0], mode, ac, dtype)
    return _resample(_resample(x, 3, idx_w, wt_w), 2, idx_h, wt_h)


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     output_padding: int | tuple[int, int] = 0, groups: int = 1,
                     dilation: int | tuple[int, int] = 1) -> Tensor:
    """Transposed convolution as painting: every input pixel adds ``x·kernel`` to the output.

    Args:
        x: ``[B, C_in, H, W]``.
        weight: ``[C_in, C_out/groups, kh, kw]`` (``nn.ConvTranspose2d``'s layout).
        bias: ``[C_out]`` or None.
        stride, padding, output_padding, dilation: As ``F.conv_transpose2d``.
        groups: Channel groups.

    Returns:
        ``[B, C_out, H', W']`` with ``H' = (H−1)·s − 2p + d·(kh−1) + output_padding + 1``.
    """
    _check_4d(x)
    _check_4d(weight, "weight")
    (sh, sw), (ph, pw), (oh, ow), (dh, dw) = map(_pair, (stride, padding, output_padding,
                                                         dilation))
    b, c_in, h, w = x.shape
    if weight.shape[0] != c_in or c_in % groups:
        raise ValueError(f"weight must be [C_in={c_in}, C_out/groups, kh, kw] with C_in "
                         f"divisible by groups={groups}, got {tuple(weight.shape)}")
    if not (0 <= oh < max(sh, dh) and 0 <= ow < max(sw, dw)):
        raise ValueError(f"output_padding must be smaller than stride or dilation, got "
                         f"{(oh, ow)} with stride {(sh, sw)}")
    cog, kh, kw = weight.shape[1:]
    h_out = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1
    w_out = (w - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1
    xg = x.reshape(b, groups, c_in // groups, h * w)
    wg = weight.reshape(groups, c_in // groups, cog * kh * kw)
    cols = torch.einsum("bgcl,gck->bgkl", xg, wg).reshape(b, groups * cog * kh * kw, h * w)
    # eq.: y[o] = Σ_i x[i]·W[o − s·i]: fold sums each input pixel's painted kernel (col2im)
    y = F.fold(cols, (h_out, w_out), (kh, kw), dilation=(dh, dw), padding=(ph, pw),
               stride=(sh, sw))
    return y if bias is None else y + bias[None, :, None, None]


class TransposedConv2d(nn.Module):
    """``nn.ConvTranspose2d`` through :func:`conv_transpose2d` (same parameter names/shapes)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, output_padding: int = 0, groups: int = 1, bias: bool = True,
                 dilation: int = 1):
        super().__init__()
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.groups, self.dilation = groups, dilation
        ref = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding,
                                 output_padding, groups, bias, dilation)  # PyTorch's init
        self.weight = ref.weight
        self.bias = ref.bias

    def forward(self, x: Tensor) -> Tensor:
        return conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                self.output_padding, self.groups, self.dilation)


class ResizeConv2d(nn.Module):
    """Resize-then-convolve (Odena et al.): ``interpolate(x, ×s)`` then a ``k × k`` convolution.

    Args:
        in_channels, out_channels: Channels.
        scale: Upsampling factor ``s``.
        kernel_size: Odd ``k`` of the "same" convolution.
        mode: Interpolation mode (``nearest`` as in the article).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2,
                 kernel_size: int = 3, mode: str = "nearest"):
        super().__init__()
        self.scale, self.mode = scale, mode
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(interpolate(x, scale_factor=float(self.scale), mode=self.mode))


def pixel_shuffle(x: Tensor, r: int) -> Tensor:
    """``[B, C·r², H, W]`` → ``[B, C, H·r, W·r]``: ``y[c, h·r+i, w·r+j] = x[c·r² + i·r + j, h, w]``."""
    _check_4d(x)
    b, c, h, w = x.shape
    if r < 1 or c % (r * r):
        raise ValueError(f"channels must be divisible by r²={r * r}, got C={c} (r={r})")
    return x.reshape(b, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(
        b, c // (r * r), h * r, w * r)


def pixel_unshuffle(x: Tensor, r: int) -> Tensor:
    """Inverse of :func:`pixel_shuffle`: ``[B, C, H·r, W·r]`` → ``[B, C·r², H, W]``."""
    _check_4d(x)
    b, c, h, w = x.shape
    if r < 1 or h % r or w % r:
        raise ValueError(f"H and W must be divisible by r={r}, got {(h, w)}")
    return x.reshape(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(
        b, c * r * r, h // r, w // r)


def max_unpool2d(x: Tensor, indices: Tensor, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] | None = None, padding: int | tuple[int, int] = 0,
                 output_size: tuple[int, int] | None = None) -> Tensor:
    """Put pooled maxima back where ``max_pool2d(..., return_indices=True)`` found them.

    Args:
        x: ``[B, C, H, W]`` pooled values.
        indices: Same shape, flat positions ``h·W' + w`` in the unpooled plane.
        kernel_size, stride, padding: Those of the pooling (stride defaults to kernel).
        output_size: ``(H', W')``; default ``(H−1)·s − 2p + k``.

    Returns:
        ``[B, C, H', W']``, zero except at ``indices``.
    """
    _check_4d(x)
    if not isinstance(indices, Tensor) or indices.shape != x.shape:
        got = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must have the input's shape {tuple(x.shape)}, got {got}")
    (kh, kw), (ph, pw) = _pair(kernel_size), _pair(padding)
    sh, sw = _pair(stride) if stride is not None else (kh, kw)
    b, c, h, w = x.shape
    h_out, w_out = output_size[-2:] if output_size is not None else (
        (h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw)
    flat = indices.reshape(b, c, -1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= h_out * w_out):
        raise ValueError(f"indices must lie in [0, {h_out * w_out}) for output size "
                         f"{(h_out, w_out)}, got {int(flat.min())} .. {int(flat.max())}")
    y = x.new_zeros(b, c, h_out * w_out).scatter(2, flat, x.reshape(b, c, -1))
    return y.reshape(b, c, h_out, w_out)


def checkerboard_energy(images: Tensor) -> Tensor:
    """Fraction of spectral energy on the Nyquist row and column, per image.

    A checkerboard of period 2 lives at frequency π along x or y: the row ``f_y = H/2`` and the
    column ``f_x = W/2`` of the 2-D DFT. Nearest upsampling by 2 has no energy there (its
    [1, 1] hold filter is zero at π), so what a resize-convolution shows comes from borders
    and nonlinearities only.

    Args:
        images: ``[B, C, H, W]`` with even ``H`` and ``W``.

    Returns:
        ``[B]`` energy at Nyquist / energy of the mean-free image (averaged over channels).
    """
    _check_4d(images, "images")
    h, w = images.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"images need even H and W, got {(h, w)}")
    x = images - images.mean((-2, -1), keepdim=True)
    p = torch.fft.fft2(x.double()).abs() ** 2
    nyq = p[..., h // 2, :].sum(-1) + p[..., :, w // 2].sum(-1) - p[..., h // 2, w // 2]
    return (nyq / p.sum((-2, -1)).clamp_min(1e-30)).mean(1)
