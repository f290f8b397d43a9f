"""TRPO: conjugate gradient vs a direct solve (and sb3-contrib's solver), Fisher-vector products
vs the explicit Fisher matrix built with autograd, the step vs its closed form, the KL bound,
GAE of the rollout collector vs stable-baselines3's RolloutBuffer, and bad input."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch
from torch.func import functional_call

from mlatlas.rl import policies, trpo
from mlatlas.rl.rollout import RolloutCollector

DT = torch.float64  # the matrix checks run in float64: tolerances 1e-10


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    return m @ m.T + 0.5 * torch.eye(n, dtype=DT)


# ------------------------------------------------------------------ conjugate gradient
@pytest.mark.parametrize("n", [1, 13, 37])
def test_conjugate_gradient_matches_direct_solve(n):
    A = _spd(n, n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DT)
    x = trpo.conjugate_gradient(lambda v: A @ v, b, iters=4 * n, tol=1e-24)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-9, rtol=1e-9)


def test_conjugate_gradient_error_falls_each_iteration_and_matches_sb3(reference):
    reference("sb3_contrib")
    from sb3_contrib.common.utils import conjugate_gradient_solver

    A, n = _spd(23, 2), 23
    b = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=DT)
    exact = torch.linalg.solve(A, b)
    errs = []
    for k in range(1, n + 1):
        e = trpo.conjugate_gradient(lambda v: A @ v, b, iters=k, tol=0.0) - exact
        errs.append(float(e @ A @ e))  # CG minimises the A-norm error over a growing space
    assert all(b2 <= b1 * (1 + 1e-9) for b1, b2 in zip(errs, errs[1:]))
    torch.manual_seed(0)  # sb3-contrib starts from 1e-4 N(0, I)
    theirs = conjugate_gradient_solver(lambda v: A @ v, b, max_iter=4 * n, residual_tol=1e-24)
    ours = trpo.conjugate_gradient(lambda v: A @ v, b, iters=4 * n, tol=1e-24)
    torch.testing.assert_close(ours, theirs, atol=1e-8, rtol=1e-8)


def test_conjugate_gradient_zero_rhs_and_bad_input():
    A = _spd(5, 0)
    assert torch.equal(trpo.conjugate_gradient(lambda v: A @ v, torch.zeros(5, dtype=DT)),
                       torch.zeros(5, dtype=DT))
    with pytest.raises(ValueError, match=r"b must be a vector \(n,\), got shape \(5, 1\)"):
        trpo.conjugate_gradient(lambda v: A @ v, torch.ones(5, 1, dtype=DT))
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        trpo.conjugate_gradient(lambda v: A @ v, torch.ones(5, dtype=DT), iters=0)
    with pytest.raises(ValueError, match="tol must be >= 0, got -1"):
        trpo.conjugate_gradient(lambda v: A @ v, torch.ones(5, dtype=DT), tol=-1)


# ------------------------------------------------------------------ Fisher-vector products
def _flat_fn(policy, fn):
    """``theta (n,) -> fn(policy with parameters theta)`` for autograd's jacobian/hessian."""
    names = [k for k, _ in policy.named_parameters()]
    shapes = [p.shape for p in policy.parameters()]

    def wrapped(theta):
        params, i = {}, 0
        for k, s in zip(names, shapes):
            params[k] = theta[i:i + math.prod(s)].view(s)
            i += math.prod(s)
        return fn(params)

    return wrapped


def _fvp_matrix(policy, obs, damping):
    fvp = trpo.fisher_vector_product(policy, obs, damping)
    n = sum(p.numel() for p in policy.parameters())
    return torch.stack([fvp(e) for e in torch.eye(n, dtype=DT)], 1)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_fvp_equals_explicit_fisher_categorical(damping):
    torch.manual_seed(0)
    policy = policies.CategoricalMLPPolicy(3, 4, (5,)).double()
    obs = torch.randn(7, 3, dtype=DT)
    theta = torch.nn.utils.parameters_to_vector(policy.parameters()).detach()

    def logits(p):  # p: "net.0.weight" ... -> the policy's logits with those parameters
        return functional_call(policy.net, {k[4:]: v for k, v in p.items()}, (obs,))

    log_pi = _flat_fn(policy, lambda p: torch.log_softmax(logits(p), -1))
    J = torch.autograd.functional.jacobian(log_pi, theta)  # (B, A, n) = grad log pi(a|s)
    pi = log_pi(theta).exp()
    # F = mean_s sum_a pi(a|s) grad log pi(a|s) grad log pi(a|s)^T   (the Fisher's definition)
    fisher = torch.einsum("ba,bai,baj->ij", pi, J, J) / obs.shape[0]
    n = theta.numel()
    torch.testing.assert_close(_fvp_matrix(policy, obs, damping),
                               fisher + damping * torch.eye(n, dtype=DT), atol=1e-10, rtol=1e-10)
    # ... and the Hessian of the mean KL (torch.distributions), the route TRPO's paper takes
    old = torch.distributions.Categorical(logits=policy.logits(obs).detach())
    kl = _flat_fn(policy, lambda p: torch.distributions.kl_divergence(
        old, torch.distributions.Categorical(logits=logits(p))).mean())
    torch.testing.assert_close(torch.autograd.functional.hessian(kl, theta), fisher,
                               atol=1e-10, rtol=1e-10)


def test_fvp_equals_explicit_fisher_gaussian():
    torch.manual_seed(1)
    policy = policies.GaussianMLPPolicy(3, 2, (5,), log_std_init=-0.3).double()
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.3, 0.4]))
    obs = torch.randn(9, 3, dtype=DT)
    theta = torch.nn.utils.parameters_to_vector(policy.parameters()).detach()
    names = [k for k, _ in policy.named_parameters()]
    assert names[0] == "log_std"  # the flat vector: log_std first, then the mean network

    def mean_and_log_std(p):
        mu = functional_call(policy.mean_net, {k[9:]: v for k, v in p.items() if k != "log_std"},
                             (obs,))
        return mu, p["log_std"]

    Jmu = torch.autograd.functional.jacobian(_flat_fn(policy, lambda p: mean_and_log_std(p)[0]),
                                             theta)  # (B, D, n)
    Jls = torch.autograd.functional.jacobian(_flat_fn(policy, lambda p: mean_and_log_std(p)[1]),
                                             theta)  # (D, n)
    inv_var = torch.exp(-2 * policy.log_std.detach())
    # Gaussian Fisher in (mu, log sigma): diag(1/sigma^2) and 2 I, chained through the Jacobians
    fisher = torch.einsum("bdi,d,bdj->ij", Jmu, inv_var, Jmu) / obs.shape[0] + 2 * Jls.T @ Jls
    torch.testing.assert_close(_fvp_matrix(policy, obs, 0.05),
                               fisher + 0.05 * torch.eye(theta.numel(), dtype=DT),
                               atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_kl_divergence_matches_torch_distributions(kind):
    g = torch.Generator().manual_seed(4)
    if kind == "categorical":
        p = trpo.ActionDistribution(logits=torch.randn(6, 5, generator=g, dtype=DT))
        q = trpo.ActionDistribution(logits=torch.randn(6, 5, generator=g, dtype=DT))
        ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p.logits),
                                                torch.distributions.Categorical(logits=q.logits))
    else:
        p = trpo.ActionDistribution(mean=torch.randn(6, 3, generator=g, dtype=DT),
                                    log_std=torch.randn(3, generator=g, dtype=DT))
        q = trpo.ActionDistribution(mean=torch.randn(6, 3, generator=g, dtype=DT),
                                    log_std=torch.randn(3, generator=g, dtype=DT))

        def dist(d):
            return torch.distributions.Independent(
                torch.distributions.Normal(d.mean, d.log_std.exp().expand_as(d.mean)), 1)

        ref = torch.distributions.kl_divergence(dist(p), dist(q))
    torch.testing.assert_close(trpo.kl_divergence(p, q), ref, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ the policy step
def test_trpo_step_is_the_scaled_natural_gradient_within_delta():
    torch.manual_seed(2)
    policy = policies.CategoricalMLPPolicy(3, 3, (6,)).double()
    obs = torch.randn(31, 3, dtype=DT)
    actions = torch.randint(3, (31,))
    adv = torch.randn(31, dtype=DT)
    with torch.no_grad():
        old_lp = policy.log_prob(obs, actions)
    theta0 = torch.nn.utils.parameters_to_vector(policy.parameters()).detach().clone()
    n, damping, delta = theta0.numel(), 0.01, 0.005
    F = _fvp_matrix(policy, obs, damping)
    g = torch.autograd.grad(trpo.surrogate_advantage(policy, obs, actions, old_lp, adv),
                            list(policy.parameters()))
    g = torch.cat([x.reshape(-1) for x in g])
    s = torch.linalg.solve(F, g)  # (F + λI)^-1 g
    beta = math.sqrt(2 * delta / float(s @ F @ s))
    out = trpo.trpo_step(policy, obs, actions, old_lp, adv, delta=delta, cg_iters=4 * n,
                         cg_damping=damping)
    assert out.accepted and 0 < out.kl <= delta and out.surrogate_after > out.surrogate_before
    assert out.step_scale == pytest.approx(beta, rel=1e-6)
    theta1 = torch.nn.utils.parameters_to_vector(policy.parameters()).detach()
    d = (theta1 - theta0) / (out.step_fraction * out.step_scale)  # the CG solution used
    r = F @ d - g
    assert float(r @ r) < 1e-10  # CG's stopping rule: ||(F + λI) d - g||² < tol
    assert float(torch.nn.functional.cosine_similarity(d, s, 0)) > 1 - 1e-6
    assert out.step_fraction in [0.8 ** k for k in range(10)]


def test_trpo_step_gaussian_keeps_kl_and_rejects_a_null_step():
    torch.manual_seed(3)
    policy = policies.GaussianMLPPolicy(4, 2, (7,))
    obs, actions = torch.randn(53, 4), torch.randn(53, 2)
    with torch.no_grad():
        old_lp = policy.log_prob(obs, actions)
    before = [p.detach().clone() for p in policy.parameters()]
    out = trpo.trpo_step(policy, obs, actions, old_lp, torch.zeros(53))  # g = 0: nothing to do
    assert not out.accepted and out.kl == 0.0
    for p, q in zip(policy.parameters(), before):
        assert torch.equal(p, q)
    out = trpo.trpo_step(policy, obs, actions, old_lp, torch.randn(53), delta=0.02)
    assert out.accepted and out.kl <= 0.02 and out.surrogate_after > out.surrogate_before


def test_fit_value_reduces_the_regression_loss():
    torch.manual_seed(5)
    value = policies.ValueMLP(3, (11,))
    obs = torch.randn(90, 3)
    target = obs.sum(-1)
    opt = torch.optim.Adam(value.parameters(), lr=1e-2)
    first = trpo.fit_value(value, opt, obs, target, 1, 30, torch.Generator().manual_seed(0))
    last = trpo.fit_value(value, opt, obs, target, 20, 30, torch.Generator().manual_seed(1))
    assert last < 0.5 * first


def test_bad_input_raises():
    policy = policies.CategoricalMLPPolicy(3, 2, (4,))
    obs, actions = torch.randn(5, 3), torch.randint(2, (5,))
    lp = torch.zeros(5)
    for delta in (0.0, -0.01):
        with pytest.raises(ValueError, match=f"delta \\(the KL bound\\) must be > 0, got {delta}"):
            trpo.trpo_step(policy, obs, actions, lp, torch.ones(5), delta=delta)
        with pytest.raises(ValueError, match="delta"):
            trpo.TRPOSettings(delta=delta)
    with pytest.raises(ValueError, match=r"advantages must have shape \(5,\) like obs, got \(5, 1\)"):
        trpo.trpo_step(policy, obs, actions, lp, torch.ones(5, 1))
    with pytest.raises(ValueError, match=r"actions must be \(5,\) or \(5, D\) like obs, got \(4,\)"):
        trpo.trpo_step(policy, obs, actions[:4], lp, torch.ones(5))
    with pytest.raises(ValueError, match="backtrack_coef must be in \\(0, 1\\), got 1.5"):
        trpo.trpo_step(policy, obs, actions, lp, torch.ones(5), backtrack_coef=1.5)
    with pytest.raises(ValueError, match="damping must be >= 0, got -1"):
        trpo.fisher_vector_product(policy, obs, -1.0)
    with pytest.raises(TypeError, match="GaussianMLPPolicy, got ValueMLP"):
        trpo.action_distribution(policies.ValueMLP(3), obs)
    with pytest.raises(ValueError, match="n_steps must be >= 1, got 0"):
        trpo.TRPOSettings(n_steps=0)


# ------------------------------------------------------------------ rollouts and GAE
class _Record(gymnasium.Wrapper):
    """Remembers every step's raw reward, terminated, truncated and next observation."""

    def __init__(self, env, reward_scale=1.0):
        super().__init__(env)
        self.log, self.reward_scale = [], reward_scale

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        r = r * self.reward_scale
        self.log.append((float(r), bool(term), bool(trunc), np.asarray(obs, dtype=np.float32)))
        return obs, r, term, trunc, info


def test_rollout_gae_matches_sb3_rollout_buffer(reference):
    """Our collector's advantages/returns = SB3's RolloutBuffer fed the same steps the way
    OnPolicyAlgorithm.collect_rollouts feeds it (episode starts, bootstrap on truncation)."""
    reference("stable_baselines3")
    from stable_baselines3.common.buffers import RolloutBuffer

    T, N, gamma, lam = 37, 3, 0.97, 0.9
    # episodes end both ways: CartPole terminates, the time limit of 11 truncates
    envs = [_Record(gymnasium.make("CartPole-v1", max_episode_steps=11)) for _ in range(N)]
    torch.manual_seed(0)
    policy = policies.CategoricalMLPPolicy(4, 2, (5,))
    value = policies.ValueMLP(4, (6,))
    col = RolloutCollector(envs, seed=3)
    obs0 = col.obs.copy()
    batch = col.collect(policy, value, T, gamma, lam, torch.Generator().manual_seed(0))
    steps = [e.log for e in envs]
    assert any(s[1] for e in steps for s in e) and any(s[2] and not s[1] for e in steps for s in e)

    buf = RolloutBuffer(T, envs[0].observation_space, envs[0].action_space, device="cpu",
                        gae_lambda=lam, gamma=gamma, n_envs=N)
    obs_tn = batch.obs.reshape(N, T, 4).transpose(0, 1)  # back to (T, N, obs)
    act_tn = batch.actions.reshape(N, T).T
    starts = np.ones(N, dtype=np.float32)  # SB3 starts every env with episode_start = 1
    with torch.no_grad():
        for t in range(T):
            rewards = np.array([steps[i][t][0] for i in range(N)], dtype=np.float32)
            dones = np.array([steps[i][t][1] or steps[i][t][2] for i in range(N)])
            for i in range(N):
                if steps[i][t][2] and not steps[i][t][1]:  # TimeLimit.truncated: bootstrap
                    rewards[i] += gamma * float(value(torch.from_numpy(steps[i][t][3])[None]))
            buf.add(obs_tn[t].numpy(), act_tn[t].numpy(), rewards, starts,
                    value(obs_tn[t]), policy.log_prob(obs_tn[t], act_tn[t]))
            starts = dones.astype(np.float32)
        buf.compute_returns_and_advantage(value(torch.from_numpy(col.obs)), starts)
    assert np.allclose(obs_tn[0].numpy(), obs0)
    ref_adv = torch.as_tensor(buf.advantages.T.reshape(-1))  # env-major, as ours
    ref_ret = torch.as_tensor(buf.returns.T.reshape(-1))
    torch.testing.assert_close(batch.advantages, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.returns, ref_ret, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.values, torch.as_tensor(buf.values.T.reshape(-1)),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batch.log_probs, torch.as_tensor(buf.log_probs.T.reshape(-1)),
                               atol=1e-6, rtol=1e-6)
    ends = sum(s[1] or s[2] for e in steps for s in e)
    assert len(batch.episode_returns) == len(batch.episode_lengths) == ends
    assert col.total_steps == N * T


def test_rollout_rejects_non_finite_rewards_and_bad_steps():
    envs = [_Record(gymnasium.make("CartPole-v1"), reward_scale=float("nan"))]
    col = RolloutCollector(envs, seed=0)
    policy, value = policies.CategoricalMLPPolicy(4, 2, (3,)), policies.ValueMLP(4, (3,))
    with pytest.raises(ValueError, match="non-finite reward nan .* rewards must be finite"):
        col.collect(policy, value, 5, 0.99, 0.95)
    with pytest.raises(ValueError, match="n_steps must be >= 1, got 0"):
        col.collect(policy, value, 0, 0.99, 0.95)
    with pytest.raises(ValueError, match="envs must hold at least one environment"):
        RolloutCollector([])


def test_trpo_update_on_a_pendulum_batch_with_a_gaussian_policy():
    envs = [gymnasium.make("Pendulum-v1") for _ in range(2)]
    torch.manual_seed(0)
    agent = trpo.TRPO(policies.GaussianMLPPolicy(3, 1, (8,)), policies.ValueMLP(3, (8,)),
                      trpo.TRPOSettings(n_steps=50, value_epochs=2, value_batch_size=25,
                                        cg_iters=5), torch.Generator().manual_seed(0))
    col = RolloutCollector(envs, seed=0)
    batch = col.collect(agent.policy, agent.value, 50, 0.9, 0.95, agent.generator)
    assert batch.actions.shape == (100, 1) and batch.obs.shape == (100, 3)
    out = agent.update(batch)
    assert out.kl <= agent.settings.delta and math.isfinite(out.value_loss)


def test_orthogonal_init_gains_and_zero_biases():
    net = policies.mlp([5, 7, 3])
    policies.orthogonal_init(net, hidden_gain=2.0, out_gain=0.01)
    w0, w1 = net[0].weight.detach(), net[2].weight.detach()
    torch.testing.assert_close(w0.T @ w0, 4.0 * torch.eye(5), atol=1e-5, rtol=1e-5)  # 7 x 5
    torch.testing.assert_close(w1 @ w1.T, 1e-4 * torch.eye(3), atol=1e-7, rtol=1e-5)  # 3 x 7
    assert all(float(m.bias.detach().abs().max()) == 0 for m in (net[0], net[2]))
    with pytest.raises(ValueError, match="net must contain nn.Linear layers"):
        policies.orthogonal_init(torch.nn.Sequential(torch.nn.Tanh()))
