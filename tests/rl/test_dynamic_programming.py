"""Bellman equation and control: parity with an independent numpy linear solve and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mlatlas.rl import dynamic_programming as dp
from mlatlas.rl.gridworld import GridWorld, GridWorldEnv

WORLDS = {
    "zhao-5x5": lambda: GridWorld.example(),
    "zhao-5x5-harsh": lambda: GridWorld.example(r_forbidden=-10.0, gamma=0.95),
    "3x4": lambda: GridWorld(3, 4, [(1, 1), (0, 2)], (2, 3), r_other=-0.1, gamma=0.7),
    "1x7": lambda: GridWorld(1, 7, [(0, 3)], (0, 6), r_forbidden=-2.0, gamma=0.5),
}


def _numpy_reference_values(world: GridWorld, policy: np.ndarray) -> np.ndarray:
    """Model read through the gymnasium Env API, Bellman equation solved by numpy."""
    env = GridWorldEnv(world)
    S, A = world.n_states, world.n_actions
    P_pi, r_pi = np.zeros((S, S)), np.zeros(S)
    for s, a in itertools.product(range(S), range(A)):
        env.reset(options={"state": s})
        nxt, r, *_ = env.step(a)
        P_pi[s, nxt] += policy[s, a]
        r_pi[s] += policy[s, a] * r
    return np.linalg.solve(np.eye(S) - world.gamma * P_pi, r_pi)


@pytest.mark.parametrize("name", list(WORLDS))
def test_policy_evaluation_matches_numpy_linear_solve(name):
    world = WORLDS[name]()
    rng = np.random.default_rng(0)
    policies = [dp.uniform_policy(world).numpy(), rng.dirichlet(np.ones(5), world.n_states)]
    det = np.zeros((world.n_states, 5))
    det[np.arange(world.n_states), rng.integers(0, 5, world.n_states)] = 1.0
    policies.append(det)
    for pi in policies:
        ref = torch.from_numpy(_numpy_reference_values(world, pi))
        closed = dp.evaluate_policy(world, torch.from_numpy(pi))
        iterative = dp.evaluate_policy(world, torch.from_numpy(pi), method="iterative")
        torch.testing.assert_close(closed, ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(iterative, ref, atol=1e-8, rtol=0)  # the claim's tolerance


def test_zhao_two_by_two_example_by_hand():
    # Zhao ch. 2: s1 (0,0) down, s2 (0,1) down, s3 (1,0) right, s4 (1,1) stay; gamma = 0.9.
    # v4 = 1/(1 - 0.9) = 10, v3 = 1 + 0.9 v4 = 10, v2 = 1 + 0.9 v4 = 10, v1 = 0 + 0.9 v3 = 9.
    w = GridWorld(2, 2, forbidden=[(0, 1)], target=(1, 1))
    pi = torch.zeros(4, 5, dtype=torch.float64)
    pi[0, 2] = pi[1, 2] = pi[2, 1] = pi[3, 4] = 1.0
    expected = torch.tensor([9.0, 10.0, 10.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(dp.evaluate_policy(w, pi), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(dp.evaluate_policy(w, pi, "iterative"), expected, atol=1e-9, rtol=0)


def test_value_iteration_equals_brute_force_over_all_deterministic_policies():
    w = GridWorld(2, 3, forbidden=[(0, 1)], target=(1, 2), r_other=-0.05, gamma=0.8)
    S, A = w.n_states, w.n_actions
    acts = torch.tensor(list(itertools.product(range(A), repeat=S)))  # (5^6, 6)
    P_pi = w.P[torch.arange(S), acts]  # (N, S, S)
    r_pi = w.R[torch.arange(S), acts]  # (N, S)
    eye = torch.eye(S, dtype=torch.float64)
    v_all = torch.linalg.solve(eye - w.gamma * P_pi, r_pi.unsqueeze(-1)).squeeze(-1)
    v_best = v_all.max(0).values  # v* is the elementwise max over deterministic policies
    for res in (dp.value_iteration(w), dp.policy_iteration(w),
                dp.truncated_policy_iteration(w, 3)):
        torch.testing.assert_close(res.values, v_best, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", list(WORLDS))
def test_three_control_algorithms_agree(name):
    world = WORLDS[name]()
    results = [dp.value_iteration(world), dp.policy_iteration(world),
               dp.truncated_policy_iteration(world, 4), dp.truncated_policy_iteration(world, math.inf)]
    ref = results[1]
    sets = dp.optimal_action_sets(ref.q)
    idx = torch.arange(world.n_states)
    for res in results:
        torch.testing.assert_close(res.values, ref.values, atol=1e-8, rtol=0)
        assert torch.equal(dp.optimal_action_sets(res.q), sets)  # same optimal action sets
        assert bool(sets[idx, res.policy.argmax(-1)].all())  # greedy action in the set
        # Bellman optimality: v* = max_a q*(s, a)
        torch.testing.assert_close(res.values, res.q.max(-1).values, atol=1e-8, rtol=0)
        torch.testing.assert_close(dp.evaluate_policy(world, res.policy), ref.values, atol=1e-8,
                                   rtol=0)


def _numpy_value_iteration(world: GridWorld, tol: float) -> tuple[np.ndarray, list[float]]:
    """v <- max_a (R + gamma P v) from v = 0 in numpy, stopping when the sup-norm step <= tol."""
    P, R = world.P.numpy(), world.R.numpy()
    v, history = np.zeros(world.n_states), []
    while True:
        v_next = (R + world.gamma * P @ v).max(-1)
        history.append(float(np.abs(v_next - v).max()))
        v = v_next
        if history[-1] <= tol:
            return v, history


def test_truncated_pi_special_cases_and_history():
    w = GridWorld.example()
    vi, tpi1 = dp.value_iteration(w), dp.truncated_policy_iteration(w, 1)
    # value_iteration *is* truncated PI with j = 1 in the code, so comparing the two alone
    # cannot fail: check both against an independent numpy value iteration.
    v_ref, hist_ref = _numpy_value_iteration(w, 1e-10)
    for res in (vi, tpi1):
        assert res.iterations == len(hist_ref)
        torch.testing.assert_close(res.values, torch.from_numpy(v_ref), atol=1e-12, rtol=0)
        np.testing.assert_allclose(res.history, hist_ref, atol=1e-12, rtol=0)
    pi = dp.policy_iteration(w)
    assert pi.iterations < dp.truncated_policy_iteration(w, 5).iterations < vi.iterations
    assert vi.history[-1] <= 1e-10 and len(vi.history) == vi.iterations


def test_ties_are_reported_as_action_sets():
    w = GridWorld.example()
    sets = dp.optimal_action_sets(dp.policy_iteration(w).q)
    # (0, 4): going left or down reaches the target in the same number of steps
    assert sets[w.state((0, 4))].tolist() == [False, False, True, True, False]
    assert sets[w.target_state].tolist() == [False, False, False, False, True]


def test_bad_policies_and_arguments():
    w = GridWorld.example()
    pi = dp.uniform_policy(w)
    bad = pi.clone()
    bad[3, 0] += 0.2
    with pytest.raises(ValueError, match="policy rows must sum to 1; row 3 sums to 1.2"):
        dp.evaluate_policy(w, bad)
    with pytest.raises(ValueError, match=r"policy must have shape \(S, A\) = \(25, 5\), got \(25, 4\)"):
        dp.evaluate_policy(w, pi[:, :4])
    neg = pi.clone()
    neg[0, 0], neg[0, 1] = -0.1, 0.5
    with pytest.raises(ValueError, match="negative probabilities"):
        dp.evaluate_policy(w, neg)
    with pytest.raises(TypeError, match="floating-point"):
        dp.evaluate_policy(w, torch.ones(25, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="method must be 'closed_form' or 'iterative'"):
        dp.evaluate_policy(w, pi, method="lstsq")
    with pytest.raises(ValueError, match="j must be an int >= 1"):
        dp.truncated_policy_iteration(w, 0)
    with pytest.raises(ValueError, match=r"v must have shape \(25,\)"):
        dp.action_values(w, torch.zeros(24))
    with pytest.raises(ValueError, match="need tol > 0 and max_iter >= 1, got tol=0"):
        dp.evaluate_policy(w, pi, method="iterative", tol=0)
    with pytest.raises(ValueError, match="max_iter=0"):
        dp.evaluate_policy(w, pi, method="iterative", max_iter=0)
    with pytest.raises(ValueError, match=r"j must be an int >= 1 or math.inf, got 2.5"):
        dp.truncated_policy_iteration(w, 2.5)
    with pytest.raises(ValueError, match="got True"):
        dp.truncated_policy_iteration(w, True)
    with pytest.raises(ValueError, match=r"q must have shape \(S, A\), got \(25,\)"):
        dp.greedy_policy(torch.zeros(25))
    with pytest.raises(ValueError, match="policy rows must sum to 1"):
        dp.policy_iteration(w, policy0=torch.full((25, 5), 0.3, dtype=torch.float64))


def test_iterative_evaluation_from_any_start_reaches_the_closed_form():
    # 3x4 world (12 states, not a power of two), stochastic policy, far-off start values
    w = WORLDS["3x4"]()
    pi = torch.from_numpy(np.random.default_rng(5).dirichlet(np.ones(5), w.n_states))
    ref = torch.from_numpy(_numpy_reference_values(w, pi.numpy()))
    v0 = torch.linspace(-50.0, 80.0, w.n_states, dtype=torch.float64)
    torch.testing.assert_close(dp.evaluate_policy(w, pi, "iterative", v0=v0), ref, atol=1e-9,
                               rtol=0)
    # a start value does not change the fixed point of value iteration either
    torch.testing.assert_close(dp.value_iteration(w, v0=v0).values,
                               dp.policy_iteration(w).values, atol=1e-8, rtol=0)


def test_policy_with_nan_or_inf_is_rejected():
    w = GridWorld.example()
    for bad in (float("nan"), float("inf")):
        pi = dp.uniform_policy(w)
        pi[3, 1] = bad
        with pytest.raises(ValueError, match="policy must be finite; row 3"):
            dp.evaluate_policy(w, pi)
