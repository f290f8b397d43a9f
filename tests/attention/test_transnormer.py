"""TransNormer: DiagAttention equals SDPA with a block-diagonal mask; NormAttention equals
its unnormalised quadratic form followed by torch's RMSNorm/LayerNorm; the stack's layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from same_grads import assert_same_grads
from torch import nn

from mlatlas.attention.linear import LinearAttention
from mlatlas.attention.transnormer import (
    DiagAttention,
    NormAttention,
    TransNormer,
    TransNormerBlock,
    diag_attention,
    norm_attention,
)

ATOL = RTOL = 1e-5  # fp32 CPU


def _qkv(n, d=12, dv=10, b=2, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g),
            torch.randn(b, h, n, dv, generator=g))


def _block_mask(n, block, causal):
    idx = torch.arange(n)
    mask = (idx[:, None] // block) == (idx[None, :] // block)  # True = may attend
    return mask & (idx[:, None] >= idx[None, :]) if causal else mask


@pytest.mark.parametrize("n, block", [(37, 8), (48, 16), (5, 64), (30, 1), (23, 23)])
@pytest.mark.parametrize("causal", [False, True])
def test_diag_attention_equals_block_masked_sdpa(n, block, causal):
    tensors = _qkv(n)
    a = [t.clone().requires_grad_(True) for t in tensors]
    r = [t.clone().requires_grad_(True) for t in tensors]
    out = diag_attention(*a, block, causal=causal)
    ref = F.scaled_dot_product_attention(*r, attn_mask=_block_mask(n, block, causal))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    ref.backward(g)
    for x, y in zip(a, r):
        torch.testing.assert_close(x.grad, y.grad, atol=ATOL, rtol=RTOL)


def test_diag_attention_scale():
    q, k, v = _qkv(20)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_block_mask(20, 6, False), scale=0.3)
    torch.testing.assert_close(diag_attention(q, k, v, 6, scale=0.3), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("causal", [False, True])
def test_norm_attention_equals_unnormalised_quadratic_form(causal):
    tensors = _qkv(29)
    a = [t.clone().requires_grad_(True) for t in tensors]
    r = [t.clone().requires_grad_(True) for t in tensors]
    out = norm_attention(*a, causal=causal, chunk_size=8)
    s = (F.elu(r[0]) + 1) @ (F.elu(r[1]) + 1).transpose(-1, -2)
    ref = (s.tril() if causal else s) @ r[2]  # φ(Q)φ(K)ᵀV, no denominator
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=RTOL)  # values O(100): atol in rtol
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    for x, y in zip(a, r):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-4, rtol=RTOL)


@pytest.mark.parametrize("norm, torch_norm", [("rmsnorm", nn.RMSNorm), ("layernorm",
                                                                         nn.LayerNorm)])
def test_norm_attention_layer_is_norm_of_heads(norm, torch_norm):
    torch.manual_seed(0)
    layer = NormAttention(30, 3, causal=True, norm=norm)
    assert isinstance(layer.norm, torch_norm)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        if norm == "layernorm":
            layer.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 19, 30, requires_grad=True)
    q, k, v = layer.split_heads(x)
    s = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)).tril()
    o = (s @ v).transpose(1, 2).reshape(2, 19, 30)
    out, ref = layer(x), layer.out(layer.norm(o))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    # backward: the input and every parameter (projections, norm gain/bias, output)
    assert_same_grads(out, ref, x, layer, atol=ATOL, rtol=RTOL)


def test_diag_layer_attention_weights_are_block_diagonal():
    torch.manual_seed(0)
    layer = DiagAttention(16, 2, block_size=5)
    w = layer.attention_weights(torch.randn(3, 13, 16))
    assert w.shape == (3, 2, 13, 13)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 13), atol=ATOL, rtol=RTOL)
    assert (w[..., ~_block_mask(13, 5, False)] == 0).all()


def test_stack_layout_and_attention_maps():
    torch.manual_seed(0)
    model = TransNormer(24, 2, 5, block_size=7)
    assert [b.kind for b in model.blocks] == ["diag", "diag", "norm", "norm", "norm"]
    x = torch.randn(2, 17, 24)
    y, maps = model(x, return_attention=True)
    torch.testing.assert_close(y, model(x), atol=0, rtol=0)
    assert y.shape == x.shape and len(maps) == 5
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 2, 17), atol=ATOL, rtol=RTOL)
    base = TransNormer(24, 2, 2, layer_types=["linear", "linear"])
    assert all(isinstance(b.mixer, LinearAttention) for b in base.blocks)


def test_causal_stack_ignores_the_future():
    torch.manual_seed(0)
    model = TransNormer(16, 2, 4, block_size=4, causal=True)
    x = torch.randn(1, 11, 16)
    y = x.clone()
    y[:, 7:] = torch.randn(1, 4, 16)
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7], atol=ATOL, rtol=RTOL)


def test_block_trains():
    torch.manual_seed(0)
    block = TransNormerBlock(16, 2, "diag", block_size=4)
    x, target = torch.randn(4, 9, 16), torch.randn(4, 9, 16)
    first = F.mse_loss(block(x), target).item()
    for _ in range(20):  # plain gradient descent
        block.zero_grad()
        F.mse_loss(block(x), target).backward()
        with torch.no_grad():
            for p in block.parameters():
                p -= 0.05 * p.grad
    assert F.mse_loss(block(x), target).item() < 0.9 * first


def test_bad_inputs():
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        diag_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        diag_attention(q, k, v, 2.0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        diag_attention(q[:, :, :4], k, v, 4)
    with pytest.raises(ValueError, match="k and v must have the same length"):
        diag_attention(q, k, v[:, :, :3], 4)
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        diag_attention(q.int(), k, v, 4)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        norm_attention(q, k, v, feature_map="exp")
    with pytest.raises(ValueError, match="q and k head_dim must match"):
        norm_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="attention must be one of"):
        TransNormerBlock(16, 2, "softmax")
    with pytest.raises(ValueError, match="norm must be one of"):
        NormAttention(16, 2, norm="batchnorm")
    with pytest.raises(ValueError, match="block_size must be a positive int, got -4"):
        DiagAttention(16, 2, block_size=-4)
    with pytest.raises(ValueError, match="n_heads must divide d_model"):
        DiagAttention(16, 3)
    with pytest.raises(ValueError, match="layer_types must have n_layers=3 entries, got 2"):
        TransNormer(16, 2, 3, layer_types=["diag", "norm"])
