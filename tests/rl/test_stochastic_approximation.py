"""Stochastic approximation against closed forms: running means, products of (1 - a_k), roots."""

from __future__ import annotations

import pytest
import torch

from mlatlas.rl import stochastic_approximation as sa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_incremental_mean_equals_batch_means(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, generator=g, dtype=dtype) * 5 + 2
    ref = torch.stack([x[:k].mean(0) for k in range(1, 38)])  # closed form: mean of first k
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(sa.incremental_mean(x), ref, atol=tol, rtol=0)


def test_noise_free_rm_on_a_linear_root_matches_the_product_formula():
    # g(w) = w - c: w_{K+1} - c = (w_1 - c) prod_k (1 - a_k)
    c, w1 = 3.0, torch.tensor([10.0, -4.0], dtype=torch.float64)
    steps = sa.power_steps(23, p=0.75, c=0.5)
    traj = sa.robbins_monro(lambda w, k: w - c, w1, steps)
    expected = c + (w1 - c) * torch.prod(1 - steps)
    assert traj.shape == (24, 2)
    torch.testing.assert_close(traj[-1], expected, atol=1e-12, rtol=0)


def test_rm_converges_only_under_the_rm_conditions():
    g = torch.Generator().manual_seed(1)

    def g_tilde(w, k):  # root w* = 1, unit noise
        return torch.tanh(w - 1) + torch.randn(w.shape, generator=g, dtype=w.dtype)

    w1 = torch.full((100,), 4.0, dtype=torch.float64)

    def rms(p, c=1.0):
        return float((sa.robbins_monro(g_tilde, w1, sa.power_steps(3000, p, c))[-1] - 1)
                     .pow(2).mean().sqrt())

    harmonic, constant, square = rms(1.0), rms(0.0, 0.1), rms(2.0)
    assert harmonic < 0.05  # theory: about 1/sqrt(3000) = 0.018
    assert constant > 5 * harmonic  # noise floor sqrt(a / (2 - a)) = 0.23
    assert square > 0.5  # sum a_k = pi^2/6 cannot cover |w_1 - w*| = 3


@pytest.mark.parametrize(("p", "expected"), [(1.0, (True, True)), (0.75, (True, True)),
                                             (0.5, (True, False)), (0.0, (True, False)),
                                             (2.0, (False, True))])
def test_rm_conditions(p, expected):
    assert sa.rm_conditions(p) == expected


def test_sgd_with_harmonic_steps_is_the_running_mean_of_the_drawn_samples():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(50, 2, generator=g, dtype=torch.float64)
    K = 40
    traj = sa.gradient_descent_mean(x, sa.power_steps(K), 1, torch.tensor([9.0, 9.0]),
                                    torch.Generator().manual_seed(7))
    drawn = x[torch.randint(50, (K, 1), generator=torch.Generator().manual_seed(7))[:, 0]]
    torch.testing.assert_close(traj[1:], sa.incremental_mean(drawn), atol=1e-12, rtol=0)


def test_bgd_and_batched_runs():
    x = torch.arange(12, dtype=torch.float64).view(6, 2)
    traj = sa.gradient_descent_mean(x, sa.power_steps(5), None, torch.tensor([100.0, -100.0]))
    torch.testing.assert_close(traj[1:], x.mean(0).expand(5, 2), atol=1e-12, rtol=0)
    steps = sa.power_steps(5, 0.0, 0.5)
    w1 = torch.linspace(-3.0, 3.0, 14, dtype=torch.float64).view(7, 2)
    runs = sa.gradient_descent_mean(x, steps, 3, w1, torch.Generator().manual_seed(0))
    assert runs.shape == (6, 7, 2)
    # explicit loop over the 7 runs, same mini-batch indices (K, R, m) = (5, 7, 3)
    idx = torch.randint(6, (5, 7, 3), generator=torch.Generator().manual_seed(0))
    for r in range(7):
        w = w1[r].clone()
        torch.testing.assert_close(runs[0, r], w, atol=0, rtol=0)
        for k in range(5):
            grad = (w - x[idx[k, r]]).mean(0)  # (1/m) sum_{i in I_k} (w_k - x_i)
            w = w - steps[k] * grad
            torch.testing.assert_close(runs[k + 1, r], w, atol=1e-12, rtol=0)
    # batch_size = n is batch GD (no sampling), whatever the generator
    torch.testing.assert_close(sa.gradient_descent_mean(x, steps, 6, w1),
                               sa.gradient_descent_mean(x, steps, None, w1), atol=0, rtol=0)


def test_bad_input():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        sa.incremental_mean(torch.arange(4))
    with pytest.raises(ValueError, match=r"x must have shape \(N, ...\) with N >= 1"):
        sa.incremental_mean(torch.empty(0, 2))
    with pytest.raises(ValueError, match="need n >= 1, c > 0 and p >= 0"):
        sa.power_steps(0)
    with pytest.raises(ValueError, match=r"steps must have shape \(K,\)"):
        sa.robbins_monro(lambda w, k: w, torch.zeros(1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="steps must be non-negative"):
        sa.robbins_monro(lambda w, k: w, torch.zeros(1), -torch.ones(2))
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 5\] or None, got 0"):
        sa.gradient_descent_mean(x, sa.power_steps(3), 0)
    with pytest.raises(ValueError, match=r"samples must have shape \(n, d\)"):
        sa.gradient_descent_mean(torch.zeros(5), sa.power_steps(3))
    with pytest.raises(ValueError, match=r"w1 must have shape \(2,\) or \(R, 2\)"):
        sa.gradient_descent_mean(x, sa.power_steps(3), None, torch.zeros(3))
    with pytest.raises(ValueError, match=r"w1 must have shape \(2,\) or \(R, 2\), got \(1, 1, 2\)"):
        sa.gradient_descent_mean(x, sa.power_steps(3), None, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 5\] or None, got 6"):
        sa.gradient_descent_mean(x, sa.power_steps(3), 6)
    with pytest.raises(ValueError, match="need n >= 1, c > 0 and p >= 0, got n=3, c=0"):
        sa.power_steps(3, c=0)
    with pytest.raises(ValueError, match="p=-1"):
        sa.power_steps(3, p=-1)
