"""TRPO on CartPole-v1, ours and sb3-contrib's side by side with rl-zoo's hyper-parameters.

Claims (issue 20): with rl-zoo's tuned CartPole-v1 settings TRPO reaches a return of 500
(≥ 475, mean of the last 20 episodes) within 100k environment steps (``--full``, several
seeds; the default run trains fewer steps and reports where it got), and every update stays
in the trust region: the KL divergence ``D̄_KL(π_old ‖ π_new)`` measured after each update —
with ``torch.distributions``, independently of the line search — is ≤ δ. sb3-contrib's TRPO
runs with the same settings in the same process; its curves share the plot.

rl-zoo (DLR-RM/rl-baselines3-zoo ``hyperparams/trpo.yml``, CartPole-v1, "Tuned"): n_envs 2,
n_timesteps 1e5, MlpPolicy (64-64 tanh, orthogonal init), n_steps 512, batch_size 512,
cg_damping 1e-3, gae_lambda 0.98, gamma 0.99, learning_rate 1e-3, n_critic_updates 20; the
rest sb3-contrib's defaults: target_kl 0.01, cg_max_steps 15, line search 0.8 × 10,
normalised advantages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlatlas.measure import compare_times
from mlatlas.plots import figure
from mlatlas.report import Report
from mlatlas.rl import trpo
from mlatlas.rl.policies import CategoricalMLPPolicy, ValueMLP, orthogonal_init
from mlatlas.rl.rollout import RolloutBatch, RolloutCollector
from mlatlas.rl.sb3_episodes import episode_recorder
from mlatlas.runtime import progress


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores (ours and SB3, one seed)."""

    steps: int = 20_480  # environment steps per run (rl-zoo: 100k)
    seeds: int = 1  # runs of each implementation (seeds seed, seed+1, ...)
    n_envs: int = 2  # rl-zoo n_envs
    n_steps: int = 512  # rl-zoo n_steps (per env per update)
    value_batch_size: int = 512  # rl-zoo batch_size (value regression minibatch)
    value_epochs: int = 20  # rl-zoo n_critic_updates
    value_lr: float = 1e-3  # rl-zoo learning_rate (Adam, value function)
    gamma: float = 0.99  # rl-zoo gamma
    lam: float = 0.98  # rl-zoo gae_lambda
    cg_damping: float = 1e-3  # rl-zoo cg_damping
    cg_iters: int = 15  # sb3-contrib cg_max_steps
    delta: float = 0.01  # KL bound δ (sb3-contrib target_kl)
    hidden: int = 64  # width of the two tanh hidden layers (SB3 MlpPolicy)
    solve_return: float = 475.0  # CartPole-v1 "solved" (issue 20's target)
    window: int = 20  # episodes in the solved criterion
    kl_ratio_max: float = 1.0  # claim: max over updates of KL/δ ≤ this
    compare_sb3: bool = True  # run sb3-contrib's TRPO side by side
    bench_repeats: int = 3  # timed rounds per candidate in bench()
    threads: int = 1  # torch threads (64-wide nets: one is fastest)
    seed: int = 0

    @classmethod
    def smoke(cls) -> Config:
        """Two small updates of each implementation (for tests)."""
        return cls(steps=512, n_steps=128, value_epochs=2, value_batch_size=128, cg_iters=5,
                   bench_repeats=1)

    @classmethod
    def full(cls) -> Config:
        """rl-zoo's budget, 100k steps, three seeds of each implementation."""
        return cls(steps=100_000, seeds=3)


def _agent(cfg: Config, seed: int) -> tuple[trpo.TRPO, RolloutCollector]:
    import gymnasium

    torch.manual_seed(seed)
    envs = [gymnasium.make("CartPole-v1") for _ in range(cfg.n_envs)]
    obs_dim, n_act = envs[0].observation_space.shape[0], envs[0].action_space.n
    policy = CategoricalMLPPolicy(obs_dim, n_act, (cfg.hidden,) * 2)
    value = ValueMLP(obs_dim, (cfg.hidden,) * 2)
    orthogonal_init(policy.net, out_gain=0.01)  # SB3's ortho_init gains
    orthogonal_init(value.net, out_gain=1.0)
    settings = trpo.TRPOSettings(delta=cfg.delta, n_steps=cfg.n_steps, gamma=cfg.gamma,
                                 lam=cfg.lam, cg_iters=cfg.cg_iters, cg_damping=cfg.cg_damping,
                                 value_lr=cfg.value_lr, value_epochs=cfg.value_epochs,
                                 value_batch_size=cfg.value_batch_size)
    agent = trpo.TRPO(policy, value, settings, torch.Generator().manual_seed(seed))
    return agent, RolloutCollector(envs, seed=seed)


def _measured_kl(before: torch.distributions.Categorical, policy: CategoricalMLPPolicy,
                 obs: torch.Tensor) -> float:
    """``mean_s KL(π_old ‖ π_new)`` by torch.distributions in float64 (not the line search's)."""
    with torch.no_grad():
        after = torch.distributions.Categorical(logits=policy.logits(obs).double())
    return float(torch.distributions.kl_divergence(before, after).mean())


def _iterate(agent: trpo.TRPO, collector: RolloutCollector
             ) -> tuple[RolloutBatch, trpo.TRPOUpdate, float]:
    """One rollout + update; returns the batch, the update and the independently measured KL."""
    s = agent.settings
    batch = collector.collect(agent.policy, agent.value, s.n_steps, s.gamma, s.lam,
                              agent.generator)
    with torch.no_grad():
        before = torch.distributions.Categorical(logits=agent.policy.logits(batch.obs).double())
    update = agent.update(batch)
    return batch, update, _measured_kl(before, agent.policy, batch.obs)


def _ours(cfg: Config, seed: int) -> dict[str, Any]:
    agent, collector = _agent(cfg, seed)
    returns, at, kls, accepted = [], [], [], []
    per_update = cfg.n_envs * cfg.n_steps
    n_updates = -(-cfg.steps // per_update)
    for _ in progress(range(n_updates), description=f"TRPO (ours) seed {seed}"):
        batch, update, kl = _iterate(agent, collector)
        returns += batch.episode_returns
        at += batch.episode_end_steps
        kls.append(kl)
        accepted.append(update.accepted)
    for env in collector.envs:
        env.close()
    return {"returns": returns, "steps": at, "kl": kls, "accepted": accepted,
            "total_steps": collector.total_steps}


def _sb3(cfg: Config, seed: int) -> dict[str, Any]:
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    model = _sb3_model(cfg, seed, make_vec_env, TRPO)
    episodes, kls = episode_recorder(), []

    train = model.train

    def train_and_log() -> None:
        train()
        kls.append(float(model.logger.name_to_value["train/kl_divergence_loss"]))

    model.train = train_and_log
    n_updates = -(-cfg.steps // (cfg.n_envs * cfg.n_steps))
    bar = iter(progress(range(n_updates), description=f"TRPO (sb3-contrib) seed {seed}"))

    class Bar(BaseCallback):
        def _on_rollout_end(self) -> None:
            next(bar, None)

        def _on_step(self) -> bool:
            return True

    model.learn(cfg.steps, callback=[episodes, Bar()])
    model.env.close()
    return {"returns": episodes.returns, "steps": episodes.steps, "kl": kls,
            "total_steps": model.num_timesteps}


def _sb3_model(cfg: Config, seed: int, make_vec_env: Any, TRPO: Any) -> Any:
    env = make_vec_env("CartPole-v1", n_envs=cfg.n_envs, seed=seed)
    return TRPO("MlpPolicy", env, n_steps=cfg.n_steps, batch_size=cfg.value_batch_size,
                cg_damping=cfg.cg_damping, cg_max_steps=cfg.cg_iters, gae_lambda=cfg.lam,
                gamma=cfg.gamma, learning_rate=cfg.value_lr, n_critic_updates=cfg.value_epochs,
                target_kl=cfg.delta, policy_kwargs={"net_arch": [cfg.hidden] * 2},
                seed=seed, device="cpu")


def _last_mean(run: dict[str, Any], w: int) -> float:
    r = run["returns"]
    return float(np.mean(r[-w:])) if r else float("nan")


def _solved_at(run: dict[str, Any], w: int, target: float) -> int | None:
    r = np.asarray(run["returns"])
    for i in range(w - 1, len(r)):
        if r[i - w + 1:i + 1].mean() >= target:
            return int(run["steps"][i])
    return None


def run(cfg: Config, out: Path) -> Report:
    """Train ours (and SB3's) on CartPole-v1 for each seed; claims, curves and KL plot."""
    rep = Report()
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    ours = [_ours(cfg, s) for s in seeds]
    theirs = [_sb3(cfg, s) for s in seeds] if cfg.compare_sb3 else []
    w = cfg.window
    budget = f"{ours[0]['total_steps']} env steps per seed, {len(seeds)} seed(s)"
    for name, runs in (("ours", ours), ("sb3", theirs)):
        if not runs:
            continue
        last = [_last_mean(r, w) for r in runs]
        rep.metric(f"{name}_last{w}_return_mean", float(np.mean(last)))
        rep.metric(f"{name}_last{w}_return_std", float(np.std(last)))
        solved = [_solved_at(r, w, cfg.solve_return) for r in runs]
        rep.metric(f"{name}_seeds_solved", sum(s is not None for s in solved))
        if all(s is not None for s in solved):
            rep.metric(f"{name}_steps_to_solve_mean", float(np.mean(solved)), unit="steps")
        kl = np.concatenate([r["kl"] for r in runs])
        rep.metric(f"{name}_max_kl_over_delta", float(kl.max() / cfg.delta))
        rep.metric(f"{name}_mean_kl_over_delta", float(kl.mean() / cfg.delta))
    last_ours = [_last_mean(r, w) for r in ours]
    sb3_txt = (f"; sb3-contrib TRPO: {rep.metrics[f'sb3_last{w}_return_mean']:.1f} ± "
               f"{rep.metrics[f'sb3_last{w}_return_std']:.1f}" if theirs else "")
    rep.claim(f"CartPole-v1, ours: mean return of the last {w} episodes at the end of training "
              "(seed mean)", float(np.mean(last_ours)), cfg.solve_return, ">=",
              target_source="solve_return",
              detail=f"{budget}{'' if cfg.steps >= 100_000 else ' (the claim is at 100k: --full)'}"
                     f"; per seed "
                     f"{[round(x, 1) for x in last_ours]}{sb3_txt}")
    n_upd = sum(len(r["kl"]) for r in ours)
    rep.claim("every update within the trust region: max over updates of D_KL(π_old‖π_new) / δ "
              "(ours)", rep.metrics["ours_max_kl_over_delta"], cfg.kl_ratio_max, "<=",
              target_source="kl_ratio_max",
              detail=f"{n_upd} updates, δ = {cfg.delta:g}; KL by torch.distributions in float64 "
                     f"on each batch; {sum(sum(r['accepted']) for r in ours)} steps accepted")
    rep.note("Hyper-parameters: rl-zoo's tuned CartPole-v1 TRPO entry (n_envs 2, n_steps 512, "
             "batch_size 512, cg_damping 1e-3, gae_lambda 0.98, gamma 0.99, learning_rate 1e-3, "
             "n_critic_updates 20) + sb3-contrib defaults (target_kl 0.01, cg_max_steps 15, "
             "line search 0.8 x 10), for both implementations. sb3-contrib's KL metric is its "
             "line search's own mean KL(π_new‖π_old); ours is measured separately as "
             "KL(π_old‖π_new).")
    _plot(cfg, ours, theirs, out, rep)
    return rep


def _plot(cfg: Config, ours: list, theirs: list, out: Path, rep: Report) -> None:
    w = cfg.window
    with figure(out / "trpo_cartpole.png", ncols=2, size=(11, 4.2)) as (fig, axes):
        ax, ax_kl = axes.ravel()
        for runs, label, color in ((ours, "ours", "C0"), (theirs, "sb3-contrib", "C1")):
            for k, r in enumerate(runs):
                y = np.asarray(r["returns"], dtype=float)
                if len(y) == 0:
                    continue
                roll = [y[max(0, i - w + 1):i + 1].mean() for i in range(len(y))]
                ax.plot(r["steps"], roll, color=color, alpha=0.8, lw=1.2,
                        label=f"{label} (mean of last {w})" if k == 0 else None)
                ax_kl.plot(np.arange(1, len(r["kl"]) + 1), np.asarray(r["kl"]) / cfg.delta,
                           ".-", color=color, alpha=0.7, ms=3,
                           label=f"{label}" if k == 0 else None)
        ax.axhline(cfg.solve_return, color="k", ls="--", lw=1, label=f"{cfg.solve_return:g}")
        ax.set(xlabel="environment steps", ylabel="episode return",
               title=f"TRPO on CartPole-v1 ({len(ours)} seed(s) each)")
        ax_kl.axhline(1.0, color="k", ls="--", lw=1, label="δ")
        ax_kl.set(xlabel="update", ylabel="KL / δ", title="KL of each update")
        for a in (ax, ax_kl):
            a.legend(fontsize="small")
            a.grid(alpha=0.3)
    rep.figure(out / "trpo_cartpole.png")


def bench(cfg: Config, out: Path) -> Report:
    """Environment steps per second while training: ours vs sb3-contrib, same settings."""
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env

    rep = Report()
    agent, collector = _agent(cfg, cfg.seed)
    model = _sb3_model(cfg, cfg.seed, make_vec_env, TRPO)
    per_update = cfg.n_envs * cfg.n_steps
    model.learn(per_update)  # builds the logger and the first observation
    times = compare_times({
        "ours": lambda: _iterate(agent, collector),
        "sb3-contrib": lambda: model.learn(per_update, reset_num_timesteps=False),
    }, repeats=cfg.bench_repeats, warmup=1)
    ours_sps = per_update / times["ours"].median_s
    sb3_sps = per_update / times["sb3-contrib"].median_s
    rep.metric("ours_env_steps_per_s", ours_sps, unit="steps/s")
    rep.metric("sb3_env_steps_per_s", sb3_sps, unit="steps/s")
    rep.claim("training throughput, ours / sb3-contrib TRPO (env steps per second)",
              ours_sps / sb3_sps, 1.0, ">=", unit="x",
              detail=f"one update = {per_update} steps (rollout + policy step + value fit), "
                     f"median of {cfg.bench_repeats} interleaved rounds, "
                     f"{torch.get_num_threads()} thread(s)")
    for env in collector.envs:
        env.close()
    model.env.close()
    return rep
