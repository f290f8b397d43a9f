"""Key maps between :class:`mlatlas.vision.swin.SwinTransformer` and timm / torchvision.

Our parameter names follow the paper's parts (``patch_embed``, ``stages.s.downsample``,
``stages.s.blocks.j.attn``); timm keeps the same parts under ``layers`` and ``head.fc``,
torchvision flattens the stages into one ``features`` sequence (``features.0`` = patch
embedding, odd entries = stages, even entries ≥ 2 = patch merging) and numbers the MLP's
layers (``mlp.0``, ``mlp.3``). torchvision also stores each block's
``relative_position_index`` buffer, which we recompute: the map lists it under a key we do
not hold, so that the loader checks it against ours instead of loading it.

====================================  =============================================
ours                                  timm / torchvision
====================================  =============================================
``patch_embed.proj``                  ``patch_embed.proj`` / ``features.0.0``
``patch_embed.norm``                  ``patch_embed.norm`` / ``features.0.2``
``stages.s.downsample.*``             ``layers.s.downsample.*`` / ``features.2s.*``
``stages.s.blocks.j.mlp.fc1``         ``….mlp.fc1`` / ``features.2s+1.j.mlp.0``
``stages.s.blocks.j.mlp.fc2``         ``….mlp.fc2`` / ``features.2s+1.j.mlp.3``
``head``                              ``head.fc`` / ``head``
====================================  =============================================
"""

from __future__ import annotations

import math
import re

__all__ = ["LAYOUTS", "swin_config_from_state_dict", "swin_key_map"]

#: Weight layouts the loaders know.
LAYOUTS = ("timm", "torchvision")

_BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
                "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")
_TV_MLP = {"mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def swin_key_map(depths: tuple[int, ...], layout: str) -> dict[str, str]:
    """Our state-dict key → the ``layout``'s key, for a model with these stage depths.

    torchvision's ``relative_position_index`` buffers appear as values under keys of the
    form ``"<ours>.relative_position_index"`` that we do not hold (the loader checks them).
    """
    _check_layout(layout)
    tv = layout == "torchvision"
    m = {"patch_embed.proj.weight": "features.0.0.weight" if tv else "patch_embed.proj.weight",
         "patch_embed.proj.bias": "features.0.0.bias" if tv else "patch_embed.proj.bias",
         "patch_embed.norm.weight": "features.0.2.weight" if tv else "patch_embed.norm.weight",
         "patch_embed.norm.bias": "features.0.2.bias" if tv else "patch_embed.norm.bias",
         "norm.weight": "norm.weight", "norm.bias": "norm.bias",
         "head.weight": "head.weight" if tv else "head.fc.weight",
         "head.bias": "head.bias" if tv else "head.fc.bias"}
    for s, depth in enumerate(depths):
        if s > 0:
            for part in ("norm.weight", "norm.bias", "reduction.weight"):
                m[f"stages.{s}.downsample.{part}"] = (f"features.{2 * s}.{part}" if tv else
                                                       f"layers.{s}.downsample.{part}")
        for j in range(depth):
            for part in _BLOCK_PARTS:
                if tv:
                    head, _, leaf = part.rpartition(".")
                    m[f"stages.{s}.blocks.{j}.{part}"] = (
                        f"features.{2 * s + 1}.{j}.{_TV_MLP.get(head, head)}.{leaf}")
                else:
                    m[f"stages.{s}.blocks.{j}.{part}"] = f"layers.{s}.blocks.{j}.{part}"
            if tv:
                m[f"stages.{s}.blocks.{j}.attn.relative_position_index"] = (
                    f"features.{2 * s + 1}.{j}.attn.relative_position_index")
    return m


def swin_config_from_state_dict(sd: dict, layout: str) -> dict:
    """:class:`~mlatlas.vision.swin.SwinConfig` fields read off a timm/torchvision state dict.

    Raises:
        ValueError: the state dict lacks the patch embedding or any block.
    """
    _check_layout(layout)
    tv = layout == "torchvision"
    proj = sd.get("features.0.0.weight" if tv else "patch_embed.proj.weight")
    if proj is None:
        raise ValueError(f"not a {layout} Swin state dict: no patch embedding weight "
                         f"(got keys {sorted(sd)[:4]}…)")
    pattern = (re.compile(r"features\.(\d+)\.(\d+)\.attn\.qkv\.weight") if tv
               else re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.weight"))
    blocks: dict[int, int] = {}
    for key in sd:
        if hit := pattern.fullmatch(key):
            st = (int(hit[1]) - 1) // 2 if tv else int(hit[1])
            blocks[st] = max(blocks.get(st, 0), int(hit[2]) + 1)
    if not blocks:
        raise ValueError(f"not a {layout} Swin state dict: no attention blocks found")
    depths = tuple(blocks[s] for s in range(len(blocks)))
    first = ("features.1.0." if tv else "layers.0.blocks.0.")
    heads = tuple(sd[(f"features.{2 * s + 1}.0." if tv else f"layers.{s}.blocks.0.")
                     + "attn.relative_position_bias_table"].shape[1] for s in range(len(depths)))
    table = sd[first + "attn.relative_position_bias_table"].shape[0]
    fc1 = sd[first + ("mlp.0.weight" if tv else "mlp.fc1.weight")]
    head = sd["head.weight" if tv else "head.fc.weight"]
    return dict(embed_dim=proj.shape[0], depths=depths, num_heads=heads,
                window_size=(math.isqrt(table) + 1) // 2, patch_size=proj.shape[-1],
                in_chans=proj.shape[1], num_classes=head.shape[0],
                mlp_ratio=fc1.shape[0] / proj.shape[0])
