"""PPO for language models: a policy, a critic (value model), GAE and the clipped losses.

Proximal policy optimisation maximises the clipped surrogate ``min(ρ_t Â_t, clip(ρ_t, 1-ε,
1+ε) Â_t)`` of the importance ratio ``ρ_t = π_θ(a_t|s_t)/π_old(a_t|s_t)``, so one batch of
samples supports several gradient steps without the policy moving far (Schulman, Wolski,
Dhariwal, Radford, Klimov 2017, arXiv:1707.06347). Advantages come from a learned critic
``V_φ`` by generalised advantage estimation, an exponentially weighted sum of TD errors
(Schulman, Moritz, Levine, Jordan, Abbeel 2016, arXiv:1506.02438, eq. 16). For a language
model a state is the prompt plus the tokens so far, an action the next token, the reward is
the scorer's value on the last token minus a per-token KL penalty to the reference, and the
critic is a second transformer with a scalar head (Ouyang et al. 2022, InstructGPT,
arXiv:2203.02155; Stiennon et al. 2020, arXiv:2009.01325) — the model GRPO does away with.

================  ====================================================================
``r_t, V_t``      reward and value of step ``t``;  ``d_t = 1`` if the episode ended at ``t``
``δ_t``           TD error ``r_t + γ V_{t+1} (1 - d_t) - V_t``
``Â_t``           GAE ``δ_t + γλ (1 - d_t) Â_{t+1}``;  return ``R_t = Â_t + V_t``
``ρ_t``           ``exp(log π_θ - log π_old)`` of the taken action
``ε, ε_v``        policy clip range, value clip range
``c_v, c_H``      value-loss and entropy coefficients
================  ====================================================================

The numbers are stable-baselines3's: :func:`gae` equals ``RolloutBuffer.compute_returns_and
_advantage`` and :func:`ppo_loss` the loss lines of ``PPO.train`` (advantage normalisation,
clipped surrogate, value loss on the clipped prediction, entropy bonus), on flat samples; a
``mask`` turns every mean into a mean over completion tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.alignment.logprobs import position_ids_from_mask

__all__ = ["GAE", "PPOLoss", "ValueModel", "gae", "ppo_loss", "token_rewards"]


class ValueModel(nn.Module):
    """Critic ``V_φ(x_≤t)``: a Llama trunk and a scalar head on every position.

    Args:
        backbone: A :class:`~mlatlas.llm.llama.Llama`; only its trunk is used
            (:meth:`~mlatlas.llm.llama.Llama.hidden_states`) and its ``lm_head`` is replaced
            by the value head's input, so the critic holds no vocabulary projection (unless
            tied to the embedding).

    Attributes:
        backbone: The trunk.
        v_head: ``nn.Linear(d, 1)``, zero-initialised (every value starts at 0).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        backbone.lm_head = nn.Identity()
        self.backbone = backbone
        self.v_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        """A trainable critic whose trunk starts as a copy of ``policy``'s (the policy is
        unchanged, even if frozen)."""
        return cls(copy.deepcopy(policy)).requires_grad_(True).train()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids [B, T]`` (+ 0/1 ``attention_mask``) → float32 values ``[B, T]``."""
        if attention_mask is None:
            h = self.backbone.hidden_states(input_ids)
        else:
            h = self.backbone.hidden_states(input_ids, position_ids_from_mask(attention_mask),
                                            attention_mask=attention_mask.long())
        return self.v_head(h).squeeze(-1).float()


@dataclass
class GAE:
    """Result of :func:`gae` (both shaped like ``rewards``).

    Attributes:
        advantages: ``Â_t``.
        returns: ``R_t = Â_t + V_t`` (the value target, TD(λ)).
    """

    advantages: Tensor
    returns: Tensor


def gae(rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor,
        gamma: float = 0.99, lam: float = 0.95) -> GAE:
    """Generalised advantage estimation along the last (time) axis.

    Args:
        rewards: ``r_t`` ``[..., T]``.
        values: ``V(s_t)`` ``[..., T]``.
        dones: ``[..., T]`` 0/1: ``d_t = 1`` when the episode ended with step ``t`` (no
            bootstrap from ``s_{t+1}``, which belongs to the next episode).
        last_value: ``V(s_T)`` ``[...]``, the state after the last step (ignored where
            ``d_{T-1} = 1``).
        gamma: Discount ``γ ∈ [0, 1]``.
        lam: ``λ ∈ [0, 1]`` (0: one-step TD, 1: Monte Carlo with bootstrap).

    Returns:
        :class:`GAE` (detached from the inputs' graphs).

    Raises:
        ValueError: shapes that disagree, ``dones`` not 0/1, ``γ`` or ``λ`` outside [0, 1].
    """
    for name, t in (("values", values), ("dones", dones)):
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must have rewards' shape {tuple(rewards.shape)}, got "
                             f"{tuple(t.shape)}")
    if rewards.dim() == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"rewards must be [..., T] with T >= 1, got {tuple(rewards.shape)}")
    if last_value.shape != rewards.shape[:-1]:
        raise ValueError(f"last_value must be [...] = {tuple(rewards.shape[:-1])}, got "
                         f"{tuple(last_value.shape)}")
    if not bool(((dones == 0) | (dones == 1)).all()):
        raise ValueError("dones must hold only 0 and 1")
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    rewards, values = rewards.detach().float(), values.detach().float()
    nonterminal = 1.0 - dones.float()
    adv = torch.zeros_like(rewards)
    next_value, next_adv = last_value.detach().float(), torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        # δ_t = r_t + γ V_{t+1} (1 - d_t) - V_t
        delta = rewards[..., t] + gamma * next_value * nonterminal[..., t] - values[..., t]
        # Â_t = δ_t + γ λ (1 - d_t) Â_{t+1}   (GAE paper eq. 16, cut at episode ends)
        next_adv = delta + gamma * lam * nonterminal[..., t] * next_adv
        adv[..., t] = next_adv
        next_value = values[..., t]
    return GAE(advantages=adv, returns=adv + values)


def token_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor,
                  kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards of a completion and its episode ends (InstructGPT's shaping).

    ``r_t = -c_KL (ℓ_t - ℓ^ref_t) m_t``, plus the completion's score on its last token.

    Args:
        scores: ``[B]`` scorer's value of each completion.
        logps: ``[B, T]`` sampling policy's log-probs of the completion tokens.
        ref_logps: ``[B, T]`` reference's log-probs of the same tokens.
        mask: ``[B, T]`` 0/1 completion mask (every row non-empty).
        kl_coef: ``c_KL ≥ 0``.

    Returns:
        ``(rewards [B, T], dones [B, T])``, ``dones`` 1 on each row's last completion token.
    """
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    m = mask.float()
    if bool((m.sum(-1) == 0).any()):
        raise ValueError("every row of mask needs at least one completion token")
    last = (m * torch.arange(1, m.shape[1] + 1, dtype=m.dtype)).argmax(-1)  # last 1 per row
    dones = F.one_hot(last, m.shape[1]).to(m.dtype)
    rewards = -kl_coef * (logps - ref_logps).detach() * m + scores.float()[:, None] * dones
    return rewards, dones


@dataclass
class PPOLoss:
    """Result of :func:`ppo_loss`: ``loss = policy_loss + c_H entropy_loss + c_v value_loss``.

    Attributes:
        loss: Scalar to minimise (differentiable).
        policy_loss: ``-mean min(ρ Â, clip(ρ) Â)``.
        value_loss: ``mean (R - V_pred)²`` with the clipped prediction when ``ε_v`` is set.
        entropy_loss: ``-mean H`` (or ``mean ℓ`` when no entropy is given, SB3's fallback).
        clip_fraction: Fraction of samples with ``|ρ - 1| > ε`` (detached).
        approx_kl: ``mean (ρ - 1) - log ρ`` (detached), SB3's early-stopping statistic.
    """

    loss: Tensor
    policy_loss: Tensor
    value_loss: Tensor
    entropy_loss: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


def ppo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, values: Tensor,
             old_values: Tensor, returns: Tensor, *, entropy: Tensor | None = None,
             mask: Tensor | None = None, clip_range: float = 0.2,
             clip_range_vf: float | None = None, ent_coef: float = 0.0, vf_coef: float = 0.5,
             normalize_advantage: bool = True) -> PPOLoss:
    """PPO's clipped surrogate, (clipped) value loss and entropy bonus, as SB3 computes them.

    Args:
        logps: ``log π_θ(a_t|s_t)`` (differentiable), any shape ``S``.
        old_logps: ``log π_old(a_t|s_t)``, shape ``S``.
        advantages: ``Â_t``, shape ``S``.
        values: ``V_φ(s_t)`` now (differentiable), shape ``S``.
        old_values: ``V(s_t)`` at rollout time (the centre of the value clip), shape ``S``.
        returns: ``R_t``, shape ``S``.
        entropy: ``H(π_θ(·|s_t))``, shape ``S``; ``None`` → ``-logps`` (SB3's fallback).
        mask: 0/1, shape ``S``: every mean becomes a mean over ``mask == 1``; ``None``: all.
        clip_range: ``ε > 0``.
        clip_range_vf: ``ε_v > 0`` clips ``V - V_old`` to ``[-ε_v, ε_v]`` (SB3: the clipped
            prediction alone enters the loss); ``None``: no value clipping.
        ent_coef: ``c_H``.
        vf_coef: ``c_v``.
        normalize_advantage: Standardise ``Â`` over the (masked) batch, ``(Â - mean) / (std
            + 1e-8)`` with the unbiased std (skipped for a single sample, as SB3 does).

    Returns:
        :class:`PPOLoss`.

    Raises:
        ValueError: shapes that disagree, ``ε ≤ 0`` or ``ε_v ≤ 0``.
    """
    shape = logps.shape
    for name, t in (("old_logps", old_logps), ("advantages", advantages), ("values", values),
                    ("old_values", old_values), ("returns", returns), ("entropy", entropy),
                    ("mask", mask)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have logps' shape {tuple(shape)}, got "
                             f"{tuple(t.shape)}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}")
    if clip_range_vf is not None and not clip_range_vf > 0:
        raise ValueError(f"clip_range_vf must be > 0 or None (no value clipping), got "
                         f"{clip_range_vf!r}")
    m = torch.ones_like(logps) if mask is None else mask.to(logps.dtype)
    n = m.sum().clamp(min=1.0)

    def mean(x: Tensor) -> Tensor:
        return (x * m).sum() / n

    adv = advantages.detach()
    if normalize_advantage and int(m.sum()) > 1:
        mu = mean(adv)
        std = torch.sqrt(mean((adv - mu) ** 2) * n / (n - 1))  # unbiased, as torch.std
        adv = (adv - mu) / (std + 1e-8)
    ratio = torch.exp(logps - old_logps.detach())  # ρ_t
    # PPO eq. (7): L^CLIP = E[min(ρ Â, clip(ρ, 1-ε, 1+ε) Â)]
    policy_loss = -mean(torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip_range,
                                                                  1 + clip_range)))
    pred = values
    if clip_range_vf is not None:  # V_pred = V_old + clip(V - V_old, -ε_v, ε_v)
        pred = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    value_loss = mean((returns.detach() - pred) ** 2)
    entropy_loss = -mean(entropy) if entropy is not None else -mean(-logps)
    # PPO eq. (9): L = -L^CLIP + c_v L^VF - c_H H
    loss = policy_loss + ent_coef * entropy_loss + vf_coef * value_loss
    with torch.no_grad():
        log_ratio = logps - old_logps
        clip_fraction = mean(((ratio - 1).abs() > clip_range).to(m.dtype))
        approx_kl = mean(torch.exp(log_ratio) - 1 - log_ratio)
    return PPOLoss(loss=loss, policy_loss=policy_loss, value_loss=value_loss,
                   entropy_loss=entropy_loss, clip_fraction=clip_fraction, approx_kl=approx_kl)
