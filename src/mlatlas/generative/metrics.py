"""Sample-quality metrics that need no pretrained network.

For low-dimensional data the generated samples are compared with *fresh* samples of the true
distribution by distances between empirical distributions: the sliced Wasserstein distance
(Rabin et al. 2011; Bonneel et al. 2015), the energy distance (Székely & Rizzo 2013) and the
kernel MMD (Gretton et al. 2012, JMLR 13). Every estimate has a noise floor: two independent
true samples of the same size are not at distance 0, so always report the true-vs-true value
next to a model's.

For 8×8 digits a small CNN trained on the real digits (:func:`train_digit_classifier`) plays the
role the Inception network plays for FID/IS: class accuracy of class-conditional samples, the
entropy of the predicted-label marginal (diversity) and the mean per-sample entropy
(recognisability).

==============  ================================================
``x``, ``y``    ``[n, d]`` and ``[m, d]`` samples (2-D points: d = 2)
SW₂             sqrt(E_θ W₂²(θᵀx, θᵀy)), θ uniform on the sphere
energy          2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖
MMD²            E k(X,X') + E k(Y,Y') − 2E k(X,Y), k = Σ_h exp(−‖·‖²/(2h²))
==============  ================================================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "DigitClassifier",
    "SlicedWassersteinReference",
    "class_accuracy",
    "classifier_score",
    "conditional_entropy",
    "energy_distance",
    "knn_entropy",
    "label_entropy",
    "mmd_rbf",
    "sliced_wasserstein",
    "sw_noise_floor",
    "train_digit_classifier",
]


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{getattr(v, 'dtype', type(v).__name__)}")
        if v.ndim != 2 or v.shape[0] < 2:
            raise ValueError(f"{name} must have shape [n, d] with n >= 2, got {tuple(v.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and "
                         f"{y.shape[1]}")
    return x.double(), y.double()


def _w2_pairing(n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact 1-D optimal coupling of two uniform empirical measures of sizes n and m.

    Both quantile functions are step functions; on the merged grid of their breakpoints
    ``{i/n} ∪ {j/m}`` each piece pairs one sorted x with one sorted y. Returns the index into
    the sorted x, the index into the sorted y and the width of each piece (widths sum to 1).
    """
    u = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                   torch.arange(1, m + 1, dtype=torch.float64) / m]).sort().values
    width = torch.diff(u, prepend=torch.zeros(1, dtype=torch.float64))
    mid = u - width / 2
    ix = torch.clamp((mid * n).floor().long(), max=n - 1)
    iy = torch.clamp((mid * m).floor().long(), max=m - 1)
    keep = width > 0
    return ix[keep], iy[keep], width[keep]


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None, p: int = 2) -> float:
    """Sliced 2-Wasserstein distance between two empirical distributions.

    Each random direction θ reduces the problem to 1-D, where W₂ is the L2 distance between
    the two quantile functions, computed exactly (sorted samples paired on the merged grid of
    quantile levels, so ``n`` and ``m`` may differ). The directions are the only randomness:
    pass generators seeded alike to compare several sample sets on the same directions.

    Args:
        x: ``[n, d]`` samples.
        y: ``[m, d]`` samples.
        n_projections: Number of random directions.
        generator: Source of the directions (seed it to compare runs on the same θ's).
        p: Order: 2 (default) or 1. SW₁ is the better-behaved estimator for multimodal
            data: a mass imbalance δ between modes a distance D apart costs W₁ ≈ δD but
            W₂ ≈ √δ·D, so SW₂'s finite-sample noise decays only like n^(−1/4).

    Returns:
        ``SW_p = (mean_θ W_p^p)^(1/p)`` as a float.
    """
    x, y = _check_pair(x, y)
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    theta = _directions(x.shape[1], n_projections, generator)
    return _sw_sorted(_sorted_projections(x, theta), _sorted_projections(y, theta), p)


def _directions(d: int, n_projections: int, generator: torch.Generator | None) -> Tensor:
    theta = torch.randn(d, n_projections, generator=generator, dtype=torch.float64)
    return theta / theta.norm(dim=0, keepdim=True)  # uniform directions on the sphere


def _sorted_projections(x: Tensor, theta: Tensor) -> Tensor:
    """``[P, n]``: each row the sorted projections of ``x`` on one direction."""
    return torch.sort((x @ theta).T.contiguous(), dim=1).values


def _sw_sorted(px: Tensor, py: Tensor, p: int) -> float:
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    n, m = px.shape[1], py.shape[1]
    if n == m:
        wp = ((px - py).abs() ** p).mean(dim=1)
    elif m % n == 0:  # each sorted x is paired with a block of m/n consecutive sorted y's
        wp = ((px[:, :, None] - py.view(-1, n, m // n)).abs() ** p).mean(dim=(1, 2))
    elif n % m == 0:
        wp = ((px.view(-1, m, n // m) - py[:, :, None]).abs() ** p).mean(dim=(1, 2))
    else:
        ix, iy, width = _w2_pairing(px.shape[1], py.shape[1])
        # W_p^p(θ) = ∫₀¹ |F⁻¹_θx(u) − F⁻¹_θy(u)|^p du, a finite sum over the merged grid
        wp = ((px[:, ix] - py[:, iy]).abs() ** p * width).sum(dim=1)
    return float(wp.mean() ** (1.0 / p))


class SlicedWassersteinReference:
    """Sliced W₂ to a fixed reference sample, with its sorted projections computed once.

    Scoring many sample sets against one large true sample (m ≫ n keeps the reference's own
    noise small) on the same directions is the common case in the experiments; this avoids
    re-sorting the reference every time. ``ref(x)`` equals
    ``sliced_wasserstein(x, reference, n_projections, torch.Generator().manual_seed(seed))``.

    Args:
        reference: ``[m, d]`` true samples.
        n_projections: Number of directions.
        seed: Seed of the directions.
        p: Order of the Wasserstein distance (1 or 2).
    """

    def __init__(self, reference: Tensor, n_projections: int = 256, seed: int = 0, p: int = 2):
        ref, _ = _check_pair(reference, reference)
        self.theta = _directions(ref.shape[1], n_projections, torch.Generator().manual_seed(seed))
        self.sorted_ref = _sorted_projections(ref, self.theta)
        self.dim = ref.shape[1]
        self.p = p

    def __call__(self, x: Tensor) -> float:
        """SW₂ between ``x`` ``[n, d]`` and the reference."""
        x, _ = _check_pair(x, x)
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have dimension {self.dim}, got {x.shape[1]}")
        return _sw_sorted(_sorted_projections(x, self.theta), self.sorted_ref, self.p)


def energy_distance(x: Tensor, y: Tensor, unbiased: bool = True) -> float:
    """Energy distance ``2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖`` (Székely & Rizzo 2013).

    Zero in expectation iff the two distributions are equal.

    Args:
        x: ``[n, d]`` samples.
        y: ``[m, d]`` samples.
        unbiased: U-statistics for the within-sample terms (divide by n(n−1), can be
            slightly negative for equal distributions); ``False`` gives the V-statistic
            (divide by n², always >= 0), whose square root is what
            ``scipy.stats.energy_distance`` returns in 1-D.
    """
    x, y = _check_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    dxy = torch.cdist(x, y).mean()
    # the diagonal of a within-sample distance matrix is 0
    dxx = torch.cdist(x, x).sum() / (n * (n - 1) if unbiased else n * n)
    dyy = torch.cdist(y, y).sum() / (m * (m - 1) if unbiased else m * m)
    return float(2 * dxy - dxx - dyy)


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: list[float] | tuple[float, ...] | None = None
            ) -> float:
    """Unbiased squared MMD with a sum of Gaussian kernels.

    Args:
        x: ``[n, d]`` samples.
        y: ``[m, d]`` samples.
        bandwidths: Kernel widths h in ``exp(−‖a−b‖²/(2h²))``; default ``(0.5, 1, 2) × m``
            with m the median pairwise distance of the pooled samples (median heuristic).

    Returns:
        MMD² (can be slightly negative for equal distributions).
    """
    x, y = _check_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    if bandwidths is None:
        pooled = torch.cat([x, y])[:2000]
        med = torch.pdist(pooled).median().item()
        bandwidths = tuple(f * med for f in (0.5, 1.0, 2.0))
    if len(bandwidths) == 0 or any(h <= 0 for h in bandwidths):
        raise ValueError(f"bandwidths must be positive, got {bandwidths}")

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    # unbiased: drop the diagonal of the within-sample Gram matrices
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def knn_entropy(x: Tensor, k: int = 3) -> float:
    """Kozachenko–Leonenko k-nearest-neighbour estimate of the differential entropy (nats).

    ``Ĥ = ψ(n) − ψ(k) + log V_d + (d/n) Σ_i log ε_i`` with ε_i the distance from x_i to its
    k-th nearest neighbour and V_d the volume of the unit d-ball (Kozachenko & Leonenko 1987;
    Kraskov et al. 2004, eq. 20). A diversity measure that, unlike a standard deviation, falls
    when samples collapse onto a curve or a point.

    Args:
        x: ``[n, d]`` samples, n > k.
        k: Neighbour order.
    """
    x, _ = _check_pair(x, x)
    n, d = x.shape
    if not 1 <= k < n:
        raise ValueError(f"k must lie in [1, n) = [1, {n}), got {k}")
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(math.inf)
    eps = dist.kthvalue(k, dim=1).values.clamp_min(1e-300)
    log_vd = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    psi = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return float(psi[0] - psi[1] + log_vd + d * eps.log().mean())  # ψ(n) − ψ(k) + log V_d + d E log ε


# --------------------------------------------------------------------------- digits
class DigitClassifier(nn.Module):
    """Small MLP for ``[B, 1, 8, 8]`` digits in [-1, 1] → ``[B, 10]`` logits.

    An MLP rather than a CNN: on 8×8 inputs it is as accurate (≈ 98% held out) at a third of
    the CPU cost, which matters because every digit experiment trains it.
    """

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.test_accuracy = float("nan")

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 1, 8, 8]`` → ``[B, 10]`` logits."""
        return self.net(x)


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int, steps: int) -> tuple[dict[str, Tensor], float]:
    from mlatlas.datasets.digits import load_digits
    from mlatlas.runtime import torch_threads

    x, y = load_digits("train")
    xt, yt = load_digits("test")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(seed)
        model = DigitClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (128,), generator=g)
            # pixel-noise augmentation: imperfect samples are judged by shape, not by exact
            # pixel statistics
            xb = x[idx] + 0.1 * torch.randn((len(idx), 1, 8, 8), generator=g)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
    return {k: v.clone() for k, v in model.state_dict().items()}, acc


def train_digit_classifier(seed: int = 0, steps: int = 300) -> nn.Module:
    """Train (or fetch from the in-process cache) the digit classifier used as a metric.

    Trained on the ``"train"`` split of :func:`mlatlas.datasets.digits.load_digits` in the
    ``[-1, 1]`` scale, on one thread; about 1–2 s of CPU. Its held-out accuracy is stored in
    ``model.test_accuracy`` (≈ 0.98).

    Args:
        seed: Seed of the initialisation and the batch order.
        steps: Adam steps of batch 128.

    Returns:
        A :class:`DigitClassifier` in eval mode with ``requires_grad`` off.
    """
    state, acc = _trained_state(int(seed), int(steps))
    model = DigitClassifier()
    model.load_state_dict(state)
    model.test_accuracy = acc
    model.eval()
    model.requires_grad_(False)
    return model


def _probs(classifier: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    with torch.no_grad():
        logits = torch.cat([classifier(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    return logits.double().softmax(dim=1)


def class_accuracy(classifier: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` that ``classifier`` assigns to the intended class ``y``.

    Args:
        classifier: Maps ``x`` to ``[n, K]`` logits.
        x: ``[n, ...]`` samples.
        y: ``[n]`` int64 intended labels.
    """
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape [{x.shape[0]}], got {tuple(y.shape)}")
    return float((_probs(classifier, x).argmax(dim=1) == y.to(x.device)).double().mean())


def label_entropy(classifier: nn.Module, x: Tensor) -> float:
    """Entropy (nats) of the marginal predicted-label distribution ``H(E_x p(y|x))``.

    High means the samples cover the classes (``log K`` at most): a diversity measure.
    """
    p = _probs(classifier, x).mean(dim=0)
    return float(-(p * p.clamp_min(1e-300).log()).sum())


def conditional_entropy(classifier: nn.Module, x: Tensor) -> float:
    """Mean per-sample entropy ``E_x H(p(y|x))`` in nats: low means recognisable samples."""
    p = _probs(classifier, x)
    return float(-(p * p.clamp_min(1e-300).log()).sum(dim=1).mean())


def classifier_score(classifier: nn.Module, x: Tensor) -> float:
    """``exp(H(y) − E_x H(y|x))``, the Inception-score analogue (1 … K)."""
    return math.exp(label_entropy(classifier, x) - conditional_entropy(classifier, x))


def sw_noise_floor(sampler: Callable[[int, torch.Generator], Tensor], n: int, reference: Tensor,
                   repeats: int = 8, n_projections: int = 256, seed: int = 0,
                   projection_seed: int = 0, p: int = 2) -> tuple[float, float]:
    """Mean and std of ``sliced_wasserstein(fresh true sample of size n, reference)``.

    The value a perfect model would score with ``n`` samples against the same ``reference``
    (the metric's noise floor), and its spread over ``repeats`` independent draws. Compare a
    model's SW computed with the same ``n``, ``reference``, ``n_projections`` and directions
    (``generator=torch.Generator().manual_seed(projection_seed)``) against it.

    Args:
        sampler: ``sampler(n, generator)`` → ``[n, d]`` exact samples of the true density.
        n: Sample size (the model's sample size).
        reference: ``[m, d]`` true samples (m ≫ n keeps the reference's own noise small).
        repeats: Number of independent draws.
        n_projections: Directions of each SW estimate.
        seed: Seeds the draws.
        projection_seed: Seeds the directions (the same directions for every repeat).
        p: Order of the sliced Wasserstein distance.
    """
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to estimate a spread, got {repeats}")
    g = torch.Generator().manual_seed(seed)
    score = SlicedWassersteinReference(reference, n_projections, projection_seed, p)
    vals = torch.tensor([score(sampler(n, g)) for _ in range(repeats)], dtype=torch.float64)
    return float(vals.mean()), float(vals.std())
