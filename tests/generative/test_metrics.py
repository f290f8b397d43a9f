"""Tests of the sample-quality metrics against scipy and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlatlas.datasets.digits import load_digits
from mlatlas.generative import metrics as M


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sliced_w1_in_1d_equals_scipy(reference):
    stats = reference("scipy.stats")
    x = torch.randn(37, 1, generator=_gen(1), dtype=torch.float64)
    y = torch.randn(53, 1, generator=_gen(2), dtype=torch.float64) * 1.7 + 0.4
    ref = stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    # in 1-D every direction is ±1, so SW_1 = W_1 exactly
    assert M.sliced_wasserstein(x, y, n_projections=3, p=1) == pytest.approx(ref, rel=1e-12)


def test_sliced_w2_in_1d_equals_brute_force_coupling():
    x = torch.randn(37, 1, generator=_gen(1), dtype=torch.float64)
    y = torch.randn(53, 1, generator=_gen(2), dtype=torch.float64) + 1.0
    # reference: repeat each x 53 times and each y 37 times; equal-size sorted pairing is the
    # optimal coupling of the original uniform measures
    xs = np.sort(np.repeat(x[:, 0].numpy(), 53))
    ys = np.sort(np.repeat(y[:, 0].numpy(), 37))
    ref = math.sqrt(np.mean((xs - ys) ** 2))
    assert M.sliced_wasserstein(x, y, n_projections=2) == pytest.approx(ref, rel=1e-12)
    # sizes that divide each other take a block-pairing fast path: same exact value
    for n, m in ((30, 90), (90, 30)):
        a = torch.randn(n, 1, generator=_gen(n), dtype=torch.float64)
        b = torch.randn(m, 1, generator=_gen(m + 1), dtype=torch.float64) * 2
        xs = np.sort(np.repeat(a[:, 0].numpy(), m))
        ys = np.sort(np.repeat(b[:, 0].numpy(), n))
        ref = math.sqrt(np.mean((xs - ys) ** 2))
        assert M.sliced_wasserstein(a, b, n_projections=2) == pytest.approx(ref, rel=1e-12)


def test_sliced_wasserstein_properties():
    x = torch.randn(301, 2, generator=_gen(3))
    assert M.sliced_wasserstein(x, x) == 0.0
    c = torch.tensor([0.6, -0.8])  # |c| = 1: W₂(θ) = |θ·c|, E_θ (θ·c)² = |c|²/2 in 2-D
    sw = M.sliced_wasserstein(x, x + c, n_projections=8192, generator=_gen())
    assert sw == pytest.approx(1 / math.sqrt(2), rel=0.02)
    ref = M.SlicedWassersteinReference(x, n_projections=64, seed=5)
    z = torch.randn(97, 2, generator=_gen(4))
    assert ref(z) == pytest.approx(M.sliced_wasserstein(z, x, 64, generator=_gen(5)), rel=1e-12)


def test_energy_distance_matches_scipy(reference):
    stats = reference("scipy.stats")
    x = torch.randn(41, 1, generator=_gen(1), dtype=torch.float64)
    y = torch.randn(29, 1, generator=_gen(2), dtype=torch.float64) * 0.5 + 1.0
    ref = stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy())
    # scipy returns the square root of the V-statistic
    assert math.sqrt(M.energy_distance(x, y, unbiased=False)) == pytest.approx(ref, rel=1e-10)
    same = M.energy_distance(torch.randn(400, 2, generator=_gen(5)),
                             torch.randn(400, 2, generator=_gen(6)))
    shifted = M.energy_distance(torch.randn(400, 2, generator=_gen(5)),
                                torch.randn(400, 2, generator=_gen(6)) + 1)
    assert abs(same) < 0.02 < 0.3 < shifted


def test_mmd_matches_brute_force():
    x = torch.randn(13, 2, generator=_gen(1), dtype=torch.float64)
    y = torch.randn(11, 2, generator=_gen(2), dtype=torch.float64) + 0.5
    hs = (0.7, 1.9)

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * h * h)) for h in hs)

    kxx = sum(k(x[i], x[j]) for i in range(13) for j in range(13) if i != j) / (13 * 12)
    kyy = sum(k(y[i], y[j]) for i in range(11) for j in range(11) if i != j) / (11 * 10)
    kxy = sum(k(x[i], y[j]) for i in range(13) for j in range(11)) / (13 * 11)
    assert M.mmd_rbf(x, y, hs) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)
    a, b = torch.randn(300, 2, generator=_gen(3)), torch.randn(300, 2, generator=_gen(4))
    same, shifted = M.mmd_rbf(a, b), M.mmd_rbf(a, b + 1)  # median-heuristic bandwidths
    assert abs(same) < 0.01 < 0.1 < shifted


def test_noise_floor():
    def sampler(n, g):
        return torch.randn(n, 2, generator=g)

    ref = torch.randn(4000, 2, generator=_gen(9))
    mean, std = M.sw_noise_floor(sampler, 500, ref, repeats=5, n_projections=32)
    assert 0 < std < mean < 0.2
    mean_big, _ = M.sw_noise_floor(sampler, 3000, ref, repeats=3, n_projections=32)
    assert mean_big < mean  # the floor falls with the sample size


def test_digit_classifier_and_label_metrics():
    clf = M.train_digit_classifier(seed=0)
    assert clf.test_accuracy > 0.95
    x, y = load_digits("test")
    assert M.class_accuracy(clf, x, y) == pytest.approx(clf.test_accuracy, abs=1e-6)
    # balanced real digits: marginal label entropy ≈ log 10, confident predictions
    assert M.label_entropy(clf, x) == pytest.approx(math.log(10), abs=0.02)
    assert M.conditional_entropy(clf, x) < 0.25
    assert M.label_entropy(clf, x[y == 3]) < 0.3  # one class only: no diversity
    assert 8.0 < M.classifier_score(clf, x) <= 10.0


def test_bad_input():
    with pytest.raises(ValueError, match="same dimension"):
        M.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"x must have shape \[n, d\] with n >= 2"):
        M.energy_distance(torch.zeros(5), torch.zeros(5, 1))
    with pytest.raises(TypeError, match="y must be a floating-point tensor"):
        M.mmd_rbf(torch.zeros(5, 2), torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="bandwidths must be positive"):
        M.mmd_rbf(torch.zeros(5, 2), torch.ones(5, 2), bandwidths=(0.0,))
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        M.sliced_wasserstein(torch.zeros(5, 2), torch.ones(5, 2), p=3)


def test_knn_entropy_matches_the_kozachenko_leonenko_formula(reference):
    spatial, special = reference("scipy.spatial"), reference("scipy.special")
    x = torch.randn(301, 3, generator=_gen(7), dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.0, 0.0], [0.4, 0.7, 0.0], [-0.2, 0.3, 1.5]], dtype=torch.float64)
    for k in (1, 3, 5):
        # reference: scipy k-d tree (k+1 neighbours: the first is the point itself)
        dist, _ = spatial.cKDTree(x.numpy()).query(x.numpy(), k=k + 1)
        n, d = x.shape
        log_vd = d / 2 * math.log(math.pi) - special.gammaln(d / 2 + 1)
        ref = special.digamma(n) - special.digamma(k) + log_vd + d * np.log(dist[:, k]).mean()
        assert M.knn_entropy(x, k) == pytest.approx(float(ref), abs=1e-10)


def test_knn_entropy_of_a_gaussian_is_its_differential_entropy():
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    x = torch.randn(3000, 2, generator=_gen(8), dtype=torch.float64) @ torch.linalg.cholesky(
        cov).T
    exact = 0.5 * math.log((2 * math.pi * math.e) ** 2 * float(torch.linalg.det(cov)))
    # consistent estimator: Monte-Carlo std ≈ sqrt(Var log p / n) = sqrt(1/3000) ≈ 0.018
    assert M.knn_entropy(x, 3) == pytest.approx(exact, abs=0.08)
    # a collapse onto a line lowers the entropy by a lot
    assert M.knn_entropy(torch.stack([x[:, 0], 2 * x[:, 0]], 1), 3) < exact - 2


def test_unbiased_energy_distance_is_the_u_statistic():
    x = torch.randn(17, 3, generator=_gen(1), dtype=torch.float64)
    y = torch.randn(23, 3, generator=_gen(2), dtype=torch.float64) + 0.3
    dxy = sum(float((x[i] - y[j]).norm()) for i in range(17) for j in range(23)) / (17 * 23)
    dxx = sum(float((x[i] - x[j]).norm()) for i in range(17) for j in range(17)
              if i != j) / (17 * 16)
    dyy = sum(float((y[i] - y[j]).norm()) for i in range(23) for j in range(23)
              if i != j) / (23 * 22)
    assert M.energy_distance(x, y) == pytest.approx(2 * dxy - dxx - dyy, rel=1e-10)


def test_sliced_wasserstein_in_2d_equals_brute_force_per_direction():
    # unequal, non-dividing sizes in 2-D: per direction θ the exact 1-D W₂² of the projections
    x = torch.randn(23, 2, generator=_gen(1), dtype=torch.float64)
    y = torch.randn(31, 2, generator=_gen(2), dtype=torch.float64) * 1.5 + 0.2
    theta = torch.randn(2, 5, generator=_gen(9), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # the directions sliced_wasserstein draws
    w2 = []
    for j in range(5):
        xs = np.sort(np.repeat((x @ theta[:, j]).numpy(), 31))
        ys = np.sort(np.repeat((y @ theta[:, j]).numpy(), 23))
        w2.append(np.mean((xs - ys) ** 2))
    ref = math.sqrt(float(np.mean(w2)))
    assert M.sliced_wasserstein(x, y, 5, generator=_gen(9)) == pytest.approx(ref, rel=1e-12)


def test_more_bad_input():
    with pytest.raises(ValueError, match=r"k must lie in \[1, n\) = \[1, 5\), got 5"):
        M.knn_entropy(torch.randn(5, 2), 5)
    with pytest.raises(ValueError, match="repeats must be >= 2"):
        M.sw_noise_floor(lambda n, g: torch.randn(n, 2, generator=g), 10, torch.randn(20, 2),
                         repeats=1)
    with pytest.raises(ValueError, match="n_projections must be >= 1"):
        M.sliced_wasserstein(torch.zeros(5, 2), torch.ones(5, 2), n_projections=0)
    ref = M.SlicedWassersteinReference(torch.randn(20, 2), n_projections=4)
    with pytest.raises(ValueError, match="x must have dimension 2, got 3"):
        ref(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"y must have shape \[4\], got \(3,\)"):
        M.class_accuracy(torch.nn.Identity(), torch.randn(4, 10), torch.zeros(3, dtype=torch.long))
