"""COCO-format export of detection ground truth and detection results (plain dicts, JSON-ready).

The COCO detection format (Lin et al. 2014, arXiv:1405.0312) is what ``pycocotools`` and most
detection tool chains read: a *dataset* dict with ``images``, ``annotations`` and
``categories``, and a *results* list with one dict per detection. Boxes are
``[x, y, width, height]`` in pixels (top-left corner), whereas mlatlas and torchvision hold
boxes as ``(x1, y1, x2, y2)``; the conversion happens here and nowhere else.

==============  ===========================================================================
``boxes``       ``[n, 4]`` float ``(x1, y1, x2, y2)`` pixels of one image
``labels``      ``[n]`` int64 class index ``0 … K-1``; COCO ``category_id = label + 1``
``scores``      ``[n]`` float detection confidence (results only)
``image_id``    ``i + 1`` for the i-th image (COCO ids are positive)
==============  ===========================================================================
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["coco_ground_truth", "coco_results", "cocoeval_map50", "write_json"]


def _xywh(boxes: Tensor) -> list[list[float]]:
    b = boxes.detach().to(torch.float64).reshape(-1, 4)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()


def _check_boxes(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be a [n, 4] tensor of (x1, y1, x2, y2), got {got}")
    if bool((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
        raise ValueError(f"{name} must satisfy x2 >= x1 and y2 >= y1 (x1, y1, x2, y2 order)")


def coco_ground_truth(targets: Sequence[Mapping[str, Tensor]], image_size: int | tuple[int, int],
                      classes: Sequence[str]) -> dict[str, Any]:
    """The COCO dataset dict of a list of per-image targets.

    Args:
        targets: One ``{"boxes": [n, 4], "labels": [n]}`` per image (``n`` may be 0).
        image_size: ``H`` (square images) or ``(H, W)``.
        classes: Class names; label ``k`` becomes ``category_id = k + 1``.

    Returns:
        ``{"images", "annotations", "categories"}`` with ``area = w·h`` and ``iscrowd = 0``.

    Raises:
        ValueError: a target without ``boxes``/``labels``, mismatched lengths, boxes with
            ``x2 < x1`` or labels outside ``0 … len(classes)-1``.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    images, annotations = [], []
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must have 'boxes' and 'labels', got {sorted(t)}")
        _check_boxes(t["boxes"], f"targets[{i}]['boxes']")
        labels = t["labels"].reshape(-1)
        if len(labels) != len(t["boxes"]):
            raise ValueError(f"targets[{i}]: {len(t['boxes'])} boxes but {len(labels)} labels")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {len(classes) - 1}], got "
                             f"{labels.tolist()}")
        images.append({"id": i + 1, "width": int(w), "height": int(h),
                       "file_name": f"{i + 1:06d}.png"})
        for box, label in zip(_xywh(t["boxes"]), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(label) + 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                  for k, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(detections: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Any]]:
    """The COCO results list of per-image detections (``image_id = i + 1``).

    Args:
        detections: One ``{"boxes": [d, 4], "scores": [d], "labels": [d]}`` per image.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, …]``.

    Raises:
        ValueError: a detection dict without those keys, mismatched lengths or bad boxes.
    """
    out = []
    for i, d in enumerate(detections):
        if not {"boxes", "scores", "labels"} <= set(d):
            raise ValueError(f"detections[{i}] must have 'boxes', 'scores' and 'labels', "
                             f"got {sorted(d)}")
        _check_boxes(d["boxes"], f"detections[{i}]['boxes']")
        scores, labels = d["scores"].reshape(-1), d["labels"].reshape(-1)
        if not len(scores) == len(labels) == len(d["boxes"]):
            raise ValueError(f"detections[{i}]: {len(d['boxes'])} boxes, {len(scores)} scores "
                             f"and {len(labels)} labels")
        for box, s, label in zip(_xywh(d["boxes"]), scores.tolist(), labels.tolist()):
            out.append({"image_id": i + 1, "category_id": int(label) + 1, "bbox": box,
                        "score": float(s)})
    return out


def write_json(obj: Any, path: str | Path) -> Path:
    """Write a COCO dict/list as JSON (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def cocoeval_map50(ground_truth: dict[str, Any],
                   detections: Sequence[Mapping[str, Tensor]]) -> float | None:
    """mAP@0.5 of ``detections`` as pycocotools' ``COCOeval`` computes it (``stats[1]``).

    Args:
        ground_truth: A COCO dataset dict (:func:`coco_ground_truth`).
        detections: One dict per image with ``boxes`` ``[n, 4]``, ``scores`` ``[n]``,
            ``labels`` ``[n]``.

    Returns:
        The mAP@0.5, ``0.0`` when there is no detection at all, ``None`` when pycocotools is
        not installed (the caller reports the comparison as not measured).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return None
    results = coco_results(detections)
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])
