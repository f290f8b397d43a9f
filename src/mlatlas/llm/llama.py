"""LLaMA and its family (Llama 2/3, Mistral, Qwen2): a pre-RMSNorm decoder-only Transformer.

LLaMA is the GPT decoder with three changes: RMSNorm *before* each sub-block (pre-norm), the
SwiGLU feed-forward block, and rotary position embeddings on queries and keys. Llama 2/3 add
grouped-query attention (``n_kv < n_h`` key/value heads, each shared by ``n_h / n_kv`` query
heads) and Llama 3.1 the "llama3" RoPE frequency scaling. Touvron et al. 2023, "LLaMA: Open
and Efficient Foundation Language Models", arXiv:2302.13971; Ainslie et al. 2023 (GQA),
arXiv:2305.13245; Grattafiori et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783.
Mistral is the same decoder with sliding-window attention (each token sees the last ``W``
positions; Jiang et al. 2023, "Mistral 7B", arXiv:2310.06825); Qwen2 adds biases to the
query/key/value projections and slides the window on its upper layers only (Yang et al.
2024, "Qwen2 Technical Report", arXiv:2407.10671). One class computes them all; the options
are fields of :class:`LlamaConfig` (every option transformers' ``LlamaForCausalLM``,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` apply; RoPE scalings in :mod:`mlatlas.nn.rope`).

Parameter names mirror Hugging Face's ``LlamaForCausalLM`` without its ``model.`` prefix; the
exact map is :func:`mlatlas.llm.hf_format.hf_key_map`. Attention goes through
:func:`mlatlas.nn.attention.attend` (backend ``LlamaConfig.attn_backend``).

=============  ============================================================
``B, T``       batch, query length;  ``S = P + T`` keys with ``P`` cached
``d``          ``hidden_size``;  ``f`` ``intermediate_size``;  ``V`` vocab
``n_h, n_kv``  query heads, key/value heads (``n_h % n_kv == 0``)
``D``          ``head_dim``
``W``          ``sliding_window`` of a sliding layer (key ``j`` seen from ``i`` iff
               ``i − W < j ≤ i``)
``x_l``        residual stream entering layer ``l``
=============  ============================================================

A layer computes (eqs. of the LLaMA paper's §2.2 in pre-norm form)::

    h   = x_l + Attn(RMSNorm(x_l))          # causal, RoPE on q and k, GQA
    x_{l+1} = h + SwiGLU(RMSNorm(h))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.attention.reference import QKVShape, check_cu_seqlens
from mlatlas.llm import hf_format
from mlatlas.llm.generation import KVCache, generate
from mlatlas.llm.llama_config import GATE_OF_ACTIVATION, LlamaConfig
from mlatlas.nn.attention import attend
from mlatlas.nn.feedforward import GatedFeedForward
from mlatlas.nn.norms import RMSNorm
from mlatlas.nn.rope import (
    apply_rope,
    packed_position_ids,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
)

__all__ = ["AttentionMask", "Llama", "LlamaAttention", "LlamaDecoderLayer", "next_token_loss"]


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
        self.window = config.window(layer_idx)
        d, D = config.hidden_size, config.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(d, self.num_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * D, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * D, d, bias=config.attention_bias)

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
        # softmax(q kᵀ / √D + mask) v, GQA: key/value head j serves query heads j·g … j·g + g - 1;
        # a sliding layer masks keys j ≤ i − W too
        out = attend(q, k, v, causal=mask.causal, key_padding_mask=mask.key_padding_mask,
                     attn_mask=mask.attn_mask, cu_seqlens=mask.cu_seqlens, window=self.window,
                     backend=self.backend)
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
                                    kind=GATE_OF_ACTIVATION[config.hidden_act],
                                    bias=config.mlp_bias)

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
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # RoPE frequencies: a plain float32 tensor (not a buffer), so .to(dtype) never rounds it
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling,
                                      max_position_embeddings=config.max_position_embeddings)
        self.rope_scale = rope_attention_factor(config.rope_scaling,
                                                config.max_position_embeddings)
        self.layer_runner: Callable[..., Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Hugging Face's init: Normal(0, std) weights (``std`` default
        ``config.initializer_range``), zero biases and padding row, unit norm gains."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
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
                verification over a cache). Combined with ``attention_mask`` when both given,
                and with the window of sliding layers.
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
        cos, sin = rope_cos_sin(position_ids, self._rope_frequencies(position_ids), x.dtype,
                                self.rope_scale)
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

    def _rope_frequencies(self, position_ids: Tensor) -> Tensor:
        """``θ`` for this call: dynamic and longrope RoPE depend on the longest position.

        Computed per call from this call's positions. transformers' dynamic RoPE instead keeps
        the frequencies of the longest input it has seen until an input shorter than ``L_max``
        resets them; the two agree whenever lengths only grow (one forward, cached decoding).
        """
        c = self.config
        if c.rope_scaling is None or c.rope_scaling["rope_type"] not in ("dynamic", "longrope"):
            return self.inv_freq
        return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling,
                             max_position_embeddings=c.max_position_embeddings,
                             seq_len=int(position_ids.max()) + 1)

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
        if S > self.config.max_position_embeddings:  # as transformers: a warning, not an error
            warnings.warn(f"sequence length {S} exceeds max_position_embeddings "
                          f"({self.config.max_position_embeddings}): the model was not trained "
                          "on such positions", stacklevel=4)
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
        """Load a Hugging Face ``LlamaForCausalLM``, ``MistralForCausalLM`` or
        ``Qwen2ForCausalLM`` folder (config.json + safetensors, one file or indexed shards).

        Args:
            path: The folder.
            dtype: Parameter dtype of the returned model (the checkpoint's may be any).

        Raises:
            FileNotFoundError: no folder, ``config.json`` or safetensors weights.
            ValueError: a config option we cannot compute (named), missing or unexpected
                tensors, or a tensor of the wrong shape.
        """
        folder = hf_format.read_folder(path)
        model = cls(hf_format.config_from_hf(folder.config))
        state = hf_format.state_from_hf(folder.tensors, hf_format.hf_key_map(model.config),
                                        model.state_dict(), source=str(path))
        model.load_state_dict(state, strict=True)
        return model.to(dtype)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> Path:
        """Write a folder transformers' class of ``config.model_type`` loads.

        Args:
            path: The folder (created).
            max_shard_bytes: Shard the weights (with an index json) above this size.

        Returns:
            The folder (``config.json`` with ``architectures`` and ``model_type``, and the
            weights by Hugging Face name in the parameters' dtype).

        Raises:
            ValueError: an option the family's transformers class cannot express (named).
        """
        state = self.state_dict()
        tensors = {hf: state[ours] for ours, hf in hf_format.hf_key_map(self.config).items()}
        dtype = self.embed_tokens.weight.dtype
        return hf_format.write_folder(path, hf_format.config_to_hf(self.config, dtype), tensors,
                                      max_shard_bytes)


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
