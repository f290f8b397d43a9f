"""Anchors and the region proposal network (RPN) of Faster R-CNN.

At every cell of a stride-``s`` feature map sit ``A`` anchors (boxes of a few sizes and
aspect ratios). The RPN (Ren, He, Girshick, Sun 2015, arXiv:1506.01497) is a 3×3 conv
followed by two 1×1 convs that give, per anchor, an objectness logit and box deltas; it is
trained on a balanced sample of anchors labelled by IoU with the ground truth (≥ 0.7
object, < 0.3 background, plus each object's best anchor), with binary cross-entropy and a
smooth-L1 box loss (eq. (1)). Proposals are the decoded boxes, clipped, small ones dropped,
the top scores kept before and after NMS. R-FCN (:mod:`mlatlas.vision.rfcn`) uses them.

=========  ==============================================================================
A          anchors per cell: ``len(ratios) · len(sizes)``, ratio-major (torchvision order)
anchor     ``(x1, y1, x2, y2)`` around the cell's corner + ``offset`` (torchvision: 0)
label      1 object, 0 background, −1 ignored (between the two IoU thresholds)
deltas     :func:`~mlatlas.vision.boxes.encode_boxes` with unit weights
=========  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.vision.boxes import box_iou, clip_boxes, decode_boxes, encode_boxes, nms_top_k

__all__ = ["RPN", "RPNConfig", "cell_anchors", "grid_anchors", "label_anchors", "sample_labels"]


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """``[A, 4]`` zero-centred anchors, rounded (``AnchorGenerator.generate_anchors``).

    Aspect ratio ``r = h / w``: ``w = size / √r``, ``h = size · √r``.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    h_ratio = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
    ws = (1 / h_ratio[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratio[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], 1) / 2).round()


def grid_anchors(grid: tuple[int, int], stride: int, base: Tensor, offset: float = 0.0) -> Tensor:
    """``[h·w·A, 4]`` anchors of a feature grid, location-major then anchor (torchvision).

    Args:
        grid: Feature map ``(h, w)``.
        stride: Input pixels per cell.
        base: ``[A, 4]`` from :func:`cell_anchors`.
        offset: Added to every shift (``stride / 2`` centres anchors on cells).
    """
    h, w = grid
    sy, sx = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], -1).reshape(-1, 1, 4).to(base.dtype) + offset
    return (shifts + base[None]).reshape(-1, 4)


def label_anchors(anchors: Tensor, gt: Tensor, fg_iou: float, bg_iou: float,
                  allow_low_quality: bool = True) -> tuple[Tensor, Tensor]:
    """Label anchors by IoU with ground truth.

    Args:
        anchors: ``[M, 4]``.
        gt: ``[G, 4]`` (G may be 0: all background).
        fg_iou: Best IoU ≥ this → 1.
        bg_iou: Best IoU < this → 0; in between → −1 (ignored).
        allow_low_quality: Also label 1 every anchor that is some object's best match.

    Returns:
        ``(labels [M] float, matched gt index [M] long)``.
    """
    if len(gt) == 0:
        return torch.zeros(len(anchors)), torch.zeros(len(anchors), dtype=torch.int64)
    iou = box_iou(anchors, gt).nan_to_num(0.0)  # [M, G]
    best, idx = iou.max(1)
    labels = torch.full((len(anchors),), -1.0)
    labels[best < bg_iou] = 0.0
    labels[best >= fg_iou] = 1.0
    if allow_low_quality:  # each object's best anchors (ties included), eq. of Faster R-CNN §3.1.2
        per_gt = iou.max(0).values
        hit = ((iou == per_gt[None]) & (per_gt[None] > 0)).any(1)
        labels[hit] = 1.0
    return labels, idx


def sample_labels(labels: Tensor, total: int, positive_fraction: float,
                  gen: torch.Generator | None = None) -> Tensor:
    """Keep at most ``total`` labelled items, ≤ ``positive_fraction`` of them positive (the rest
    become −1). Returns the new labels."""
    out = torch.full_like(labels, -1.0)
    pos, neg = (labels == 1).nonzero()[:, 0], (labels == 0).nonzero()[:, 0]
    n_pos = min(len(pos), int(total * positive_fraction))
    n_neg = min(len(neg), total - n_pos)
    pos = pos[torch.randperm(len(pos), generator=gen)[:n_pos]]
    neg = neg[torch.randperm(len(neg), generator=gen)[:n_neg]]
    out[pos], out[neg] = 1.0, 0.0
    return out


@dataclass(frozen=True)
class RPNConfig:
    """Anchors, matching, sampling and proposal settings of the RPN."""

    sizes: tuple[float, ...] = (12.0, 18.0, 26.0)
    ratios: tuple[float, ...] = (1.0,)
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_per_image: int = 128
    positive_fraction: float = 0.5
    pre_nms_top_n: int = 300
    post_nms_top_n: int = 64
    nms_threshold: float = 0.7
    min_size: float = 2.0


class RPN(nn.Module):
    """RPN head over one feature map, with its losses and proposals.

    Args:
        channels: Feature channels.
        stride: Input pixels per feature cell.
        config: :class:`RPNConfig`.
    """

    def __init__(self, channels: int, stride: int, config: RPNConfig | None = None):
        super().__init__()
        self.cfg = config or RPNConfig()
        self.stride = stride
        self.register_buffer("base", cell_anchors(self.cfg.sizes, self.cfg.ratios), persistent=False)
        a = len(self.base)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, a, 1)
        self.deltas = nn.Conv2d(channels, 4 * a, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def anchors(self, feature: Tensor) -> Tensor:
        """``[h·w·A, 4]`` anchors, centred on the cells of ``feature``."""
        return grid_anchors(tuple(feature.shape[-2:]), self.stride, self.base, self.stride / 2)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """``feature [B, C, h, w]`` → objectness ``[B, h·w·A]``, deltas ``[B, h·w·A, 4]``."""
        t = F.relu(self.conv(feature))
        b = feature.shape[0]
        logits = self.objectness(t).permute(0, 2, 3, 1).reshape(b, -1)
        deltas = self.deltas(t).reshape(b, -1, 4, *t.shape[-2:]).permute(0, 3, 4, 1, 2)
        return logits, deltas.reshape(b, -1, 4)

    def loss(self, logits: Tensor, deltas: Tensor, anchors: Tensor, gt_boxes: Sequence[Tensor],
             gen: torch.Generator | None = None) -> dict[str, Tensor]:
        """Faster R-CNN eq. (1): BCE on sampled anchors + smooth-L1 on their positives."""
        labels, targets = [], []
        for gt in gt_boxes:
            lab, idx = label_anchors(anchors, gt, self.cfg.fg_iou, self.cfg.bg_iou)
            labels.append(sample_labels(lab, self.cfg.batch_per_image,
                                        self.cfg.positive_fraction, gen))
            targets.append(encode_boxes(gt[idx], anchors) if len(gt) else
                           torch.zeros(len(anchors), 4))
        labels, targets = torch.stack(labels), torch.stack(targets)
        used, pos = labels >= 0, labels == 1
        n = used.sum().clamp(min=1)
        obj = F.binary_cross_entropy_with_logits(logits[used], labels[used], reduction="sum") / n
        box = F.smooth_l1_loss(deltas[pos], targets[pos], beta=1 / 9, reduction="sum") / n
        return {"rpn_objectness": obj, "rpn_box": box}

    @torch.no_grad()
    def proposals(self, logits: Tensor, deltas: Tensor, anchors: Tensor,
                  image_size: tuple[int, int]) -> list[Tensor]:
        """Per image ``[≤ post_nms_top_n, 4]`` proposals (decode, clip, drop small, NMS)."""
        out = []
        for lg, dl in zip(logits, deltas):
            top = lg.topk(min(self.cfg.pre_nms_top_n, len(lg))).indices
            boxes = clip_boxes(decode_boxes(dl[top], anchors[top]), image_size)
            scores = lg[top]
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh >= self.cfg.min_size).all(1)
            boxes, scores = boxes[keep], scores[keep]
            keep = nms_top_k(boxes, scores, self.cfg.nms_threshold, self.cfg.post_nms_top_n)
            out.append(boxes[keep])
        return out
