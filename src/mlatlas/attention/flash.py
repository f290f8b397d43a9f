"""FlashAttention in plain PyTorch: tiled exact attention with an online softmax.

Queries are cut into tiles of ``block_q`` rows and key/value tiles of ``block_k`` rows are
streamed past each query tile. Each query row keeps a running maximum ``m``, a running sum
``l`` and an un-normalised output ``acc``; a new key tile rescales them by ``exp(m_old -
m_new)`` (the online softmax), so the ``[Nq, Nk]`` score matrix never exists — only one
``[block_q, block_k]`` tile at a time. The forward keeps the log-sum-exp ``L = m + log l``
per row; the backward recomputes every score tile from ``Q``, ``K`` and ``L``
(``P = exp(S - L)``) instead of storing ``P``. Extra memory is O(N), not O(N²).

Paper: Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Ré, 2022,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
arXiv:2205.14135 (Algorithms 1 and 2; loop order and row-wise ``L`` of FlashAttention-2,
Dao 2023, arXiv:2307.08691).

===========  ====================================================================
``S_ij``     ``scale · q_i · k_j`` score of query row ``i`` and key row ``j``
``m_i``      running row maximum of ``S_i·`` over the key tiles seen so far
``l_i``      running row sum ``Σ_j exp(S_ij − m_i)``
``L_i``      log-sum-exp ``m_i + log l_i`` (kept for the backward, ``-inf`` for empty rows)
``D_i``      ``rowsum(dO_i ∘ O_i)`` (the softmax-backward correction)
``G``        query heads per key/value head (grouped-query attention)
===========  ====================================================================

Masking conventions are SDPA's (see :mod:`mlatlas.attention.reference`): top-left aligned
causal mask, bool ``key_padding_mask`` ``[B, Nk]`` with True = attend, fully masked rows
give 0. Variable-length packed sequences: ``q, k, v`` are ``[1, H, total, D]`` and
``cu_seqlens`` (int ``[S + 1]``, starting at 0, ending at ``total``) bounds each sequence;
no query attends across a boundary. Any head dim ≥ 1 works here (tests cover 32–128 and
non-powers of two; the Triton kernel accepts 1–256); tiles are computed in fp32 for fp16/bf16
inputs (fp64 stays fp64) and the output is cast back. Inputs may be non-contiguous (e.g. a
``[B, N, H, D]`` tensor transposed), like SDPA. No dropout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlatlas.attention.reference import QKVShape, check_cu_seqlens, check_qkv

__all__ = ["flash_attention", "segments"]

Segment = tuple[int, int, int, int]  # (q_start, q_end, k_start, k_end) along the seq dim


def segments(shp: QKVShape, cu_q: Tensor | None, cu_k: Tensor | None) -> list[Segment]:
    """The independent attention problems: the whole sequence, or one per packed sequence."""
    if cu_q is None:
        return [(0, shp.seq_q, 0, shp.seq_k)]
    q, k = cu_q.tolist(), cu_k.tolist()
    return [(q[i], q[i + 1], k[i], k[i + 1]) for i in range(len(q) - 1)]


def _check_block(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _tile_mask(i0: int, i1: int, j0: int, j1: int, seg: Segment, causal: bool,
               kpm: Tensor | None, device: torch.device) -> Tensor | None:
    """Bool ``[B|1, 1, 1, bq, bk]`` of allowed (query, key) pairs of a tile, None = all."""
    mask = None
    qs, _, ks, _ = seg
    if causal and (j1 - 1 - ks) > (i0 - qs):  # the tile crosses the diagonal
        rows = torch.arange(i0 - qs, i1 - qs, device=device)[:, None]
        cols = torch.arange(j0 - ks, j1 - ks, device=device)[None, :]
        mask = (cols <= rows)[None, None, None]  # top-left causal: j_local <= i_local
    if kpm is not None:
        pad = kpm[:, j0:j1][:, None, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def _causal_k_end(i1: int, seg: Segment, causal: bool) -> int:
    qs, _, ks, ke = seg
    return min(ke, ks + (i1 - qs)) if causal else ke  # keys past the last row's diagonal


def _forward(q: Tensor, k: Tensor, v: Tensor, shp: QKVShape, segs: list[Segment], causal: bool,
             scale: float, block_q: int, block_k: int,
             kpm: Tensor | None) -> tuple[Tensor, Tensor]:
    b, hk, g, d = shp.batch, shp.heads_kv, shp.group, shp.head_dim
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.unflatten(1, (hk, g))  # [B, Hk, G, Nq, D]; query head h = hk * G + g
    out = torch.zeros(b, hk, g, shp.seq_q, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hk, g, shp.seq_q), float("-inf"), dtype=acc_t, device=q.device)
    for seg in segs:
        qs, qe, ks, _ = seg
        for i0 in range(qs, qe, block_q):
            i1 = min(i0 + block_q, qe)
            qt = qg[:, :, :, i0:i1].to(acc_t) * scale  # scale folded into Q once per tile
            m = torch.full((b, hk, g, i1 - i0, 1), float("-inf"), dtype=acc_t, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(b, hk, g, i1 - i0, d, dtype=acc_t, device=q.device)
            for j0 in range(ks, _causal_k_end(i1, seg, causal), block_k):
                j1 = min(j0 + block_k, _causal_k_end(i1, seg, causal))
                kt = k[:, :, None, j0:j1].to(acc_t)  # [B, Hk, 1, bk, D]
                vt = v[:, :, None, j0:j1].to(acc_t)
                s = qt @ kt.transpose(-2, -1)  # S_ij = scale · q_i·k_j   [B, Hk, G, bq, bk]
                mask = _tile_mask(i0, i1, j0, j1, seg, causal, kpm, q.device)
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                # m_i ← max(m_i, max_j S_ij)
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
                p = torch.exp(s - m_safe)  # P̃_ij = exp(S_ij − m_i^new)
                alpha = torch.exp(m - m_safe)  # rescale of the old state, exp(m_old − m_new)
                l = alpha * l + p.sum(dim=-1, keepdim=True)  # l_i ← α l_i + Σ_j P̃_ij
                acc = alpha * acc + p @ vt  # O_i ← α O_i + P̃ V_j
                m = m_new
            empty = l == 0  # no visible key: output 0, L = -inf (SDPA returns 0 too)
            out[:, :, :, i0:i1] = (acc / torch.where(empty, 1.0, l)).to(q.dtype)  # O_i = acc / l_i
            m_fin = torch.where(empty, 0.0, m)
            lse[:, :, :, i0:i1] = torch.where(empty, float("-inf"),
                                              m_fin + torch.log(torch.where(empty, 1.0, l))
                                              ).squeeze(-1)  # L_i = m_i + log l_i
    return out.flatten(1, 2), lse.flatten(1, 2)


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
              shp: QKVShape, segs: list[Segment], causal: bool, scale: float, block_q: int,
              block_k: int, kpm: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    b, hk, g, d = shp.batch, shp.heads_kv, shp.group, shp.head_dim
    acc_t = lse.dtype
    qg, og, dog = (t.unflatten(1, (hk, g)) for t in (q, out, dout))
    lse_g = lse.unflatten(1, (hk, g))
    lse_g = torch.where(torch.isinf(lse_g), 0.0, lse_g)  # empty rows: all S = -inf → P = 0
    delta = (dog.to(acc_t) * og.to(acc_t)).sum(-1)  # D_i = rowsum(dO_i ∘ O_i)   [B,Hk,G,Nq]
    dq = torch.zeros(b, hk, g, shp.seq_q, d, dtype=acc_t, device=q.device)
    dk = torch.zeros(b, hk, shp.seq_k, d, dtype=acc_t, device=q.device)
    dv = torch.zeros_like(dk)
    for seg in segs:
        qs, qe, ks, _ = seg
        for i0 in range(qs, qe, block_q):
            i1 = min(i0 + block_q, qe)
            qt = qg[:, :, :, i0:i1].to(acc_t) * scale
            dot = dog[:, :, :, i0:i1].to(acc_t)
            li = lse_g[:, :, :, i0:i1, None]
            di = delta[:, :, :, i0:i1, None]
            for j0 in range(ks, _causal_k_end(i1, seg, causal), block_k):
                j1 = min(j0 + block_k, _causal_k_end(i1, seg, causal))
                kt = k[:, :, None, j0:j1].to(acc_t)
                vt = v[:, :, None, j0:j1].to(acc_t)
                s = qt @ kt.transpose(-2, -1)  # recompute S_ij (never stored)
                mask = _tile_mask(i0, i1, j0, j1, seg, causal, kpm, q.device)
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                p = torch.exp(s - li)  # P_ij = exp(S_ij − L_i)
                dv[:, :, j0:j1] += (p.transpose(-2, -1) @ dot).sum(2)  # dV_j += P_ijᵀ dO_i
                dp = dot @ vt.transpose(-2, -1)  # dP_ij = dO_i V_jᵀ
                ds = p * (dp - di)  # dS_ij = P_ij (dP_ij − D_i)
                dq[:, :, :, i0:i1] += (ds @ kt) * scale  # dQ_i += scale · dS_ij K_j
                dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ qt).sum(2)  # dK_j += dS_ijᵀ scale·Q_i
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FlashAttentionFn(torch.autograd.Function):
    """Tiled forward; backward recomputes tiles from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, shp, segs, causal, scale, block_q, block_k):
        out, lse = _forward(q, k, v, shp, segs, causal, scale, block_q, block_k, kpm)
        ctx.save_for_backward(q, k, v, out, lse)  # O(N·D) + O(N): no N×N tensor is kept
        ctx.kpm = kpm
        ctx.args = (shp, segs, causal, scale, block_q, block_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        shp, segs, causal, scale, block_q, block_k = ctx.args
        dq, dk, dv = _backward(q, k, v, out, lse, dout, shp, segs, causal, scale, block_q,
                               block_k, ctx.kpm)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    scale: float | None = None, block_q: int = 128, block_k: int = 128,
                    key_padding_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                    cu_seqlens_k: Tensor | None = None,
                    return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention, tiled, with O(N) extra memory (pure PyTorch).

    Equals ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
    enable_gqa=True)`` (with ``key_padding_mask`` as a boolean ``attn_mask``), forward and
    backward.

    Args:
        q: ``[B, Hq, Nq, D]`` queries (float16/bfloat16/float32/float64).
        k: ``[B, Hk, Nk, D]`` keys; ``Hq % Hk == 0`` (grouped-query heads).
        v: ``[B, Hk, Nk, D]`` values.
        causal: Top-left aligned causal mask, SDPA's ``is_causal`` (query ``i`` sees keys
            ``j <= i``; with ``Nq > Nk`` rows ``i >= Nk`` see every key). With
            ``cu_seqlens`` it applies inside each packed sequence.
        scale: Score scale; ``1 / sqrt(D)`` when ``None``.
        block_q: Query rows per tile.
        block_k: Key/value rows per tile.
        key_padding_mask: Optional bool ``[B, Nk]``, True = attend, False = padding.
        cu_seqlens: Optional int ``[S + 1]`` cumulative query lengths of ``S`` sequences
            packed along ``seq`` (then ``B == 1``).
        cu_seqlens_k: Key boundaries when they differ from ``cu_seqlens``.
        return_lse: Also return the row log-sum-exp ``[B, Hq, Nq]`` (fp32, fp64 for fp64
            inputs; not differentiable; ``-inf`` for rows without a visible key).

    Returns:
        ``[B, Hq, Nq, D]`` output in ``q``'s dtype, or ``(output, lse)``.

    Raises:
        TypeError, ValueError: see :func:`~mlatlas.attention.reference.check_qkv` and
            :func:`~mlatlas.attention.reference.check_cu_seqlens`; bad ``block_q``/``block_k``.
    """
    shp = check_qkv(q, k, v, key_padding_mask, scale)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    cu_q, cu_k = check_cu_seqlens(cu_seqlens, cu_seqlens_k, shp)
    scale = 1.0 / math.sqrt(shp.head_dim) if scale is None else float(scale)
    segs = segments(shp, cu_q, cu_k)
    out, lse = _FlashAttentionFn.apply(q, k, v, key_padding_mask, shp, segs, bool(causal),
                                       scale, block_q, block_k)
    return (out, lse) if return_lse else out
