"""Part scenes (the SAM experiment's data): deterministic per seed, every part inside its
object and much smaller than it, objects disjoint, boxes
around their objects, sampled points inside their mask; bad input refused."""

from __future__ import annotations

import pytest
import torch

from mlatlas.datasets.part_scenes import make_part_scenes, sample_point


def test_deterministic_per_seed():
    a, b, c = (make_part_scenes(5, size=40, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert all(torch.equal(x, y) for x, y in zip(a.wholes, b.wholes))


def test_parts_inside_objects_and_objects_disjoint():
    data = make_part_scenes(12, size=64, seed=1)
    assert data.images.shape == (12, 3, 64, 64) and len(data) == 12
    n_parts = 0
    for wholes, parts, boxes in zip(data.wholes, data.parts, data.boxes):
        assert wholes.shape == parts.shape and len(boxes) == len(wholes) >= 1
        assert not (parts & ~wholes).any()  # a part lies inside its object
        assert (wholes.sum(0) <= 1).all()  # objects do not overlap
        for whole, part, box in zip(wholes, parts, boxes):
            ys, xs = whole.nonzero(as_tuple=True)
            assert box[0] <= xs.min() + 1 and xs.max() <= box[2] and box[1] <= ys.min() + 1
            if part.any():
                n_parts += 1
                assert part.sum() < 0.4 * whole.sum()  # a part is (0.3 … 0.42)² of the box
    assert n_parts > 0


def test_sample_point_is_inside_the_mask():
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(9, 11, dtype=torch.bool)
    mask[2:7, 3:9] = True
    for _ in range(20):
        x, y = sample_point(mask, gen).long()
        assert mask[y, x] and 3 <= y <= 5 and 4 <= x <= 7  # eroded: off the edge


def test_bad_input():
    with pytest.raises(ValueError, match="size >= 16, got n=2, size=8"):
        make_part_scenes(2, size=8)
    with pytest.raises(ValueError, match=r"object_size must satisfy .* got \(30.0, 20.0\)"):
        make_part_scenes(2, object_size=(30.0, 20.0))
