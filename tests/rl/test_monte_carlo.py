"""Monte Carlo control: returns, rollouts, visit masks, and parity with value iteration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlatlas.rl import dynamic_programming as dp
from mlatlas.rl import monte_carlo as mc
from mlatlas.rl.gridworld import GridWorld


@pytest.fixture(scope="module")
def world():
    return GridWorld.example()


@pytest.fixture(scope="module")
def optimal_sets(world):
    return dp.optimal_action_sets(dp.value_iteration(world).q)


def _n_optimal(q, sets):
    return int(sets[torch.arange(q.shape[0]), q.argmax(-1)].sum())


def test_discounted_returns_match_explicit_sums():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 11))
    expected = np.array([[sum(0.8 ** (k - t) * r[b, k] for k in range(t, 11)) for t in range(11)]
                         for b in range(3)])
    torch.testing.assert_close(mc.discounted_returns(torch.from_numpy(r), 0.8),
                               torch.from_numpy(expected), atol=1e-12, rtol=0)


def test_rollout_follows_the_model_and_the_policy(world):
    g = torch.Generator().manual_seed(0)
    pi = dp.uniform_policy(world)
    s0 = torch.arange(world.n_states)
    a0 = torch.arange(world.n_states) % 5
    states, actions, rewards = mc.rollout(world, pi, s0, 13, g, a0=a0)
    assert states.shape == actions.shape == rewards.shape == (25, 13)
    assert torch.equal(states[:, 0], s0) and torch.equal(actions[:, 0], a0)
    assert torch.equal(states[:, 1:], world.next_state[states[:, :-1], actions[:, :-1]])
    assert torch.equal(rewards, world.R[states, actions])
    greedy = dp.greedy_policy(torch.randn(25, 5, generator=g))
    _, acts, _ = mc.rollout(world, greedy, s0, 5, g)
    st, _, _ = mc.rollout(world, greedy, s0, 5, g)
    assert torch.equal(acts, greedy.argmax(-1)[st])  # deterministic policy: argmax actions


def test_rollout_actions_follow_a_stochastic_policy():
    # Inverse-CDF sampling vs the policy itself: a non-uniform policy with zero entries on a
    # 3x4 world (12 states), 3001 draws per state (one step each, no power of two).
    world = GridWorld(3, 4, [(1, 1)], (2, 2), gamma=0.8)
    g = torch.Generator().manual_seed(1)
    pi = torch.rand(12, 5, generator=g, dtype=torch.float64) ** 2
    pi[torch.arange(12), torch.arange(12) % 5] = 0.0  # one impossible action per state
    pi[3] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    pi = pi / pi.sum(-1, keepdim=True)
    n = 3001
    s0 = torch.arange(12).repeat_interleave(n)
    _, actions, _ = mc.rollout(world, pi, s0, 1, g)
    freq = torch.zeros(12, 5, dtype=torch.float64).index_put_(
        (s0, actions[:, 0]), torch.ones(12 * n, dtype=torch.float64), accumulate=True) / n
    assert bool((freq[pi == 0] == 0).all())  # an impossible action is never drawn
    torch.testing.assert_close(freq, pi, atol=0.03, rtol=0)  # ~4 sigma at n = 3001


def test_first_visit_mask_matches_a_python_loop():
    g = torch.Generator().manual_seed(3)
    pairs = torch.randint(0, 6, (4, 9), generator=g)
    expected = torch.zeros(4, 9, dtype=torch.bool)
    for b in range(4):
        seen = set()
        for t in range(9):
            if int(pairs[b, t]) not in seen:
                expected[b, t] = True
                seen.add(int(pairs[b, t]))
    assert torch.equal(mc._first_visit_mask(pairs), expected)


def test_mc_basic_returns_equal_exact_action_values_for_a_deterministic_policy(world):
    g = torch.Generator().manual_seed(0)
    policy0 = dp.greedy_policy(torch.randn(25, 5, generator=g, dtype=torch.float64))
    res = mc.mc_basic(world, iterations=1, policy0=policy0, generator=g)
    exact = dp.action_values(world, dp.evaluate_policy(world, policy0))
    torch.testing.assert_close(res.q_history[0], exact, atol=1e-3, rtol=0)  # cut at horizon()


def test_epsilon_one_estimates_the_uniform_policy(world):
    # epsilon = 1 keeps the policy uniform: the every-visit averages estimate q_uniform
    g = torch.Generator().manual_seed(0)
    res = mc.mc_epsilon_greedy(world, 1.0, episodes=2000, length=120, tail=60, batch=1000,
                               alpha=None, generator=g)
    exact = dp.action_values(world, dp.evaluate_policy(world, dp.uniform_policy(world)))
    err = (res.q - exact).abs()
    assert float(err.mean()) < 0.1 and float(err.max()) < 0.4  # sampling error only


@pytest.mark.parametrize("method", ["basic", "first", "every"])
def test_mc_control_finds_the_optimal_policy(world, optimal_sets, method):
    g = torch.Generator().manual_seed(0)
    if method == "basic":
        res = mc.mc_basic(world, generator=g)
    else:
        res = mc.mc_exploring_starts(world, episodes=1500, length=120, visit=method,
                                     generator=g)
    assert _n_optimal(res.q, optimal_sets) == world.n_states
    v_star = dp.value_iteration(world).values
    torch.testing.assert_close(dp.evaluate_policy(world, res.policy), v_star, atol=1e-8, rtol=0)


def test_epsilon_greedy_policy_shape_and_probabilities():
    q = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, -1.0]])
    pi = mc.epsilon_greedy(q, 0.3)
    expected = torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(pi, expected, atol=1e-12, rtol=0)
    world = GridWorld(2, 3, [(0, 1)], (1, 2))
    res = mc.mc_epsilon_greedy(world, 0.2, episodes=40, length=30, tail=10, batch=20,
                               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.policy, mc.epsilon_greedy(res.q, 0.2), atol=0, rtol=0)
    assert res.steps == 40 * 30 and len(res.q_history) == 2
    assert int(res.counts.sum()) == 40 * (30 - 10)  # every visit of the first L - H steps
    first = mc.mc_exploring_starts(world, episodes=40, length=30, tail=10, batch=20,
                                   generator=torch.Generator().manual_seed(0))
    assert int(first.counts.sum()) < 40 * (30 - 10)  # first visits only
    assert bool((first.counts <= 40).all())  # at most once per episode and pair


def test_bad_input(world):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="visit must be 'first' or 'every'"):
        mc.mc_exploring_starts(world, episodes=5, visit="last", generator=g)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got 1.5"):
        mc.mc_epsilon_greedy(world, 1.5)
    with pytest.raises(ValueError, match="need 0 <= tail < length, got tail=50, length=50"):
        mc.mc_exploring_starts(world, episodes=5, length=50, tail=50)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\] or None, got 0"):
        mc.mc_exploring_starts(world, episodes=5, alpha=0)
    with pytest.raises(ValueError, match="length must be >= 1"):
        mc.rollout(world, dp.uniform_policy(world), torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="policy rows must sum to 1"):
        mc.mc_basic(world, policy0=torch.full((25, 5), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"s0 must have shape \(B,\), got \(2, 3\)"):
        mc.rollout(world, dp.uniform_policy(world), torch.zeros(2, 3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="need iterations >= 1 and episodes_per_pair >= 1, "
                       "got 0 and 1"):
        mc.mc_basic(world, iterations=0)
    with pytest.raises(ValueError, match="need episodes >= 1 and batch >= 1, got 5 and 0"):
        mc.mc_exploring_starts(world, episodes=5, batch=0)
    with pytest.raises(ValueError, match="alpha_decay must be >= 0, got -1"):
        mc.mc_exploring_starts(world, episodes=5, alpha_decay=-1)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got -0.1"):
        mc.epsilon_greedy(torch.zeros(3, 5), -0.1)


def test_rollout_rejects_a_policy_that_is_not_a_probability_table():
    w = GridWorld.example()
    s0 = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="policy rows must sum to 1; row 0 sums to 1.5"):
        mc.rollout(w, torch.full((w.n_states, w.n_actions), 0.3, dtype=torch.float64), s0, 3)
    with pytest.raises(ValueError, match=r"policy must have shape \(S, A\)"):
        mc.rollout(w, torch.full((3, w.n_actions), 0.2, dtype=torch.float64), s0, 3)


def test_rollout_accepts_a_float32_softmax_table():
    w = GridWorld.example()
    table = torch.softmax(torch.randn(w.n_states, w.n_actions, generator=torch.Generator()
                                      .manual_seed(0)), -1).double()  # rows off 1 by ~1e-7
    states, _, _ = mc.rollout(w, table, torch.zeros(2, dtype=torch.int64), 4)
    assert states.shape == (2, 4)
