"""The episode returns of a stable-baselines3 training run, as the experiments plot them.

The TRPO and DDPG experiments train sb3-contrib's / stable-baselines3's agents side by side
with ours and draw both learning curves on one axis. SB3 wraps each environment in a
``Monitor``, which adds ``info["episode"] = {"r": return, "l": length, ...}`` when an episode
ends; :func:`episode_recorder` collects those at the environment step they happen.

Example::

    recorder = episode_recorder()
    model.learn(10_000, callback=recorder)
    plt.plot(recorder.steps, recorder.returns)
"""

from __future__ import annotations

from typing import Any


def episode_recorder() -> Any:
    """An SB3 callback that records every finished episode's return.

    Returns:
        A ``stable_baselines3.common.callbacks.BaseCallback`` with two lists, filled during
        ``learn``: ``returns`` (the undiscounted return of each finished episode) and
        ``steps`` (the total environment steps when it finished).
    """
    from stable_baselines3.common.callbacks import BaseCallback  # a test/ref dependency

    class EpisodeRecorder(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.returns: list[float] = []
            self.steps: list[int] = []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:  # Monitor's record of a finished episode
                    self.returns.append(float(info["episode"]["r"]))
                    self.steps.append(int(self.num_timesteps))
            return True

    return EpisodeRecorder()
