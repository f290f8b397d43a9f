"""Stochastic policies and value baselines for policy-gradient methods.

A policy gives ``log pi_theta(a | s)`` (differentiable in ``theta``), its entropy and a sampler:
softmax policies over discrete actions — a table of logits ``theta[s]`` for the grid world, an
MLP of the observation for CartPole — and a diagonal Gaussian ``N(mu_theta(s), diag(sigma^2))``
with a learned state-independent ``log sigma`` for continuous actions. The baselines
``V_w(s)`` are a table or an MLP. :mod:`mlatlas.rl.policy_gradient` trains them with
REINFORCE.

Source: R. J. Williams 1992, *Machine Learning* 8:229-256; R. S. Sutton and A. G. Barto 2018,
*Reinforcement Learning: An Introduction*, 2nd ed., sec. 13.7 (Gaussian policies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "CategoricalMLPPolicy",
    "GaussianMLPPolicy",
    "TabularSoftmaxPolicy",
    "TabularValue",
    "ValueMLP",
    "categorical_entropy",
    "categorical_log_prob",
    "gaussian_entropy",
    "gaussian_log_prob",
    "mlp",
    "orthogonal_init",
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


@torch.no_grad()
def orthogonal_init(net: nn.Sequential, hidden_gain: float = math.sqrt(2),
                    out_gain: float = 1.0) -> nn.Sequential:
    """Orthogonal weights, zero biases (OpenAI Baselines' and stable-baselines3's policy init).

    Every ``nn.Linear`` of ``net`` (an :func:`mlp`) gets ``orthogonal_(W, gain)`` with
    ``hidden_gain`` except the last, which gets ``out_gain`` (SB3: 0.01 for a policy head, 1
    for a value head); biases are zeroed. Returns ``net`` (changed in place).
    """
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"net must contain nn.Linear layers, got {type(net).__name__} without")
    for i, layer in enumerate(linears):
        nn.init.orthogonal_(layer.weight, gain=out_gain if i == len(linears) - 1 else hidden_gain)
        nn.init.zeros_(layer.bias)
    return net


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
