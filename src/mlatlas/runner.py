"""Run catalog experiments: build their config, seed, time, and write their reports.

The command line is a thin layer over this module; tests and notebooks can call it directly::

    from mlatlas.runner import run_method
    report = run_method("gridworld", out="runs/gridworld")

An experiment module (``mlatlas.experiments.<field>.<name>``) provides a ``Config``
dataclass whose defaults are the ≤ 30 s CPU run, ``Config.smoke()`` (a few steps, for
tests), an optional ``Config.full()`` for the headline run, ``run(cfg, out) -> Report`` and
optionally ``bench(cfg, out) -> Report``. The run mode lives in the Config alone: the
experiment never asks which mode it is in.

Around every run the runner seeds Python, NumPy and torch from ``cfg.seed``, pins torch's
thread count to ``cfg.threads`` when the Config has that field (> 0), turns torch's
deterministic algorithms on where CUDA is present (CPU kernels already are), and restores
the thread count and the switch afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import subprocess
import time
import traceback
import types
import typing
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from mlatlas import catalog
from mlatlas.report import Report, claims_summary, write_run, write_tour
from mlatlas.runtime import new_run_folder

__all__ = [
    "MODES",
    "ConfigError",
    "NotBuiltError",
    "default_out",
    "load_experiment",
    "changed_fields",
    "make_config",
    "provenance",
    "run_bench",
    "run_method",
    "run_tour",
]


#: Run modes: the Config's defaults, ``Config.smoke()`` and ``Config.full()``.
MODES = ("default", "smoke", "full")


class ConfigError(ValueError):
    """A ``--set`` override names an unknown field or a value of the wrong type."""


class NotBuiltError(LookupError):
    """The method is in the catalog but has no experiment yet (or no benchmark)."""


def load_experiment(method_id: str) -> types.ModuleType:
    """Import the experiment module of ``method_id``.

    Raises:
        catalog.UnknownMethodError: unknown id.
        NotBuiltError: the method has no experiment yet.
    """
    method = catalog.get(method_id)
    if method.experiment is None:
        raise NotBuiltError(f"method {method_id!r} is in the atlas but not built yet")
    return importlib.import_module(method.experiment)


def make_config(module: types.ModuleType, *, mode: str = "default",
                overrides: Iterable[str] = (), seed: int | None = None) -> Any:
    """Build an experiment's ``Config`` for a run mode, then apply ``k=v`` overrides.

    Args:
        module: The experiment module.
        mode: ``"default"`` (``Config()``), ``"smoke"`` (``Config.smoke()``) or ``"full"``
            (``Config.full()``; the default Config when the experiment has no full run).
        overrides: ``"field=value"`` strings, converted to the field's annotated type.
        seed: Overrides ``cfg.seed`` when given (a non-negative int).

    Raises:
        ConfigError: unknown mode, unknown field, malformed override, a value that does not
            convert, or a negative seed.
    """
    cls = module.Config
    if mode not in MODES:
        raise ConfigError(f"run mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "smoke":
        if not hasattr(cls, "smoke"):
            raise ConfigError(f"{module.__name__}.Config has no smoke() (required: a few steps, "
                              "for tests)")
        cfg = cls.smoke()
    elif mode == "full" and hasattr(cls, "full"):
        cfg = cls.full()
    else:
        cfg = cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects field=value, got {item!r}")
        name, text = (s.strip() for s in item.split("=", 1))
        if name not in fields:
            raise ConfigError(f"unknown config field {name!r} for {module.__name__}.Config; "
                              f"fields: {', '.join(fields)}")
        changes[name] = _convert(name, text, hints.get(name, str))
    if seed is not None:
        if "seed" not in fields:
            raise ConfigError(f"{module.__name__}.Config has no 'seed' field")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"--seed must be a non-negative int, got {seed!r}")
        changes["seed"] = seed
    try:
        return dataclasses.replace(cfg, **changes) if changes else cfg
    except (TypeError, ValueError) as exc:  # a Config's own __post_init__ check
        raise ConfigError(f"{module.__name__}.Config: {exc}") from None


def changed_fields(module: types.ModuleType, cfg: Any, mode: str = "default") -> dict[str, Any]:
    """The fields of ``cfg`` that differ from the Config of ``mode`` (what ``--set`` changed)."""
    base = make_config(module, mode=mode)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name)}


def default_out(method_id: str, kind: str = "run") -> Path:
    """``runs/<id>/<timestamp>/`` (``bench-<timestamp>`` for benchmarks), created here."""
    return _new_folder(Path("runs") / method_id, "" if kind == "run" else f"{kind}-")


def _new_folder(parent: Path, prefix: str = "") -> Path:
    """:func:`~mlatlas.runtime.new_run_folder`, its OSError as a ConfigError."""
    try:
        return new_run_folder(parent, prefix)
    except OSError as exc:
        raise ConfigError(f"cannot create an output folder in {str(parent)!r}: "
                          f"{exc.strerror or exc}") from None


def _mode(smoke: bool, full: bool) -> str:
    if smoke and full:
        raise ConfigError("choose one run mode: smoke or full, not both")
    return "smoke" if smoke else "full" if full else "default"


def run_method(method_id: str, cfg: Any = None, out: str | Path | None = None, *,
               smoke: bool = False, full: bool = False, overrides: Iterable[str] = (),
               seed: int | None = None) -> Report:
    """Run one experiment, write ``metrics.json``/``report.md`` into ``out`` and return it.

    Args:
        method_id: Catalog id.
        cfg: A ready ``Config``; built with :func:`make_config` when None.
        out: Output folder; :func:`default_out` when None.
        smoke: Use ``Config.smoke()`` (a few steps, for tests).
        full: Use ``Config.full()`` (the headline run).
        overrides: ``"field=value"`` overrides.
        seed: Seed override.
    """
    module = load_experiment(method_id)
    mode = _mode(smoke, full)
    if cfg is None:
        cfg = make_config(module, mode=mode, overrides=overrides, seed=seed)
    return _execute(method_id, module, module.run, cfg, out, mode=mode, kind="run")


def run_bench(method_id: str, cfg: Any = None, out: str | Path | None = None, *,
              smoke: bool = False, full: bool = False, overrides: Iterable[str] = (),
              seed: int | None = None) -> Report:
    """Run an experiment's ``bench`` (speed/memory, side by side) and write its report.

    Args:
        method_id: Catalog id.
        cfg: A ready ``Config``; built with :func:`make_config` when None.
        out: Output folder; :func:`default_out` when None.
        smoke: Use ``Config.smoke()`` (tiny sizes: checks the bench runs, measures nothing
            worth reading).
        full: Use ``Config.full()``.
        overrides: ``"field=value"`` overrides.
        seed: Seed override.

    Raises:
        NotBuiltError: the experiment has no benchmark.
    """
    module = load_experiment(method_id)
    if not hasattr(module, "bench"):
        raise NotBuiltError(f"method {method_id!r} has no benchmark (its claim is not about "
                            "speed or memory)")
    mode = _mode(smoke, full)
    if cfg is None:
        cfg = make_config(module, mode=mode, overrides=overrides, seed=seed)
    return _execute(method_id, module, module.bench, cfg, out, mode=mode, kind="bench")


def run_tour(field: str | None = None, out: str | Path | None = None, *,
             mode: str = "default", bench: bool = True, ids: Iterable[str] | None = None,
             echo: Any = None) -> tuple[list[Report], Path]:
    """Run every built experiment (of ``field``, or only ``ids``) and its benchmark.

    Each method's run goes to ``out/<id>/`` and its benchmark (when it has one) to
    ``out/<id>/bench/``, both in the same run mode. A run that raises is recorded as a failed
    report (written to its folder too) and the tour goes on.

    Args:
        field: Only this field's methods.
        out: Tour folder; ``runs/tour/<timestamp>`` when None.
        mode: ``"default"``, ``"smoke"`` or ``"full"`` for every run and benchmark.
        bench: Run the benchmarks too.
        ids: Only these method ids (in catalog order).
        echo: Called with a line of progress per run (``print``), or None.

    Returns:
        The reports (runs and benchmarks, in order) and the path of the site's ``index.html``
        (``report.md`` is written next to it).

    Raises:
        ConfigError: unknown mode, or ``out`` cannot be created.
    """
    if mode not in MODES:
        raise ConfigError(f"run mode must be one of {', '.join(MODES)}, got {mode!r}")
    out = Path(out) if out is not None else _new_folder(Path("runs") / "tour")
    _make_dir(out)
    wanted = None if ids is None else set(ids)
    reports = []
    for method in catalog.by_field(field):
        if not method.built or (wanted is not None and method.id not in wanted):
            continue
        kinds = ["run"]
        if bench and hasattr(load_experiment(method.id), "bench"):
            kinds.append("bench")
        for kind in kinds:
            if echo:
                echo(f"running {method.id}{' bench' if kind == 'bench' else ''} …")
            folder = out / method.id / ("bench" if kind == "bench" else "")
            reports.append(_tour_one(method.id, folder, mode, kind))
            if echo:
                echo(_summary_line(reports[-1]))
    title = f"mlatlas tour{f' — {field}' if field else ''}"
    write_tour(reports, out, title=title)
    from mlatlas.site.builder import build_site

    return reports, build_site([out], out)


def _tour_one(method_id: str, out: Path, mode: str, kind: str) -> Report:
    fn = run_bench if kind == "bench" else run_method
    try:
        return fn(method_id, out=out, smoke=mode == "smoke", full=mode == "full")
    except Exception as exc:  # one broken experiment must not hide the others
        report = Report(method=method_id, kind=kind, smoke=mode == "smoke", mode=mode,
                        error=f"{type(exc).__name__}: {exc}", **provenance())
        report.note(traceback.format_exc(limit=5))
        report.out = out
        write_run(report, out)
        return report


@functools.cache
def _git_commit() -> str | None:
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance() -> dict[str, Any]:
    """``{"commit": <git commit of this checkout, "+dirty" if changed; None outside git>,
    "date": <now, ISO 8601 with the UTC offset>}``."""
    return {"commit": _git_commit(), "date": datetime.now().astimezone().isoformat(
        timespec="seconds")}


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {str(out)!r}: "
                          f"{exc.strerror or exc}") from None


def _execute(method_id: str, module: types.ModuleType, fn: Any, cfg: Any,
             out: str | Path | None, *, mode: str, kind: str) -> Report:
    from mlatlas import runtime

    out = Path(out) if out is not None else default_out(method_id, kind)
    _make_dir(out)
    seed = getattr(cfg, "seed", 0)
    threads = getattr(cfg, "threads", None)
    started = provenance()
    runtime.seed_everything(seed)
    determinism = (runtime.deterministic_algorithms(True) if runtime.needs_deterministic_switch()
                   else contextlib.nullcontext())  # CPU kernels are deterministic already
    with runtime.torch_threads(threads), determinism:
        start = time.perf_counter()
        report = fn(cfg, out)
        elapsed = time.perf_counter() - start
    if not isinstance(report, Report):
        raise TypeError(f"{method_id}: {kind}() must return a Report, got {type(report).__name__}")
    changed = changed_fields(module, cfg, mode)
    for claim in report.claims:
        claim.target_changed = bool(claim.target_source) and claim.target_source in changed
    report.method = method_id
    report.kind = kind
    report.mode = mode
    report.smoke = mode == "smoke"
    report.seed = seed
    report.config = dataclasses.asdict(cfg)
    report.overrides = {k: v for k, v in changed.items() if k != "seed"}
    report.elapsed_s = elapsed
    report.machine = runtime.machine_info()
    report.versions = runtime.versions()
    report.commit, report.date = started["commit"], started["date"]
    report.out = out
    write_run(report, out)
    return report


def _summary_line(report: Report) -> str:
    name = report.method + (" bench" if report.kind == "bench" else "")
    if report.error:
        return f"  {name}: FAILED — {report.error}"
    return f"  {name}: {claims_summary([report])} ({report.elapsed_s:.1f} s)"


def _convert(name: str, text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(tp)):
            return None
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    try:
        if origin is typing.Literal:
            choices = typing.get_args(tp)
            if text not in [str(c) for c in choices]:
                raise ValueError
            return next(c for c in choices if str(c) == text)
        if origin in (tuple, list):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            items = [_convert(name, t, item_tp) for t in text.split(",") if t.strip()]
            return tuple(items) if origin is tuple else items
        if tp is bool:
            low = text.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str or tp is Any:
            return text
        if isinstance(tp, type) and issubclass(tp, Path):
            return tp(text)
        return tp(text)
    except (ValueError, TypeError):
        shown = getattr(tp, "__name__", None) or str(tp)
        raise ConfigError(f"config field {name!r} expects {shown}, got {text!r}") from None
