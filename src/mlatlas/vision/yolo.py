"""YOLOv1: detection as one regression from the whole image to an S × S grid of boxes.

YOLO (Redmon, Divvala, Girshick, Farhadi 2016, arXiv:1506.02640) divides the image into an
``S × S`` grid; the cell that holds an object's centre is responsible for it. Every cell
predicts ``B`` boxes ``(x, y, √w, √h)`` with a confidence each (``Pr(object)·IoU``) and one
set of ``C`` class probabilities, all at once by a CNN with fully connected layers. Training
minimises the paper's sum of squared errors (eq. (3)): coordinates weighted by
``λ_coord = 5``, confidences of boxes without objects by ``λ_noobj = 0.5``, square roots of
width and height so that an error counts more in a small box. At test time the class-specific
score of a box is ``confidence · Pr(class | object)``, followed by per-class NMS.

==========  ==============================================================================
S, B, C     grid size, boxes per cell, classes (7, 2, C in the paper)
x, y        box centre within its cell, in ``[0, 1]``;  w, h: box size / image size
pred        ``[N, S, S, 5B + C]``: B × (x, y, √w, √h, conf), then C class scores
1obj_ij     cell i holds an object and predictor j has the highest IoU with it (responsible)
1noobj_ij   every other predictor
==========  ==============================================================================

The network follows the paper's shape (convolutions with leaky ReLU 0.1, then two fully
connected layers, dropout 0.5, a linear output), scaled down for 64 × 64 images, with
BatchNorm (from YOLOv2) so that it trains in minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlatlas.vision.boxes import batched_nms, box_iou, check_boxes

__all__ = ["YOLOConfig", "YOLOTargets", "YOLOv1", "decode", "encode_targets", "yolo_loss"]


@dataclass(frozen=True)
class YOLOConfig:
    """Grid, heads, loss weights and network size."""

    grid: int = 7
    boxes: int = 2
    classes: int = 3
    image_size: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 64)  # conv stages, each followed by a 2×2 max-pool
    hidden: int = 256
    dropout: float = 0.5
    head: str = "fc"  # "fc": the paper's two fully connected layers; "conv": 1×1 conv per cell
    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5

    def __post_init__(self) -> None:
        if self.grid < 1 or self.boxes < 1 or self.classes < 1:
            raise ValueError(f"grid, boxes and classes must be >= 1, got {self.grid}, "
                             f"{self.boxes}, {self.classes}")
        if self.image_size % (2 ** len(self.widths)):
            raise ValueError(f"image_size must be divisible by 2^{len(self.widths)}, got "
                             f"{self.image_size}")
        if self.head not in ("fc", "conv"):
            raise ValueError(f"head must be 'fc' or 'conv', got {self.head!r}")
        if self.head == "conv" and self.image_size // 2 ** len(self.widths) != self.grid:
            raise ValueError(f"a conv head needs image_size / 2^len(widths) = grid, got "
                             f"{self.image_size} / {2 ** len(self.widths)} != {self.grid}")

    @property
    def depth(self) -> int:
        return 5 * self.boxes + self.classes


class YOLOv1(nn.Module):
    """conv-BN-leaky-pool stages, one more conv → FC → dropout → FC → ``[N, S, S, 5B+C]``."""

    def __init__(self, config: YOLOConfig | None = None):
        super().__init__()
        self.cfg = cfg = config or YOLOConfig()
        layers, c_in = [], 3
        for c in cfg.widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.LeakyReLU(0.1), nn.MaxPool2d(2)]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1, bias=False), nn.BatchNorm2d(c_in),
                   nn.LeakyReLU(0.1)]
        self.features = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.widths)
        if cfg.head == "fc":
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, cfg.hidden),
                                      nn.LeakyReLU(0.1), nn.Dropout(cfg.dropout),
                                      nn.Linear(cfg.hidden, cfg.grid * cfg.grid * cfg.depth))
        else:  # each cell's 5B + C numbers from its own feature column (fully convolutional)
            self.head = nn.Sequential(nn.Conv2d(c_in, cfg.hidden, 1), nn.LeakyReLU(0.1),
                                      nn.Conv2d(cfg.hidden, cfg.depth, 1))

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.cfg.image_size,
                                                            self.cfg.image_size):
            raise ValueError(f"images must be [N, 3, {self.cfg.image_size}, "
                             f"{self.cfg.image_size}], got {tuple(images.shape)}")
        s = self.cfg.grid
        out = self.head(self.features(images))
        if self.cfg.head == "conv":
            out = out.permute(0, 2, 3, 1)
        return out.reshape(-1, s, s, self.cfg.depth)


@dataclass
class YOLOTargets:
    """Per-cell targets: ``obj [N, S, S]`` bool, ``box [N, S, S, 4]`` (x, y, √w, √h),
    ``xyxy [N, S, S, 4]`` the ground-truth box in pixels, ``cls [N, S, S, C]`` one-hot."""

    obj: Tensor
    box: Tensor
    xyxy: Tensor
    cls: Tensor


def encode_targets(targets: Sequence[dict[str, Tensor]], cfg: YOLOConfig) -> YOLOTargets:
    """Assign each object to the cell holding its centre (the first object wins a cell).

    Args:
        targets: Per image ``{"boxes": [n, 4] pixels, "labels": [n]}`` (n may be 0).
        cfg: The grid and image size.

    Raises:
        ValueError: boxes with ``x2 < x1``, labels outside ``0 … C−1``.
    """
    n, s, size = len(targets), cfg.grid, cfg.image_size
    obj = torch.zeros(n, s, s, dtype=torch.bool)
    box, xyxy = torch.zeros(n, s, s, 4), torch.zeros(n, s, s, 4)
    cls = torch.zeros(n, s, s, cfg.classes)
    for i, t in enumerate(targets):
        b, lab = t["boxes"].reshape(-1, 4).float(), t["labels"].reshape(-1)
        check_boxes(b, f"targets[{i}]['boxes']")
        if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= cfg.classes):
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {cfg.classes - 1}], got "
                             f"{lab.tolist()}")
        cx, cy = (b[:, 0] + b[:, 2]) / 2 / size * s, (b[:, 1] + b[:, 3]) / 2 / size * s
        col, row = cx.long().clamp(0, s - 1), cy.long().clamp(0, s - 1)
        for k in reversed(range(len(lab))):  # reversed: the first object writes last
            r, c = int(row[k]), int(col[k])
            obj[i, r, c] = True
            wh = ((b[k, 2:] - b[k, :2]) / size).clamp(min=0)
            box[i, r, c] = torch.cat([torch.stack([cx[k] - c, cy[k] - r]), wh.sqrt()])
            xyxy[i, r, c] = b[k]
            cls[i, r, c] = 0
            cls[i, r, c, int(lab[k])] = 1
    return YOLOTargets(obj, box, xyxy, cls)


def _pred_xyxy(p: Tensor, cfg: YOLOConfig) -> Tensor:
    """``[N, S, S, B, 4]`` (x, y, √w, √h) → pixel ``(x1, y1, x2, y2)``."""
    s, size = cfg.grid, cfg.image_size
    cols = torch.arange(s, dtype=p.dtype).reshape(1, 1, s, 1)
    rows = torch.arange(s, dtype=p.dtype).reshape(1, s, 1, 1)
    cx, cy = (cols + p[..., 0]) / s * size, (rows + p[..., 1]) / s * size
    w, h = p[..., 2].clamp(min=0) ** 2 * size, p[..., 3].clamp(min=0) ** 2 * size
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def yolo_loss(pred: Tensor, targets: YOLOTargets, cfg: YOLOConfig) -> dict[str, Tensor]:
    """The five sums of eq. (3), each divided by the batch size.

    Args:
        pred: ``[N, S, S, 5B + C]`` network output.
        targets: From :func:`encode_targets`.
        cfg: Loss weights and sizes.

    Returns:
        ``{"coord", "size", "obj", "noobj", "class"}``; their sum is the loss.
    """
    n, s, b = pred.shape[0], cfg.grid, cfg.boxes
    if tuple(pred.shape[1:]) != (s, s, cfg.depth):
        raise ValueError(f"pred must be [N, {s}, {s}, {cfg.depth}], got {tuple(pred.shape)}")
    boxes = pred[..., :5 * b].reshape(n, s, s, b, 5)
    probs = pred[..., 5 * b:]
    with torch.no_grad():  # which predictor is responsible, and its IoU (the confidence target)
        iou = box_iou(_pred_xyxy(boxes[..., :4], cfg).reshape(-1, b, 4).clamp_min(-1e4),
                      targets.xyxy.to(pred.dtype).reshape(-1, 1, 4)).nan_to_num(0.0).reshape(
                          n, s, s, b)
        best = iou.argmax(-1, keepdim=True)
        resp = torch.zeros_like(iou, dtype=torch.bool).scatter_(-1, best, True)
        resp &= targets.obj[..., None]  # 1obj_ij
    r = resp.to(pred.dtype)
    tgt = targets.box.to(pred.dtype)[..., None, :]
    coord = (r * ((boxes[..., 0] - tgt[..., 0]) ** 2 + (boxes[..., 1] - tgt[..., 1]) ** 2)).sum()
    size = (r * ((boxes[..., 2] - tgt[..., 2]) ** 2 + (boxes[..., 3] - tgt[..., 3]) ** 2)).sum()
    obj = (r * (boxes[..., 4] - iou) ** 2).sum()
    noobj = ((1 - r) * boxes[..., 4] ** 2).sum()
    cls = (targets.obj[..., None] * (probs - targets.cls.to(pred.dtype)) ** 2).sum()
    return {"coord": cfg.lambda_coord * coord / n, "size": cfg.lambda_coord * size / n,
            "obj": obj / n, "noobj": cfg.lambda_noobj * noobj / n, "class": cls / n}


@torch.no_grad()
def decode(pred: Tensor, cfg: YOLOConfig, score_threshold: float = 0.01,
           nms_threshold: float = 0.5, max_detections: int = 100) -> list[dict[str, Tensor]]:
    """Class-specific scores ``conf · Pr(class | object)`` → threshold → per-class NMS.

    Returns:
        Per image ``{"boxes": [D, 4], "scores": [D], "labels": [D]}`` (torchvision's format),
        boxes clipped to the image.
    """
    n, s, b, c = pred.shape[0], cfg.grid, cfg.boxes, cfg.classes
    if tuple(pred.shape[1:]) != (s, s, cfg.depth):
        raise ValueError(f"pred must be [N, {s}, {s}, {cfg.depth}], got {tuple(pred.shape)}")
    boxes = pred[..., :5 * b].reshape(n, s, s, b, 5)
    xyxy = _pred_xyxy(boxes[..., :4], cfg).clamp(0, cfg.image_size).reshape(n, -1, 4)
    scores = (boxes[..., 4:5] * pred[..., None, 5 * b:]).reshape(n, -1, c)  # [N, S·S·B, C]
    out = []
    for bx, sc in zip(xyxy, scores):
        flat = sc.reshape(-1)
        labels = torch.arange(c).repeat(len(bx))
        cand = bx.repeat_interleave(c, 0)
        ok = (flat > score_threshold) & (cand[:, 2] > cand[:, 0]) & (cand[:, 3] > cand[:, 1])
        cand, flat, labels = cand[ok], flat[ok], labels[ok]
        keep = batched_nms(cand, flat, labels, nms_threshold)[:max_detections]
        out.append({"boxes": cand[keep], "scores": flat[keep], "labels": labels[keep]})
    return out
