"""FlashAttention Triton kernels against ``F.scaled_dot_product_attention``.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below
before triton is imported), so shapes stay tiny; ``@pytest.mark.gpu`` tests run real sizes
on CUDA. Tolerances as in ``test_flash_attention.py``; on the GPU fp32 dots run in IEEE fp32
(no TF32), so fp32 keeps 1e-5 there as well (atol 2e-5 at N = 1-4k, where sums are longer).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must happen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.testing import assert_close  # noqa: E402

pytest.importorskip("triton")

from mlatlas.attention import flash_triton  # noqa: E402
from mlatlas.attention.flash_triton import flash_attention_triton  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, hq, hk, nq, nk, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, h, n, d, generator=g) for h, n in ((hq, nq), (hk, nk), (hk, nk),
                                                             (hq, nq))]
    return [t.to(device=device, dtype=dtype) for t in out]


def _sdpa(F, q, k, v, causal=False, kpm=None):
    nq, nk = q.shape[-2], k.shape[-2]
    if kpm is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed & kpm[:, None, None, :],
                                          enable_gqa=True)


def _fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _check(ours, ref, dtype, atol=None, rtol=None):
    a0, r0 = TOL[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == dtype, name
        assert_close(a.to(b.dtype), b, atol=atol or a0, rtol=rtol or r0,
                     msg=lambda m, n=name: f"{n}: {m}")


def test_kernels_can_run_here():
    """Without CUDA the kernels must have been built for the interpreter."""
    assert torch.cuda.is_available() or flash_triton.INTERPRETED, (
        "triton was imported before TRITON_INTERPRET=1 was set; run this file on its own")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(37, 21), (21, 37)])
def test_parity_gqa_odd_lengths(reference, causal, nq, nk):
    F = reference("torch.nn.functional")
    q, k, v, do = _inputs(1, 4, 2, nq, nk, 32, seed=nq)
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=causal)
    _check(ours, _fwd_bwd(lambda *a, **kw: _sdpa(F, *a, **kw), q, k, v, do, causal=causal),
           torch.float32)


@pytest.mark.parametrize("d", [24, 128])
def test_parity_head_dims(reference, d):
    """A head dim that is not a power of two (padded lanes) and the largest common one."""
    F = reference("torch.nn.functional")
    q, k, v, do = _inputs(1, 1, 1, 19, 19, d, seed=d)
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=True)
    _check(ours, _fwd_bwd(lambda *a, **kw: _sdpa(F, *a, **kw), q, k, v, do, causal=True),
           torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_parity_key_padding_mask(reference, causal):
    F = reference("torch.nn.functional")
    q, k, v, do = _inputs(2, 2, 1, 18, 23, 32, seed=3)
    kpm = torch.rand(2, 23, generator=torch.Generator().manual_seed(3)) > 0.4
    kpm[1, :5] = False  # causal rows 0..4 of batch 1 see no key → 0, like SDPA
    kpm[1, 20:] = False
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=causal, key_padding_mask=kpm)
    ref = _fwd_bwd(lambda *a, **kw: _sdpa(F, *a, **kw), q, k, v, do, causal=causal, kpm=kpm)
    _check(ours, ref, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_parity_varlen(reference, causal):
    F = reference("torch.nn.functional")
    cu = torch.tensor([0, 5, 5, 22, 30], dtype=torch.int32)
    q, k, v, do = _inputs(1, 2, 1, 30, 30, 16, seed=4)
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=causal, cu_seqlens=cu)

    def per_sequence(q, k, v):
        b = cu.tolist()
        return torch.cat([_sdpa(F, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal)
                          for s, e in zip(b, b[1:])], dim=2)

    _check(ours, _fwd_bwd(per_sequence, q, k, v, do), torch.float32)


def test_parity_varlen_separate_key_lengths(reference):
    """cu_seqlens_k ≠ cu_seqlens (packed cross-attention, one empty key range), causal."""
    F = reference("torch.nn.functional")
    cu_q = torch.tensor([0, 3, 9, 13], dtype=torch.int64)
    cu_k = torch.tensor([0, 7, 7, 11], dtype=torch.int64)  # sequence 1 has no key: rows → 0
    q, _, _, do = _inputs(1, 2, 1, 13, 11, 16, seed=10)
    _, k, v, _ = _inputs(1, 2, 1, 11, 11, 16, seed=11)
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=True, cu_seqlens=cu_q,
                    cu_seqlens_k=cu_k)

    def per_sequence(q, k, v):
        return torch.cat([_sdpa(F, q[:, :, 0:3], k[:, :, 0:7], v[:, :, 0:7], True),
                          torch.zeros_like(q[:, :, 3:9]),
                          _sdpa(F, q[:, :, 9:13], k[:, :, 7:11], v[:, :, 7:11], True)], dim=2)

    _check(ours, _fwd_bwd(per_sequence, q, k, v, do), torch.float32)
    assert torch.all(ours[0][:, :, 3:9] == 0) and torch.all(ours[1][:, :, 3:9] == 0)


def test_fully_padded_batch_row_gives_zero_output_and_grads(reference):
    F = reference("torch.nn.functional")
    q, k, v, do = _inputs(2, 2, 2, 11, 13, 16, seed=12)
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0, 9:] = False
    kpm[1] = False  # every key of batch row 1 is padding: SDPA returns 0 there
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, key_padding_mask=kpm)
    ref = _fwd_bwd(lambda *a, **kw: _sdpa(F, *a, **kw), q, k, v, do, kpm=kpm)
    _check(ours, ref, torch.float32)
    for t in ours:
        assert torch.all(t[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_fp32_sdpa(reference, dtype):
    F = reference("torch.nn.functional")
    q, k, v, do = _inputs(1, 2, 2, 19, 23, 32, dtype=dtype, seed=5)
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=True)
    ref = _fwd_bwd(lambda *a, **kw: _sdpa(F, *a, **kw), q.float(), k.float(), v.float(),
                   do.float(), causal=True)
    _check(ours, ref, dtype)


def test_noncontiguous_inputs_and_lse(reference):
    F = reference("torch.nn.functional")
    x = torch.randn(1, 21, 2, 24, generator=torch.Generator().manual_seed(6))
    q = x.transpose(1, 2)  # [B, H, N, D] view of a [B, N, H, D] tensor
    assert not q.is_contiguous()
    do = torch.linspace(-1, 1, 24).expand(1, 2, 21, 24)  # stride-0 upstream gradient
    ours = _fwd_bwd(flash_attention_triton, q, q * 0.5, q, do)
    _check(ours, _fwd_bwd(lambda *a: _sdpa(F, *a), q, q * 0.5, q, do), torch.float32)
    _, lse = flash_attention_triton(q, q, q, return_lse=True)
    s = q @ q.transpose(-2, -1) / 24 ** 0.5
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_bad_input():
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 32)
    with pytest.raises(TypeError, match=r"float16, bfloat16 or float32 .* got torch.float64"):
        flash_attention_triton(q.double(), k.double(), v.double())
    big = torch.zeros(1, 1, 4, 320)
    with pytest.raises(ValueError, match=r"head_dim must be <= 256 .* got 320"):
        flash_attention_triton(big, big, big)
    with pytest.raises(ValueError, match=r"q heads \(2\) must be a multiple of k/v heads"):
        flash_attention_triton(q, k[:, :1].expand(1, 3, 8, 32), v[:, :1].expand(1, 3, 8, 32))
    with pytest.raises(ValueError, match=r"end at the packed length 8"):
        flash_attention_triton(q, k, v, cu_seqlens=torch.tensor([0, 3]))


# ----------------------------------------------------------------------------- GPU sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_parity_real_sizes(reference, dtype, d, causal):
    F = reference("torch.nn.functional")
    q, k, v, do = _inputs(2, 8, 2, 1000, 1000, d, dtype=dtype, seed=d, device="cuda")
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=causal)
    ref = _fwd_bwd(lambda *a, **kw: _sdpa(F, *a, **kw), q.float(), k.float(), v.float(),
                   do.float(), causal=causal)
    atol = 2e-5 if dtype == torch.float32 else None
    _check(ours, ref, dtype, atol=atol, rtol=atol)


@pytest.mark.gpu
def test_gpu_varlen_and_padding(reference):
    F = reference("torch.nn.functional")
    cu = torch.tensor([0, 300, 301, 1500, 2048], dtype=torch.int32, device="cuda")
    q, k, v, do = _inputs(1, 4, 4, 2048, 2048, 64, dtype=torch.float16, seed=7, device="cuda")
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, causal=True, cu_seqlens=cu)

    def per_sequence(q, k, v):
        b = cu.tolist()
        return torch.cat([_sdpa(F, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], True)
                          for s, e in zip(b, b[1:])], dim=2)

    ref = _fwd_bwd(per_sequence, q.float(), k.float(), v.float(), do.float())
    _check(ours, ref, torch.float16)
    kpm = (torch.rand(2, 777, generator=torch.Generator().manual_seed(9)) > 0.3).cuda()
    q, k, v, do = _inputs(2, 4, 4, 513, 777, 128, dtype=torch.bfloat16, seed=8, device="cuda")
    ours = _fwd_bwd(flash_attention_triton, q, k, v, do, key_padding_mask=kpm)
    ref = _fwd_bwd(lambda *a, **kw: _sdpa(F, *a, **kw), q.float(), k.float(), v.float(),
                   do.float(), kpm=kpm)
    _check(ours, ref, torch.bfloat16)
