"""Policy gradient: REINFORCE with a baseline, for softmax (discrete) and Gaussian policies.

A parameterised policy ``pi_theta(a | s)`` is improved by gradient ascent on the expected
discounted return ``J(theta)``. The policy gradient theorem writes the gradient as an
expectation that sampled episodes estimate without a model:
``grad J = E[ sum_t gamma^t (G_t - b(s_t)) grad log pi_theta(a_t | s_t) ]``. Subtracting a
baseline ``b(s)`` that does not depend on the action leaves the expectation unchanged and
lowers the variance; here it is a learned state-value estimate. Discrete actions use a
softmax over logits (a table for the grid world, an MLP for CartPole); continuous actions a
diagonal Gaussian whose mean is an MLP and whose log-std is a free parameter.

Source: R. J. Williams 1992, "Simple statistical gradient-following algorithms for
connectionist reinforcement learning", *Machine Learning* 8:229-256; Sutton, McAllester,
Singh, Mansour 2000 (the policy gradient theorem); S. Zhao 2025, *Mathematical Foundations of
Reinforcement Learning*, ch. 9.

Notation:

=================  ==========================================================
``theta``           policy parameters (``(S, A)`` logits for the tabular policy)
``G_t``             reward-to-go ``sum_{k>=t} gamma^(k-t) r_{k+1}``
``b(s)``            baseline (a learned value ``V_w(s)``, gradients stopped)
``d(s)``            discounted visitation ``sum_t gamma^t P(S_t = s)``
``mu, sigma``       mean and standard deviation of the Gaussian policy
=================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "EpisodeBatch",
    "collect_episodes",
    "exact_policy_gradient",
    "reinforce_loss",
    "reinforce_update",
    "reward_to_go",
]

# ------------------------------------------------------------------ the estimator
def reward_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_{t+1} + gamma G_{t+1}`` along the last dim of ``rewards`` ``(..., T)``."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    G = torch.empty_like(rewards)
    acc = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        acc = rewards[..., t] + gamma * acc
        G[..., t] = acc
    return G


def reinforce_loss(log_probs: torch.Tensor, returns: torch.Tensor,
                   baseline: torch.Tensor | None = None, discounts: torch.Tensor | None = None,
                   normalize: bool = False, n_episodes: int | None = None) -> torch.Tensor:
    """Surrogate loss whose gradient is minus the REINFORCE estimate of ``grad J``.

    Args:
        log_probs: ``(N,)`` ``log pi_theta(a_t | s_t)`` of every step of the batch.
        returns: ``(N,)`` rewards-to-go ``G_t``.
        baseline: ``(N,)`` ``b(s_t)``; its gradient is stopped.
        discounts: ``(N,)`` ``gamma^t`` weights (omit for the common undiscounted-weight
            variant).
        normalize: Standardise the advantages ``G_t - b(s_t)`` over the batch.
        n_episodes: Divide the sum by this (an unbiased per-episode average); the mean over
            the ``N`` steps when None.

    Returns:
        Scalar ``-(1/n) sum_t gamma^t (G_t - b(s_t)) log pi(a_t | s_t)``.
    """
    if log_probs.shape != returns.shape or log_probs.dim() != 1:
        raise ValueError(f"log_probs and returns must both have shape (N,), got "
                         f"{tuple(log_probs.shape)} and {tuple(returns.shape)}")
    for name, t in (("baseline", baseline), ("discounts", discounts)):
        if t is not None and t.shape != returns.shape:  # (N, 1) would broadcast to (N, N)
            raise ValueError(f"{name} must have the shape of returns {tuple(returns.shape)}, "
                             f"got {tuple(t.shape)}")
    adv = returns if baseline is None else returns - baseline.detach()  # G_t - b(s_t)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    if discounts is not None:
        adv = discounts * adv
    total = -(adv.detach() * log_probs).sum()  # grad: -sum gamma^t (G_t - b) grad log pi
    return total / (n_episodes if n_episodes is not None else log_probs.numel())


def exact_policy_gradient(P: torch.Tensor, R: torch.Tensor, gamma: float, theta: torch.Tensor,
                          rho0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``J(theta)`` and ``grad J`` of a tabular softmax policy from the model (no sampling).

    Uses the policy gradient theorem: ``dJ/dtheta[s, b] = d(s) pi(b|s) (q(s, b) - v(s))`` with
    ``d = rho0^T (I - gamma P_pi)^-1`` the discounted state visitation.

    Args:
        P: ``(S, A, S)`` transition tensor.
        R: ``(S, A)`` expected rewards.
        gamma: Discount in ``[0, 1)``.
        theta: ``(S, A)`` logits.
        rho0: ``(S,)`` start distribution.

    Returns:
        ``J`` (scalar) and its gradient ``(S, A)``, float64.
    """
    P, R, theta, rho0 = (t.to(torch.float64) for t in (P, R, theta.detach(), rho0))
    S = R.shape[0]
    pi = torch.softmax(theta, -1)
    P_pi = torch.einsum("sa,sat->st", pi, P)
    M = torch.eye(S, dtype=torch.float64) - gamma * P_pi
    v = torch.linalg.solve(M, (pi * R).sum(-1))  # v = (I - gamma P_pi)^-1 r_pi
    q = R + gamma * P @ v  # q(s,a) = r(s,a) + gamma sum_s' p(s'|s,a) v(s')
    d = torch.linalg.solve(M.T, rho0)  # d^T = rho0^T (I - gamma P_pi)^-1
    return rho0 @ v, d.unsqueeze(-1) * pi * (q - v.unsqueeze(-1))  # eq. PG theorem (softmax)


# ------------------------------------------------------------------ sampling and updating
@dataclass
class EpisodeBatch:
    """Complete episodes, flattened step by step.

    Attributes:
        obs: ``(N, ...)`` observations.
        actions: ``(N,)`` int64 (discrete) or ``(N, D)`` float (continuous) actions.
        returns: ``(N,)`` rewards-to-go ``G_t``.
        discounts: ``(N,)`` ``gamma^t`` (``t`` counted from each episode's start).
        episode_returns: Undiscounted return of each episode.
        episode_lengths: Length of each episode.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    returns: torch.Tensor
    discounts: torch.Tensor
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Environment steps in the batch ``N``."""
        return int(self.returns.shape[0])


def collect_episodes(envs: Sequence[Any], policy: nn.Module, gamma: float,
                     seeds: Sequence[int | None] | None = None,
                     generator: torch.Generator | None = None) -> EpisodeBatch:
    """Run one complete episode in each gymnasium env, in lockstep, with batched actions.

    Args:
        envs: gymnasium environments (their time limit ends the episodes).
        policy: Has ``sample(obs (B, obs_dim), generator)``; discrete when it returns int64.
        gamma: Discount for the rewards-to-go.
        seeds: ``reset`` seed per env (None: continue the env's own generator).
        generator: Draws the actions.

    Returns:
        The :class:`EpisodeBatch` (episodes in env order).
    """
    n = len(envs)
    seeds = [None] * n if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds must have one entry per env ({n}), got {len(seeds)}")
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds)]
    traj: list[dict[str, list]] = [{"obs": [], "act": [], "rew": []} for _ in range(n)]
    active = list(range(n))
    while active:
        batch = torch.as_tensor(np.stack([obs[i] for i in active]), dtype=torch.float32)
        actions = policy.sample(batch, generator)
        still = []
        for j, i in enumerate(active):
            a = actions[j]
            env_a = int(a) if a.dtype == torch.int64 else a.numpy()
            nxt, r, terminated, truncated, _ = envs[i].step(env_a)
            traj[i]["obs"].append(batch[j])
            traj[i]["act"].append(a)
            traj[i]["rew"].append(float(r))
            obs[i] = nxt
            if not (terminated or truncated):
                still.append(i)
        active = still
    returns, discounts = [], []
    for t in traj:
        rew = torch.tensor(t["rew"], dtype=torch.float32)
        returns.append(reward_to_go(rew, gamma))
        discounts.append(gamma ** torch.arange(len(rew), dtype=torch.float32))
    return EpisodeBatch(
        obs=torch.stack([o for t in traj for o in t["obs"]]),
        actions=torch.stack([a for t in traj for a in t["act"]]),
        returns=torch.cat(returns), discounts=torch.cat(discounts),
        episode_returns=[float(sum(t["rew"])) for t in traj],
        episode_lengths=[len(t["rew"]) for t in traj])


def reinforce_update(policy: nn.Module, baseline: nn.Module | None, optimizer: torch.optim.Optimizer,
                     batch: EpisodeBatch, use_discounts: bool = False, normalize: bool = True,
                     entropy_coef: float = 0.0) -> dict[str, float]:
    """One REINFORCE-with-baseline step on a batch of complete episodes.

    The policy follows :func:`reinforce_loss`; the baseline regresses ``G_t`` by mean squared
    error; both losses are summed and ``optimizer`` (holding both parameter sets) steps once.

    Args:
        policy: Has ``log_prob(obs, actions)`` and ``entropy(obs)``.
        baseline: ``V_w(obs) -> (N,)`` or None for plain REINFORCE.
        optimizer: Optimizer over the policy (and baseline) parameters.
        batch: From :func:`collect_episodes`.
        use_discounts: Weight step ``t`` by ``gamma^t`` as the theorem does.
        normalize: Standardise advantages over the batch.
        entropy_coef: Weight of an entropy bonus (0: none).

    Returns:
        ``{"policy_loss", "value_loss", "entropy"}``.
    """
    log_probs = policy.log_prob(batch.obs, batch.actions)
    values = baseline(batch.obs) if baseline is not None else None
    loss = reinforce_loss(log_probs, batch.returns, values,
                          batch.discounts if use_discounts else None, normalize=normalize)
    entropy = policy.entropy(batch.obs).mean()
    value_loss = (torch.nn.functional.mse_loss(values, batch.returns) if values is not None
                  else torch.zeros(()))
    optimizer.zero_grad()
    (loss + value_loss - entropy_coef * entropy).backward()
    optimizer.step()
    return {"policy_loss": float(loss.detach()), "value_loss": float(value_loss.detach()),
            "entropy": float(entropy.detach())}
