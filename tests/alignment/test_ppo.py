"""PPO (GRPO's baseline) parity against stable-baselines3 (2.9): GAE equals
``RolloutBuffer.compute_returns_and_advantage``; the clipped surrogate, clipped value loss and
entropy bonus equal the loss lines of ``PPO.train`` — logged values and the parameter update —
on the same rollout. Plus the critic (value model) and the LLM reward shaping.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mlatlas.alignment.ppo import ValueModel, gae, ppo_loss, token_rewards

ATOL = RTOL = 1e-5  # fp32 CPU


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_sb3_rollout_buffer(reference, gamma, lam):
    reference("stable_baselines3")
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    T, N = 13, 5
    g = np.random.default_rng(0)
    buf = RolloutBuffer(T, spaces.Box(-1, 1, (2,)), spaces.Discrete(3), device="cpu",
                        gae_lambda=lam, gamma=gamma, n_envs=N)
    buf.rewards[:] = g.normal(size=(T, N))
    buf.values[:] = g.normal(size=(T, N))
    buf.episode_starts[:] = g.random((T, N)) < 0.25
    last_values = torch.as_tensor(g.normal(size=N), dtype=torch.float32)
    last_dones = (g.random(N) < 0.5).astype(np.float32)
    buf.compute_returns_and_advantage(last_values, last_dones)

    # our convention: dones[t] = 1 when the episode ended with step t (= SB3's start at t + 1)
    dones = np.concatenate((buf.episode_starts[1:], last_dones[None]), 0)
    out = gae(torch.as_tensor(buf.rewards.T), torch.as_tensor(buf.values.T),
              torch.as_tensor(dones.T), last_values, gamma=gamma, lam=lam)
    torch.testing.assert_close(out.advantages, torch.as_tensor(buf.advantages.T), atol=ATOL,
                               rtol=RTOL)
    torch.testing.assert_close(out.returns, torch.as_tensor(buf.returns.T), atol=ATOL, rtol=RTOL)


def test_gae_special_cases():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v = torch.tensor([0.5, -1.0, 2.0, 0.0])
    d = torch.tensor([0.0, 1.0, 0.0, 0.0])
    last = torch.tensor(10.0)
    # λ = 1: discounted return to the episode end (or bootstrap) minus V
    mc = gae(r, v, d, last, gamma=0.5, lam=1.0)
    want_returns = torch.tensor([1 + 0.5 * 2, 2.0, 3 + 0.5 * 4 + 0.25 * 10, 4 + 0.5 * 10])
    torch.testing.assert_close(mc.returns, want_returns)
    # λ = 0: one-step TD error, no bootstrap across the end at t = 1
    td = gae(r, v, d, last, gamma=0.5, lam=0.0)
    torch.testing.assert_close(td.advantages, torch.tensor([1 + 0.5 * -1 - 0.5, 2 + 1.0,
                                                            3 + 0.5 * 0 - 2, 4 + 5.0]))


def _sb3_update(reference, clip_range_vf, ent_coef):
    """One PPO.train() of SB3 on CartPole with SGD(lr=1): returns what it logged, the policy
    before the update, the rollout it trained on and its parameter step (= -gradient)."""
    reference("stable_baselines3")
    import gymnasium as gym
    from stable_baselines3 import PPO

    n = 24
    model = PPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=n, batch_size=n, n_epochs=1,
                learning_rate=1.0, clip_range=0.2, clip_range_vf=clip_range_vf,
                ent_coef=ent_coef, vf_coef=0.7, max_grad_norm=1e9, seed=0, device="cpu",
                policy_kwargs={"optimizer_class": torch.optim.SGD,
                               "net_arch": dict(pi=[7], vf=[5])})
    seen = {}
    train = model.train

    def perturbed_train():
        buf = model.rollout_buffer  # move the old policy/critic away so that clipping acts
        g = np.random.default_rng(1)
        buf.log_probs += g.normal(scale=0.3, size=buf.log_probs.shape).astype(np.float32)
        buf.values += g.normal(scale=0.5, size=buf.values.shape).astype(np.float32)
        seen["buffer"] = copy.deepcopy(buf)
        seen["policy"] = copy.deepcopy(model.policy)
        train()

    model.train = perturbed_train
    model.learn(total_timesteps=n)
    step = {k: p.detach() - seen["policy"].state_dict()[k]
            for k, p in model.policy.state_dict().items()}
    return model.logger.name_to_value, seen["policy"], seen["buffer"], step


@pytest.mark.parametrize("clip_range_vf,ent_coef", [(None, 0.0), (0.3, 0.05)])
def test_ppo_loss_matches_sb3_train(reference, clip_range_vf, ent_coef):
    logged, policy, buf, step = _sb3_update(reference, clip_range_vf, ent_coef)
    obs = torch.as_tensor(buf.observations.reshape(-1, 4))
    actions = torch.as_tensor(buf.actions.reshape(-1)).long()
    values, logps, entropy = policy.evaluate_actions(obs, actions)
    flat = {k: torch.as_tensor(getattr(buf, k).reshape(-1))
            for k in ("log_probs", "advantages", "values", "returns")}
    out = ppo_loss(logps, flat["log_probs"], flat["advantages"], values.flatten(), flat["values"],
                   flat["returns"],
                   entropy=entropy, clip_range=0.2, clip_range_vf=clip_range_vf,
                   ent_coef=ent_coef, vf_coef=0.7)
    for name, ours in (("train/policy_gradient_loss", out.policy_loss),
                       ("train/value_loss", out.value_loss),
                       ("train/entropy_loss", out.entropy_loss),
                       ("train/clip_fraction", out.clip_fraction),
                       ("train/approx_kl", out.approx_kl), ("train/loss", out.loss)):
        torch.testing.assert_close(ours.item(), float(logged[name]), atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert out.clip_fraction > 0, "the test must exercise clipping"
    policy.optimizer.zero_grad()
    out.loss.backward()
    for name, p in policy.named_parameters():  # SGD with lr = 1: step = -grad
        torch.testing.assert_close(-p.grad, step[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_masked_loss_is_the_loss_of_the_masked_samples():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 5, generator=g) for _ in range(6)]
    mask = (torch.rand(3, 5, generator=g) < 0.6).long()
    full = ppo_loss(*[t[mask.bool()] for t in x], clip_range_vf=0.2)
    masked = ppo_loss(*x, mask=mask, clip_range_vf=0.2)
    for field in ("loss", "policy_loss", "value_loss", "entropy_loss", "clip_fraction"):
        torch.testing.assert_close(getattr(masked, field), getattr(full, field))


def test_value_model(llama_pair):
    policy, _ = llama_pair()
    before = copy.deepcopy(policy.state_dict())
    critic = ValueModel.from_policy(policy)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    v = critic(ids)
    assert v.shape == (2, 9) and v.dtype == torch.float32 and torch.equal(v, torch.zeros(2, 9))
    assert all(torch.equal(before[k], t) for k, t in policy.state_dict().items())
    assert not any(k.startswith("backbone.lm_head") for k in critic.state_dict())
    with torch.no_grad():
        critic.v_head.weight.normal_()
    # left padding with an attention mask gives the unpadded values (RoPE is relative)
    padded = torch.cat((torch.zeros(2, 3, dtype=torch.long), ids), 1)
    mask = torch.cat((torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)), 1)
    torch.testing.assert_close(critic(padded, mask)[:, 3:], critic(ids), atol=ATOL, rtol=RTOL)


def test_token_rewards():
    scores = torch.tensor([1.0, -2.0])
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, dones = token_rewards(scores, lp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(dones, torch.tensor([[0.0, 1, 0], [0, 0, 1]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.0, 0.0], [-0.05, 0.0, -2.0]]))


def test_bad_input():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"values must have rewards' shape \(4,\), got \(3,\)"):
        gae(x, torch.zeros(3), x, torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"last_value must be \[...\] = \(\)"):
        gae(x, x, x, torch.zeros(1))
    with pytest.raises(ValueError, match="dones must hold only 0 and 1"):
        gae(x, x, torch.full((4,), 0.5), torch.tensor(0.0))
    with pytest.raises(ValueError, match="lam must be in"):
        gae(x, x, x, torch.tensor(0.0), lam=1.5)
    with pytest.raises(ValueError, match=r"returns must have logps' shape"):
        ppo_loss(x, x, x, x, x, torch.zeros(5))
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ppo_loss(x, x, x, x, x, x, clip_range=0.0)
    with pytest.raises(ValueError, match="clip_range_vf must be > 0 or None"):
        ppo_loss(x, x, x, x, x, x, clip_range_vf=-1.0)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        token_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), -1)
    with pytest.raises(ValueError, match="every row of mask needs at least one"):
        token_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)
