"""SAM — Segment Anything: a promptable segmentation model.

Kirillov, Mintun, Ravi, Mao, Rolland, Gustafson, Xiao, Whitehead, Berg, Lo, Dollár, Girshick
2023, arXiv:2304.02643. A heavy image encoder (:mod:`~mlatlas.vision.sam_image_encoder`)
runs once per image; a prompt encoder (:mod:`~mlatlas.vision.sam_prompt_encoder`) turns
points, boxes and masks into tokens; a light mask decoder
(:mod:`~mlatlas.vision.sam_mask_decoder`) answers each prompt in milliseconds with mask
logits and a predicted IoU. Because a single point is ambiguous (a shirt or the person
wearing it), the decoder returns K = 3 masks for it, trained with the loss of the best one
only, and ranks them by the predicted IoU.

============  ===========================================================================
``S``         input image side (1024 in the paper; the image is padded to a square)
``E``         ``S / patch`` embedding side; masks come out at ``4E × 4E`` (256 × 256)
``C``         prompt/decoder width (256)
inputs        see :class:`Sam.forward`; coordinates are pixels of the ``S × S`` input
outputs       :class:`SamOutput`: ``masks`` logits ``[B, P, K or 1, 4E, 4E]``,
              ``iou_scores`` ``[B, P, K or 1]``
============  ===========================================================================

Weights load from transformers (``SamModel``, :meth:`Sam.from_transformers`) and from Meta's
``segment_anything`` (:meth:`Sam.from_segment_anything`) by explicit key maps
(:mod:`mlatlas.vision.sam_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mlatlas.vision.sam_image_encoder import SamImageEncoder
from mlatlas.vision.sam_mask_decoder import SamMaskDecoder
from mlatlas.vision.sam_prompt_encoder import SamPromptEncoder
from mlatlas.vision.sam_weights import (
    hf_config_to_fields,
    load_mapped,
    segment_anything_key_map,
    transformers_key_map,
)

__all__ = ["Sam", "SamConfig", "SamOutput"]


@dataclass(frozen=True)
class SamConfig:
    """Sizes of a :class:`Sam` (defaults: ViT-B SAM; see :meth:`tiny` for tests).

    Attributes:
        image_size, patch_size, in_chans: Input side ``S``, patch side, channels.
        encoder_dim, encoder_depth, encoder_heads, encoder_mlp_dim: The ViT.
        window_size: Side of the windows of windowed blocks.
        global_attn_indexes: Blocks that attend globally.
        prompt_dim: ``C``: image-embedding, prompt and decoder width.
        mask_in_chans: Channels of the mask-prompt downscaler.
        decoder_depth, decoder_heads, decoder_mlp_dim: The two-way transformer.
        attention_downsample_rate: Cross-attention works in ``C / rate`` channels.
        num_multimask_outputs: ``K``.
        iou_head_depth, iou_head_hidden_dim: The IoU head.
        encoder_eps: LayerNorm epsilon of the encoder, neck and mask downscaler.
        decoder_eps: LayerNorm epsilon of the decoder blocks (transformers 1e-6, Meta 1e-5).
        decoder_final_eps: Epsilon of the decoder's final LayerNorm (1e-5 in both).
    """

    image_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_mlp_dim: int = 3072
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    encoder_eps: float = 1e-6
    decoder_eps: float = 1e-6
    decoder_final_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size "
                             f"{self.patch_size}")
        if self.encoder_dim % self.encoder_heads or self.prompt_dim % 8:
            raise ValueError(f"encoder_dim ({self.encoder_dim}) must be divisible by "
                             f"encoder_heads ({self.encoder_heads}) and prompt_dim "
                             f"({self.prompt_dim}) by 8")

    @classmethod
    def tiny(cls, **kw) -> SamConfig:
        """A CPU-sized SAM: 64 px, patch 4 (16 × 16 embedding), 4 ViT blocks, C = 32."""
        base = dict(image_size=64, patch_size=4, encoder_dim=48, encoder_depth=4,
                    encoder_heads=3, encoder_mlp_dim=96, window_size=5,
                    global_attn_indexes=(1, 3), prompt_dim=32, mask_in_chans=8,
                    decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32)
        return cls(**{**base, **kw})

    @property
    def embedding_size(self) -> int:
        """``E``: side of the image embedding."""
        return self.image_size // self.patch_size


class SamOutput(NamedTuple):
    """Mask logits ``[B, P, K or 1, 4E, 4E]`` and predicted IoUs ``[B, P, K or 1]``."""

    masks: Tensor
    iou_scores: Tensor


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder.

    Args:
        config: A :class:`SamConfig`.
    """

    def __init__(self, config: SamConfig | None = None):
        super().__init__()
        self.config = config or SamConfig()
        self.image_encoder = SamImageEncoder(self.config)
        self.prompt_encoder = SamPromptEncoder(self.config)
        self.mask_decoder = SamMaskDecoder(self.config)

    def _check(self, pixel_values, image_embeddings, points, labels, boxes, masks) -> int:
        cfg = self.config
        s, e = cfg.image_size, cfg.embedding_size
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        if pixel_values is not None:
            if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (cfg.in_chans, s, s):
                raise ValueError(f"pixel_values must be [B, {cfg.in_chans}, {s}, {s}] (pad the "
                                 f"image to a square), got {tuple(pixel_values.shape)}")
            batch = pixel_values.shape[0]
        else:
            if tuple(image_embeddings.shape[1:]) != (cfg.prompt_dim, e, e):
                raise ValueError(f"image_embeddings must be [B, {cfg.prompt_dim}, {e}, {e}], "
                                 f"got {tuple(image_embeddings.shape)}")
            batch = image_embeddings.shape[0]
        if points is not None:
            if points.dim() != 4 or points.shape[0] != batch or points.shape[-1] != 2:
                raise ValueError(f"points must be [B={batch}, P, N, 2], got {tuple(points.shape)}")
            if labels is None or labels.shape != points.shape[:3]:
                raise ValueError(f"labels must be [B, P, N] = {tuple(points.shape[:3])}, got "
                                 f"{None if labels is None else tuple(labels.shape)}")
            real = labels != -10
            if ((points < 0) | (points > s)).any(-1)[real].any():
                raise ValueError(f"points must lie inside the {s}×{s} input image, got x, y in "
                                 f"[{points.min().item():.1f}, {points.max().item():.1f}]")
        if boxes is not None:
            if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be [B={batch}, P, 4], got {tuple(boxes.shape)}")
            if ((boxes < 0) | (boxes > s)).any():
                raise ValueError(f"boxes must lie inside the {s}×{s} input image, got "
                                 f"coordinates in [{boxes.min().item():.1f}, "
                                 f"{boxes.max().item():.1f}]")
            if ((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])).any():
                raise ValueError("boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")
            if points is not None and points.shape[1] != boxes.shape[1]:
                raise ValueError(f"points and boxes need the same prompt count P, got "
                                 f"{points.shape[1]} and {boxes.shape[1]}")
        if masks is not None and tuple(masks.shape) != (batch, 1, 4 * e, 4 * e):
            raise ValueError(f"masks must be [B, 1, {4 * e}, {4 * e}] logits, got "
                             f"{tuple(masks.shape)}")
        return batch

    def forward(self, pixel_values: Tensor | None = None, points: Tensor | None = None,
                labels: Tensor | None = None, boxes: Tensor | None = None,
                masks: Tensor | None = None, image_embeddings: Tensor | None = None,
                multimask: bool = True) -> SamOutput:
        """Masks for each prompt.

        Args:
            pixel_values: ``[B, 3, S, S]`` normalised image (or pass ``image_embeddings``).
            points: ``[B, P, N, 2]`` pixel ``(x, y)``; ``labels`` ``[B, P, N]`` (1 positive,
                0 negative, −1 padding, −10 ignored).
            boxes: ``[B, P, 4]`` pixel ``(x1, y1, x2, y2)``.
            masks: ``[B, 1, 4E, 4E]`` mask logits (e.g. a previous prediction).
            image_embeddings: ``[B, C, E, E]`` from :meth:`embed_image`.
            multimask: K masks per prompt instead of one.

        Raises:
            ValueError: shapes that do not fit, or prompts outside the image.
        """
        batch = self._check(pixel_values, image_embeddings, points, labels, boxes, masks)
        if image_embeddings is None:
            image_embeddings = self.image_encoder(pixel_values)
        sparse, dense = self.prompt_encoder(points, labels, boxes, masks, batch)
        pe = self.prompt_encoder.pe.grid(self.config.embedding_size)
        m, iou = self.mask_decoder(image_embeddings, pe, sparse, dense, multimask)
        return SamOutput(m, iou)

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, S, S]`` → image embedding ``[B, C, E, E]`` (compute once, prompt often)."""
        self._check(pixel_values, None, None, None, None, None)
        return self.image_encoder(pixel_values)

    # -- weight loading ------------------------------------------------------------------
    @classmethod
    def from_transformers(cls, model_or_state_dict, config: SamConfig | None = None) -> Sam:
        """From a transformers ``SamModel`` (config read from it) or its state dict plus our
        :class:`SamConfig`."""
        sd = model_or_state_dict
        if isinstance(sd, nn.Module):
            config = config or SamConfig(**hf_config_to_fields(sd.config))
            sd = sd.state_dict()
        return cls._load(sd, config, transformers_key_map, "transformers")

    @classmethod
    def from_segment_anything(cls, model_or_state_dict, config: SamConfig) -> Sam:
        """From Meta's ``segment_anything`` ``Sam`` (or its state dict); its decoder blocks use
        LayerNorm's default epsilon, so pass ``config`` with ``decoder_eps=1e-5``."""
        sd = model_or_state_dict
        if isinstance(sd, nn.Module):
            sd = sd.state_dict()
        return cls._load(sd, config, segment_anything_key_map, "segment_anything")

    @classmethod
    def _load(cls, sd, config, key_map_fn, layout: str) -> Sam:
        if not isinstance(sd, dict):
            raise TypeError(f"model_or_state_dict must be an nn.Module or a state dict, got "
                            f"{type(sd).__name__}")
        if not isinstance(config, SamConfig):
            raise TypeError(f"config must be a SamConfig, got {type(config).__name__}")
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(load_mapped(model.state_dict(), sd, key_map_fn(config), layout),
                              strict=True, assign=True)
        return model
