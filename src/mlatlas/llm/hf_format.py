"""Hugging Face checkpoint folders for the Llama family: config.json + safetensors.

A Hugging Face ``LlamaForCausalLM`` folder holds ``config.json`` and one or more
``*.safetensors`` files with parameters named ``model.layers.{i}.self_attn.q_proj.weight`` and
so on. Our parameter names are the same without the ``model.`` prefix; :func:`hf_key_map` is
the one explicit table between them, used by loading, saving and the parity tests. This
module knows the *format* only — dicts and tensors, never the model class:
:meth:`mlatlas.llm.llama.Llama.from_pretrained` builds the model from what
:func:`read_folder`, :func:`config_fields_from_hf` and :func:`state_from_hf` return. Loading
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["HFFolder", "config_fields_from_hf", "config_to_hf", "hf_key_map", "read_folder",
           "state_from_hf", "write_folder"]

_LAYER_PARAMS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


@dataclass
class HFFolder:
    """What a Hugging Face folder holds.

    Attributes:
        config: The parsed ``config.json``.
        tensors: Every tensor of every ``*.safetensors`` file, by Hugging Face name.
    """

    config: dict[str, Any]
    tensors: dict[str, Tensor]


def hf_key_map(config: Any) -> dict[str, str]:
    """Our parameter name → Hugging Face ``LlamaForCausalLM`` parameter name.

    Args:
        config: A :class:`~mlatlas.llm.llama.LlamaConfig` (read: ``num_layers``,
            ``tie_word_embeddings``).

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


def config_to_hf(config: Any, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` dict for ``transformers.LlamaConfig`` from a ``LlamaConfig``.

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


def config_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The ``LlamaConfig`` keyword arguments of a Hugging Face ``config.json`` dict.

    Old and new RoPE keys are both read (``rope_parameters``, or ``rope_theta`` +
    ``rope_scaling`` with ``rope_type`` or the older ``type``).

    Raises:
        ValueError: not a Llama config, a missing required key, or a feature we do not
            implement (biases, another activation, another RoPE scaling), named.
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
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def read_folder(path: str | Path) -> HFFolder:
    """Read ``config.json`` and every ``*.safetensors`` file of a Hugging Face folder.

    Raises:
        FileNotFoundError: no folder, no ``config.json`` or no ``*.safetensors``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json (expected a Hugging Face folder)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors file (pickled .bin checkpoints "
                                "are not loaded)")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return HFFolder(json.loads((path / "config.json").read_text()), tensors)


def state_from_hf(tensors: dict[str, Tensor], key_map: dict[str, str],
                  expected: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Our state dict from Hugging Face tensors, checked name by name and shape by shape.

    Args:
        tensors: Hugging Face name → tensor (as read by :func:`read_folder`).
        key_map: :func:`hf_key_map` of the model's config.
        expected: The model's own ``state_dict()`` (shapes; ``lm_head.weight`` is filled
            from the embedding when it is not in ``key_map``, i.e. tied).
        source: Named in error messages.

    Raises:
        ValueError: missing or unexpected tensors, or a tensor of the wrong shape.
    """
    tensors = dict(tensors)
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


def write_folder(path: str | Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (tensors by Hugging Face name).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: t.detach().contiguous().clone() for k, t in tensors.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
