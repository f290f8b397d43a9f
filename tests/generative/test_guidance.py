"""Guidance: the CFG combination, classifier guidance = Bayes' rule on exact models, dropout."""

from __future__ import annotations

import pytest
import torch

from mlatlas.datasets import toy2d
from mlatlas.generative.ddpm import mixture_epsilon
from mlatlas.generative.guidance import (
    NoisyClassifier,
    cfg_loss,
    classifier_free_guidance,
    classifier_guidance,
    drop_labels,
    noisy_classifier_loss,
)
from mlatlas.generative.networks import MLPDenoiser
from mlatlas.generative.noise_schedule import NoiseSchedule


def test_cfg_is_the_extrapolation_of_two_passes():
    torch.manual_seed(0)
    net = MLPDenoiser(dim=3, hidden=24, depth=2, time_dim=8, num_classes=5)
    x = torch.randn(7, 3)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    t = torch.full((7,), 321 / 1000)
    cond, uncond = net(x, t, y), net(x, t)
    for w in (0.0, 0.5, 3.0):
        fn = classifier_free_guidance(net, y, w, 1000)
        # reference: H&S eq. (6), two separate passes; diffusers writes the same as
        # uncond + (1 + w)(cond − uncond)
        torch.testing.assert_close(fn(x, torch.tensor(321)), (1 + w) * cond - w * uncond,
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fn(x, torch.tensor(321)),
                                   uncond + (1 + w) * (cond - uncond), atol=1e-5, rtol=1e-5)


class _ExactMixtureClassifier(torch.nn.Module):
    """p(y | x_t) of the 8-Gaussian mixture under the forward process (Bayes' rule)."""

    def __init__(self, sched: NoiseSchedule):
        super().__init__()
        self.sched = sched
        self.num_classes = 8

    def forward(self, x, t):
        ab = self.sched.alphas_cumprod.double()[(t * self.sched.num_train_timesteps).round()
                                                .long()]
        var = ab * 0.25**2 + 1 - ab
        mu = ab.sqrt()[:, None, None] * toy2d.gaussian_centers().double()[None]
        return -((x[:, None] - mu) ** 2).sum(-1) / (2 * var[:, None])


@pytest.mark.parametrize("timestep", [5, 250, 700])
def test_classifier_guidance_with_exact_models_is_bayes_rule(timestep):
    # ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t): at s = 1, guiding the exact
    # unconditional ε with the exact classifier gives the exact conditional ε (component y)
    sched = NoiseSchedule(1000)
    means = toy2d.gaussian_centers().double()
    ab = sched.alphas_cumprod.double()[timestep]

    def uncond(x, t):
        return mixture_epsilon(x, ab, means, 0.25)

    x = torch.randn(9, 2, dtype=torch.float64) * 2
    y = torch.arange(9) % 8
    guided = classifier_guidance(uncond, _ExactMixtureClassifier(sched), y, 1.0, sched)(
        x, torch.tensor(timestep))
    exact = torch.stack([mixture_epsilon(x[i:i + 1], ab, means[y[i]:y[i] + 1], 0.25)[0]
                         for i in range(9)])
    torch.testing.assert_close(guided, exact, atol=1e-6, rtol=1e-6)


def test_classifier_guidance_gradient_of_a_linear_classifier():
    class Linear(torch.nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.w = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))

        def forward(self, x, t):
            return x @ self.w.T

    sched = NoiseSchedule(100)
    clf = Linear()
    x = torch.randn(5, 2)
    y = torch.tensor([0, 1, 2, 1, 0])
    fn = classifier_guidance(lambda x, t: torch.zeros_like(x), clf, y, 2.5, sched)
    p = (x @ clf.w.T).softmax(1)
    grad = clf.w[y] - p @ clf.w  # ∇ log softmax(Wx)_y = W_y − Σ_k p_k W_k
    sigma = (1 - sched.alphas_cumprod[40]).sqrt()
    torch.testing.assert_close(fn(x, torch.tensor(40)), -2.5 * sigma * grad, atol=1e-6,
                               rtol=1e-6)
    fn0 = classifier_guidance(lambda x, t: x + 1, clf, y, 0.0, sched)
    torch.testing.assert_close(fn0(x, torch.tensor(40)), x + 1, atol=0, rtol=0)


def test_label_dropout_and_losses():
    y = torch.arange(4000) % 7
    d = drop_labels(y, 0.25, 7, torch.Generator().manual_seed(0))
    dropped = d == 7
    assert float(dropped.float().mean()) == pytest.approx(0.25, abs=0.03)
    assert torch.equal(d[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 7), y)
    assert bool((drop_labels(y, 1.0, 7) == 7).all())

    sched = NoiseSchedule(50)
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=16, depth=1, time_dim=8, num_classes=7)
    x0 = torch.randn(13, 2)
    yl = torch.arange(13) % 7
    a = cfg_loss(net, x0, yl, sched, torch.Generator().manual_seed(3), p_uncond=0.3)
    b = cfg_loss(net, x0, yl, sched, torch.Generator().manual_seed(3), p_uncond=0.3)
    assert a.item() == b.item() and a.requires_grad
    clf = NoisyClassifier(2, 7, hidden=16, depth=2, time_dim=8)
    loss = noisy_classifier_loss(clf, x0, yl, sched, torch.Generator().manual_seed(4))
    loss.backward()
    assert all(p.grad is not None for p in clf.parameters())
    assert clf(torch.randn(3, 1, 1, 2), torch.rand(3)).shape == (3, 7)  # inputs are flattened


def test_bad_input():
    net = MLPDenoiser(dim=2, hidden=16, depth=1, time_dim=8, num_classes=3)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0, got -1"):
        classifier_free_guidance(net, y, -1.0, 1000)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\)"):
        classifier_free_guidance(net, torch.tensor([0, 3, 1]), 1.0, 1000)
    with pytest.raises(TypeError, match="y must be a 1-D int64 tensor"):
        classifier_free_guidance(net, torch.zeros(3), 1.0, 1000)
    with pytest.raises(ValueError, match="must be class-conditional"):
        classifier_free_guidance(MLPDenoiser(hidden=16), y, 1.0, 1000)
    with pytest.raises(ValueError, match="x has batch 4 but y has 3 labels"):
        classifier_free_guidance(net, y, 1.0, 1000)(torch.zeros(4, 2), torch.tensor(3))
    clf = NoisyClassifier(2, 3, hidden=8, depth=1, time_dim=8)
    with pytest.raises(ValueError, match="scale must be a number >= 0"):
        classifier_guidance(lambda x, t: x, clf, y, -0.5, NoiseSchedule(10))
    with pytest.raises(ValueError, match="x must have 2 features per sample"):
        clf(torch.zeros(3, 3), torch.rand(3))
    with pytest.raises(ValueError, match=r"p_uncond must lie in \[0, 1\]"):
        drop_labels(y, 1.5, 3)


class _Recorder(torch.nn.Module):
    """A network whose output depends on x, t and y in a known way (and has a parameter)."""

    num_classes = 7

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, y):
        return self.w * x * t[:, None] + 0.01 * y[:, None].to(x)


def test_cfg_loss_is_the_simple_objective_with_dropped_labels():
    # reference: the same draws by hand, in cfg_loss's order (dropout mask, t, ε)
    sched = NoiseSchedule(50)
    x0 = torch.randn(13, 3, generator=torch.Generator().manual_seed(0))
    y = torch.arange(13) % 7
    net = _Recorder()
    loss = cfg_loss(net, x0, y, sched, torch.Generator().manual_seed(3), p_uncond=0.4)
    g = torch.Generator().manual_seed(3)
    drop = torch.rand(13, generator=g) < 0.4
    assert 0 < int(drop.sum()) < 13  # both branches are exercised by this seed
    y_in = torch.where(drop, torch.full_like(y, 7), y)  # 7 = the null label
    t = torch.randint(0, 50, (13,), generator=g)
    eps = torch.randn(13, 3, generator=g)
    ab = sched.alphas_cumprod[t][:, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = 0.7 * xt * (t[:, None] / 50) + 0.01 * y_in[:, None]
    torch.testing.assert_close(loss, ((pred - eps) ** 2).mean(), atol=1e-6, rtol=1e-6)
    # backward: d loss / d w = mean(2 (pred − ε) · xt t/T)
    (gw,) = torch.autograd.grad(loss, net.w)
    torch.testing.assert_close(gw, (2 * (pred - eps) * xt * (t[:, None] / 50)).mean(),
                               atol=1e-6, rtol=1e-6)


def test_noisy_classifier_loss_is_cross_entropy_on_noisy_samples():
    sched = NoiseSchedule(40)
    x0 = torch.randn(11, 2, generator=torch.Generator().manual_seed(1))
    y = torch.arange(11) % 3
    w = torch.tensor([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.1]])

    class Lin(torch.nn.Module):
        def forward(self, x, t):
            return x @ w.T * (1 + t[:, None])

    loss = noisy_classifier_loss(Lin(), x0, y, sched, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 40, (11,), generator=g)
    eps = torch.randn(11, 2, generator=g)
    ab = sched.alphas_cumprod[t][:, None]
    logits = ((ab.sqrt() * x0 + (1 - ab).sqrt() * eps) @ w.T) * (1 + t[:, None] / 40)
    # cross-entropy written out: −log softmax(logits)_y, averaged
    ref = -(logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(logits, 1)).mean()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)


def test_classifier_guidance_bad_input():
    clf = NoisyClassifier(2, 3, hidden=8, depth=1, time_dim=8)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\)"):
        classifier_guidance(lambda x, t: x, clf, torch.tensor([0, 3]), 1.0, NoiseSchedule(10))
    fn = classifier_guidance(lambda x, t: x, clf, torch.tensor([0, 1, 2]), 1.0,
                             NoiseSchedule(10))
    with pytest.raises(ValueError, match="x has batch 2 but y has 3 labels"):
        fn(torch.zeros(2, 2), torch.tensor(3))
    for bad in (-1, 10):  # ᾱ of the last step (t = -1) or an IndexError, before the check
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 10\), got values in "):
            fn(torch.zeros(3, 2), torch.tensor(bad))
    with pytest.raises(TypeError, match="timesteps must be integers"):
        fn(torch.zeros(3, 2), torch.tensor(2.5))
    with pytest.raises(ValueError, match="timestep must be one integer, got 2 values"):
        fn(torch.zeros(3, 2), torch.tensor([1, 2]))
