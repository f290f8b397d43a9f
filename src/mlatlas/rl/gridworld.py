"""Grid world: the finite Markov decision process the RL foundations are taught on.

An agent moves on a ``rows × cols`` board with five actions (up, right, down, left, stay).
Trying to leave the board keeps it in place and costs ``r_boundary``; forbidden cells can be
entered but cost ``r_forbidden``; moving into (or staying at) the target earns ``r_target``;
every other move earns ``r_other``. The task is continuing (no terminal state) and discounted
by ``gamma``. :class:`GridWorld` exposes the model as tensors ``P[s, a, s']`` and ``R[s, a]``
for dynamic programming; :class:`GridWorldEnv` wraps it in the gymnasium ``Env`` API for
model-free methods and is registered as ``mlatlas/GridWorld-v0``.

Source: S. Zhao 2025, *Mathematical Foundations of Reinforcement Learning*, ch. 1-4 (the grid
world example and its 5×5 layout); Bellman 1957 for the Bellman equation.

Notation (states are row-major: ``s = row * cols + col``):

====================  ==========================================================
``S = rows * cols``   number of states
``A = 5``             actions 0..4 = up, right, down, left, stay
``P[s, a, s']``       transition probability p(s' | s, a) (deterministic here)
``R[s, a]``           expected immediate reward r(s, a) = sum_r r p(r | s, a)
``gamma``             discount rate in [0, 1)
====================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

__all__ = ["ACTIONS", "ARROWS", "ENV_ID", "MOVES", "GridWorld", "GridWorldEnv"]

#: Action names, in index order.
ACTIONS: tuple[str, ...] = ("up", "right", "down", "left", "stay")
#: (d_row, d_col) of each action.
MOVES: tuple[tuple[int, int], ...] = ((-1, 0), (0, 1), (1, 0), (0, -1), (0, 0))
#: One glyph per action for text renderings.
ARROWS: tuple[str, ...] = ("↑", "→", "↓", "←", "○")
#: The gymnasium id :class:`GridWorldEnv` is registered under.
ENV_ID = "mlatlas/GridWorld-v0"

Cell = tuple[int, int]


def _cell(value: Any, name: str, rows: int, cols: int) -> Cell:
    """Validate one ``(row, col)`` pair that must lie on the grid."""
    try:
        row, col = value
        row, col = int(row), int(col)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (row, col) pair of ints, got {value!r}") from None
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"{name} {(row, col)} is off the {rows}x{cols} grid "
                         f"(rows 0..{rows - 1}, cols 0..{cols - 1})")
    return row, col


class GridWorld:
    """A deterministic grid-world MDP with its model as tensors.

    Args:
        rows: Number of rows (≥ 1).
        cols: Number of columns (≥ 1).
        forbidden: ``(row, col)`` cells that may be entered at a cost of ``r_forbidden``.
        target: The ``(row, col)`` target cell; must not be forbidden.
        r_boundary: Reward for trying to step off the grid (the agent stays put).
        r_forbidden: Reward for entering (or staying in) a forbidden cell.
        r_target: Reward for entering (or staying at) the target.
        r_other: Reward for any other move.
        gamma: Discount rate in ``[0, 1)``.

    Attributes:
        P: ``(S, A, S)`` float64 transition tensor.
        R: ``(S, A)`` float64 expected-reward tensor.
        next_state: ``(S, A)`` int64 successor of each state-action pair.

    Raises:
        ValueError: a cell off the grid, the target inside a forbidden cell, ``gamma``
            outside ``[0, 1)`` or non-positive ``rows``/``cols``.
    """

    n_actions = len(ACTIONS)

    def __init__(self, rows: int, cols: int, forbidden: Iterable[Sequence[int]], target: Sequence[int],
                 r_boundary: float = -1.0, r_forbidden: float = -1.0, r_target: float = 1.0,
                 r_other: float = 0.0, gamma: float = 0.9) -> None:
        for name, value in (("rows", rows), ("cols", cols)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(gamma, (int, float)) or not 0.0 <= float(gamma) < 1.0:
            raise ValueError(f"gamma must be a float in [0, 1), got {gamma!r}")
        self.rows, self.cols = int(rows), int(cols)
        self.forbidden: tuple[Cell, ...] = tuple(sorted(
            {_cell(c, "forbidden cell", self.rows, self.cols) for c in forbidden}))
        self.target: Cell = _cell(target, "target", self.rows, self.cols)
        if self.target in self.forbidden:
            raise ValueError(f"target {self.target} lies inside a forbidden cell; forbidden "
                             f"cells are {list(self.forbidden)}")
        self.r_boundary, self.r_forbidden = float(r_boundary), float(r_forbidden)
        self.r_target, self.r_other = float(r_target), float(r_other)
        self.gamma = float(gamma)
        self.next_state, self.R = self._build()
        S, A = self.n_states, self.n_actions
        self.P = torch.zeros(S, A, S, dtype=torch.float64)
        self.P.scatter_(2, self.next_state.unsqueeze(-1), 1.0)  # p(s'|s,a) = 1 for the successor

    @classmethod
    def example(cls, **overrides: Any) -> GridWorld:
        """The 5×5 world of Zhao's book: six forbidden cells, target at (3, 2).

        Args:
            **overrides: Any constructor argument (e.g. ``r_forbidden=-10``).
        """
        kwargs: dict[str, Any] = dict(
            rows=5, cols=5, forbidden=[(1, 1), (1, 2), (2, 2), (3, 1), (3, 3), (4, 1)],
            target=(3, 2))
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- indexing ------------------------------------------------------------------------
    @property
    def n_states(self) -> int:
        """``S = rows * cols``."""
        return self.rows * self.cols

    @property
    def target_state(self) -> int:
        """State index of the target."""
        return self.state(self.target)

    @property
    def forbidden_mask(self) -> torch.Tensor:
        """``(S,)`` bool, True on forbidden states."""
        mask = torch.zeros(self.n_states, dtype=torch.bool)
        for c in self.forbidden:
            mask[self.state(c)] = True
        return mask

    def state(self, cell: Sequence[int]) -> int:
        """Row-major state index of ``(row, col)``."""
        row, col = _cell(cell, "cell", self.rows, self.cols)
        return row * self.cols + col

    def cell(self, state: int) -> Cell:
        """``(row, col)`` of a state index."""
        if not 0 <= int(state) < self.n_states:
            raise ValueError(f"state must be in [0, {self.n_states}), got {state!r}")
        return divmod(int(state), self.cols)

    # -- model ---------------------------------------------------------------------------
    def transition(self, cell: Cell, action: int) -> tuple[Cell, float]:
        """Successor cell and reward of one move (the rules in the module docstring)."""
        row, col = cell
        d_row, d_col = MOVES[action]
        nr, nc = row + d_row, col + d_col
        if not (0 <= nr < self.rows and 0 <= nc < self.cols):
            return (row, col), self.r_boundary  # bumped into the wall: stay, pay r_boundary
        if (nr, nc) == self.target:
            return (nr, nc), self.r_target
        if (nr, nc) in self.forbidden:
            return (nr, nc), self.r_forbidden
        return (nr, nc), self.r_other

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        S, A = self.n_states, self.n_actions
        nxt = torch.empty(S, A, dtype=torch.int64)
        rew = torch.empty(S, A, dtype=torch.float64)
        for s in range(S):
            for a in range(A):
                cell, r = self.transition(self.cell(s), a)
                nxt[s, a] = self.state(cell)
                rew[s, a] = r
        return nxt, rew

    def render(self, policy: torch.Tensor | None = None,
               values: torch.Tensor | None = None) -> str:
        """Text picture: ``T`` target, ``#`` forbidden, ``.`` free; or arrows/values.

        Args:
            policy: Optional ``(S, A)`` policy; each cell shows its most probable action.
            values: Optional ``(S,)`` state values, printed next to each cell.
        """
        lines = []
        for row in range(self.rows):
            parts = []
            for col in range(self.cols):
                s = row * self.cols + col
                mark = "T" if (row, col) == self.target else (
                    "#" if (row, col) in self.forbidden else ".")
                if policy is not None:
                    mark += ARROWS[int(torch.as_tensor(policy)[s].argmax())]
                if values is not None:
                    mark += f"{float(values[s]):7.2f}"
                parts.append(mark)
            lines.append(" ".join(parts))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"GridWorld(rows={self.rows}, cols={self.cols}, forbidden={list(self.forbidden)}, "
                f"target={self.target}, r_boundary={self.r_boundary}, "
                f"r_forbidden={self.r_forbidden}, r_target={self.r_target}, "
                f"r_other={self.r_other}, gamma={self.gamma})")


class GridWorldEnv(gymnasium.Env):
    """The grid world behind the gymnasium ``Env`` API (observations are state indices).

    The task is continuing: ``terminated`` stays False unless ``terminate_at_target``;
    ``gymnasium.make("mlatlas/GridWorld-v0")`` adds a 100-step time limit.

    Args:
        world: The :class:`GridWorld`; built from ``world_kwargs`` (or
            :meth:`GridWorld.example`) when None.
        start: Start cell ``(row, col)``; uniform over all cells when None. ``reset``'s
            ``options={"state": s}`` or ``{"cell": (row, col)}`` overrides it once
            (exploring starts).
        terminate_at_target: End the episode when the target is reached.
        render_mode: None or ``"ansi"`` (``render()`` returns the board as text).
        **world_kwargs: :class:`GridWorld` arguments, when ``world`` is None.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, world: GridWorld | None = None, *, start: Sequence[int] | None = None,
                 terminate_at_target: bool = False, render_mode: str | None = None,
                 **world_kwargs: Any) -> None:
        if world is not None and world_kwargs:
            raise TypeError(f"pass either world or GridWorld arguments, got both "
                            f"(world_kwargs={sorted(world_kwargs)})")
        if world is None:
            world = GridWorld(**world_kwargs) if world_kwargs else GridWorld.example()
        if not isinstance(world, GridWorld):
            raise TypeError(f"world must be a GridWorld, got {type(world).__name__}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.world = world
        self.start = None if start is None else world.state(start)
        self.terminate_at_target = bool(terminate_at_target)
        self.render_mode = render_mode
        self.observation_space = spaces.Discrete(world.n_states)
        self.action_space = spaces.Discrete(world.n_actions)
        self._next = world.next_state.tolist()
        self._reward = world.R.tolist()
        self._state = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Start an episode; ``options`` may pin the start (``"state"`` or ``"cell"``)."""
        super().reset(seed=seed)
        options = options or {}
        if "state" in options:
            state = int(options["state"])
            if not 0 <= state < self.world.n_states:
                raise ValueError(f"options['state'] must be in [0, {self.world.n_states}), "
                                 f"got {state}")
        elif "cell" in options:
            state = self.world.state(options["cell"])
        elif self.start is not None:
            state = self.start
        else:
            state = int(self.np_random.integers(self.world.n_states))
        self._state = state
        return state, {"cell": self.world.cell(state)}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        """Move once: ``(next state, reward, terminated, truncated=False, {"cell": ...})``."""
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an int in [0, {self.world.n_actions}), "
                             f"got {action!r}")
        a = int(action)
        reward = self._reward[self._state][a]
        self._state = self._next[self._state][a]
        terminated = self.terminate_at_target and self._state == self.world.target_state
        return self._state, float(reward), terminated, False, {
            "cell": self.world.cell(self._state)}

    def render(self) -> str | None:
        """The board as text with the agent as ``@`` (``render_mode="ansi"``)."""
        if self.render_mode != "ansi":
            return None
        board = [list(line.replace(" ", "")) for line in self.world.render().splitlines()]
        row, col = self.world.cell(self._state)
        board[row][col] = "@"
        return "\n".join(" ".join(line) for line in board) + "\n"


# Registration is a dict insert: cheap, and idempotent across re-imports.
if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="mlatlas.rl.gridworld:GridWorldEnv",
                       max_episode_steps=100)
