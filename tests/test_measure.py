"""The shared timer, peak-memory meter and log-log slope (mlatlas.measure)."""

from __future__ import annotations

import math

import pytest
import torch

from mlatlas.measure import PeakMemory, Timing, compare_times, loglog_slope


def test_compare_times_interleaves_and_reports_medians():
    calls: list[str] = []
    timings = compare_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            repeats=3, number=2, warmup=1)
    # one warm-up call each, then three rounds of two calls each, a before b in every round —
    # and nothing else (no hidden warm-ups per measurement)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert list(timings) == ["a", "b"]
    for name, t in timings.items():
        assert isinstance(t, Timing) and t.name == name and len(t.times_s) == 3
        assert t.median_s == sorted(t.times_s)[1] and t.iqr_s >= 0


def test_compare_times_orders_work_by_cost():
    x = torch.randn(300, 300)
    t = compare_times({"one matmul": lambda: x @ x, "eight matmuls": lambda: [x @ x for _ in range(8)]},
                      repeats=5)
    assert t["eight matmuls"].median_s > 2 * t["one matmul"].median_s


def test_compare_times_keeps_the_thread_count():
    before = torch.get_num_threads()
    seen: list[int] = []
    compare_times({"f": lambda: seen.append(torch.get_num_threads())}, repeats=1, warmup=0)
    assert seen == [before] and torch.get_num_threads() == before
    compare_times({"f": lambda: seen.append(torch.get_num_threads())}, repeats=1, warmup=0,
                  threads=1)
    assert seen[-1] == 1 and torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, match", [
    ({"candidates": {}}, "at least one candidate"),
    ({"candidates": {"x": 3}}, "candidate 'x' must be callable, got int"),
    ({"candidates": {"x": print}, "repeats": 0}, "repeats must be an int >= 1, got 0"),
    ({"candidates": {"x": print}, "warmup": -1}, "warmup must be an int >= 0, got -1"),
])
def test_compare_times_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare_times(**kwargs)


def test_peak_memory_counts_live_tensor_bytes_on_cpu():
    with PeakMemory("cpu") as mem:
        a = torch.empty(1000, 250)  # 1 MB
        b = torch.empty(500, 250)  # 0.5 MB
        assert mem.peak_bytes == 1_500_000
        del a, b
        c = torch.empty(250, 250)  # freed storages do not add up: peak stays 1.5 MB
        a_view = c[:10]  # a view allocates nothing
        c.add_(1)  # neither does an in-place op
    assert mem.peak_bytes == 1_500_000
    del c, a_view


def test_peak_memory_sees_the_attention_matrix():
    q = torch.randn(1, 2, 300, 16)
    with PeakMemory("cpu") as mem:
        (q @ q.transpose(-1, -2)).softmax(-1) @ q
    n2 = 2 * 300 * 300 * 4  # the [2, 300, 300] fp32 score matrix
    assert n2 <= mem.peak_bytes <= 3 * n2


def test_peak_memory_bad_device():
    with pytest.raises(ValueError, match="'cpu' or 'cuda', got device 'meta'"):
        PeakMemory("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            PeakMemory("cuda")


def test_loglog_slope_recovers_exponents():
    xs = [16, 64, 256, 1024]
    assert loglog_slope(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert loglog_slope(xs, [1 / x for x in xs]) == pytest.approx(-1.0)
    assert loglog_slope(xs, [math.sqrt(x) for x in xs]) == pytest.approx(0.5)


@pytest.mark.parametrize("xs, ys, match", [
    ([1, 2], [1], "equal-length"),
    ([1], [1], ">= 2 points"),
    ([1, 0], [1, 2], "positive values"),
    ([2, 2], [1, 2], "two distinct xs"),
])
def test_loglog_slope_bad_input(xs, ys, match):
    with pytest.raises(ValueError, match=match):
        loglog_slope(xs, ys)
