"""DPO — direct preference optimisation: the policy is its own reward model.

RLHF's KL-regularised objective ``max_π E[r(x, y)] - β KL(π || π_ref)`` has the closed-form
optimum ``π*(y|x) ∝ π_ref(y|x) exp(r(x, y)/β)``; solved for the reward, ``r(x, y) = β log
π(y|x)/π_ref(y|x) + β log Z(x)``. Put into the Bradley–Terry likelihood of a preference
``y_w ≻ y_l`` the partition function cancels, and the reward model disappears: the policy is
fitted directly on preference pairs by logistic regression on the difference of implicit
rewards. Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model", arXiv:2305.18290. Variants:
conservative DPO (label smoothing ``ε``: a preference is flipped with probability ``ε``;
Mitchell 2023, "A note on DPO with noisy preferences"), IPO (Azar et al. 2023,
arXiv:2310.12036, a squared loss that does not saturate) and the hinge loss of SLiC (Zhao et
al. 2023, arXiv:2305.10425).

======================  ====================================================================
``π_θ, π_ref``          policy being trained, frozen reference (usually the SFT model)
``y_w, y_l``            chosen and rejected completion of the same prompt ``x``
``ρ_w, ρ_l``            ``log π_θ(y|x) - log π_ref(y|x)`` of each (sequence log-ratios)
``r̂_w, r̂_l``          implicit rewards ``β ρ_w``, ``β ρ_l``
``Δ``                   ``ρ_w - ρ_l``;  the implicit reward margin is ``β Δ``
``β``                   KL strength (IPO: the regulariser ``τ``)
``ε``                   label smoothing (probability a label is flipped)
======================  ====================================================================

The numbers are trl's (``trl.DPOTrainer``): its per-pair losses for ``sigmoid``, ``ipo``
(with trl's per-token normalisation when completion lengths are given) and ``hinge``, its
rewards ``β ρ`` (detached), and its summed completion log-probs. One difference: trl 1.16
ignores ``label_smoothing`` in its ``sigmoid`` loss; here ``sigmoid`` with ``ε > 0`` is
conservative DPO (trl computes that same formula in its ``aot`` loss, whose sort is the
identity for one pair).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.alignment.logprobs import completion_logps

__all__ = ["LOSS_TYPES", "DPOLoss", "DPOTrainer", "PreferenceBatch", "dpo_loss",
           "precompute_reference", "sequence_logps"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(model: nn.Module, input_ids: Tensor, completion_mask: Tensor, *,
                   attention_mask: Tensor | None = None) -> Tensor:
    """``log π(y | x) = Σ_t m_{t+1} log π(x_{t+1} | x_≤t)``, prompt tokens masked out.

    Args:
        model: Causal LM returning logits ``[B, T, V]`` (:class:`mlatlas.llm.llama.Llama`).
        input_ids: int ``[B, T]``: prompt, completion, right padding.
        completion_mask: ``[B, T]`` 1 on completion tokens (0 on prompt and padding).
        attention_mask: Optional ``[B, T]`` 0/1 (see
            :func:`mlatlas.alignment.logprobs.completion_logps`).

    Returns:
        float32 ``[B]``, differentiable w.r.t. the model's parameters.
    """
    return completion_logps(model, input_ids, completion_mask,
                            attention_mask=attention_mask).sequence


@dataclass
class DPOLoss:
    """Per-pair result of :func:`dpo_loss` (all ``[B]``).

    Attributes:
        losses: Per-pair loss (differentiable); the training loss is ``losses.mean()``.
        chosen_rewards: ``r̂_w = β ρ_w`` (detached, as trl logs it).
        rejected_rewards: ``r̂_l = β ρ_l`` (detached).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def margins(self) -> Tensor:
        """Implicit reward margins ``r̂_w - r̂_l = β Δ``."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        """Fraction of pairs with ``r̂_w > r̂_l``, ties counted ½ (so ``π_θ = π_ref`` gives ½)."""
        m = self.margins
        return float(((m > 0).float() + 0.5 * (m == 0).float()).mean())


def _check_logps(**tensors: Tensor) -> int:
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1:
            raise ValueError(f"{name} must be a floating tensor [B], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN")
        shapes[name] = t.shape[0]
    if len(set(shapes.values())) != 1:
        raise ValueError(f"chosen and rejected log-probs must hold the same number of pairs B, "
                         f"got {shapes}")
    return next(iter(shapes.values()))


def _check_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the KL strength; β → 0 removes the reference), "
                         f"got {beta!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got "
                         f"loss_type={loss_type!r} with label_smoothing={label_smoothing}")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> DPOLoss:
    """The DPO loss of ``B`` preference pairs from their sequence log-probs.

    Args:
        policy_chosen_logps: ``log π_θ(y_w | x)`` ``[B]`` (differentiable).
        policy_rejected_logps: ``log π_θ(y_l | x)`` ``[B]``.
        ref_chosen_logps: ``log π_ref(y_w | x)`` ``[B]`` (treated as constants).
        ref_rejected_logps: ``log π_ref(y_l | x)`` ``[B]``.
        beta: ``β > 0``.
        loss_type: ``"sigmoid"`` (DPO, eq. 7: ``-log σ(β Δ)``), ``"ipo"`` (``(Δ - 1/(2β))²``)
            or ``"hinge"`` (``max(0, 1 - β Δ)``).
        label_smoothing: ``ε ∈ [0, 0.5)``, ``sigmoid`` only: conservative DPO
            ``-(1-ε) log σ(β Δ) - ε log σ(-β Δ)``.
        chosen_lengths: ``ipo`` only: completion token counts ``[B]``; each log-ratio is then
            divided by its length (trl's per-token IPO). ``None``: the summed form of the
            paper.
        rejected_lengths: As ``chosen_lengths``, for the rejected completions.

    Returns:
        :class:`DPOLoss` with per-pair ``losses`` and the implicit rewards.

    Raises:
        ValueError: ``β ≤ 0``, an unknown ``loss_type``, ``ε`` out of range or with a loss
            other than ``sigmoid``, lengths with a loss other than ``ipo``, log-probs that are
            not 1-D floats of one batch size, or NaN.
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps,
                 policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _check_settings(beta, loss_type, label_smoothing)
    if (chosen_lengths is not None or rejected_lengths is not None) and loss_type != "ipo":
        raise ValueError(f"chosen_lengths/rejected_lengths apply to loss_type='ipo' only, got "
                         f"loss_type={loss_type!r}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()  # ρ_w
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()  # ρ_l
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)  # β Δ
        # eq. (7): -log σ(βΔ); conservative DPO mixes in the flipped label with weight ε
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))  # max(0, 1 - βΔ)
    else:
        cw, cl = chosen_ratio, rejected_ratio
        if chosen_lengths is not None or rejected_lengths is not None:
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
            _check_logps(policy_chosen_logps=policy_chosen_logps,
                         chosen_lengths=chosen_lengths.float(),
                         rejected_lengths=rejected_lengths.float())
            cw = cw / chosen_lengths.float().clamp(min=1.0)
            cl = cl / rejected_lengths.float().clamp(min=1.0)
        losses = (cw - cl - 1 / (2 * beta)) ** 2  # IPO eq. (17): (Δ - 1/(2τ))²
    return DPOLoss(losses=losses, chosen_rewards=beta * chosen_ratio.detach(),
                   rejected_rewards=beta * rejected_ratio.detach())


@dataclass
class PreferenceBatch:
    """``B`` preference pairs, prompt + completion token rows (right-padded).

    Attributes:
        chosen_ids: int ``[B, T_w]`` prompt then chosen completion.
        chosen_mask: ``[B, T_w]`` 1 on the chosen completion's tokens.
        rejected_ids: int ``[B, T_l]`` prompt then rejected completion.
        rejected_mask: ``[B, T_l]`` 1 on the rejected completion's tokens.
        ref_chosen_logps: Precomputed ``log π_ref(y_w | x)`` ``[B]``, or ``None``.
        ref_rejected_logps: Precomputed ``log π_ref(y_l | x)`` ``[B]``, or ``None``.
    """

    chosen_ids: Tensor
    chosen_mask: Tensor
    rejected_ids: Tensor
    rejected_mask: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None

    def __post_init__(self) -> None:
        if self.chosen_ids.shape[0] != self.rejected_ids.shape[0]:
            raise ValueError(f"chosen_ids and rejected_ids must hold the same number of pairs, "
                             f"got {self.chosen_ids.shape[0]} and {self.rejected_ids.shape[0]}")
        for ids, mask, name in ((self.chosen_ids, self.chosen_mask, "chosen_mask"),
                                (self.rejected_ids, self.rejected_mask, "rejected_mask")):
            if mask.shape != ids.shape:
                raise ValueError(f"{name} must have its ids' shape {tuple(ids.shape)}, got "
                                 f"{tuple(mask.shape)}")

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]

    def stacked(self) -> tuple[Tensor, Tensor]:
        """``[chosen; rejected]`` ids and masks ``[2B, max(T_w, T_l)]`` (one forward pass)."""
        T = max(self.chosen_ids.shape[1], self.rejected_ids.shape[1])

        def pad(x: Tensor) -> Tensor:
            return F.pad(x, (0, T - x.shape[1]))

        ids = torch.cat((pad(self.chosen_ids), pad(self.rejected_ids)))
        mask = torch.cat((pad(self.chosen_mask.long()), pad(self.rejected_mask.long())))
        return ids, mask

    def lengths(self) -> tuple[Tensor, Tensor]:
        """Completion token counts ``[B]`` of the chosen and the rejected completions."""
        return self.chosen_mask.sum(-1), self.rejected_mask.sum(-1)


def _pair_logps(model: nn.Module, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    ids, mask = batch.stacked()
    logps = sequence_logps(model, ids, mask)
    return logps[:len(batch)], logps[len(batch):]


@torch.no_grad()
def precompute_reference(reference: nn.Module, batch: PreferenceBatch) -> PreferenceBatch:
    """``batch`` with ``ref_chosen_logps``/``ref_rejected_logps`` filled from ``reference``.

    Precomputing once (trl's ``precompute_ref_log_probs``) frees the reference model's
    memory during training; the losses are the same as with a live frozen reference.
    """
    was_training = reference.training
    reference.eval()
    chosen, rejected = _pair_logps(reference, batch)
    reference.train(was_training)
    return replace(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)


class DPOTrainer:
    """Minimal DPO training loop: one forward of ``[chosen; rejected]``, one optimiser step.

    Args:
        policy: The model being trained.
        optimizer: Optimiser over ``policy``'s parameters.
        reference: Frozen reference model (its parameters get ``requires_grad=False``), or
            ``None`` when every batch carries precomputed reference log-probs
            (:func:`precompute_reference`).
        beta: ``β`` of :func:`dpo_loss`.
        loss_type: ``"sigmoid"``, ``"ipo"`` (with trl's per-token normalisation) or
            ``"hinge"``.
        label_smoothing: ``ε`` (``sigmoid`` only).
        max_grad_norm: Clip the global gradient norm to this (``None``: no clipping).
    """

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer, *,
                 reference: nn.Module | None = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 max_grad_norm: float | None = 1.0):
        _check_settings(beta, loss_type, label_smoothing)
        self.policy, self.optimizer, self.reference = policy, optimizer, reference
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.max_grad_norm = max_grad_norm
        if reference is not None:
            reference.requires_grad_(False).eval()

    def loss(self, batch: PreferenceBatch) -> DPOLoss:
        """Per-pair losses and rewards of ``batch`` under the current policy (with grad)."""
        if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
            if self.reference is None:
                raise ValueError("batch has no precomputed reference log-probs and the trainer "
                                 "has no reference model")
            batch = precompute_reference(self.reference, batch)
        chosen, rejected = _pair_logps(self.policy, batch)
        lengths = batch.lengths() if self.loss_type == "ipo" else (None, None)
        return dpo_loss(chosen, rejected, batch.ref_chosen_logps, batch.ref_rejected_logps,
                        beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, chosen_lengths=lengths[0],
                        rejected_lengths=lengths[1])

    def step(self, batch: PreferenceBatch) -> DPOLoss:
        """One optimiser step on ``losses.mean()``; returns the pre-step :class:`DPOLoss`."""
        self.policy.train()
        out = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.losses.mean().backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return out

    @torch.no_grad()
    def evaluate(self, batch: PreferenceBatch) -> DPOLoss:
        """:meth:`loss` without gradients (held-out pairs)."""
        return self.loss(batch)
