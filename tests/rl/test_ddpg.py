"""DDPG: with the same weights copied into stable-baselines3's DDPG policy, the same batch gives
the same critic target, critic loss, actor loss and gradients, and one training step the same
parameters (Adam + Polyak); Ornstein–Uhlenbeck noise vs SB3's; replay buffer, action bounds,
the training loop, and bad input."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlatlas.rl import ddpg
from mlatlas.rl.replay import ReplayBatch, ReplayBuffer

ATOL = RTOL = 1e-5  # fp32 CPU
HIDDEN = (37, 23)  # not powers of two


def _pair(gamma=0.97, tau=0.02, seed=0):
    """Our agent and SB3's DDPG on Pendulum-v1 with our weights copied into SB3's policy."""
    from stable_baselines3 import DDPG
    from stable_baselines3.common.logger import Logger

    env = gymnasium.make("Pendulum-v1")
    torch.manual_seed(seed)
    ours = ddpg.DDPG(env.observation_space, env.action_space,
                     ddpg.DDPGSettings(gamma=gamma, tau=tau, lr=3e-3, hidden=HIDDEN))
    with torch.no_grad():  # make the targets differ from the online networks
        for p in list(ours.actor_target.parameters()) + list(ours.critic_target.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    theirs = DDPG("MlpPolicy", env, gamma=gamma, tau=tau, learning_rate=3e-3,
                  policy_kwargs={"net_arch": list(HIDDEN)}, device="cpu", seed=seed)
    theirs.set_logger(Logger(folder=None, output_formats=[]))
    key_map = {}  # SB3 key -> our (module, key)
    for sb3_mod, our_mod, inner in (("actor", "actor", "mu"), ("actor_target", "actor_target", "mu"),
                                    ("critic", "critic", "qf0"),
                                    ("critic_target", "critic_target", "qf0")):
        for layer in (0, 2, 4):
            for kind in ("weight", "bias"):
                key_map[f"{sb3_mod}.{inner}.{layer}.{kind}"] = (our_mod, f"net.{layer}.{kind}")
    sb3_state = theirs.policy.state_dict()
    assert set(sb3_state) == set(key_map), "SB3 keys missing from / unexpected in the key map"
    for mod in ("actor", "actor_target", "critic", "critic_target"):
        ours_keys = {k for m, k in key_map.values() if m == mod}
        assert set(getattr(ours, mod).state_dict()) == ours_keys
    theirs.policy.load_state_dict({k: getattr(ours, m).state_dict()[key].clone()
                                   for k, (m, key) in key_map.items()})
    return ours, theirs, key_map


def _batch(B=29, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ReplayBatch(obs=torch.randn(B, 3, generator=g),
                       actions=2 * torch.rand(B, 1, generator=g) - 1,
                       rewards=-5 * torch.rand(B, generator=g),
                       next_obs=torch.randn(B, 3, generator=g),
                       terminated=(torch.rand(B, generator=g) < 0.3).float())


def test_losses_and_gradients_match_sb3_ddpg(reference):
    reference("stable_baselines3")
    ours, theirs, _ = _pair()
    b = _batch()
    p = theirs.policy
    # SB3: the lines of TD3.train with DDPG's settings (one critic, no target noise)
    with torch.no_grad():
        next_a = p.actor_target(b.next_obs).clamp(-1, 1)
        next_q = torch.cat(p.critic_target(b.next_obs, next_a), 1).min(1, keepdim=True).values
        ref_y = b.rewards[:, None] + (1 - b.terminated[:, None]) * theirs.gamma * next_q
    ref_q_loss = sum(F.mse_loss(q, ref_y) for q in p.critic(b.obs, b.actions))
    ref_q_grads = torch.autograd.grad(ref_q_loss, list(p.critic.parameters()))
    ref_pi_loss = -p.critic.q1_forward(b.obs, p.actor(b.obs)).mean()
    ref_pi_grads = torch.autograd.grad(ref_pi_loss, list(p.actor.parameters()))

    y = ddpg.critic_target(ours.actor_target, ours.critic_target, b, ours.settings.gamma)
    q_loss = ddpg.critic_loss(ours.critic, b, y)
    q_grads = torch.autograd.grad(q_loss, list(ours.critic.parameters()))
    pi_loss = ddpg.actor_loss(ours.actor, ours.critic, b.obs)
    pi_grads = torch.autograd.grad(pi_loss, list(ours.actor.parameters()))

    torch.testing.assert_close(y, ref_y.squeeze(1), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(q_loss, ref_q_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pi_loss, ref_pi_loss, atol=ATOL, rtol=RTOL)
    for ours_g, ref_g in zip(q_grads + pi_grads, ref_q_grads + ref_pi_grads, strict=True):
        torch.testing.assert_close(ours_g, ref_g, atol=ATOL, rtol=RTOL)
    assert float(b.terminated.sum()) > 0  # the (1 - d) cut was exercised


def test_one_training_step_matches_sb3_ddpg_train(reference):
    reference("stable_baselines3")
    from stable_baselines3.common.type_aliases import ReplayBufferSamples

    ours, theirs, key_map = _pair()
    b = _batch(B=31, seed=2)
    samples = ReplayBufferSamples(b.obs, b.actions, b.next_obs, b.terminated[:, None],
                                  b.rewards[:, None])
    theirs.replay_buffer.sample = lambda batch_size, env=None: samples  # the same batch
    for _ in range(2):  # two steps: the second uses Adam's moments and the moved targets
        theirs.train(gradient_steps=1, batch_size=31)
        losses = ours.update(b)
    logged = theirs.logger.name_to_value
    assert losses.critic_loss == pytest.approx(logged["train/critic_loss"], rel=1e-5)
    assert losses.actor_loss == pytest.approx(logged["train/actor_loss"], rel=1e-5)
    sb3_state = theirs.policy.state_dict()
    for k, (m, key) in key_map.items():
        torch.testing.assert_close(getattr(ours, m).state_dict()[key], sb3_state[k],
                                   atol=ATOL, rtol=RTOL, msg=lambda s, k=k: f"{k}: {s}")


def test_polyak_update():
    src, tgt = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    w0 = tgt.weight.detach().clone()
    ddpg.polyak_update(tgt, src, 0.1)
    torch.testing.assert_close(tgt.weight, 0.1 * src.weight + 0.9 * w0, atol=1e-7, rtol=1e-6)
    ddpg.polyak_update(tgt, src, 1.0)
    assert torch.equal(tgt.weight, src.weight)
    with pytest.raises(ValueError, match="tau must be in \\[0, 1\\], got 1.5"):
        ddpg.polyak_update(tgt, src, 1.5)


def test_ornstein_uhlenbeck_matches_sb3(reference, monkeypatch):
    reference("stable_baselines3")
    from stable_baselines3.common.noise import OrnsteinUhlenbeckActionNoise

    sigma = np.array([0.3, 0.05, 0.2])
    ours = ddpg.OrnsteinUhlenbeckNoise(sigma.tolist(), 3, theta=0.2, dt=0.05,
                                       generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same ε stream, one draw per step
    draws = iter([torch.randn(3, generator=g, dtype=torch.float64).numpy() for _ in range(7)])
    monkeypatch.setattr(np.random, "normal", lambda size: next(draws))
    theirs = OrnsteinUhlenbeckActionNoise(np.zeros(3), sigma, theta=0.2, dt=0.05,
                                          dtype=np.float64)
    for _ in range(7):
        np.testing.assert_allclose(ours(), theirs(), rtol=1e-12, atol=1e-12)
    ours.reset()
    assert np.all(ours.x.numpy() == 0)
    g = ddpg.GaussianNoise(0.5, 4, torch.Generator().manual_seed(0))
    x = np.stack([g() for _ in range(4000)])
    assert x.shape == (4000, 4) and abs(x.std() - 0.5) < 0.02 and abs(x.mean()) < 0.02
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        ddpg.GaussianNoise(-0.1, 2)
    with pytest.raises(ValueError, match="theta must be >= 0 and dt > 0"):
        ddpg.OrnsteinUhlenbeckNoise(0.1, 2, dt=0.0)


def test_replay_buffer_ring_and_sampling():
    buf = ReplayBuffer(5, obs_dim=2, act_dim=1)
    with pytest.raises(ValueError, match="empty replay buffer"):
        buf.sample(3)
    for i in range(7):
        buf.add(np.full(2, i), np.array([i / 10]), float(i), np.full(2, i + 1), i == 6)
    assert len(buf) == 5 and buf.pos == 2
    assert sorted(buf.rewards.tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]  # 0 and 1 overwritten
    s = buf.sample(64, torch.Generator().manual_seed(0))
    assert s.obs.shape == (64, 2) and s.actions.shape == (64, 1)
    torch.testing.assert_close(s.next_obs, s.obs + 1)
    assert torch.equal(s.terminated, (s.rewards == 6).float())
    with pytest.raises(ValueError, match="reward must be finite, got inf"):
        buf.add(np.zeros(2), np.zeros(1), float("inf"), np.zeros(2), False)
    with pytest.raises(ValueError, match=r"obs must have shape \(2,\), got \(3,\)"):
        buf.add(np.zeros(3), np.zeros(1), 0.0, np.zeros(2), False)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        ReplayBuffer(0, 2, 1)


class _NanReward(gymnasium.Wrapper):
    def step(self, action):
        obs, _, term, trunc, info = self.env.step(action)
        return obs, float("nan"), term, trunc, info


def test_learn_bounds_and_timeouts():
    env = gymnasium.make("MountainCarContinuous-v0", max_episode_steps=30)  # bounds [-1, 1]
    g = torch.Generator().manual_seed(0)
    agent = ddpg.DDPG(env.observation_space, env.action_space,
                      ddpg.DDPGSettings(hidden=(9, 7), batch_size=8, learning_starts=20),
                      ddpg.GaussianNoise(5.0, 1, g), g)  # huge noise: actions must be clipped
    agent.learn(env, 65, seed=0)
    assert agent.steps == 65 and len(agent.buffer) == 65
    assert agent.episode_end_steps == [30, 60]  # the time limit truncates...
    assert float(agent.buffer.terminated[:65].sum()) == 0  # ...and still bootstraps
    a = agent.buffer.actions[:65]
    assert float(a.abs().max()) <= 1.0 and float((a.abs() == 1).float().mean()) > 0.3
    pend = gymnasium.make("Pendulum-v1")
    p_agent = ddpg.DDPG(pend.observation_space, pend.action_space, ddpg.DDPGSettings(hidden=(5,)))
    np.testing.assert_allclose(p_agent.to_env(np.array([-1.0, 0.0, 1.0])), [-2.0, 0.0, 2.0])
    assert np.all(np.abs(p_agent.act(np.zeros(3, dtype=np.float32))) <= 2.0)


def test_bad_input_raises():
    cart = gymnasium.make("CartPole-v1")
    with pytest.raises(TypeError, match=r"continuous action space .*Box.*, got Discrete\(2\)"):
        ddpg.DDPG(cart.observation_space, cart.action_space)
    unbounded = gymnasium.spaces.Box(-np.inf, np.inf, (2,))
    with pytest.raises(ValueError, match="action_space must have finite bounds"):
        ddpg.DDPG(gymnasium.spaces.Box(-1, 1, (3,)), unbounded)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ddpg.DDPGSettings(batch_size=0)
    env = _NanReward(gymnasium.make("Pendulum-v1"))
    agent = ddpg.DDPG(env.observation_space, env.action_space, ddpg.DDPGSettings(hidden=(5,)))
    with pytest.raises(ValueError, match="non-finite reward nan at step 1; rewards must be finite"):
        agent.learn(env, 3, seed=0)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        agent.learn(env, 0)
