"""Boxes: NMS / batched NMS vs torchvision (ties, degenerate boxes), IoU/GIoU and box coding
vs torchvision, and our COCO mAP vs pycocotools' COCOeval on the same detections."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from mlatlas.datasets.coco_format import coco_ground_truth, coco_results
from mlatlas.datasets.shapes import CLASSES, SceneSpec, make_scenes
from mlatlas.vision.boxes import (
    batched_nms,
    box_iou,
    decode_boxes,
    encode_boxes,
    generalized_box_iou,
    mean_average_precision,
    nms,
)


def _random_boxes(n: int, gen: torch.Generator, integer: bool = False) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 40
    wh = torch.rand(n, 2, generator=gen) * 20 + 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    return boxes.round() if integer else boxes


@pytest.mark.parametrize("n,thr,integer", [(1, 0.5, False), (37, 0.5, False), (301, 0.3, False),
                                           (301, 0.7, True), (203, 0.0, True)])
def test_nms_matches_torchvision(reference, n, thr, integer):
    tv = reference("torchvision")
    gen = torch.Generator().manual_seed(n)
    boxes = _random_boxes(n, gen, integer)
    scores = torch.rand(n, generator=gen)
    if integer:  # many exact ties in score
        scores = (scores * 5).floor() / 5
    torch.testing.assert_close(nms(boxes, scores, thr), tv.ops.nms(boxes, scores, thr),
                               atol=0, rtol=0)


def test_nms_degenerate_boxes_and_ties(reference):
    tv = reference("torchvision")
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 9], [5, 5, 5, 9],
                          [3, 3, 3, 3], [0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 20, 30]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.9, 0.8, 0.8, 0.8, 0.9, 0.5, 0.5])
    for thr in (0.0, 0.5, 0.99):
        torch.testing.assert_close(nms(boxes, scores, thr), tv.ops.nms(boxes, scores, thr),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("n,ties", [(0, True), (5, True), (211, True), (1013, False)])
def test_batched_nms_matches_torchvision(reference, n, ties):
    tv = reference("torchvision")  # n > 1000 takes torchvision's per-class path
    gen = torch.Generator().manual_seed(7 + n)
    boxes = _random_boxes(n, gen, integer=True)
    scores = torch.rand(n, generator=gen)
    if ties:  # ties within and across classes
        scores = (scores * 4).floor() / 4
    idxs = torch.randint(0, 3, (n,), generator=gen)
    for thr in (0.2, 0.5):
        torch.testing.assert_close(batched_nms(boxes, scores, idxs, thr),
                                   tv.ops.batched_nms(boxes, scores, idxs, thr), atol=0, rtol=0)


def test_iou_giou_match_torchvision(reference):
    tv = reference("torchvision")
    gen = torch.Generator().manual_seed(0)
    a, b = _random_boxes(13, gen), _random_boxes(7, gen)
    torch.testing.assert_close(box_iou(a, b), tv.ops.box_iou(a, b), atol=1e-6, rtol=0)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours, ref = generalized_box_iou(a1, b1), tv.ops.generalized_box_iou(a2, b2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    cot = torch.randn(ours.shape, generator=gen)
    ga = torch.autograd.grad(ours, (a1, b1), cot)
    gb = torch.autograd.grad(ref, (a2, b2), cot)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_box_coding_matches_torchvision_boxcoder(reference):
    reference("torchvision")
    from torchvision.models.detection._utils import BoxCoder

    gen = torch.Generator().manual_seed(1)
    anchors, boxes = _random_boxes(29, gen), _random_boxes(29, gen)
    w = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(w)
    deltas = encode_boxes(boxes, anchors, w)
    torch.testing.assert_close(deltas, coder.encode_single(boxes, anchors), atol=1e-6, rtol=0)
    wide = torch.randn(29, 8, generator=gen) * 3  # two delta sets per anchor, some clamped
    torch.testing.assert_close(decode_boxes(wide, anchors, w), coder.decode_single(wide, anchors),
                               atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(decode_boxes(deltas, anchors, w), boxes, atol=1e-4, rtol=0)


def _noisy_detections(targets, gen, n_classes):
    dets = []
    for t in targets:
        b = t["boxes"]
        jitter = b + torch.randn(b.shape, generator=gen) * 2.0
        jitter = torch.stack([jitter[:, 0], jitter[:, 1],
                              torch.maximum(jitter[:, 2], jitter[:, 0] + 0.5),
                              torch.maximum(jitter[:, 3], jitter[:, 1] + 0.5)], 1)
        fp = _random_boxes(3, gen)
        labels = torch.cat([t["labels"], torch.randint(0, n_classes, (3,), generator=gen)])
        flip = torch.rand(len(labels), generator=gen) < 0.15  # some wrong classes
        labels = torch.where(flip, (labels + 1) % n_classes, labels)
        scores = (torch.rand(len(labels), generator=gen) * 10).floor() / 10  # with ties
        dets.append({"boxes": torch.cat([jitter, fp]), "scores": scores, "labels": labels})
    return dets


def _cocoeval(gt_dict, results):
    coco = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco.COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = cocoeval.COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_map_matches_pycocotools(seed):
    ds = make_scenes(24, SceneSpec(image_size=48, min_objects=0, max_objects=5, min_size=6,
                                   max_size=16), seed=seed)
    targets = ds.targets()
    gen = torch.Generator().manual_seed(seed)
    dets = _noisy_detections(targets, gen, len(CLASSES))
    dets[3] = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
               "labels": torch.zeros(0, dtype=torch.int64)}  # an image without detections
    stats = _cocoeval(ds.to_coco(), coco_results(dets))
    ours = mean_average_precision(dets, targets, num_classes=len(CLASSES))
    assert abs(ours.map - stats[0]) < 1e-12 and abs(ours.map_50 - stats[1]) < 1e-12
    assert abs(ours.map_75 - stats[2]) < 1e-12


def test_map_class_without_ground_truth_and_max_detections():
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0])}]
    # class 1 has detections but no ground truth: left out of the mean, as in COCOeval
    dets = [{"boxes": torch.cat([boxes, boxes]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([0, 1])}]
    stats = _cocoeval(coco_ground_truth(targets, 16, ("a", "b")), coco_results(dets))
    m = mean_average_precision(dets, targets, num_classes=2)
    assert m.map == pytest.approx(stats[0], abs=1e-12) and m.map == pytest.approx(1.0)
    assert torch.isnan(m.ap[1]).all()
    many = [{"boxes": boxes.repeat(5, 1) + torch.arange(5.0)[:, None] * 20,
             "scores": torch.arange(5.0), "labels": torch.zeros(5, dtype=torch.int64)}]
    # the one true positive has the lowest score: with max_detections=4 it is never seen
    assert mean_average_precision(many, targets, max_detections=4).map == 0.0


def test_bad_input():
    good = torch.tensor([[0.0, 0, 4, 4]])
    with pytest.raises(ValueError, match="boxes.*x2 >= x1"):
        nms(torch.tensor([[5.0, 0, 4, 4]]), torch.tensor([1.0]), 0.5)
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        nms(good, torch.tensor([float("nan")]), 0.5)
    with pytest.raises(ValueError, match=r"scores must be a \[N\] tensor with N = 1, got \(2,\)"):
        nms(good, torch.tensor([1.0, 2.0]), 0.5)
    with pytest.raises(ValueError, match=r"boxes1 must have shape \[..., 4\]"):
        box_iou(torch.zeros(3, 5), good)
    with pytest.raises(TypeError, match="boxes must be floating point"):
        nms(good.long(), torch.tensor([1.0]), 0.5)
    with pytest.raises(ValueError, match="idxs must be"):
        batched_nms(good, torch.tensor([1.0]), torch.tensor([0, 1]), 0.5)
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    det = {"boxes": good, "scores": torch.tensor([1.0]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="one entry per image"):
        mean_average_precision([det], [])
    with pytest.raises(ValueError, match="labels must lie in"):
        mean_average_precision([det], [{"boxes": good, "labels": torch.tensor([3])}],
                               num_classes=2)
    with pytest.raises(ValueError, match="scores'\\] must not contain NaN"):
        mean_average_precision([{**det, "scores": torch.tensor([float("nan")])}],
                               [{"boxes": good, "labels": torch.tensor([0])}])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    assert torch.isnan(torch.tensor(mean_average_precision([det], [empty]).map))
