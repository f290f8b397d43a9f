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

import torch
from torch import Tensor

# triton is reached only through the kernels module, which picks the interpret mode before
# triton's first import
from mlatlas.attention import flash_triton_kernels as kernels
from mlatlas.attention.flash_triton_kernels import INTERPRETED
from mlatlas.attention.reference import QKVShape, check_cu_seqlens, check_qkv

__all__ = ["INTERPRETED", "MAX_HEAD_DIM", "flash_attention_triton"]

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- host side


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
        grid = (kernels.triton.cdiv(max(grid_dim0_rows, 1), cfg[grid_dim0_key]), grid1)
        try:
            fn[grid](*args, **consts, **cfg)
            return
        except kernels.triton.runtime.errors.OutOfResources:
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
        d_pad = max(16, kernels.triton.next_power_of_2(shp.head_dim))
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
    _launch(kernels.fwd_kernel, c.max_q, "BLOCK_M", c.n_seq * shp.heads_q, args, c.cfg["fwd"],
            c.consts)
    return out, lse


def _backward(q, k, v, out, lse, dout, c: _Ctx) -> tuple[Tensor, Tensor, Tensor]:
    shp = c.shp
    delta = torch.empty_like(lse)
    d_consts = {"HEAD_DIM": shp.head_dim, "BLOCK_D": c.consts["BLOCK_D"]}
    _launch(kernels.delta_kernel, shp.seq_q, "BLOCK_M", shp.batch * shp.heads_q,
            (out, dout, delta, *out.stride(), *dout.stride(), shp.seq_q, shp.heads_q),
            {"BLOCK_M": 16 if c.interpret else 64}, d_consts)
    dq = torch.zeros_like(out)  # contiguous [B, Hq, Nq, D]; rows outside sequences stay 0
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros_like(dk)
    kpm, skpb, skpn = c.kpm_args(q)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    _launch(kernels.dkdv_kernel, c.max_k, "BLOCK_N", c.n_seq * shp.heads_kv,
            (q, k, v, dout, lse, delta, dk, dv, kpm, c.cu_q, c.cu_k, *common, *dk.stride(),
             skpb, skpn, shp.seq_q, shp.seq_k, shp.heads_q, shp.heads_kv, shp.group, c.scale,
             c.scale * _LOG2E), c.cfg["dkdv"], c.consts)
    _launch(kernels.dq_kernel, c.max_q, "BLOCK_M", c.n_seq * shp.heads_q,
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
