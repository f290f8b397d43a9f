"""Speculative verification: a tree of drafted tokens checked by the target model in one forward.

Self-speculative decoders (Medusa, multi-token prediction) guess several future tokens
cheaply, then run the target model *once* over all the guesses; a guess is kept while it is
what the target itself would have emitted. The guesses form a tree rooted at the next token
(a chain is the special case of one child per node). One forward scores every node: each node
sits at position ``P + depth`` and attends to the ``P`` cached positions and to its own
ancestors only (tree attention, Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration
Framework with Multiple Decoding Heads", arXiv:2401.10774, §2.1.2; Miao et al. 2024,
"SpecInfer", arXiv:2305.09781). Under greedy acceptance the output is token-identical to
greedy decoding (Stern, Shazeer, Uszkoreit 2018, blockwise parallel decoding,
arXiv:1811.03115); typical acceptance (Medusa §2.3.1) trades that for longer accepted runs.
The accepted path's keys/values are moved to the front of the tree block of the KV cache and
the rest is cropped away.

==============  =============================================================================
``P``           cached (committed) positions before the verification forward
``N``           tree nodes; node 0 is the root (the next token, known for sure)
``parent[i]``   parent node of node ``i > 0``; ``depth[i]`` its distance from the root
``M[i, j]``     tree mask: True when ``j`` is ``i`` or an ancestor of ``i``
``z_i``         target logits after node ``i`` (the prediction for a child of ``i``)
``a``           accepted draft tokens in a step (the root not counted)
``ε, δ``        typical acceptance: hard threshold and entropy factor
==============  =============================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mlatlas.llm.generation import KVCache

__all__ = ["DraftTree", "SpeculativeOutput", "accept_greedy", "acceptance_by_depth", "accept_typical",
           "check_speculative_inputs", "commit_path", "typical_threshold", "verify_tree"]


class DraftTree:
    """A fixed token tree, nodes in breadth-first order (every parent before its children).

    Built from *paths* in the notation of Medusa's ``medusa_choices``: ``(r_1, …, r_d)`` is
    the node at depth ``d`` reached from the root through the ``r_1``-th candidate of the first
    draft position, then the ``r_2``-th candidate of the second, …; the root is implicit.

    Args:
        paths: Sequence of rank tuples; every proper prefix of a path must be a path too.

    Attributes:
        paths: The paths sorted by ``(depth, ranks)``; node ``i + 1`` is ``paths[i]``.
        parent: int64 ``[N]`` (``-1`` for the root).
        depth: int64 ``[N]``.
        rank: int64 ``[N]``: the candidate rank of each node at its depth (0 for the root).
        mask: bool ``[N, N]``: ``M[i, j]`` True when ``j`` is ``i`` or an ancestor of ``i``.
        max_depth: Depth of the deepest node (drafted tokens per path).

    Raises:
        ValueError: an empty path, a negative or non-integer rank, a duplicate path or a path
            whose parent path is missing.
    """

    def __init__(self, paths: Sequence[Sequence[int]]):
        clean: list[tuple[int, ...]] = []
        for p in paths:
            path = tuple(p)
            if not path or any(isinstance(r, bool) or not isinstance(r, int) or r < 0
                               for r in path):
                raise ValueError(f"paths must be non-empty tuples of ints >= 0, got {p!r}")
            clean.append(path)
        if len(set(clean)) != len(clean):
            raise ValueError("paths must not repeat a path")
        self.paths = sorted(clean, key=lambda p: (len(p), p))
        index = {(): 0} | {p: i + 1 for i, p in enumerate(self.paths)}
        parents = [-1]
        for p in self.paths:
            if p[:-1] not in index:
                raise ValueError(f"path {p} needs its parent path {p[:-1]} in the tree")
            parents.append(index[p[:-1]])
        n = len(parents)
        self.parent = torch.tensor(parents, dtype=torch.long)
        self.depth = torch.tensor([0] + [len(p) for p in self.paths], dtype=torch.long)
        self.rank = torch.tensor([0] + [p[-1] for p in self.paths], dtype=torch.long)
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):  # parents come first: inherit the parent's ancestor row
            mask[i] |= mask[parents[i]]
        self.mask = mask
        self.max_depth = int(self.depth.max())

    @classmethod
    def chain(cls, length: int) -> DraftTree:
        """``length`` drafted tokens in a row (one candidate per position); shared, immutable."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        return _chain(length)

    def __len__(self) -> int:
        return self.parent.numel()

    def truncate(self, max_depth: int) -> DraftTree:
        """The sub-tree of the nodes at depth ``<= max_depth`` (a prefix of the node order)."""
        if max_depth >= self.max_depth:
            return self
        return DraftTree([p for p in self.paths if len(p) <= max_depth])

    def top_k(self) -> list[int]:
        """Candidates needed per draft position: ``1 + max rank`` at each depth ``1…D``."""
        return [int(self.rank[self.depth == d].max()) + 1 for d in range(1, self.max_depth + 1)]

    def __repr__(self) -> str:
        return f"DraftTree(nodes={len(self)}, max_depth={self.max_depth}, top_k={self.top_k()})"


@functools.lru_cache(maxsize=64)
def _chain(length: int) -> DraftTree:
    return DraftTree([(0,) * d for d in range(1, length + 1)])


@dataclass
class SpeculativeOutput:
    """Tokens and statistics of one speculative decoding run.

    Attributes:
        tokens: int64 ``[1, T + n]``: the prompt and ``n`` new tokens, exactly what
            :func:`mlatlas.llm.generation.generate` returns.
        forwards: Target-model forward calls, the prompt's prefill included (plain greedy
            decoding makes one per new token).
        accepted: Draft tokens accepted in each verification forward (``a`` per step).
        drafted: Draft depth offered in each verification forward.
    """

    tokens: Tensor
    forwards: int
    accepted: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    prompt_len: int = 0

    @property
    def new_tokens(self) -> int:
        """``n``: tokens added after the prompt."""
        return self.tokens.shape[1] - self.prompt_len

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per target forward, prefill included (greedy decoding: exactly 1)."""
        return self.new_tokens / max(1, self.forwards)

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens emitted per verification forward, ``mean(a + 1)`` (Medusa's measure)."""
        return sum(a + 1 for a in self.accepted) / max(1, len(self.accepted))

    def acceptance_by_depth(self, depth: int) -> list[float]:
        """See :func:`acceptance_by_depth`."""
        return acceptance_by_depth(self.accepted, self.drafted, depth)


def acceptance_by_depth(accepted: Sequence[int], drafted: Sequence[int],
                        depth: int) -> list[float]:
    """Fraction of verification steps whose draft token at depth ``k = 1 … depth`` was kept.

    Args:
        accepted: Accepted drafts per step (:attr:`SpeculativeOutput.accepted`, possibly of
            several runs concatenated).
        drafted: Draft depth offered per step; steps that offered fewer than ``k`` drafts
            (near the end of a run) are left out of depth ``k``.
        depth: Deepest ``k`` reported.

    Returns:
        ``depth`` rates (NaN where no step offered that depth).
    """
    out = []
    for k in range(1, depth + 1):
        offered = [a for a, d in zip(accepted, drafted) if d >= k]
        out.append(sum(a >= k for a in offered) / len(offered) if offered else float("nan"))
    return out


def check_speculative_inputs(model: Any, input_ids: Tensor, max_new_tokens: int) -> None:
    """Validate the common arguments of the speculative decoders (batch size 1 only).

    Raises:
        TypeError: ``input_ids`` not an integer tensor.
        ValueError: a batch of more than one row (unsupported: rows accept different
            numbers of tokens per step), an empty prompt, a negative ``max_new_tokens`` or a
            prompt plus ``max_new_tokens`` longer than the model's context.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor [1, T], got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [1, T] with T >= 1, got {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must hold one prompt (batch size 1): speculative decoding "
                         f"accepts a different number of tokens per row, so batches are not "
                         f"supported; got batch size {input_ids.shape[0]}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens "
                         f"{max_new_tokens} exceeds the model's context (max_position_embeddings"
                         f"={limit})")


def verify_tree(model: Any, cache: KVCache, tokens: Tensor, tree: DraftTree) -> tuple[Tensor,
                                                                                     Tensor]:
    """Run the target over every tree node in one forward.

    Node ``i`` sits at position ``P + depth[i]`` and attends to the ``P`` cached positions and
    to ``M[i]`` (itself and its ancestors). The cache grows by ``N`` positions; call
    :func:`commit_path` afterwards.

    Args:
        model: A :class:`~mlatlas.llm.llama.Llama`.
        cache: The target's cache holding the ``P`` committed positions.
        tokens: int64 ``[N]``: the tree's tokens in node order.
        tree: The :class:`DraftTree` (or one of its truncations) with ``N`` nodes.

    Returns:
        ``(hidden [N, d], logits [N, V])``: the final normalised hidden states and the logits.
    """
    past, n = cache.seq_len, len(tree)
    positions = (past + tree.depth)[None].to(tokens.device)
    if n > 1 and not bool((tree.parent[1:] == torch.arange(n - 1)).all()):
        # M as the mask over [P cached | N tree] keys: every node sees the whole prefix
        mask = torch.cat((torch.ones(n, past, dtype=torch.bool), tree.mask), dim=1)
        hidden = model.hidden_states(tokens[None], positions, cache,
                                     attn_mask=mask[None, None].to(tokens.device))
    else:  # a chain is plain causal attention over the cache
        hidden = model.hidden_states(tokens[None], positions, cache)
    return hidden[0], model.lm_head(hidden[0])


def _deepest(ok: Tensor, tree: DraftTree, score: Tensor | None = None) -> Tensor:
    # node i is reachable when it and all its ancestors were accepted: no rejected node in M[i]
    reach = ~(tree.mask & ~ok[None, :]).any(-1)
    depth = torch.where(reach, tree.depth, torch.full_like(tree.depth, -1))
    best = depth == depth.max()
    if score is None:  # the first node (breadth-first order) among the deepest
        return best.nonzero()[0, 0]
    return torch.where(best, score, torch.full_like(score, float("-inf"))).argmax()


def accept_greedy(tokens: Tensor, logits: Tensor, tree: DraftTree) -> Tensor:
    """The longest tree path whose every token is the target's greedy choice.

    Node ``i > 0`` is accepted when ``tokens[i] == argmax z_parent[i]``; the accepted path is
    the deepest node whose whole ancestry was accepted (the first such node on ties).

    Args:
        tokens: int64 ``[N]`` tree tokens (node 0 the root).
        logits: ``[N, V]`` from :func:`verify_tree`.
        tree: The tree.

    Returns:
        int64 ``[a + 1]``: node indices of the accepted path, root first.
    """
    greedy = logits.argmax(-1)
    ok = torch.ones_like(tokens, dtype=torch.bool)
    ok[1:] = tokens[1:] == greedy[tree.parent[1:]]  # x_i == argmax z_parent(i)
    return tree.mask[_deepest(ok, tree)].nonzero()[:, 0]


def typical_threshold(probs: Tensor, epsilon: float, delta: float) -> Tensor:
    """``min(ε, δ · exp(-H(p)))`` per row of ``probs [..., V]`` (Medusa eq. in §2.3.1)."""
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # H(p) = -Σ p log p
    return torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))


def accept_typical(tokens: Tensor, logits: Tensor, tree: DraftTree, temperature: float,
                   epsilon: float, delta: float) -> Tensor:
    """The longest tree path whose tokens are all *typical* under the target.

    Node ``i > 0`` is accepted when ``p(x_i) > min(ε, δ exp(-H(p)))`` with
    ``p = softmax(z_parent(i) / τ)`` (Medusa §2.3.1). Among the deepest accepted nodes the one
    whose path is most likely (``Σ log p``) wins.

    Args:
        tokens: int64 ``[N]`` tree tokens.
        logits: ``[N, V]`` target logits.
        tree: The tree.
        temperature: ``τ > 0``.
        epsilon: ``ε`` (hard threshold), in ``(0, 1)``.
        delta: ``δ`` (entropy factor), in ``(0, 1]``.

    Returns:
        int64 ``[a + 1]``: node indices of the accepted path, root first.
    """
    probs = (logits.float() / temperature).softmax(-1)
    thresh = typical_threshold(probs, epsilon, delta)
    p_tok = torch.ones(len(tree), dtype=probs.dtype)
    p_tok[1:] = probs[tree.parent[1:], tokens[1:]]
    ok = torch.ones_like(tokens, dtype=torch.bool)
    ok[1:] = p_tok[1:] > thresh[tree.parent[1:]]
    # path log-likelihood: Σ over the path's nodes of log p(x_i | parent)
    score = (tree.mask.to(probs.dtype) * p_tok.log()[None, :]).sum(-1)
    return tree.mask[_deepest(ok, tree, score)].nonzero()[:, 0]


def commit_path(cache: KVCache, past: int, path: Tensor) -> None:
    """Keep the accepted path's keys/values: move them to ``P, P+1, …`` and crop the rest.

    Args:
        cache: The target's cache after :func:`verify_tree` (``P + N`` positions).
        past: ``P``, the committed length before the verification forward.
        path: int64 ``[a + 1]`` node indices of the accepted path (root first, increasing).
    """
    n = path.numel()
    if not bool((path == torch.arange(n)).all()):  # a chain prefix needs no move
        idx = past + path.to(cache.keys[0].device)
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            cache.keys[i] = torch.cat((k[:, :, :past], k[:, :, idx]), dim=2)
            cache.values[i] = torch.cat((v[:, :, :past], v[:, :, idx]), dim=2)
    cache.crop(past + n)
