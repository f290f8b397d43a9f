"""Read run folders back: every ``metrics.json`` a run or a tour wrote, grouped per method.

A tour folder holds ``<id>/metrics.json`` (the experiment) and ``<id>/bench/metrics.json``
(its benchmark); a single run folder holds one ``metrics.json``. :func:`load_runs` finds them
all under the folders it is given; :func:`group_runs` files them by method, kind and mode so
that a default and a ``--full`` run of the same method stand side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODE_ORDER", "NoRunsError", "Run", "group_runs", "load_runs", "modes_present"]

#: The order run modes are shown in, left to right.
MODE_ORDER = ("smoke", "default", "full")


class NoRunsError(LookupError):
    """No ``metrics.json`` of a run was found under the folders given."""


@dataclass(frozen=True)
class Run:
    """One run (or benchmark) as written by the runner.

    Attributes:
        folder: The run folder (holds metrics.json and the figures).
        data: The parsed ``metrics.json``.
    """

    folder: Path
    data: dict[str, Any]

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def kind(self) -> str:
        """``"run"`` (the experiment) or ``"bench"``."""
        return self.data.get("kind", "run")

    @property
    def mode(self) -> str:
        """``"smoke"``, ``"default"`` or ``"full"``."""
        return self.data.get("mode") or ("smoke" if self.data.get("smoke") else "default")

    @property
    def claims(self) -> list[dict[str, Any]]:
        return list(self.data.get("claims") or [])

    @property
    def error(self) -> str | None:
        return self.data.get("error")

    def figure_paths(self) -> list[Path]:
        """The run's figures as paths (relative entries resolved against the folder)."""
        return [p if p.is_absolute() else self.folder / p
                for p in (Path(f) for f in self.data.get("figures") or [])]


def load_runs(dirs: list[Path]) -> list[Run]:
    """Every run under ``dirs`` (searched recursively), in the order the folders were given.

    Raises:
        NoRunsError: no run was found.
    """
    runs = []
    for d in dirs:
        for path in sorted(Path(d).rglob("metrics.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("method"):
                runs.append(Run(path.parent, data))
    if not runs:
        raise NoRunsError("no run folder (metrics.json) under " + ", ".join(map(str, dirs)))
    return runs


def group_runs(runs: list[Run]) -> dict[str, dict[tuple[str, str], Run]]:
    """``{method: {(kind, mode): run}}``; a later run replaces an earlier one of the same key."""
    grouped: dict[str, dict[tuple[str, str], Run]] = {}
    for run in runs:
        grouped.setdefault(run.method, {})[(run.kind, run.mode)] = run
    return grouped


def modes_present(runs: list[Run]) -> list[str]:
    """The run modes found, in :data:`MODE_ORDER`."""
    found = {r.mode for r in runs}
    return [m for m in MODE_ORDER if m in found]
