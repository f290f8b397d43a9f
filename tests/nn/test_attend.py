"""The attention entry point: every backend against one materialised reference.

The reference below is written from the definition (``softmax(Q Kᵀ·scale + M) V`` with the
mask built explicitly, float64), independent of SDPA and of our kernels. Shapes are not
powers of two; forward and gradients of q, k, v are compared for each backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mlatlas.nn.attention import BACKENDS, attend


def _reference(q, k, v, *, causal=False, kpm=None, mask=None, cu=None, window=None):
    """Materialised attention in float64 with an explicit [B, H, Nq, Nk] mask."""
    q, k, v = (t.double() for t in (q, k, v))
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    k, v = (t.repeat_interleave(hq // hk, dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(b, hq, nq, nk, dtype=torch.bool)
    if cu is not None:  # same packed sequence only
        seg = torch.bucketize(torch.arange(nq), cu[1:], right=True)
        allowed &= seg[:, None] == seg[None, :]
    if causal:
        if cu is not None:
            allowed &= torch.arange(nk)[None, :] <= torch.arange(nq)[:, None]
        else:
            allowed &= torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
    if window is not None:  # key j visible from query position p_i only if p_i - j < W
        if cu is not None:
            seg = torch.bucketize(torch.arange(nq), cu[1:], right=True)
            local = torch.arange(nq) - cu[seg]
            allowed &= local[None, :] > local[:, None] - window
        else:
            allowed &= torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + (nk - nq) - window
    if kpm is not None:
        allowed &= kpm[:, None, None, :]
    if mask is not None and mask.dtype == torch.bool:
        allowed &= mask
    elif mask is not None:
        s = s + mask.double()
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows → 0
    return p @ v


def _inputs(b, hq, hk, nq, nk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for h, n in ((hq, nq), (hk, nk), (hk, nk))]


def _check(backend, q, k, v, atol=1e-5, **kw):
    ref_kw = {"causal": kw.get("causal", False), "kpm": kw.get("key_padding_mask"),
              "mask": kw.get("attn_mask"), "cu": kw.get("cu_seqlens"), "window": kw.get("window")}
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = attend(qs, ks, vs, backend=backend, **kw)
    qr, kr, vr = (t.clone().double().requires_grad_() for t in (q, k, v))
    ref = _reference(qr, kr, vr, **ref_kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_close(out.double(), ref, atol=atol, rtol=atol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(out, (qs, ks, vs), g)
    want = torch.autograd.grad(ref, (qr, kr, vr), g.double())
    for name, a, b in zip("qkv", got, want):
        assert_close(a.double(), b, atol=atol, rtol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_plain_and_causal_with_gqa(backend, causal):
    _check(backend, *_inputs(2, 6, 2, 13, 13, 24), causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding(backend):
    q, k, v = _inputs(2, 4, 4, 11, 11, 16, seed=1)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[0, 7:] = False
    kpm[1, :3] = False
    _check(backend, q, k, v, causal=True, key_padding_mask=kpm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_never_cross_a_boundary(backend):
    q, k, v = _inputs(1, 3, 3, 17, 17, 8, seed=2)
    cu = torch.tensor([0, 5, 6, 12, 17], dtype=torch.int32)
    _check(backend, q, k, v, causal=True, cu_seqlens=cu)
    _check(backend, q, k, v, causal=False, cu_seqlens=cu)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_decoding_after_a_cache_is_bottom_right_causal(backend):
    # 3 new queries after 9 cached keys: query i sees keys j <= 9 + i
    _check(backend, *_inputs(2, 4, 2, 3, 12, 16, seed=3), causal=True)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_explicit_masks_bool_and_float(backend):
    q, k, v = _inputs(2, 4, 2, 7, 10, 8, seed=4)
    g = torch.Generator().manual_seed(5)
    tree = torch.rand(7, 10, generator=g) > 0.4  # e.g. a tree-attention mask
    tree[:, 0] = True  # every row sees the root
    _check(backend, q, k, v, attn_mask=tree)
    _check(backend, q, k, v, attn_mask=tree[None, None], causal=True)
    bias = torch.randn(1, 4, 7, 10, generator=g)  # e.g. a relative position bias
    _check(backend, q, k, v, attn_mask=bias, key_padding_mask=torch.ones(2, 10, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_sliding_window(backend):
    # Mistral-style: causal + look back at most W keys, plain, after a cache, packed, with masks
    q, k, v = _inputs(2, 4, 2, 13, 13, 8, seed=6)
    for window in (1, 4, 12, 13, 40):
        _check(backend, q, k, v, causal=True, window=window)
    _check(backend, *_inputs(2, 4, 2, 3, 12, 8, seed=7), causal=True, window=5)
    _check(backend, q[:1], k[:1], v[:1], causal=True, window=3,
           cu_seqlens=torch.tensor([0, 5, 6, 13]))
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0, :4] = False
    _check(backend, q, k, v, causal=True, window=6, key_padding_mask=kpm)
    tree = torch.rand(13, 13, generator=torch.Generator().manual_seed(8)) > 0.3
    _check(backend, q, k, v, window=6, attn_mask=tree)  # one-sided: only the look-back


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_query_after_a_cache_sees_every_key(backend):
    # decoding: causal with Nq = 1 is no mask at all, on every backend
    _check(backend, *_inputs(2, 4, 2, 1, 9, 16, seed=10), causal=True)


def test_fully_masked_rows_give_zero():
    q, k, v = _inputs(1, 2, 2, 4, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out = attend(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))


@pytest.mark.parametrize("kwargs, err, match", [
    ({"backend": "xformers"}, ValueError, "backend must be one of"),
    ({"attn_mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError,
     r"attn_mask must broadcast to \[B, Hq, Nq, Nk\] = \[1, 2, 4, 4\], got shape \(3, 5\)"),
    ({"attn_mask": torch.ones(4, 4, dtype=torch.int64)}, TypeError,
     "attn_mask must be bool .* got torch.int64"),
    ({"attn_mask": torch.ones(4, 4, dtype=torch.bool), "backend": "flash"}, ValueError,
     "backend 'flash' takes no attn_mask"),
    ({"cu_seqlens": torch.tensor([0, 2, 3])}, ValueError, "end at the packed length 4"),
    ({"cu_seqlens": torch.tensor([0.0, 4.0])}, TypeError, "cu_seqlens must be an int32/int64"),
    ({"key_padding_mask": torch.ones(1, 4)}, TypeError, "key_padding_mask must be a bool"),
    ({"window": 0}, ValueError, "window must be a positive int or None, got 0"),
    ({"window": 2, "backend": "flash"}, ValueError, "backend 'flash' takes no window"),
])
def test_bad_input(kwargs, err, match):
    q, k, v = _inputs(1, 2, 2, 4, 4, 8)
    with pytest.raises(err, match=match):
        attend(q, k, v, **kwargs)


def test_causal_refuses_more_queries_than_keys_and_flash_needs_equal_lengths():
    q, k, v = _inputs(1, 2, 2, 5, 3, 8)
    with pytest.raises(ValueError, match="no more queries than keys.*Nq=5, Nk=3"):
        attend(q, k, v, causal=True)
    q, k, v = _inputs(1, 2, 2, 2, 6, 8)
    with pytest.raises(ValueError, match="backend 'flash' computes causal attention for Nq == Nk"):
        attend(q, k, v, causal=True, backend="flash")
    with pytest.raises(ValueError, match="q must be 4-D"):
        attend(q[0], k, v)
