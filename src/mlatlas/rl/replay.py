"""Experience replay: a fixed-size ring buffer of transitions, sampled uniformly.

Off-policy methods (DQN, DDPG, TD3, SAC) learn from transitions ``(s, a, r, s', d)`` drawn at
random from the recent past instead of the latest step: consecutive steps are strongly
correlated, and re-using each transition many times makes learning sample-efficient (Lin 1992,
*Machine Learning* 8:293-321; Mnih et al. 2015, *Nature* 518:529-533). ``d`` is 1 only when
the episode *terminated*; a time-limit truncation stores ``d = 0`` so that the target still
bootstraps from ``s'`` (stable-baselines3's ``handle_timeout_termination``).

================  ====================================================================
``C``             capacity; the oldest transition is overwritten once ``C`` are stored
``s, a, r, s'``   observation, action (as the agent chose it), reward, next observation
``d``             1 if ``s'`` is terminal (no bootstrap), else 0
================  ====================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ReplayBatch", "ReplayBuffer"]


@dataclass
class ReplayBatch:
    """``B`` transitions: ``obs, next_obs (B, obs_dim)``, ``actions (B, D)``, ``rewards,
    terminated (B,)`` (float32; ``terminated`` is 0/1)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor


class ReplayBuffer:
    """A ring buffer of ``capacity`` transitions, float32 tensors.

    Args:
        capacity: ``C ≥ 1``.
        obs_dim: Observation size.
        act_dim: Action size.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.obs = torch.zeros(capacity, obs_dim)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, act_dim)
        self.rewards = torch.zeros(capacity)
        self.terminated = torch.zeros(capacity)
        self.pos = 0  # where the next transition goes
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray | Tensor, action: np.ndarray | Tensor, reward: float,
            next_obs: np.ndarray | Tensor, terminated: bool) -> None:
        """Store one transition (overwriting the oldest when full).

        Raises:
            ValueError: a non-finite reward, or arrays of the wrong size.
        """
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        i = self.pos
        for name, buf, x in (("obs", self.obs, obs), ("action", self.actions, action),
                             ("next_obs", self.next_obs, next_obs)):
            x = torch.as_tensor(x, dtype=torch.float32)
            if x.shape != buf.shape[1:]:
                raise ValueError(f"{name} must have shape {tuple(buf.shape[1:])}, got "
                                 f"{tuple(x.shape)}")
            buf[i] = x
        self.rewards[i] = float(reward)
        self.terminated[i] = float(bool(terminated))
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> ReplayBatch:
        """``batch_size`` transitions drawn uniformly with replacement.

        Raises:
            ValueError: the buffer is empty or ``batch_size < 1``.
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = torch.randint(self.size, (batch_size,), generator=generator)
        return ReplayBatch(self.obs[idx], self.actions[idx], self.rewards[idx],
                           self.next_obs[idx], self.terminated[idx])
