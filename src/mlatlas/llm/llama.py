"""LLaMA and Llama 3: a pre-RMSNorm decoder-only Transformer with SwiGLU, RoPE and GQA.

LLaMA is the GPT decoder with three changes: RMSNorm *before* each sub-block (pre-norm), the
SwiGLU feed-forward block, and rotary position embeddings on queries and keys. Llama 2/3 add
grouped-query attention (``n_kv < n_h`` key/value heads, each shared by ``n_h / n_kv`` query
heads) and Llama 3.1 the "llama3" RoPE frequency scaling. Touvron et al. 2023, "LLaMA: Open
and Efficient Foundation Language Models", arXiv:2302.13971; Ainslie et al. 2023 (GQA),
arXiv:2305.13245; Grattafiori et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783.

Parameter names mirror Hugging Face's ``LlamaForCausalLM`` without its ``model.`` prefix; the
exact map is :func:`mlatlas.llm.hf_format.hf_key_map`. Attention goes through
:func:`mlatlas.nn.attention.attend` (backend ``LlamaConfig.attn_backend``).

=============  ============================================================
``B, T``       batch, query length;  ``S = P + T`` keys with ``P`` cached
``d``          ``hidden_size``;  ``f`` ``intermediate_size``;  ``V`` vocab
``n_h, n_kv``  query heads, key/value heads (``n_h % n_kv == 0``)
``D``          ``head_dim``
``x_l``        residual stream entering layer ``l``
=============  ============================================================

A layer computes (eqs. of the LLaMA paper's §2.2 in pre-norm form)::

    h   = x_l + Attn(RMSNorm(x_l))          # causal, RoPE on q and k, GQA
    x_{l+1} = h + SwiGLU(RMSNorm(h))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.attention.reference import QKVShape, check_cu_seqlens
from mlatlas.llm import hf_format
from mlatlas.llm.generation import KVCache, generate
from mlatlas.nn.attention import BACKENDS, attend
from mlatlas.nn.feedforward import GatedFeedForward
from mlatlas.nn.norms import RMSNorm
from mlatlas.nn.rope import apply_rope, packed_position_ids, rope_cos_sin, rope_inv_freq

__all__ = ["AttentionMask", "KVCache", "Llama", "LlamaAttention", "LlamaConfig",
           "LlamaDecoderLayer", "next_token_loss"]


def _pos_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    return value


@dataclass
class LlamaConfig:
    """Hyper-parameters of a LLaMA / Llama 3 model (Hugging Face names in brackets).

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
        rope_scaling: ``None`` or ``{"rope_type": "llama3", "factor", "low_freq_factor",
            "high_freq_factor", "original_max_position_embeddings"}``.
        rms_norm_eps: RMSNorm ``ε``.
        max_position_embeddings: Longest sequence (positions) the model accepts.
        tie_word_embeddings: Share the input embedding with the output head.
        attn_backend: The :func:`~mlatlas.nn.attention.attend` backend of every layer, one
            of :data:`mlatlas.nn.attention.BACKENDS` (not written to ``config.json``).
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
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"LlamaConfig.attn_backend must be one of {BACKENDS}, got "
                             f"{self.attn_backend!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # validates both

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class AttentionMask:
    """How every layer of one forward call masks its attention (built once, at the edge).

    Attributes:
        causal: Bottom-right aligned causal mask: query ``i`` (position ``P + i``) sees keys
            ``j ≤ P + i``.
        key_padding_mask: Bool ``[B, P + T]``, True = real token (``attention_mask``).
        attn_mask: Bool ``[B|1, 1, T, P + T]``, True = may attend; replaces ``causal``.
        cu_seqlens: Boundaries of the packed documents in the flattened ``B·T`` stream
            (the layers then see one row, ``[1, B·T, d]``).
    """

    causal: bool = True
    key_padding_mask: Tensor | None = None
    attn_mask: Tensor | None = None
    cu_seqlens: Tensor | None = None


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE (``q_proj, k_proj, v_proj, o_proj``).

    Args:
        config: The model's :class:`LlamaConfig`.
        layer_idx: This layer's index (its slot in a :class:`KVCache`).
    """

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.backend = config.attn_backend
        d, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * D, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                cache: KVCache | None = None) -> Tensor:
        """``x [B, T, d]`` → ``[B, T, d]``.

        Args:
            x: Normalised hidden states.
            cos: RoPE table ``[B|1, T, D]``.
            sin: RoPE table ``[B|1, T, D]``.
            mask: The call's :class:`AttentionMask`.
            cache: Appended to and attended over when given.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoFormer eq. (34)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # softmax(q kᵀ / √D + mask) v, GQA: key/value head j serves query heads j·g … j·g + g - 1
        out = attend(q, k, v, causal=mask.causal, key_padding_mask=mask.key_padding_mask,
                     attn_mask=mask.attn_mask, cu_seqlens=mask.cu_seqlens, backend=self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class LlamaDecoderLayer(nn.Module):
    """One pre-norm block: ``h = x + Attn(Norm(x))``, ``out = h + SwiGLU(Norm(h))``.

    Called as ``layer(hidden, **layer_kwargs)`` (see :class:`Llama`), plus ``cache=`` when
    decoding with a KV cache.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedFeedForward(config.hidden_size, config.intermediate_size,
                                    kind="swiglu", bias=False)

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                cache: KVCache | None = None) -> Tensor:
        """``hidden [B, T, d]`` → ``[B, T, d]``; see :meth:`LlamaAttention.forward`."""
        # h = x + Attn(RMSNorm(x))
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache)
        # x' = h + W₂(SiLU(W_g RMSNorm(h)) ⊙ W_u RMSNorm(h))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Llama(nn.Module):
    """LLaMA / Llama 3 causal language model.

    Attributes:
        config: The :class:`LlamaConfig`.
        embed_tokens: ``nn.Embedding(V, d)``.
        layers: ``nn.ModuleList`` of :class:`LlamaDecoderLayer`.
        norm: Final :class:`~mlatlas.nn.norms.RMSNorm`.
        lm_head: ``nn.Linear(d, V, bias=False)``; its weight *is* ``embed_tokens.weight``
            when ``config.tie_word_embeddings``.
        layer_runner: ``None`` or a plain callable ``runner(layers, hidden, **layer_kwargs)
            → hidden`` that replaces the loop over ``layers`` when no KV cache is used (the
            hook of :func:`mlatlas.llm.gradient_checkpointing.enable_checkpointing`; not a
            module, so the state dict never changes). ``layer_kwargs`` is exactly
            ``{"cos": Tensor [B|1, T, D], "sin": Tensor [B|1, T, D], "mask": AttentionMask}``
            (no cache), and every layer is callable as ``layer(hidden, **layer_kwargs) →
            hidden``. A packed batch (``cu_seqlens``) reaches the layers as one row
            ``[1, B·T, d]``.

    Shapes:
        ``input_ids [B, T]`` (int64) → logits ``[B, T, V]``.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # RoPE frequencies: a plain float32 tensor (not a buffer), so .to(dtype) never rounds it
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layer_runner: Callable[..., Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) linear/embedding weights (Hugging Face's init), unit norm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` for this model."""
        return KVCache(self.config.num_layers)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                cache: KVCache | None = None, *, attention_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
        """Next-token logits.

        Args:
            input_ids: int64 ``[B, T]``.
            position_ids: Integer ``[B|1, T]``; default ``P + arange(T)`` (``P`` cached), or
                restarting at 0 in every document of a packed batch.
            cache: A :class:`KVCache` to read past keys/values from and append to.
            attention_mask: ``[B, P + T]`` with 1 for real tokens and 0 for padding (as in
                Hugging Face), combined with the causal mask. Pass explicit ``position_ids``
                for left-padded rows.
            attn_mask: Bool ``[B|1, 1, T, P + T]``, True where query ``i`` may attend key
                ``j``; replaces the causal mask for this call (tree attention, speculative
                verification over a cache). Combined with ``attention_mask`` when both given.
            cu_seqlens: Packed batch (:class:`mlatlas.llm.packing.PackedBatch`): int
                ``[n_docs + 1]`` document boundaries in the flattened ``B·T`` token stream
                (the contract of :func:`mlatlas.attention.reference.check_cu_seqlens`); no
                token attends across a boundary. Not combinable with ``cache``,
                ``attention_mask`` or ``attn_mask``.

        Returns:
            Logits ``[B, T, V]`` in the parameters' dtype.
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids, cache,
                                               attention_mask=attention_mask,
                                               attn_mask=attn_mask, cu_seqlens=cu_seqlens))

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None,
                      cache: KVCache | None = None, *, attention_mask: Tensor | None = None,
                      attn_mask: Tensor | None = None,
                      cu_seqlens: Tensor | None = None) -> Tensor:
        """Final normalised hidden states ``[B, T, d]`` (the input of ``lm_head``).

        Arguments as :meth:`forward`.
        """
        mask = self._check_inputs(input_ids, position_ids, cache, attention_mask, attn_mask,
                                  cu_seqlens)
        B, T = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = (packed_position_ids(cu_seqlens).view(B, T) if cu_seqlens is not None
                            else torch.arange(past, past + T, device=input_ids.device)[None])
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        if cu_seqlens is not None:  # packed rows: one stream of B·T tokens
            x, cos, sin = (t.reshape(1, B * T, t.shape[-1]) for t in
                           (x, cos.expand(B, T, -1), sin.expand(B, T, -1)))
        layer_kwargs = {"cos": cos, "sin": sin, "mask": mask}
        if cache is not None:
            for layer in self.layers:
                x = layer(x, cache=cache, **layer_kwargs)
        elif self.layer_runner is not None:
            x = self.layer_runner(self.layers, x, **layer_kwargs)
        else:
            for layer in self.layers:
                x = layer(x, **layer_kwargs)
        return self.norm(x).view(B, T, -1)

    def _check_inputs(self, input_ids: Tensor, position_ids: Tensor | None,
                      cache: KVCache | None, attention_mask: Tensor | None,
                      attn_mask: Tensor | None, cu_seqlens: Tensor | None) -> AttentionMask:
        """Validate one call's inputs (named errors) and describe its attention mask."""
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an int64/int32 tensor [B, T], got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0 or B == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size), "
                             f"got values in [{lo}, {hi}]")
        S = T + (cache.seq_len if cache is not None else 0)
        if S > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {S} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        if position_ids is not None and (
                not isinstance(position_ids, Tensor) or position_ids.is_floating_point()
                or position_ids.dim() != 2 or position_ids.shape[1] != T
                or position_ids.shape[0] not in (1, B)):
            raise ValueError(f"position_ids must be an integer tensor [{B} or 1, {T}], got "
                             f"{getattr(position_ids, 'dtype', type(position_ids).__name__)} "
                             f"{tuple(getattr(position_ids, 'shape', ()))}")
        if cu_seqlens is not None:
            if cache is not None or attention_mask is not None or attn_mask is not None:
                raise ValueError("cu_seqlens (packed batch) cannot be combined with cache, "
                                 "attention_mask or attn_mask")
            check_cu_seqlens(cu_seqlens, None, QKVShape(1, 1, 1, B * T, B * T, 1))
            return AttentionMask(causal=True, cu_seqlens=cu_seqlens)
        padding = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"attention_mask must be [B={B}, P+T={S}], got "
                                 f"{tuple(getattr(attention_mask, 'shape', ()))}")
            padding = attention_mask.bool()
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
                raise TypeError(f"attn_mask must be a bool tensor (True = may attend), got "
                                f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
            if (attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, B)
                    or tuple(attn_mask.shape[1:]) != (1, T, S)):
                raise ValueError(f"attn_mask must be [B={B} or 1, 1, T={T}, P+T={S}], got "
                                 f"{tuple(attn_mask.shape)}")
            return AttentionMask(causal=False, key_padding_mask=padding, attn_mask=attn_mask)
        return AttentionMask(causal=True, key_padding_mask=padding)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs: Any) -> Tensor:
        """Autoregressive decoding; see :func:`mlatlas.llm.generation.generate`."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Llama:
        """Load a Hugging Face ``LlamaForCausalLM`` folder (config.json + *.safetensors).

        Args:
            path: The folder (one ``*.safetensors`` file or shards).
            dtype: Parameter dtype of the returned model.

        Raises:
            FileNotFoundError: no folder, ``config.json`` or ``*.safetensors``.
            ValueError: a config option we cannot represent (named), missing or unexpected
                tensors, or a tensor of the wrong shape.
        """
        folder = hf_format.read_folder(path)
        model = cls(LlamaConfig(**hf_format.config_fields_from_hf(folder.config)))
        state = hf_format.state_from_hf(folder.tensors, hf_format.hf_key_map(model.config),
                                        model.state_dict(), source=str(path))
        model.load_state_dict(state, strict=True)
        return model.to(dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a folder ``transformers.LlamaForCausalLM.from_pretrained`` loads.

        Returns:
            The folder (``config.json`` + ``model.safetensors``, Hugging Face names).
        """
        state = self.state_dict()
        tensors = {hf: state[ours] for ours, hf in hf_format.hf_key_map(self.config).items()}
        dtype = self.embed_tokens.weight.dtype
        return hf_format.write_folder(path, hf_format.config_to_hf(self.config, dtype), tensors)


def next_token_loss(logits: Tensor, input_ids: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of predicting ``input_ids[:, t+1]`` from ``logits[:, t]``.

    The same shift-and-average as Hugging Face's causal-LM loss (labels = input ids).

    Args:
        logits: ``[B, T, V]``.
        input_ids: int64 ``[B, T]``; positions equal to ``ignore_index`` are not predicted.
        ignore_index: Label value to skip.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits [B, T, V] and input_ids [B, T] must agree, got "
                         f"{tuple(logits.shape)} and {tuple(input_ids.shape)}")
    # L = -1/N Σ_t log p(x_{t+1} | x_≤t)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           input_ids[:, 1:].reshape(-1), ignore_index=ignore_index)
