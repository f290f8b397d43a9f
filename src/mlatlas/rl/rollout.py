"""On-policy rollouts: fixed-length batches of experience from gymnasium envs, with GAE.

An on-policy method (TRPO, PPO, A2C) alternates between running the current policy for ``T``
steps in each of ``N`` environments and one update on that batch. Episodes do not line up with
the batch: an episode that ends mid-batch is reset at once and the next one continues in the
same slot, and the last steps of the batch are bootstrapped with ``V(s_T)``. The advantages are
generalised advantage estimates (Schulman, Moritz, Levine, Jordan, Abbeel 2016,
arXiv:1506.02438, eq. 16), cut at episode ends. An episode stopped by the time limit
(``truncated``) did not terminate: its last reward gets ``+ γ V(s_final)`` (Pardo et al. 2018,
arXiv:1712.00378), exactly as stable-baselines3's ``OnPolicyAlgorithm.collect_rollouts`` does.

================  ====================================================================
``N, T``          environments stepped in lockstep, steps per environment per batch
``s_t, a_t, r_t``  observation, action, reward (``r_t += γ V(s_final)`` on truncation)
``d_t``           1 if the episode ended with step ``t`` (terminated or truncated)
``Â_t, R_t``      GAE advantage and return ``Â_t + V(s_t)``
================  ====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mlatlas.alignment.ppo import gae

__all__ = ["RolloutBatch", "RolloutCollector"]


@dataclass
class RolloutBatch:
    """``N * T`` transitions, flattened environment-major (env 0's ``T`` steps first).

    Attributes:
        obs: ``(N*T, obs_dim)`` float32 observations ``s_t``.
        actions: ``(N*T,)`` int64 or ``(N*T, D)`` float32 actions as sampled (not clipped).
        log_probs: ``(N*T,)`` ``log π_old(a_t | s_t)`` of the sampling policy.
        values: ``(N*T,)`` ``V(s_t)`` before the update.
        advantages: ``(N*T,)`` GAE ``Â_t``.
        returns: ``(N*T,)`` ``R_t = Â_t + V(s_t)`` (the value function's regression target).
        episode_returns: Undiscounted returns of the episodes that ended in this batch.
        episode_lengths: Their lengths.
        episode_end_steps: The collector's total step count when each of them ended.
    """

    obs: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    episode_end_steps: list[int] = field(default_factory=list)


class RolloutCollector:
    """Steps ``N`` gymnasium environments in lockstep and hands out GAE batches.

    The environments are reset once here (``seed + i``); later resets continue each
    environment's own generator, so a run is reproducible from ``seed``.

    Args:
        envs: gymnasium environments with a ``Discrete`` or ``Box`` action space.
        seed: Seed of the first reset.
    """

    def __init__(self, envs: Sequence[Any], seed: int = 0) -> None:
        if not envs:
            raise ValueError("envs must hold at least one environment, got none")
        self.envs = list(envs)
        space = self.envs[0].action_space
        self.discrete = hasattr(space, "n")
        if not self.discrete and not hasattr(space, "low"):
            raise TypeError(f"action space must be Discrete or Box, got {space}")
        self.low = None if self.discrete else np.asarray(space.low, dtype=np.float32)
        self.high = None if self.discrete else np.asarray(space.high, dtype=np.float32)
        self.obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)]
                            ).astype(np.float32)
        self.episode_return = np.zeros(len(self.envs))
        self.episode_length = np.zeros(len(self.envs), dtype=np.int64)
        self.total_steps = 0

    @property
    def n_envs(self) -> int:
        return len(self.envs)

    def collect(self, policy: nn.Module, value: nn.Module, n_steps: int, gamma: float,
                lam: float, generator: torch.Generator | None = None) -> RolloutBatch:
        """Run ``policy`` for ``n_steps`` steps in every environment.

        Args:
            policy: Has ``sample(obs (N, obs_dim), generator)`` and ``log_prob(obs, actions)``.
            value: ``V(obs) -> (B,)``.
            n_steps: ``T`` steps per environment.
            gamma: Discount ``γ``.
            lam: GAE ``λ``.
            generator: Draws the actions.

        Returns:
            The :class:`RolloutBatch` (``N * T`` transitions).

        Raises:
            ValueError: ``n_steps < 1``, or an environment returned a non-finite reward.
        """
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        N = self.n_envs
        obs_buf = np.empty((n_steps, *self.obs.shape), dtype=np.float32)
        rewards = np.zeros((n_steps, N), dtype=np.float32)
        dones = np.zeros((n_steps, N), dtype=np.float32)
        actions: list[Tensor] = []
        truncated_at: list[tuple[int, int, np.ndarray]] = []  # (t, env, final observation)
        ep_returns: list[float] = []
        ep_lengths: list[int] = []
        ep_ends: list[int] = []
        for t in range(n_steps):
            obs_buf[t] = self.obs
            with torch.inference_mode():
                a = policy.sample(torch.from_numpy(self.obs), generator)
            actions.append(a)
            a_np = a.numpy()
            if not self.discrete:
                a_np = np.clip(a_np, self.low, self.high)  # the env gets a clipped action
            for i, env in enumerate(self.envs):
                nxt, r, terminated, truncated, _ = env.step(int(a_np[i]) if self.discrete
                                                            else a_np[i])
                if not math.isfinite(r):
                    raise ValueError(f"environment {i} returned a non-finite reward {r!r} at "
                                     f"step {self.total_steps + 1}; rewards must be finite")
                rewards[t, i] = r
                self.episode_return[i] += r
                self.episode_length[i] += 1
                if terminated or truncated:
                    dones[t, i] = 1.0
                    if truncated and not terminated:
                        truncated_at.append((t, i, np.asarray(nxt, dtype=np.float32)))
                    ep_returns.append(float(self.episode_return[i]))
                    ep_lengths.append(int(self.episode_length[i]))
                    ep_ends.append(self.total_steps + N)
                    self.episode_return[i], self.episode_length[i] = 0.0, 0
                    nxt, _ = env.reset()
                self.obs[i] = nxt
            self.total_steps += N
        obs = torch.from_numpy(obs_buf)  # (T, N, obs_dim)
        act = torch.stack(actions)  # (T, N) or (T, N, D)
        with torch.no_grad():
            values = value(obs.reshape(n_steps * N, -1)).reshape(n_steps, N)
            last_value = value(torch.from_numpy(self.obs))
            log_probs = policy.log_prob(obs.reshape(n_steps * N, -1),
                                        act.reshape(n_steps * N, *act.shape[2:]))
            r = torch.from_numpy(rewards)
            if truncated_at:  # r_t += γ V(s_final): the time limit is not a terminal state
                finals = value(torch.from_numpy(np.stack([f for _, _, f in truncated_at])))
                for (t, i, _), v in zip(truncated_at, finals):
                    r[t, i] += gamma * v
        est = gae(r.T, values.T, torch.from_numpy(dones).T, last_value, gamma, lam)  # [N, T]
        return RolloutBatch(  # environment-major: (T, N, ...) -> (N, T, ...) -> (N*T, ...)
            obs=obs.transpose(0, 1).reshape(N * n_steps, -1),
            actions=act.transpose(0, 1).reshape(N * n_steps, *act.shape[2:]),
            log_probs=log_probs.reshape(n_steps, N).T.reshape(-1),
            values=values.T.reshape(-1),
            advantages=est.advantages.reshape(-1),
            returns=est.returns.reshape(-1),
            episode_returns=ep_returns, episode_lengths=ep_lengths, episode_end_steps=ep_ends)
