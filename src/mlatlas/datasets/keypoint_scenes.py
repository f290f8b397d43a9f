"""Images with keypoints at sub-pixel positions, and multi-person stick-figure scenes.

:func:`make_keypoint_images`: each image shows ``K`` coloured blobs (keypoint ``k`` always
in colour ``k``) joined by thin limbs over a shaded, noisy background; the blob centres —
the keypoints — are drawn uniformly at real-valued positions and rendered analytically
(a Gaussian evaluated at pixel centres), so their true positions are known exactly.
:func:`make_stick_figures`: several people per image, each a stick figure of
:data:`JOINTS` with limbs :data:`LIMBS`, of random size, pose and position, which may
overlap; the task is to find the joints and group them into people. All is a pure function
of the seed.

==============  ==========================================================================
coordinates     pixels ``(x, y)``; pixel ``(r, c)`` covers ``[c, c+1) × [r, r+1)``
``images``      ``[N, 3, S, S]`` float32 in ``[0, 1]``
``keypoints``   ``[N, K, 2]`` (one object) or per image ``[people, J, 2]`` (figures)
==============  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["JOINTS", "LIMBS", "KeypointImages", "StickFigureScenes", "make_keypoint_images",
           "make_stick_figures"]

#: Joint names of a stick figure (J = 9).
JOINTS = ("head", "neck", "hip", "left hand", "right hand", "left elbow", "right elbow",
          "left foot", "right foot")
#: Limbs as pairs of joint indices.
LIMBS = ((0, 1), (1, 2), (1, 5), (5, 3), (1, 6), (6, 4), (2, 7), (2, 8))
_PALETTE = np.array([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.15, 0.3, 1.0], [1.0, 0.9, 0.1],
                     [0.9, 0.2, 0.9], [0.1, 0.9, 0.9], [1.0, 0.55, 0.1], [0.6, 0.3, 0.1],
                     [0.95, 0.95, 0.95]])


@dataclass
class KeypointImages:
    """Images and their exact keypoints."""

    images: Tensor
    keypoints: Tensor


@dataclass
class StickFigureScenes:
    """Multi-person scenes: ``keypoints[i]`` is ``[people_i, J, 2]``."""

    images: Tensor
    keypoints: list[Tensor]


def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.meshgrid(c, c, indexing="ij")  # ys, xs at pixel centres


def _background(rng: np.random.Generator, n: int, size: int, ys: Tensor, xs: Tensor) -> Tensor:
    """``[n, 3, S, S]`` flat colours with a gentle linear shading."""
    base = torch.tensor(rng.uniform(0.2, 0.6, (n, 3)), dtype=torch.float32)[:, :, None, None]
    g = torch.tensor(rng.uniform(-0.15, 0.15, (n, 2)), dtype=torch.float32)
    shade = (g[:, 0, None, None] * (xs - size / 2) + g[:, 1, None, None] * (ys - size / 2)) / size
    return base + shade[:, None]


def _paint(img: Tensor, layers: np.ndarray, ys: Tensor, xs: Tensor) -> Tensor:
    """Composite layers in order onto ``img`` ``[n, 3, S, S]``, all images at once.

    ``layers`` ``[n, L, 9]``: ``kind`` (0 segment, 1 blob), ``ax, ay, bx, by`` (a blob uses
    ``a``), ``size`` (segment width / blob radius), ``r, g, b``, and an opacity in the last
    column; padding layers have opacity 0.
    """
    lay = torch.tensor(layers, dtype=torch.float32)
    for k in range(lay.shape[1]):
        row = lay[:, k]
        live = row[:, 9] > 0
        if not live.any():
            continue
        row, sub = row[live], img[live]
        ax, ay = row[:, 1, None, None], row[:, 2, None, None]
        size = row[:, 5, None, None]
        if bool(row[0, 0] > 0.5):  # a blob (one kind per layer slot)
            alpha = torch.exp(-((xs - ax) ** 2 + (ys - ay) ** 2) / (2 * size ** 2))
        else:
            vx, vy = row[:, 3, None, None] - ax, row[:, 4, None, None] - ay
            t = (((xs - ax) * vx + (ys - ay) * vy) / (vx * vx + vy * vy).clamp_min(1e-6)).clamp(0, 1)
            d = ((xs - ax - t * vx) ** 2 + (ys - ay - t * vy) ** 2).sqrt()
            alpha = (size / 2 + 0.5 - d).clamp(0, 1) * 0.8
        alpha = (alpha * row[:, 9, None, None])[:, None]
        img[live] = sub * (1 - alpha) + row[:, 6:9, None, None] * alpha
    return img


def make_keypoint_images(n: int, size: int = 32, num_keypoints: int = 3, margin: float = 3.0,
                         noise: float = 0.04, seed: int = 0) -> KeypointImages:
    """``n`` images of one object with ``num_keypoints`` sub-pixel keypoints.

    Raises:
        ValueError: ``num_keypoints`` outside ``1 … 9`` or a margin that leaves no room.
    """
    if not 1 <= num_keypoints <= len(_PALETTE) or size <= 2 * margin:
        raise ValueError(f"need 1 <= num_keypoints <= {len(_PALETTE)} and size > 2·margin, "
                         f"got {num_keypoints}, size {size}, margin {margin}")
    rng = np.random.default_rng(seed)
    ys, xs = _grid(size)
    img = _background(rng, n, size, ys, xs)
    kp = rng.uniform(margin, size - margin, (n, num_keypoints, 2))
    layers = np.zeros((n, 2 * num_keypoints, 10))
    for j in range(num_keypoints):  # limbs first, then the blobs on top
        layers[:, j, 1:3], layers[:, j, 3:5] = kp[:, j], kp[:, (j + 1) % num_keypoints]
        layers[:, j, 5], layers[:, j, 6:9], layers[:, j, 9] = 0.8, 0.9, 1.0
        b = num_keypoints + j
        layers[:, b, 0], layers[:, b, 1:3], layers[:, b, 3:5] = 1, kp[:, j], kp[:, j]
        layers[:, b, 5], layers[:, b, 6:9], layers[:, b, 9] = 1.1, _PALETTE[j], 1.0
    img = _paint(img, layers, ys, xs)
    img = img + noise * torch.tensor(rng.normal(0, 1, img.shape), dtype=torch.float32)
    return KeypointImages(img.clamp(0, 1), torch.tensor(kp, dtype=torch.float32))


def _figure(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """One stick figure's ``[J, 2]`` joints around a random centre."""
    cx, cy = rng.uniform(0.15 * size, 0.85 * size, 2)
    lean = rng.uniform(-0.3, 0.3)
    up = np.array([np.sin(lean), -np.cos(lean)])
    side = np.array([-up[1], up[0]])
    neck = np.array([cx, cy]) + up * 0.35 * scale
    hip = np.array([cx, cy]) - up * 0.25 * scale
    head = neck + up * 0.3 * scale
    j = [head, neck, hip]
    elbows, hands, feet = [], [], []
    for s in (-1, 1):
        a = rng.uniform(0.3, 1.4)
        elbow = neck + 0.3 * scale * (s * side * np.sin(a) - up * np.cos(a))
        b = a + rng.uniform(-0.6, 0.9)
        elbows.append(elbow)
        hands.append(elbow + 0.28 * scale * (s * side * np.sin(b) - up * np.cos(b)))
        c = rng.uniform(0.15, 0.6)
        feet.append(hip + 0.55 * scale * (s * side * np.sin(c) - up * np.cos(c)))
    return np.array(j + hands + elbows + feet)


def make_stick_figures(n: int, size: int = 64, people: tuple[int, int] = (2, 4),
                       scale: tuple[float, float] = (18.0, 30.0), noise: float = 0.04,
                       min_separation: float = 12.0, seed: int = 0) -> StickFigureScenes:
    """``n`` scenes of ``people`` stick figures each (joints inside the image).

    Figures may overlap, but the centres of their torsos (neck–hip midpoints) lie at least
    ``min_separation`` pixels apart: two figures drawn on top of each other could not be told
    apart by anyone. A figure that finds no place in 100 draws is left out.

    Raises:
        ValueError: a people range below 1 or a scale that does not fit the image.
    """
    if not 1 <= people[0] <= people[1] or not 4 <= scale[0] <= scale[1] <= size:
        raise ValueError(f"need 1 <= people[0] <= people[1] and 4 <= scale <= size, got "
                         f"people={people}, scale={scale}")
    rng = np.random.default_rng(seed)
    ys, xs = _grid(size)
    scenes = []
    for _ in range(n):
        figs = []
        for _ in range(int(rng.integers(people[0], people[1] + 1))):
            for _ in range(100):
                f = _figure(rng, size, rng.uniform(*scale))
                torso = (f[1] + f[2]) / 2
                apart = all(np.linalg.norm(torso - (g[1] + g[2]) / 2) >= min_separation
                            for g, _ in figs)
                if (f >= 1).all() and (f <= size - 1).all() and apart:
                    figs.append((f, rng.uniform(0.7, 1.0, 3)))
                    break
        scenes.append(figs)
    per_person = len(LIMBS) + len(JOINTS)
    layers = np.zeros((n, people[1] * per_person, 10))
    for i, figs in enumerate(scenes):
        for p, (f, body) in enumerate(figs):
            base = p * per_person
            for k, (a, b) in enumerate(LIMBS):
                layers[i, base + k] = [0, *f[a], *f[b], 1.2, *body, 1.0]
            for j in range(len(JOINTS)):
                layers[i, base + len(LIMBS) + j] = [1, *f[j], *f[j], 0.9, *(_PALETTE[j] * 0.8), 1.0]
    img = _paint(_background(rng, n, size, ys, xs), layers, ys, xs)
    img = img + noise * torch.tensor(rng.normal(0, 1, img.shape), dtype=torch.float32)
    keypoints = [torch.tensor(np.array([f for f, _ in figs]), dtype=torch.float32)
                 .reshape(-1, len(JOINTS), 2) for figs in scenes]
    return StickFigureScenes(img.clamp(0, 1), keypoints)
