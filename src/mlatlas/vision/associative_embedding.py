"""Associative embedding: detect joints and group them into people with learned tags.

Newell, Huang, Deng 2017 (arXiv:1611.05424) let one network output, for every joint type
``j``, a detection heatmap and a *tag* map. Tags carry no meaning of their own; the
grouping loss only asks that the tags at the joints of one person agree (pull) and that
the mean tags of different people differ (push). At test time the joints of each type are
matched to the groups built so far by tag distance — a bipartite matching per joint type
(Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) — and unmatched detections
start new groups.

==============  ==========================================================================
``H_j``         heatmap of joint ``j`` ``[h, w]``; ``T_j`` its tag map ``[D, h, w]``
``x_nj``        location of joint ``j`` of person ``n`` (heatmap cells)
``h_nj``        ``T_j(x_nj)``: its tag; ``h̄_n = mean_j h_nj`` (eq. 2)
pull            ``1/N Σ_n 1/J Σ_j ‖h̄_n − h_nj‖²``
push            ``1/N² Σ_n Σ_{n'≠n} exp(−‖h̄_n − h̄_n'‖² / 2σ²)`` (eq. 3, σ = 1)
==============  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["find_peaks", "group_keypoints", "grouping_accuracy", "read_tags", "tag_loss"]


def read_tags(tag_maps: Tensor, positions: Tensor) -> Tensor:
    """Tags at integer cells.

    Args:
        tag_maps: ``[J, D, h, w]`` (one image).
        positions: ``[N, J, 2]`` integer cells ``(x, y)`` (or ``[M, 2]`` with ``joint``
            omitted: see :func:`find_peaks`' output for one joint).

    Returns:
        ``[N, J, D]``.
    """
    j = torch.arange(tag_maps.shape[0])
    x = positions[..., 0].long().clamp(0, tag_maps.shape[-1] - 1)
    y = positions[..., 1].long().clamp(0, tag_maps.shape[-2] - 1)
    return tag_maps[j, :, y, x]  # advanced indexing over [N, J] → [N, J, D]


def tag_loss(tag_maps: Tensor, people: Sequence[Tensor], sigma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Pull and push losses of a batch (eqs. 2–3), each averaged over images.

    Args:
        tag_maps: ``[B, J, D, h, w]``.
        people: Per image ``[N_b, J, 2]`` integer cells of every person's joints.
        sigma: Push width ``σ``.

    Raises:
        ValueError: ``people`` does not have one entry per image, or wrong shapes.
    """
    if len(people) != tag_maps.shape[0]:
        raise ValueError(f"people needs one [N, J, 2] tensor per image, got {len(people)} for "
                         f"a batch of {tag_maps.shape[0]}")
    pulls, pushes = [], []
    for maps, pos in zip(tag_maps, people):
        if pos.dim() != 3 or pos.shape[1:] != (maps.shape[0], 2):
            raise ValueError(f"people entries must be [N, J={maps.shape[0]}, 2], got "
                             f"{tuple(pos.shape)}")
        if len(pos) == 0:
            continue
        tags = read_tags(maps, pos)  # [N, J, D]
        mean = tags.mean(1)  # h̄_n
        pulls.append(((tags - mean[:, None]) ** 2).sum(-1).mean())
        n = len(mean)
        if n > 1:
            d2 = ((mean[:, None] - mean[None]) ** 2).sum(-1)
            off = ~torch.eye(n, dtype=torch.bool)
            pushes.append(torch.exp(-d2[off] / (2 * sigma ** 2)).sum() / n ** 2)
    zero = tag_maps.sum() * 0
    pull = torch.stack(pulls).mean() if pulls else zero
    push = torch.stack(pushes).mean() if pushes else zero
    return pull, push


def find_peaks(heatmaps: Tensor, threshold: float = 0.3, max_peaks: int = 10) -> list[Tensor]:
    """Local maxima (3×3 neighbourhood) above ``threshold``, per joint type.

    Args:
        heatmaps: ``[J, h, w]`` (one image).
        threshold: Least heatmap value of a peak.
        max_peaks: Most peaks kept per joint type (the highest).

    Returns:
        ``J`` tensors ``[M_j, 2]`` of integer cells ``(x, y)``, highest first.

    Raises:
        ValueError: ``heatmaps`` is not 3-D.
    """
    if heatmaps.dim() != 3:
        raise ValueError(f"heatmaps must be [J, h, w], got shape {tuple(heatmaps.shape)}")
    pooled = F.max_pool2d(heatmaps[None], 3, stride=1, padding=1)[0]
    keep = (heatmaps == pooled) & (heatmaps > threshold)
    out = []
    for j in range(heatmaps.shape[0]):
        ys, xs = keep[j].nonzero(as_tuple=True)
        order = heatmaps[j, ys, xs].argsort(descending=True)[:max_peaks]
        out.append(torch.stack([xs[order], ys[order]], -1))
    return out


def group_keypoints(tags: Sequence[Tensor], threshold: float = 1.0,
                    joint_order: Sequence[int] | None = None) -> list[np.ndarray]:
    """Group detections into people by tag distance, one joint type at a time.

    Args:
        tags: Per joint type ``j`` the tags of its detections ``[M_j, D]``.
        threshold: Largest tag distance for a detection to join a group.
        joint_order: The order joint types are added (default ``0 … J−1``).

    Returns:
        One ``[J]`` int array per person: the detection index of each joint type, −1 where
        that person has none.

    Raises:
        ValueError: ``joint_order`` is not a permutation of the joint types.
    """
    n_joints = len(tags)
    order = list(joint_order) if joint_order is not None else list(range(n_joints))
    if sorted(order) != list(range(n_joints)):
        raise ValueError(f"joint_order must be a permutation of 0..{n_joints - 1}, got {order}")
    groups: list[np.ndarray] = []
    sums: list[np.ndarray] = []  # running tag sums of each group
    for j in order:
        if len(tags[j]) == 0:
            continue
        cand = tags[j].detach().cpu().double().numpy().reshape(len(tags[j]), -1)
        if groups:
            means = np.stack([s / max((g >= 0).sum(), 1) for s, g in zip(sums, groups)])
            cost = np.linalg.norm(cand[:, None] - means[None], axis=-1)  # [M_j, G]
            rows, cols = linear_sum_assignment(cost)  # per-joint bipartite matching
            matched = {r: c for r, c in zip(rows, cols) if cost[r, c] < threshold}
        else:
            matched = {}
        for m in range(len(cand)):
            if m in matched:
                g = matched[m]
            else:
                groups.append(np.full(n_joints, -1))
                sums.append(np.zeros(cand.shape[1]))
                g = len(groups) - 1
            groups[g][j] = m
            sums[g] = sums[g] + cand[m]
    return groups


def grouping_accuracy(groups: list[np.ndarray], owner: Sequence[np.ndarray]) -> float:
    """Fraction of detections grouped with their own person.

    Groups and people are paired one to one so that the most detections agree (Hungarian
    matching on the overlap counts); a detection is correct when its group is paired with
    its person — a person split over two groups counts only the larger part.

    Args:
        groups: Output of :func:`group_keypoints`.
        owner: Per joint type ``[M_j]`` the true person of each detection (−1: none).
    """
    total = sum(int((np.asarray(o) >= 0).sum()) for o in owner)
    n_people = max((int(np.max(o)) for o in owner if len(o)), default=-1) + 1
    if not groups or n_people == 0:
        return 0.0
    counts = np.zeros((len(groups), n_people))
    for gi, g in enumerate(groups):
        for j, m in enumerate(g):
            if m >= 0 and owner[j][m] >= 0:
                counts[gi, owner[j][m]] += 1
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum()) / max(total, 1)
