"""SAM's mask decoder: a two-way transformer between prompt tokens and the image embedding.

Output tokens — one IoU token and ``1 + K`` mask tokens (``K = 3``) — are prepended to the
prompt tokens. Each of two decoder layers does (1) self-attention among tokens, (2)
cross-attention tokens → image, (3) an MLP on the tokens, (4) cross-attention image → tokens,
so both sides update; positional encodings are re-added to queries and keys at every
attention (Kirillov et al. 2023, arXiv:2304.02643, appendix A, Fig. 14). After a final
token → image attention the image embedding is upscaled 4× by two transposed convolutions,
and each mask token, through its own 3-layer MLP, becomes a dynamic linear classifier over
the upscaled pixels: mask logits ``= MLP_i(token_i) · upscaled``. A 3-layer MLP on the IoU
token predicts each mask's IoU. With ``multimask`` the K masks of the extra tokens are
returned (a point is ambiguous: whole, part, sub-part); otherwise the first token's one mask.

============  ==========================================================================
tokens        ``[B·P, T, C]``: IoU, 1 + K mask tokens, then the prompt tokens
image         ``[B·P, E², C]`` image embedding (+ dense prompt), ``pe`` its encoding
attention     cross-attention works in ``C / 2`` channels (``attention_downsample_rate``)
masks         ``[B, P, K or 1, 4E, 4E]`` logits; ``iou`` ``[B, P, K or 1]``
============  ==========================================================================
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlatlas.nn.attention import attend
from mlatlas.vision.sam_image_encoder import ChannelLayerNorm

__all__ = ["SamMaskDecoder", "TwoWayTransformer"]


class TokenAttention(nn.Module):
    """Multi-head attention whose q/k/v live in ``C / downsample`` channels."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        if inner % heads:
            raise ValueError(f"heads ({heads}) must divide the attention width {inner}")
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.v_proj, self.out_proj = nn.Linear(dim, inner), nn.Linear(inner, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q`` ``[B, Nq, C]``, ``k, v`` ``[B, Nk, C]`` → ``[B, Nq, C]``."""
        out = attend(self._split(self.q_proj(q)), self._split(self.k_proj(k)),
                     self._split(self.v_proj(v)))
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def _mlp_block(dim: int, hidden: int) -> nn.Sequential:
    mlp = nn.Sequential()
    mlp.lin1 = nn.Linear(dim, hidden)
    mlp.act = nn.ReLU()
    mlp.lin2 = nn.Linear(hidden, dim)
    return mlp


class TwoWayBlock(nn.Module):
    """Self-attn → token→image attn → MLP → image→token attn, each with a post-norm."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample: int, eps: float,
                 skip_first_pe: bool):
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = TokenAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_token_to_image = TokenAttention(dim, heads, downsample)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _mlp_block(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_image_to_token = TokenAttention(dim, heads, downsample)
        self.norm4 = nn.LayerNorm(dim, eps=eps)

    def forward(self, tokens: Tensor, image: Tensor, token_pe: Tensor,
                image_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_pe:  # the first layer's tokens are the prompt encodings themselves
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(
            tokens + token_pe, image + image_pe, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(
            image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token → image attention."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, downsample: int,
                 eps: float, final_eps: float):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, downsample, eps, i == 0)
                                    for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(dim, heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim, eps=final_eps)

    def forward(self, tokens: Tensor, image: Tensor, image_pe: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens`` ``[B, T, C]`` (also their encoding), ``image, image_pe`` ``[B, E², C]``."""
        token_pe = tokens
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe)
        tokens = self.norm_final_attn(tokens + self.final_attn_token_to_image(
            tokens + token_pe, image + image_pe, image))
        return tokens, image


class MLPHead(nn.Module):
    """``depth`` linear layers with ReLU between them."""

    def __init__(self, dim: int, hidden: int, out: int, depth: int):
        super().__init__()
        sizes = [dim] + [hidden] * (depth - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


class SamMaskDecoder(nn.Module):
    """Predicts mask logits and their IoU from image and prompt embeddings.

    Args:
        config: A :class:`mlatlas.vision.sam.SamConfig`.
    """

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        c = cfg.prompt_dim
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.transformer = TwoWayTransformer(c, cfg.decoder_depth, cfg.decoder_heads,
                                             cfg.decoder_mlp_dim, cfg.attention_downsample_rate,
                                             cfg.decoder_eps, cfg.decoder_final_eps)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, 2, stride=2), ChannelLayerNorm(c // 4, eps=1e-6),
            nn.GELU(), nn.ConvTranspose2d(c // 4, c // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLPHead(c, c, c // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLPHead(c, cfg.iou_head_hidden_dim, self.num_mask_tokens,
                                           cfg.iou_head_depth)

    def forward(self, image: Tensor, image_pe: Tensor, sparse: Tensor | None, dense: Tensor,
                multimask: bool) -> tuple[Tensor, Tensor]:
        """
        Args:
            image: ``[B, C, E, E]`` image embedding.
            image_pe: ``[C, E, E]`` its positional encoding.
            sparse: ``[B, P, T, C]`` prompt tokens or None.
            dense: ``[B, C, E, E]`` dense prompt.
            multimask: Return the K ambiguity-aware masks instead of the single one.

        Returns:
            ``masks`` ``[B, P, K or 1, 4E, 4E]`` logits and ``iou`` ``[B, P, K or 1]``.
        """
        b, c, e, _ = image.shape
        p = sparse.shape[1] if sparse is not None else 1
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = out_tokens.expand(b, p, -1, -1)
        if sparse is not None:
            tokens = torch.cat([tokens, sparse], 2)
        tokens = tokens.reshape(b * p, -1, c)
        src = (image + dense).repeat_interleave(p, 0).flatten(2).transpose(1, 2)  # [B·P, E², C]
        pe = image_pe.flatten(1).t().expand(b * p, -1, -1)
        tokens, src = self.transformer(tokens, src, pe)
        iou_out = tokens[:, 0]
        mask_out = tokens[:, 1:1 + self.num_mask_tokens]
        up = self.output_upscaling(src.transpose(1, 2).reshape(b * p, c, e, e))  # [B·P, C/8, 4E, 4E]
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        # each mask token is a linear classifier over the upscaled pixels
        masks = (hyper @ up.flatten(2)).view(b, p, self.num_mask_tokens, 4 * e, 4 * e)
        iou = self.iou_prediction_head(iou_out).view(b, p, self.num_mask_tokens)
        keep = slice(1, None) if multimask else slice(0, 1)
        return masks[:, :, keep], iou[:, :, keep]
