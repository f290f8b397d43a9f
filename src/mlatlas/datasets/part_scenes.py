"""Segmentation scenes with whole objects and parts, for promptable segmentation.

Each image holds a few coloured shapes (circles, squares, triangles; the renderer of
:mod:`mlatlas.datasets.shapes`) that do not overlap; about half of them carry a smaller
shape of another colour inside them — a part. A point on a part is ambiguous in the sense
of SAM (Kirillov et al. 2023): it may mean the part or the whole object, so both are valid
answers; a point on the rest of an object means the whole. Everything is a pure function of
the seed.

=============  ==========================================================================
``images``     ``[N, 3, S, S]`` float32 in ``[0, 1]``
``wholes``     per image ``[n_i, S, S]`` bool: each object with its part
``parts``      per image ``[n_i, S, S]`` bool: the object's part (all False without one)
``boxes``      per image ``[n_i, 4]`` float32 ``(x1, y1, x2, y2)`` of the whole
=============  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mlatlas.datasets.shapes import shape_coverage

__all__ = ["PartScenes", "make_part_scenes", "sample_point"]

_CONTRAST = 0.5  # least L1 distance (RGB) between touching colours


@dataclass
class PartScenes:
    """Rendered scenes with their object and part masks (see the module table)."""

    images: Tensor
    wholes: list[Tensor]
    parts: list[Tensor]
    boxes: list[Tensor]

    def __len__(self) -> int:
        return self.images.shape[0]


def _colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    while True:
        c = rng.uniform(0, 1, 3)
        if all(np.abs(c - a).sum() >= _CONTRAST for a in avoid):
            return c


def make_part_scenes(n: int, size: int = 64, max_objects: int = 3,
                     object_size: tuple[float, float] = (18.0, 30.0), part_prob: float = 0.5,
                     noise: float = 0.03, seed: int = 0) -> PartScenes:
    """Render ``n`` scenes of ``1 … max_objects`` objects, some with a part.

    Raises:
        ValueError: ``n < 0``, ``size < 16`` or an object size that does not fit.
    """
    if n < 0 or size < 16:
        raise ValueError(f"need n >= 0 and size >= 16, got n={n}, size={size}")
    lo, hi = object_size
    if not 4 <= lo <= hi <= size:
        raise ValueError(f"object_size must satisfy 4 <= lo <= hi <= size, got {object_size}")
    rng = np.random.default_rng(seed)
    layouts = [_layout(rng, size, max_objects, lo, hi, part_prob) for _ in range(n)]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    objs = [(i, o) for i, lay in enumerate(layouts) for o in lay["objects"]]
    f32 = lambda v: torch.tensor(np.array(v, dtype=np.float64), dtype=torch.float32)  # noqa: E731
    cov = shape_coverage(torch.tensor([o["kind"] for _, o in objs], dtype=torch.long),
                         f32([o["cx"] for _, o in objs]), f32([o["cy"] for _, o in objs]),
                         f32([o["s"] for _, o in objs]), xs, ys) if objs else torch.zeros(0)
    with_part = [k for k, (_, o) in enumerate(objs) if o["part"] is not None]
    pcov = torch.zeros_like(cov)
    if with_part:
        parts_ = [objs[k][1]["part"] for k in with_part]
        pcov[with_part] = shape_coverage(
            torch.tensor([p["kind"] for p in parts_], dtype=torch.long),
            f32([p["cx"] for p in parts_]), f32([p["cy"] for p in parts_]),
            f32([p["s"] for p in parts_]), xs, ys) * cov[with_part]
    images = f32([lay["bg"] for lay in layouts])[:, :, None, None].expand(n, 3, size, size).clone()
    wholes: list[list[Tensor]] = [[] for _ in range(n)]
    parts: list[list[Tensor]] = [[] for _ in range(n)]
    for k, (i, o) in enumerate(objs):  # objects do not overlap: painting order is free
        a = cov[k]
        images[i] = images[i] * (1 - a) + f32(o["colour"])[:, None, None] * a
        if o["part"] is not None:
            pa = pcov[k]
            images[i] = images[i] * (1 - pa) + f32(o["part"]["colour"])[:, None, None] * pa
        wholes[i].append(cov[k] > 0.5)
        parts[i].append(pcov[k] > 0.5)
    noise_t = torch.tensor(rng.normal(0, 1, (n, 3, size, size)), dtype=torch.float32)
    images = (images + noise * noise_t).clamp(0, 1)
    empty = torch.zeros(0, size, size, dtype=torch.bool)
    return PartScenes(images, [torch.stack(w) if w else empty for w in wholes],
                      [torch.stack(p) if p else empty for p in parts],
                      [f32([o["box"] for o in lay["objects"]]).reshape(-1, 4) for lay in layouts])


def _layout(rng: np.random.Generator, size: int, max_objects: int, lo: float, hi: float,
            part_prob: float) -> dict:
    """Background colour and non-overlapping objects (with optional parts) of one scene."""
    bg = rng.uniform(0, 1, 3)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(50):
            s = rng.uniform(lo, hi)
            cx, cy = rng.uniform(s / 2 + 1, size - s / 2 - 1, 2)
            box = np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
            if all(box[0] > b[2] + 2 or b[0] > box[2] + 2 or box[1] > b[3] + 2
                   or b[1] > box[3] + 2 for b in (o["box"] for o in objects)):
                break
        else:
            continue
        kind = int(rng.integers(3))
        colour = _colour(rng, [bg])
        part = None
        if rng.random() < part_prob:
            # a spot well inside the object: its centre (triangles: lower, where it is wide)
            part = {"s": s * rng.uniform(0.3, 0.42), "kind": int(rng.integers(3)),
                    "cx": cx + rng.uniform(-0.08, 0.08) * s,
                    "cy": cy + (0.18 if kind == 2 else rng.uniform(-0.08, 0.08)) * s,
                    "colour": _colour(rng, [colour])}
        objects.append({"box": box, "kind": kind, "cx": cx, "cy": cy, "s": s, "colour": colour,
                        "part": part})
    return {"bg": bg, "objects": objects}


def sample_point(mask: Tensor, gen: torch.Generator) -> Tensor:
    """A random pixel centre ``(x, y)`` of a non-empty bool mask ``[S, S]``, away from its
    edge when the mask is thick enough (eroded by one pixel first)."""
    inner = mask.clone()
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    pool = inner if inner.any() else mask
    ys, xs = pool.nonzero(as_tuple=True)
    i = int(torch.randint(len(ys), (), generator=gen))
    return torch.stack([xs[i], ys[i]]).float()
