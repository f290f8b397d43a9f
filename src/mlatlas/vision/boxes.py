"""Boxes for detection: IoU and GIoU, R-CNN box coding, non-maximum suppression, COCO mAP.

Detectors compare boxes by intersection over union, regress them as offsets from anchors,
remove duplicates greedily by NMS, and are scored by the COCO mean average precision: for
each class, precision is interpolated at 101 recall levels after greedy matching of the
score-ranked detections to the ground truth at IoU ≥ t, averaged over classes (and over
``t = 0.5, 0.55, …, 0.95`` for mAP@[.5:.95]). Box coding follows Girshick et al. 2014
(R-CNN, arXiv:1311.2524); GIoU Rezatofighi et al. 2019 (arXiv:1902.09630); the metric
Lin et al. 2014 (COCO, arXiv:1405.0312). Signatures follow ``torchvision.ops``.

=========  ===========================================================================
box        ``(x1, y1, x2, y2)``, ``x2 ≥ x1``, ``y2 ≥ y1`` (zero area allowed)
IoU        ``|A ∩ B| / |A ∪ B|``;  GIoU ``= IoU − |C \\ (A ∪ B)| / |C|``, C the hull box
deltas     ``(dx, dy, dw, dh)`` of a box relative to an anchor, times ``weights``
t, T       IoU threshold of a match; the ``T`` thresholds of the metric
R          the 101 recall levels ``0, 0.01, …, 1``
=========  ===========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["COCO_IOU_THRESHOLDS", "DetectionMetrics", "batched_nms", "box_area", "box_iou",
           "check_boxes", "clip_boxes", "decode_boxes", "encode_boxes", "generalized_box_iou",
           "mean_average_precision", "nms", "nms_top_k"]

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # largest dw, dh before exp() (torchvision's default)


def _linspace(start: float, stop: float, num: int) -> tuple[float, ...]:
    # numpy.linspace's arithmetic (i·step + start, last = stop), which pycocotools uses
    step = (stop - start) / (num - 1)
    return tuple(i * step + start for i in range(num - 1)) + (stop,)


COCO_IOU_THRESHOLDS: tuple[float, ...] = _linspace(0.5, 0.95, 10)
_RECALL_LEVELS: tuple[float, ...] = _linspace(0.0, 1.0, 101)


def check_boxes(boxes: Tensor, name: str) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``boxes`` is a float
    ``[..., 4]`` tensor of ``(x1, y1, x2, y2)`` with ``x2 >= x1`` and ``y2 >= y1``."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(boxes).__name__}")
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4] (x1, y1, x2, y2), got "
                         f"{tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {boxes.dtype}")
    if bool((boxes[..., 2] < boxes[..., 0]).any() or (boxes[..., 3] < boxes[..., 1]).any()):
        raise ValueError(f"{name} must satisfy x2 >= x1 and y2 >= y1; got boxes with x2 < x1 "
                         "or y2 < y1 (is the format (x1, y1, x2, y2)?)")


def box_area(boxes: Tensor) -> Tensor:
    """``[..., N, 4]`` → ``[..., N]`` areas ``(x2 − x1)(y2 − y1)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # |A ∩ B|
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU.

    Args:
        boxes1: ``[..., N, 4]``.
        boxes2: ``[..., M, 4]``.

    Returns:
        ``[..., N, M]`` IoU; NaN between two zero-area boxes that do not overlap (0/0), as
        torchvision.

    Raises:
        ValueError: wrong shape or boxes with ``x2 < x1``/``y2 < y1``.
    """
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU ``IoU − (|C| − |A ∪ B|) / |C|`` with ``C`` the smallest enclosing box.

    Args:
        boxes1: ``[..., N, 4]``.
        boxes2: ``[..., M, 4]``.

    Returns:
        ``[..., N, M]`` GIoU in ``[−1, 1]``.
    """
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    inter, union = _inter_union(boxes1, boxes2)
    lt = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return inter / union - (hull - union) / hull  # eq. (GIoU): IoU − |C \ (A ∪ B)| / |C|


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip ``[..., 4]`` boxes to an image of ``size = (H, W)``."""
    h, w = size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def encode_boxes(boxes: Tensor, anchors: Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """R-CNN regression targets of ``boxes`` relative to ``anchors`` (torchvision's BoxCoder).

    Args:
        boxes: ``[N, 4]`` target boxes.
        anchors: ``[N, 4]`` reference boxes (positive width and height).
        weights: ``(wx, wy, ww, wh)``.

    Returns:
        ``[N, 4]`` deltas ``(wx·(x − xa)/wa, wy·(y − ya)/ha, ww·log(w/wa), wh·log(h/ha))``.
    """
    wx, wy, ww, wh = weights
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    return torch.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,  # eq. (R-CNN C.1)
                        ww * torch.log(bw / aw), wh * torch.log(bh / ah)], 1)


def decode_boxes(deltas: Tensor, anchors: Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_XFORM_CLIP) -> Tensor:
    """Inverse of :func:`encode_boxes` (``dw, dh`` clamped at ``clip`` before ``exp``).

    Args:
        deltas: ``[N, 4·k]`` (k sets of deltas per anchor, e.g. one per class).
        anchors: ``[N, 4]``.
        weights: ``(wx, wy, ww, wh)``.
        clip: Largest ``dw``/``dh``.

    Returns:
        ``[N, 4·k]`` boxes.
    """
    anchors = anchors.to(deltas.dtype)
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = (deltas[:, 2::4] / ww).clamp(max=clip), (deltas[:, 3::4] / wh).clamp(max=clip)
    cx, cy = dx * aw[:, None] + ax[:, None], dy * ah[:, None] + ay[:, None]
    half_w, half_h = 0.5 * (torch.exp(dw) * aw[:, None]), 0.5 * (torch.exp(dh) * ah[:, None])
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 2).flatten(1)


def _check_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    check_boxes(boxes, "boxes")
    if boxes.ndim != 2:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if not isinstance(scores, Tensor) or scores.shape != boxes.shape[:1]:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a [N] tensor with N = {boxes.shape[0]}, got {got}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores must not contain NaN")
    if not isinstance(iou_threshold, (int, float)) or math.isnan(iou_threshold):
        raise ValueError(f"iou_threshold must be a number, got {iou_threshold!r}")


def _greedy(boxes: Tensor, scores: Tensor, iou_threshold: float,
            same_group: Tensor | None, limit: int | None = None) -> Tensor:
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    inter, union = _inter_union(b, b)
    # IoU in the boxes' dtype, compared in float64 like torchvision's kernel (an IoU of 0.2 in
    # float32 is 0.2000000030 > 0.2); NaN (two empty boxes) never suppresses
    over = (inter / union).to(torch.float64) > iou_threshold
    if same_group is not None:
        over &= same_group[order][:, order]
    alive = torch.ones(len(order), dtype=torch.bool)
    kept, i = [], 0
    while True:  # eq. (NMS): keep the best box left, drop every later box it overlaps
        kept.append(i)
        if len(kept) == limit:
            break
        alive[i] = False
        alive &= ~over[i]
        left = alive[i + 1:]
        if not bool(left.any()):
            break
        i = i + 1 + int(left.to(torch.uint8).argmax())
    return order[torch.tensor(kept, dtype=torch.int64)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression (``torchvision.ops.nms``).

    Boxes are visited in decreasing score (tied scores in the order of
    ``torch.sort(scores, descending=True)``, as torchvision's CPU kernel); each kept box
    removes every later box whose IoU with it is ``> iou_threshold``. Two zero-area boxes
    have IoU 0/0 = NaN and never suppress each other.

    Args:
        boxes: ``[N, 4]`` float boxes.
        scores: ``[N]`` scores (no NaN).
        iou_threshold: Boxes overlapping a kept box by more than this are discarded.

    Returns:
        ``[K]`` int64 indices of the kept boxes, in decreasing score.

    Raises:
        ValueError: bad shapes, ``x2 < x1``, NaN scores.
    """
    _check_nms(boxes, scores, iou_threshold)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return _greedy(boxes, scores, float(iou_threshold), None)


def nms_top_k(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int) -> Tensor:
    """``nms(boxes, scores, iou_threshold)[:k]``, stopping as soon as ``k`` boxes are kept.

    What a region proposal network needs (its post-NMS top-N) without the rest of the loop.
    """
    _check_nms(boxes, scores, iou_threshold)
    if boxes.shape[0] == 0 or k <= 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return _greedy(boxes, scores, float(iou_threshold), None, int(k))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category ``idxs`` independently (``torchvision.ops.batched_nms``).

    Args:
        boxes: ``[N, 4]``.
        scores: ``[N]``.
        idxs: ``[N]`` int category of each box; boxes of different categories never
            suppress each other.
        iou_threshold: As in :func:`nms`.

    Returns:
        ``[K]`` int64 indices of the kept boxes, in decreasing score. One NMS over all boxes
        with a same-category mask: torchvision's path for ``N ≤ 1000`` (offset boxes), exact
        without the offset's rounding; for larger ``N`` torchvision re-sorts per-class
        results and may order tied scores differently.
    """
    _check_nms(boxes, scores, iou_threshold)
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
        got = tuple(idxs.shape) if isinstance(idxs, Tensor) else type(idxs).__name__
        raise ValueError(f"idxs must be a [N] tensor with N = {boxes.shape[0]}, got {got}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return _greedy(boxes, scores, float(iou_threshold), idxs[:, None] == idxs[None, :])


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO-style average precision (all areas, up to ``max_detections`` per image).

    Attributes:
        map: mAP averaged over the IoU thresholds (mAP@[.5:.95] for COCO's thresholds).
        map_50: mAP at IoU 0.5 (NaN if 0.5 is not among the thresholds).
        map_75: mAP at IoU 0.75 (NaN if absent).
        ap: ``[K, T]`` AP per class and threshold; NaN rows for classes without ground truth.
        iou_thresholds: The ``T`` thresholds.
    """

    map: float
    map_50: float
    map_75: float
    ap: Tensor
    iou_thresholds: tuple[float, ...]


def _match(ious: Tensor, thresholds: Tensor) -> Tensor:
    """``[T, D]`` matched flags of score-sorted detections (COCO's greedy matching)."""
    t_count, (d_count, g_count) = len(thresholds), ious.shape
    matched = torch.zeros(t_count, d_count, dtype=torch.bool)
    taken = torch.zeros(t_count, g_count, dtype=torch.bool)
    floor = thresholds.clamp(max=1 - 1e-10)[:, None]
    for d in range(d_count):
        cand = torch.where((ious[d][None] >= floor) & ~taken, ious[d][None], -1.0)  # [T, G]
        # best IoU, ties to the *last* ground truth (pycocotools keeps the later one)
        best = g_count - 1 - cand.flip(1).argmax(1)
        ok = cand.gather(1, best[:, None])[:, 0] >= 0
        matched[:, d] = ok
        taken[ok, best[ok]] = True
    return matched


def _average_precision(scores: Tensor, matched: Tensor, n_gt: int) -> Tensor:
    """``[T]`` 101-point interpolated AP of one class (COCOeval.accumulate)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    tp = matched[:, order].to(torch.float64).cumsum(1)
    fp = (~matched[:, order]).to(torch.float64).cumsum(1)
    recall = tp / n_gt
    precision = tp / (tp + fp + torch.finfo(torch.float64).eps)
    precision = precision.flip(1).cummax(1).values.flip(1)  # monotone envelope
    levels = torch.tensor(_RECALL_LEVELS, dtype=torch.float64)
    ap = torch.zeros(len(matched), dtype=torch.float64)
    for t in range(len(matched)):
        idx = torch.searchsorted(recall[t].contiguous(), levels, side="left")
        valid = idx < recall.shape[1]
        ap[t] = precision[t][idx[valid]].sum() / len(levels)
    return ap


def mean_average_precision(detections: Sequence[Mapping[str, Tensor]],
                           targets: Sequence[Mapping[str, Tensor]], *,
                           iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
                           max_detections: int = 100,
                           num_classes: int | None = None) -> DetectionMetrics:
    """COCO mAP of per-image detections (what ``pycocotools.COCOeval`` reports for bbox).

    Args:
        detections: Per image ``{"boxes": [D, 4], "scores": [D], "labels": [D]}``.
        targets: Per image ``{"boxes": [G, 4], "labels": [G]}`` (G may be 0).
        iou_thresholds: The ``T`` IoU thresholds (default COCO's 0.5 : 0.05 : 0.95).
        max_detections: Highest-scoring detections kept per image and class.
        num_classes: ``K``; default ``1 + max label`` seen.

    Returns:
        A :class:`DetectionMetrics`; ``map`` averages classes that have ground truth.

    Raises:
        ValueError: different numbers of images, missing keys, bad boxes, NaN scores,
            negative labels or labels ``>= num_classes``.
    """
    if len(detections) != len(targets):
        raise ValueError(f"detections and targets must have one entry per image, got "
                         f"{len(detections)} and {len(targets)}")
    dets, gts = [], []
    for i, (d, g) in enumerate(zip(detections, targets)):
        for key in ("boxes", "scores", "labels"):
            if key not in d:
                raise ValueError(f"detections[{i}] needs {key!r}, got {sorted(d)}")
        for key in ("boxes", "labels"):
            if key not in g:
                raise ValueError(f"targets[{i}] needs {key!r}, got {sorted(g)}")
        check_boxes(d["boxes"].reshape(-1, 4), f"detections[{i}]['boxes']")
        check_boxes(g["boxes"].reshape(-1, 4), f"targets[{i}]['boxes']")
        if bool(torch.isnan(d["scores"]).any()):
            raise ValueError(f"detections[{i}]['scores'] must not contain NaN")
        dets.append((d["boxes"].reshape(-1, 4).double(), d["scores"].reshape(-1).double(),
                     d["labels"].reshape(-1).long()))
        gts.append((g["boxes"].reshape(-1, 4).double(), g["labels"].reshape(-1).long()))
    labels = torch.cat([x[2] for x in dets] + [x[1] for x in gts])
    k_count = num_classes if num_classes is not None else int(labels.max()) + 1 if len(labels) else 0
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k_count):
        raise ValueError(f"labels must lie in [0, {k_count - 1}], got {int(labels.min())} .. "
                         f"{int(labels.max())}")
    thr = torch.tensor([float(t) for t in iou_thresholds], dtype=torch.float64)
    ap = torch.full((k_count, len(thr)), float("nan"), dtype=torch.float64)
    for k in range(k_count):
        scores, matched, n_gt = [], [], 0
        for (db, ds, dl), (gb, gl) in zip(dets, gts):
            g, sel = gb[gl == k], (dl == k).nonzero()[:, 0]
            top = sel[torch.sort(ds[sel], descending=True, stable=True).indices][:max_detections]
            n_gt += len(g)
            if len(top) == 0:
                continue
            inter, union = _inter_union(db[top], g)
            scores.append(ds[top])
            matched.append(_match(inter / union, thr) if len(g) else
                           torch.zeros(len(thr), len(top), dtype=torch.bool))
        if n_gt == 0:
            continue  # no ground truth: the class is left out of the mean
        if not scores:
            ap[k] = 0.0
            continue
        ap[k] = _average_precision(torch.cat(scores), torch.cat(matched, 1), n_gt)

    def at(t: float) -> float:
        hit = (thr - t).abs() < 1e-12
        return float(ap[:, hit].nanmean()) if bool(hit.any()) else float("nan")

    return DetectionMetrics(map=float(ap.nanmean()), map_50=at(0.5), map_75=at(0.75), ap=ap,
                            iou_thresholds=tuple(thr.tolist()))
