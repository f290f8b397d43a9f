"""Medusa: extra decoding heads draft a token tree that the base model verifies in one forward.

Medusa adds ``K`` light heads on the base model's last hidden state; head ``k`` guesses the
token ``k + 1`` steps ahead (the base's own head guesses the next one). The top candidates of
every head form a fixed sparse tree of continuations, the base model scores every node in one
forward under tree attention, and the longest path the base agrees with is kept — with the
base's own next token after it. Medusa-1 trains the heads alone on a frozen base. Cai et al.
2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
arXiv:2401.10774 (heads §2.1.1, tree attention §2.1.2, typical acceptance §2.3.1, sparse tree
construction §2.3.3). Verification is :mod:`mlatlas.llm.speculative`.

==============  ==============================================================================
``h_t``         the base's final (normalised) hidden state at position ``t``, ``[d]``
``K``           Medusa heads;  head ``k`` predicts ``x_{t+k+1}``
``W_1, b_1``    head ``k``'s residual block ``[d, d]`` (zero-initialised weight)
``W_2``         head ``k``'s output matrix ``[V, d]`` (initialised as the base's LM head)
``λ_k``         Medusa-1 loss weight of head ``k`` (``0.8^k``)
``a_k^(i)``     calibrated accuracy of head ``k``'s ``i``-th candidate (sparse tree)
``ε, δ``        typical acceptance threshold and entropy factor
==============  ==============================================================================

Equations::

    p_t^(k) = softmax(W_2^(k) · (SiLU(W_1^(k) · h_t + b_1^(k)) + h_t))        (§2.1.1)
    L_Medusa-1 = Σ_k λ_k · (−log p_t^(k)(y_{t+k+1}))                          (§2.2.1)
    accept x_{n+k}  iff  p(x_{n+k} | x_{≤n+k−1}) > min(ε, δ exp(−H(p(· | x_{≤n+k−1}))))
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.llm.generation import sample_next
from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.speculative import (
    DraftTree,
    SpeculativeOutput,
    accept_greedy,
    accept_typical,
    check_speculative_inputs,
    commit_path,
    typical_threshold,
    verify_tree,
)

__all__ = ["DEFAULT_TREE", "NOMINAL_ACCURACY", "MedusaHeads", "ResBlock", "head_accuracy",
           "medusa_generate", "medusa_loss", "sparse_tree"]

#: Nominal head accuracies ``a_k^(i)`` (rows: heads 1–4, columns: ranks 0–4) from which the
#: default tree is built; a run calibrates its own with :func:`head_accuracy`.
NOMINAL_ACCURACY: tuple[tuple[float, ...], ...] = (
    (0.60, 0.15, 0.07, 0.04, 0.03), (0.45, 0.13, 0.06, 0.04, 0.03),
    (0.35, 0.11, 0.05, 0.03, 0.02), (0.30, 0.09, 0.04, 0.03, 0.02),
)

#: The default sparse tree: ``sparse_tree(NOMINAL_ACCURACY, 24)`` (24 nodes, depth 4,
#: top-k 5/5/3/1).
DEFAULT_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,), (4,), (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1),
    (2, 0), (2, 1), (3, 0), (4, 0), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 2, 0),
    (1, 0, 0), (2, 0, 0), (0, 0, 0, 0),
)


class ResBlock(nn.Module):
    """``x + SiLU(W_1 x + b_1)`` with ``W_1`` zero-initialised (the head starts as identity).

    Args:
        dim: ``d``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # Medusa: W_1 starts at 0, b_1 keeps its default

    def forward(self, x: Tensor) -> Tensor:
        """``[..., d]`` → ``[..., d]``."""
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``K`` Medusa heads for a :class:`LlamaConfig`: residual block(s) and an output matrix.

    Args:
        config: The base model's :class:`LlamaConfig`.
        num_heads: ``K``.
        num_layers: Residual blocks per head (the paper: 1).

    Attributes:
        heads: ``nn.ModuleList`` of ``nn.Sequential(ResBlock…, nn.Linear(d, V, bias=False))``
            (the reference implementation's ``medusa_head`` layout).
    """

    def __init__(self, config: LlamaConfig, num_heads: int = 4, num_layers: int = 1):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        for name, value in (("num_heads", num_heads), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.config, self.num_heads = config, num_heads
        d, V = config.hidden_size, config.vocab_size
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(d) for _ in range(num_layers)], nn.Linear(d, V, bias=False))
            for _ in range(num_heads))
        for head in self.heads:
            nn.init.normal_(head[-1].weight, std=0.02)

    @classmethod
    def for_model(cls, model: Llama, num_heads: int = 4, num_layers: int = 1) -> MedusaHeads:
        """Heads for ``model`` with the paper's init: every ``W_2`` a copy of its LM head."""
        if not isinstance(model, Llama):
            raise TypeError(f"model must be a Llama, got {type(model).__name__}")
        heads = cls(model.config, num_heads, num_layers).to(model.lm_head.weight.dtype)
        with torch.no_grad():
            for head in heads.heads:
                head[-1].weight.copy_(model.lm_head.weight)
        return heads

    def forward(self, hidden: Tensor) -> Tensor:
        """``h_t [..., d]`` → ``[K, ..., V]``: head ``k = 1 … K`` predicts ``x_{t+k+1}``."""
        if hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden must be [..., d={self.config.hidden_size}], got "
                             f"{tuple(hidden.shape)}")
        # p^(k) = softmax(W_2 (SiLU(W_1 h + b_1) + h))
        return torch.stack([head(hidden) for head in self.heads])


def medusa_loss(head_logits: Tensor, targets: Tensor, decay: float = 0.8) -> Tensor:
    """Medusa-1 loss ``Σ_k λ_k CE(p^(k)_t, y_{t+k+1})`` with ``λ_k = decay^k``.

    Args:
        head_logits: ``[K, B, T, V]`` from :meth:`MedusaHeads.forward` on ``h [B, T, d]``.
        targets: int64 ``[B, T]``: the tokens of the window (or the base model's choices).
        decay: ``λ_k = decay^k`` for ``k = 1 … K`` (the paper: 0.8).

    Returns:
        Scalar loss.
    """
    K, B, T = head_logits.shape[:3]
    if targets.shape != (B, T):
        raise ValueError(f"targets must be [B, T] = [{B}, {T}], got {tuple(targets.shape)}")
    if T <= K + 1:
        raise ValueError(f"window length T={T} must exceed num_heads + 1 = {K + 1}")
    total = head_logits.new_zeros((), dtype=torch.float32)
    for k in range(1, K + 1):
        z = head_logits[k - 1, :, :T - k - 1]  # position t predicts y_{t+k+1}
        total = total + decay ** k * F.cross_entropy(z.reshape(-1, z.shape[-1]).float(),
                                                     targets[:, k + 1:].reshape(-1))
    return total


def head_accuracy(head_logits: Tensor, targets: Tensor, top: int) -> Tensor:
    """``a_k^(i)``: how often head ``k``'s ``i``-th candidate is the target, ``[K, top]``.

    Args:
        head_logits: ``[K, B, T, V]``.
        targets: int64 ``[B, T]`` (the base model's greedy choices, for greedy acceptance).
        top: Ranks ``i = 0 … top - 1`` to score.
    """
    K, _, T = head_logits.shape[:3]
    acc = torch.zeros(K, top)
    for k in range(1, K + 1):
        cand = head_logits[k - 1, :, :T - k - 1].topk(top, dim=-1).indices
        acc[k - 1] = (cand == targets[:, k + 1:, None]).float().mean(dim=(0, 1))
    return acc


def sparse_tree(accuracy: Tensor, num_nodes: int) -> DraftTree:
    """Medusa's sparse tree: the ``num_nodes`` paths of highest expected acceptance.

    A path ``(i_1, …, i_d)`` is accepted with probability ``Π_k a_k^(i_k)`` (heads taken as
    independent); the expected accepted length is the sum of that over the tree's nodes, so
    adding the nodes greedily by that product is optimal (§2.3.3).

    Args:
        accuracy: ``[K, R]``: ``a_k^(i)`` of head ``k`` (rows) and rank ``i`` (columns).
        num_nodes: Nodes besides the root.
    """
    if accuracy.dim() != 2 or not bool(((accuracy >= 0) & (accuracy <= 1)).all()):
        raise ValueError(f"accuracy must be [K, R] with values in [0, 1], got "
                         f"{tuple(accuracy.shape)}")
    K, R = accuracy.shape
    heap = [(-float(accuracy[0, i]), (i,)) for i in range(R)]
    heapq.heapify(heap)
    paths: list[tuple[int, ...]] = []
    while heap and len(paths) < num_nodes:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        if len(path) < K:
            for i in range(R):
                heapq.heappush(heap, (neg * float(accuracy[len(path), i]), path + (i,)))
    return DraftTree(paths)


def _check_tree(tree: DraftTree, heads: MedusaHeads) -> None:
    if tree.max_depth > heads.num_heads:
        raise ValueError(f"tree depth {tree.max_depth} exceeds num_heads={heads.num_heads} "
                         "(each depth is drafted by one head)")
    top = max(tree.top_k(), default=0)
    if top > heads.config.vocab_size:
        raise ValueError(f"tree needs the top-{top} candidates of a head, more than the "
                         f"vocabulary (vocab_size={heads.config.vocab_size})")


@torch.no_grad()
def medusa_generate(model: Llama, heads: MedusaHeads, input_ids: Tensor, max_new_tokens: int,
                    *, tree: DraftTree | Sequence[Sequence[int]] | None = None,
                    acceptance: str = "greedy", temperature: float = 0.7,
                    epsilon: float = 0.09, delta: float = 0.3, eos_token_id: int | None = None,
                    generator: torch.Generator | None = None) -> SpeculativeOutput:
    """Decode with Medusa heads and tree attention (one base forward per step).

    Each step: the root is the base model's next token; head ``k``'s top candidates fill
    depth ``k`` of ``tree``; one base forward with tree attention scores every node; the
    longest acceptable path is kept (its keys/values committed to the cache) and the base's
    next token after it becomes the next root.

    Args:
        model: The base :class:`~mlatlas.llm.llama.Llama`.
        heads: Its :class:`MedusaHeads`.
        input_ids: int64 ``[1, T]`` (one prompt: batches are not supported).
        max_new_tokens: Tokens to add (``>= 0``).
        tree: A :class:`~mlatlas.llm.speculative.DraftTree` or its paths; default
            :data:`DEFAULT_TREE` cut to ``heads.num_heads`` levels.
        acceptance: ``"greedy"`` (lossless: token-identical to greedy decoding) or
            ``"typical"`` (roots sampled at ``temperature`` from the typical set, nodes kept
            while ``p > min(ε, δ exp(−H))``).
        temperature: ``τ > 0`` of typical acceptance.
        epsilon: ``ε ∈ (0, 1)`` (the paper's default 0.09).
        delta: ``δ ∈ (0, 1]`` (the reference code's default ``√ε = 0.3``).
        eos_token_id: Stop after emitting it.
        generator: Random source of typical acceptance's sampled roots.

    Returns:
        A :class:`~mlatlas.llm.speculative.SpeculativeOutput` (``.tokens`` as ``generate``
        returns them, and the statistics).

    Raises:
        TypeError, ValueError: bad prompt (see
            :func:`~mlatlas.llm.speculative.check_speculative_inputs`), heads of another
            model, a tree deeper than ``num_heads`` or needing more candidates than the
            vocabulary, an unknown ``acceptance`` or out-of-range ``τ, ε, δ``.
    """
    check_speculative_inputs(model, input_ids, max_new_tokens)
    if not isinstance(heads, MedusaHeads):
        raise TypeError(f"heads must be MedusaHeads, got {type(heads).__name__}")
    c = model.config
    if (c.hidden_size, c.vocab_size) != (heads.config.hidden_size, heads.config.vocab_size):
        raise ValueError(f"heads (hidden_size={heads.config.hidden_size}, vocab_size="
                         f"{heads.config.vocab_size}) do not fit the model (hidden_size="
                         f"{c.hidden_size}, vocab_size={c.vocab_size})")
    if tree is None:
        tree = DraftTree([p for p in DEFAULT_TREE if len(p) <= heads.num_heads])
    elif not isinstance(tree, DraftTree):
        tree = DraftTree(tree)
    _check_tree(tree, heads)
    if acceptance not in ("greedy", "typical"):
        raise ValueError(f"acceptance must be 'greedy' or 'typical', got {acceptance!r}")
    if acceptance == "typical" and not (temperature > 0 and 0 < epsilon < 1 and 0 < delta <= 1):
        raise ValueError(f"typical acceptance needs temperature > 0, epsilon in (0, 1) and "
                         f"delta in (0, 1], got {temperature!r}, {epsilon!r}, {delta!r}")

    def next_token(logits: Tensor) -> Tensor:  # the base's own choice after a node
        if acceptance == "greedy":
            return logits.argmax(-1, keepdim=True)
        z = logits.float() / temperature
        atypical = z.softmax(-1) < typical_threshold(z.softmax(-1), epsilon, delta)
        return sample_next(z.masked_fill(atypical, float("-inf"))[None], 1.0,
                           generator=generator)

    T = input_ids.shape[1]
    result = SpeculativeOutput(tokens=input_ids, forwards=0, prompt_len=T)
    if max_new_tokens == 0:
        return result
    cache = model.new_cache()
    last = model.hidden_states(input_ids, None, cache)[0, -1]  # prefill
    result.forwards = 1
    tokens = torch.cat((input_ids[0], next_token(model.lm_head(last))))
    trees: dict[int, DraftTree] = {}
    while tokens.numel() - T < max_new_tokens:
        if eos_token_id is not None and bool((tokens[T:] == eos_token_id).any()):
            break
        room = min(tree.max_depth, max_new_tokens - (tokens.numel() - T) - 1)
        sub = trees.setdefault(room, tree.truncate(room))
        if sub.max_depth:  # head k's top candidates fill depth k
            cand = heads(last)[:sub.max_depth].topk(max(sub.top_k()), dim=-1).indices
            block = torch.cat((tokens[-1:], cand[sub.depth[1:] - 1, sub.rank[1:]]))
        else:
            block = tokens[-1:]
        past = cache.seq_len
        hidden, logits = verify_tree(model, cache, block, sub)
        result.forwards += 1
        path = (accept_greedy(block, logits, sub) if acceptance == "greedy" else
                accept_typical(block, logits, sub, temperature, epsilon, delta))
        commit_path(cache, past, path)
        last = hidden[path[-1]]
        tokens = torch.cat((tokens, block[path[1:]], next_token(logits[path[-1]])))
        result.accepted.append(path.numel() - 1)
        result.drafted.append(sub.max_depth)
    if eos_token_id is not None:
        hits = (tokens[T:] == eos_token_id).nonzero()
        if hits.numel():
            tokens = tokens[:T + int(hits[0, 0]) + 1]
    result.tokens = tokens[None]
    return result
