"""The hyper-parameters of the Llama family (Llama 1-3, Mistral, Qwen2): :class:`LlamaConfig`.

One dataclass describes every model :class:`mlatlas.llm.llama.Llama` computes: sizes, grouped
key/value heads, RoPE and its context-extension scalings (:mod:`mlatlas.nn.rope`), biases, the
feed-forward gate, sliding-window layers (Mistral: every layer; Qwen2: per ``layer_types``)
and the Hugging Face family (``model_type``) a folder is written as. Field names are Hugging
Face's where they exist (bracketed where ours differ); :mod:`mlatlas.llm.hf_format` maps
``config.json`` to and from it. Every field is validated on construction, with errors that
name the field, what was expected and what came.

=================  ==============================================================
``d``, ``f``, ``V``  ``hidden_size``, ``intermediate_size``, ``vocab_size``
``n_h, n_kv``      query heads, key/value heads (``n_h % n_kv == 0``)
``D``              ``head_dim`` (even; ``d // n_h`` by default)
``W``              ``sliding_window``: a sliding layer's query ``i`` sees keys ``i − W < j ≤ i``
``L_max``          ``max_position_embeddings``
=================  ==============================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlatlas.nn.attention import BACKENDS
from mlatlas.nn.rope import check_rope_scaling, rope_inv_freq

__all__ = ["GATE_OF_ACTIVATION", "LAYER_TYPES", "MODEL_TYPES", "LlamaConfig"]

#: ``hidden_act`` (transformers' ``ACT2FN`` names) → the gate of :class:`GatedFeedForward`.
GATE_OF_ACTIVATION = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu",
                      "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh",
                      "relu": "reglu", "sigmoid": "glu"}
#: ``model_type`` values: the Hugging Face class a folder is read from and written as.
MODEL_TYPES = ("llama", "mistral", "qwen2")
#: ``layer_types`` entries.
LAYER_TYPES = ("full_attention", "sliding_attention")


def _pos_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    return value


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-family model (Hugging Face names in brackets).

    Attributes:
        vocab_size: ``V``.
        hidden_size: ``d``.
        intermediate_size: SwiGLU hidden width ``f``.
        num_layers: Decoder layers [``num_hidden_layers``].
        num_heads: Query heads ``n_h`` [``num_attention_heads``].
        num_kv_heads: Key/value heads ``n_kv`` [``num_key_value_heads``]; ``None`` → ``n_h``
            (multi-head attention, LLaMA 1); must divide ``n_h``.
        head_dim: ``D``; ``None`` → ``d // n_h``. Must be even (RoPE rotates pairs).
        rope_theta: RoPE base.
        rope_scaling: ``None`` or a Hugging Face ``rope_scaling`` dict of ``rope_type``
            linear, dynamic, yarn, longrope or llama3 (:func:`mlatlas.nn.rope.check_rope_scaling`;
            normalised: ``"type"`` → ``"rope_type"``).
        rms_norm_eps: RMSNorm ``ε``.
        max_position_embeddings: ``L_max``: longer inputs run with a warning (as in
            transformers); ``dynamic`` RoPE rescales beyond it.
        tie_word_embeddings: Share the input embedding with the output head.
        attn_backend: The :func:`~mlatlas.nn.attention.attend` backend of every layer, one
            of :data:`mlatlas.nn.attention.BACKENDS` (not written to ``config.json``).
        model_type: The Hugging Face family, one of :data:`MODEL_TYPES` (``save_pretrained``
            writes it with its ``architectures``).
        hidden_act: The feed-forward gate's activation (``silu``; see
            :data:`GATE_OF_ACTIVATION`).
        attention_bias: Biases on ``q, k, v`` *and* ``o`` projections (transformers' Llama).
        qkv_bias: Biases on ``q, k, v`` only (Qwen2); implied by ``attention_bias``.
        mlp_bias: Biases on the three feed-forward projections.
        sliding_window: ``W``; ``None`` = full causal attention everywhere.
        layer_types: Per layer ``"full_attention"`` or ``"sliding_attention"`` (Qwen2);
            ``None`` = every layer slides when ``sliding_window`` is set (Mistral).
        initializer_range: Std of the normal initialisation.
        pad_token_id: Its embedding row starts at 0 and gets no gradient (``padding_idx``).
        bos_token_id: Written to ``config.json``.
        eos_token_id: Written to ``config.json`` (an int or a list).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attn_backend: str = "sdpa"
    model_type: str = "llama"
    hidden_act: str = "silu"
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "max_position_embeddings"):
            _pos_int(getattr(self, name), name)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _pos_int(self.num_kv_heads, "num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_heads ({self.num_heads}) when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_heads
        if _pos_int(self.head_dim, "head_dim") % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        for name, allowed in (("attn_backend", BACKENDS), ("model_type", MODEL_TYPES),
                              ("hidden_act", tuple(GATE_OF_ACTIVATION))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LlamaConfig.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.sliding_window is not None:
            _pos_int(self.sliding_window, "sliding_window")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if (len(self.layer_types) != self.num_layers
                    or any(t not in LAYER_TYPES for t in self.layer_types)):
                raise ValueError(f"LlamaConfig.layer_types must list one of {LAYER_TYPES} per "
                                 f"layer ({self.num_layers}), got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("LlamaConfig.layer_types has sliding_attention layers but "
                                 "sliding_window is None")
        if self.pad_token_id is not None and not (-self.vocab_size <= self.pad_token_id
                                                  < self.vocab_size):
            raise ValueError(f"LlamaConfig.pad_token_id must lie in [-{self.vocab_size}, "
                             f"{self.vocab_size}) (as nn.Embedding's padding_idx), got "
                             f"{self.pad_token_id!r}")
        # validates head_dim, theta and the scaling (named keys), normalised as transformers
        self.rope_scaling = check_rope_scaling(self.rope_scaling, self.head_dim,
                                               self.max_position_embeddings)
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling,
                      max_position_embeddings=self.max_position_embeddings)

    def window(self, layer_idx: int) -> int | None:
        """The sliding window ``W`` of layer ``layer_idx`` (``None``: full attention)."""
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)
