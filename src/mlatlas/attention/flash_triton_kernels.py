"""The Triton kernels of :func:`mlatlas.attention.flash_triton.flash_attention_triton`.

Four ``@triton.jit`` kernels (FlashAttention-2 loop order; Dao 2023, arXiv:2307.08691,
Algorithms 1 and 2): the forward (online softmax over key tiles, writes ``O`` and the row
log-sum-exp ``L``), and the backward as ``D = rowsum(dO ∘ O)``, ``dK, dV`` per key tile and
``dQ`` per query tile. Notation and conventions: :mod:`mlatlas.attention.flash_triton`, which
launches them.

Importing this module without a GPU sets ``TRITON_INTERPRET=1`` (unless triton is already
imported or the variable is set): Triton decides at its first import whether kernels are
compiled or interpreted, and only interpreted kernels accept CPU tensors.
"""

from __future__ import annotations

import os
import sys

import torch

if ("triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
        and not torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"  # no GPU: the kernels run in triton's interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["INTERPRETED", "delta_kernel", "dkdv_kernel", "dq_kernel", "fwd_kernel"]


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, n_q, n_k, VARLEN: tl.constexpr):
    """Where sequence ``b`` starts and how long it is, in the queries and the keys.

    Packed (varlen): rows ``cu[b] … cu[b+1]`` of batch row 0. Padded: all of batch row ``b``.
    Returns ``(q0, len_q, k0, len_k, batch_row)``.
    """
    if VARLEN:  # constexpr: only one branch is compiled
        q0 = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q0
        k0 = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k0
        row = 0
    else:
        q0 = 0
        len_q = n_q
        k0 = 0
        len_k = n_k
        row = b
    return q0, len_q, k0, len_k, row


@triton.jit
def fwd_kernel(Q, K, V, O, LSE, KPM, CU_Q, CU_K,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, son, sod, skpb, skpn,
                n_q, n_k, H, G, scale_log2,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                VARLEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: tensors > 2**31 elements
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G  # grouped-query heads share one k/v head
    q0, len_q, k0, len_k, bb = _sequence_bounds(CU_Q, CU_K, b, n_q, n_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    rmask = offs_m < len_q
    q = tl.load(Q + bb * sqb + h * sqh + (q0 + offs_m)[:, None] * sqn + offs_d[None, :] * sqd,
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # interpreter only: its bf16 dot is wrong, so dot bf16-rounded values in fp32
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M)  # top-left causal: keys j <= last row
    k_base = K + bb * skb + hk * skh
    v_base = V + bb * svb + hk * svh
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        cmask = cols < len_k
        kt = tl.load(k_base + (k0 + cols)[None, :] * skn + offs_d[:, None] * skd,
                     mask=cmask[None, :] & dmask[:, None], other=0.0)  # Kᵀ tile [D, N]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # S·log2e  [M, N]
        valid = cmask[None, :] & rmask[:, None]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        if HAS_KPM:
            kp = tl.load(KPM + bb * skpb + (k0 + cols) * skpn, mask=cmask, other=0)
            valid = valid & (kp != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i ← max(m_i, max_j S_ij)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])  # P̃ = exp(S − m_new)
        alpha = tl.exp2(m_i - m_safe)  # exp(m_old − m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # l_i ← α l_i + rowsum(P̃)
        vt = tl.load(v_base + (k0 + cols)[:, None] * svn + offs_d[None, :] * svd,
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            vt = vt.to(tl.float32)
        pv = tl.dot(p.to(O.dtype.element_ty).to(vt.dtype), vt, input_precision=PREC)
        acc = acc * alpha[:, None] + pv  # O_i ← α O_i + P̃ V_j
        m_i = m_new
    empty = l_i == 0.0  # no visible key: O = 0, L = -inf (as SDPA)
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]  # O_i = acc_i / l_i
    m_fin = tl.where(empty, 0.0, m_i)
    lse = tl.where(empty, float("-inf"), (m_fin + tl.log2(l_safe)) / 1.4426950408889634)
    tl.store(O + bb * sob + h * soh + (q0 + offs_m)[:, None] * son + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + (bb * H + h) * (n_q) + q0 + offs_m, lse, mask=rmask)  # L = m + log l


@triton.jit
def delta_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, n_q, H,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: tensors > 2**31 elements
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * n_q + offs_m, tl.sum(o * do, 1), mask=offs_m < n_q)  # D_i


@triton.jit
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU_Q, CU_K,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd, skpb, skpn,
                 n_q, n_k, H, HK, G, scale, scale_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 VARLEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: tensors > 2**31 elements
    b = pid_bh // HK
    hk = pid_bh % HK
    q0, len_q, k0, len_k, bb = _sequence_bounds(CU_Q, CU_K, b, n_q, n_k, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    cmask = offs_n < len_k
    kv_mask = cmask[:, None] & dmask[None, :]
    k = tl.load(K + bb * skb + hk * skh + (k0 + offs_n)[:, None] * skn + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + bb * svb + hk * svh + (k0 + offs_n)[:, None] * svn + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    colvalid = cmask
    if HAS_KPM:
        kp = tl.load(KPM + bb * skpb + (k0 + offs_n) * skpn, mask=cmask, other=0)
        colvalid = colvalid & (kp != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # rows i < start_n never see these keys
    for g in range(0, G):
        h = hk * G + g  # every query head of the group contributes to dK, dV
        q_base = Q + bb * sqb + h * sqh
        do_base = DO + bb * sdb + h * sdh
        row_base = (bb * H + h) * n_q + q0
        for start_m in range(lo, len_q, BLOCK_M):
            rows = start_m + offs_m
            rmask = rows < len_q
            qt = tl.load(q_base + (q0 + rows)[None, :] * sqn + offs_d[:, None] * sqd,
                         mask=rmask[None, :] & dmask[:, None], other=0.0)  # Qᵀ [D, M]
            if UPCAST:
                qt = qt.to(tl.float32)
            lse = tl.load(LSE + row_base + rows, mask=rmask, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            st = tl.dot(k, qt, input_precision=PREC) * scale_log2  # Sᵀ·log2e  [N, M]
            valid = colvalid[:, None] & rmask[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= rows[None, :])
            pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)  # Pᵀ = exp(Sᵀ − L)
            do = tl.load(do_base + (q0 + rows)[:, None] * sdn + offs_d[None, :] * sdd,
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                do = do.to(tl.float32)
            pt_lo = pt.to(DV.dtype.element_ty).to(do.dtype)  # P in the input precision
            dv += tl.dot(pt_lo, do, input_precision=PREC)  # dV_j += Pᵀ dO
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)  # dPᵀ = V dOᵀ  [N, M]
            delta = tl.load(DELTA + row_base + rows, mask=rmask, other=0.0)
            dst = pt * (dpt - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ − D)
            dst_lo = dst.to(DK.dtype.element_ty).to(qt.dtype)
            dk += tl.dot(dst_lo, tl.trans(qt), input_precision=PREC)  # dK_j += dSᵀ Q
    out_off = bb * sgb + hk * sgh + (k0 + offs_n)[:, None] * sgn + offs_d[None, :] * sgd
    dk = dk * scale  # dK = scale · Σ dSᵀ Q
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, CU_Q, CU_K,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd, skpb, skpn,
               n_q, n_k, H, G, scale, scale_log2,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               VARLEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: tensors > 2**31 elements
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    q0, len_q, k0, len_k, bb = _sequence_bounds(CU_Q, CU_K, b, n_q, n_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    rmask = offs_m < len_q
    qmask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + bb * sqb + h * sqh + (q0 + offs_m)[:, None] * sqn + offs_d[None, :] * sqd,
                mask=qmask, other=0.0)
    do = tl.load(DO + bb * sdb + h * sdh + (q0 + offs_m)[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_off = (bb * H + h) * n_q + q0 + offs_m
    lse = tl.load(LSE + row_off, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + row_off, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M)
    k_base = K + bb * skb + hk * skh
    v_base = V + bb * svb + hk * svh
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        cmask = cols < len_k
        kt = tl.load(k_base + (k0 + cols)[None, :] * skn + offs_d[:, None] * skd,
                     mask=cmask[None, :] & dmask[:, None], other=0.0)  # Kᵀ [D, N]
        vt = tl.load(v_base + (k0 + cols)[None, :] * svn + offs_d[:, None] * svd,
                     mask=cmask[None, :] & dmask[:, None], other=0.0)  # Vᵀ [D, N]
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * scale_log2
        valid = cmask[None, :] & rmask[:, None]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        if HAS_KPM:
            kp = tl.load(KPM + bb * skpb + (k0 + cols) * skpn, mask=cmask, other=0)
            valid = valid & (kp != 0)[None, :]
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)  # P = exp(S − L)
        dp = tl.dot(do, vt, input_precision=PREC)  # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − D)
        ds_lo = ds.to(DQ.dtype.element_ty).to(kt.dtype)
        dq += tl.dot(ds_lo, tl.trans(kt), input_precision=PREC)  # dQ_i += dS K_j
    tl.store(DQ + bb * sgb + h * sgh + (q0 + offs_m)[:, None] * sgn + offs_d[None, :] * sgd,
             (dq * scale).to(DQ.dtype.element_ty), mask=qmask)  # dQ = scale · Σ_j dS K_j


#: True when the kernels were built for triton's interpreter (CPU tensors only work then).
INTERPRETED = bool(triton.knobs.runtime.interpret)
