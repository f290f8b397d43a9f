"""FlashAttention as Triton kernels: a fused forward and a recomputing backward.

The same algorithm as :mod:`mlatlas.attention.flash` (FlashAttention-2 loop order): one
program per ``(query tile, batch·head)`` streams key/value tiles through an online softmax in
registers and writes ``O`` and the row log-sum-exp ``L``. The backward is three kernels: a
row-wise ``D = rowsum(dO ∘ O)``, one program per key tile accumulating ``dK, dV`` over every
query tile (and over the query heads of its group, so grouped-query attention needs no atomics
and stays deterministic), and one program per query tile accumulating ``dQ``. Scores are
kept in the base-2 domain (``exp2``, scale pre-multiplied by ``log2 e``).

Paper: Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Ré, 2022, arXiv:2205.14135;
Tri Dao 2023, "FlashAttention-2", arXiv:2307.08691 (Algorithms 1 and 2).

============  ================================================================
``BLOCK_M``   query rows per tile;  ``BLOCK_N``  key rows per tile
``BLOCK_D``   head dim padded to a power of two ≥ 16 (padding lanes masked)
``m, l``      running row max (base 2) and running row sum
``L``         natural-log row log-sum-exp, ``[B, Hq, Nq]`` fp32 (``-inf`` = empty row)
============  ================================================================

Devices: CUDA tensors run compiled kernels. Without a GPU, importing this module sets
``TRITON_INTERPRET=1`` (unless triton is already imported or the variable is set) so that the
same kernels run on CPU tensors through Triton's interpreter (slow: tests use tiny shapes);
whether they do is :data:`INTERPRETED`, fixed when triton is first imported. dtypes
float16/bfloat16/float32 (fp32 dots use ``input_precision="ieee"``, no TF32; the interpreter's
bf16 ``tl.dot`` is wrong, so interpreted bf16 dots take the bf16-rounded operands in fp32);
head dims 1–256. Masking, GQA and ``cu_seqlens`` conventions as
:func:`mlatlas.attention.flash.flash_attention`. The GPU launch configs below are
heuristics written without a GPU at hand (see the report of the experiment).
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import Tensor

if ("triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
        and not torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"  # no GPU: the kernels run in triton's interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mlatlas.attention.flash import check_cu_seqlens  # noqa: E402
from mlatlas.attention.reference import QKVShape, check_qkv  # noqa: E402

__all__ = ["INTERPRETED", "MAX_HEAD_DIM", "flash_attention_triton"]

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


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
def _fwd_kernel(Q, K, V, O, LSE, KPM, CU_Q, CU_K,
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
def _delta_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, n_q, H,
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
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU_Q, CU_K,
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
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, CU_Q, CU_K,
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


# ----------------------------------------------------------------------------- host side
#: True when the kernels were built for triton's interpreter (CPU tensors only work then).
INTERPRETED = bool(triton.knobs.runtime.interpret)


def _configs(d_pad: int, dtype: torch.dtype, cuda: bool) -> dict[str, dict[str, int]]:
    """Tile sizes and launch options per kernel (GPU: heuristics, not autotuned)."""
    if not cuda:  # interpreter: small tiles so tiny test shapes still span several tiles
        one = {"BLOCK_M": 16, "BLOCK_N": 16}
        return {"fwd": one, "dkdv": one, "dq": one}
    if dtype == torch.float32 or d_pad > 128:
        return {"fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
                "dkdv": {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                "dq": {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}}
    if d_pad <= 64:
        return {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                "dkdv": {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                "dq": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}}
    return {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
            "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
            "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}}


def _launch(fn, grid_dim0_rows: int, grid_dim0_key: str, grid1: int, args: tuple,
            cfg: dict[str, int], consts: dict) -> None:
    """Launch ``fn``; on a GPU out-of-resources error retry with halved tiles."""
    cfg = dict(cfg)
    while True:
        grid = (triton.cdiv(max(grid_dim0_rows, 1), cfg[grid_dim0_key]), grid1)
        try:
            fn[grid](*args, **consts, **cfg)
            return
        except triton.runtime.errors.OutOfResources:
            if cfg["BLOCK_M"] <= 16 and cfg["BLOCK_N"] <= 16:
                raise
            cfg["BLOCK_M"] = max(16, cfg["BLOCK_M"] // 2)
            cfg["BLOCK_N"] = max(16, cfg["BLOCK_N"] // 2)
            cfg["num_stages"] = 1


class _Ctx:
    """Everything the kernels need besides the tensors."""

    def __init__(self, q: Tensor, shp: QKVShape, causal: bool, scale: float,
                 kpm: Tensor | None, cu_q: Tensor | None, cu_k: Tensor | None):
        self.shp, self.causal, self.scale = shp, causal, scale
        self.interpret = INTERPRETED
        d_pad = max(16, triton.next_power_of_2(shp.head_dim))
        self.cfg = _configs(d_pad, q.dtype, not self.interpret)
        self.kpm = kpm.to(torch.uint8) if kpm is not None else None
        self.varlen = cu_q is not None
        if self.varlen:
            self.cu_q, self.cu_k = cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32)
            lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
            self.n_seq, self.max_q, self.max_k = len(lq), max(lq), max(lk)
        else:
            self.cu_q = self.cu_k = torch.zeros(1, dtype=torch.int32, device=q.device)
            self.n_seq, self.max_q, self.max_k = shp.batch, shp.seq_q, shp.seq_k
        self.consts = {"HEAD_DIM": shp.head_dim, "BLOCK_D": d_pad, "CAUSAL": causal,
                       "HAS_KPM": kpm is not None, "VARLEN": self.varlen,
                       "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
                       "UPCAST": INTERPRETED and q.dtype == torch.bfloat16}

    def kpm_args(self, q: Tensor) -> tuple:
        if self.kpm is None:
            return (q, 0, 0)  # dummy pointer, never read (HAS_KPM=False)
        return (self.kpm, self.kpm.stride(0), self.kpm.stride(1))


def _forward(q: Tensor, k: Tensor, v: Tensor, c: _Ctx) -> tuple[Tensor, Tensor]:
    shp = c.shp
    out = torch.zeros(shp.batch, shp.heads_q, shp.seq_q, shp.head_dim, dtype=q.dtype,
                      device=q.device)  # zeros: rows outside every packed sequence stay 0
    lse = torch.full((shp.batch, shp.heads_q, shp.seq_q), float("-inf"), dtype=torch.float32,
                     device=q.device)
    kpm, skpb, skpn = c.kpm_args(q)
    args = (q, k, v, out, lse, kpm, c.cu_q, c.cu_k, *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), skpb, skpn, shp.seq_q, shp.seq_k, shp.heads_q, shp.group,
            c.scale * _LOG2E)
    _launch(_fwd_kernel, c.max_q, "BLOCK_M", c.n_seq * shp.heads_q, args, c.cfg["fwd"],
            c.consts)
    return out, lse


def _backward(q, k, v, out, lse, dout, c: _Ctx) -> tuple[Tensor, Tensor, Tensor]:
    shp = c.shp
    delta = torch.empty_like(lse)
    d_consts = {"HEAD_DIM": shp.head_dim, "BLOCK_D": c.consts["BLOCK_D"]}
    _launch(_delta_kernel, shp.seq_q, "BLOCK_M", shp.batch * shp.heads_q,
            (out, dout, delta, *out.stride(), *dout.stride(), shp.seq_q, shp.heads_q),
            {"BLOCK_M": 16 if c.interpret else 64}, d_consts)
    dq = torch.zeros_like(out)  # contiguous [B, Hq, Nq, D]; rows outside sequences stay 0
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros_like(dk)
    kpm, skpb, skpn = c.kpm_args(q)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    _launch(_dkdv_kernel, c.max_k, "BLOCK_N", c.n_seq * shp.heads_kv,
            (q, k, v, dout, lse, delta, dk, dv, kpm, c.cu_q, c.cu_k, *common, *dk.stride(),
             skpb, skpn, shp.seq_q, shp.seq_k, shp.heads_q, shp.heads_kv, shp.group, c.scale,
             c.scale * _LOG2E), c.cfg["dkdv"], c.consts)
    _launch(_dq_kernel, c.max_q, "BLOCK_M", c.n_seq * shp.heads_q,
            (q, k, v, dout, lse, delta, dq, kpm, c.cu_q, c.cu_k, *common, *dq.stride(),
             skpb, skpn, shp.seq_q, shp.seq_k, shp.heads_q, shp.group, c.scale,
             c.scale * _LOG2E), c.cfg["dq"], c.consts)
    return dq, dk, dv


class _FlashTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c):
        out, lse = _forward(q, k, v, c)
        ctx.save_for_backward(q, k, v, out, lse)  # O(N·D) + O(N), no N×N tensor
        ctx.c = c
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.c)
        return dq, dk, dv, None


def flash_attention_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                           scale: float | None = None, key_padding_mask: Tensor | None = None,
                           cu_seqlens: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
                           return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """FlashAttention forward and backward as Triton kernels.

    Same contract as :func:`mlatlas.attention.flash.flash_attention` (SDPA semantics:
    top-left causal, bool ``key_padding_mask`` with True = attend, grouped-query heads,
    packed sequences through ``cu_seqlens``), without the tile-size arguments.

    Args:
        q: ``[B, Hq, Nq, D]`` float16/bfloat16/float32 on CUDA (or CPU: interpreter).
        k: ``[B, Hk, Nk, D]``, ``Hq % Hk == 0``.
        v: ``[B, Hk, Nk, D]``.
        causal: Top-left aligned causal mask (SDPA's ``is_causal``).
        scale: Score scale; ``1 / sqrt(D)`` when ``None``.
        key_padding_mask: Optional bool ``[B, Nk]``, True = attend.
        cu_seqlens: Optional int ``[S + 1]`` packed-sequence query boundaries (``B == 1``).
        cu_seqlens_k: Key boundaries when they differ from ``cu_seqlens``.
        return_lse: Also return the fp32 row log-sum-exp ``[B, Hq, Nq]``.

    Returns:
        ``[B, Hq, Nq, D]`` output (contiguous, ``q``'s dtype), or ``(output, lse)``.

    Raises:
        TypeError: float64 or non-floating inputs (and see
            :func:`~mlatlas.attention.reference.check_qkv`).
        ValueError: head_dim > 256, a non-CUDA device (CPU is fine when :data:`INTERPRETED`),
            bad ``cu_seqlens``.
    """
    shp = check_qkv(q, k, v, key_padding_mask, scale)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must be float16, bfloat16 or float32 for the Triton kernel, "
                        f"got {q.dtype}")
    if shp.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM} for the Triton kernel, got "
                         f"{shp.head_dim}")
    if q.device.type != "cuda" and not (INTERPRETED and q.device.type == "cpu"):
        raise ValueError(f"q must be a CUDA tensor (CPU tensors need triton's interpreter: "
                         f"TRITON_INTERPRET=1 before triton is imported), got {q.device}")
    cu_q, cu_k = check_cu_seqlens(cu_seqlens, cu_seqlens_k, shp)
    scale = 1.0 / math.sqrt(shp.head_dim) if scale is None else float(scale)
    c = _Ctx(q, shp, bool(causal), scale, key_padding_mask, cu_q, cu_k)
    out, lse = _FlashTritonFn.apply(q, k, v, c)
    return (out, lse) if return_lse else out
