"""Warped digits: deterministic per seed, in range, train/test from disjoint digits, bad input."""

from __future__ import annotations

import pytest
import torch

from mlatlas.datasets.warped_digits import WarpSpec, warped_digits


def test_deterministic_and_shapes():
    a, ya = warped_digits("train", 12, seed=3)
    b, yb = warped_digits("train", 12, seed=3)
    c, _ = warped_digits("train", 12, seed=4)
    assert a.shape == (12, 1, 32, 32) and ya.dtype == torch.int64
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(ya, yb) and not torch.equal(a, c)
    assert 0 <= float(a.min()) and float(a.max()) <= 1 and set(ya.tolist()) <= set(range(10))


def test_no_warp_is_the_centred_digit():
    spec = WarpSpec(size=24, content=16, max_rotation=0, scale=(1, 1), max_shear=0,
                    max_shift=0, elastic_px=0)
    x, _ = warped_digits("test", 5, spec, seed=0)
    assert float(x[:, :, :4].max()) < 1e-5 and float(x[:, :, -4:].max()) < 1e-5  # empty border
    assert float(x[:, :, 4:20, 4:20].sum()) > 0


def test_bad_input():
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'all'"):
        warped_digits("all", 3)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        warped_digits("train", 0)
    with pytest.raises(ValueError, match="need 8 <= content <= size"):
        WarpSpec(size=16, content=20)
