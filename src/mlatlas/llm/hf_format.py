"""Hugging Face checkpoints for :class:`~mlatlas.llm.llama.Llama`: config.json + safetensors.

A Hugging Face ``LlamaForCausalLM`` folder holds ``config.json`` and one or more
``*.safetensors`` files with parameters named ``model.layers.{i}.self_attn.q_proj.weight`` and
so on. Our parameter names are the same without the ``model.`` prefix; :func:`hf_key_map` is
the one explicit table between them, used by loading, saving and the parity tests. Loading
reads safetensors only (never pickle) and fails on missing or unexpected tensors.

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
=====================  ==============================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mlatlas.llm.llama import Llama, LlamaConfig

__all__ = ["config_from_hf", "config_to_hf", "hf_key_map", "load_pretrained",
           "save_pretrained"]

_LAYER_PARAMS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def hf_key_map(config: LlamaConfig) -> dict[str, str]:
    """Our parameter name → Hugging Face ``LlamaForCausalLM`` parameter name.

    With tied embeddings ``lm_head.weight`` is left out (it is ``embed_tokens.weight`` in both
    models, and Hugging Face does not store it).
    """
    out = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(config.num_layers):
        for name in _LAYER_PARAMS:
            out[f"layers.{i}.{name}"] = f"model.layers.{i}.{name}"
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    return out


def config_to_hf(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` dict for ``transformers.LlamaConfig``.

    RoPE is written both ways: ``rope_parameters`` (transformers ≥ 5) and the older
    ``rope_theta`` + ``rope_scaling``.
    """
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_type": "llama3", "rope_theta": rope["rope_theta"]}
        rope.pop("type", None)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": float(config.rope_theta),
        "rope_scaling": None if config.rope_scaling is None else
        {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "dtype": str(dtype).removeprefix("torch."),
    }


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict (old or new RoPE keys).

    Raises:
        ValueError: not a Llama config, a missing required key, or a feature we do not
            implement (biases, another activation, another RoPE scaling).
    """
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: expected model_type 'llama', got {hf['model_type']!r}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"config.json is missing required keys {missing}")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (expected {ok!r})")
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older files write
    # rope_theta at the top and rope_scaling (None or {"rope_type"/"type": ...})
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
        scaling["rope_type"] = kind
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def save_pretrained(model: Llama, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (Hugging Face names) into ``path``.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    if not isinstance(model, Llama):
        raise TypeError(f"model must be a Llama, got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {hf: state[ours].detach().contiguous().clone()
               for ours, hf in hf_key_map(model.config).items()}
    dtype = model.embed_tokens.weight.dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2)
                                      + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> Llama:
    """Build a :class:`Llama` from a Hugging Face folder.

    Args:
        path: Folder with ``config.json`` and ``*.safetensors`` (one file or shards).
        dtype: Parameter dtype of the returned model.

    Raises:
        FileNotFoundError: no folder, no ``config.json`` or no ``*.safetensors``.
        ValueError: missing or unexpected tensors, or a tensor of the wrong shape.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json (expected a Hugging Face folder)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors file (pickled .bin checkpoints "
                                "are not loaded)")
    config = config_from_hf(json.loads((path / "config.json").read_text()))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    key_map = hf_key_map(config)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # a redundant copy some exporters keep
    missing = sorted(set(key_map.values()) - set(tensors))
    unexpected = sorted(set(tensors) - set(key_map.values()))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing tensors "
                         f"{missing[:6]}{'…' if len(missing) > 6 else ''}, unexpected "
                         f"{unexpected[:6]}{'…' if len(unexpected) > 6 else ''}")
    model = Llama(config).to(dtype)
    own = model.state_dict()
    for ours, hf in key_map.items():
        if tuple(tensors[hf].shape) != tuple(own[ours].shape):
            raise ValueError(f"tensor {hf}: expected shape {tuple(own[ours].shape)}, got "
                             f"{tuple(tensors[hf].shape)}")
    state = {ours: tensors[hf].to(dtype) for ours, hf in key_map.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model
