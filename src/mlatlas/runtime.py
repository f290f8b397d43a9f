"""Run-time switches every experiment shares: seeding, determinism, threads, progress, and
the folder each run writes to.

Experiments call :func:`seed_everything` (the runner already does, with the run's seed) and
wrap long loops in :func:`progress`. :func:`machine_info` and :func:`versions` are what the
reports write next to the numbers so that a measurement always says where it came from.
:func:`new_run_folder` gives ``mlatlas run``/``bench``/``tour``/``train`` a folder of their own.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import random
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "deterministic_algorithms",
    "needs_deterministic_switch",
    "machine_info",
    "new_run_folder",
    "progress",
    "progress_enabled",
    "seed_everything",
    "torch_threads",
    "versions",
]

T = TypeVar("T")

#: Packages whose versions a report records when they are installed.
_TRACKED = (
    "mlatlas", "torch", "torchvision", "numpy", "triton", "transformers", "peft", "trl",
    "diffusers", "timm", "tensorflow-cpu", "gymnasium", "stable-baselines3", "sb3-contrib",
    "opencv-python-headless", "scikit-learn", "scipy",
)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators.

    Args:
        seed: Non-negative integer seed.

    Raises:
        ValueError: if ``seed`` is negative or not an integer.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Run the block with torch's deterministic-algorithms switch set, then restore it.

    ``torch.use_deterministic_algorithms(enabled, warn_only=True)`` (an op without a
    deterministic kernel warns instead of failing) and cuDNN's deterministic / benchmark
    flags; every switch is put back as it was when the block ends, so a run never leaves
    global state behind for the next one. When the switch already has the requested state
    nothing is called: torch's public switch imports ``torch._inductor`` (≈ 3.5 s on 2 quiet
    cores, 14 s of a profiled 61 s run under load), which a run that changes nothing should
    not pay.
    """
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    flip = before[:2] != (enabled, enabled or before[1])
    if flip:
        torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled
    try:
        yield
    finally:
        if flip:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]


def needs_deterministic_switch() -> bool:
    """Whether runs must turn torch's deterministic switch on: only where CUDA is present.

    torch's CPU kernels give the same results run after run for a fixed thread count (the
    runner pins it); the switch exists for CUDA kernels (atomics, cuBLAS workspaces, cuDNN
    autotuning). On a CPU-only machine the runner leaves it alone and saves the inductor
    import.
    """
    import torch

    return torch.cuda.is_available()


def new_run_folder(parent: str | Path, prefix: str = "") -> Path:
    """Create and return ``parent/<prefix><YYYYmmdd-HHMMSS>`` for a new run.

    When a run started in the same second already holds that name, the folder is
    ``…-2``, ``…-3`` and so on: a run's checkpoints and metrics are never another run's.

    Args:
        parent: Folder the run folder goes in (created when missing).
        prefix: Put before the timestamp, e.g. ``"bench-"``.

    Raises:
        OSError: the folder cannot be created (read-only disk, a file in the way, …).
    """
    name = prefix + datetime.now().strftime("%Y%m%d-%H%M%S")
    path, k = Path(parent) / name, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            k += 1
            path = Path(parent) / f"{name}-{k}"


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the old count after.

    Tiny networks and small tensors spend more time synchronising threads than computing;
    experiments pin one thread for them (a ``threads`` Config field). ``n`` of None or
    ``<= 0`` leaves the count unchanged and only restores it on exit (what the runner does
    around every experiment, so that none inherits another's setting).
    """
    import torch

    before = torch.get_num_threads()
    if n is not None and n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress_enabled() -> bool:
    """Progress bars show on a terminal (stderr), unless ``MLATLAS_NO_PROGRESS`` is set."""
    return not os.environ.get("MLATLAS_NO_PROGRESS") and sys.stderr.isatty()


def progress(iterable: Iterable[T], total: int | None = None, description: str = "",
             enabled: bool | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr.

    Args:
        iterable: What to iterate over.
        total: Its length when ``len()`` does not know it.
        description: Text left of the bar.
        enabled: Force on/off; default :func:`progress_enabled`.

    Yields:
        The items of ``iterable``.
    """
    if enabled is None:
        enabled = progress_enabled()
    if not enabled:
        yield from iterable
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)


def machine_info() -> dict[str, Any]:
    """Where a measurement ran: OS, CPU, cores, torch threads and GPU (if any)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Installed versions of mlatlas, torch and the reference libraries."""
    found: dict[str, str] = {}
    for name in (*_TRACKED, *extra):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
