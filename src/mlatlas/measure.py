"""The one timer, peak-memory meter and log-log slope every benchmark and experiment uses.

Speed and memory claims in mlatlas are ratios measured side by side in one process: ours
against what a user would pick instead. Three tools make that uniform:

* :func:`compare_times` — interleaved, warmed-up timing of several candidates: every round
  runs each candidate in turn, so a slow minute of a shared machine hits all of them alike;
  the median of the rounds is reported. It times with :func:`time.perf_counter` around
  ``torch.cuda.synchronize()`` (what :class:`torch.utils.benchmark.Timer` does) but not
  through ``Timer.timeit``, which adds two untimed warm-up calls to *every* measurement:
  measured here, that tripled the cost of expensive candidates (the DDPM-1000 sampler of
  the ddim bench: 12 calls instead of 4) without changing the medians.
* :class:`PeakMemory` — the peak of live memory allocated inside a block, above what was
  live when it began. On CUDA it reads the caching allocator's peak
  (``torch.cuda.max_memory_allocated``); on the CPU it counts the bytes of every tensor
  storage an aten op creates inside the block and frees it when the storage dies (a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` plus a finalizer on each storage),
  which is exact and identical on every machine — the allocator's own caching and the
  Python heap are not counted.
* :func:`loglog_slope` — the least-squares slope of ``log y`` against ``log x``
  (:func:`statistics.linear_regression`), the exponent of a power law ``y ∝ x^k``.

A report states ratios, never absolute wall-clock claims in tests; the machine a number came
from is recorded by the runner (:func:`mlatlas.runtime.machine_info`).
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlatlas.runtime import torch_threads

__all__ = ["PeakMemory", "Timing", "compare_times", "loglog_slope"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate of :func:`compare_times`.

    Attributes:
        name: The candidate's name.
        median_s: Median over the rounds of the mean time per call.
        iqr_s: Inter-quartile range over the rounds (0 with fewer than 2 rounds).
        times_s: Mean time per call in each round, in order.
    """

    name: str
    median_s: float
    iqr_s: float
    times_s: tuple[float, ...]


def compare_times(candidates: Mapping[str, Callable[[], Any]], *, repeats: int = 5,
                  number: int = 1, warmup: int = 1,
                  threads: int | None = None) -> dict[str, Timing]:
    """Time several candidates interleaved: warm-up, then ``repeats`` rounds of each in turn.

    Args:
        candidates: Name → zero-argument callable (bind arguments with a lambda or
            :func:`functools.partial`). Order is the order within a round.
        repeats: Timed rounds; the median over rounds is reported.
        number: Calls per candidate per round (their mean is the round's time).
        warmup: Untimed calls of each candidate before the first round.
        threads: torch threads while timing (restored after); default the current count.

    Returns:
        Name → :class:`Timing`, in the order of ``candidates``.

    Raises:
        ValueError: no candidates, a non-callable, or ``repeats``/``number`` < 1,
            ``warmup`` < 0.
    """
    if not candidates:
        raise ValueError("compare_times needs at least one candidate, got none")
    for name, fn in candidates.items():
        if not callable(fn):
            raise ValueError(f"candidate {name!r} must be callable, got {type(fn).__name__}")
    for arg, value, low in (("repeats", repeats, 1), ("number", number, 1),
                            ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    rounds: dict[str, list[float]] = {name: [] for name in candidates}
    with torch_threads(threads):
        for _ in range(warmup):
            for fn in candidates.values():
                fn()
        for _ in range(repeats):
            for name, fn in candidates.items():
                rounds[name].append(_seconds_per_call(fn, number))
    out = {}
    for name, times in rounds.items():
        iqr = 0.0
        if len(times) >= 2:
            q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
            iqr = q3 - q1
        out[name] = Timing(name, statistics.median(times), iqr, tuple(times))
    return out


def _seconds_per_call(fn: Callable[[], Any], number: int) -> float:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    if cuda:
        torch.cuda.synchronize()  # queued kernels belong to this candidate
    return (time.perf_counter() - start) / number


class _LiveStorageBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages aten ops create inside the mode.

    A storage's death is seen when it happens: torch keeps a storage's Python object alive as
    long as the storage itself (as it does for tensors), so a :class:`weakref.finalize` on it
    fires when the last tensor using it is freed — O(1) per op, however much is alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.finalize] = {}  # id(storage object) → its finalizer
        self.current = 0
        self.peak = 0
        self._aliasing: dict[Any, tuple[bool, ...]] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        aliasing = self._aliasing.get(func)
        if aliasing is None:  # outputs that are views of, or written into, an input are not new
            aliasing = tuple(r.alias_info is not None for r in func._schema.returns)
            self._aliasing[func] = aliasing
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t, aliased in zip(outs, aliasing):
            if aliased or not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) not in self.live:
                nbytes = storage.nbytes()
                self.live[id(storage)] = weakref.finalize(storage, self._free, id(storage),
                                                          nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out

    def close(self) -> None:
        """Stop following the storages that outlive the block."""
        for finalizer in list(self.live.values()):
            finalizer.detach()
        self.live.clear()


class PeakMemory:
    """Peak memory allocated inside a ``with`` block, above what was live when it began.

    Example::

        with PeakMemory() as mem:
            out = attention(q, k, v)
            forward_peak = mem.peak_bytes
            out.backward(grad)
        print(forward_peak, mem.peak_bytes)

    Args:
        device: ``"cpu"`` (tensor storages created by aten ops, exact and
            machine-independent) or ``"cuda"`` (the caching allocator's peak); default the
            current CUDA device when CUDA is available, else the CPU.

    Attributes:
        peak_bytes: Peak so far (readable inside the block) or of the whole block.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, device: str | torch.device | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kind = torch.device(device).type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"PeakMemory measures 'cpu' or 'cuda', got device {device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError("PeakMemory(device='cuda') needs CUDA; torch.cuda.is_available() "
                             "is False")
        self.device = kind
        self._mode: _LiveStorageBytes | None = None
        self._base = 0
        self._final: int | None = None

    def __enter__(self) -> PeakMemory:
        self._final = None
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._mode = _LiveStorageBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._final = self.peak_bytes
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode.close()
            self._mode = None

    @property
    def peak_bytes(self) -> int:
        """Peak bytes allocated in the block so far (or in the whole block once it ended)."""
        if self._final is not None:
            return self._final
        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self._base)
        if self._mode is None:
            raise RuntimeError("PeakMemory.peak_bytes read before the block started")
        return int(self._mode.peak)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope ``k`` of ``log y = k · log x + c`` — the exponent of ``y ∝ x^k``.

    Args:
        xs: Positive x values (at least two distinct).
        ys: Positive y values, same length.

    Raises:
        ValueError: different lengths, fewer than two points, non-positive values or all
            ``xs`` equal.
    """
    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"loglog_slope needs two equal-length sequences of >= 2 points, got "
                         f"{len(xs)} and {len(ys)}")
    if any(not (v > 0) for v in (*xs, *ys)):
        raise ValueError(f"loglog_slope needs positive values, got xs={xs}, ys={ys}")
    if len(set(xs)) < 2:
        raise ValueError(f"loglog_slope needs at least two distinct xs, got {xs}")
    fit = statistics.linear_regression([math.log(x) for x in xs], [math.log(y) for y in ys])
    return fit.slope
