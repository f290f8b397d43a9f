"""Dynamic programming on a known model: the Bellman equation, value and policy iteration.

With the model ``(P, R)`` of a finite MDP, a policy's state values solve the Bellman equation
``v = r_pi + gamma P_pi v`` — in closed form by one linear solve, or iteratively by the
contraction ``v_{k+1} = r_pi + gamma P_pi v_k``. Optimal values solve the Bellman optimality
equation ``v = max_pi (r_pi + gamma P_pi v)``: value iteration applies that contraction,
policy iteration alternates exact evaluation and greedy improvement, and truncated policy
iteration evaluates with ``j`` sweeps only (``j = 1`` is value iteration, ``j = inf`` is
policy iteration).

Source: Bellman 1957, *Dynamic Programming*; Howard 1960 (policy iteration); S. Zhao 2025,
*Mathematical Foundations of Reinforcement Learning*, ch. 2-4.

Notation:

=================  ============================================================
``pi[s, a]``        policy pi(a | s), rows sum to 1; shape ``(S, A)``
``r_pi[s]``         sum_a pi(a|s) R[s, a]
``P_pi[s, s']``     sum_a pi(a|s) P[s, a, s']
``v[s]``            state value v_pi(s); shape ``(S,)``
``q[s, a]``         action value R[s, a] + gamma sum_s' P[s, a, s'] v[s']
=================  ============================================================

Everything is float64 so that the iterative and closed-form answers agree to ~1e-12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mlatlas.rl.gridworld import GridWorld

__all__ = [
    "DPResult",
    "action_values",
    "check_policy",
    "evaluate_policy",
    "greedy_policy",
    "optimal_action_sets",
    "policy_iteration",
    "policy_model",
    "truncated_policy_iteration",
    "uniform_policy",
    "value_iteration",
]


@dataclass
class DPResult:
    """What a control algorithm returns.

    Attributes:
        values: ``(S,)`` the final state values.
        q: ``(S, A)`` action values of ``values``.
        policy: ``(S, A)`` deterministic greedy policy (one-hot rows).
        iterations: Outer iterations run.
        history: ``||v_k - v_{k-1}||_inf`` per outer iteration.
    """

    values: torch.Tensor
    q: torch.Tensor
    policy: torch.Tensor
    iterations: int
    history: list[float] = field(default_factory=list)


def check_policy(world: GridWorld, policy: torch.Tensor, atol: float = 1e-8) -> torch.Tensor:
    """Validate a stochastic policy and return it as float64.

    Args:
        world: The MDP.
        policy: ``(S, A)`` probabilities; non-negative, rows summing to 1.
        atol: Tolerance on the row sums.

    Raises:
        TypeError: ``policy`` is not a floating tensor/array.
        ValueError: wrong shape, NaN/inf or negative entries, or rows that do not sum to 1.
    """
    pi = torch.as_tensor(policy)
    if not pi.is_floating_point():
        raise TypeError(f"policy must hold floating-point probabilities, got dtype {pi.dtype}")
    pi = pi.to(torch.float64)
    expected = (world.n_states, world.n_actions)
    if tuple(pi.shape) != expected:
        raise ValueError(f"policy must have shape (S, A) = {expected}, got {tuple(pi.shape)}")
    if not bool(torch.isfinite(pi).all()):
        s = int((~torch.isfinite(pi)).any(-1).nonzero()[0])
        raise ValueError(f"policy must be finite; row {s} holds NaN or inf")
    if bool((pi < 0).any()):
        raise ValueError("policy has negative probabilities")
    sums = pi.sum(-1)
    bad = (sums - 1).abs() > atol
    if bool(bad.any()):
        s = int(bad.nonzero()[0])
        raise ValueError(f"policy rows must sum to 1; row {s} sums to {float(sums[s]):.6g}")
    return pi


def uniform_policy(world: GridWorld) -> torch.Tensor:
    """``(S, A)`` policy choosing every action with probability 1/A."""
    return torch.full((world.n_states, world.n_actions), 1.0 / world.n_actions,
                      dtype=torch.float64)


def policy_model(world: GridWorld, policy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Markov reward process a policy induces.

    Returns:
        ``r_pi`` of shape ``(S,)`` and ``P_pi`` of shape ``(S, S)``.
    """
    pi = check_policy(world, policy)
    r_pi = (pi * world.R).sum(-1)  # r_pi(s) = sum_a pi(a|s) r(s,a)
    P_pi = torch.einsum("sa,sat->st", pi, world.P)  # P_pi(s,s') = sum_a pi(a|s) p(s'|s,a)
    return r_pi, P_pi


def evaluate_policy(world: GridWorld, policy: torch.Tensor, method: str = "closed_form",
                    tol: float = 1e-12, max_iter: int = 100_000,
                    v0: torch.Tensor | None = None) -> torch.Tensor:
    """State values of ``policy`` from the Bellman equation.

    Args:
        world: The MDP.
        policy: ``(S, A)`` stochastic policy.
        method: ``"closed_form"`` (one linear solve) or ``"iterative"`` (fixed point).
        tol: Iterative only: stop when ``||v_{k+1} - v_k||_inf <= tol``.
        max_iter: Iterative only: at most this many sweeps.
        v0: Iterative only: ``(S,)`` start values (zeros by default).

    Returns:
        ``(S,)`` float64 state values.

    Raises:
        ValueError: bad policy, unknown ``method`` or ``tol``/``max_iter`` out of range.
    """
    r_pi, P_pi = policy_model(world, policy)
    if method == "closed_form":
        eye = torch.eye(world.n_states, dtype=torch.float64)
        return torch.linalg.solve(eye - world.gamma * P_pi, r_pi)  # v = (I - gamma P_pi)^-1 r_pi
    if method != "iterative":
        raise ValueError(f"method must be 'closed_form' or 'iterative', got {method!r}")
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    v = torch.zeros(world.n_states, dtype=torch.float64) if v0 is None else v0.double().clone()
    for _ in range(max_iter):
        v_next = r_pi + world.gamma * P_pi @ v  # v_{k+1} = r_pi + gamma P_pi v_k
        done = float((v_next - v).abs().max()) <= tol
        v = v_next
        if done:
            break
    return v


def action_values(world: GridWorld, v: torch.Tensor) -> torch.Tensor:
    """``(S, A)`` action values ``q = R + gamma P v`` of state values ``v`` ``(S,)``."""
    v = torch.as_tensor(v, dtype=torch.float64)
    if tuple(v.shape) != (world.n_states,):
        raise ValueError(f"v must have shape ({world.n_states},), got {tuple(v.shape)}")
    return world.R + world.gamma * world.P @ v  # q(s,a) = r(s,a) + gamma sum_s' p(s'|s,a) v(s')


def greedy_policy(q: torch.Tensor) -> torch.Tensor:
    """Deterministic policy ``(S, A)`` taking ``argmax_a q[s, a]`` (lowest index on ties)."""
    q = torch.as_tensor(q)
    if q.dim() != 2:
        raise ValueError(f"q must have shape (S, A), got {tuple(q.shape)}")
    pi = torch.zeros(q.shape, dtype=torch.float64)
    pi[torch.arange(q.shape[0]), q.argmax(-1)] = 1.0
    return pi


def optimal_action_sets(q: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """``(S, A)`` bool: the actions within ``atol`` of the best action value in each state.

    Where several actions tie, any of them is optimal; compare learned policies against
    these sets rather than against one argmax.
    """
    q = torch.as_tensor(q, dtype=torch.float64)
    return q >= q.max(-1, keepdim=True).values - atol


def value_iteration(world: GridWorld, tol: float = 1e-10, max_iter: int = 10_000,
                    v0: torch.Tensor | None = None) -> DPResult:
    """Value iteration ``v_{k+1} = max_a (R + gamma P v_k)``.

    Args:
        world: The MDP.
        tol: Stop when ``||v_{k+1} - v_k||_inf <= tol``.
        max_iter: At most this many sweeps.
        v0: ``(S,)`` start values (zeros by default).
    """
    return truncated_policy_iteration(world, 1, tol=tol, max_iter=max_iter, v0=v0)


def policy_iteration(world: GridWorld, policy0: torch.Tensor | None = None, tol: float = 1e-10,
                     max_iter: int = 1_000) -> DPResult:
    """Policy iteration: exact evaluation (linear solve), then greedy improvement.

    Args:
        world: The MDP.
        policy0: ``(S, A)`` initial policy (uniform by default).
        tol: Also stop when the values change by at most ``tol`` (guards tie flips).
        max_iter: At most this many improvement steps.
    """
    pi = uniform_policy(world) if policy0 is None else check_policy(world, policy0)
    v_old = evaluate_policy(world, pi)
    history: list[float] = []
    for _ in range(max_iter):
        pi_next = greedy_policy(action_values(world, v_old))  # pi_{k+1} = argmax_pi (r + gamma P v)
        v = evaluate_policy(world, pi_next)  # v_{pi_{k+1}}: solve the Bellman equation
        history.append(float((v - v_old).abs().max()))
        stable = torch.equal(pi_next, pi) or history[-1] <= tol
        pi, v_old = pi_next, v
        if stable:
            break
    q = action_values(world, v_old)
    return DPResult(v_old, q, greedy_policy(q), len(history), history)


def truncated_policy_iteration(world: GridWorld, j: int | float, tol: float = 1e-10,
                               max_iter: int = 10_000, v0: torch.Tensor | None = None) -> DPResult:
    """Truncated policy iteration: greedy improvement, then ``j`` evaluation sweeps.

    Args:
        world: The MDP.
        j: Evaluation sweeps per iteration, ``>= 1``; ``math.inf`` evaluates exactly
            (policy iteration), ``1`` is value iteration.
        tol: Stop when ``||v_{k+1} - v_k||_inf <= tol``.
        max_iter: At most this many outer iterations.
        v0: ``(S,)`` start values (zeros by default).

    Raises:
        ValueError: ``j < 1`` or not an int (nor ``inf``).
    """
    if not (j == math.inf or (isinstance(j, int) and not isinstance(j, bool) and j >= 1)):
        raise ValueError(f"j must be an int >= 1 or math.inf, got {j!r}")
    v = torch.zeros(world.n_states, dtype=torch.float64) if v0 is None else v0.double().clone()
    history: list[float] = []
    for _ in range(max_iter):
        pi = greedy_policy(action_values(world, v))  # policy update: greedy w.r.t. q_k
        if j == math.inf:
            v_next = evaluate_policy(world, pi)
        else:
            r_pi, P_pi = policy_model(world, pi)
            v_next = v
            for _ in range(int(j)):  # j sweeps of v <- r_pi + gamma P_pi v, started at v_k
                v_next = r_pi + world.gamma * P_pi @ v_next
        history.append(float((v_next - v).abs().max()))
        v = v_next
        if history[-1] <= tol:
            break
    q = action_values(world, v)
    return DPResult(v, q, greedy_policy(q), len(history), history)
