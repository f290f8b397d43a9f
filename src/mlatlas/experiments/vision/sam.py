"""SAM: a tiny SAM trained on synthetic scenes segments the prompted shape, and its three
masks resolve an ambiguous point into part and whole.

The scenes (:mod:`mlatlas.datasets.part_scenes`) hold non-overlapping shapes, half of them
with a smaller shape inside — a part. SAM's training recipe, scaled down: each step embeds
a batch of images once and asks several prompts per image — a positive point on an object
(target: the whole object), a positive point on a part (target: the part or the whole, drawn
at random: the ambiguity) and a box (target: the whole, single-mask output). Each point's
loss is that of its best mask among the K = 3 (BCE + Dice), so the mask tokens specialise;
the IoU head regresses each mask's true IoU. On held-out scenes a point on an object (off
its part, so that the object is the one right answer) is answered with its highest-scoring
mask (SAM's protocol, no oracle); the claim is the issue's: that mask overlaps the object
with mIoU ≥ 0.8. A point on a part is ambiguous; it counts as resolved when one of the three
masks is the part and a different one the whole: IoU ≥ 0.5 with its target, and higher
with its target than with the other. Claim (our reading of the issue's
"resolves an ambiguous point"): most held-out ambiguous points are resolved (> 0.5). The
figure shows the first held-out ambiguous point, not a chosen one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mlatlas.datasets.part_scenes import make_part_scenes, sample_point
from mlatlas.plots import figure
from mlatlas.report import Report
from mlatlas.runtime import progress
from mlatlas.vision.sam import Sam, SamConfig


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0
    train_scenes: int = 400
    test_scenes: int = 60
    steps: int = 100  # optimiser steps
    batch: int = 8  # images per step
    prompts: int = 2  # point prompts per image per step (plus as many boxes)
    lr: float = 3e-3
    encoder_dim: int = 48
    encoder_depth: int = 3
    miou_target: float = 0.8  # claim: held-out mIoU of single-point prompts ≥ this (issue)
    resolved_target: float = 0.5  # claim: fraction of ambiguous points resolved > this
    threads: int = 1  # small convolutions: a second thread buys little on 2 shared cores

    @classmethod
    def smoke(cls) -> Config:
        return cls(train_scenes=24, test_scenes=6, steps=3, batch=4, prompts=2)

    @classmethod
    def full(cls) -> Config:
        return cls(train_scenes=8000, test_scenes=400, steps=3000, batch=16, encoder_depth=4)


def _model(cfg: Config) -> Sam:
    torch.manual_seed(cfg.seed)
    return Sam(SamConfig.tiny(encoder_dim=cfg.encoder_dim, encoder_depth=cfg.encoder_depth,
                              global_attn_indexes=(cfg.encoder_depth - 1,)))


def _mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice per mask: logits ``[..., S, S]``, target bool broadcastable → ``[...]``."""
    t = target.float().expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-2, -1))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    return bce + dice


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred & target).sum((-2, -1)).float()
    union = (pred | target).sum((-2, -1)).float()
    return inter / union.clamp_min(1)


def _batch(data, idx: list[int], prompts: int, gen: torch.Generator):
    """Points ``[B, P, 1, 2]`` with targets ``[B, P, S, S]``, boxes ``[B, P, 4]`` with theirs."""
    points, p_targets, boxes, b_targets = [], [], [], []
    for i in idx:
        n = len(data.wholes[i])
        pts, pt, bx, bt = [], [], [], []
        for _ in range(prompts):
            k = int(torch.randint(n, (), generator=gen))
            whole, part = data.wholes[i][k], data.parts[i][k]
            if part.any() and torch.rand((), generator=gen) < 0.5:  # an ambiguous point
                pts.append(sample_point(part, gen))
                pt.append(part if torch.rand((), generator=gen) < 0.5 else whole)
            else:
                pts.append(sample_point(whole & ~part, gen))
                pt.append(whole)
            bx.append(data.boxes[i][k])
            bt.append(whole)
        points.append(torch.stack(pts)[:, None])
        p_targets.append(torch.stack(pt))
        boxes.append(torch.stack(bx))
        b_targets.append(torch.stack(bt))
    return (torch.stack(points), torch.stack(p_targets), torch.stack(boxes).clamp(0, 64),
            torch.stack(b_targets))


def _train(cfg: Config, model: Sam, data) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in progress(range(cfg.steps), description="train tiny SAM"):
        idx = torch.randint(len(data), (cfg.batch,), generator=gen).tolist()
        points, p_t, boxes, b_t = _batch(data, idx, cfg.prompts, gen)
        emb = model.embed_image(data.images[idx] - 0.5)
        labels = torch.ones(points.shape[:3], dtype=torch.long)
        out = model(image_embeddings=emb, points=points, labels=labels, multimask=True)
        per_mask = _mask_loss(out.masks, p_t[:, :, None])  # [B, P, K]
        loss = per_mask.min(-1).values.mean()  # only the best of the K masks learns
        with torch.no_grad():
            true_iou = _iou(out.masks > 0, p_t[:, :, None])
        loss = loss + F.mse_loss(out.iou_scores, true_iou)
        box_out = model(image_embeddings=emb, boxes=boxes, multimask=False)
        loss = loss + _mask_loss(box_out.masks[:, :, 0], b_t).mean()
        with torch.no_grad():
            box_iou = _iou(box_out.masks[:, :, 0] > 0, b_t)
        loss = loss + F.mse_loss(box_out.iou_scores[:, :, 0], box_iou)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def _evaluate(model: Sam, data, seed: int) -> dict[str, list]:
    gen = torch.Generator().manual_seed(seed + 1)
    res: dict[str, list] = {"point": [], "oracle": [], "box": [], "resolved": [], "examples": []}
    for i in range(len(data)):
        emb = model.embed_image(data.images[i:i + 1] - 0.5)
        for whole, part, box in zip(data.wholes[i], data.parts[i], data.boxes[i]):
            pt = sample_point(whole & ~part, gen)[None, None, None]
            out = model(image_embeddings=emb, points=pt, labels=torch.ones(1, 1, 1,
                                                                           dtype=torch.long))
            ious = _iou(out.masks[0, 0] > 0, whole)
            res["point"].append(float(ious[out.iou_scores[0, 0].argmax()]))
            res["oracle"].append(float(ious.max()))
            b = model(image_embeddings=emb, boxes=box.clamp(0, 64)[None, None], multimask=False)
            res["box"].append(float(_iou(b.masks[0, 0, 0] > 0, whole)))
            if part.any():
                pt = sample_point(part, gen)[None, None, None]
                out = model(image_embeddings=emb, points=pt,
                            labels=torch.ones(1, 1, 1, dtype=torch.long))
                masks = out.masks[0, 0] > 0
                to_part, to_whole = _iou(masks, part), _iou(masks, whole)
                # resolved: one mask is the part, a different one the whole (each closer to
                # its own target than to the other)
                is_part = (to_part >= 0.5) & (to_part > to_whole)
                is_whole = (to_whole >= 0.5) & (to_whole > to_part)
                ok = bool(is_part.any() and is_whole.any())  # exclusive: never the same mask
                res["resolved"].append(float(ok))
                res["examples"].append((i, pt[0, 0, 0], out, float(to_part.max()),
                                        float(to_whole.max())))
    return res


def run(cfg: Config, out: Path) -> Report:
    rep = Report()
    train = make_part_scenes(cfg.train_scenes, seed=cfg.seed)
    test = make_part_scenes(cfg.test_scenes, seed=10_000 + cfg.seed)
    model = _model(cfg)
    rep.metric("parameters", sum(p.numel() for p in model.parameters()))
    losses = _train(cfg, model, train)
    model.eval()
    res = _evaluate(model, test, cfg.seed)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    rep.metric("final training loss (mean of last 20 steps)", mean(losses[-20:]))
    rep.metric("held-out mIoU, box prompt", mean(res["box"]))
    rep.metric("held-out mIoU, point prompt, best of the 3 masks (oracle)", mean(res["oracle"]))
    miou = rep.claim("held-out mIoU, one point per object, highest-scoring mask",
                     mean(res["point"]), cfg.miou_target, ">=", target_source="miou_target",
                     detail=f"{len(res['point'])} objects in {cfg.test_scenes} held-out "
                     f"scenes, a point off the object's part, {cfg.steps} training steps")
    name = "ambiguous points resolved: one mask the part, another the whole"
    if res["resolved"]:
        resolved = rep.claim(name, mean(res["resolved"]), cfg.resolved_target, ">",
                             target_source="resolved_target",
                             detail=f"{len(res['resolved'])} held-out points on parts, "
                             "IoU ≥ 0.5 with each target")
    else:
        resolved = rep.not_measured(name, cfg.resolved_target, ">", target_source="resolved_target",
                                    reason="no held-out object has a part")
    _figure(out / "sam.png", test, res, losses)
    rep.figure(out / "sam.png")
    if not (miou.holds and resolved.holds):
        rep.note(f"A tiny SAM ({cfg.encoder_depth}-block ViT, 64 px input) trained from scratch "
                 f"for {cfg.steps} steps of {cfg.batch} images, far fewer than it needs to learn the "
                 f"task; Config.full() trains {Config.full().steps} steps.")
    return rep


def _figure(path: Path, data, res, losses) -> None:
    with figure(path, ncols=5, size=(16, 3.4)) as (_, axes):
        axes = list(axes.flat)
        axes[0].plot(losses)
        axes[0].set_title("training loss", fontsize=9)
        axes[0].set_xlabel("step")
        if not res["examples"]:
            return
        i, pt, out, to_part, to_whole = res["examples"][0]  # the first, not a chosen one
        axes[1].imshow(data.images[i].permute(1, 2, 0).numpy())
        axes[1].plot(*pt.tolist(), "*", color="white", mec="black", ms=14)
        axes[1].set_title(f"first held-out point on a part\nbest IoU: part {to_part:.2f}, "
                          f"whole {to_whole:.2f}", fontsize=9)
        for k in range(3):
            axes[2 + k].imshow((out.masks[0, 0, k] > 0).numpy(), cmap="gray")
            axes[2 + k].plot(*pt.tolist(), "*", color="red", ms=10)
            axes[2 + k].set_title(f"mask {k + 1}: predicted IoU {out.iou_scores[0, 0, k]:.2f}",
                                  fontsize=9)
        for ax in axes[1:]:
            ax.axis("off")
