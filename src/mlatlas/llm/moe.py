"""Mixture-of-experts feed-forward layer: shared experts + top-k routed experts (DeepSeek-V3).

A MoE layer replaces a Transformer's feed-forward block by ``E`` small expert FFNs and a
router that sends each token to ``k`` of them, so a model holds ``E`` experts' parameters but
spends only ``k`` experts' compute per token. DeepSeekMoE adds *shared* experts that every
token passes through, and DeepSeek-V3 scores experts with a sigmoid, normalises the ``k``
chosen scores, and balances the load without an auxiliary loss by a per-expert bias that only
affects *which* experts are chosen (raised for under-loaded experts, lowered for over-loaded
ones). Moonlight and Kimi-VL's decoder use this layer. Dai et al. 2024, "DeepSeekMoE",
arXiv:2401.06066; DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv:2412.19437 (§2.1.2);
Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
arXiv:2408.15664; the classic auxiliary loss of Switch Transformers (Fedus, Zoph, Shazeer
2021, arXiv:2101.03961, eq. (4)) and GShard (Lepikhin et al. 2020, arXiv:2006.16668).

Tokens are dispatched by index, without capacity: the ``N·k`` (token, expert) pairs are sorted
by expert, and each expert that received tokens runs once on exactly its rows; the weighted
outputs are scattered back with ``index_add``. No token is dropped, no expert sees a token it
was not routed, and no expert runs on zero rows.

=============  ==================================================================
``N``          tokens (all leading dims flattened);  ``d`` ``hidden_size``
``E, k``       routed experts, experts chosen per token (``top_k``)
``u_t``        input token;  ``e_i`` router weight of expert ``i`` (``gate.weight[i]``)
``s_{t,i}``    affinity: ``softmax_i(u_tᵀ e)`` or ``σ(u_tᵀ e_i)``
``b_i``        balancing bias (``e_score_correction_bias``), used for the choice only
``g_{t,i}``    gate of a chosen expert (normalised ``s``, times ``routed_scaling_factor``)
``c_i``        tokens routed to expert ``i`` in a batch (its load)
=============  ==================================================================

DeepSeek-V3 eqs. (12)-(16) and (the bias) §2.1.2::

    h'_t = u_t + Σ_shared FFN_s(u_t) + Σ_{i ∈ TopK(s_{t,·} + b, k)} g_{t,i} FFN_i(u_t)
    g_{t,i} = s_{t,i} / Σ_{j ∈ TopK} s_{t,j}          (the residual ``u_t +`` is the caller's)

Parameter names follow transformers' ``DeepseekV3MoE`` / ``Qwen2MoeSparseMoeBlock``
(``gate.weight``, ``gate.e_score_correction_bias``, ``shared_experts`` /
``shared_expert`` + ``shared_expert_gate``); routed experts are separate modules
(``experts.{i}.gate_proj/up_proj/down_proj``), so hooks can see what each one runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.nn.feedforward import GatedFeedForward

__all__ = ["MoEConfig", "MoELayer", "RouterOutput", "TopKRouter", "load_balancing_loss",
           "max_violation"]

SCORINGS = ("softmax", "sigmoid")


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class MoEConfig:
    """What a :class:`MoELayer` computes.

    Attributes:
        hidden_size: Model width ``d``.
        moe_intermediate_size: Hidden width of every routed expert.
        num_experts: Routed experts ``E``.
        top_k: Experts per token ``k`` (``1 ≤ k ≤ E``).
        num_shared_experts: Shared experts (DeepSeek: one FFN of width
            ``moe_intermediate_size · num_shared_experts``); 0 for none.
        shared_intermediate_size: Width of the shared FFN when given (Qwen2-MoE's
            ``shared_expert_intermediate_size``); overrides the product above.
        shared_expert_gate: Multiply the shared output by ``σ(w_sᵀ u_t)`` (Qwen2-MoE).
        scoring: ``"softmax"`` (Qwen2-MoE, DeepSeek-V2) or ``"sigmoid"`` (DeepSeek-V3).
        norm_topk_prob: Renormalise the ``k`` chosen scores to sum to 1.
        routed_scaling_factor: Multiplies the gates (DeepSeek-V3: 2.5 at full scale).
        n_group: Expert groups of group-limited routing (DeepSeek-V3); 1 = off.
        topk_group: Groups a token may route to (the best by the sum of their top-2 scores).
        bias_balancing: Choose experts by ``s + b`` and move ``b`` after each step
            (:meth:`MoELayer.update_bias`); the auxiliary-loss-free strategy.
        bias_update_rate: ``γ`` of the bias update ``b_i ← b_i + γ sign(c̄ − c_i)``.
        aux_loss_coef: ``α`` of the classic load-balancing loss (0 = not computed).
    """

    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 1
    shared_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    scoring: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "n_group",
                     "topk_group"):
            _positive_int(getattr(self, name), name)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got "
                             f"top_k={self.top_k}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} must be divisible by "
                             f"n_group={self.n_group}")
        per_group = self.num_experts // self.n_group
        if self.topk_group > self.n_group or self.top_k > self.topk_group * per_group:
            raise ValueError(f"topk_group must be <= n_group={self.n_group} and top_k <= "
                             f"topk_group · experts per group = {self.topk_group * per_group}, "
                             f"got topk_group={self.topk_group}, top_k={self.top_k}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got "
                             f"{self.num_shared_experts!r}")
        if self.shared_intermediate_size is not None:
            _positive_int(self.shared_intermediate_size, "shared_intermediate_size")
        if self.bias_update_rate < 0 or self.aux_loss_coef < 0:
            raise ValueError(f"bias_update_rate and aux_loss_coef must be >= 0, got "
                             f"{self.bias_update_rate} and {self.aux_loss_coef}")

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared FFN (0 when there is none)."""
        if self.shared_intermediate_size is not None:
            return self.shared_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts


@dataclass
class RouterOutput:
    """One routing decision.

    Attributes:
        logits: ``[N, E]`` router logits ``u_tᵀ e_i``.
        scores: ``[N, E]`` affinities ``s`` (float32).
        weights: ``[N, k]`` gates ``g`` of the chosen experts (float32).
        indices: int64 ``[N, k]`` chosen experts.
    """

    logits: Tensor
    scores: Tensor
    weights: Tensor
    indices: Tensor


class TopKRouter(nn.Module):
    """Scores every expert and picks ``k`` per token (``weight [E, d]``, bias buffer ``[E]``)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        nn.init.normal_(self.weight, std=config.hidden_size ** -0.5)

    def forward(self, x: Tensor) -> RouterOutput:
        """``x [N, d]`` → :class:`RouterOutput`."""
        c = self.config
        if c.scoring == "sigmoid":  # DeepSeek-V3 eq. (15): s_{t,i} = σ(u_tᵀ e_i), in float32
            logits = F.linear(x.float(), self.weight.float())
            scores = logits.sigmoid()
        else:  # DeepSeek-V2 / Qwen2-MoE: s_{t,i} = softmax_i(u_tᵀ e)
            logits = F.linear(x, self.weight)
            scores = logits.softmax(-1, dtype=torch.float32)
        choice = scores + self.e_score_correction_bias if c.bias_balancing else scores
        if c.n_group > 1:  # group-limited routing: keep the topk_group best groups
            groups = choice.view(-1, c.n_group, c.num_experts // c.n_group)
            group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
                1, group_score.topk(c.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(groups.shape[-1], dim=1),
                                        float("-inf"))
        indices = choice.topk(c.top_k, dim=-1).indices  # TopK(s + b, k): the bias picks only
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:  # eq. (13): g_{t,i} = s_{t,i} / Σ_{j ∈ TopK} s_{t,j}
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return RouterOutput(logits, scores, weights * c.routed_scaling_factor, indices)


def load_balancing_loss(scores: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """The classic auxiliary loss ``E · Σ_i f_i P_i`` (Switch eq. (4), top-k form).

    ``f_i = c_i / N`` is the fraction of tokens routed to expert ``i`` (``Σ f_i = k``) and
    ``P_i`` the mean routing probability of ``i``; minimal (``= k``) under a uniform load.
    The convention of transformers' ``load_balancing_loss_func``.

    Args:
        scores: ``[N, E]`` routing probabilities (rows sum to 1; normalise sigmoid scores).
        indices: int64 ``[N, k]`` chosen experts.
        num_experts: ``E``.
    """
    n = scores.shape[0]
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).float() / n
    p = scores.float().mean(0)
    return num_experts * (f * p).sum()  # L_aux = E Σ_i f_i P_i


def max_violation(counts: Tensor) -> float:
    """``MaxVio = max_i c_i / c̄ − 1`` (Wang et al. 2024, eq. (5)): 0 under a perfect balance.

    Args:
        counts: ``[E]`` tokens per expert.
    """
    counts = counts.float()
    mean = counts.mean()
    if mean == 0:
        raise ValueError("counts must not be all zero (no token was routed)")
    return float(counts.max() / mean - 1)


class MoELayer(nn.Module):
    """Shared + routed experts with top-k routing and index dispatch (see the module notes).

    After each forward the layer keeps ``last_counts`` (``[E]`` tokens per expert),
    ``last_aux_loss`` (``α · L_aux`` with its graph, or ``None`` when ``aux_loss_coef == 0``)
    and, in training, accumulates the counts for :meth:`update_bias`.

    Args:
        config: The :class:`MoEConfig`.

    Shapes:
        ``x [..., d]`` → ``[..., d]`` (without the residual).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        d = config.hidden_size
        self.gate = TopKRouter(config)
        self.experts = nn.ModuleList(GatedFeedForward(d, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_experts = (GatedFeedForward(d, config.shared_width)
                               if config.shared_width else None)
        self.shared_expert_gate = (nn.Linear(d, 1, bias=False)
                                   if config.shared_expert_gate and self.shared_experts else None)
        self.last_counts: Tensor | None = None
        self.last_aux_loss: Tensor | None = None
        self.register_buffer("pending_counts", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d]`` → ``[..., d]``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x must have last dim {self.config.hidden_size} (hidden_size), "
                             f"got shape {tuple(x.shape)}")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = self.gate(flat)
        out = self.dispatch(flat, route.weights, route.indices)
        if self.shared_experts is not None:  # Σ_shared FFN_s(u_t), optionally σ-gated
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        self._record(route)
        return out.view(shape)

    def dispatch(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """``Σ_{i ∈ TopK(t)} g_{t,i} FFN_i(u_t)`` by index, capacity-free.

        Args:
            x: ``[N, d]`` tokens.
            weights: ``[N, k]`` gates.
            indices: int64 ``[N, k]`` experts.

        Returns:
            ``[N, d]``.
        """
        k = indices.shape[1]
        flat_expert = indices.reshape(-1)
        order = flat_expert.argsort(stable=True)  # the N·k (token, expert) pairs, by expert
        token = order // k
        gate = weights.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=self.config.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:  # an expert runs once, on exactly the rows routed to it
                rows = token[start:start + n]
                y = expert(x[rows]) * gate[start:start + n, None]  # g_{t,i} FFN_i(u_t)
                out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out

    def _record(self, route: RouterOutput) -> None:
        c = self.config
        counts = torch.bincount(route.indices.reshape(-1), minlength=c.num_experts).detach()
        self.last_counts = counts
        if self.training:
            self.pending_counts += counts.to(self.pending_counts.dtype)
        if c.aux_loss_coef > 0:
            probs = route.scores
            if c.scoring == "sigmoid":  # DeepSeek-V3 eq. (19): s'_{t,i} = s_{t,i} / Σ_j s_{t,j}
                probs = probs / probs.sum(-1, keepdim=True)
            self.last_aux_loss = c.aux_loss_coef * load_balancing_loss(probs, route.indices,
                                                                       c.num_experts)
        else:
            self.last_aux_loss = None

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """One auxiliary-loss-free balancing step on the loads seen since the last call.

        ``b_i ← b_i + γ · sign(c̄ − c_i)`` (Wang et al. 2024, Algorithm 1): under-loaded experts
        become more attractive, over-loaded ones less. A no-op unless ``bias_balancing``.

        Returns:
            The ``[E]`` loads used (then reset).
        """
        counts = self.pending_counts.clone()
        if self.config.bias_balancing and counts.sum() > 0:
            bias = self.gate.e_score_correction_bias
            bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)
        self.pending_counts.zero_()
        return counts
