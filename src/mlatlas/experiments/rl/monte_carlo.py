"""Monte Carlo control on the grid world: MC basic, exploring starts, epsilon-greedy.

Claim: the greedy policy each method learns takes an action of value iteration's optimal
action set in every state (ties allowed); the value errors are reported next to it. For
epsilon-greedy the claim is about the greedy part of the learned q (the best epsilon-greedy
policy's greedy part is optimal at epsilon = 0.1 on this world, computed exactly below).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.plots import figure, policy_grid
from mlatlas.report import Report
from mlatlas.rl import dynamic_programming as dp
from mlatlas.rl import monte_carlo as mc
from mlatlas.rl.gridworld import GridWorld


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    r_forbidden: float = -1.0  # reward for entering a forbidden cell
    gamma: float = 0.9  # discount rate
    basic_iterations: int = 20  # MC basic: at most this many policy improvements
    es_episodes: int = 2_500  # MC exploring starts: episodes per variant (first/every visit)
    es_length: int = 150  # MC exploring starts: steps per episode
    es_batch: int = 125  # MC exploring starts: episodes per policy improvement
    es_alpha: float = 1.0  # MC exploring starts: step towards each batch's mean return
    epsilon: float = 0.1  # MC epsilon-greedy: exploration rate
    eps_episodes: int = 500_000  # MC epsilon-greedy: episodes in total
    eps_length: int = 150  # MC epsilon-greedy: steps per episode
    eps_tail: int = 66  # MC epsilon-greedy: unused final steps (return cut error <= 1e-2)
    eps_batch: int = 5_000  # MC epsilon-greedy: episodes per policy improvement
    eps_alpha: float = 1.0  # MC epsilon-greedy: first step towards a batch's mean return
    eps_alpha_decay: float = 0.7  # MC epsilon-greedy: alpha_n = eps_alpha / n^0.7 (RM steps)
    threads: int = 1  # torch threads (tiny tensors: one is fastest)
    seed: int = 0  # seeds the episode sampler

    @classmethod
    def smoke(cls) -> Config:
        """A few policy improvements of each method (for tests)."""
        return cls(basic_iterations=3, es_episodes=250, eps_episodes=1_000, eps_batch=500)

    @classmethod
    def full(cls) -> Config:
        """2.4 times the ε-greedy data (1.2M episodes, 180M steps): the near-tie states settle."""
        return cls(eps_episodes=1_200_000, eps_batch=10_000)


def _best_epsilon_greedy(world: GridWorld, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact policy iteration restricted to epsilon-greedy policies: (policy, q)."""
    pi = dp.uniform_policy(world)
    for _ in range(100):
        q = dp.action_values(world, dp.evaluate_policy(world, pi))
        new = mc.epsilon_greedy(q, epsilon)
        if torch.equal(new, pi):
            break
        pi = new
    return pi, q


def run(cfg: Config, out: Path) -> Report:
    """Learn the grid world's optimal policy with the three MC methods; compare with VI."""
    rep = Report()
    world = GridWorld.example(r_forbidden=cfg.r_forbidden, gamma=cfg.gamma)
    S = world.n_states
    star = dp.value_iteration(world)
    sets = dp.optimal_action_sets(star.q)
    idx = torch.arange(S)
    gen = torch.Generator().manual_seed(cfg.seed)

    def n_optimal(q: torch.Tensor) -> int:
        return int(sets[idx, q.argmax(-1)].sum())

    def policy_gap(q: torch.Tensor) -> float:  # value lost by acting greedily on q
        return float((dp.evaluate_policy(world, dp.greedy_policy(q)) - star.values).abs().max())

    results = {
        "MC basic": mc.mc_basic(world, cfg.basic_iterations, generator=gen),
        "MC ES first-visit": mc.mc_exploring_starts(
            world, cfg.es_episodes, cfg.es_length, visit="first", batch=cfg.es_batch,
            alpha=cfg.es_alpha, generator=gen),
        "MC ES every-visit": mc.mc_exploring_starts(
            world, cfg.es_episodes, cfg.es_length, visit="every", batch=cfg.es_batch,
            alpha=cfg.es_alpha, generator=gen),
        f"MC ε-greedy (ε={cfg.epsilon:g})": mc.mc_epsilon_greedy(
            world, cfg.epsilon, cfg.eps_episodes, cfg.eps_length, cfg.eps_tail, "every",
            cfg.eps_batch, cfg.eps_alpha, cfg.eps_alpha_decay, generator=gen),
    }
    for name, r in results.items():
        key = name.split(" (")[0].replace(" ", "_").replace("-", "_")
        rep.claim(f"{name}: states whose greedy action is optimal", n_optimal(r.q), S, ">=",
                  unit="states", detail=f"{r.episodes} episodes, {r.steps} steps")
        rep.metric(f"{key}_greedy_value_error", policy_gap(r.q))
        rep.metric(f"{key}_episodes", r.episodes)
        rep.metric(f"{key}_steps", r.steps)
    for name in ("MC basic", "MC ES first-visit", "MC ES every-visit"):
        key = name.replace(" ", "_").replace("-", "_")
        err = float((results[name].q.max(-1).values - star.values).abs().max())
        rep.metric(f"{key}_estimate_error", err)  # max_s |max_a q_hat(s,a) - v*(s)|

    # epsilon-greedy: compare with the best epsilon-greedy policy, computed exactly
    eps_res = list(results.values())[-1]
    best_pi, best_q = _best_epsilon_greedy(world, cfg.epsilon)
    v_best = dp.evaluate_policy(world, best_pi)
    rep.metric("eps_greedy_best_policy_greedy_part_optimal_states", n_optimal(best_q))
    rep.metric("eps_greedy_value_gap_to_best_eps_policy",
               float((dp.evaluate_policy(world, eps_res.policy) - v_best).abs().max()))
    rep.metric("eps_greedy_q_error_vs_exact", float((eps_res.q - best_q).abs().max()))
    srt = best_q.sort(-1, descending=True).values
    rep.metric("eps_greedy_smallest_action_gap", float((srt[:, 0] - srt[:, 1]).min()))

    # the classic sample average over all returns ever (mixes returns of earlier policies)
    classic = mc.mc_exploring_starts(world, cfg.es_episodes, cfg.es_length, visit="first",
                                     batch=cfg.es_batch, alpha=None, generator=gen)
    rep.metric("MC_ES_sample_average_optimal_states", n_optimal(classic.q))
    rep.note(f"MC ES with the plain sample average over every return ever collected (alpha=None) "
             f"reaches {n_optimal(classic.q)}/{S} optimal states after {classic.episodes} "
             "episodes: early returns of poor policies stay in the averages. The runs above "
             f"move q towards each batch's mean return with alpha={cfg.es_alpha:g} (ES) and "
             f"alpha_n={cfg.eps_alpha:g}/n^{cfg.eps_alpha_decay:g} (ε-greedy; RM step sizes).")
    wrong = (~sets[idx, eps_res.q.argmax(-1)]).nonzero().flatten().tolist()
    gaps = srt[:, 0] - srt[:, 1]
    rep.note(f"ε-greedy: the best ε-greedy policy (exact) has an optimal greedy part in "
             f"{n_optimal(best_q)}/{S} states at ε={cfg.epsilon:g}, but its action gaps go down "
             f"to {float(gaps.min()):.3f}; such near-ties need many returns before the estimates "
             "rank them right. "
             + (f"Learned greedy action not optimal at {[world.cell(s) for s in wrong]} "
                f"(ε-greedy action gaps there: {[round(float(gaps[s]), 3) for s in wrong]}); "
                "--full samples 2.4x more episodes." if wrong else
                "Every learned greedy action is optimal."))
    rep.note("Returns are cut at the episode end; visits in the last H steps are not used, so "
             "each return is within 1e-3 (ES, basic) or 1e-2 (ε-greedy) of the infinite sum.")

    with figure(out / "learning_curves.png", ncols=2, size=(11, 4)) as (fig, axes):
        axes = axes.ravel()
        for name, r in results.items():
            per = r.episodes / len(r.q_history)
            xs = [per * (i + 1) for i in range(len(r.q_history))]
            axes[0].plot(xs, [n_optimal(q) for q in r.q_history], ".-", label=name)
            axes[1].plot(xs, [max(policy_gap(q), 1e-6) for q in r.q_history], ".-", label=name)
        axes[0].set(xscale="log", xlabel="episodes", ylabel="states with an optimal action",
                    title="greedy policy vs value iteration")
        axes[1].set(xscale="log", yscale="log", xlabel="episodes",
                    ylabel="max_s |v_greedy(s) - v*(s)|", title="value error of the greedy policy")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    rep.figure(out / "learning_curves.png")
    with figure(out / "policies.png", ncols=3, size=(15, 4.4)) as (fig, axes):
        axes = axes.ravel()
        policy_grid(axes[0], world, star.values, sets, "value iteration: v*, optimal actions")
        es = results["MC ES every-visit"]
        policy_grid(axes[1], world, es.q.max(-1).values, dp.greedy_policy(es.q),
                  "MC ES every-visit: max_a q̂, greedy")
        policy_grid(axes[2], world, eps_res.q.max(-1).values, dp.greedy_policy(eps_res.q),
                  f"MC ε-greedy (ε={cfg.epsilon:g}): max_a q̂, greedy")
    rep.figure(out / "policies.png")
    return rep
