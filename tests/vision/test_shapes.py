"""Synthetic detection scenes: deterministic per seed, boxes inside the image and around the
drawn shapes, overlaps bounded, empty images allowed, COCO export readable by pycocotools."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from mlatlas.datasets.coco_format import coco_ground_truth, cocoeval_map50, write_json
from mlatlas.datasets.shapes import (
    CLASSES,
    SceneSpec,
    make_scenes,
    random_horizontal_flip,
    shape_coverage,
)
from mlatlas.vision.boxes import box_iou


def test_deterministic_per_seed():
    a, b, c = (make_scenes(9, SceneSpec(image_size=40), seed=s) for s in (3, 3, 4))
    torch.testing.assert_close(a.images, b.images, atol=0, rtol=0)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert not torch.equal(a.images, c.images)


def test_boxes_inside_labels_valid_overlap_bounded():
    spec = SceneSpec(image_size=50, min_objects=2, max_objects=5, max_iou=0.2)
    ds = make_scenes(30, spec, seed=1)
    assert ds.images.shape == (30, 3, 50, 50) and ds.images.dtype == torch.float32
    assert 0 <= float(ds.images.min()) and float(ds.images.max()) <= 1
    for b, lab in zip(ds.boxes, ds.labels):
        assert len(b) == len(lab) and len(b) <= 5
        assert bool((b >= 0).all() and (b <= 50).all())
        side = b[:, 2] - b[:, 0]
        assert torch.allclose(side, b[:, 3] - b[:, 1])
        assert bool((side >= spec.min_size).all() and (side <= spec.max_size).all())
        assert set(lab.tolist()) <= {0, 1, 2}
        iou = box_iou(b, b) - torch.eye(len(b))
        assert float(iou.max()) <= 0.2 + 1e-6


def test_coverage_matches_box():
    coords = torch.arange(32, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    for kind in range(3):
        a = shape_coverage(torch.tensor([kind]), torch.tensor([16.0]), torch.tensor([14.0]),
                           torch.tensor([12.0]), xs, ys)[0]
        rows, cols = (a > 0.5).nonzero().unbind(1)
        assert int(cols.min()) == 10 and int(cols.max()) == 21  # box x: 10 .. 22
        assert int(rows.max()) == 19  # box y: 8 .. 20, bottom edge shared by all shapes
        assert int(rows.min()) in (8, 9)  # the triangle's apex is a single pixel
    assert float(a.sum()) == pytest.approx(72, rel=0.05)  # triangle area s²/2


def test_empty_images_and_coco_export(tmp_path):
    ds = make_scenes(6, SceneSpec(image_size=32, min_objects=0, max_objects=1, min_size=6,
                                  max_size=12), seed=5)
    assert any(len(b) == 0 for b in ds.boxes)
    coco = pytest.importorskip("pycocotools.coco")
    path = write_json(ds.to_coco(), tmp_path / "gt.json")
    with contextlib.redirect_stdout(io.StringIO()):
        api = coco.COCO(str(path))
    assert len(api.getImgIds()) == 6 and api.getCatIds() == [1, 2, 3]
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == list(CLASSES)
    assert len(api.getAnnIds()) == sum(len(b) for b in ds.boxes)
    ann = api.loadAnns(api.getAnnIds())[0]
    img = ann["image_id"] - 1
    x1, y1, x2, y2 = ds.boxes[img][0].tolist()
    assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])


def test_bad_input():
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        SceneSpec(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="max_size <= image_size"):
        SceneSpec(image_size=16, max_size=20)
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        make_scenes(-1)
    with pytest.raises(ValueError, match="x2 >= x1"):
        coco_ground_truth([{"boxes": torch.tensor([[4.0, 0, 2, 3]]),
                            "labels": torch.tensor([0])}], 8, CLASSES)
    with pytest.raises(ValueError, match="labels'\\] must lie in"):
        coco_ground_truth([{"boxes": torch.tensor([[0.0, 0, 2, 3]]),
                            "labels": torch.tensor([3])}], 8, CLASSES)


def test_random_horizontal_flip_moves_boxes_with_the_pixels():
    scenes = make_scenes(6, seed=3)
    images, targets = random_horizontal_flip(scenes.images, scenes.targets(),
                                             torch.Generator().manual_seed(0))
    flipped = [not torch.equal(a, b) for a, b in zip(images, scenes.images)]
    assert any(flipped) and not all(flipped)  # p = ½ over six images, seed 0
    for img, orig, t, t0, f in zip(images, scenes.images, targets, scenes.targets(), flipped):
        assert torch.equal(img, orig.flip(-1) if f else orig)
        assert torch.equal(t["labels"], t0["labels"])
        for b, b0 in zip(t["boxes"], t0["boxes"]):  # the flipped box holds the flipped crop
            x1, y1, x2, y2 = b.round().long().tolist()
            u1, v1, u2, v2 = b0.round().long().tolist()
            crop = orig[:, v1:v2, u1:u2]
            assert torch.equal(img[:, y1:y2, x1:x2], crop.flip(-1) if f else crop)


def test_cocoeval_map50_of_perfect_and_of_no_detections():
    scenes = make_scenes(8, seed=1)
    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in scenes.targets()]
    assert cocoeval_map50(scenes.to_coco(), perfect) == pytest.approx(1.0)
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
              "labels": torch.zeros(0, dtype=torch.long)} for _ in scenes.targets()]
    assert cocoeval_map50(scenes.to_coco(), empty) == 0.0
