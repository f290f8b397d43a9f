"""Monte Carlo control: policy iteration with action values estimated from sampled returns.

Without a model, ``q_pi(s, a) = E[G_t | S_t = s, A_t = a]`` is estimated by averaging the
discounted returns of sampled episodes, and the policy is improved greedily against the
estimate. *MC basic* replaces policy evaluation in policy iteration by this average over
episodes started from every ``(s, a)``; *MC exploring starts* reuses every visit (or only the
first visit) of each pair inside an episode and improves the policy after every batch of
episodes; *MC epsilon-greedy* drops the exploring-starts requirement by acting
epsilon-greedily, so it converges to the best epsilon-greedy policy, whose greedy part is
usually — not always — optimal.

Source: R. S. Sutton and A. G. Barto 2018, *Reinforcement Learning: An Introduction*, 2nd ed.,
ch. 5; S. Zhao 2025, *Mathematical Foundations of Reinforcement Learning*, ch. 5.

Notation:

================  ==========================================================
``B``              episodes sampled side by side (one batch)
``L``              episode length (continuing task cut at ``L`` steps)
``H``              tail: the last ``H`` steps only complete returns; visits
                   there are not used, so each used return's truncation
                   error is at most ``gamma^H max|r| / (1 - gamma)``
``G_t``            discounted return ``sum_k gamma^k r_{t+k+1}`` inside the episode
``eps``            exploration rate of the epsilon-greedy policy
================  ==========================================================

Rollouts are vectorised over the ``B`` episodes with torch; all sampling draws from the
``generator`` passed in, so results are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mlatlas.rl.dynamic_programming import check_policy, greedy_policy, uniform_policy
from mlatlas.rl.gridworld import GridWorld

__all__ = [
    "MCResult",
    "discounted_returns",
    "epsilon_greedy",
    "horizon",
    "mc_basic",
    "mc_epsilon_greedy",
    "mc_exploring_starts",
    "rollout",
]


@dataclass
class MCResult:
    """What a Monte Carlo control run returns.

    Attributes:
        q: ``(S, A)`` estimated action values (0 where a pair was never visited).
        policy: ``(S, A)`` the final policy (greedy, or epsilon-greedy for that method).
        counts: ``(S, A)`` number of returns averaged into each estimate.
        episodes: Episodes sampled.
        steps: Environment steps sampled.
        q_history: ``q`` after each policy update (for learning curves).
    """

    q: torch.Tensor
    policy: torch.Tensor
    counts: torch.Tensor
    episodes: int
    steps: int
    q_history: list[torch.Tensor] = field(default_factory=list)


def horizon(world: GridWorld, tol: float = 1e-3) -> int:
    """Smallest ``H`` with ``gamma^H max|r| / (1 - gamma) <= tol``: cutting a return after ``H``
    steps changes it by at most ``tol``."""
    r_max = float(world.R.abs().max())
    if world.gamma == 0 or r_max == 0:
        return 1
    bound = tol * (1 - world.gamma) / r_max
    return max(1, math.ceil(math.log(bound) / math.log(world.gamma)))


def epsilon_greedy(q: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``(S, A)`` epsilon-greedy policy of ``q``: ``1 - eps (A-1)/A`` on the argmax, ``eps/A``
    elsewhere (lowest index on ties).

    Raises:
        ValueError: ``epsilon`` outside ``[0, 1]``.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    A = q.shape[-1]
    return (1 - epsilon) * greedy_policy(q) + epsilon / A  # pi = (1-eps) greedy + eps uniform


def rollout(world: GridWorld, policy: torch.Tensor, s0: torch.Tensor, length: int,
            generator: torch.Generator | None = None, a0: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``B`` episodes of ``length`` steps side by side.

    Args:
        world: The (deterministic) grid world used as a simulator.
        policy: ``(S, A)`` behaviour policy.
        s0: ``(B,)`` int64 start states.
        length: Steps per episode ``L >= 1``.
        generator: Source of randomness for actions.
        a0: Optional ``(B,)`` first actions (exploring starts); drawn from ``policy`` if None.

    Returns:
        ``states``, ``actions`` (int64) and ``rewards`` (float64), each ``(B, L)``:
        ``rewards[:, t]`` follows taking ``actions[:, t]`` in ``states[:, t]``.

    Raises:
        ValueError: ``length < 1``, ``s0`` not ``(B,)``, or a ``policy`` that is not an
            ``(S, A)`` table of probabilities (see :func:`check_policy`).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    policy = check_policy(world, policy, atol=1e-5)  # loose: float32 softmax tables are fine
    s0 = torch.as_tensor(s0, dtype=torch.int64)
    if s0.dim() != 1:
        raise ValueError(f"s0 must have shape (B,), got {tuple(s0.shape)}")
    B = s0.shape[0]
    states = torch.empty(B, length, dtype=torch.int64)
    actions = torch.empty(B, length, dtype=torch.int64)
    rewards = torch.empty(B, length, dtype=torch.float64)
    cdf = policy.to(torch.float64).cumsum(-1)
    s = s0
    for t in range(length):
        if t == 0 and a0 is not None:
            a = torch.as_tensor(a0, dtype=torch.int64)
        else:  # a ~ pi(.|s) by inverting the CDF with one uniform draw per episode
            u = torch.rand(B, 1, dtype=torch.float64, generator=generator)
            a = (cdf[s] < u).sum(-1).clamp_(max=policy.shape[-1] - 1)
        states[:, t], actions[:, t] = s, a
        rewards[:, t] = world.R[s, a]
        s = world.next_state[s, a]
    return states, actions, rewards


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(B, L)`` returns ``G_t = r_{t+1} + gamma G_{t+1}`` inside each episode (``G_L = 0``)."""
    G = torch.empty_like(rewards)
    acc = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        acc = rewards[..., t] + gamma * acc  # G_t = r_{t+1} + gamma G_{t+1}
        G[..., t] = acc
    return G


def _first_visit_mask(pairs: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: True where a pair occurs for the first time in its episode."""
    B, T = pairs.shape
    n_pairs = int(pairs.max()) + 1 if pairs.numel() else 1
    keys = (torch.arange(B).unsqueeze(1) * n_pairs + pairs).reshape(-1)
    _, inverse = torch.unique(keys, return_inverse=True)
    pos = torch.arange(keys.numel())
    first = torch.full((int(inverse.max()) + 1,), keys.numel(), dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return (pos == first[inverse]).reshape(B, T)


def mc_basic(world: GridWorld, iterations: int = 20, episodes_per_pair: int = 1,
             length: int | None = None, policy0: torch.Tensor | None = None,
             generator: torch.Generator | None = None, stop_when_stable: bool = True) -> MCResult:
    """MC basic: policy iteration whose evaluation averages returns of fresh episodes.

    Each iteration samples ``episodes_per_pair`` episodes from every ``(s, a)`` under the
    current policy, sets ``q(s, a)`` to the mean of their returns ``G_0`` and improves greedily.

    Args:
        world: The grid world.
        iterations: At most this many policy improvements.
        episodes_per_pair: Episodes averaged per pair and iteration.
        length: Episode length; :func:`horizon` (truncation error ≤ 1e-3) when None.
        policy0: ``(S, A)`` initial policy (uniform by default).
        generator: Randomness for actions.
        stop_when_stable: Stop once an improvement leaves the policy unchanged.
    """
    if iterations < 1 or episodes_per_pair < 1:
        raise ValueError(f"need iterations >= 1 and episodes_per_pair >= 1, got "
                         f"{iterations} and {episodes_per_pair}")
    S, A = world.n_states, world.n_actions
    length = horizon(world) if length is None else length
    policy = uniform_policy(world) if policy0 is None else check_policy(world, policy0)
    pairs = torch.arange(S * A).repeat(episodes_per_pair)
    history, episodes = [], 0
    for _ in range(iterations):
        states, _, rewards = rollout(world, policy, pairs // A, length, generator, a0=pairs % A)
        G0 = discounted_returns(rewards, world.gamma)[:, 0]
        q = torch.zeros(S * A, dtype=torch.float64).index_add_(0, pairs, G0)
        q = (q / episodes_per_pair).view(S, A)  # q_k(s,a) = mean of the returns from (s,a)
        episodes += pairs.numel()
        history.append(q.clone())
        new_policy = greedy_policy(q)  # pi_{k+1}(s) = argmax_a q_k(s,a)
        stable = torch.equal(new_policy, policy)
        policy = new_policy
        if stable and stop_when_stable:
            break
    counts = torch.full((S, A), episodes // (S * A), dtype=torch.int64)
    return MCResult(q, policy, counts, episodes, episodes * length, history)


def _mc_control(world: GridWorld, episodes: int, length: int, tail: int | None, visit: str,
                batch: int, generator: torch.Generator | None, epsilon: float | None,
                alpha: float | None, alpha_decay: float = 0.0) -> MCResult:
    if visit not in ("first", "every"):
        raise ValueError(f"visit must be 'first' or 'every', got {visit!r}")
    if episodes < 1 or batch < 1:
        raise ValueError(f"need episodes >= 1 and batch >= 1, got {episodes} and {batch}")
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1] or None, got {alpha}")
    if alpha_decay < 0:
        raise ValueError(f"alpha_decay must be >= 0, got {alpha_decay}")
    tail = horizon(world) if tail is None else tail
    if not 0 <= tail < length:
        raise ValueError(f"need 0 <= tail < length, got tail={tail}, length={length}")
    S, A = world.n_states, world.n_actions
    sums = torch.zeros(S * A, dtype=torch.float64)
    counts = torch.zeros(S * A, dtype=torch.int64)
    updates = torch.zeros(S * A, dtype=torch.float64)  # batches that visited each pair
    q = torch.zeros(S, A, dtype=torch.float64)
    policy = uniform_policy(world) if epsilon is not None else greedy_policy(q)
    history, done = [], 0
    while done < episodes:
        B = min(batch, episodes - done)
        if epsilon is None:  # exploring starts: every (s, a) can start an episode
            start = torch.randint(S * A, (B,), generator=generator)
            states, actions, rewards = rollout(world, policy, start // A, length, generator,
                                               a0=start % A)
        else:
            s0 = torch.randint(S, (B,), generator=generator)
            states, actions, rewards = rollout(world, policy, s0, length, generator)
        G = discounted_returns(rewards, world.gamma)[:, : length - tail]
        pairs = (states * A + actions)[:, : length - tail]
        use = _first_visit_mask(pairs) if visit == "first" else torch.ones_like(pairs, dtype=bool)
        if alpha is None:  # sample average over every return ever collected
            sums.index_add_(0, pairs[use], G[use])
            counts.index_add_(0, pairs[use], torch.ones_like(pairs[use]))
            seen = counts > 0
            q.view(-1)[seen] = sums[seen] / counts[seen]  # q(s,a) = average(Returns(s,a))
        else:  # move towards this batch's average return: recent policies weigh more
            b_sum = torch.zeros(S * A, dtype=torch.float64).index_add_(0, pairs[use], G[use])
            b_cnt = torch.zeros(S * A, dtype=torch.int64).index_add_(
                0, pairs[use], torch.ones_like(pairs[use]))
            counts += b_cnt
            seen = b_cnt > 0
            g_bar = b_sum[seen] / b_cnt[seen]
            updates[seen] += 1
            step = alpha / updates[seen] ** alpha_decay  # alpha_n = alpha / n^decay
            q.view(-1)[seen] += step * (g_bar - q.view(-1)[seen])  # q <- q + alpha_n (G_bar - q)
        # policy improvement: greedy (exploring starts) or epsilon-greedy
        policy = greedy_policy(q) if epsilon is None else epsilon_greedy(q, epsilon)
        history.append(q.clone())
        done += B
    return MCResult(q, policy, counts.view(S, A), done, done * length, history)


def mc_exploring_starts(world: GridWorld, episodes: int = 5000, length: int = 100,
                        tail: int | None = None, visit: str = "first", batch: int = 125,
                        alpha: float | None = 1.0, alpha_decay: float = 0.0,
                        generator: torch.Generator | None = None) -> MCResult:
    """MC exploring starts: greedy policy, episodes started at random ``(s, a)`` pairs.

    After each batch of ``batch`` episodes the returns of every (first or every) visit of a
    pair among the first ``length - tail`` steps update the pair's estimate, and the policy
    becomes greedy in the new estimates.

    Args:
        world: The grid world.
        episodes: Episodes to sample in total.
        length: Steps per episode ``L``.
        tail: Final steps whose visits are not used; :func:`horizon` when None.
        visit: ``"first"`` or ``"every"``.
        batch: Episodes per policy update.
        alpha: How estimates follow new returns. None: the plain sample average of every
            return ever collected (returns of earlier, worse policies stay in it). A float
            in ``(0, 1]``: ``q <- q + alpha_n (G_bar - q)`` towards each batch's mean return
            ``G_bar`` of the pair, with ``alpha_n = alpha / n^alpha_decay`` on the pair's
            ``n``-th update (``alpha = 1``, no decay: the latest batch's mean only).
        alpha_decay: ``0`` keeps ``alpha`` constant; ``(1/2, 1]`` meets the Robbins–Monro
            conditions, averaging the noise away while forgetting early policies.
        generator: Randomness for starts and actions.
    """
    return _mc_control(world, episodes, length, tail, visit, batch, generator, epsilon=None,
                       alpha=alpha, alpha_decay=alpha_decay)


def mc_epsilon_greedy(world: GridWorld, epsilon: float = 0.1, episodes: int = 2000,
                      length: int = 200, tail: int | None = None, visit: str = "every",
                      batch: int = 100, alpha: float | None = 1.0, alpha_decay: float = 0.0,
                      generator: torch.Generator | None = None) -> MCResult:
    """MC epsilon-greedy: no exploring starts; the behaviour policy is epsilon-greedy.

    Episodes start at uniformly random states. ``result.policy`` is the final
    epsilon-greedy policy; ``greedy_policy(result.q)`` is its greedy part.

    Args:
        world: The grid world.
        epsilon: Exploration rate in ``[0, 1]``.
        episodes: Episodes to sample in total.
        length: Steps per episode ``L``.
        tail: Final steps whose visits are not used; :func:`horizon` when None.
        visit: ``"every"`` or ``"first"``.
        batch: Episodes per policy update.
        alpha: How estimates follow new returns. None: the plain sample average of every
            return ever collected (returns of earlier, worse policies stay in it). A float
            in ``(0, 1]``: ``q <- q + alpha_n (G_bar - q)`` towards each batch's mean return
            ``G_bar`` of the pair, with ``alpha_n = alpha / n^alpha_decay`` on the pair's
            ``n``-th update (``alpha = 1``, no decay: the latest batch's mean only).
        alpha_decay: ``0`` keeps ``alpha`` constant; ``(1/2, 1]`` meets the Robbins–Monro
            conditions, averaging the noise away while forgetting early policies.
        generator: Randomness for starts and actions.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    return _mc_control(world, episodes, length, tail, visit, batch, generator, epsilon=epsilon,
                       alpha=alpha, alpha_decay=alpha_decay)
