"""Kimi-VL: a MoonViT encoder, an MLP projector and a mixture-of-experts language decoder.

Kimi-VL is a vision-language model in three parts: the native-resolution MoonViT encoder
(:mod:`mlatlas.llm.moonvit`) reads every image at its own size, a 2 × 2 pixel-shuffle merger
and an MLP projector turn its patch features into token embeddings, and those embeddings
replace the image placeholder tokens of the prompt fed to a Moonlight decoder — a
DeepSeek-V3-style Transformer whose feed-forward blocks are mixtures of experts with shared
experts (:mod:`mlatlas.llm.moe`), so only ``k`` of ``E`` routed experts run per token.
Kimi Team 2025, "Kimi-VL Technical Report", arXiv:2504.07491; Moonlight (Liu et al. 2025,
"Muon is Scalable for LLM Training", arXiv:2502.16982); DeepSeek-AI 2024, arXiv:2412.19437.

Moonlight's attention is DeepSeek's multi-head latent attention; here the decoder reuses the
Llama attention of :mod:`mlatlas.llm.llama` (GQA + RoPE through
:func:`mlatlas.nn.attention.attend`) and keeps the first ``first_k_dense`` layers dense, as
DeepSeek-V3's ``first_k_dense_replace`` does. Sequences can be packed (``cu_seqlens``): a whole
batch of prompts with images of different sizes is one row for the encoder *and* the decoder.

=============  ==============================================================
``T``          tokens of the (packed) prompt stream;  ``<img>`` = ``image_token_id``
``M``          merged image tokens = number of ``<img>`` placeholders
``d``          decoder width;  ``V`` vocabulary
=============  ==============================================================

One decoder layer::

    h       = x + Attn(RMSNorm(x))                 # causal, RoPE, per packed document
    x_{l+1} = h + MoE(RMSNorm(h))                  # or a dense SwiGLU for l < first_k_dense
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlatlas.attention.reference import QKVShape, check_cu_seqlens
from mlatlas.llm.llama import AttentionMask, LlamaAttention
from mlatlas.llm.llama_config import LlamaConfig
from mlatlas.llm.moe import MoEConfig, MoELayer
from mlatlas.llm.moonvit import MoonViT, MoonViTConfig, MoonViTProjector, PackedImages
from mlatlas.nn.feedforward import GatedFeedForward
from mlatlas.nn.norms import RMSNorm
from mlatlas.nn.rope import packed_position_ids, rope_cos_sin, rope_inv_freq

__all__ = ["KimiVL", "KimiVLConfig", "KimiVLDecoderLayer"]


@dataclass(frozen=True)
class KimiVLConfig:
    """A Kimi-VL model.

    Attributes:
        vision: The encoder's :class:`~mlatlas.llm.moonvit.MoonViTConfig`.
        text: The decoder's sizes, attention and RoPE (a
            :class:`~mlatlas.llm.llama_config.LlamaConfig`; ``intermediate_size`` is the width
            of the dense layers).
        moe: The :class:`~mlatlas.llm.moe.MoEConfig` of the MoE layers (``hidden_size`` equal to
            the decoder's).
        first_k_dense: Decoder layers ``l < first_k_dense`` keep a dense SwiGLU FFN.
        image_token_id: The placeholder token that image embeddings replace.
    """

    vision: MoonViTConfig
    text: LlamaConfig
    moe: MoEConfig
    first_k_dense: int = 0
    image_token_id: int = 0

    def __post_init__(self) -> None:
        if self.moe.hidden_size != self.text.hidden_size:
            raise ValueError(f"moe.hidden_size must equal text.hidden_size="
                             f"{self.text.hidden_size}, got {self.moe.hidden_size}")
        if not 0 <= self.first_k_dense <= self.text.num_layers:
            raise ValueError(f"first_k_dense must lie in [0, {self.text.num_layers}], got "
                             f"{self.first_k_dense}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id must lie in [0, {self.text.vocab_size}), got "
                             f"{self.image_token_id}")


class KimiVLDecoderLayer(nn.Module):
    """Pre-norm block with Llama attention and a MoE (or dense) feed-forward block."""

    def __init__(self, config: KimiVLConfig, layer_idx: int):
        super().__init__()
        t = config.text
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_attn = LlamaAttention(t, layer_idx)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.mlp = (GatedFeedForward(t.hidden_size, t.intermediate_size)
                    if layer_idx < config.first_k_dense else MoELayer(config.moe))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask) -> Tensor:
        """``x [B, T, d]`` → ``[B, T, d]``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)  # h = x + Attn(Norm x)
        return x + self.mlp(self.post_attention_layernorm(x))  # x' = h + MoE(Norm h)


class KimiVL(nn.Module):
    """Vision encoder + projector + MoE decoder (see the module notes).

    Attributes:
        vision_tower: :class:`~mlatlas.llm.moonvit.MoonViT`.
        mm_projector: :class:`~mlatlas.llm.moonvit.MoonViTProjector`.
        embed_tokens, layers, norm, lm_head: The decoder.

    Shapes:
        ``input_ids [B, T]`` (+ images) → logits ``[B, T, V]``.
    """

    def __init__(self, config: KimiVLConfig):
        super().__init__()
        if not isinstance(config, KimiVLConfig):
            raise TypeError(f"config must be a KimiVLConfig, got {type(config).__name__}")
        self.config = config
        v, t = config.vision, config.text
        self.vision_tower = MoonViT(v)
        self.mm_projector = MoonViTProjector(v.hidden_size, v.merge_kernel_size[0] *
                                             v.merge_kernel_size[1], t.hidden_size,
                                             v.layer_norm_eps)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(KimiVLDecoderLayer(config, i) for i in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(t.head_dim, t.rope_theta)
        for m in (self.embed_tokens, self.lm_head):
            nn.init.normal_(m.weight, std=t.initializer_range)

    def moe_layers(self) -> list[MoELayer]:
        """The decoder's MoE blocks, first to last."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoELayer)]

    def image_embeddings(self, images: PackedImages) -> Tensor:
        """``[M, d]``: encode, merge 2 × 2 and project every image of the pack."""
        return self.mm_projector(self.vision_tower(images.pixel_values, images.grid_hw))

    def forward(self, input_ids: Tensor, images: PackedImages | None = None, *,
                cu_seqlens: Tensor | None = None) -> Tensor:
        """Next-token logits of prompts whose ``<img>`` placeholders hold the images.

        Args:
            input_ids: int64 ``[B, T]``; the ``i``-th ``<img>`` of the flattened stream is
                replaced by the ``i``-th merged image token of ``images``.
            images: :class:`~mlatlas.llm.moonvit.PackedImages` (``None``: text only).
            cu_seqlens: Packed documents in the flattened ``B·T`` stream (causal attention
                within each; positions restart at 0).

        Returns:
            Logits ``[B, T, V]``.

        Raises:
            ValueError: token ids out of range, bad ``cu_seqlens``, or a number of ``<img>``
                placeholders different from the number of merged image tokens.
        """
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.int64 or \
                input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty int64 tensor [B, T], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= c.text.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {c.text.vocab_size}) (vocab_size), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        slots = input_ids == c.image_token_id
        n_slots = int(slots.sum())
        n_tokens = 0 if images is None else sum(images.merged_counts(c.vision.merge_kernel_size))
        if n_slots != n_tokens:
            raise ValueError(f"input_ids hold {n_slots} image placeholders (image_token_id="
                             f"{c.image_token_id}) but the images give {n_tokens} merged tokens")
        if images is not None:  # the placeholders take the projected image tokens, in order
            feats = self.image_embeddings(images).to(x.dtype)
            x = x.masked_scatter(slots[..., None], feats)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, None, QKVShape(1, 1, 1, B * T, B * T, 1))
            pos = packed_position_ids(cu_seqlens).view(1, B * T)
            x = x.reshape(1, B * T, -1)
        else:
            pos = torch.arange(T, device=input_ids.device)[None]
        cos, sin = rope_cos_sin(pos, self.inv_freq, x.dtype)
        mask = AttentionMask(causal=True, cu_seqlens=cu_seqlens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x)).view(B, T, -1)

    def aux_loss(self) -> Tensor | None:
        """Sum of the MoE layers' auxiliary losses of the last forward (``None`` if off)."""
        losses = [m.last_aux_loss for m in self.moe_layers() if m.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def update_router_biases(self) -> Tensor:
        """One bias-balancing step in every MoE layer; returns their loads ``[L_moe, E]``."""
        return torch.stack([m.update_bias() for m in self.moe_layers()])
