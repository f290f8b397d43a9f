"""peft's adapter folders, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

A folder written by ``PeftModel.save_pretrained`` holds the adapter's config (peft's
``LoraConfig`` / ``PrefixTuningConfig`` fields as JSON, with ``peft_type``) and its tensors in
safetensors, named as in the wrapped model's state dict with the adapter name removed and the
prefix ``base_model.model.`` (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
for a ``LlamaForCausalLM``). This module writes such folders from our models and reads
peft's into them; it reads safetensors only, never pickle, and refuses what it does not
implement rather than loading something that would compute differently.

===========================  ===================================================
``adapter_config.json``      peft config fields; ``peft_type`` ``"LORA"`` here
``adapter_model.safetensors``  ``base_model.model.<public name>.<tensor>``
public name                  :func:`mlatlas.peft.targets.public_name` (HF names for Llama)
===========================  ===================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlatlas.llm.llama import Llama
from mlatlas.peft.lora import (
    LoraConfig,
    apply_lora,
    lora_config_of,
    lora_layers,
    unload_lora,
)
from mlatlas.peft.targets import public_name

__all__ = ["CONFIG_NAME", "KEY_PREFIX", "WEIGHTS_NAME", "load_adapter", "lora_config_from_peft",
           "lora_config_to_peft", "lora_state_dict", "read_adapter_config", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: What ``PeftModel.state_dict()`` puts before the wrapped model's own names.
KEY_PREFIX = "base_model.model."

# adapter_config.json keys of peft's LoraConfig, by what loading does with them
_LORA_USED = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
              "use_rslora", "init_lora_weights", "exclude_modules"}
# metadata, or options that only choose the initial weights (the file's tensors replace them)
_LORA_IGNORED = {"task_type", "base_model_name_or_path", "revision", "inference_mode",
                 "peft_version", "auto_mapping", "loftq_config", "eva_config", "corda_config",
                 "lora_ga_config", "megatron_core", "qalora_group_size",
                 "ensure_weight_tying"}
# options that change the computation and that this loader does not implement
_LORA_UNSUPPORTED = {"fan_in_fan_out", "use_dora", "lora_bias", "layers_to_transform",
                     "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save",
                     "layer_replication", "target_parameters", "trainable_token_indices",
                     "use_qalora", "alora_invocation_tokens", "use_bdlora", "megatron_config",
                     "arrow_config", "monteclora_config", "kasa_config", "velora_config"}


def _empty(value: Any) -> bool:
    return value is None or value is False or value in ({}, [], "")


def read_adapter_config(folder: str | Path, peft_type: str,
                        used: set[str], ignored: set[str],
                        unsupported: set[str]) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of a peft folder.

    Args:
        folder: The adapter folder.
        peft_type: The expected ``peft_type`` (``"LORA"``, ``"PREFIX_TUNING"``).
        used: Keys the caller implements.
        ignored: Keys that do not change the computation.
        unsupported: Known keys the caller does not implement; they must be empty
            (``None``/``False``/``{}``/``[]``).

    Raises:
        FileNotFoundError: no folder or no config file.
        ValueError: another ``peft_type``, an unsupported option set, or an option unknown to
            this loader set (a newer peft format); the message names the keys and the
            ``peft_version`` that wrote the file.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME} (expected a peft adapter "
                                "folder)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("peft_type") != peft_type:
        raise ValueError(f"{path}: peft_type must be {peft_type!r} for this loader, got "
                         f"{data.get('peft_type')!r}")
    version = data.get("peft_version", "unknown")
    set_unsupported = {k: data[k] for k in sorted(unsupported & set(data))
                       if not _empty(data[k])}
    if set_unsupported:
        raise ValueError(f"{path} (peft {version}) sets options this loader does not "
                         f"implement: {set_unsupported}; expected them unset")
    unknown = {k: v for k, v in sorted(data.items())
               if k not in used | ignored | unsupported and not _empty(v)}
    if unknown:
        raise ValueError(f"{path} was written by peft {version} with options unknown to this "
                         f"loader (a newer adapter format?): {unknown}")
    return data


def lora_config_to_peft(config: LoraConfig, task_type: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict peft's ``LoraConfig`` reads for ``config``."""
    target = config.target_modules
    exclude = config.exclude_modules
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target if isinstance(target, str) else sorted(target),
        "exclude_modules": exclude if exclude is None or isinstance(exclude, str)
        else sorted(exclude),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        # peft has no name for "zeros" (A = 0, B random); the tensors, not this, are loaded
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def lora_config_from_peft(data: dict[str, Any]) -> LoraConfig:
    """A :class:`LoraConfig` from a checked ``adapter_config.json`` dict.

    Raises:
        ValueError: ``target_modules`` missing or ``null`` (peft's per-architecture default,
            which a file cannot carry), or a field :class:`LoraConfig` rejects.
    """
    if data.get("target_modules") is None:
        raise ValueError(f"{CONFIG_NAME}: target_modules must name the adapted modules, got "
                         "null")
    return LoraConfig(r=data.get("r", 8), lora_alpha=data.get("lora_alpha", 8),
                      lora_dropout=float(data.get("lora_dropout", 0.0)),
                      target_modules=data["target_modules"], bias=data.get("bias", "none"),
                      use_rslora=bool(data.get("use_rslora", False)),
                      init="gaussian" if data.get("init_lora_weights") == "gaussian"
                      else "kaiming",
                      exclude_modules=data.get("exclude_modules"))


def _saved_params(model: nn.Module, config: LoraConfig) -> dict[str, str]:
    """Own parameter name → peft key, for every tensor an adapter file holds."""
    lora_only_bias = {f"{name}.base_layer.bias" for name in lora_layers(model)}
    out = {}
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        keep = ("lora_" in name
                or (config.bias == "all" and leaf == "bias")
                or (config.bias == "lora_only" and name in lora_only_bias))
        if keep:
            out[name] = KEY_PREFIX + public_name(model, name)
    return out


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors of an adapter file: peft key → detached contiguous copy.

    Raises:
        ValueError: the model has no LoRA applied by :func:`~mlatlas.peft.lora.apply_lora`.
    """
    config = lora_config_of(model)
    params = dict(model.named_parameters())
    return {key: params[name].detach().contiguous().clone()
            for name, key in _saved_params(model, config).items()}


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model``'s LoRA as a peft folder (``PeftModel.from_pretrained`` reads it).

    Args:
        model: A model :func:`~mlatlas.peft.lora.apply_lora` adapted (unmerged or merged: the
            factors are the same).
        folder: Created if missing.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    config = lora_config_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = "CAUSAL_LM" if isinstance(model, Llama) else None
    (folder / CONFIG_NAME).write_text(json.dumps(lora_config_to_peft(config, task), indent=2,
                                                 sort_keys=True) + "\n")
    save_file(lora_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def _check_tensors(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor],
                   folder: Path) -> dict[str, str]:
    """peft key → own parameter name for every file tensor; raise naming every mismatch."""
    expected = {key: name for name, key in _saved_params(model, config).items()}
    # peft also saves the base table of an adapted embedding (save_embedding_layers)
    base_tables = {KEY_PREFIX + public_name(model, f"{n}.base_layer.weight"):
                   f"{n}.base_layer.weight" for n in lora_layers(model)}
    params = dict(model.named_parameters())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(base_tables))
    shapes = []
    for key, t in tensors.items():
        name = expected.get(key) or base_tables.get(key)
        if name is not None and tuple(t.shape) != tuple(params[name].shape):
            shapes.append(f"{key}: file {tuple(t.shape)}, model {tuple(params[name].shape)}")
    if missing or unexpected or shapes:
        raise ValueError(f"adapter {folder} does not fit this {type(model).__name__} (an "
                         f"adapter for another base?): shape mismatches {shapes}, missing "
                         f"tensors {missing}, unexpected tensors {unexpected}")
    return {key: expected.get(key) or base_tables[key] for key in tensors}


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Apply the LoRA of a peft folder to ``model`` and load its tensors.

    Args:
        model: The base model the adapter was trained on, without LoRA (our
            :class:`~mlatlas.llm.llama.Llama` reads adapters trained on a transformers
            ``LlamaForCausalLM`` with the same weights).
        folder: Written by ``PeftModel.save_pretrained`` or :func:`save_adapter`.

    Returns:
        The folder's :class:`LoraConfig` (also ``model.lora_config``).

    Raises:
        FileNotFoundError: no config or no ``adapter_model.safetensors`` (pickled
            ``adapter_model.bin`` files are never loaded).
        ValueError: another ``peft_type``, options this loader does not implement or does
            not know, targets that match nothing, or tensors that do not fit (each named);
            the model is left unchanged then.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    data = read_adapter_config(folder, "LORA", _LORA_USED, _LORA_IGNORED, _LORA_UNSUPPORTED)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = " (adapter_model.bin is pickle and is not loaded)" if (
            folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}{pickled}")
    config = lora_config_from_peft(data)
    tensors = load_file(str(weights))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    apply_lora(model, config)
    try:
        names = _check_tensors(model, config, tensors, folder)
    except ValueError:
        unload_lora(model, merge=False)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        raise
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, name in names.items():
            params[name].copy_(tensors[key].to(params[name].dtype))
    return config
