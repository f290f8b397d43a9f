"""Prefix tuning: trainable key/value vectors every attention layer attends to, base frozen.

Instead of changing any weight, prefix tuning prepends ``P`` virtual positions to every
layer's keys and values; the real tokens attend to them as to a cached past, so a few
thousand parameters steer a frozen language model. Optimising the prefix directly is
unstable, so Li & Liang reparameterise it through an MLP from a smaller matrix (eq. (5)) and
keep only the MLP's output after training. Li & Liang 2021, "Prefix-Tuning: Optimizing
Continuous Prompts for Generation", arXiv:2101.00190.

=============  ==================================================================
``P``          ``num_virtual_tokens``
``L``          decoder layers;  ``n_kv, D`` key/value heads and head size
``t``          ``token_dim = n_kv·D``;  ``h`` ``encoder_hidden_size``
``P_θ``        the prefix ``[P, L·2·t]``: layer ``l``'s keys are slice ``2l``, values ``2l+1``
``P'_θ``       ``embedding.weight [P, t]`` under the reparameterisation
=============  ==================================================================

The prefix enters through the model's KV-cache path (a :class:`~mlatlas.llm.llama.KVCache`
pre-filled with ``P_θ`` before the first real token), exactly as peft's
``PrefixTuningConfig`` feeds ``past_key_values`` to a transformers model: the real tokens sit
at positions ``P, P+1, …``, attend to all ``P`` prefix slots, and the prefix keys are not
rotated by RoPE. Parameter names are peft's ``PrefixEncoder``'s, and :func:`save_prefix` /
:func:`load_prefix` read and write peft's ``PREFIX_TUNING`` folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlatlas.llm.generation import KVCache
from mlatlas.llm.llama import Llama
from mlatlas.peft.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

__all__ = ["PrefixConfig", "PrefixEncoder", "PrefixTunedLM", "load_prefix", "save_prefix"]

_INITS = ("random", "zero")


@dataclass
class PrefixConfig:
    """Prefix-tuning hyper-parameters (peft ``PrefixTuningConfig`` names).

    Attributes:
        num_virtual_tokens: ``P`` (> 0).
        prefix_projection: Reparameterise through the MLP ``Linear(t, h) → tanh →
            Linear(h, L·2·t)`` (Li & Liang eq. (5)); else learn ``P_θ`` directly.
        encoder_hidden_size: ``h``; ``None`` → ``t`` (peft's default).
        init: ``"random"`` (``nn.Embedding``/``nn.Linear`` defaults, peft's ``None``) or
            ``"zero"`` (a zero prefix, peft's ``"zero"``).
    """

    num_virtual_tokens: int = 10
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"

    def __post_init__(self) -> None:
        for name in ("num_virtual_tokens", "encoder_hidden_size"):
            value = getattr(self, name)
            if value is None and name == "encoder_hidden_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PrefixConfig.{name} must be a positive int, got {value!r}")
        if self.init not in _INITS:
            raise ValueError(f"PrefixConfig.init must be one of {_INITS}, got {self.init!r}")


class PrefixEncoder(nn.Module):
    """The trainable prefix ``P_θ`` of every layer (peft's ``PrefixEncoder``).

    Args:
        config: A :class:`PrefixConfig`.
        num_layers: ``L``.
        num_kv_heads: ``n_kv``.
        head_dim: ``D``.
    """

    def __init__(self, config: PrefixConfig, num_layers: int, num_kv_heads: int,
                 head_dim: int):
        super().__init__()
        if not isinstance(config, PrefixConfig):
            raise TypeError(f"config must be a PrefixConfig, got {type(config).__name__}")
        self.config = config
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.token_dim = t = num_kv_heads * head_dim
        P, out = config.num_virtual_tokens, num_layers * 2 * t
        if config.prefix_projection:
            h = config.encoder_hidden_size or t
            self.embedding = nn.Embedding(P, t)
            self.transform = nn.Sequential(nn.Linear(t, h), nn.Tanh(), nn.Linear(h, out))
            if config.init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(P, out)
            if config.init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> Tensor:
        """``P_θ`` ``[P, L·2·t]``."""
        if self.config.prefix_projection:
            # eq. (5): P_θ[i, :] = MLP_θ(P'_θ[i, :])
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def key_values(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the prefix keys and values ``[batch, n_kv, P, D]``."""
        P = self.config.num_virtual_tokens
        # [P, L·2·t] → [2L, n_kv, P, D]: slice 2l is layer l's keys, 2l + 1 its values
        kv = self().view(P, 2 * self.num_layers, self.num_kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]


class PrefixTunedLM(nn.Module):
    """A frozen :class:`~mlatlas.llm.llama.Llama` that attends to a trainable prefix.

    Constructing it freezes ``base`` (every parameter ``requires_grad=False``); only
    ``prefix`` trains. It has the ``forward(input_ids, position_ids, cache,
    attention_mask=)`` / ``new_cache()`` interface :func:`mlatlas.llm.generation.generate`
    decodes with.

    Args:
        base: The pretrained model.
        config: A :class:`PrefixConfig`, or a ready :class:`PrefixEncoder`.
    """

    def __init__(self, base: Llama, config: PrefixConfig | PrefixEncoder):
        super().__init__()
        if not isinstance(base, Llama):
            raise TypeError(f"base must be a Llama, got {type(base).__name__}")
        c = base.config
        prefix = config if isinstance(config, PrefixEncoder) else PrefixEncoder(
            config, c.num_layers, c.num_kv_heads, c.head_dim)
        shape = (prefix.num_layers, prefix.num_kv_heads, prefix.head_dim)
        if shape != (c.num_layers, c.num_kv_heads, c.head_dim):
            raise ValueError(f"prefix (layers, kv heads, head_dim) must be "
                             f"{(c.num_layers, c.num_kv_heads, c.head_dim)} for this base, got "
                             f"{shape}")
        self.base = base.requires_grad_(False)
        self.prefix = prefix.to(base.embed_tokens.weight.dtype)

    @property
    def num_virtual_tokens(self) -> int:
        """``P``."""
        return self.prefix.config.num_virtual_tokens

    def new_cache(self) -> KVCache:
        """An empty cache; the first :meth:`forward` fills the prefix into it."""
        return self.base.new_cache()

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                cache: KVCache | None = None, *,
                attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]`` of ``input_ids [B, T]`` after the prefix.

        Args:
            input_ids: int64 ``[B, T]``.
            position_ids: Positions counted over the real tokens (from 0); the prefix shifts
                them by ``P``. Default: ``P + past + arange(T)``.
            cache: From :meth:`new_cache`; an empty one receives the prefix first.
            attention_mask: ``[B, past + T]`` over the real tokens (1 real, 0 padding); the
                prefix slots are always attended.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a tensor [B, T], got "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        B, P = input_ids.shape[0], self.num_virtual_tokens
        cache = self.new_cache() if cache is None else cache
        if cache.seq_len == 0:
            for layer, (k, v) in enumerate(self.prefix.key_values(B)):
                cache.update(layer, k, v)
        if position_ids is not None:
            position_ids = position_ids + P
        if attention_mask is not None:
            ones = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat((ones, attention_mask), dim=1)
        return self.base(input_ids, position_ids, cache, attention_mask=attention_mask)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs: Any) -> Tensor:
        """Autoregressive decoding; see :func:`mlatlas.llm.generation.generate`."""
        from mlatlas.llm.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


_PREFIX_USED = {"peft_type", "num_virtual_tokens", "token_dim", "num_layers",
                "num_attention_heads", "num_transformer_submodules", "prefix_projection",
                "encoder_hidden_size"}
_PREFIX_IGNORED = {"task_type", "base_model_name_or_path", "revision", "inference_mode",
                   "peft_version", "auto_mapping", "init_weights", "num_key_value_heads"}
_PREFIX_UNSUPPORTED = {"modules_to_save"}


def save_prefix(model: PrefixTunedLM, folder: str | Path) -> Path:
    """Write a peft ``PREFIX_TUNING`` folder: the config and ``prompt_embeddings = P_θ``.

    As peft does, the MLP is not saved, only its output (``PeftModel.from_pretrained`` reads
    the folder into a transformers ``LlamaForCausalLM`` with the same weights).
    """
    from safetensors.torch import save_file

    if not isinstance(model, PrefixTunedLM):
        raise TypeError(f"model must be a PrefixTunedLM, got {type(model).__name__}")
    enc = model.prefix
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": None, "revision": None,
              "num_virtual_tokens": enc.config.num_virtual_tokens, "token_dim": enc.token_dim,
              "num_layers": enc.num_layers, "num_attention_heads": enc.num_kv_heads,
              "num_transformer_submodules": 1,
              "prefix_projection": enc.config.prefix_projection,
              "encoder_hidden_size": enc.config.encoder_hidden_size or enc.token_dim}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with torch.no_grad():
        table = enc().detach().contiguous().clone()
    save_file({"prompt_embeddings": table}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    return folder


def load_prefix(base: Llama, folder: str | Path) -> PrefixTunedLM:
    """Read a peft ``PREFIX_TUNING`` folder (``prompt_embeddings``) onto a frozen ``base``.

    The prefix comes back un-reparameterised (``P_θ`` as a table), as peft loads it.

    Raises:
        FileNotFoundError: no config or no ``adapter_model.safetensors``.
        ValueError: another ``peft_type``, options set that this loader does not implement
            or know, or a prefix shaped for another base (layers, heads, sizes named).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    data = read_adapter_config(folder, "PREFIX_TUNING", _PREFIX_USED, _PREFIX_IGNORED,
                               _PREFIX_UNSUPPORTED)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}")
    c = base.config
    want = {"num_layers": c.num_layers, "num_attention_heads": c.num_kv_heads,
            "token_dim": c.num_kv_heads * c.head_dim, "num_transformer_submodules": 1}
    wrong = {k: f"file {data.get(k)!r}, model {v!r}" for k, v in want.items()
             if data.get(k) != v}
    if wrong:
        raise ValueError(f"prefix {folder} does not fit this base: {wrong}")
    table = load_file(str(folder / WEIGHTS_NAME)).get("prompt_embeddings")
    P = data["num_virtual_tokens"]
    shape = (P, c.num_layers * 2 * want["token_dim"])
    if table is None or tuple(table.shape) != shape:
        raise ValueError(f"prefix {folder}: prompt_embeddings must be {shape}, got "
                         f"{None if table is None else tuple(table.shape)}")
    enc = PrefixEncoder(PrefixConfig(num_virtual_tokens=P), c.num_layers, c.num_kv_heads,
                        c.head_dim)
    with torch.no_grad():
        enc.embedding.weight.copy_(table)
    return PrefixTunedLM(base, enc)
