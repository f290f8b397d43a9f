"""SAM's image encoder: a plain ViT with windowed and global attention and relative positions.

SAM (Kirillov et al. 2023, arXiv:2304.02643) embeds the image once with a heavy ViT (MAE
pre-trained ViT-H in the paper) and then answers any number of prompts with a light decoder.
The ViT (after ViTDet, Li et al. 2022, arXiv:2203.16527) keeps one resolution (patch 16 →
a 64 × 64 grid at 1024 px): most blocks attend inside ``14 × 14`` windows (the map padded to
a multiple), a few evenly spaced blocks attend globally, and every attention adds
decomposed relative positions (MViTv2, Li et al. 2021, arXiv:2112.01526): a learned vector
per row offset and per column offset, dotted with the query. A neck (1×1 conv, LN, 3×3 conv,
LN) maps the tokens to the 256-channel image embedding.

============  ===========================================================================
``x``         image ``[B, 3, S, S]`` (S = ``image_size``)
``E``         ``S / patch``: the embedding grid side (64 for 1024 / 16)
``R_h, R_w``  ``[2L − 1, d]`` relative position tables of a block (L: its attention side)
bias          ``q·R_h[i_y − j_y] + q·R_w[i_x − j_x]`` added to ``q·k / √d``
output        ``[B, C_out, E, E]`` image embedding
============  ===========================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.nn.attention import attend

__all__ = ["ChannelLayerNorm", "SamImageEncoder", "decomposed_rel_pos", "relative_table"]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (SAM's ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def relative_table(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """``[q_size, k_size, d]``: the row of ``table`` for every query/key offset.

    A table of another length is linearly resized to ``2·max(q, k) − 1`` first (ViTDet).
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    return table[(q - k + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def decomposed_rel_pos(q: Tensor, table_h: Tensor, table_w: Tensor, h: int, w: int) -> Tensor:
    """The additive bias of decomposed relative positions (MViTv2 eq. 4).

    Args:
        q: Unscaled queries ``[B, heads, h·w, d]``.
        table_h, table_w: ``[2h − 1, d]``, ``[2w − 1, d]``.
        h, w: The attention grid.

    Returns:
        ``[B, heads, h·w, h·w]``: ``q·R_h[i_y − j_y] + q·R_w[i_x − j_x]``.
    """
    b, n_heads, _, d = q.shape
    rh, rw = relative_table(h, h, table_h), relative_table(w, w, table_w)
    grid = q.reshape(b, n_heads, h, w, d)
    bias_h = torch.einsum("bnyxc,ykc->bnyxk", grid, rh)  # [.., h, w, key row]
    bias_w = torch.einsum("bnyxc,xkc->bnyxk", grid, rw)  # [.., h, w, key column]
    bias = bias_h[..., :, None] + bias_w[..., None, :]
    return bias.reshape(b, n_heads, h * w, h * w)


class ViTAttention(nn.Module):
    """Multi-head self-attention over a ``[B, H, W, C]`` grid with relative positions."""

    def __init__(self, dim: int, heads: int, grid: int, rel_pos: bool, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = rel_pos
        if rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, dim // heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, dim // heads))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).view(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, h, w) if self.rel_pos else None
        out = attend(q, k, v, attn_mask=bias)  # softmax(q·k/√d + bias) v
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class ViTBlock(nn.Module):
    """Pre-norm block; ``window > 0`` attends within ``window × window`` tiles (padded)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, window: int, grid: int, rel_pos: bool,
                 qkv_bias: bool, eps: float):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ViTAttention(dim, heads, window if window else grid, rel_pos, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.lin1 = nn.Linear(dim, mlp_dim)
        self.mlp.act = nn.GELU()
        self.mlp.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, C]`` → same shape."""
        y = self.norm1(x)
        if self.window:
            b, h, w, c = y.shape
            m = self.window
            y = F.pad(y, (0, 0, 0, (-w) % m, 0, (-h) % m))
            hp, wp = y.shape[1:3]
            tiles = y.view(b, hp // m, m, wp // m, m, c).permute(0, 1, 3, 2, 4, 5)
            out = self.attn(tiles.reshape(-1, m, m, c))
            out = out.view(b, hp // m, wp // m, m, m, c).permute(0, 1, 3, 2, 4, 5)
            y = out.reshape(b, hp, wp, c)[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class SamImageEncoder(nn.Module):
    """Patch embedding + absolute positions + ViT blocks + neck.

    Args:
        config: A :class:`mlatlas.vision.sam.SamConfig`.
    """

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.encoder_dim, cfg.patch_size,
                                     stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.encoder_dim))
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.encoder_dim, cfg.encoder_heads, cfg.encoder_mlp_dim,
                     0 if i in cfg.global_attn_indexes else cfg.window_size, grid, True, True,
                     cfg.encoder_eps)
            for i in range(cfg.encoder_depth))
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.encoder_dim, cfg.prompt_dim, 1, bias=False),
            ChannelLayerNorm(cfg.prompt_dim, eps=cfg.encoder_eps),
            nn.Conv2d(cfg.prompt_dim, cfg.prompt_dim, 3, padding=1, bias=False),
            ChannelLayerNorm(cfg.prompt_dim, eps=cfg.encoder_eps))

    def forward(self, x: Tensor) -> Tensor:
        """Image ``[B, 3, S, S]`` → embedding ``[B, prompt_dim, S/p, S/p]``."""
        x = self.patch_embed(x).permute(0, 2, 3, 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
