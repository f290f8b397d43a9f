"""Synthetic visual question answering: rendered scenes of many sizes, templated questions.

Every scene is an image of its own size and aspect ratio (``H, W`` drawn independently from
``sizes``, e.g. 16 × 40 or 32 × 24) holding one to three objects — circles, squares,
triangles (drawn by :func:`mlatlas.datasets.shapes.shape_coverage`) — of distinct shapes and
distinct colours on a dark, noisy background. Each scene comes with one question of four
kinds, answered by one word; the question alone never determines the answer (every answer
of a kind is equally likely), so a text-only model stays at chance:

============  ==========================================  ===================================
``colour``    ``what colour is the <shape> ?``            red / green / blue / yellow
``shape``     ``what shape is the <colour> object ?``     circle / square / triangle
``count``     ``how many objects ?``                      one / two / three
``position``  ``is the <shape> left or right ?``          left / right (of the image centre)
============  ==========================================  ===================================

Scenes are a pure function of the seed. Tokens are word ids of :data:`VOCAB`; ``<img>`` is the
placeholder a vision-language model replaces by image tokens; ``<ans>`` marks where the answer
follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mlatlas.datasets.shapes import shape_coverage

__all__ = ["ANSWERS", "COLOURS", "KINDS", "SHAPES", "VOCAB", "VQASample", "make_visual_qa",
           "token_id"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 0.95),
    "yellow": (0.92, 0.85, 0.1)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[str, ...] = ("one", "two", "three")
SIDES: tuple[str, ...] = ("left", "right")
KINDS: tuple[str, ...] = ("colour", "shape", "count", "position")
ANSWERS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES,
                                       "count": COUNTS, "position": SIDES}
#: Word vocabulary: specials, question words, answers.
VOCAB: tuple[str, ...] = (("<pad>", "<img>", "<ans>", "what", "colour", "is", "the", "shape",
                           "object", "how", "many", "objects", "left", "or", "right", "?")
                          + tuple(COLOURS) + SHAPES + COUNTS)
_ID = {w: i for i, w in enumerate(VOCAB)}


def token_id(word: str) -> int:
    """The id of ``word`` in :data:`VOCAB`."""
    if word not in _ID:
        raise ValueError(f"word must be one of VOCAB, got {word!r}")
    return _ID[word]


@dataclass
class VQASample:
    """One scene and its question.

    Attributes:
        image: ``[3, H, W]`` float32 in ``[0, 1]``.
        question: Word ids of the question.
        answer: Word id of the answer.
        kind: One of :data:`KINDS`.
    """

    image: Tensor
    question: list[int]
    answer: int
    kind: str


def _place(rng: np.random.Generator, H: int, W: int, n: int, min_side: float,
           max_side: float) -> list[tuple[float, float, float]]:
    """Up to ``n`` non-overlapping ``(cx, cy, side)`` whose centres avoid the vertical midline."""
    objs: list[tuple[float, float, float]] = []
    for _ in range(200):
        if len(objs) == n:
            break
        s = rng.uniform(min_side, min(max_side, H - 1, W / 2 - 1))
        cx, cy = rng.uniform(s / 2, W - s / 2), rng.uniform(s / 2, H - s / 2)
        if abs(cx - W / 2) < 1.5:
            continue
        if all(max(abs(cx - x), abs(cy - y)) > (s + t) / 2 + 1 for x, y, t in objs):
            objs.append((cx, cy, s))
    return objs


def make_visual_qa(n: int, seed: int = 0, sizes: tuple[int, ...] = (16, 24, 32, 40),
                   min_side: float = 6.0, max_side: float = 11.0,
                   noise: float = 0.03) -> list[VQASample]:
    """``n`` scenes with one question each, kinds in turn, deterministically from ``seed``.

    Args:
        n: Number of samples (>= 0).
        seed: Seeds layouts, questions and pixel noise.
        sizes: Heights and widths to draw from (each a multiple of the model's patch grid).
        min_side: Smallest object side in pixels.
        max_side: Largest object side.
        noise: Standard deviation of the pixel noise.

    Raises:
        ValueError: a negative ``n``, or ``sizes`` too small to hold an object.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not sizes or min(sizes) < 2 * min_side + 4:
        raise ValueError(f"sizes must all be >= 2·min_side + 4 = {2 * min_side + 4}, got "
                         f"{sizes}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        H, W = int(rng.choice(sizes)), int(rng.choice(sizes))
        want = int(rng.integers(1, 4))
        objs = _place(rng, H, W, want, min_side, max_side)
        shapes = rng.permutation(len(SHAPES))[:len(objs)]
        colours = rng.permutation(len(COLOURS))[:len(objs)]
        out.append(VQASample(_render(H, W, objs, shapes, colours, noise, gen),
                             *_question(rng, kind, objs, shapes, colours, W), kind))
    return out


def _question(rng: np.random.Generator, kind: str, objs: list, shapes: np.ndarray,
              colours: np.ndarray, width: int) -> tuple[list[int], int]:
    j = int(rng.integers(len(objs)))  # the object asked about
    shape, colour = SHAPES[shapes[j]], tuple(COLOURS)[colours[j]]
    if kind == "colour":
        words, answer = ["what", "colour", "is", "the", shape, "?"], colour
    elif kind == "shape":
        words, answer = ["what", "shape", "is", "the", colour, "object", "?"], shape
    elif kind == "count":
        words, answer = ["how", "many", "objects", "?"], COUNTS[len(objs) - 1]
    else:  # left or right of the image's vertical midline (centres never lie on it)
        words = ["is", "the", shape, "left", "or", "right", "?"]
        answer = "left" if objs[j][0] < width / 2 else "right"
    return [token_id(w) for w in words], token_id(answer)


def _render(H: int, W: int, objs: list, shapes: np.ndarray, colours: np.ndarray, noise: float,
            gen: torch.Generator) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    img = torch.full((3, H, W), 0.12) + 0.05 * (xs / W - 0.5)
    if objs:
        cx, cy, side = torch.tensor(objs, dtype=torch.float32).T
        alpha = shape_coverage(torch.as_tensor(shapes, dtype=torch.int64), cx, cy, side, xs, ys)
        palette = torch.tensor(list(COLOURS.values()))[torch.as_tensor(colours)]
        for a, colour in zip(alpha, palette):  # objects do not overlap: order is irrelevant
            img = img * (1 - a) + colour[:, None, None] * a
    img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp_(0.0, 1.0)
