"""SAM's prompt encoder: points, boxes and masks as tokens and a dense map.

Sparse prompts become tokens of width ``C``: a point or a box corner at pixel ``(x, y)`` is
encoded by random Fourier features (Tancik et al. 2020, arXiv:2006.10739) of its position
normalised to ``[−1, 1]``, ``[sin(2π pG), cos(2π pG)]`` with a fixed Gaussian ``G ∈
R^{2×C/2}``, plus a learned embedding of its kind (negative point, positive point, box
top-left, box bottom-right); a padding point (label −1) is a learned "not a point" token.
A mask prompt (``4E × 4E`` logits) is downscaled by two stride-2 convolutions to the
``E × E`` embedding grid and added to the image embedding; without one a learned
"no mask" vector is added everywhere. The same Fourier features of the grid's cell centres
are the image's positional encoding in the decoder (Kirillov et al. 2023, §3, appendix A).

============  ===========================================================================
points        ``[B, P, N, 2]`` pixels ``(x, y)`` in the ``S × S`` input, labels
              ``[B, P, N]``: 1 positive, 0 negative, −1 padding, −10 ignored
boxes         ``[B, P, 4]`` pixels ``(x1, y1, x2, y2)``
masks         ``[B, 1, 4E, 4E]`` mask logits
sparse        ``[B, P, T, C]`` prompt tokens; dense ``[B, C, E, E]``
============  ===========================================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mlatlas.vision.sam_image_encoder import ChannelLayerNorm

__all__ = ["FourierPositionalEncoding", "SamPromptEncoder"]


class FourierPositionalEncoding(nn.Module):
    """Random Fourier features ``[sin(2π(2u − 1)G), cos(2π(2u − 1)G)]`` of ``u ∈ [0, 1]²``."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("gaussian", torch.randn(2, dim // 2))  # G: drawn once, not learned

    def forward(self, coords01: Tensor) -> Tensor:
        """``[..., 2]`` normalised ``(x, y)`` → ``[..., dim]``."""
        proj = 2 * math.pi * ((2 * coords01 - 1) @ self.gaussian)
        return torch.cat([torch.sin(proj), torch.cos(proj)], -1)

    def grid(self, size: int) -> Tensor:
        """``[dim, size, size]``: the encoding of every cell centre of a ``size²`` grid."""
        centres = (torch.arange(size, device=self.gaussian.device,
                                dtype=self.gaussian.dtype) + 0.5) / size
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return self(torch.stack([xs, ys], -1)).permute(2, 0, 1)


class SamPromptEncoder(nn.Module):
    """Embeds point, box and mask prompts (see the module table).

    Args:
        config: A :class:`mlatlas.vision.sam.SamConfig`.
    """

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        c = cfg.prompt_dim
        self.pe = FourierPositionalEncoding(c)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.point_embed = nn.ModuleList(nn.Embedding(1, c) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, c)
        self.no_mask_embed = nn.Embedding(1, c)
        m = cfg.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, m // 4, 2, stride=2), ChannelLayerNorm(m // 4, eps=cfg.encoder_eps),
            nn.GELU(),
            nn.Conv2d(m // 4, m, 2, stride=2), ChannelLayerNorm(m, eps=cfg.encoder_eps),
            nn.GELU(),
            nn.Conv2d(m, c, 1))

    def _encode(self, xy: Tensor) -> Tensor:
        return self.pe((xy + 0.5) / self.config.image_size)  # pixel centres, normalised

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """``[B, P, N, 2]``, ``[B, P, N]`` → ``[B, P, N (+1 pad), C]``."""
        if pad:  # without a box SAM appends one padding point
            points = torch.cat([points, points.new_zeros(*points.shape[:2], 1, 2)], 2)
            labels = torch.cat([labels, labels.new_full((*labels.shape[:2], 1), -1)], 2)
        emb = self._encode(points)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = torch.where(lab == -10, torch.zeros_like(emb), emb)
        emb = emb + (lab == 0) * self.point_embed[0].weight + (lab == 1) * self.point_embed[1].weight
        return emb

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """``[B, P, 4]`` → two corner tokens ``[B, P, 2, C]``."""
        emb = self._encode(boxes.reshape(*boxes.shape[:2], 2, 2))
        kind = torch.cat([self.point_embed[2].weight, self.point_embed[3].weight])  # [2, C]
        return emb + kind

    def forward(self, points: Tensor | None, labels: Tensor | None, boxes: Tensor | None,
                masks: Tensor | None, batch: int) -> tuple[Tensor | None, Tensor]:
        """Sparse tokens ``[B, P, T, C]`` (or None) and the dense map ``[B, C, E, E]``."""
        tokens = []
        if points is not None:
            tokens.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self.embed_boxes(boxes))
        sparse = torch.cat(tokens, 2) if tokens else None
        e = self.config.image_size // self.config.patch_size
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, e, e)
        return sparse, dense
