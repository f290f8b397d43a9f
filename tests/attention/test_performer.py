"""FAVOR+: feature map against its formula, exact linear-attention algebra on the features,
unbiasedness, orthogonal projections, convergence to exact softmax attention, redrawing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlatlas.attention.performer import (
    FavorAttention,
    favor_attention,
    gaussian_projection,
    positive_random_features,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_features_match_dense_formula():
    g = _gen()
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=g) * 0.7
    w = gaussian_projection(11, 7, generator=g, dtype=torch.float64)
    got = positive_random_features(x, w, is_query=True, stabilize=False)
    ref = torch.empty(2, 5, 11, dtype=torch.float64)
    for b in range(2):
        for n in range(5):
            sq = sum(float(x[b, n, i]) ** 2 for i in range(7))
            for r in range(11):
                wx = sum(float(w[r, i]) * float(x[b, n, i]) for i in range(7))
                ref[b, n, r] = math.exp(wx - sq / 2) / math.sqrt(11)  # exp(w·x − |x|²/2)/√m
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_stabiliser_is_a_constant_factor():
    g = _gen(1)
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64, generator=g) * 2
    w = gaussian_projection(20, 6, generator=g, dtype=torch.float64)
    raw_q = positive_random_features(x, w, is_query=True, stabilize=False)
    raw_k = positive_random_features(x, w, is_query=False, stabilize=False)
    ratio_q = positive_random_features(x, w, is_query=True) / raw_q
    ratio_k = positive_random_features(x, w, is_query=False) / raw_k
    # per query row one constant; per (batch, head) one constant for all keys
    torch.testing.assert_close(ratio_q, ratio_q[..., :1].expand_as(ratio_q), rtol=1e-10, atol=0)
    torch.testing.assert_close(ratio_k, ratio_k[..., :1, :1].expand_as(ratio_k), rtol=1e-10,
                               atol=0)
    assert positive_random_features(x, w, is_query=True).max() <= 1 / math.sqrt(20) + 1e-15


@pytest.mark.parametrize("m, d", [(20, 8), (8, 8), (5, 12)])
def test_orthogonal_projection_blocks(m, d):
    w = gaussian_projection(m, d, generator=_gen(2), dtype=torch.float64)
    assert w.shape == (m, d)
    for start in range(0, m, d):
        block = w[start:start + d]
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-10, rtol=0)


def test_projection_rows_are_marginally_standard_gaussian():
    d = 8
    for orthogonal in (True, False):
        w = gaussian_projection(8000, d, orthogonal=orthogonal, generator=_gen(3),
                                dtype=torch.float64)
        # E|w|² = d (chi² with d dof, sd √(2d)); E w = 0; E w wᵀ = I. 8000 rows: se ≈ 0.045.
        assert abs(w.pow(2).sum(1).mean().item() - d) < 0.25
        torch.testing.assert_close(w.T @ w / 8000, torch.eye(d, dtype=torch.float64), atol=0.08,
                                   rtol=0)
    a = gaussian_projection(16, 4, generator=_gen(5))
    torch.testing.assert_close(a, gaussian_projection(16, 4, generator=_gen(5)), atol=0, rtol=0)


def test_kernel_estimate_is_unbiased():
    d, m, r = 8, 8, 6000
    g = _gen(4)
    q = torch.randn(3, d, dtype=torch.float64, generator=g) * 0.5
    k = torch.randn(3, d, dtype=torch.float64, generator=g) * 0.5
    exact = torch.exp((q * k).sum(-1))
    w = gaussian_projection(r * m, d, generator=g, dtype=torch.float64)  # r independent blocks
    fq = positive_random_features(q, w, is_query=True, stabilize=False)
    fk = positive_random_features(k, w, is_query=False, stabilize=False)
    est = (fq * fk).view(3, r, m).sum(-1) * r
    se = est.std(1) / math.sqrt(r)
    assert ((est.mean(1) - exact).abs() <= 5 * se).all(), (est.mean(1), exact, se)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_equals_quadratic_form_of_its_features(causal):
    """With W fixed, FAVOR+ is exactly normalised φ(Q)φ(K)ᵀV (fp32 ≤ 1e-5, grads too)."""
    g = _gen(6)
    q, k, v = (torch.randn(2, 3, 29, 10, generator=g) for _ in range(3))
    w = gaussian_projection(24, 10, generator=g)
    a = [t.clone().requires_grad_(True) for t in (q, k, v)]
    r = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = favor_attention(*a, w, causal=causal, chunk_size=8)
    s = 10 ** -0.25
    fq = positive_random_features(r[0] * s, w, is_query=True)
    fk = positive_random_features(r[1] * s, w, is_query=False)
    att = fq @ fk.transpose(-1, -2)
    if causal:
        att = att.tril()
    ref = att @ r[2] / att.sum(-1, keepdim=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref.backward(grad)
    for x, y in zip(a, r):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_many_features_approach_exact_softmax(causal):
    """m = 2^15 random features against exact SDPA.

    Tolerance: the estimate is a Monte-Carlo average, so its error is O(1/√m), not rounding.
    Measured for these inputs (std 0.5, d = 8): max output error ≈ 0.08 / 0.03 / 0.015 / 0.006
    at m = 2^11 / 2^13 / 2^15 / 2^17, gradient errors ≈ 3× larger (∂/∂k sums over all
    queries). atol 5e-2 (outputs) and 1.5e-1 (gradients) at m = 2^15 leave ~3× margin while
    still failing for a wrong scale (no 1/√d: 0.72; 1/d instead of 1/√d: 0.14).
    """
    g = _gen(7)
    q, k = (torch.randn(1, 2, 23, 8, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(1, 2, 23, 8, generator=g, dtype=torch.float64)
    w = gaussian_projection(2 ** 15, 8, generator=g, dtype=torch.float64)
    a = [t.clone().requires_grad_(True) for t in (q, k, v)]
    r = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = favor_attention(*a, w, causal=causal)
    ref = F.scaled_dot_product_attention(*r, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    for x, y in zip(a, r):
        torch.testing.assert_close(x.grad, y.grad, atol=1.5e-1, rtol=0)
    # and the error does shrink with m (same inputs, 64× fewer features)
    few = favor_attention(q, k, v, gaussian_projection(2 ** 9, 8, generator=g,
                                                       dtype=torch.float64), causal=causal)
    assert (few - ref).abs().max() > 2 * (out - ref).abs().max()


def test_module_redraws_features_in_training_only():
    layer = FavorAttention(24, 2, n_features=16, redraw_interval=2, seed=3)
    x = torch.randn(2, 11, 24)
    w0 = layer.projection.clone()
    layer(x)
    torch.testing.assert_close(layer.projection, w0, atol=0, rtol=0)  # call 1: no redraw
    layer(x)
    torch.testing.assert_close(layer.projection, w0, atol=0, rtol=0)  # call 2: no redraw
    layer(x)
    assert not torch.equal(layer.projection, w0)  # call 3: redrawn after 2 calls
    layer.eval()
    w1 = layer.projection.clone()
    for _ in range(5):
        layer(x)
    assert torch.equal(layer.projection, w1)
    twin = FavorAttention(24, 2, n_features=16, redraw_interval=2, seed=3)
    assert torch.equal(twin.projection, w0)  # seeded draws are reproducible


def test_causal_module_ignores_the_future():
    torch.manual_seed(0)
    layer = FavorAttention(16, 2, n_features=32, causal=True, redraw_interval=None).eval()
    x = torch.randn(1, 13, 16)
    y = x.clone()
    y[:, 9:] += 5.0
    # The key stabiliser is a shared constant, so the first 9 outputs agree to rounding.
    torch.testing.assert_close(layer(x)[:, :9], layer(y)[:, :9], atol=1e-5, rtol=1e-4)


def test_bad_inputs():
    q = torch.randn(1, 2, 5, 8)
    w = gaussian_projection(16, 8)
    with pytest.raises(ValueError, match="n_features must be a positive int, got 0"):
        gaussian_projection(0, 8)
    with pytest.raises(ValueError, match="dim must be a positive int, got -1"):
        gaussian_projection(4, -1)
    with pytest.raises(ValueError, match="projection must have head_dim 8 columns"):
        favor_attention(q, q, q, gaussian_projection(16, 6))
    with pytest.raises(ValueError, match="projection must be a 2-D tensor"):
        favor_attention(q, q, q, w[None])
    with pytest.raises(TypeError, match="projection dtype must match"):
        favor_attention(q, q, q, w.double())
    with pytest.raises(ValueError, match="scale must be positive"):
        favor_attention(q, q, q, w, scale=-1.0)
    with pytest.raises(ValueError, match="q and k head_dim must match"):
        favor_attention(q, q[..., :4], q, w)
    with pytest.raises(ValueError, match="n_features must be a positive int"):
        FavorAttention(16, 2, n_features=-3)
    with pytest.raises(ValueError, match="redraw_interval must be a positive int"):
        FavorAttention(16, 2, redraw_interval=0)
