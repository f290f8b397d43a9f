"""DoLa: decoding by contrasting the final layer with a premature layer.

Factual knowledge in a Transformer LM tends to surface in its later layers, while early
layers already predict fluent but generic continuations. DoLa reads next-token distributions
off intermediate layers through the model's own head ("early exit"), picks, at every step,
the premature layer whose distribution differs most from the final one (Jensen–Shannon
divergence), and decodes from the contrast ``log q_N − log q_M`` — restricted to tokens the
final layer itself finds plausible. Chuang et al. 2024, "DoLa: Decoding by Contrasting Layers
Improves Factuality in Large Language Models", arXiv:2309.03883 (§2, eqs. (1)-(4)).

The transformers version pinned here (5.x) no longer ships DoLa: ``generate(dola_layers=…)``
maps to a Hub ``custom_generate`` repository (``transformers-community/dola``), which cannot be
fetched offline, so :func:`dola_logits` is tested against the paper's equations.

==================  ================================================================
``q_j(x)``          ``softmax(head(norm(h_j)))``: layer ``j``'s next-token distribution
                    (``j = 0``: the embeddings; ``N``: the last layer)
``J``               candidate premature layers
``M``               ``argmax_{j ∈ J} JSD(q_N ‖ q_j)``
``α``               ``relative_top``: ``V_head = {x : q_N(x) ≥ α max_w q_N(w)}``
==================  ================================================================

Eqs. (2)-(4)::

    F(x) = log q_N(x) − log q_M(x)   if x ∈ V_head,   −∞ otherwise
    M    = argmax_{j ∈ J} JSD(q_N(·) ‖ q_j(·)),  JSD(P‖Q) = ½ KL(P‖A) + ½ KL(Q‖A), A = ½(P + Q)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mlatlas.llm.llama import Llama

__all__ = ["DoLaStep", "dola_generate", "dola_logits", "early_exit_logits", "js_divergence"]


def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``JSD(softmax p ‖ softmax q)`` in nats over the last dim (broadcasting)."""
    lp, lq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    la = torch.logaddexp(lp, lq) - math.log(2.0)  # log A, A = ½(P + Q)
    kl_pa = (lp.exp() * (lp - la)).sum(-1)
    kl_qa = (lq.exp() * (lq - la)).sum(-1)
    return 0.5 * (kl_pa + kl_qa)


@dataclass
class DoLaStep:
    """One DoLa decision.

    Attributes:
        scores: ``[B, V]`` contrast ``F`` (``−inf`` outside ``V_head``).
        premature: int64 ``[B]`` the chosen layer ``M`` of every row (a layer number).
        jsd: ``[J, B]`` the divergence of every candidate.
    """

    scores: Tensor
    premature: Tensor
    jsd: Tensor


def dola_logits(final: Tensor, premature: Tensor, layers: list[int],
                relative_top: float = 0.1) -> DoLaStep:
    """DoLa's contrast for one step (eqs. (2)-(4)).

    Args:
        final: ``[B, V]`` final-layer logits.
        premature: ``[J, B, V]`` early-exit logits of the candidates.
        layers: The ``J`` candidate layer numbers (same order).
        relative_top: ``α`` in ``(0, 1]``.

    Raises:
        ValueError: shapes that disagree, no candidate, or ``α`` outside ``(0, 1]``.
    """
    if premature.dim() != 3 or premature.shape[1:] != final.shape or \
            premature.shape[0] != len(layers) or not layers:
        raise ValueError(f"premature must be [J={len(layers)} >= 1, B, V] matching final "
                         f"{tuple(final.shape)}, got {tuple(premature.shape)}")
    if not 0 < relative_top <= 1:
        raise ValueError(f"relative_top must lie in (0, 1], got {relative_top!r}")
    jsd = js_divergence(final[None], premature)  # [J, B]
    pick = jsd.argmax(0)  # eq. (4): M = argmax_j JSD(q_N ‖ q_j)
    log_qn = final.float().log_softmax(-1)
    log_qm = premature.float().log_softmax(-1)[pick, torch.arange(final.shape[0])]
    # eq. (3): V_head = {x : q_N(x) ≥ α max_w q_N(w)}
    head = log_qn >= log_qn.max(-1, keepdim=True).values + math.log(relative_top)
    scores = torch.where(head, log_qn - log_qm, torch.tensor(-math.inf))  # eq. (2)
    return DoLaStep(scores, torch.tensor(layers)[pick], jsd)


@torch.no_grad()
def early_exit_logits(model: Llama, input_ids: Tensor, layers: list[int],
                      norm_premature: bool = True) -> tuple[Tensor, Tensor]:
    """Final logits and early-exit logits of ``layers`` at the last position.

    Layer ``j`` is the residual stream after ``j`` decoder layers (``0`` = the embeddings),
    captured by forward hooks; its logits are ``lm_head(norm(h_j))``.

    Args:
        model: A :class:`~mlatlas.llm.llama.Llama`.
        input_ids: int64 ``[B, T]``.
        layers: Candidate layers in ``[0, num_layers)``.
        norm_premature: Apply the final RMSNorm before the head (``False``: the head on the raw
            hidden state, as transformers' removed implementation did).

    Returns:
        ``(final [B, V], premature [J, B, V])``.
    """
    n = model.config.num_layers
    if not layers or any(not 0 <= j < n for j in layers):
        raise ValueError(f"layers must be a non-empty list in [0, {n}) (num_layers), got "
                         f"{layers}")
    states: dict[int, Tensor] = {}
    hooks = [model.embed_tokens.register_forward_hook(
        lambda m, a, out: states.__setitem__(0, out[:, -1]))]
    hooks += [layer.register_forward_hook(
        lambda m, a, out, j=j: states.__setitem__(j + 1, out[:, -1]))
        for j, layer in enumerate(model.layers)]
    try:
        final = model(input_ids)[:, -1]
    finally:
        for h in hooks:
            h.remove()
    hidden = torch.stack([states[j] for j in layers])  # [J, B, d]
    if norm_premature:
        hidden = model.norm(hidden)
    return final, model.lm_head(hidden)


@torch.no_grad()
def dola_generate(model: Llama, input_ids: Tensor, max_new_tokens: int, layers: list[int], *,
                  relative_top: float = 0.1, repetition_penalty: float = 1.0,
                  eos_token_id: int | None = None, norm_premature: bool = True) -> Tensor:
    """Greedy decoding on DoLa's contrast ``argmax_x F(x)``.

    Args:
        model: A :class:`~mlatlas.llm.llama.Llama`.
        input_ids: int64 prompts ``[B, T]`` (equal lengths).
        max_new_tokens: Tokens to add.
        layers: Candidate premature layers ``J``.
        relative_top: ``α``.
        repetition_penalty: Divides positive (multiplies negative) scores of tokens already in
            the row, as the paper's decoding does (``1.0`` = off).
        eos_token_id: Rows stop after it (later slots filled with it).
        norm_premature: See :func:`early_exit_logits`.

    Returns:
        int64 ``[B, T + n]``.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if repetition_penalty < 1.0:
        raise ValueError(f"repetition_penalty must be >= 1, got {repetition_penalty!r}")
    tokens = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        final, early = early_exit_logits(model, tokens, layers, norm_premature)
        scores = dola_logits(final, early, layers, relative_top).scores
        if repetition_penalty != 1.0:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, tokens, True)
            pen = torch.where(scores > 0, scores / repetition_penalty,
                              scores * repetition_penalty)
            scores = torch.where(seen & torch.isfinite(scores), pen, scores)
        nxt = scores.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return tokens
