"""Tests of the embedded 8×8 digits loader."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mlatlas.datasets.digits import load_digits


def test_splits_shapes_and_partition(reference):
    sk = reference("sklearn.datasets")
    x, y = load_digits("all", scale="raw")
    bunch = sk.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    torch.testing.assert_close(x[:, 0], torch.from_numpy(bunch.images).float(), atol=0, rtol=0)
    xtr, ytr = load_digits("train", scale="raw")
    xte, yte = load_digits("test", scale="raw")
    assert len(xtr) + len(xte) == 1797 and len(xte) == 359
    # a partition: the two splits together hold exactly the images (with labels) of "all"
    def bag(xs, ys):
        return Counter(tuple(r.tolist()) + (int(c),) for r, c in zip(xs.flatten(1), ys,
                                                                      strict=True))

    assert bag(xtr, ytr) + bag(xte, yte) == bag(x, y)
    # stratified: every digit has ~20% of its images in the test split
    for c in range(10):
        frac = float((yte == c).sum()) / float((y == c).sum())
        assert frac == pytest.approx(0.2, abs=0.01)


def test_scales_and_determinism():
    a, ya = load_digits("train")
    b, yb = load_digits("train")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(ya, yb)
    assert float(a.min()) == -1.0 and float(a.max()) == 1.0
    c, _ = load_digits("train", scale="[0,1]")
    torch.testing.assert_close(c, (a + 1) / 2, atol=1e-7, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits("val")
    with pytest.raises(ValueError, match="scale must be one of"):
        load_digits("train", scale="0-255")
