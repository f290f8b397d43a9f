"""R-FCN: region-based fully convolutional detection with position-sensitive score maps.

R-FCN (Dai, Li, He, Sun 2016, arXiv:1605.06409) shares all computation over the image: a
last convolution produces ``k²(C+1)`` position-sensitive score maps, one bank of ``C+1``
class scores for each cell ``(i, j)`` of a ``k × k`` grid laid over a region ("top-left part
of an object", …). Position-sensitive RoI pooling reads bin ``(i, j)`` of each proposal from
bank ``(i, j)`` only (eq. (1)); the ``k²`` bins then vote by averaging (eq. (2)) and a softmax
gives class probabilities. Box regression works the same way with ``4k²`` maps
(class-agnostic). Proposals come from an RPN (:mod:`mlatlas.vision.rpn`) on the same
features; detections are the per-class NMS survivors, optionally refined by box voting
(the score-weighted mean of the overlapping boxes, Gidaris & Komodakis 2015,
arXiv:1505.01749).

=========  ==============================================================================
k          bins per side of the position-sensitive grid (3 here, 7 in the paper)
C          object classes (background is class 0 of the ``C+1`` scores)
r_c        ``Σ_{i,j} r_c(i, j) / k²``: the vote of class c for one RoI (eq. (2))
rois       proposals + ground truth, labelled foreground at IoU ≥ 0.5
deltas     box regression targets, weights (10, 10, 5, 5) as Fast R-CNN
=========  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.vision.boxes import batched_nms, box_iou, clip_boxes, decode_boxes, encode_boxes
from mlatlas.vision.roi_pool import ps_roi_pool
from mlatlas.vision.rpn import RPN, RPNConfig, label_anchors, sample_labels

__all__ = ["RFCN", "RFCNConfig", "box_voting"]

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def box_voting(kept: Tensor, kept_labels: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor,
               iou_threshold: float = 0.5) -> Tensor:
    """Refine NMS survivors as the score-weighted mean of the same-class boxes overlapping them.

    Args:
        kept: ``[K, 4]`` boxes kept by NMS; ``kept_labels`` ``[K]`` their classes.
        boxes, scores, labels: ``[N, 4]``, ``[N]``, ``[N]``: every candidate before NMS.
        iou_threshold: Candidates with IoU ≥ this vote.

    Returns:
        ``[K, 4]`` voted boxes (each kept box votes for itself, so the vote is never empty
        when ``kept`` is a subset of ``boxes``).
    """
    if len(kept) == 0:
        return kept
    iou = box_iou(kept, boxes).nan_to_num(0.0)
    w = ((iou >= iou_threshold) & (kept_labels[:, None] == labels[None])).to(scores.dtype)
    w = w * scores[None]
    return (w @ boxes) / w.sum(1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class RFCNConfig:
    """Architecture and training/inference settings of the small R-FCN."""

    num_classes: int = 3
    width: int = 64  # backbone channels
    k: int = 3  # position-sensitive grid
    rpn: RPNConfig = RPNConfig()
    rois_per_image: int = 64  # sampled RoIs per image in training
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    score_threshold: float = 0.05
    nms_threshold: float = 0.3
    detections_per_image: int = 100
    box_voting: bool = True


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class RFCN(nn.Module):
    """Backbone (stride 4) → RPN + position-sensitive score and box maps → detections.

    ``forward(images)`` returns torchvision-style detections (one ``{"boxes", "scores",
    "labels"}`` per image, labels ``0 … C−1``); :meth:`loss` the four training losses.
    """

    stride = 4

    def __init__(self, config: RFCNConfig | None = None):
        super().__init__()
        self.cfg = cfg = config or RFCNConfig()
        w = cfg.width
        self.backbone = nn.Sequential(*_block(3, w // 2, 1), *_block(w // 2, w // 2, 2),
                                      *_block(w // 2, w, 1), *_block(w, w, 2), *_block(w, w, 1),
                                      *_block(w, w, 1))
        self.rpn = RPN(w, self.stride, cfg.rpn)
        k2 = cfg.k * cfg.k
        self.cls_maps = nn.Conv2d(w, k2 * (cfg.num_classes + 1), 1)  # k²(C+1) score maps
        self.box_maps = nn.Conv2d(w, k2 * 4, 1)  # 4k² class-agnostic box maps

    def _head(self, feature: Tensor, rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        boxes = torch.cat([torch.cat([torch.full_like(r[:, :1], i), r], 1)
                           for i, r in enumerate(rois)])
        scale = 1.0 / self.stride
        k = self.cfg.k
        # eq. (1): bin (i, j) pools its own bank; eq. (2): the k² bins vote by averaging
        cls = ps_roi_pool(self.cls_maps(feature), boxes, k, scale).mean((2, 3))  # [R, C+1]
        box = ps_roi_pool(self.box_maps(feature), boxes, k, scale).mean((2, 3))  # [R, 4]
        return cls, box

    def loss(self, images: Tensor, targets: Sequence[dict[str, Tensor]],
             gen: torch.Generator | None = None) -> dict[str, Tensor]:
        """RPN losses + R-FCN classification (softmax CE) and box (smooth-L1) losses."""
        feature = self.backbone(images)
        anchors = self.rpn.anchors(feature)
        logits, deltas = self.rpn(feature)
        losses = self.rpn.loss(logits, deltas, anchors, [t["boxes"] for t in targets], gen)
        proposals = self.rpn.proposals(logits.detach(), deltas.detach(), anchors,
                                       tuple(images.shape[-2:]))
        rois, labels, box_targets = [], [], []
        for props, t in zip(proposals, targets):
            cand = torch.cat([props, t["boxes"]])  # ground truth joins the RoIs
            lab, idx = label_anchors(cand, t["boxes"], self.cfg.fg_iou, self.cfg.fg_iou,
                                     allow_low_quality=False)
            keep = sample_labels(lab, self.cfg.rois_per_image, self.cfg.fg_fraction, gen) >= 0
            cand, lab, idx = cand[keep], lab[keep], idx[keep]
            cls = torch.where(lab > 0, t["labels"][idx] + 1, 0) if len(t["boxes"]) else \
                torch.zeros(len(cand), dtype=torch.int64)
            rois.append(cand)
            labels.append(cls)
            box_targets.append(encode_boxes(t["boxes"][idx], cand, BOX_WEIGHTS)
                               if len(t["boxes"]) else torch.zeros(len(cand), 4))
        cls_logits, box_deltas = self._head(feature, rois)
        labels, box_targets = torch.cat(labels), torch.cat(box_targets)
        fg = labels > 0
        losses["rfcn_cls"] = F.cross_entropy(cls_logits, labels)
        losses["rfcn_box"] = F.smooth_l1_loss(box_deltas[fg], box_targets[fg], beta=1.0,
                                              reduction="sum") / max(len(labels), 1)
        return losses

    @torch.no_grad()
    def forward(self, images: Tensor, box_voting: bool | None = None) -> list[dict[str, Tensor]]:
        """Detections per image; ``box_voting`` overrides the config's switch."""
        voting = self.cfg.box_voting if box_voting is None else box_voting
        feature = self.backbone(images)
        anchors = self.rpn.anchors(feature)
        logits, deltas = self.rpn(feature)
        size = tuple(images.shape[-2:])
        proposals = self.rpn.proposals(logits, deltas, anchors, size)
        cls_logits, box_deltas = self._head(feature, proposals)
        probs = cls_logits.softmax(1)[:, 1:]  # drop background
        boxes = clip_boxes(decode_boxes(box_deltas, torch.cat(proposals), BOX_WEIGHTS), size)
        out, start = [], 0
        for props in proposals:
            p, b = probs[start:start + len(props)], boxes[start:start + len(props)]
            start += len(props)
            out.append(self._detect(b, p, voting))
        return out

    def _detect(self, boxes: Tensor, probs: Tensor, voting: bool) -> dict[str, Tensor]:
        """Per-class candidates above the threshold → NMS → (box voting) → top detections."""
        c = probs.shape[1]
        scores = probs.reshape(-1)
        labels = torch.arange(c).repeat(len(boxes))
        cand = boxes.repeat_interleave(c, 0)
        ok = scores > self.cfg.score_threshold
        cand, scores, labels = cand[ok], scores[ok], labels[ok]
        keep = batched_nms(cand, scores, labels, self.cfg.nms_threshold)
        keep = keep[:self.cfg.detections_per_image]
        kept = cand[keep]
        if voting:
            kept = box_voting(kept, labels[keep], cand, scores, labels)
        return {"boxes": kept, "scores": scores[keep], "labels": labels[keep]}
