"""Grid world model and its gymnasium Env: rules, tensors, env checker, registration, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

from mlatlas.rl.gridworld import ENV_ID, GridWorld, GridWorldEnv

UP, RIGHT, DOWN, LEFT, STAY = range(5)


def test_example_layout_and_row_major_states():
    w = GridWorld.example()
    assert (w.rows, w.cols, w.n_states, w.n_actions) == (5, 5, 25, 5)
    assert w.target == (3, 2) and w.target_state == 17
    assert w.state((1, 2)) == 7 and w.cell(7) == (1, 2)
    assert w.forbidden_mask.sum() == 6 and bool(w.forbidden_mask[w.state((4, 1))])


def test_transition_rules_hand_checked():
    w = GridWorld.example(r_boundary=-2.0, r_forbidden=-3.0, r_target=5.0, r_other=0.5)
    s = w.state
    cases = [  # (cell, action) -> (next cell, reward), derived from the rules by hand
        ((0, 0), UP, (0, 0), -2.0),  # bump into the top wall: stay, r_boundary
        ((0, 0), LEFT, (0, 0), -2.0),
        ((4, 4), DOWN, (4, 4), -2.0),
        ((0, 0), RIGHT, (0, 1), 0.5),  # ordinary move
        ((0, 0), STAY, (0, 0), 0.5),
        ((0, 1), DOWN, (1, 1), -3.0),  # entering a forbidden cell is allowed but costs
        ((1, 1), STAY, (1, 1), -3.0),  # staying in it costs again
        ((2, 2), DOWN, (3, 2), 5.0),  # forbidden -> target
        ((3, 2), STAY, (3, 2), 5.0),  # staying at the target keeps paying
        ((3, 2), LEFT, (3, 1), -3.0),  # target -> forbidden
        ((3, 0), RIGHT, (3, 1), -3.0),
    ]
    for cell, a, nxt, r in cases:
        assert int(w.next_state[s(cell), a]) == s(nxt), (cell, a)
        assert float(w.R[s(cell), a]) == r, (cell, a)
        assert float(w.P[s(cell), a, s(nxt)]) == 1.0


def test_tensors_shapes_dtypes_and_stochasticity_non_square():
    w = GridWorld(3, 4, forbidden=[(1, 1), (0, 3)], target=(2, 3), gamma=0.8)
    assert w.P.shape == (12, 5, 12) and w.R.shape == (12, 5)
    assert w.P.dtype == torch.float64 and w.R.dtype == torch.float64
    torch.testing.assert_close(w.P.sum(-1), torch.ones(12, 5, dtype=torch.float64), atol=0, rtol=0)
    assert int(w.next_state[w.state((2, 3)), RIGHT]) == w.state((2, 3))  # right wall
    assert float(w.R[w.state((2, 3)), RIGHT]) == -1.0  # bumping beats staying at the target
    assert int(w.next_state[w.state((1, 3)), UP]) == w.state((0, 3))
    assert "T" in w.render() and w.render().count("#") == 2


def test_single_row_world():
    w = GridWorld(1, 3, forbidden=[], target=(0, 2))
    assert int(w.next_state[0, UP]) == 0 and float(w.R[0, UP]) == -1.0
    assert int(w.next_state[1, RIGHT]) == 2 and float(w.R[1, RIGHT]) == 1.0


def test_env_passes_gymnasium_env_checker(reference):
    gym = reference("gymnasium")
    from gymnasium.utils.env_checker import check_env

    env = gym.make(ENV_ID, render_mode="ansi").unwrapped  # has a spec: render modes checked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    assert [str(c.message) for c in caught] == []
    check_env(GridWorldEnv(GridWorld(2, 3, forbidden=[(0, 1)], target=(1, 2))),
              skip_render_check=True)


def test_env_steps_agree_with_the_model_tensors():
    w = GridWorld(3, 4, forbidden=[(1, 1), (2, 0)], target=(0, 3), r_forbidden=-10.0)
    env = GridWorldEnv(w)
    for s in range(w.n_states):
        for a in range(w.n_actions):
            obs, info = env.reset(options={"state": s})
            assert obs == s and info["cell"] == w.cell(s)
            nxt, r, terminated, truncated, info = env.step(a)
            assert nxt == int(w.next_state[s, a]) and r == float(w.R[s, a])
            assert not terminated and not truncated and info["cell"] == w.cell(nxt)


def test_env_reset_seed_start_and_terminate_at_target(reference):
    gym = reference("gymnasium")
    env = gym.make(ENV_ID)
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    assert a == b
    steps = 0
    env.reset(seed=0, options={"cell": (0, 0)})
    while True:
        *_, terminated, truncated, _ = env.step(STAY)
        steps += 1
        if terminated or truncated:
            break
    assert truncated and steps == 100  # registered with a 100-step time limit
    env = GridWorldEnv(start=(2, 2), terminate_at_target=True)
    assert env.reset()[0] == 12
    assert env.step(DOWN)[2] is True
    made = gym.make(ENV_ID, rows=2, cols=2, forbidden=[(0, 1)], target=(1, 1))
    assert made.observation_space.n == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target=(1, 1)), "target .* inside a forbidden cell"),
        (dict(target=(5, 0)), "target .* off the 5x5 grid"),
        (dict(forbidden=[(0, 5)]), "forbidden cell .* off the 5x5 grid"),
        (dict(forbidden=[(-1, 0)]), "forbidden cell .* off"),
        (dict(gamma=1.0), "gamma must be a float in \\[0, 1\\)"),
        (dict(gamma=-0.1), "gamma"),
        (dict(rows=0), "rows must be a positive int"),
        (dict(cols=2.5), "cols must be a positive int"),
        (dict(target="a"), "target must be a \\(row, col\\) pair"),
    ],
)
def test_bad_world_arguments(kwargs, match):
    base = dict(rows=5, cols=5, forbidden=[(1, 1)], target=(3, 2))
    with pytest.raises(ValueError, match=match):
        GridWorld(**{**base, **kwargs})


def test_bad_env_arguments():
    with pytest.raises(TypeError, match="either world or GridWorld arguments"):
        GridWorldEnv(GridWorld.example(), rows=3)
    with pytest.raises(ValueError, match="render_mode"):
        GridWorldEnv(render_mode="human")
    env = GridWorldEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be an int in \\[0, 5\\)"):
        env.step(7)
    with pytest.raises(ValueError, match="options\\['state'\\]"):
        env.reset(options={"state": 25})
    with pytest.raises(ValueError, match="off the 5x5 grid"):
        GridWorldEnv(start=(9, 9))


def test_policy_grid_draws_one_arrow_per_move_and_a_ring_per_stay(tmp_path):
    from matplotlib.patches import FancyArrow

    from mlatlas.plots import figure, policy_grid

    w = GridWorld(2, 3, forbidden=[(0, 1)], target=(1, 2))
    actions = torch.zeros(w.n_states, w.n_actions, dtype=torch.bool)
    actions[:, RIGHT] = True
    actions[0, DOWN] = True
    actions[w.target_state] = False
    actions[w.target_state, STAY] = True
    with figure(tmp_path / "grid.png") as (_, ax):
        policy_grid(ax, w, torch.arange(w.n_states, dtype=torch.float64), actions, "t")
        arrows = [p for p in ax.patches if isinstance(p, FancyArrow)]
        assert len(arrows) == int(actions[:, :STAY].sum()) == 6
        assert len(ax.lines) == 1  # the ring of "stay" at the target
        assert len(ax.texts) == w.n_states and ax.get_title() == "t"
    assert (tmp_path / "grid.png").stat().st_size > 0
