"""Policy gradient: distributions vs torch.distributions, the theorem vs autograd, REINFORCE's
estimate vs the exact gradient, CartPole rollouts and checkpoint resume."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mlatlas.rl import dynamic_programming as dp
from mlatlas.rl import policies
from mlatlas.rl import policy_gradient as pg
from mlatlas.rl.gridworld import GridWorld
from mlatlas.rl.monte_carlo import rollout


@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 6)])
def test_categorical_log_prob_and_entropy_match_torch_distributions(shape):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=g)).requires_grad_()
    actions = torch.randint(shape[-1], shape[:-1], generator=g)
    ours = policies.categorical_log_prob(logits, actions).sum() + policies.categorical_entropy(logits).sum()
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref_dist = torch.distributions.Categorical(logits=logits)
    ref = ref_dist.log_prob(actions).sum() + ref_dist.entropy().sum()
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(policies.categorical_log_prob(logits, actions),
                               ref_dist.log_prob(actions), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(policies.categorical_entropy(logits), ref_dist.entropy(), atol=1e-6,
                               rtol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-6)


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(7, 3, generator=g).requires_grad_()
    log_std = (0.5 * torch.randn(3, generator=g)).requires_grad_()
    actions = torch.randn(7, 3, generator=g)
    lp = policies.gaussian_log_prob(mean, log_std, actions)
    ent = policies.gaussian_entropy(log_std)
    grads = torch.autograd.grad(lp.sum() + 2 * ent, (mean, log_std))
    ref = torch.distributions.Independent(torch.distributions.Normal(mean, log_std.exp()), 1)
    ref_lp, ref_ent = ref.log_prob(actions), ref.entropy()
    ref_grads = torch.autograd.grad(ref_lp.sum() + 2 * ref_ent[0], (mean, log_std))
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ent.expand(7), ref_ent, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)


def test_gaussian_with_per_example_log_std_matches_torch_distributions():
    # log_std of the full (..., D) shape (the docstring's other form), batch (5, 3), D = 3
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(5, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    log_std = (0.7 * torch.randn(5, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    actions = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    lp, ent = policies.gaussian_log_prob(mean, log_std, actions), policies.gaussian_entropy(log_std)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((w * (lp + 0.5 * ent)).sum(), (mean, log_std))
    ref = torch.distributions.Independent(torch.distributions.Normal(mean, log_std.exp()), 1)
    ref_grads = torch.autograd.grad((w * (ref.log_prob(actions) + 0.5 * ref.entropy())).sum(),
                                    (mean, log_std))
    assert lp.shape == ent.shape == (5, 3)
    torch.testing.assert_close(lp, ref.log_prob(actions), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ent, ref.entropy(), atol=1e-12, rtol=1e-12)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_policies_sample_and_score_consistently():
    torch.manual_seed(0)
    obs = torch.randn(5, 4)
    cat = policies.CategoricalMLPPolicy(4, 3, hidden=(10,))
    ref = torch.distributions.Categorical(logits=cat.logits(obs))
    a = cat.sample(obs, torch.Generator().manual_seed(0))
    assert a.shape == (5,) and a.dtype == torch.int64
    assert torch.equal(a, cat.sample(obs, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(cat.log_prob(obs, a), ref.log_prob(a), atol=1e-6, rtol=1e-6)
    gauss = policies.GaussianMLPPolicy(4, 2, hidden=(10, 6), log_std_init=-0.5)
    act = gauss.sample(obs, torch.Generator().manual_seed(0))
    assert act.shape == (5, 2)
    ref = torch.distributions.Normal(gauss.mean(obs), gauss.log_std.exp())
    torch.testing.assert_close(gauss.log_prob(obs, act), ref.log_prob(act).sum(-1), atol=1e-5,
                               rtol=1e-6)
    torch.testing.assert_close(gauss.entropy(obs), ref.entropy().sum(-1), atol=1e-6, rtol=1e-6)
    tab = policies.TabularSoftmaxPolicy(6, 5)
    torch.testing.assert_close(tab.table(), torch.full((6, 5), 0.2))


def _world_and_theta():
    world = GridWorld(3, 4, [(1, 1)], (2, 2), gamma=0.8)
    theta = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rho0 = torch.full((12,), 1 / 12, dtype=torch.float64)
    return world, theta, rho0


def test_policy_gradient_theorem_matches_autograd_through_the_linear_solve():
    world, theta, rho0 = _world_and_theta()
    J, grad = pg.exact_policy_gradient(world.P, world.R, world.gamma, theta, rho0)
    th = theta.clone().requires_grad_()
    pi = torch.softmax(th, -1)
    P_pi = torch.einsum("sa,sat->st", pi, world.P)
    v = torch.linalg.solve(torch.eye(12, dtype=torch.float64) - world.gamma * P_pi,
                           (pi * world.R).sum(-1))
    J_ref = rho0 @ v
    J_ref.backward()
    torch.testing.assert_close(J, J_ref.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, th.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("with_baseline", [True, False])
def test_reinforce_estimate_is_unbiased(with_baseline):
    world, theta, rho0 = _world_and_theta()
    _, exact = pg.exact_policy_gradient(world.P, world.R, world.gamma, theta, rho0)
    g = torch.Generator().manual_seed(0)
    policy = policies.TabularSoftmaxPolicy(12, 5).double()
    policy.theta.data.copy_(theta)
    B, T = 12_000, 50  # 0.8^50 ~ 1e-5: truncation is negligible
    states, actions, rewards = rollout(world, policy.table(), torch.randint(12, (B,), generator=g),
                                       T, g)
    G = pg.reward_to_go(rewards, world.gamma).reshape(-1)
    disc = (world.gamma ** torch.arange(T, dtype=torch.float64)).expand(B, T).reshape(-1)
    s = states.reshape(-1)
    v_pi = dp.evaluate_policy(world, policy.table())
    baseline = v_pi[s] if with_baseline else None
    loss = pg.reinforce_loss(policy.log_prob(s, actions.reshape(-1)), G, baseline, disc,
                             n_episodes=B)
    loss.backward()
    estimate = -policy.theta.grad
    # Monte Carlo error only: the baseline shrinks it; both estimate the same exact gradient.
    atol = 0.02 if with_baseline else 0.06
    torch.testing.assert_close(estimate, exact, atol=atol, rtol=0)
    cos = torch.nn.functional.cosine_similarity(estimate.flatten(), exact.flatten(), dim=0)
    assert float(cos) > (0.99 if with_baseline else 0.95)


def test_reward_to_go_and_loss_gradient_by_hand():
    r = torch.tensor([1.0, 0.0, 2.0, -1.0])
    torch.testing.assert_close(pg.reward_to_go(r, 0.5),
                               torch.tensor([1.375, 0.75, 1.5, -1.0]), atol=1e-7, rtol=0)
    lp = torch.tensor([-0.1, -0.2, -0.3], requires_grad=True)
    G, b, d = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, .5, .25])
    pg.reinforce_loss(lp, G, b, d, n_episodes=2).backward()
    torch.testing.assert_close(lp.grad, -(G - b) * d / 2, atol=1e-7, rtol=0)
    # normalize=True: advantages standardised with the unbiased std, then discounted; the
    # default divisor is the number of steps N = 3
    lp.grad = None
    adv = torch.tensor([2.0, 0.0, 1.0])  # G - b; mean 1, unbiased std 1
    pg.reinforce_loss(lp, G, b, d, normalize=True).backward()
    torch.testing.assert_close(lp.grad, -((adv - 1.0) / (1.0 + 1e-8)) * d / 3, atol=1e-7, rtol=0)
    # the baseline's gradient is stopped: the loss does not reach it
    b_param = b.clone().requires_grad_()
    pg.reinforce_loss(lp, G, b_param).backward()
    assert b_param.grad is None


def test_gaussian_reinforce_learns_a_continuous_bandit():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    policy = policies.GaussianMLPPolicy(1, 1, hidden=(8,), log_std_init=0.0)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    obs = torch.zeros(64, 1)
    for _ in range(150):
        a = policy.sample(obs, g)
        reward = -(a[:, 0] - 2.0) ** 2  # best action 2
        loss = pg.reinforce_loss(policy.log_prob(obs, a), reward, reward.mean().expand(64),
                                 normalize=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(policy.mean(obs[:1]).detach()) - 2.0) < 0.2
    assert float(policy.log_std.detach().exp()) < 0.5  # the policy sharpens around the optimum


def test_collect_episodes_on_cartpole(reference):
    gym = reference("gymnasium")
    envs = [gym.make("CartPole-v1") for _ in range(3)]
    policy = policies.CategoricalMLPPolicy(4, 2, hidden=(8,))
    b1 = pg.collect_episodes(envs, policy, 0.9, seeds=[1, 2, 3],
                             generator=torch.Generator().manual_seed(0))
    b2 = pg.collect_episodes(envs, policy, 0.9, seeds=[1, 2, 3],
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(b1.obs, b2.obs) and b1.episode_returns == b2.episode_returns
    assert b1.obs.shape == (b1.steps, 4) and b1.actions.shape == (b1.steps,)
    assert sum(b1.episode_lengths) == b1.steps
    assert b1.episode_returns == [float(n) for n in b1.episode_lengths]  # reward 1 per step
    n0 = b1.episode_lengths[0]
    torch.testing.assert_close(b1.returns[0], torch.tensor((1 - 0.9 ** n0) / (1 - 0.9)),
                               atol=1e-5, rtol=0)
    assert float(b1.discounts[n0]) == 1.0  # the second episode starts over
    value = policies.ValueMLP(4, hidden=(8,))
    opt = torch.optim.Adam([*policy.parameters(), *value.parameters()], lr=1e-2)
    stats = pg.reinforce_update(policy, value, opt, b1)
    assert set(stats) == {"policy_loss", "value_loss", "entropy"}


def test_cartpole_resume_equals_uninterrupted(tmp_path, reference):
    reference("gymnasium")
    from safetensors.torch import load_file

    from mlatlas.experiments.rl import policy_gradient as exp

    cfg = replace(exp.Config(), grid_iterations=0, cartpole_steps=400, n_envs=2, hidden=8,
                  checkpoint_every=0)
    exp.run(cfg, tmp_path / "full")
    exp.run(replace(cfg, cartpole_steps=200), tmp_path / "part")
    resumed = exp.run(replace(cfg, resume=str(tmp_path / "part" / "cartpole_policy.safetensors")),
                      tmp_path / "resumed")
    a = load_file(tmp_path / "full" / "cartpole_policy.safetensors")
    b = load_file(tmp_path / "resumed" / "cartpole_policy.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["cartpole_env_steps"] >= 400


def test_bad_input():
    logits = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="actions must be an integer tensor"):
        policies.categorical_log_prob(logits, torch.zeros(4))
    with pytest.raises(ValueError, match=r"actions must have shape \(4,\)"):
        policies.categorical_log_prob(logits, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="actions must have the shape of mean"):
        policies.gaussian_log_prob(torch.zeros(4, 2), torch.zeros(2), torch.zeros(4, 3))
    with pytest.raises(TypeError, match="obs must be int64 state indices"):
        policies.TabularSoftmaxPolicy(3, 2).logits(torch.zeros(2))
    with pytest.raises(ValueError, match=r"log_probs and returns must both have shape \(N,\)"):
        pg.reinforce_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        pg.reward_to_go(torch.zeros(3), 1.5)
    with pytest.raises(ValueError, match="sizes needs at least input and output sizes"):
        policies.mlp([4])
    with pytest.raises(ValueError, match=r"log_probs and returns must both have shape \(N,\), "
                       r"got \(3, 1\) and \(3, 1\)"):
        pg.reinforce_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"actions must have the shape of mean \(4, 2\), got \(4,\)"):
        policies.GaussianMLPPolicy(3, 2, hidden=(5,)).log_prob(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(TypeError, match="actions must be an integer tensor, got dtype "
                       "torch.float32"):
        policies.CategoricalMLPPolicy(3, 2, hidden=(5,)).log_prob(torch.zeros(4, 3), torch.zeros(4))


def test_reinforce_loss_rejects_baseline_or_discounts_that_would_broadcast():
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    G = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"baseline must have the shape of returns \(4,\), got \(4, 1\)"):
        pg.reinforce_loss(lp, G, baseline=torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"discounts must have the shape of returns \(4,\), got \(3,\)"):
        pg.reinforce_loss(lp, G, discounts=torch.ones(3))
