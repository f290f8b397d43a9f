"""GRPO — group relative policy optimisation: PPO without a critic.

PPO needs a learned value function (a critic as large as the policy) for its advantages.
GRPO samples a *group* of ``G`` completions per prompt and uses the group's rewards as the
baseline: each completion's advantage is its reward standardised within its group, shared by
all its tokens. The policy is updated with PPO's clipped importance ratio per token, and a KL
penalty to the reference model is added to the loss (not to the reward), estimated per token
with the unbiased, always-positive ``k3`` estimator. Shao et al. 2024, "DeepSeekMath: Pushing
the Limits of Mathematical Reasoning in Open Language Models", arXiv:2402.03300, §4.1,
eqs. (3)-(4). The loss aggregations are trl's: ``grpo`` (the paper: mean over each
sequence's tokens, then over sequences), ``bnpo`` (mean over all tokens of the batch),
``dr_grpo`` (Liu et al. 2025, arXiv:2503.20783: sum over tokens / (B · max length)) and
``dapo`` (Yu et al. 2025, arXiv:2503.14476: sum over tokens / tokens in the generation
batch; asymmetric clipping ``ε_low, ε_high``).

=================  ==================================================================
``G``              group size (completions per prompt)
``r_i``            reward of completion ``i``;  ``Â_i`` its advantage (all its tokens)
``ℓ_t, ℓ^old_t``   ``log π_θ``, ``log π_θ_old`` of token ``t`` (old = sampling policy)
``ℓ^ref_t``        ``log π_ref`` of token ``t``
``ρ_t``            importance ratio ``exp(ℓ_t - ℓ^old_t)``
``ε_low, ε_high``  clip range ``[1 - ε_low, 1 + ε_high]``
``β``              KL coefficient;  ``m_t`` completion mask
=================  ==================================================================

The numbers are trl's (``trl.GRPOTrainer`` ``_compute_loss`` and its advantage code, fp32):
the parity test drives trl's own code on the same log-probs and advantages. Rewards that are
all equal in a group give advantages 0 (``0 / (0 + 1e-4)``), as in trl; NaN rewards (trl's
"unscorable" completions) are left out of the group statistics and get advantage 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LOSS_TYPES", "SCALES", "GRPOLoss", "group_advantages", "grpo_loss", "k3_kl"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected standard deviation ignoring NaN (NaN with < 2 values), keepdim."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    var = torch.where(count > 1, var * count / (count - 1), torch.full_like(var, float("nan")))
    return var.sqrt()


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> Tensor:
    """Group-relative advantages ``Â_i = (r_i - mean(r_group)) / (std + eps)``.

    Args:
        rewards: ``[N]`` with ``N = prompts · G``, rows of one prompt consecutive. NaN marks a
            completion that could not be scored.
        group_size: ``G ≥ 1``; must divide ``N``.
        scale: ``"group"`` (the paper: the group's std), ``"batch"`` (the whole batch's std,
            the group's mean; Hu et al. 2025's "PPO lite") or ``"none"`` (no division; Dr.
            GRPO).
        eps: Added to the std (trl: ``1e-4``).

    Returns:
        float32 ``[N]``; 0 where a group's rewards are all equal, and for NaN rewards.

    Raises:
        ValueError: ``rewards`` not 1-D or infinite, ``group_size`` not dividing it, an
            unknown ``scale``.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty tensor [N], got "
                         f"{tuple(getattr(rewards, 'shape', ()))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of rewards "
                         f"({rewards.numel()}): rows of one prompt form one group")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r = rewards.float()
    if bool(torch.isinf(r).any()):
        raise ValueError("rewards must be finite (NaN marks an unscorable completion), got inf")
    groups = r.view(-1, group_size)
    mean = torch.nanmean(groups, dim=1, keepdim=True)  # baseline: the group's mean reward
    adv = groups - mean
    if scale == "group":
        std = _nanstd(groups, dim=1) if group_size > 1 else torch.zeros_like(mean)
        adv = adv / (std + eps)  # eq. (3) §4.1.2: Â_i = (r_i - mean(r)) / std(r)
    elif scale == "batch":
        std = _nanstd(r) if r.numel() > 1 else torch.zeros(())
        adv = adv / (std.view(()) + eps)
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token ``k3`` estimate of ``KL(π_θ || π_ref)``: ``e^{ℓ^ref - ℓ} - (ℓ^ref - ℓ) - 1 ≥ 0``.

    Unbiased for samples from ``π_θ`` (Schulman 2020, "Approximating KL divergence"); eq. (4).
    """
    d = ref_logps - logps
    return torch.exp(d) - d - 1


@dataclass
class GRPOLoss:
    """Result of :func:`grpo_loss`.

    Attributes:
        loss: The scalar to minimise (differentiable).
        per_token_loss: ``[B, T]`` per-token loss before aggregation (0 off the mask).
        kl: Mean per-token ``k3`` KL over the completion tokens (detached); ``None`` when
            ``β = 0``.
        clip_fraction: Fraction of completion tokens whose ratio was clipped in the direction
            of the advantage (trl's ``clip_ratio/region_mean``), detached.
    """

    loss: Tensor
    per_token_loss: Tensor
    kl: Tensor | None
    clip_fraction: Tensor


def _check_tokens(mask: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != mask.shape:
            raise ValueError(f"{name} must be a floating tensor of completion_mask's shape "
                             f"{tuple(mask.shape)}, got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")


def grpo_loss(logps: Tensor, advantages: Tensor, completion_mask: Tensor, *,
              old_logps: Tensor | None = None, ref_logps: Tensor | None = None,
              beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
              loss_type: str = "grpo", max_completion_length: int | None = None,
              num_items_in_batch: int | Tensor | None = None,
              kl_ratio_correction: bool = False) -> GRPOLoss:
    """GRPO's clipped-ratio loss with a ``k3`` KL penalty, aggregated as trl does.

    Per token: ``L_t = -min(ρ_t Â, clip(ρ_t, 1-ε_low, 1+ε_high) Â) + β KL_t``.

    Args:
        logps: ``ℓ_t`` ``[B, T]`` of the sampled tokens under the policy (differentiable).
        advantages: ``Â`` ``[B]`` (one per completion) or ``[B, T]``.
        completion_mask: ``[B, T]`` 0/1, 1 on completion tokens.
        old_logps: ``ℓ^old_t`` of the sampling policy; ``None`` → ``logps.detach()`` (one
            update per rollout: ``ρ = 1`` with the policy-gradient's gradient).
        ref_logps: ``ℓ^ref_t``; needed when ``β > 0``.
        beta: KL coefficient ``β ≥ 0``; ``0`` drops the KL term (no reference needed).
        epsilon: ``ε_low`` (and ``ε_high`` unless given), ``0 ≤ ε_low < 1``.
        epsilon_high: ``ε_high ≥ 0`` (DAPO's "clip-higher"); ``None`` → ``epsilon``.
        loss_type: ``"grpo"`` | ``"bnpo"`` | ``"dr_grpo"`` | ``"dapo"``.
        max_completion_length: ``dr_grpo``'s constant; ``None`` → ``T``.
        num_items_in_batch: ``dapo``'s normaliser, completion tokens in the whole
            generation batch (with micro-batching); ``None`` → ``Σ m`` of this batch.
        kl_ratio_correction: Multiply ``KL_t`` by ``ρ_t`` (trl's ``use_bias_correction_kl``,
            DeepSeek-V3.2).

    Returns:
        :class:`GRPOLoss`.

    Raises:
        ValueError: ``β < 0``, ``β > 0`` without ``ref_logps``, ``ε`` out of range, an unknown
            ``loss_type``, tensors whose shapes disagree.
    """
    if not isinstance(completion_mask, Tensor) or completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must be a tensor [B, T], got "
                         f"{tuple(getattr(completion_mask, 'shape', ()))}")
    _check_tokens(completion_mask, logps=logps, old_logps=old_logps, ref_logps=ref_logps)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0 (0 drops the KL term), got {beta!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta > 0 (got beta={beta})")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if not 0 <= eps_low < 1 or not eps_high >= 0:
        raise ValueError(f"need 0 <= epsilon < 1 and epsilon_high >= 0, got epsilon={epsilon!r}, "
                         f"epsilon_high={epsilon_high!r}")
    B = completion_mask.shape[0]
    if advantages.dim() == 1 and advantages.shape[0] == B:
        advantages = advantages[:, None]
    elif advantages.shape != completion_mask.shape:
        raise ValueError(f"advantages must be [B={B}] or [B, T]={tuple(completion_mask.shape)}, "
                         f"got {tuple(advantages.shape)}")
    mask = completion_mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)  # ρ_t = π_θ / π_θ_old
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    # eq. (3): -min(ρ Â, clip(ρ, 1-ε, 1+ε) Â)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta > 0:
        kl = k3_kl(logps, ref_logps)  # eq. (4)
        if kl_ratio_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss_type == "grpo":  # 1/G Σ_i 1/|o_i| Σ_t
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":  # Σ_i Σ_t / Σ_i |o_i|
        loss = per_token.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":  # Σ_i Σ_t / (B · L_max)
        L = completion_mask.shape[1] if max_completion_length is None else max_completion_length
        loss = per_token.sum() / (B * L)
    else:  # dapo: Σ_i Σ_t / tokens in the generation batch
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = per_token.sum() / n.to(per_token.dtype).clamp(min=1.0)
    n_tok = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        region = (((ratio < 1 - eps_low) & (advantages < 0))
                  | ((ratio > 1 + eps_high) & (advantages > 0))).to(mask.dtype)
        clip_fraction = (region * mask).sum() / n_tok
        kl_mean = None if kl is None else (kl * mask).sum() / n_tok
    return GRPOLoss(loss=loss, per_token_loss=per_token, kl=kl_mean,
                    clip_fraction=clip_fraction)
