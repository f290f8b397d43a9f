"""Log-probabilities of completion tokens under a causal language model.

Every alignment loss here scores a completion ``y`` of a prompt ``x`` by the policy's
per-token log-probabilities ``log π_θ(y_t | x, y_<t)``: one forward pass over the
concatenation ``[x; y]``, the logits shifted by one (position ``t`` predicts token ``t + 1``),
the realised tokens gathered from the log-softmax, and only completion positions kept.
Summed over the completion this is the sequence log-likelihood ``log π_θ(y | x)`` of DPO
(Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7); kept per
token it is the importance ratio's numerator of PPO and GRPO (Schulman et al. 2017,
arXiv:1707.06347; Shao et al. 2024, arXiv:2402.03300). The convention is trl's: a
``completion_mask`` aligned with ``input_ids`` (1 on completion tokens), and the per-token
tensors have ``T - 1`` columns, column ``t`` scoring token ``t + 1``.

=================  ===========================================================
``B, T, V``        sequences, tokens per sequence (prompt + completion), vocab
``m_t``            completion mask of token ``t`` (``completion_mask``)
``ℓ_t``            ``log π_θ(x_{t+1} | x_≤t)``, column ``t`` of ``logps [B, T-1]``
``H_t``            entropy of ``π_θ(· | x_≤t)``
=================  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["CompletionLogps", "completion_logps", "position_ids_from_mask", "token_entropy",
           "token_logps"]


@dataclass
class CompletionLogps:
    """Per-token scores of a batch of completions (all ``[B, T-1]``, column ``t`` = token ``t+1``).

    Attributes:
        logps: ``ℓ_t · m_{t+1}`` (float32; 0 off the completion), differentiable.
        mask: ``m_{t+1}`` as float32 (``completion_mask[:, 1:]``).
        entropy: ``H_t · m_{t+1}`` when requested, else ``None``.
    """

    logps: Tensor
    mask: Tensor
    entropy: Tensor | None = None

    @property
    def sequence(self) -> Tensor:
        """``[B]``: ``Σ_t ℓ_t m_{t+1}`` = ``log π_θ(y | x)``."""
        return self.logps.sum(-1)


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Logits ``[B, T, V]``, tokens ``[B, T]`` → float32 ``[B, T-1]`` ``log p(x_{t+1} | x_≤t)``."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits [B, T, V] and input_ids [B, T] must agree, got "
                         f"{tuple(logits.shape)} and {tuple(input_ids.shape)}")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # log softmax(z_t)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # ℓ_t = log p(x_{t+1} | x_≤t)


def token_entropy(logits: Tensor) -> Tensor:
    """``[B, T, V]`` → ``[B, T-1]`` float32 ``H_t = -Σ_v p_v log p_v`` of the next-token laws."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``[B, T]`` 0/1 mask → positions counting real tokens only (``cumsum - 1``, ≥ 0).

    Left-padded rows start at position 0 on their first real token, as in
    :func:`mlatlas.llm.generation.generate`; for right padding it equals ``arange(T)`` on the
    real tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_batch(input_ids: Tensor, completion_mask: Tensor,
                 attention_mask: Tensor | None) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, T], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs T >= 2 (a prompt token and a completion token), got "
                         f"shape {tuple(input_ids.shape)}")
    for name, mask in (("completion_mask", completion_mask), ("attention_mask", attention_mask)):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
            raise ValueError(f"{name} must be a tensor of input_ids' shape "
                             f"{tuple(input_ids.shape)}, got {tuple(getattr(mask, 'shape', ()))}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1, got values "
                             f"{sorted(set(mask.flatten().tolist()))[:5]}")
    if bool(completion_mask[:, 0].bool().any()):
        raise ValueError("completion_mask[:, 0] must be 0: the first token has no context to be "
                         "predicted from (a completion needs at least one prompt token)")
    if attention_mask is not None and bool((completion_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask marks padding (a position where attention_mask is 0)")


def completion_logps(model: nn.Module, input_ids: Tensor, completion_mask: Tensor, *,
                     attention_mask: Tensor | None = None,
                     with_entropy: bool = False) -> CompletionLogps:
    """One forward pass of ``model`` over prompt + completion; per-token completion scores.

    Args:
        model: A causal LM called as ``model(input_ids, position_ids, attention_mask=...)``
            → logits ``[B, T, V]`` (:class:`mlatlas.llm.llama.Llama`).
        input_ids: int ``[B, T]``, prompt then completion (then right padding), or left-padded
            prompts followed by their completions.
        completion_mask: ``[B, T]`` 0/1 (bool, int or float), 1 on completion tokens; column
            0 must be 0.
        attention_mask: ``[B, T]`` 0/1, 0 on padding (positions then count real tokens only,
            :func:`position_ids_from_mask`). ``None``: every token is real — fine for right
            padding that ``completion_mask`` excludes, since causal attention never looks
            right.
        with_entropy: Also return the next-token entropies (PPO's entropy bonus).

    Returns:
        :class:`CompletionLogps` with ``[B, T-1]`` tensors.

    Raises:
        ValueError: shapes that disagree, masks with values other than 0/1, a completion
            token in column 0 or on padding.
    """
    _check_batch(input_ids, completion_mask, attention_mask)
    if attention_mask is None:
        logits = model(input_ids)
    else:
        logits = model(input_ids, position_ids_from_mask(attention_mask),
                       attention_mask=attention_mask.long())
    mask = completion_mask[:, 1:].float()  # m_{t+1}: column t scores token t+1
    logps = token_logps(logits, input_ids) * mask
    entropy = token_entropy(logits) * mask if with_entropy else None
    return CompletionLogps(logps=logps, mask=mask, entropy=entropy)
