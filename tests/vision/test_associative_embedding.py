"""Associative embedding: pull/push equal a direct transcription of eqs. (2)–(3) (values and
gradients); grouping recovers people from separable tags, per joint with Hungarian matching
(vs a brute-force search over assignments), splits tags beyond the threshold, and the
accuracy pairs groups with people one to one; peaks are local maxima; bad input refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mlatlas.vision.associative_embedding import (
    find_peaks,
    group_keypoints,
    grouping_accuracy,
    read_tags,
    tag_loss,
)


def _reference_loss(tag_maps, people, sigma=1.0):
    pulls, pushes = [], []
    for maps, pos in zip(tag_maps, people):
        n, j = pos.shape[:2]
        tags = torch.stack([torch.stack([maps[k, :, pos[p, k, 1], pos[p, k, 0]]
                                         for k in range(j)]) for p in range(n)])  # [N, J, D]
        mean = tags.mean(1)
        pulls.append(sum(((mean[p] - tags[p, k]) ** 2).sum() for p in range(n) for k in range(j))
                     / (n * j))
        if n > 1:
            pushes.append(sum(torch.exp(-((mean[a] - mean[b]) ** 2).sum() / (2 * sigma ** 2))
                              for a in range(n) for b in range(n) if a != b) / n ** 2)
    return torch.stack(pulls).mean(), torch.stack(pushes).mean()


def test_pull_push_match_the_equations():
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 5, 2, 7, 9, generator=gen, requires_grad=True)
    people = [torch.stack([torch.randint(9, (3, 5), generator=gen),
                           torch.randint(7, (3, 5), generator=gen)], -1),
              torch.stack([torch.randint(9, (2, 5), generator=gen),
                           torch.randint(7, (2, 5), generator=gen)], -1)]
    ours = tag_loss(maps, people, sigma=0.7)
    ref = _reference_loss(maps, people, sigma=0.7)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        ga, = torch.autograd.grad(a, maps, retain_graph=True)
        gb, = torch.autograd.grad(b, maps, retain_graph=True)
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-6)


def test_one_person_has_no_push_and_equal_tags_no_pull():
    maps = torch.zeros(1, 3, 1, 4, 4, requires_grad=True)
    pull, push = tag_loss(maps, [torch.zeros(1, 3, 2, dtype=torch.long)])
    assert pull == 0 and push == 0
    pull.backward()  # a graph even when nothing is pushed


def test_grouping_recovers_people_from_separable_tags():
    rng = np.random.default_rng(1)
    centres = np.array([-3.0, 0.2, 2.5, 6.0])  # four people, well apart
    order = [rng.permutation(4) for _ in range(7)]  # detections shuffled per joint
    tags = [torch.tensor(centres[o] + rng.normal(0, 0.1, 4))[:, None] for o in order]
    groups = group_keypoints(tags, threshold=1.0)
    assert len(groups) == 4
    assert grouping_accuracy(groups, order) == 1.0
    for g in groups:  # each group holds one detection per joint, all of one person
        assert len({order[j][m] for j, m in enumerate(g)}) == 1


def test_matching_is_optimal_per_joint():
    # group means 0 and 1, detections 0.6 and 0.9: nearest-first would give 0.6 to group 1
    # (0.4 away) and 0.9 to group 0 (total 1.3); the matching gives 0.6→0, 0.9→1 (total 0.7)
    tags = [torch.tensor([[0.0], [1.0]]), torch.tensor([[0.6], [0.9]])]
    groups = group_keypoints(tags, threshold=2.0)
    cost = {perm: sum(abs(tags[1][m, 0].item() - [0.0, 1.0][g]) for m, g in enumerate(perm))
            for perm in itertools.permutations(range(2))}
    best = min(cost, key=cost.get)
    assert [int(np.nonzero([g[1] == m for g in groups])[0][0]) for m in range(2)] == list(best)


def test_far_tags_start_new_groups_and_missing_joints_are_minus_one():
    tags = [torch.tensor([[0.0]]), torch.tensor([[5.0], [0.1]]), torch.zeros(0, 1)]
    groups = group_keypoints(tags, threshold=1.0)
    assert len(groups) == 2
    assert sorted(g.tolist() for g in groups) == [[-1, 0, -1], [0, 1, -1]]


def test_accuracy_counts_a_split_person_once():
    owner = [np.array([0, 1]), np.array([0, 1])]
    split = [np.array([0, -1]), np.array([-1, 0]), np.array([1, 1])]  # person 0 split in two
    assert grouping_accuracy(split, owner) == pytest.approx(3 / 4)


def test_peaks_and_tag_reading():
    hm = torch.zeros(2, 6, 8)
    hm[0, 1, 2], hm[0, 4, 6], hm[0, 4, 5], hm[1, 3, 3] = 0.9, 0.8, 0.5, 0.2
    peaks = find_peaks(hm, threshold=0.3)
    assert peaks[0].tolist() == [[2, 1], [6, 4]] and len(peaks[1]) == 0
    maps = torch.arange(2 * 1 * 6 * 8.0).view(2, 1, 6, 8)
    got = read_tags(maps, torch.tensor([[[2, 1], [7, 5]]]))
    assert got.shape == (1, 2, 1) and got[0, :, 0].tolist() == [10.0, 48 + 47.0]


def test_bad_input():
    maps = torch.zeros(2, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="one \\[N, J, 2\\] tensor per image, got 1"):
        tag_loss(maps, [torch.zeros(1, 3, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"must be \[N, J=3, 2\], got \(1, 2, 2\)"):
        tag_loss(maps, [torch.zeros(1, 2, 2, dtype=torch.long)] * 2)
    with pytest.raises(ValueError, match="joint_order must be a permutation"):
        group_keypoints([torch.zeros(1, 1)] * 2, joint_order=[0, 0])
    with pytest.raises(ValueError, match=r"heatmaps must be \[J, h, w\], got shape \(4, 4\)"):
        find_peaks(torch.zeros(4, 4))
