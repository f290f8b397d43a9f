"""DDPG: deterministic policy gradient with a learned Q critic, replay and target networks.

Deep deterministic policy gradient learns a deterministic actor ``μ_θ(s)`` for continuous
actions together with a critic ``Q_φ(s, a)`` (Lillicrap, Hunt, Pritzel, Heess, Erez, Tassa,
Silver, Wierstra 2016, arXiv:1509.02971, Algorithm 1). The critic regresses the one-step
target ``y = r + γ (1 - d) Q_φ'(s', μ_θ'(s'))`` on minibatches from a replay buffer; the actor
climbs the critic, ``∇_θ J ≈ mean ∇_a Q_φ(s, a)|_{a=μ(s)} ∇_θ μ_θ(s)`` (the deterministic
policy gradient, Silver et al. 2014); the targets ``θ', φ'`` trail the learned weights by
Polyak averaging, which keeps the bootstrapped target from chasing itself. Exploration adds
Gaussian or Ornstein–Uhlenbeck noise to ``μ(s)``. As in stable-baselines3, the agent works in
actions normalised to ``[-1, 1]`` (a ``tanh`` output), mapped to the environment's bounds only
when stepping, and the critic sees ``(s, a)`` concatenated at its input.

================  ====================================================================
``μ_θ, Q_φ``      actor ``(B, obs) -> (B, D)`` in ``[-1, 1]``, critic ``(B, obs+D) -> (B,)``
``μ_θ', Q_φ'``    target networks;  ``τ`` the Polyak rate: ``θ' ← τ θ + (1 - τ) θ'``
``y``             critic target ``r + γ (1 - d) Q_φ'(s', μ_θ'(s'))``
``ε``             exploration noise: ``N(0, σ²)`` or OU ``x += θ_OU (m - x) dt + σ √dt N(0, 1)``
``[l, h]``        the environment's action bounds;  ``a_env = l + (a + 1)(h - l)/2``
================  ====================================================================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.rl.policies import mlp
from mlatlas.rl.replay import ReplayBatch, ReplayBuffer
from mlatlas.runtime import progress

__all__ = ["DDPG", "DDPGLosses", "DDPGSettings", "DeterministicActor", "GaussianNoise",
           "OrnsteinUhlenbeckNoise", "QCritic", "actor_loss", "critic_loss", "critic_target",
           "polyak_update"]


# ------------------------------------------------------------------ networks
class DeterministicActor(nn.Module):
    """``μ_θ(s) = tanh(MLP(s))`` in ``[-1, 1]^D`` (ReLU hidden layers)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (400, 300)) -> None:
        super().__init__()
        self.net = mlp([obs_dim, *hidden, act_dim], nn.ReLU)

    def forward(self, obs: Tensor) -> Tensor:
        return torch.tanh(self.net(obs))


class QCritic(nn.Module):
    """``Q_φ(s, a)``: an MLP of ``[s, a]`` with one output (ReLU hidden layers); ``(B,)``."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (400, 300)) -> None:
        super().__init__()
        self.net = mlp([obs_dim + act_dim, *hidden, 1], nn.ReLU)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        return self.net(torch.cat([obs, actions], -1)).squeeze(-1)


# ------------------------------------------------------------------ exploration noise
class GaussianNoise:
    """Independent ``N(0, σ²)`` per step and action dimension.

    Args:
        sigma: ``σ`` (scalar or ``(D,)``) in normalised action units.
        act_dim: ``D``.
        generator: Draws the noise.
    """

    def __init__(self, sigma: float | Sequence[float], act_dim: int,
                 generator: torch.Generator | None = None) -> None:
        self.sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(act_dim).clone()
        if bool((self.sigma < 0).any()):
            raise ValueError(f"sigma must be >= 0, got {self.sigma.tolist()}")
        self.generator = generator

    def __call__(self) -> np.ndarray:
        eps = torch.randn(self.sigma.shape, generator=self.generator, dtype=torch.float64)
        return (self.sigma * eps).numpy()

    def reset(self) -> None:
        """Nothing to forget between episodes."""


class OrnsteinUhlenbeckNoise:
    """Temporally correlated noise ``x_{t+1} = x_t + θ (m - x_t) dt + σ √dt ε``, ``ε ~ N(0, I)``.

    The paper's choice for physical control (θ = 0.15, σ = 0.2); the defaults of ``theta`` and
    ``dt`` are stable-baselines3's ``OrnsteinUhlenbeckActionNoise``.

    Args:
        sigma: ``σ`` (scalar or ``(D,)``).
        act_dim: ``D``.
        theta: Mean-reversion rate ``θ ≥ 0``.
        dt: Time step ``dt > 0``.
        mean: The level ``m`` it reverts to.
        generator: Draws ``ε``.
    """

    def __init__(self, sigma: float | Sequence[float], act_dim: int, theta: float = 0.15,
                 dt: float = 1e-2, mean: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        if theta < 0 or dt <= 0:
            raise ValueError(f"theta must be >= 0 and dt > 0, got theta={theta}, dt={dt}")
        self.sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(act_dim).clone()
        if bool((self.sigma < 0).any()):
            raise ValueError(f"sigma must be >= 0, got {self.sigma.tolist()}")
        self.theta, self.dt, self.mean = theta, dt, mean
        self.generator = generator
        self.x = torch.zeros(act_dim, dtype=torch.float64)

    def __call__(self) -> np.ndarray:
        eps = torch.randn(self.x.shape, generator=self.generator, dtype=torch.float64)
        # x ← x + θ (m - x) dt + σ √dt ε   (Euler–Maruyama step of the OU process)
        self.x = self.x + self.theta * (self.mean - self.x) * self.dt + \
            self.sigma * math.sqrt(self.dt) * eps
        return self.x.numpy()

    def reset(self) -> None:
        """Start the next episode from ``x = 0``."""
        self.x = torch.zeros_like(self.x)


# ------------------------------------------------------------------ the losses
def critic_target(actor_targ: nn.Module, critic_targ: nn.Module, batch: ReplayBatch,
                  gamma: float) -> Tensor:
    """``y = r + γ (1 - d) Q_φ'(s', μ_θ'(s'))``, ``(B,)``, without gradient."""
    with torch.no_grad():
        next_q = critic_targ(batch.next_obs, actor_targ(batch.next_obs).clamp(-1, 1))
        return batch.rewards + gamma * (1.0 - batch.terminated) * next_q


def critic_loss(critic: nn.Module, batch: ReplayBatch, target: Tensor) -> Tensor:
    """``mean (Q_φ(s, a) - y)²``."""
    return F.mse_loss(critic(batch.obs, batch.actions), target)


def actor_loss(actor: nn.Module, critic: nn.Module, obs: Tensor) -> Tensor:
    """``-mean Q_φ(s, μ_θ(s))``: its gradient in ``θ`` is minus the deterministic PG."""
    return -critic(obs, actor(obs)).mean()


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``θ' ← τ θ + (1 - τ) θ'`` for every parameter, in place."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


# ------------------------------------------------------------------ the agent
@dataclass
class DDPGSettings:
    """DDPG's hyper-parameters (defaults: stable-baselines3's ``DDPG``).

    Attributes:
        gamma: Discount ``γ``.
        tau: Polyak rate ``τ``.
        lr: Adam learning rate of actor and critic.
        batch_size: Replay minibatch size.
        buffer_size: Replay capacity.
        learning_starts: Steps of uniformly random actions before learning starts.
        train_freq: Environment steps between training rounds.
        gradient_steps: Gradient steps per round.
        hidden: Hidden widths of actor and critic.
    """

    gamma: float = 0.99
    tau: float = 0.005
    lr: float = 1e-3
    batch_size: int = 256
    buffer_size: int = 1_000_000
    learning_starts: int = 100
    train_freq: int = 1
    gradient_steps: int = 1
    hidden: tuple[int, ...] = (400, 300)

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"gamma and tau must be in [0, 1], got gamma={self.gamma}, "
                             f"tau={self.tau}")
        for name in ("batch_size", "buffer_size", "train_freq", "gradient_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DDPGLosses:
    """One gradient step: ``critic_loss``, ``actor_loss`` and the mean target ``y``."""

    critic_loss: float
    actor_loss: float
    target_mean: float


class DDPG:
    """Actor, critic, their targets, the replay buffer and the training loop.

    Args:
        observation_space: A gymnasium ``Box`` of shape ``(obs_dim,)``.
        action_space: A gymnasium ``Box`` with finite bounds (DDPG cannot act in discrete
            spaces: its actor outputs a continuous action).
        settings: The hyper-parameters.
        noise: Exploration noise (``None``: act greedily).
        generator: Draws the minibatches and the warm-up actions.
    """

    def __init__(self, observation_space: Any, action_space: Any,
                 settings: DDPGSettings | None = None,
                 noise: GaussianNoise | OrnsteinUhlenbeckNoise | None = None,
                 generator: torch.Generator | None = None) -> None:
        import gymnasium

        if not isinstance(action_space, gymnasium.spaces.Box):
            raise TypeError("DDPG needs a continuous action space (gymnasium.spaces.Box), got "
                            f"{action_space}")
        self.low = np.asarray(action_space.low, dtype=np.float32)
        self.high = np.asarray(action_space.high, dtype=np.float32)
        if not (np.isfinite(self.low).all() and np.isfinite(self.high).all()):
            raise ValueError(f"action_space must have finite bounds, got {action_space}")
        if len(observation_space.shape) != 1:
            raise ValueError(f"observation_space must be flat (obs_dim,), got "
                             f"{observation_space.shape}")
        self.settings = s = settings or DDPGSettings()
        obs_dim, act_dim = observation_space.shape[0], action_space.shape[0]
        self.actor = DeterministicActor(obs_dim, act_dim, s.hidden)
        self.critic = QCritic(obs_dim, act_dim, s.hidden)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=s.lr, foreach=True)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=s.lr, foreach=True)
        self.buffer = ReplayBuffer(s.buffer_size, obs_dim, act_dim)
        self.noise, self.generator = noise, generator
        self.steps = 0
        self.episode_returns: list[float] = []
        self.episode_end_steps: list[int] = []
        self._env: Any = None
        self._obs: np.ndarray | None = None
        self._episode_return = 0.0

    # -- actions -------------------------------------------------------------------------
    def to_env(self, action: np.ndarray) -> np.ndarray:
        """Normalised ``[-1, 1]`` action → the environment's ``[l, h]``."""
        return self.low + 0.5 * (action + 1.0) * (self.high - self.low)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The greedy environment action ``μ_θ(s)`` (for evaluation)."""
        with torch.inference_mode():
            a = self.actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()
        return self.to_env(a)

    def _explore(self, obs: np.ndarray) -> np.ndarray:
        if self.steps < self.settings.learning_starts:  # uniform warm-up actions
            a = (2 * torch.rand(self.low.shape, generator=self.generator) - 1).numpy()
        else:
            with torch.inference_mode():
                a = self.actor(torch.from_numpy(obs)).numpy()
        if self.noise is not None:
            a = np.clip(a + self.noise(), -1.0, 1.0).astype(np.float32)
        return a

    # -- learning ------------------------------------------------------------------------
    def update(self, batch: ReplayBatch) -> DDPGLosses:
        """One critic step, one actor step (on the updated critic), then the Polyak updates."""
        s = self.settings
        y = critic_target(self.actor_target, self.critic_target, batch, s.gamma)
        q_loss = critic_loss(self.critic, batch, y)
        self.critic_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        self.critic_optimizer.step()
        pi_loss = actor_loss(self.actor, self.critic, batch.obs)
        actor_params = list(self.actor.parameters())
        for p, g in zip(actor_params, torch.autograd.grad(pi_loss, actor_params)):
            p.grad = g  # only the actor's gradient: the critic is not stepped on this loss
        self.actor_optimizer.step()
        polyak_update(self.critic_target, self.critic, s.tau)
        polyak_update(self.actor_target, self.actor, s.tau)
        return DDPGLosses(float(q_loss.detach()), float(pi_loss.detach()), float(y.mean()))

    def learn(self, env: Any, steps: int, seed: int | None = None,
              description: str = "DDPG") -> DDPG:
        """Act in ``env`` for ``steps`` more steps, storing and learning as it goes.

        The first call (or a new ``env``) resets ``env`` with ``seed``; later calls continue.

        Raises:
            ValueError: ``steps < 1``, or the environment returned a non-finite reward.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        s = self.settings
        if env is not self._env or self._obs is None:
            self._env, self._episode_return = env, 0.0
            self._obs = np.asarray(env.reset(seed=seed)[0], dtype=np.float32)
            if self.noise is not None:
                self.noise.reset()
        for _ in progress(range(steps), description=description):
            a = self._explore(self._obs)
            nxt, r, terminated, truncated, _ = env.step(self.to_env(a))
            if not math.isfinite(r):
                raise ValueError(f"the environment returned a non-finite reward {r!r} at step "
                                 f"{self.steps + 1}; rewards must be finite")
            nxt = np.asarray(nxt, dtype=np.float32)
            self.buffer.add(self._obs, a, r, nxt, terminated)  # truncation still bootstraps
            self._episode_return += r
            self.steps += 1
            if terminated or truncated:
                self.episode_returns.append(self._episode_return)
                self.episode_end_steps.append(self.steps)
                self._episode_return = 0.0
                nxt = np.asarray(env.reset()[0], dtype=np.float32)
                if self.noise is not None:
                    self.noise.reset()
            self._obs = nxt
            if self.steps > s.learning_starts and self.steps % s.train_freq == 0:
                for _ in range(s.gradient_steps):
                    self.update(self.buffer.sample(s.batch_size, self.generator))
        return self
