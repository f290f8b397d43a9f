"""Run-time switches every experiment shares: seeding, determinism, device, progress, timing.

Experiments call :func:`seed_everything` (the runner already does, with the run's seed) and
wrap long loops in :func:`progress`. :func:`machine_info` and :func:`versions` are what the
reports write next to the numbers so that a measurement always says where it came from.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = [
    "Stopwatch",
    "choose_device",
    "deterministic",
    "machine_info",
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


def deterministic(enabled: bool = True) -> None:
    """Ask torch for deterministic kernels (warns instead of failing where none exists).

    Same switch as ``torch.use_deterministic_algorithms(enabled, warn_only=True)``, minus its
    import of ``torch._inductor.config`` (≈ 3.5 s on 2 cores, for a flag that only
    ``torch.compile`` reads; mlatlas never compiles). When inductor is already loaded, its
    ``deterministic`` flag is set too, as torch would.
    """
    import torch

    torch._C._set_deterministic_algorithms(enabled, warn_only=True)
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        inductor_config.deterministic = enabled
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not enabled
        torch.backends.cudnn.deterministic = enabled


def choose_device(prefer: str = "auto") -> Any:
    """Return a ``torch.device``.

    Args:
        prefer: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: for an unknown ``prefer`` or ``"cuda"`` without a GPU.
    """
    import torch

    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {prefer!r}")


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


def progress_enabled(smoke: bool = False) -> bool:
    """Progress bars show on a terminal, unless smoke-testing or ``MLATLAS_NO_PROGRESS`` is set."""
    return (not smoke and not os.environ.get("MLATLAS_NO_PROGRESS")
            and sys.stderr.isatty())


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


class Stopwatch:
    """Wall-clock timer: ``with Stopwatch() as sw: ...; sw.elapsed`` (seconds)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stop: float | None = None

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.stop = None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since start (or between start and stop once stopped)."""
        return (self.stop if self.stop is not None else time.perf_counter()) - self.start


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
