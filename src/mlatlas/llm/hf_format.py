"""Hugging Face checkpoint folders of the Llama family (Llama, Mistral, Qwen2): config + safetensors.

A Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` folder
holds ``config.json`` and the weights as ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``, with parameters named ``model.layers.{i}.self_attn.q_proj.weight``
and so on. Our parameter names are the same without the ``model.`` prefix; :func:`hf_key_map`
is the one explicit table between them, used by loading, saving and the parity tests. This
module knows the *format* only — configs, dicts and tensors, never the model class:
:meth:`mlatlas.llm.llama.Llama.from_pretrained` builds the model from what
:func:`read_folder`, :func:`config_from_hf` and :func:`state_from_hf` return.

The three families differ only in options, which :func:`config_from_hf` reads as the
pinned transformers interprets them (its defaults for missing keys included): Mistral slides
a window over every layer (``sliding_window``, default 4096; ``layer_types`` ignored); Qwen2
has q/k/v biases and slides only where ``layer_types`` says, which defaults to the layers
``i >= max_window_layers`` when ``use_sliding_window``. Options we cannot compute are refused
by name. Loading reads safetensors only (never pickle), any dtype, and fails on missing or
unexpected tensors; the non-persistent RoPE buffers older exports carry are skipped.

=====================  ==============================================
ours                   Hugging Face
=====================  ==============================================
``embed_tokens``       ``model.embed_tokens``
``layers.{i}.…``       ``model.layers.{i}.…``
``norm``               ``model.norm``
``lm_head``            ``lm_head`` (absent when embeddings are tied)
``num_layers``         ``num_hidden_layers``
``num_heads``          ``num_attention_heads``
``num_kv_heads``       ``num_key_value_heads``
``rope_scaling``       ``rope_scaling`` or ``rope_parameters`` (minus ``rope_theta``)
=====================  ==============================================
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlatlas.llm.llama_config import LlamaConfig

__all__ = ["ARCHITECTURES", "HFFolder", "config_from_hf", "config_to_hf", "hf_key_map",
           "read_folder", "state_from_hf", "write_folder"]

#: ``model_type`` → the transformers class its folders are written for.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}

# transformers' defaults for keys a config.json may omit (the pinned version's config classes)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048,
              "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "bos_token_id": None, "eos_token_id": None},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
# non-persistent buffers some exporters saved (transformers skips them when loading)
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")


@dataclass
class HFFolder:
    """What a Hugging Face folder holds.

    Attributes:
        config: The parsed ``config.json``.
        tensors: Every weight of the checkpoint (one file or all shards), by Hugging Face name.
    """

    config: dict[str, Any]
    tensors: dict[str, Tensor]


def hf_key_map(config: LlamaConfig) -> dict[str, str]:
    """Our parameter name → Hugging Face parameter name (the same for all three families).

    Args:
        config: The model's config (read: ``num_layers``, ``tie_word_embeddings`` and the
            three bias options).

    With tied embeddings ``lm_head.weight`` is left out (it is ``embed_tokens.weight`` in both
    models, and Hugging Face does not store it).
    """
    qkv, o = config.attention_bias or config.qkv_bias, config.attention_bias
    names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    for proj, bias in (("q", qkv), ("k", qkv), ("v", qkv), ("o", o)):
        names += [f"self_attn.{proj}_proj.weight"] + ([f"self_attn.{proj}_proj.bias"] if bias
                                                      else [])
    for proj in ("gate", "up", "down"):
        names += [f"mlp.{proj}_proj.weight"] + ([f"mlp.{proj}_proj.bias"] if config.mlp_bias
                                                else [])
    out = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(config.num_layers):
        for name in names:
            out[f"layers.{i}.{name}"] = f"model.layers.{i}.{name}"
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    return out


def config_to_hf(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` dict for transformers' class of ``config.model_type``.

    RoPE is written both ways: ``rope_parameters`` (transformers ≥ 5) and the older
    ``rope_theta`` + ``rope_scaling``.

    Raises:
        ValueError: an option the family's transformers class cannot express (named).
    """
    kind, windows = config.model_type, [config.window(i) for i in range(config.num_layers)]
    refuse = {
        "llama": [("sliding_window", any(w is not None for w in windows)),
                  ("qkv_bias without attention_bias", config.qkv_bias and not
                   config.attention_bias)],
        "mistral": [("attention_bias", config.attention_bias), ("qkv_bias", config.qkv_bias),
                    ("mlp_bias", config.mlp_bias),
                    ("layer_types (a window on some layers only)", len(set(windows)) > 1)],
        "qwen2": [("attention_bias (o_proj bias)", config.attention_bias),
                  ("mlp_bias", config.mlp_bias),
                  ("qkv_bias=False (Qwen2 always has q/k/v biases)", not config.qkv_bias)],
    }[kind]
    for name, bad in refuse:
        if bad:
            raise ValueError(f"model_type {kind!r} ({ARCHITECTURES[kind]}) cannot express "
                             f"{name}; use another model_type")
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_theta": float(config.rope_theta)}
    out = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "rope_theta": float(config.rope_theta),
        "rope_scaling": None if config.rope_scaling is None else
        {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if kind == "llama":
        out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    elif kind == "mistral":
        out["sliding_window"] = windows[0]  # written even when None (the default is 4096)
    else:
        out.update(use_sliding_window=config.sliding_window is not None,
                   sliding_window=config.sliding_window, max_window_layers=config.num_layers,
                   layer_types=["full_attention" if w is None else "sliding_attention"
                                for w in windows])
    return out


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """The :class:`LlamaConfig` of a ``config.json`` dict (Llama, Mistral or Qwen2).

    RoPE is read as transformers reads it: ``rope_scaling`` if set, else ``rope_parameters``
    (old ``{"type": ...}`` spelling included), ``rope_theta`` from inside it or the top level.

    Raises:
        ValueError: another ``model_type``, a missing required key, or an option we cannot
            compute (a quantization, attention dropout, partial rotary embeddings, an unknown
            activation, RoPE type or layer type…), each named.
    """
    kind = hf.get("model_type", "llama")
    if kind not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type must be one of {list(ARCHITECTURES)}, got "
                         f"{kind!r}")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"config.json is missing required keys {missing}")
    hf = {**_DEFAULTS[kind], **hf}
    for key, ok in (("quantization_config", None), ("attention_dropout", 0.0),
                    ("partial_rotary_factor", 1.0)):
        if hf.get(key) not in (None, ok):
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (expected "
                             f"{ok!r})")
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    if scaling is None and set(rope) - {"rope_type", "type"}:
        scaling = rope  # let the RoPE check name the stray keys
    fields: dict[str, Any] = dict(
        model_type=kind, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim"), hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"))
    if kind == "llama":
        fields.update(attention_bias=bool(hf.get("attention_bias", False)),
                      mlp_bias=bool(hf.get("mlp_bias", False)))
    elif kind == "mistral":  # one window for every layer; transformers ignores layer_types
        fields["sliding_window"] = hf["sliding_window"]
    else:
        window = hf["sliding_window"] if hf["use_sliding_window"] else None
        types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= hf["max_window_layers"]
            else "full_attention" for i in range(hf["num_hidden_layers"])]
        if "sliding_attention" in types and window is None:
            raise ValueError("config.json: layer_types has sliding_attention layers but "
                             "use_sliding_window is false or sliding_window is null "
                             "(transformers cannot run it either)")
        fields.update(qkv_bias=True, sliding_window=window, layer_types=list(types))
    return LlamaConfig(**fields)


def read_folder(path: str | Path) -> HFFolder:
    """Read ``config.json`` and the weights (``model.safetensors`` or its indexed shards).

    Raises:
        FileNotFoundError: no folder, no ``config.json``, no safetensors weights, or a shard
            the index names that is not there.
        ValueError: a tensor the index names that its shard does not hold.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json (expected a Hugging Face folder)")
    index = path / "model.safetensors.index.json"
    tensors: dict[str, Tensor] = {}
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise FileNotFoundError(f"{path}: shard {shard} named by {index.name} is missing")
            tensors.update(load_file(str(path / shard)))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{path}: tensors {absent[:6]} named by {index.name} are in no shard")
    elif (path / "model.safetensors").is_file():
        tensors = load_file(str(path / "model.safetensors"))
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index"
                                ".json (pickled .bin checkpoints are not loaded)")
    return HFFolder(json.loads((path / "config.json").read_text()), tensors)


def state_from_hf(tensors: dict[str, Tensor], key_map: dict[str, str],
                  expected: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Our state dict from Hugging Face tensors, checked name by name and shape by shape.

    Args:
        tensors: Hugging Face name → tensor (as read by :func:`read_folder`), any dtype.
        key_map: :func:`hf_key_map` of the model's config.
        expected: The model's own ``state_dict()`` (shapes and dtypes; ``lm_head.weight`` is
            filled from the embedding when it is not in ``key_map``, i.e. tied).
        source: Named in error messages.

    Raises:
        ValueError: missing or unexpected tensors, or a tensor of the wrong shape.
    """
    tensors = {k: t for k, t in tensors.items() if not _IGNORED_TENSORS.search(k)}
    if "lm_head.weight" not in key_map:
        tensors.pop("lm_head.weight", None)  # tied: a redundant copy some exporters keep
    missing = sorted(set(key_map.values()) - set(tensors))
    unexpected = sorted(set(tensors) - set(key_map.values()))
    if missing or unexpected:
        raise ValueError(f"{source} does not match its config: missing tensors "
                         f"{missing[:6]}{'…' if len(missing) > 6 else ''}, unexpected "
                         f"{unexpected[:6]}{'…' if len(unexpected) > 6 else ''}")
    state = {}
    for ours, hf in key_map.items():
        if tuple(tensors[hf].shape) != tuple(expected[ours].shape):
            raise ValueError(f"tensor {hf}: expected shape {tuple(expected[ours].shape)}, got "
                             f"{tuple(tensors[hf].shape)}")
        state[ours] = tensors[hf].to(expected[ours].dtype)
    if "lm_head.weight" in expected and "lm_head.weight" not in key_map:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def write_folder(path: str | Path, config: dict[str, Any], tensors: dict[str, Tensor],
                 max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and the tensors (Hugging Face names) as transformers does.

    Args:
        path: The folder (created).
        config: The ``config.json`` dict.
        tensors: Hugging Face name → tensor.
        max_shard_bytes: ``None`` → one ``model.safetensors``; else shards
            ``model-0000k-of-0000n.safetensors`` of at most this size (a tensor larger than it
            gets a shard of its own) and ``model.safetensors.index.json``.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: t.detach().contiguous().clone() for k, t in tensors.items()}
    if max_shard_bytes is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return path
