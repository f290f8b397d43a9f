"""Grid world: the Bellman equation in closed form and iteratively; VI, PI and truncated PI.

Claims: iterative policy evaluation equals the closed-form linear solve (≤ 1e-8) and value
iteration, policy iteration and truncated policy iteration reach the same optimal values and
the same optimal actions in every state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.plots import curves, figure, policy_grid
from mlatlas.report import Report
from mlatlas.rl import dynamic_programming as dp
from mlatlas.rl.gridworld import GridWorld


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    r_forbidden: float = -1.0  # reward for entering a forbidden cell (Zhao's example: -1)
    r_boundary: float = -1.0  # reward for bumping into the boundary
    gamma: float = 0.9  # discount rate
    tpi_j: int = 5  # evaluation sweeps per truncated-policy-iteration step
    random_policies: int = 4  # random stochastic policies evaluated both ways
    threads: int = 1  # torch threads (tiny tensors: one is fastest)
    seed: int = 0  # seeds the random policies

    @classmethod
    def smoke(cls) -> Config:
        """One random policy (for tests)."""
        return cls(random_policies=1)


def run(cfg: Config, out: Path) -> Report:
    """Evaluate policies both ways, solve the world three ways, draw the optimal policies."""
    rep = Report()
    world = GridWorld.example(r_forbidden=cfg.r_forbidden, r_boundary=cfg.r_boundary,
                              gamma=cfg.gamma)
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. Bellman equation: closed form (linear solve) vs iterative fixed point.
    policies = [dp.uniform_policy(world)]
    for _ in range(cfg.random_policies):
        logits = torch.randn(world.n_states, world.n_actions, generator=gen, dtype=torch.float64)
        policies.append(torch.softmax(2 * logits, -1))
    gap = max(float((dp.evaluate_policy(world, p) - dp.evaluate_policy(world, p, "iterative"))
                    .abs().max()) for p in policies)
    rep.claim("iterative policy evaluation vs closed form, max |Δv|", gap, 1e-8, "<=",
              detail=f"{len(policies)} policies (uniform + random), float64")

    # 2. Control: value iteration, policy iteration, truncated policy iteration.
    results = {"value iteration": dp.value_iteration(world),
               "policy iteration": dp.policy_iteration(world),
               f"truncated PI (j={cfg.tpi_j})": dp.truncated_policy_iteration(world, cfg.tpi_j)}
    ref = results["policy iteration"]  # exact evaluation at every step
    sets = dp.optimal_action_sets(ref.q)
    v_gap = max(float((r.values - ref.values).abs().max()) for r in results.values())
    rep.claim("VI / PI / TPI optimal values, max |Δv*|", v_gap, 1e-8, "<=",
              detail="each algorithm run to ||v_k - v_k-1||_inf <= 1e-10")
    idx = torch.arange(world.n_states)
    agree = min(int(sets[idx, r.policy.argmax(-1)].sum()) for r in results.values())
    same_sets = all(torch.equal(dp.optimal_action_sets(r.q), sets) for r in results.values())
    rep.claim("states where all three greedy policies take an optimal action", agree,
              world.n_states, ">=", unit="states",
              detail=f"optimal action sets identical across algorithms: {same_sets}")
    for name, r in results.items():
        key = name.split(" (")[0].replace(" ", "_")
        rep.metric(f"{key}_iterations", r.iterations)
    residual = float((ref.values - ref.q.max(-1).values).abs().max())
    rep.metric("bellman_optimality_residual", residual)
    rep.metric("v_star_mean", float(ref.values.mean()))
    rep.metric("states_with_tied_optimal_actions", int((sets.sum(-1) > 1).sum()))

    # 3. The same world with a harsher forbidden penalty changes the optimal policy.
    harsh = GridWorld.example(r_forbidden=-10.0, r_boundary=cfg.r_boundary, gamma=cfg.gamma)
    harsh_res = dp.value_iteration(harsh)
    harsh_sets = dp.optimal_action_sets(harsh_res.q)
    enters = int(harsh.forbidden_mask[harsh.next_state[idx, harsh_res.policy.argmax(-1)]]
                 [~harsh.forbidden_mask].sum())
    rep.metric("r_forbidden_-10_moves_into_forbidden", enters)

    with figure(out / "optimal_policy.png", ncols=3, size=(15, 4.4)) as (fig, axes):
        axes = axes.ravel()
        policy_grid(axes[0], world, dp.evaluate_policy(world, policies[0]),
                  torch.ones(world.n_states, world.n_actions, dtype=torch.bool),
                  "uniform policy: v_pi (closed form)")
        policy_grid(axes[1], world, ref.values, sets,
                  f"optimal v* and optimal actions (r_forbidden={cfg.r_forbidden:g})")
        policy_grid(axes[2], harsh, harsh_res.values, harsh_sets,
                  "optimal v* and actions (r_forbidden=-10)")
    rep.figure(out / "optimal_policy.png")
    with figure(out / "convergence.png") as (fig, ax):
        curves(ax, {k: [max(h, 1e-16) for h in r.history] for k, r in results.items()},
               xlabel="iteration k", ylabel="||v_k - v_{k-1}||_inf", logy=True,
               title="convergence to v*")
    rep.figure(out / "convergence.png")
    rep.note(f"World: {world!r}. Optimal action sets are compared with a tolerance of 1e-6 on q*; "
             f"{int((sets.sum(-1) > 1).sum())} states have several optimal actions.")
    rep.note("Truncated PI with j=1 is value iteration and with j=math.inf policy iteration. "
             f"With r_forbidden=-10 the optimal policy enters {enters} forbidden cells from "
             "outside (with -1 it cuts through them).")
    return rep
