"""YOLOv1: the vectorised loss equals a term-by-term loop over eq. (3) of the paper (values and
gradients); targets decode back to the ground truth (mAP 1); empty images; bad input."""

from __future__ import annotations

import pytest
import torch

from mlatlas.datasets.shapes import SceneSpec, make_scenes
from mlatlas.vision.boxes import mean_average_precision
from mlatlas.vision.yolo import YOLOConfig, YOLOv1, decode, encode_targets, yolo_loss

CFG = YOLOConfig(grid=5, boxes=2, classes=3, image_size=48, widths=(8, 8, 8, 8), hidden=16)


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _loop_loss(pred, targets, cfg):
    """Eq. (3) of Redmon et al., one cell and one predictor at a time (the reference)."""
    s, b, size = cfg.grid, cfg.boxes, cfg.image_size
    total = pred.new_zeros(())
    for n in range(pred.shape[0]):
        for i in range(s):
            for j in range(s):
                cell = pred[n, i, j]
                boxes = [cell[5 * k:5 * k + 5] for k in range(b)]
                if targets.obj[n, i, j]:
                    gt = targets.xyxy[n, i, j].tolist()
                    ious = []
                    for p in boxes:
                        p = p.detach().tolist()
                        cx, cy = (j + p[0]) / s * size, (i + p[1]) / s * size
                        w, h = max(p[2], 0) ** 2 * size, max(p[3], 0) ** 2 * size
                        ious.append(_iou([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], gt))
                    r = max(range(b), key=lambda k: (ious[k], -k))  # first of the best
                    t = targets.box[n, i, j]
                    p = boxes[r]
                    total = total + cfg.lambda_coord * ((p[0] - t[0]) ** 2 + (p[1] - t[1]) ** 2)
                    total = total + cfg.lambda_coord * ((p[2] - t[2]) ** 2 + (p[3] - t[3]) ** 2)
                    total = total + (p[4] - ious[r]) ** 2
                    for k in range(b):
                        if k != r:
                            total = total + cfg.lambda_noobj * boxes[k][4] ** 2
                    total = total + ((cell[5 * b:] - targets.cls[n, i, j]) ** 2).sum()
                else:
                    for p in boxes:
                        total = total + cfg.lambda_noobj * p[4] ** 2
    return total / pred.shape[0]


def _scenes(n, seed=0):
    return make_scenes(n, SceneSpec(image_size=48, min_objects=0, max_objects=4, min_size=6,
                                    max_size=14), seed=seed)


def test_loss_matches_the_papers_sum():
    ds = _scenes(3)
    targets = encode_targets(ds.targets(), CFG)
    gen = torch.Generator().manual_seed(0)
    pred = (torch.rand(3, 5, 5, CFG.depth, generator=gen, dtype=torch.float64) * 0.8 + 0.1)
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    ours = sum(yolo_loss(a, targets, CFG).values())
    ref = _loop_loss(b, targets, CFG)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    ga, = torch.autograd.grad(ours, a)
    gb, = torch.autograd.grad(ref, b)
    torch.testing.assert_close(ga, gb, atol=1e-10, rtol=0)


def _perfect(targets, cfg):
    """The prediction a perfect network would make: first predictor exact, conf 1."""
    n, s = targets.obj.shape[:2]
    pred = torch.zeros(n, s, s, cfg.depth)
    pred[..., :4] = targets.box
    pred[..., 4] = targets.obj.float()
    pred[..., 5 * cfg.boxes:] = targets.cls
    return pred


def test_perfect_prediction_has_zero_loss_and_decodes_to_ground_truth():
    ds = _scenes(6, seed=2)
    targets = encode_targets(ds.targets(), CFG)
    pred = _perfect(targets, CFG)
    losses = yolo_loss(pred, targets, CFG)
    assert all(abs(float(v)) < 1e-10 for v in losses.values())
    dets = decode(pred, CFG)
    kept = [{"boxes": t["boxes"], "labels": t["labels"]} for t in ds.targets()]
    # one object per cell: objects that share a cell with an earlier one are not predicted
    m = mean_average_precision(dets, kept, num_classes=3)
    n_cells = int(targets.obj.sum())
    n_obj = sum(len(t["boxes"]) for t in kept)
    assert m.map == pytest.approx(1.0) if n_cells == n_obj else m.map > 0.9
    for d in dets:
        assert torch.equal(d["scores"], torch.ones_like(d["scores"]))


def test_empty_image_and_cell_assignment():
    t = encode_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
                        {"boxes": torch.tensor([[20.0, 20, 30, 36]]), "labels": torch.tensor([2])}],
                       CFG)
    assert not t.obj[0].any() and int(t.obj[1].sum()) == 1
    assert bool(t.obj[1, 2, 2])  # centre (25, 28) in a 48-px image, 5×5 grid: row 2, col 2
    torch.testing.assert_close(t.box[1, 2, 2], torch.tensor(
        [25 / 48 * 5 - 2, 28 / 48 * 5 - 2, (10 / 48) ** 0.5, (16 / 48) ** 0.5]))
    pred = torch.zeros(2, 5, 5, CFG.depth, requires_grad=True)
    loss = sum(yolo_loss(pred, t, CFG).values())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert decode(torch.zeros(1, 5, 5, CFG.depth), CFG)[0]["boxes"].shape == (0, 4)


def test_network_shape():
    net = YOLOv1(CFG)
    assert net(torch.randn(2, 3, 48, 48)).shape == (2, 5, 5, CFG.depth)


def test_bad_input():
    with pytest.raises(ValueError, match="x2 >= x1"):
        encode_targets([{"boxes": torch.tensor([[9.0, 0, 4, 4]]), "labels": torch.tensor([0])}],
                       CFG)
    with pytest.raises(ValueError, match=r"labels'\] must lie in \[0, 2\]"):
        encode_targets([{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([5])}],
                       CFG)
    t = encode_targets([], CFG)
    with pytest.raises(ValueError, match=r"pred must be \[N, 5, 5, 13\], got \(1, 5, 5, 12\)"):
        yolo_loss(torch.zeros(1, 5, 5, 12), t, CFG)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 48, 48\]"):
        YOLOv1(CFG)(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="image_size must be divisible by 2"):
        YOLOConfig(image_size=50)
