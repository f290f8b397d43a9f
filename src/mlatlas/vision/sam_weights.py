"""Key maps between :class:`mlatlas.vision.sam.Sam` and transformers / Meta's checkpoints.

Our module tree follows Meta's ``segment_anything`` (``image_encoder.blocks``,
``mask_decoder.output_upscaling``…), so its map is close to the identity; transformers
renames most layers (``vision_encoder.layers.i.layer_norm1``, ``mask_embed.conv1``,
``upscale_conv1``, the MLP heads' ``proj_in/layers/proj_out``). Keys the other side holds
that are no part of the network are listed and dropped on purpose: transformers' second
(tied) copy of the Fourier matrix and Meta's pixel mean/std buffers (we take images already
normalised). Everything else must match exactly, or loading fails naming the keys.

==========================================  =================================================
ours                                        transformers
==========================================  =================================================
``prompt_encoder.pe.gaussian``              ``shared_image_embedding.positional_embedding``
``image_encoder.blocks.i.norm1``            ``vision_encoder.layers.i.layer_norm1``
``image_encoder.neck.{0,1,2,3}``            ``vision_encoder.neck.{conv1,layer_norm1,…}``
``prompt_encoder.mask_downscaling.k``       ``prompt_encoder.mask_embed.{conv1,…}``
``mask_decoder.transformer.layers.i.normj`` ``….layers.i.layer_normj``
``mask_decoder.output_upscaling.{0,1,3}``   ``mask_decoder.upscale_{conv1,layer_norm,conv2}``
``….layers.{0, …, d−1}`` of an MLP head     ``proj_in``, ``layers.{0…}``, ``proj_out``
==========================================  =================================================
"""

from __future__ import annotations

__all__ = ["hf_config_to_fields", "load_mapped", "segment_anything_key_map",
           "transformers_key_map"]

_WB = ("weight", "bias")


def _attn(prefix_ours: str, prefix_theirs: str) -> dict[str, str]:
    return {f"{prefix_ours}.{p}.{x}": f"{prefix_theirs}.{p}.{x}"
            for p in ("q_proj", "k_proj", "v_proj", "out_proj") for x in _WB}


def _head(ours: str, theirs: str, depth: int, hf: bool) -> dict[str, str]:
    names = (["proj_in"] + [f"layers.{j}" for j in range(depth - 2)] + ["proj_out"] if hf
             else [f"layers.{j}" for j in range(depth)])
    return {f"{ours}.layers.{j}.{x}": f"{theirs}.{n}.{x}" for j, n in enumerate(names) for x in _WB}


def transformers_key_map(cfg) -> dict[str, str]:
    """Our key → transformers ``SamModel`` key."""
    m = {"prompt_encoder.pe.gaussian": "shared_image_embedding.positional_embedding",
         "image_encoder.pos_embed": "vision_encoder.pos_embed"}
    for x in _WB:
        m[f"image_encoder.patch_embed.{x}"] = f"vision_encoder.patch_embed.projection.{x}"
    for i in range(cfg.encoder_depth):
        o, t = f"image_encoder.blocks.{i}", f"vision_encoder.layers.{i}"
        for x in _WB:
            for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                         ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                         ("mlp.lin1", "mlp.lin1"), ("mlp.lin2", "mlp.lin2")):
                m[f"{o}.{a}.{x}"] = f"{t}.{b}.{x}"
        m[f"{o}.attn.rel_pos_h"], m[f"{o}.attn.rel_pos_w"] = (f"{t}.attn.rel_pos_h",
                                                              f"{t}.attn.rel_pos_w")
    m["image_encoder.neck.0.weight"] = "vision_encoder.neck.conv1.weight"
    m["image_encoder.neck.2.weight"] = "vision_encoder.neck.conv2.weight"
    for x in _WB:
        m[f"image_encoder.neck.1.{x}"] = f"vision_encoder.neck.layer_norm1.{x}"
        m[f"image_encoder.neck.3.{x}"] = f"vision_encoder.neck.layer_norm2.{x}"
        for k, name in ((0, "conv1"), (1, "layer_norm1"), (3, "conv2"), (4, "layer_norm2"),
                        (6, "conv3")):
            m[f"prompt_encoder.mask_downscaling.{k}.{x}"] = f"prompt_encoder.mask_embed.{name}.{x}"
    for name in ("no_mask_embed", "not_a_point_embed", *(f"point_embed.{k}" for k in range(4))):
        m[f"prompt_encoder.{name}.weight"] = f"prompt_encoder.{name}.weight"
    d, t = "mask_decoder", "mask_decoder"
    m[f"{d}.iou_token.weight"], m[f"{d}.mask_tokens.weight"] = (f"{t}.iou_token.weight",
                                                                f"{t}.mask_tokens.weight")
    for i in range(cfg.decoder_depth):
        o, h = f"{d}.transformer.layers.{i}", f"{t}.transformer.layers.{i}"
        for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            m.update(_attn(f"{o}.{name}", f"{h}.{name}"))
        for x in _WB:
            for j in range(1, 5):
                m[f"{o}.norm{j}.{x}"] = f"{h}.layer_norm{j}.{x}"
            m[f"{o}.mlp.lin1.{x}"], m[f"{o}.mlp.lin2.{x}"] = f"{h}.mlp.lin1.{x}", f"{h}.mlp.lin2.{x}"
    m.update(_attn(f"{d}.transformer.final_attn_token_to_image",
                   f"{t}.transformer.final_attn_token_to_image"))
    for x in _WB:
        m[f"{d}.transformer.norm_final_attn.{x}"] = f"{t}.transformer.layer_norm_final_attn.{x}"
        m[f"{d}.output_upscaling.0.{x}"] = f"{t}.upscale_conv1.{x}"
        m[f"{d}.output_upscaling.1.{x}"] = f"{t}.upscale_layer_norm.{x}"
        m[f"{d}.output_upscaling.3.{x}"] = f"{t}.upscale_conv2.{x}"
    for i in range(cfg.num_multimask_outputs + 1):
        m.update(_head(f"{d}.output_hypernetworks_mlps.{i}", f"{t}.output_hypernetworks_mlps.{i}",
                       3, hf=True))
    m.update(_head(f"{d}.iou_prediction_head", f"{t}.iou_prediction_head", cfg.iou_head_depth,
                   hf=True))
    return m


#: transformers keys that are no part of our network (a tied duplicate).
TRANSFORMERS_DROPPED = ("prompt_encoder.shared_embedding.positional_embedding",)
#: segment_anything keys that are no part of our network (input normalisation buffers).
SEGMENT_ANYTHING_DROPPED = ("pixel_mean", "pixel_std")


def segment_anything_key_map(cfg) -> dict[str, str]:
    """Our key → Meta ``segment_anything.modeling.Sam`` key."""
    hf = transformers_key_map(cfg)
    m = {}
    for ours in hf:
        theirs = ours
        if ours == "prompt_encoder.pe.gaussian":
            theirs = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
        elif ours.startswith("image_encoder.patch_embed."):
            theirs = ours.replace("patch_embed.", "patch_embed.proj.")
        elif ours.startswith("prompt_encoder.point_embed."):
            theirs = ours.replace("point_embed.", "point_embeddings.")
        m[ours] = theirs
    return m


def load_mapped(own: dict, sd: dict, key_map: dict[str, str], layout: str) -> dict:
    """Our state dict from ``sd`` by ``key_map`` (values cloned, shapes checked).

    Raises:
        ValueError: keys missing on either side (named), or a shape that differs.
    """
    dropped = TRANSFORMERS_DROPPED if layout == "transformers" else SEGMENT_ANYTHING_DROPPED
    missing = sorted(t for t in key_map.values() if t not in sd)
    unexpected = sorted(set(sd) - set(key_map.values()) - set(dropped))
    unmapped = sorted(set(own) - set(key_map))
    if missing or unexpected or unmapped:
        raise ValueError(f"{layout} key map: missing in the checkpoint {missing[:6]}, "
                         f"unexpected {unexpected[:6]}, ours without a source {unmapped[:6]}")
    out = {}
    for ours, theirs in key_map.items():
        value = sd[theirs]
        if tuple(value.shape) != tuple(own[ours].shape):
            raise ValueError(f"{layout} weight {theirs} has shape {tuple(value.shape)}, ours "
                             f"{ours} expects {tuple(own[ours].shape)}: the config does not "
                             "match the checkpoint")
        out[ours] = value.detach().clone()
    return out


def hf_config_to_fields(hf) -> dict:
    """:class:`~mlatlas.vision.sam.SamConfig` fields from a transformers ``SamConfig``."""
    v, p, d = hf.vision_config, hf.prompt_encoder_config, hf.mask_decoder_config
    if v.output_channels != p.hidden_size or p.hidden_size != d.hidden_size:
        raise ValueError(f"the vision output, prompt and decoder widths must agree, got "
                         f"{v.output_channels}, {p.hidden_size}, {d.hidden_size}")
    if not (v.use_abs_pos and v.use_rel_pos and v.qkv_bias):
        raise ValueError("only SAM's standard encoder (absolute + relative positions, qkv bias)")
    return dict(image_size=v.image_size, patch_size=v.patch_size, in_chans=v.num_channels,
                encoder_dim=v.hidden_size, encoder_depth=v.num_hidden_layers,
                encoder_heads=v.num_attention_heads, encoder_mlp_dim=v.mlp_dim,
                window_size=v.window_size, global_attn_indexes=tuple(v.global_attn_indexes),
                prompt_dim=d.hidden_size, mask_in_chans=p.mask_input_channels,
                decoder_depth=d.num_hidden_layers, decoder_heads=d.num_attention_heads,
                decoder_mlp_dim=d.mlp_dim, attention_downsample_rate=d.attention_downsample_rate,
                num_multimask_outputs=d.num_multimask_outputs, iou_head_depth=d.iou_head_depth,
                iou_head_hidden_dim=d.iou_head_hidden_dim, encoder_eps=v.layer_norm_eps,
                decoder_eps=d.layer_norm_eps)
