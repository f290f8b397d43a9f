"""Linear attention: the O(N) forms equal the explicit quadratic form φ(Q)φ(K)ᵀV normalised.

The reference is the method's own definition computed the slow way (METHODS.md: "quadratic
form of the same kernel"): the full N×M kernel matrix, masked, row-normalised, times V.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from same_grads import assert_same_grads

from mlatlas.attention.linear import (
    LinearAttention,
    LinearAttentionState,
    linear_attention,
    linear_attention_features,
)

ATOL = RTOL = 1e-5  # fp32 CPU


def _quadratic(q, k, v, causal=False, phi=lambda x: F.elu(x) + 1, eps=1e-6):
    a = phi(q) @ phi(k).transpose(-1, -2)  # [B, H, N, M] kernel matrix
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def _qkv(n=37, m=None, d=12, dv=10, b=2, h=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype),
            torch.randn(b, h, m, d, generator=g, dtype=dtype),
            torch.randn(b, h, m, dv, generator=g, dtype=dtype))


def _check_fwd_bwd(fn, ref, tensors, seed=1, atol=ATOL, rtol=RTOL):
    a = [t.clone().requires_grad_(True) for t in tensors]
    r = [t.clone().requires_grad_(True) for t in tensors]
    out, expected = fn(*a), ref(*r)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(g)
    expected.backward(g)
    for name, x, y in zip("qkv", a, r, strict=True):
        torch.testing.assert_close(x.grad, y.grad, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("n, m", [(37, 37), (23, 41), (1, 5)])
def test_noncausal_equals_quadratic_form(n, m):
    _check_fwd_bwd(lambda q, k, v: linear_attention(q, k, v),
                   lambda q, k, v: _quadratic(q, k, v), _qkv(n, m))


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 100])
def test_causal_equals_masked_quadratic_form(chunk_size):
    _check_fwd_bwd(lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=chunk_size),
                   lambda q, k, v: _quadratic(q, k, v, causal=True), _qkv(37))


@pytest.mark.parametrize("feature_map, phi", [("relu", F.relu),
                                              (torch.sigmoid, torch.sigmoid)])
def test_other_feature_maps(feature_map, phi):
    q, k, v = _qkv(29)
    for causal in (False, True):
        _check_fwd_bwd(lambda q, k, v, c=causal: linear_attention(
            q, k, v, causal=c, feature_map=feature_map, chunk_size=8),
            lambda q, k, v, c=causal: _quadratic(q, k, v, causal=c, phi=phi), (q, k, v))


def test_unnormalised_features_form():
    q, k, v = _qkv(31)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1

    def ref(fq, fk, v, causal):
        a = fq @ fk.transpose(-1, -2)
        return (a.tril() if causal else a) @ v

    for causal in (False, True):  # sums of ~30 terms of O(10): atol 1e-4
        _check_fwd_bwd(lambda a, b, c, cz=causal: linear_attention_features(
            a, b, c, causal=cz, chunk_size=9, normalize=False),
            lambda a, b, c, cz=causal: ref(a, b, c, cz), (fq, fk, v), atol=1e-4, rtol=1e-5)


def test_step_decoding_equals_parallel():
    q, k, v = _qkv(45)
    parallel = linear_attention(q, k, v, causal=True, chunk_size=16)
    state = LinearAttentionState.zeros(2, 3, 12, 10)
    shapes = (state.kv.shape, state.z.shape)
    outs = []
    for t in range(q.shape[2]):
        outs.append(state.step(q[:, :, t], k[:, :, t], v[:, :, t]))
        assert (state.kv.shape, state.z.shape) == shapes  # constant memory per step
    torch.testing.assert_close(torch.stack(outs, 2), parallel, atol=ATOL, rtol=RTOL)
    assert state.steps == 45


def test_step_decoding_gradients_flow():
    q, k, v = (t.requires_grad_(True) for t in _qkv(6))
    state = LinearAttentionState.zeros(2, 3, 12, 10)
    sum(state.step(q[:, :, t], k[:, :, t], v[:, :, t]).sum() for t in range(6)).backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    linear_attention(q2, k2, v2, causal=True).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=ATOL, rtol=RTOL)


def test_half_precision_accumulates_in_fp32():
    q, k, v = _qkv(300, d=16, dv=16)
    out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16
    # bf16 inputs carry ~3 significant digits; outputs are averages of O(1) values.
    torch.testing.assert_close(out.float(), _quadratic(q, k, v, causal=True), atol=3e-2, rtol=0)


def test_float64():
    q, k, v = _qkv(19, dtype=torch.float64)
    for causal in (False, True):
        _check_fwd_bwd(lambda a, b, c, cz=causal: linear_attention(a, b, c, causal=cz,
                                                                   chunk_size=4),
                       lambda a, b, c, cz=causal: _quadratic(a, b, c, causal=cz), (q, k, v),
                       atol=1e-12, rtol=1e-12)


def test_layer_equals_functional():
    torch.manual_seed(0)
    layer = LinearAttention(30, 3, causal=True, chunk_size=8)
    x = torch.randn(2, 21, 30, requires_grad=True)
    q, k, v = layer.split_heads(x)
    o = _quadratic(q, k, v, causal=True).transpose(1, 2).reshape(2, 21, 30)
    out, ref = layer(x), layer.out(o)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    # backward through the projections: input and every parameter
    assert_same_grads(out, ref, x, layer, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="q and k head_dim must match"):
        linear_attention(q, k[..., :5], v)
    with pytest.raises(ValueError, match="k and v must have the same length"):
        linear_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"share \[batch, heads\]"):
        linear_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="q must be 4-D"):
        linear_attention(q[0], k, v)
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        linear_attention(q.long(), k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        linear_attention(q.double(), k, v)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        linear_attention(q, k.numpy(), v)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(TypeError, match="feature_map must be a string or a callable"):
        linear_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        linear_attention(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        linear_attention(q, k, v, causal=True, chunk_size=2.5)
    with pytest.raises(ValueError, match="as many queries as keys"):
        linear_attention(q[:, :, :3], k, v, causal=True)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        linear_attention(q, k, v, eps=-1e-6)


def test_bad_state_and_layer():
    with pytest.raises(ValueError, match="head_dim must be a positive int, got 0"):
        LinearAttentionState.zeros(1, 1, 0, 4)
    state = LinearAttentionState.zeros(1, 2, 4, 3)
    with pytest.raises(ValueError, match=r"v must have shape \(1, 2, 3\)"):
        state.step(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="n_heads must divide d_model"):
        LinearAttention(10, 3)
