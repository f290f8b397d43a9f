"""A tiny stand-in experiment used by the foundation tests (not a catalog row)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Literal

from mlatlas import catalog
from mlatlas.catalog import Method

MODULE = "mlatlas_test_fake_experiment"


@dataclass
class Config:
    """Defaults are the embedded default run."""

    steps: int = 3  # loop length
    lr: float = 0.5  # a float field
    noisy: bool = False  # a bool field
    target: float = 1.0  # what the claim compares against
    mode: Literal["a", "b"] = "a"  # a Literal field
    sizes: tuple[int, ...] = (1, 2)  # a tuple field
    seed: int = 0

    @classmethod
    def smoke(cls) -> Config:
        return cls(steps=1)

    @classmethod
    def full(cls) -> Config:
        return cls(steps=10)


def run(cfg: Config, out):
    import torch

    from mlatlas.plots import curves, figure
    from mlatlas.report import Report

    rep = Report()
    steps = cfg.steps
    values = [float(torch.rand(()).item()) for _ in range(steps)]
    rep.metric("steps_run", steps)
    rep.metric("first_draw", values[0])
    rep.metric("loss[bracketed]", 0.5)  # rich markup must not swallow it
    rep.claim("steps reach target", steps, cfg.target, ">=", target_source="target")
    with figure(out / "curve.png") as (fig, ax):
        curves(ax, {"draws": values})
    rep.figure(out / "curve.png")
    rep.note("fake experiment")
    return rep


def bench(cfg: Config, out):
    from mlatlas.report import Report

    rep = Report()
    rep.metric("ratio", 2.0)
    rep.claim("ours vs baseline speed-up", 2.0, 1.0, ">=", unit="x")
    return rep


def broken_run(cfg: Config, out):
    raise RuntimeError("boom")


def register(monkeypatch):
    """Register a fake built method ``fake-method`` (field rl) and a failing ``fake-broken``."""
    mod = types.ModuleType(MODULE)
    mod.Config, mod.run, mod.bench = Config, run, bench
    broken = types.ModuleType(MODULE + "_broken")
    broken.Config, broken.run = Config, broken_run
    monkeypatch.setitem(sys.modules, MODULE, mod)
    monkeypatch.setitem(sys.modules, MODULE + "_broken", broken)
    rows = (Method("fake-method", "rl", "Fake", "nobody 2024", "-", "steps", MODULE),
            Method("fake-broken", "rl", "Broken", "nobody 2024", "-", "raises", MODULE + "_broken"))
    monkeypatch.setattr(catalog, "METHODS", rows)
    monkeypatch.setattr(catalog, "_BY_ID", {m.id: m for m in rows})
    return rows
