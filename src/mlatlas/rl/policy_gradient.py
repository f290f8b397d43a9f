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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CategoricalMLPPolicy",
    "EpisodeBatch",
    "GaussianMLPPolicy",
    "TabularSoftmaxPolicy",
    "TabularValue",
    "ValueMLP",
    "categorical_entropy",
    "categorical_log_prob",
    "collect_episodes",
    "exact_policy_gradient",
    "gaussian_entropy",
    "gaussian_log_prob",
    "mlp",
    "reinforce_loss",
    "reinforce_update",
    "reward_to_go",
]

_LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------ distributions
def categorical_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log pi(a | s)`` of a softmax policy.

    Args:
        logits: ``(..., A)`` unnormalised log-probabilities.
        actions: ``(...)`` int64 action indices in ``[0, A)``.

    Returns:
        ``(...)`` log-probabilities.
    """
    if actions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"actions must be an integer tensor, got dtype {actions.dtype}")
    if tuple(actions.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"actions must have shape {tuple(logits.shape[:-1])} (logits without "
                         f"the last dim), got {tuple(actions.shape)}")
    log_pi = logits - torch.logsumexp(logits, -1, keepdim=True)  # log softmax
    return log_pi.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_a pi(a) log pi(a)`` of softmax ``(..., A)`` logits; returns ``(...)``."""
    log_pi = logits - torch.logsumexp(logits, -1, keepdim=True)
    return -(log_pi.exp() * log_pi).sum(-1)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor,
                      actions: torch.Tensor) -> torch.Tensor:
    """Log-density of a diagonal Gaussian, summed over the action dimensions.

    Args:
        mean: ``(..., D)`` means ``mu``.
        log_std: ``(..., D)`` or ``(D,)`` log standard deviations.
        actions: ``(..., D)`` actions.

    Returns:
        ``(...)`` ``sum_d [-(a - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2]``.
    """
    if actions.shape != mean.shape:
        raise ValueError(f"actions must have the shape of mean {tuple(mean.shape)}, "
                         f"got {tuple(actions.shape)}")
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)  # log N(a; mu, sigma^2)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian: ``sum_d (1/2 + log(2 pi)/2 + log sigma_d)``; ``(...)``."""
    return (0.5 + 0.5 * _LOG_2PI + log_std).sum(-1)


# ------------------------------------------------------------------ networks and policies
def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """``Linear → activation → … → Linear`` through ``sizes`` (no activation at the end)."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least input and output sizes, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class _Categorical(nn.Module):
    """Shared methods of the softmax policies (subclasses define ``logits``)."""

    def logits(self, obs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def probs(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B, A)`` action probabilities."""
        return torch.softmax(self.logits(obs), -1)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``(B,)`` ``log pi(a | s)``."""
        return categorical_log_prob(self.logits(obs), actions)

    def entropy(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B,)`` policy entropy per state."""
        return categorical_entropy(self.logits(obs))

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B,)`` int64 actions drawn from ``pi(. | s)``."""
        return torch.multinomial(self.probs(obs), 1, generator=generator).squeeze(-1)


class TabularSoftmaxPolicy(_Categorical):
    """``pi(a | s) = softmax(theta[s])`` over a table of logits.

    Args:
        n_states: ``S``.
        n_actions: ``A``.
    """

    def __init__(self, n_states: int, n_actions: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n_states, n_actions))

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B, A)`` logits of the int64 states ``obs`` ``(B,)``."""
        if obs.dtype != torch.int64:
            raise TypeError(f"obs must be int64 state indices, got dtype {obs.dtype}")
        return self.theta[obs]

    def table(self) -> torch.Tensor:
        """``(S, A)`` the policy as a probability table."""
        return torch.softmax(self.theta.detach(), -1)


class CategoricalMLPPolicy(_Categorical):
    """Softmax policy whose logits are an MLP of the observation.

    Args:
        obs_dim: Observation size.
        n_actions: Number of discrete actions.
        hidden: Hidden layer widths.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = mlp([obs_dim, *hidden, n_actions])

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B, A)`` logits of observations ``(B, obs_dim)``."""
        return self.net(obs)


class GaussianMLPPolicy(nn.Module):
    """Diagonal Gaussian policy ``N(mu_theta(s), diag(sigma^2))`` for continuous actions.

    Args:
        obs_dim: Observation size.
        act_dim: Action size ``D``.
        hidden: Hidden layer widths of the mean network.
        log_std_init: Initial ``log sigma`` (state-independent, learned).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64),
                 log_std_init: float = 0.0) -> None:
        super().__init__()
        self.mean_net = mlp([obs_dim, *hidden, act_dim])
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` action means."""
        return self.mean_net(obs)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-density of ``actions`` ``(B, D)``."""
        return gaussian_log_prob(self.mean(obs), self.log_std, actions)

    def entropy(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B,)`` entropy (the same in every state)."""
        return gaussian_entropy(self.log_std).expand(obs.shape[0])

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, D)`` actions ``mu + sigma * eps``, ``eps ~ N(0, I)``."""
        mu = self.mean(obs)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        return mu + self.log_std.exp() * eps


class TabularValue(nn.Module):
    """State-value baseline ``V_w(s) = w[s]`` over ``n_states`` int64 state indices."""

    def __init__(self, n_states: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_states))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.w[obs]


class ValueMLP(nn.Module):
    """State-value baseline ``V_w(s)``: an MLP with one output; ``forward`` returns ``(B,)``."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = mlp([obs_dim, *hidden, 1])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


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
