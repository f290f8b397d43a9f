"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and nucleus (top-p).

A causal LM factorises ``p(x) = Π_t p(x_t | x_<t)``; decoding draws one token at a time and
feeds it back. With a KV cache each step runs the model on the one new token and reuses the
keys/values of the past (:class:`KVCache`), so a step costs O(1) forward tokens instead of
O(t); the result is identical to recomputing the whole prefix. Top-k keeps the ``k`` most
likely tokens (Fan, Lewis, Dauphin 2018, arXiv:1805.04833); nucleus sampling keeps the
smallest set whose probability reaches ``p`` (Holtzman et al. 2020, "The Curious Case of
Neural Text Degeneration", arXiv:1904.09751).

=============  ==============================================
``z``          next-token logits ``[B, V]``
``τ``          temperature (``0`` → greedy ``argmax z``)
``k``          top-k;  ``p`` top-p (nucleus mass)
=============  ==============================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["KVCache", "filter_logits", "generate", "sample_next"]


class KVCache:
    """Keys and values of past positions, one ``[B, n_kv, S, D]`` pair per layer.

    Pass one to :meth:`mlatlas.llm.llama.Llama.forward` to decode incrementally: each call appends the new
    positions' keys and values. :meth:`crop` rolls back (speculative decoding).

    Args:
        num_layers: Number of decoder layers.
    """

    def __init__(self, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        """``P``: the number of cached positions."""
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v [B, n_kv, T, D]`` to layer ``layer_idx``; return all ``[.., P+T, D]``."""
        if self.keys[layer_idx] is not None:
            k = torch.cat((self.keys[layer_idx], k), dim=2)
            v = torch.cat((self.values[layer_idx], v), dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached positions."""
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"length must be in [0, {self.seq_len}], got {length}")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i] = k[:, :, :length] if length else None
                self.values[i] = v[:, :, :length] if length else None


def _check_filters(top_k: int | None, top_p: float | None) -> None:
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set the logits outside the top-k / top-p set to ``-inf``.

    Args:
        logits: ``[B, V]``.
        top_k: Keep the ``k`` largest (``None`` or ``0``: all).
        top_p: Keep the smallest set of most likely tokens whose probability reaches ``p``
            (the most likely token always stays); ``None`` or ``1``: all.
    """
    _check_filters(top_k, top_p)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop token i (in sorted order) when the tokens before it already reach p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from next-token logits ``[B, V]`` → int64 ``[B]``.

    ``temperature == 0`` is greedy (``argmax``); otherwise sample ``softmax(filter(z) / τ)``
    with ``generator``.
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    _check_filters(top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    z = filter_logits(logits.float() / temperature, top_k, top_p)  # p ∝ exp(z / τ)
    return torch.multinomial(z.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Any, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None,
             attention_mask: Tensor | None = None, use_cache: bool = True) -> Tensor:
    """Continue ``input_ids`` by up to ``max_new_tokens`` tokens.

    Args:
        model: A :class:`~mlatlas.llm.llama.Llama` (anything with its ``forward(input_ids,
            position_ids, cache, attention_mask=)`` and ``new_cache()``).
        input_ids: int64 prompts ``[B, T]`` (left-pad unequal prompts and pass
            ``attention_mask``).
        max_new_tokens: Number of tokens to add (``>= 0``).
        temperature: ``0`` → greedy; else the softmax temperature.
        top_k: See :func:`filter_logits`.
        top_p: See :func:`filter_logits`.
        eos_token_id: A row stops after emitting it; its later slots are filled with it, and
            decoding ends when every row has stopped.
        generator: Random source for sampling (seed it for reproducible samples).
        attention_mask: ``[B, T]`` 1 for real prompt tokens, 0 for left padding.
        use_cache: Decode with a KV cache (``False`` recomputes the whole prefix every step;
            the result is the same).

    Returns:
        int64 ``[B, T + n]`` with ``n <= max_new_tokens`` (fewer only when all rows hit EOS).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a tensor [B, T], got "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    B, T = input_ids.shape
    mask = (torch.ones_like(input_ids) if attention_mask is None
            else attention_mask.to(input_ids.device).long())
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be [B, T] = {tuple(input_ids.shape)}, got "
                         f"{tuple(mask.shape)}")
    pad_aware = attention_mask is not None
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
    tokens = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache = model.new_cache() if use_cache else None
    step_ids, step_pos = input_ids, positions
    for _ in range(max_new_tokens):
        logits = model(step_ids, step_pos, cache, attention_mask=mask if pad_aware else None)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(nxt)[:, None]), dim=1)
        positions = torch.cat((positions, positions[:, -1:] + 1), dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
        step_ids, step_pos = (nxt[:, None], positions[:, -1:]) if use_cache else (tokens,
                                                                                   positions)
    return tokens
