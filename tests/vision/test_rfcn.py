"""R-FCN pieces: anchors vs torchvision's AnchorGenerator, anchor labelling and sampling,
the position-sensitive vote, box voting, and the detector's losses/outputs (empty images
included)."""

from __future__ import annotations

import pytest
import torch

from mlatlas.datasets.shapes import SceneSpec, make_scenes
from mlatlas.vision.rfcn import RFCN, RFCNConfig, box_voting
from mlatlas.vision.roi_pool import ps_roi_pool
from mlatlas.vision.rpn import RPNConfig, cell_anchors, grid_anchors, label_anchors, sample_labels


def test_anchors_match_torchvision(reference):
    reference("torchvision")
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes, ratios = (12, 18, 26), (0.5, 1.0, 2.0)
    gen = AnchorGenerator((sizes,), (ratios,))
    images = ImageList(torch.zeros(1, 3, 44, 36), [(44, 36)])
    feature = torch.zeros(1, 8, 11, 9)  # stride 4
    ref = gen(images, [feature])[0]
    ours = grid_anchors((11, 9), 4, cell_anchors(sizes, ratios))
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_label_anchors_and_sampling():
    anchors = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40], [0, 0, 5, 5],
                            [50, 50, 60, 60]])
    gt = torch.tensor([[0.0, 0, 10, 10], [52, 52, 66, 66]])
    labels, idx = label_anchors(anchors, gt, fg_iou=0.7, bg_iou=0.3)
    # IoU: 1 → fg; 0.68 → ignored; 0 → bg; 0.25 → bg; 0.39 but the best for gt 1 → fg
    assert labels.tolist() == [1.0, -1.0, 0.0, 0.0, 1.0] and idx[4] == 1
    labels, _ = label_anchors(anchors, torch.zeros(0, 4), 0.7, 0.3)
    assert labels.tolist() == [0.0] * 5  # no objects: all background
    many = torch.tensor([1.0] * 10 + [0.0] * 30 + [-1.0] * 5)
    s = sample_labels(many, 16, 0.25, torch.Generator().manual_seed(0))
    assert int((s == 1).sum()) == 4 and int((s == 0).sum()) == 12 and int((s >= 0).sum()) == 16


def test_box_voting():
    kept = torch.tensor([[0.0, 0, 10, 10]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.3, 0.8, 0.9])
    labels = torch.tensor([0, 0, 1, 0])  # box 2 is another class, box 3 does not overlap
    voted = box_voting(kept, torch.tensor([0]), boxes, scores, labels, iou_threshold=0.5)
    torch.testing.assert_close(voted, (0.9 * boxes[0] + 0.3 * boxes[1]) / 1.2 * torch.ones(1, 1))
    assert box_voting(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), boxes, scores,
                      labels).shape == (0, 4)


def _model():
    torch.manual_seed(0)
    return RFCN(RFCNConfig(width=16, rpn=RPNConfig(pre_nms_top_n=60, post_nms_top_n=12),
                           rois_per_image=16))


def test_position_sensitive_vote_is_the_mean_of_the_bins():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    feature = model.backbone(x)
    rois = [torch.tensor([[2.0, 3, 20, 25]]), torch.tensor([[0.0, 0, 31, 31], [8, 8, 16, 30]])]
    cls, box = model._head(feature, rois)
    flat = torch.tensor([[0, 2.0, 3, 20, 25], [1, 0, 0, 31, 31], [1, 8, 8, 16, 30]])
    pooled = ps_roi_pool(model.cls_maps(feature), flat, 3, 0.25)
    torch.testing.assert_close(cls, pooled.mean((2, 3)))  # eq. (2): r_c = Σ_ij r_c(i, j) / k²
    assert cls.shape == (3, 4) and box.shape == (3, 4)


def test_detector_losses_and_outputs_with_empty_images():
    ds = make_scenes(3, SceneSpec(image_size=32, min_objects=0, max_objects=2, min_size=8,
                                  max_size=14), seed=1)
    targets = ds.targets()
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    model = _model()
    losses = model.loss(ds.images, targets, torch.Generator().manual_seed(0))
    assert set(losses) == {"rpn_objectness", "rpn_box", "rfcn_cls", "rfcn_box"}
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.cls_maps.weight.grad is not None and model.rpn.conv.weight.grad is not None
    model.eval()
    dets = model(ds.images)
    assert len(dets) == 3
    for d in dets:
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) == len(d["scores"]) == len(d["labels"])
        assert bool((d["boxes"] >= 0).all() and (d["boxes"] <= 32).all())
        assert bool((d["labels"] >= 0).all() and (d["labels"] < 3).all())


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="x2 >= x1"):
        model.loss(torch.randn(1, 3, 32, 32), [{"boxes": torch.tensor([[9.0, 0, 4, 4]]),
                                                "labels": torch.tensor([0])}])
