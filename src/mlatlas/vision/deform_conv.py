"""Deformable convolution v1 and modulated v2, vectorised bilinear sampling in plain PyTorch.

A ``kh × kw`` convolution reads its input on a fixed grid around each output position. A
deformable convolution (Dai et al. 2017, arXiv:1703.06211) adds a learned 2-D offset to every
one of the ``K = kh·kw`` sampling points, separately for each output position, and reads
the input there by bilinear interpolation (zero outside the map), so the receptive field
follows the object's geometry; the offsets come from a plain convolution over the same input
and train by back-propagation through the interpolation. DCNv2 (Zhu, Hu, Lin, Dai 2019,
arXiv:1811.11168) also multiplies each sample by a learned modulation ``m ∈ [0, 1]``.

=========  ==============================================================================
x          input ``[B, C, H, W]``
w          weight ``[C_out, C/groups, kh, kw]``;  k = ``i·kw + j`` indexes kernel taps
Δp         offset ``[B, 2·G·K, H', W']``: for offset group g and tap k, channels
           ``2(gK+k)`` = Δy and ``2(gK+k)+1`` = Δx (torchvision's layout)
m          mask ``[B, G·K, H', W']`` (v2), channel ``gK+k``
p_k        ``(h'·s − p + i·d, w'·s − p + j·d)``: the regular grid position of tap k
y(p)       ``Σ_c Σ_k w[o, c, k] · m_k · x_c(p_k + Δp_k)``   (eq. (2) of DCN, (3) of DCNv2)
=========  ==============================================================================
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DeformConv2d", "OffsetDeformConv2d", "bilinear_sample", "deform_conv2d"]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def bilinear_sample(x: Tensor, y: Tensor, xs: Tensor) -> Tensor:
    """Sample a channels-last map at real positions, zero outside (DCN eq. (3)-(4)).

    Args:
        x: ``[B, G, H, W, Cg]`` input split into ``G`` groups, channels last (each sample
            then reads ``Cg`` contiguous numbers).
        y, xs: ``[B, G, L]`` row and column coordinates for each group.

    Returns:
        ``[B, G, L, Cg]``: ``Σ_q max(0, 1−|q_y−y|)·max(0, 1−|q_x−x|)·x[q]`` over the 4 pixels
        ``q`` around each position (pixels outside the map count as 0).
    """
    b, g, h, w, cg = x.shape
    rows = x.reshape(b * g * h * w, cg)
    first = (torch.arange(b * g, device=x.device) * (h * w)).reshape(b, g, 1)
    y0, x0 = y.floor(), xs.floor()
    ly, lx = y - y0, xs - x0  # fractional parts: the bilinear weights (differentiable)
    out = 0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long() + first
            v = rows.index_select(0, idx.reshape(-1)).reshape(*idx.shape, cg)
            out = out + v * (wy * wx * inside)[..., None]
    return out


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
                  dilation: int | tuple[int, int] = (1, 1), mask: Tensor | None = None) -> Tensor:
    """Deformable convolution v1 (``mask=None``) or modulated v2, torchvision's signature.

    Args:
        input: ``[B, C, H, W]``.
        offset: ``[B, 2·G·kh·kw, H', W']`` (G offset groups; ``C`` divisible by G).
        weight: ``[C_out, C/groups, kh, kw]`` (groups = ``C / weight.shape[1]``).
        bias: ``[C_out]`` or None.
        stride, padding, dilation: As for ``conv2d``.
        mask: ``[B, G·kh·kw, H', W']`` modulation (v2) or None.

    Returns:
        ``[B, C_out, H', W']`` with ``H' = (H + 2p − d(kh−1) − 1) // s + 1``.

    Raises:
        ValueError: any shape that does not fit the others (named, with what was expected).
    """
    for name, t in (("input", input), ("offset", offset), ("weight", weight)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor, got {got}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    b, c, h, w = input.shape
    c_out, cg, kh, kw = weight.shape
    k = kh * kw
    if cg == 0 or c % cg:
        raise ValueError(f"input channels {c} must be a multiple of weight.shape[1] = {cg}")
    groups = c // cg
    if c_out % groups:
        raise ValueError(f"weight.shape[0] = {c_out} must be divisible by groups = {groups}")
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"output would be empty: input {(h, w)}, kernel {(kh, kw)}, stride "
                         f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    g_off = offset.shape[1] // (2 * k)
    if (offset.shape[0] != b or offset.shape[1] != 2 * g_off * k or g_off == 0
            or c % g_off or tuple(offset.shape[2:]) != (h_out, w_out)):
        raise ValueError(f"offset must be [B={b}, 2·G·kh·kw (a multiple of {2 * k} with G "
                         f"dividing C={c}), H'={h_out}, W'={w_out}], got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (b, g_off * k, h_out, w_out):
        raise ValueError(f"mask must be [B, G·kh·kw, H', W'] = {(b, g_off * k, h_out, w_out)}, "
                         f"got {tuple(mask.shape)}")
    dtype = input.dtype
    iy = torch.arange(kh, dtype=dtype) * dh
    ix = torch.arange(kw, dtype=dtype) * dw
    oy = torch.arange(h_out, dtype=dtype) * sh - ph
    ox = torch.arange(w_out, dtype=dtype) * sw - pw
    # p_k: regular grid position of tap k = (i, j) at output (h', w'), shape [K, H', W']
    base_y = (iy[:, None, None, None] + oy[None, None, :, None]).expand(kh, kw, h_out, w_out)
    base_x = (ix[None, :, None, None] + ox[None, None, None, :]).expand(kh, kw, h_out, w_out)
    off = offset.reshape(b, g_off, k, 2, h_out, w_out)
    y = base_y.reshape(k, h_out, w_out) + off[:, :, :, 0]  # eq. (2): p_0 + p_k + Δp_k
    x = base_x.reshape(k, h_out, w_out) + off[:, :, :, 1]
    x_cl = input.reshape(b, g_off, c // g_off, h, w).permute(0, 1, 3, 4, 2)
    v = bilinear_sample(x_cl, y.reshape(b, g_off, -1), x.reshape(b, g_off, -1))
    v = v.reshape(b, g_off, k, h_out * w_out, c // g_off)  # x(p_0 + p_k + Δp_k), channels last
    if mask is not None:  # DCNv2 eq. (3): Δm_k scales each sample
        v = v * mask.reshape(b, g_off, k, h_out * w_out, 1)
    v = v.permute(0, 2, 3, 1, 4).reshape(b, k, h_out * w_out, groups, cg)
    wg = weight.reshape(groups, c_out // groups, cg, k)
    out = torch.einsum("bklgc,gock->bgol", v, wg).reshape(b, c_out, h_out, w_out)
    return out if bias is None else out + bias[None, :, None, None]


class DeformConv2d(nn.Module):
    """Holds ``weight``/``bias`` like ``torchvision.ops.DeformConv2d``; offsets are inputs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must "
                             f"be divisible by groups {groups}")
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, groups=groups, bias=bias)
        self.weight, self.bias = ref.weight, ref.bias  # Conv2d's initialisation
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)


class OffsetDeformConv2d(nn.Module):
    """A deformable layer that predicts its own offsets (and v2 masks) with a plain conv.

    The offset branch is a ``k × k`` convolution with the layer's stride, padding and
    dilation, initialised to zero so the layer starts as a plain convolution (DCN §2.1);
    with ``modulated=True`` a sigmoid mask branch starts at 0.5 (DCNv2).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, dilation: int = 1, groups: int = 1,
                 offset_groups: int = 1, modulated: bool = False, bias: bool = True):
        super().__init__()
        if in_channels % offset_groups:
            raise ValueError(f"in_channels {in_channels} must be divisible by offset_groups "
                             f"{offset_groups}")
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size, stride, padding,
                                 dilation, groups, bias)
        k = kernel_size * kernel_size
        self.modulated = modulated
        n_pred = offset_groups * k * (3 if modulated else 2)
        self.offset = nn.Conv2d(in_channels, n_pred, kernel_size, stride, padding, dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.n_off = offset_groups * k * 2

    def forward(self, x: Tensor, return_offset: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        pred = self.offset(x)
        offset = pred[:, :self.n_off]
        mask = torch.sigmoid(pred[:, self.n_off:]) if self.modulated else None
        out = self.conv(x, offset, mask)
        return (out, offset) if return_offset else out
