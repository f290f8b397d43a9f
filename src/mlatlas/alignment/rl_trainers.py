"""Online RL loops for a language model: GRPO and PPO, one rollout per step.

Both trainers run the same cycle — sample completions of a batch of prompts from the current
policy (:func:`mlatlas.alignment.rollout.sample_completions`), score them with a reward
function (a verifier), turn scores into advantages, and take ``updates`` optimiser steps on
the clipped objective — and differ only where the methods differ: GRPO standardises each
score within its prompt's group of ``G`` samples and adds a ``k3`` KL term to the loss
(:mod:`mlatlas.alignment.grpo`; Shao et al. 2024, arXiv:2402.03300, Algorithm 1); PPO puts a
per-token KL penalty into the reward, learns a critic and uses GAE
(:mod:`mlatlas.alignment.ppo`; Ouyang et al. 2022, arXiv:2203.02155). Given the same prompts
and samples per prompt, the two consume identical rollouts, so they can be compared side by
side.

=============  ============================================================
``P, G``       prompts per step, samples per prompt (``N = P·G`` rows)
``μ``          optimiser steps per rollout (``updates``)
``β``          GRPO's KL coefficient;  ``c_KL`` PPO's per-token KL penalty
=============  ============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlatlas.alignment.grpo import group_advantages, grpo_loss, k3_kl
from mlatlas.alignment.logprobs import CompletionLogps, completion_logps
from mlatlas.alignment.ppo import ValueModel, gae, ppo_loss, token_rewards
from mlatlas.alignment.rollout import Rollout, sample_completions

__all__ = ["GRPOTrainer", "PPOTrainer", "RewardFn", "SamplingConfig", "StepStats"]

#: Scores a rollout: ``reward_fn(rollout) → [N]`` rewards, one per row.
RewardFn = Callable[[Rollout], Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        samples_per_prompt: ``G``.
        max_new_tokens: Longest completion.
        temperature: Sampling temperature.
        eos_token_id: Ends a completion (``None``: always ``max_new_tokens``).
    """

    samples_per_prompt: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    eos_token_id: int | None = None


@dataclass
class StepStats:
    """What one trainer step measured (floats; ``value_loss`` is ``None`` for GRPO).

    Attributes:
        reward: Mean reward of the step's rollout (before the update).
        loss: Loss of the last update.
        kl: Mean per-token ``k3`` estimate of ``KL(π_θ || π_ref)`` on the rollout's tokens,
            before the update (0 without a reference).
        clip_fraction: Clipped fraction of completion tokens in the last update.
        completion_tokens: Mean completion length.
        value_loss: PPO's critic loss in the last update.
    """

    reward: float
    loss: float
    kl: float
    clip_fraction: float
    completion_tokens: float
    value_loss: float | None = None


def _frozen(model: nn.Module | None) -> nn.Module | None:
    if model is not None:
        model.requires_grad_(False).eval()
    return model


class _OnlineTrainer:
    """Sampling, scoring and the reference pass shared by both trainers."""

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer, reward_fn: RewardFn,
                 sampling: SamplingConfig, reference: nn.Module | None, updates: int,
                 max_grad_norm: float | None, generator: torch.Generator | None):
        if not isinstance(updates, int) or updates < 1:
            raise ValueError(f"updates must be an int >= 1, got {updates!r}")
        self.policy, self.optimizer, self.reward_fn = policy, optimizer, reward_fn
        self.sampling, self.reference = sampling, _frozen(reference)
        self.updates, self.max_grad_norm, self.generator = updates, max_grad_norm, generator

    def rollout(self, prompts: list[list[int]]) -> tuple[Rollout, Tensor]:
        """Sample ``G`` completions per prompt and score them: ``(rollout, rewards [N])``."""
        s = self.sampling
        rollout = sample_completions(self.policy, prompts, num_samples=s.samples_per_prompt,
                                     max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                     eos_token_id=s.eos_token_id, generator=self.generator)
        rewards = torch.as_tensor(self.reward_fn(rollout)).float()
        if rewards.shape != (len(rollout),):
            raise ValueError(f"reward_fn must return one reward per row [{len(rollout)}], got "
                             f"{tuple(rewards.shape)}")
        return rollout, rewards

    def logps(self, model: nn.Module, rollout: Rollout, with_entropy: bool = False
              ) -> CompletionLogps:
        return completion_logps(model, rollout.input_ids, rollout.completion_mask,
                                attention_mask=rollout.attention_mask, with_entropy=with_entropy)

    def optimizer_step(self, loss: Tensor, params: list[nn.Parameter]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()

    @staticmethod
    def mean_kl(old: Tensor, ref: CompletionLogps | None, mask: Tensor) -> float:
        """Mean ``k3`` KL of the sampling policy to the reference over completion tokens."""
        if ref is None:
            return 0.0
        return float((k3_kl(old, ref.logps) * mask).sum() / mask.sum())


class GRPOTrainer(_OnlineTrainer):
    """GRPO: group-relative advantages, clipped ratio, ``k3`` KL in the loss; no critic.

    Args:
        policy: The model being trained.
        optimizer: Optimiser over ``policy``'s parameters.
        reward_fn: ``rollout → [N]`` rewards.
        sampling: :class:`SamplingConfig` (``samples_per_prompt`` is the group size ``G``).
        reference: Frozen reference model; required when ``beta > 0``.
        beta: KL coefficient ``β ≥ 0``.
        epsilon: Clip range ``ε_low``; ``epsilon_high`` as in :func:`grpo_loss`.
        epsilon_high: Upper clip range (``None``: ``epsilon``).
        loss_type: ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo``.
        scale: Advantage scaling of :func:`group_advantages`.
        updates: ``μ`` optimiser steps per rollout (``> 1``: ratios leave 1 and clip).
        max_grad_norm: Global gradient-norm clip (``None``: off).
        generator: Random source of the sampler.
    """

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer, reward_fn: RewardFn,
                 sampling: SamplingConfig, *, reference: nn.Module | None = None,
                 beta: float = 0.04, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "grpo", scale: str = "group", updates: int = 1,
                 max_grad_norm: float | None = 1.0, generator: torch.Generator | None = None):
        if beta > 0 and reference is None:
            raise ValueError(f"beta={beta} > 0 needs a reference model")
        super().__init__(policy, optimizer, reward_fn, sampling, reference, updates,
                         max_grad_norm, generator)
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.loss_type, self.scale = loss_type, scale

    def step(self, prompts: list[list[int]]) -> StepStats:
        """One rollout of ``prompts`` and ``μ`` GRPO updates."""
        rollout, rewards = self.rollout(prompts)
        adv = group_advantages(rewards, self.sampling.samples_per_prompt, scale=self.scale)
        with torch.no_grad():
            ref = self.logps(self.reference, rollout) if self.reference is not None else None
        self.policy.train()
        old: Tensor | None = None
        for _ in range(self.updates):
            lp = self.logps(self.policy, rollout)
            if old is None:  # before the first update the policy is the sampling policy
                old = lp.logps.detach()
            out = grpo_loss(lp.logps, adv, lp.mask, old_logps=old,
                            ref_logps=None if ref is None else ref.logps, beta=self.beta,
                            epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                            loss_type=self.loss_type,
                            max_completion_length=self.sampling.max_new_tokens)
            self.optimizer_step(out.loss, list(self.policy.parameters()))
        return StepStats(reward=float(rewards.mean()), loss=float(out.loss.detach()),
                         kl=self.mean_kl(old, ref, lp.mask), clip_fraction=float(out.clip_fraction),
                         completion_tokens=float(lp.mask.sum(-1).mean()))


class PPOTrainer(_OnlineTrainer):
    """PPO with a critic: KL-shaped per-token rewards, GAE, clipped policy and value losses.

    Args:
        policy: The model being trained.
        critic: :class:`~mlatlas.alignment.ppo.ValueModel` (its own trunk).
        optimizer: One optimiser over the policy's *and* the critic's parameters.
        reward_fn: ``rollout → [N]`` scores, paid on each completion's last token.
        sampling: :class:`SamplingConfig`.
        reference: Frozen reference for the per-token KL penalty (``None``: no penalty).
        kl_coef: ``c_KL ≥ 0``.
        gamma: GAE discount (1 for text: the episode is one completion).
        lam: GAE ``λ``.
        clip_range: Policy clip ``ε``.
        clip_range_vf: Value clip ``ε_v`` (``None``: off).
        vf_coef: Value-loss weight.
        ent_coef: Entropy-bonus weight.
        updates: ``μ`` optimiser steps (PPO epochs over the rollout).
        max_grad_norm: Global gradient-norm clip over both models (``None``: off).
        generator: Random source of the sampler.
    """

    def __init__(self, policy: nn.Module, critic: ValueModel, optimizer: torch.optim.Optimizer,
                 reward_fn: RewardFn, sampling: SamplingConfig, *,
                 reference: nn.Module | None = None, kl_coef: float = 0.04, gamma: float = 1.0,
                 lam: float = 0.95, clip_range: float = 0.2, clip_range_vf: float | None = 0.2,
                 vf_coef: float = 0.5, ent_coef: float = 0.0, updates: int = 1,
                 max_grad_norm: float | None = 1.0, generator: torch.Generator | None = None):
        super().__init__(policy, optimizer, reward_fn, sampling, reference, updates,
                         max_grad_norm, generator)
        self.critic = critic
        self.kl_coef, self.gamma, self.lam = kl_coef, gamma, lam
        self.clip_range, self.clip_range_vf = clip_range, clip_range_vf
        self.vf_coef, self.ent_coef = vf_coef, ent_coef

    def values(self, rollout: Rollout) -> Tensor:
        """``V(x_≤t)`` ``[N, T-1]``: column ``t`` values the state that emits token ``t+1``."""
        return self.critic(rollout.input_ids, rollout.attention_mask)[:, :-1]

    def step(self, prompts: list[list[int]]) -> StepStats:
        """One rollout of ``prompts`` and ``μ`` PPO updates of policy and critic."""
        rollout, scores = self.rollout(prompts)
        with torch.no_grad():
            ref = self.logps(self.reference, rollout) if self.reference is not None else None
        params = [*self.policy.parameters(), *self.critic.parameters()]
        self.policy.train()
        self.critic.train()
        for i in range(self.updates):
            lp = self.logps(self.policy, rollout, with_entropy=self.ent_coef > 0)
            values = self.values(rollout)
            if i == 0:  # before the first update: the sampling policy and the rollout's values
                old, old_values = lp.logps.detach(), values.detach() * lp.mask
                rewards, dones = token_rewards(scores, old, old if ref is None else ref.logps,
                                               lp.mask, self.kl_coef)
                est = gae(rewards, old_values, dones, torch.zeros(len(rollout)), self.gamma,
                          self.lam)
            out = ppo_loss(lp.logps, old, est.advantages, values, old_values, est.returns,
                           entropy=lp.entropy, mask=lp.mask, clip_range=self.clip_range,
                           clip_range_vf=self.clip_range_vf, ent_coef=self.ent_coef,
                           vf_coef=self.vf_coef)
            self.optimizer_step(out.loss, params)
        return StepStats(reward=float(scores.mean()), loss=float(out.loss.detach()),
                         kl=self.mean_kl(old, ref, lp.mask), clip_fraction=float(out.clip_fraction),
                         completion_tokens=float(lp.mask.sum(-1).mean()),
                         value_loss=float(out.value_loss.detach()))
