"""Synthetic detection scenes: coloured circles, squares and triangles with boxes and classes.

Every image holds a few objects of varied size and colour on a shaded, noisy background,
with bounded overlaps (a later object may hide part of an earlier one) and clutter (thin
strokes and dots that are not objects). Scenes are rendered on the fly, anti-aliased from
signed distances, and are a pure function of the seed: the same seed gives the same images,
boxes and classes on every machine. :meth:`DetectionSet.to_coco` exports the ground truth
in COCO format (:mod:`mlatlas.datasets.coco_format`).

===============  =========================================================================
``images``       ``[N, 3, H, W]`` float32 RGB in ``[0, 1]``
``boxes[i]``     ``[n_i, 4]`` float32 ``(x1, y1, x2, y2)`` pixels, tight around the whole
                 shape (also its hidden part); pixel ``(r, c)`` covers ``[c, c+1)×[r, r+1)``
``labels[i]``    ``[n_i]`` int64 index into ``classes`` (``n_i`` may be 0: empty images)
``classes``      ``("circle", "square", "triangle")``
===============  =========================================================================

Shapes (side ``s`` = box width = box height): a disc of diameter ``s``; an axis-aligned
square of side ``s``; an upright isosceles triangle, base ``s`` and height ``s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mlatlas.datasets.coco_format import coco_ground_truth

__all__ = ["CLASSES", "DetectionSet", "SceneSpec", "make_scenes", "random_horizontal_flip",
           "shape_coverage"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
_MIN_CONTRAST = 0.45  # L1 distance (over RGB, 0..3) between an object's and the background's colour
_PLACE_TRIES = 60  # rejection-sampling attempts to place one object
_CHUNK = 256  # images rendered at once


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn.

    Attributes:
        image_size: Height = width ``H`` in pixels.
        min_objects: Fewest objects per image (0 allows empty images).
        max_objects: Most objects per image (fewer when they do not fit).
        min_size: Smallest object side ``s`` in pixels.
        max_size: Largest object side in pixels.
        max_iou: Largest IoU allowed between the boxes of two objects of one image.
        clutter: Distractor strokes and dots per image (not objects, no boxes).
        noise: Standard deviation of the per-pixel Gaussian noise.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 10.0
    max_size: float = 24.0
    max_iou: float = 0.2
    clutter: int = 4
    noise: float = 0.03

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError("need 0 <= min_objects <= max_objects, got "
                             f"{self.min_objects} and {self.max_objects}")
        if not 2 <= self.min_size <= self.max_size <= self.image_size:
            raise ValueError("need 2 <= min_size <= max_size <= image_size, got "
                             f"{self.min_size}, {self.max_size}, {self.image_size}")
        if not 0 <= self.max_iou <= 1:
            raise ValueError(f"max_iou must lie in [0, 1], got {self.max_iou}")
        if self.clutter < 0 or self.noise < 0:
            raise ValueError(f"clutter and noise must be >= 0, got {self.clutter}, {self.noise}")


@dataclass
class DetectionSet:
    """Rendered scenes with their boxes and classes (see the module table)."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    classes: tuple[str, ...] = CLASSES

    def __len__(self) -> int:
        return self.images.shape[0]

    def targets(self) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes": [n, 4], "labels": [n]}`` (torchvision's detection targets)."""
        return [{"boxes": b, "labels": lab} for b, lab in zip(self.boxes, self.labels)]

    def to_coco(self) -> dict:
        """The ground truth as a COCO dataset dict (``category_id = label + 1``)."""
        return coco_ground_truth(self.targets(), self.images.shape[-1], self.classes)


def shape_coverage(kind: Tensor, cx: Tensor, cy: Tensor, side: Tensor, xs: Tensor,
                   ys: Tensor) -> Tensor:
    """Anti-aliased coverage of shapes at pixel centres, from signed distances.

    Args:
        kind: ``[M]`` int64 shape index (0 circle, 1 square, 2 triangle).
        cx, cy: ``[M]`` box centres in pixels.
        side: ``[M]`` box sides ``s``.
        xs, ys: pixel-centre coordinates (``c + 0.5``, ``r + 0.5``), ``[H, W]`` or one
            window per shape ``[M, H, W]``.

    Returns:
        ``[M, H, W]`` coverage in ``[0, 1]``: ``clamp(0.5 − d, 0, 1)`` with ``d`` the signed
        distance to the shape's outline (negative inside).
    """
    dx = xs - cx[:, None, None]
    dy = ys - cy[:, None, None]
    h = (side / 2)[:, None, None]
    d_circle = torch.sqrt(dx * dx + dy * dy) - h
    d_square = torch.maximum(dx.abs(), dy.abs()) - h
    # triangle: apex (0, -h), base corners (±h, h); its sides have normals (±2, -1)/√5 and (0, 1)
    d_sides = (2 * dx.abs() - dy - h) / math.sqrt(5.0)
    d_triangle = torch.maximum(d_sides, dy - h)
    k = kind[:, None, None]
    d = torch.where(k == 0, d_circle, torch.where(k == 1, d_square, d_triangle))
    return (0.5 - d).clamp(0.0, 1.0)


def _segment_coverage(x0: Tensor, y0: Tensor, x1: Tensor, y1: Tensor, width: Tensor,
                      xs: Tensor, ys: Tensor) -> Tensor:
    """``[M, H, W]`` coverage of line segments of the given widths (clutter strokes)."""
    px, py = xs - x0[:, None, None], ys - y0[:, None, None]
    vx, vy = (x1 - x0)[:, None, None], (y1 - y0)[:, None, None]
    t = ((px * vx + py * vy) / (vx * vx + vy * vy).clamp_min(1e-6)).clamp(0, 1)
    d = torch.sqrt((px - t * vx) ** 2 + (py - t * vy) ** 2) - (width / 2)[:, None, None]
    return (0.5 - d).clamp(0.0, 1.0)


def _box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _layout(rng: np.random.Generator, spec: SceneSpec) -> dict[str, np.ndarray]:
    """Background, objects and clutter of one image (numbers only; rendering is batched)."""
    size = spec.image_size
    bg = rng.uniform(0.05, 0.95, 3)
    n_target = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    boxes, kinds, colours = [], [], []
    for _ in range(n_target):
        for _ in range(_PLACE_TRIES):
            s = rng.uniform(spec.min_size, spec.max_size)
            cx, cy = rng.uniform(s / 2, size - s / 2, 2)
            box = np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
            if not boxes or _box_iou_np(box, np.array(boxes)).max() <= spec.max_iou:
                break
        else:
            continue  # no room left for this object
        colour = rng.uniform(0, 1, 3)
        while np.abs(colour - bg).sum() < _MIN_CONTRAST:
            colour = rng.uniform(0, 1, 3)
        boxes.append(box)
        kinds.append(int(rng.integers(len(CLASSES))))
        colours.append(colour)
    n_clutter = spec.clutter
    ends = rng.uniform(0, size, (n_clutter, 2))
    angle, length = rng.uniform(0, 2 * np.pi, n_clutter), rng.uniform(3, size / 4, n_clutter)
    dots = rng.random(n_clutter) < 0.4  # dots: zero-length strokes
    length[dots] = 0
    clutter = np.concatenate([ends, ends + length[:, None] * np.stack(
        [np.cos(angle), np.sin(angle)], 1), rng.uniform(0.8, 2.0, (n_clutter, 1))], 1)
    return {"bg": bg, "grad": rng.uniform(-0.15, 0.15, 2),
            "boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4),
            "kinds": np.array(kinds, dtype=np.int64), "colours": np.array(colours).reshape(-1, 3),
            "clutter": clutter, "clutter_colours": rng.uniform(0, 1, (n_clutter, 3))}


def _pad(arrays: list[np.ndarray], width: int) -> tuple[Tensor, Tensor]:
    """Stack per-image ``[k_i, width]`` rows into ``[n, K, width]`` (+ ``[n, K]`` validity)."""
    k = max((len(a) for a in arrays), default=0)
    out = np.zeros((len(arrays), k, width), dtype=np.float32)
    valid = np.zeros((len(arrays), k), dtype=bool)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
        valid[i, :len(a)] = True
    return torch.from_numpy(out), torch.from_numpy(valid)


def _paint(canvas: Tensor, layers: Tensor, valid: Tensor, patch: int, margin: int,
           coverage) -> None:
    """Paint layers in order onto a channels-last canvas padded by ``margin`` pixels.

    Each layer is drawn only inside a ``patch × patch`` window whose top-left corner is the
    floor of the layer's first two numbers (its box corner), ``img ← img·(1−a) + c·a``.
    ``coverage(rows, xs, ys)`` gives the ``[n, patch, patch]`` alphas of ``rows`` at the
    window's pixel centres ``xs``/``ys`` (``[n, patch, patch]``).
    """
    n = canvas.shape[0]
    steps = torch.arange(patch)
    b = torch.arange(n)[:, None, None]
    for k in range(layers.shape[1]):
        rows = layers[:, k]
        x0 = rows[:, 0].floor().long() - 1
        y0 = rows[:, 1].floor().long() - 1
        rr = (y0[:, None] + steps)[:, :, None] + margin
        cc = (x0[:, None] + steps)[:, None, :] + margin
        xs = (x0[:, None, None] + steps[None, None, :]).float().expand(n, patch, patch) + 0.5
        ys = (y0[:, None, None] + steps[None, :, None]).float().expand(n, patch, patch) + 0.5
        a = (coverage(rows, xs, ys) * valid[:, k, None, None])[..., None]
        region = canvas[b, rr, cc]
        canvas[b, rr, cc] = region * (1 - a) + rows[:, None, None, 5:8] * a


def _render(layouts: list[dict[str, np.ndarray]], spec: SceneSpec, gen: torch.Generator) -> Tensor:
    """Composite a chunk of layouts: background, clutter, then objects in order, then noise."""
    size = spec.image_size
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    bg = torch.tensor(np.stack([lay["bg"] for lay in layouts]), dtype=torch.float32)
    grad = torch.tensor(np.stack([lay["grad"] for lay in layouts]), dtype=torch.float32)
    u, v = (xs - size / 2) / size, (ys - size / 2) / size
    img = bg[:, None, None, :] + (grad[:, 0, None, None] * u + grad[:, 1, None, None] * v)[..., None]
    margin = int(math.ceil(max(spec.max_size, size / 4 + 4))) + 8
    canvas = torch.nn.functional.pad(img, (0, 0, margin, margin, margin, margin))
    # rows painted by _paint: [window corner x, y, …, colour r g b (5:8), …]
    strokes, st_valid = _pad([np.concatenate([
        np.minimum(lay["clutter"][:, :2], lay["clutter"][:, 2:4]) - lay["clutter"][:, 4:5],
        np.zeros((len(lay["clutter"]), 3)), lay["clutter_colours"], lay["clutter"]], 1)
        for lay in layouts], 13)  # + the stroke: x0 y0 x1 y1 width (8:13)
    if strokes.shape[1]:
        _paint(canvas, strokes, st_valid, int(math.ceil(size / 4 + 4)) + 4, margin,
               lambda r, px, py: _segment_coverage(r[:, 8], r[:, 9], r[:, 10], r[:, 11],
                                                   r[:, 12], px, py))
    obj, obj_valid = _pad([np.concatenate([lay["boxes"], lay["kinds"][:, None], lay["colours"]], 1)
                           for lay in layouts], 8)  # box (0:4), kind (4), colour (5:8)
    if obj.shape[1]:
        _paint(canvas, obj, obj_valid, int(math.ceil(spec.max_size)) + 3, margin,
               lambda r, px, py: shape_coverage(r[:, 4].long(), (r[:, 0] + r[:, 2]) / 2,
                                                (r[:, 1] + r[:, 3]) / 2, r[:, 2] - r[:, 0],
                                                px, py))
    img = canvas[:, margin:margin + size, margin:margin + size].permute(0, 3, 1, 2)
    img = img + spec.noise * torch.randn(img.shape, generator=gen)
    return img.clamp_(0.0, 1.0).contiguous()


def make_scenes(n: int, spec: SceneSpec | None = None, seed: int = 0) -> DetectionSet:
    """Render ``n`` scenes, deterministically from ``seed``.

    Args:
        n: Number of images (>= 0).
        spec: How to draw them; default :class:`SceneSpec` (64×64, 1–4 objects of 10–24 px).
        seed: Seed of the layouts and the pixel noise.

    Returns:
        A :class:`DetectionSet`.

    Raises:
        ValueError: ``n < 0`` or a ``spec`` that is not a :class:`SceneSpec`.
    """
    spec = SceneSpec() if spec is None else spec
    if not isinstance(spec, SceneSpec):
        raise ValueError(f"spec must be a SceneSpec, got {type(spec).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    layouts = [_layout(rng, spec) for _ in range(n)]
    chunks = [_render(layouts[i:i + _CHUNK], spec, gen) for i in range(0, n, _CHUNK)]
    images = torch.cat(chunks) if chunks else torch.empty(0, 3, spec.image_size, spec.image_size)
    boxes = [torch.tensor(lay["boxes"], dtype=torch.float32) for lay in layouts]
    labels = [torch.tensor(lay["kinds"], dtype=torch.int64) for lay in layouts]
    return DetectionSet(images, boxes, labels, CLASSES)


def random_horizontal_flip(images: Tensor, targets: list[dict[str, Tensor]],
                           generator: torch.Generator) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Flip each image left-right with probability ½, boxes with it (the shapes are symmetric).

    Args:
        images: ``[B, C, H, W]``.
        targets: ``B`` dicts with ``boxes`` ``[n, 4]`` ``(x1, y1, x2, y2)`` and ``labels``.
        generator: Draws the flips.

    Returns:
        The images and new target dicts (``x1' = W − x2``, ``x2' = W − x1``).
    """
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    w = images.shape[-1]
    out = []
    for f, t in zip(flip.tolist(), targets):
        b = t["boxes"]
        if f and len(b):
            b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        out.append({"boxes": b, "labels": t["labels"]})
    return images, out
