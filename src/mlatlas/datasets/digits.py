"""scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes), never downloaded.

The UCI optical-recognition digits ship inside scikit-learn (``sklearn.datasets.load_digits``
reads a file of the installed package), which makes them the image data set of choice for
experiments that must run offline in seconds: a diffusion model learns them on a CPU.

===========  =============================================================
``x``        ``[N, 1, 8, 8]`` float32 images, pixel values 0..16 rescaled
``y``        ``[N]`` int64 digit labels 0..9
split        a fixed stratified permutation: 80% train (1438), 20% test (359)
===========  =============================================================
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

__all__ = ["SCALES", "SPLITS", "load_digits"]

SPLITS: tuple[str, ...] = ("train", "test", "all")
SCALES: tuple[str, ...] = ("[-1,1]", "[0,1]", "raw")
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # fixed: the split never depends on the caller's seed


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    labels = bunch.target.astype(np.int64)
    rng = np.random.RandomState(_SPLIT_SEED)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):  # stratified: the same test fraction of every digit
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test_mask[idx[: int(round(_TEST_FRACTION * len(idx)))]] = True
    return images, labels, test_mask


def load_digits(split: str = "train", scale: str = "[-1,1]") -> tuple[Tensor, Tensor]:
    """Load the 8×8 digits.

    Args:
        split: ``"train"`` (80%), ``"test"`` (20%) or ``"all"``; the split is deterministic
            and stratified by class.
        scale: ``"[-1,1]"`` (pixel/8 − 1, the diffusion convention), ``"[0,1]"`` (pixel/16)
            or ``"raw"`` (0..16).

    Returns:
        ``(x, y)``: images ``[N, 1, 8, 8]`` float32 and labels ``[N]`` int64.

    Raises:
        ValueError: for an unknown ``split`` or ``scale``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    images, labels, test_mask = _raw()
    keep = {"train": ~test_mask, "test": test_mask, "all": np.ones_like(test_mask)}[split]
    x = torch.from_numpy(images[keep].copy()).unsqueeze(1)
    if scale == "[-1,1]":
        x = x / 8.0 - 1.0
    elif scale == "[0,1]":
        x = x / 16.0
    return x.contiguous(), torch.from_numpy(labels[keep].copy())
