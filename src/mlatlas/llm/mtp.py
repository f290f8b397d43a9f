"""Multi-token prediction: DeepSeek-V3's sequential MTP modules, parallel heads, self-speculation.

A multi-token-prediction (MTP) model also predicts the tokens after the next one. DeepSeek-V3
chains ``D`` small modules after the main model: module ``k`` merges the previous depth's
representation of token ``i`` with the embedding of token ``i + k`` by a linear projection of
their RMS-normalised concatenation, runs one Transformer block and predicts token
``i + k + 1`` through the *shared* output head, so the causal chain is kept at every depth
(DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv:2412.19437, §2.2, eqs. (21)–(25)).
Gloeckle et al. instead put ``n`` independent heads on a shared trunk, head ``k`` predicting
token ``i + k`` from the trunk alone ("Better & Faster Large Language Models via Multi-token
Prediction", arXiv:2404.19737). At inference the extra predictions are drafts that the main
model verifies in one forward (:func:`mtp_generate`; the verification lives in
:mod:`mlatlas.llm.speculative`), which under greedy acceptance is lossless.

=================  =========================================================================
``h_i^0``          the main model's final (normalised) hidden state of token ``i``
``h_i^k``          depth ``k``'s representation of token ``i``, ``k = 1 … D``
``t_i``            token ``i``;  ``Emb`` / ``OutHead`` the main model's embedding and head
``M_k``            depth ``k``'s projection ``[2d → d]`` (``eh_proj``)
``TRM_k``          depth ``k``'s Transformer block (a :class:`LlamaDecoderLayer`)
``λ``              MTP loss weight;  ``L^k`` depth ``k``'s cross-entropy
=================  =========================================================================

Equations (with the paper's numbers)::

    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]     (21)
    h_{1:T-k}^k = TRM_k(h'_{1:T-k}^k)                            (22)
    P_{i+k+1}^k = OutHead(h_i^k)                                  (23)
    L^k = CE(P^k_{2+k:T+1}, t_{2+k:T+1});  L_MTP = λ/D Σ_k L^k    (24), (25)

The paper writes the concatenation of (21) as ``[h; Emb]``; DeepSeek-V3's released weights and
``transformers``' ``MtpLayer`` order it ``[Emb; h]`` (a permutation of ``M_k``'s columns),
which is what we follow, with the same parameter names (``enorm``, ``hnorm``, ``eh_proj``,
``mtp_block``, ``post_norm``), so a checkpoint's MTP weights load unchanged. Eq. (24) averages
over ``T`` in the paper; :func:`multi_token_loss` averages over the ``T - k - 1`` positions
that have a target (as ``transformers`` does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.llm.generation import KVCache
from mlatlas.llm.llama import AttentionMask, Llama, LlamaConfig, LlamaDecoderLayer
from mlatlas.llm.speculative import (
    DraftTree,
    SpeculativeOutput,
    accept_greedy,
    check_speculative_inputs,
    commit_path,
    verify_tree,
)
from mlatlas.nn.norms import RMSNorm
from mlatlas.nn.rope import rope_cos_sin, rope_inv_freq

__all__ = ["MTPModule", "MTPModules", "ParallelMTPHeads", "mtp_generate", "multi_token_loss"]


#: Every MTP block attends causally, bottom-right aligned over its own cache.
_CAUSAL = AttentionMask(causal=True)


class MTPModule(nn.Module):
    """One MTP depth ``k``: eqs. (21)–(22) plus the norm in front of the shared head.

    Args:
        config: The main model's :class:`LlamaConfig` (width, block shape, norm ``ε``).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.mtp_block = LlamaDecoderLayer(config, 0)
        self.post_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, hidden: Tensor, embeds: Tensor, cos: Tensor, sin: Tensor,
                cache: KVCache | None = None) -> Tensor:
        """``h^{k-1} [B, T, d]`` and ``Emb(t_{i+k}) [B, T, d]`` → ``h^k [B, T, d]``.

        ``cos, sin [B|1, T, D]`` are the RoPE tables of the positions; with ``cache`` the
        ``T`` positions are appended after the cached ones.
        """
        # eq. (21): h' = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden)), dim=-1))
        # eq. (22): h^k = TRM_k(h'), then the norm in front of OutHead (eq. (23))
        return self.post_norm(self.mtp_block(x, cos, sin, _CAUSAL, cache=cache))


class _Heads(nn.Module):
    """What both MTP variants share: config checks, RoPE tables, init, per-depth caches."""

    layers: nn.ModuleList

    def __init__(self, config: LlamaConfig, depth: int):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self.config, self.depth = config, depth
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) linear weights, unit norm gains (the main model's init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(positions[None], self.inv_freq, dtype)

    def check_model(self, model: Any) -> None:
        """Raise unless ``model`` is a :class:`Llama` of this width and vocabulary."""
        if not isinstance(model, Llama):
            raise TypeError(f"model must be a Llama, got {type(model).__name__}")
        c = model.config
        if (c.hidden_size, c.vocab_size) != (self.config.hidden_size, self.config.vocab_size):
            raise ValueError(f"model (hidden_size={c.hidden_size}, vocab_size={c.vocab_size}) "
                             f"does not match these heads (hidden_size="
                             f"{self.config.hidden_size}, vocab_size={self.config.vocab_size})")

    def _check(self, model: Any, hidden: Tensor, input_ids: Tensor | None) -> None:
        self.check_model(model)
        c = model.config
        if hidden.dim() != 3 or hidden.shape[-1] != c.hidden_size:
            raise ValueError(f"hidden must be [B, T, d={c.hidden_size}], got "
                             f"{tuple(hidden.shape)}")
        if input_ids is not None and input_ids.shape != hidden.shape[:2]:
            raise ValueError(f"input_ids must be [B, T] = {tuple(hidden.shape[:2])} like hidden, "
                             f"got {tuple(input_ids.shape)}")
        if hidden.shape[1] <= self.depth:
            raise ValueError(f"sequence length T={hidden.shape[1]} must exceed depth="
                             f"{self.depth} (depth k predicts token i + k + 1)")

    def new_state(self) -> dict[str, Any]:
        """Decoding state for :func:`mtp_generate`: one KV cache per depth, pending states."""
        return {"caches": [KVCache(1) for _ in range(self.depth)],
                "hidden": [None] * self.depth}


class MTPModules(_Heads):
    """DeepSeek-V3's ``D`` sequential MTP modules sharing the main model's embedding and head.

    Args:
        config: The main model's :class:`LlamaConfig`.
        depth: ``D``, the number of extra tokens predicted (DeepSeek-V3: 1).

    Attributes:
        layers: ``nn.ModuleList`` of :class:`MTPModule` (names as ``transformers``' MtpModel).
    """

    def __init__(self, config: LlamaConfig, depth: int = 1):
        super().__init__(config, depth)
        self.layers = nn.ModuleList(MTPModule(config) for _ in range(depth))
        self.reset_parameters()

    def forward(self, model: Llama, hidden: Tensor, input_ids: Tensor) -> list[Tensor]:
        """Training forward: depth ``k``'s logits for tokens ``i + k + 1``.

        Args:
            model: The main :class:`Llama` (its ``embed_tokens`` and ``lm_head`` are shared).
            hidden: ``h^0 [B, T, d]``: ``model.hidden_states(input_ids)``.
            input_ids: int64 ``[B, T]``.

        Returns:
            ``D`` logits tensors, depth ``k`` of shape ``[B, T - k, V]``: row ``i`` predicts
            ``t_{i+k+1}`` (the last row's target lies past the window).
        """
        self._check(model, hidden, input_ids)
        T = hidden.shape[1]
        out, h = [], hidden
        for k, layer in enumerate(self.layers, start=1):
            pos = torch.arange(k, T, device=hidden.device)  # position of t_{i+k}
            cos, sin = self._rope(pos, hidden.dtype)
            h = layer(h[:, :T - k], model.embed_tokens(input_ids[:, k:]), cos, sin)
            out.append(model.lm_head(h))  # eq. (23): P^k_{i+k+1} = OutHead(h^k_i)
        return out

    def draft(self, model: Llama, state: dict[str, Any], tokens: Tensor,
              new_hidden: Tensor) -> Tensor:
        """Greedy drafts of the next ``D`` tokens after the committed ``tokens``.

        Depth ``k`` keeps in its cache the positions ``j <= N - 1 - k`` whose input token
        ``t_{j+k}`` is committed; the last ``k - 1`` positions use this round's drafts and are
        cropped away after drafting (recomputed next round with the verified tokens).

        Args:
            model: The main model.
            state: From :meth:`new_state`, updated in place.
            tokens: int64 ``[N]`` committed tokens; the last one is not yet in the main cache.
            new_hidden: ``h^0 [n, d]`` of the positions committed since the last call (up to
                ``N - 2``).

        Returns:
            int64 ``[D]``: drafts of ``t_N … t_{N+D-1}``.
        """
        N, hid, caches = tokens.numel(), state["hidden"], state["caches"]
        hid[0] = new_hidden if hid[0] is None else torch.cat((hid[0], new_hidden))
        seq, full = tokens, hid[0]  # full: h^{k-1} over positions [L_k, N - 2]
        prev_len = N - 1  # h^0 is committed up to position N - 2
        for k, layer in enumerate(self.layers, start=1):
            start = caches[k - 1].seq_len  # L_k
            pos = torch.arange(start + k, N - 1 + k, device=tokens.device)  # of t_{j+k}
            cos, sin = self._rope(pos, full.dtype)
            out = layer(full[None], model.embed_tokens(seq[pos])[None], cos, sin,
                        cache=caches[k - 1])[0]  # h^k over [L_k, N - 2]
            seq = torch.cat((seq, model.lm_head(out[-1]).argmax(-1, keepdim=True)))
            new_len = max(0, N - k)  # t_{j+k} is committed for j <= N - 1 - k
            caches[k - 1].crop(new_len)
            hid[k - 1] = full[new_len - start:prev_len - start]  # h^{k-1} depth k still needs
            if k < self.depth:
                pending = hid[k] if hid[k] is not None else out[:0]
                full = torch.cat((pending, out))  # h^k over [L_{k+1}, N - 2]
            prev_len = new_len
        return seq[N:]


class ParallelMTPHeads(_Heads):
    """Gloeckle et al.'s parallel heads: head ``k`` predicts ``t_{i+k+1}`` from ``h_i^0`` alone.

    Each head is one Transformer block plus an RMSNorm on the main model's final hidden
    states, followed by the shared output head; the main model's own head is the first one.

    Args:
        config: The main model's :class:`LlamaConfig`.
        num_heads: ``D`` extra heads.
    """

    def __init__(self, config: LlamaConfig, num_heads: int = 1):
        super().__init__(config, num_heads)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"block": LlamaDecoderLayer(config, 0),
                           "norm": RMSNorm(config.hidden_size, config.rms_norm_eps)})
            for _ in range(num_heads))
        self.reset_parameters()

    def _head(self, k: int, hidden: Tensor, start: int, cache: KVCache | None) -> Tensor:
        pos = torch.arange(start, start + hidden.shape[1], device=hidden.device)
        cos, sin = self._rope(pos, hidden.dtype)
        layer = self.layers[k]
        return layer["norm"](layer["block"](hidden, cos, sin, _CAUSAL, cache=cache))

    def forward(self, model: Llama, hidden: Tensor, input_ids: Tensor | None = None
                ) -> list[Tensor]:
        """``h^0 [B, T, d]`` → ``D`` logits ``[B, T - k, V]``; row ``i`` predicts ``t_{i+k+1}``.

        ``input_ids`` is accepted for symmetry with :class:`MTPModules` (unused).
        """
        self._check(model, hidden, input_ids)
        T = hidden.shape[1]
        return [model.lm_head(self._head(k - 1, hidden, 0, None)[:, :T - k])
                for k in range(1, self.depth + 1)]

    def draft(self, model: Llama, state: dict[str, Any], tokens: Tensor,
              new_hidden: Tensor) -> Tensor:
        """Drafts of ``t_N … t_{N+D-1}``, all heads from ``h^0_{N-2}``; see
        :meth:`MTPModules.draft` for the arguments."""
        start = state["caches"][0].seq_len
        return torch.stack([
            model.lm_head(self._head(k, new_hidden[None], start, state["caches"][k])[0, -1])
            .argmax(-1) for k in range(self.depth)])


def multi_token_loss(logits: list[Tensor], targets: Tensor, weight: float = 0.3) -> Tensor:
    """``λ/D Σ_k L^k`` (eq. (25)): depth ``k``'s logits against ``targets[:, i + k + 1]``.

    Args:
        logits: From :meth:`MTPModules.forward` / :meth:`ParallelMTPHeads.forward`: depth
            ``k`` is ``[B, T - k, V]``.
        targets: int64 ``[B, T]``: the window's tokens (or a teacher's choices for them).
        weight: ``λ`` (DeepSeek-V3: 0.3 for the first 10T training tokens, then 0.1).

    Returns:
        Scalar loss.
    """
    D = len(logits)
    total = logits[0].new_zeros((), dtype=torch.float32)
    for k, z in enumerate(logits, start=1):
        T = targets.shape[1]
        if z.shape[:2] != (targets.shape[0], T - k):
            raise ValueError(f"logits[{k - 1}] must be [B, T - {k}, V] = "
                             f"[{targets.shape[0]}, {T - k}, V], got {tuple(z.shape)}")
        # eq. (24): L^k = CE(P^k_{i+k+1}, t_{i+k+1}) over the positions with a target
        total = total + F.cross_entropy(z[:, :T - k - 1].reshape(-1, z.shape[-1]).float(),
                                        targets[:, k + 1:].reshape(-1))
    return weight / D * total  # eq. (25)


@torch.no_grad()
def mtp_generate(model: Llama, mtp: MTPModules | ParallelMTPHeads, input_ids: Tensor,
                 max_new_tokens: int, *, eos_token_id: int | None = None) -> SpeculativeOutput:
    """Greedy self-speculative decoding: the MTP heads draft, the main model verifies.

    Every step feeds the main model the last committed token and the ``D`` drafts in one
    forward (a chain, causal over the KV cache), keeps the drafts up to the first that differs
    from the main model's greedy choice, and adds the main model's own next token — so the
    output is token-identical to :func:`mlatlas.llm.generation.generate` with
    ``temperature=0``, whatever the drafts.

    Args:
        model: The main :class:`~mlatlas.llm.llama.Llama`.
        mtp: Its :class:`MTPModules` or :class:`ParallelMTPHeads`.
        input_ids: int64 ``[1, T]`` (one prompt: batches are not supported).
        max_new_tokens: Tokens to add (``>= 0``).
        eos_token_id: Stop after emitting it (as ``generate`` does).

    Returns:
        A :class:`~mlatlas.llm.speculative.SpeculativeOutput`: ``.tokens`` is what
        ``generate`` returns; ``.forwards``, ``.accepted``, ``.tokens_per_forward`` … the
        statistics.

    Raises:
        TypeError, ValueError: see :func:`~mlatlas.llm.speculative.check_speculative_inputs`;
            heads of another model's shape.
    """
    check_speculative_inputs(model, input_ids, max_new_tokens)
    if not isinstance(mtp, _Heads):
        raise TypeError(f"mtp must be MTPModules or ParallelMTPHeads, got {type(mtp).__name__}")
    mtp.check_model(model)
    T = input_ids.shape[1]
    result = SpeculativeOutput(tokens=input_ids, forwards=0, prompt_len=T)
    if max_new_tokens == 0:
        return result
    cache, state = model.new_cache(), mtp.new_state()
    hidden = model.hidden_states(input_ids, None, cache)[0]  # prefill: h^0 of the prompt
    result.forwards = 1
    tokens = torch.cat((input_ids[0], model.lm_head(hidden[-1]).argmax(-1, keepdim=True)))
    while tokens.numel() - T < max_new_tokens:
        if eos_token_id is not None and bool((tokens[T:] == eos_token_id).any()):
            break
        room = max_new_tokens - (tokens.numel() - T) - 1  # drafts that can still be emitted
        drafts = mtp.draft(model, state, tokens, hidden)[:room]
        chain, past = DraftTree.chain(drafts.numel()), cache.seq_len
        block = torch.cat((tokens[-1:], drafts))
        hidden, logits = verify_tree(model, cache, block, chain)
        result.forwards += 1
        path = accept_greedy(block, logits, chain)
        a = path.numel() - 1
        commit_path(cache, past, path)
        hidden = hidden[:a + 1]  # h^0 of the newly committed positions
        tokens = torch.cat((tokens, drafts[:a], logits[a].argmax(-1, keepdim=True)))
        result.accepted.append(a)
        result.drafted.append(drafts.numel())
    if eos_token_id is not None:
        hits = (tokens[T:] == eos_token_id).nonzero()
        if hits.numel():
            tokens = tokens[:T + int(hits[0, 0]) + 1]
    result.tokens = tokens[None]
    return result
