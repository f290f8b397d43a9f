"""Materialised (naive) softmax attention and the input checks every attention kernel shares.

``naive_attention`` is the textbook ``softmax(Q Kᵀ · scale + mask) V`` that builds the full
``[Nq, Nk]`` score matrix: the baseline the efficient kernels of :mod:`mlatlas.attention` are
compared and benchmarked against (Vaswani et al. 2017, arXiv:1706.03762, eq. (1)).
:func:`check_qkv` validates ``[batch, heads, seq, head_dim]`` inputs and
:func:`check_cu_seqlens` packed-sequence boundaries (the one ``cu_seqlens`` contract of
mlatlas), with messages that name the argument, what was expected and what came.

Conventions (identical to ``torch.nn.functional.scaled_dot_product_attention``):

========================  =============================================================
``q``                     ``[B, Hq, Nq, D]`` queries
``k``, ``v``              ``[B, Hk, Nk, D]`` keys / values; ``Hq % Hk == 0`` (grouped-query
                          heads: query head ``h`` reads key/value head ``h // (Hq // Hk)``)
``scale``                 ``1 / sqrt(D)`` when ``None``
``causal``                top-left aligned ``tril``: query ``i`` attends keys ``j <= i``
                          (for ``Nq > Nk`` rows ``i >= Nk`` see every key)
``key_padding_mask``      bool ``[B, Nk]``, **True = real key (attend)**, False = padding;
                          the SDPA boolean-mask convention (note: ``nn.MultiheadAttention``'s
                          ``key_padding_mask`` uses the opposite sign)
fully masked query row    output 0 and gradient 0, as SDPA returns
========================  =============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QKVShape", "check_cu_seqlens", "check_qkv", "naive_attention"]


@dataclass(frozen=True)
class QKVShape:
    """Sizes read off validated ``q, k, v``."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads_q // self.heads_kv


def check_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
              scale: float | None = None) -> QKVShape:
    """Validate attention inputs and return their sizes.

    Args:
        q: ``[B, Hq, Nq, D]`` floating tensor.
        k: ``[B, Hk, Nk, D]``, same dtype and device as ``q``; ``Hq % Hk == 0``.
        v: ``[B, Hk, Nk, D]``, same shape as ``k``.
        key_padding_mask: Optional bool ``[B, Nk]`` (True = attend).
        scale: Optional positive finite float.

    Returns:
        The sizes as a :class:`QKVShape`.

    Raises:
        TypeError: non-tensor inputs, non-floating or mismatched dtypes, a non-bool mask.
        ValueError: wrong ranks, mismatched sizes or devices, empty dims, a bad ``scale``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got q {q.device}, "
                         f"k {k.device}, v {v.device}")
    b, hq, nq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hk, Nk, D], got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    bk, hk, nk, dk = k.shape
    if bk != b:
        raise ValueError(f"k/v batch size must equal q's ({b}), got {bk}")
    if dk != d:
        raise ValueError(f"k/v head_dim must equal q's head_dim ({d}), got {dk}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads (grouped-query "
                         f"attention), got k/v heads {hk}")
    if min(b, hq, nq, nk, d) == 0:
        raise ValueError(f"empty dimension: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(
                key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor (True = attend), got {got}")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(f"key_padding_mask must have shape [batch, seq_k] = {(b, nk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got "
                             f"{key_padding_mask.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return QKVShape(b, hq, hk, nq, nk, d)


def check_cu_seqlens(cu_seqlens: Tensor | None, cu_seqlens_k: Tensor | None,
                     shp: QKVShape) -> tuple[Tensor | None, Tensor | None]:
    """Validate packed-sequence boundaries; ``cu_seqlens_k`` defaults to ``cu_seqlens``.

    Raises:
        TypeError: a non-integer tensor.
        ValueError: wrong rank/length, a batch other than 1, not starting at 0, decreasing,
            or not ending at the packed length.
    """
    if cu_seqlens is None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k needs cu_seqlens (the query boundaries), got None")
        return None, None
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if shp.batch != 1:
        raise ValueError(f"with cu_seqlens, sequences are packed along seq: batch must be 1, "
                         f"got {shp.batch}")
    for name, cu, total in (("cu_seqlens", cu_seqlens, shp.seq_q),
                            ("cu_seqlens_k", cu_seqlens_k, shp.seq_k)):
        if not isinstance(cu, Tensor) or cu.dtype not in (torch.int32, torch.int64):
            got = cu.dtype if isinstance(cu, Tensor) else type(cu).__name__
            raise TypeError(f"{name} must be an int32/int64 tensor, got {got}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-D [num_seqs + 1], got shape {tuple(cu.shape)}")
        vals = cu.tolist()
        if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed "
                             f"length {total}, got {vals}")
    if cu_seqlens.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens and cu_seqlens_k must hold the same number of sequences, "
                         f"got {cu_seqlens.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    return cu_seqlens, cu_seqlens_k


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    scale: float | None = None,
                    key_padding_mask: Tensor | None = None) -> Tensor:
    """Softmax attention that materialises the ``[B, Hq, Nq, Nk]`` score matrix.

    Args:
        q: ``[B, Hq, Nq, D]`` queries.
        k: ``[B, Hk, Nk, D]`` keys (``Hq % Hk == 0``).
        v: ``[B, Hk, Nk, D]`` values.
        causal: Top-left aligned causal mask (query ``i`` sees keys ``j <= i``), as SDPA.
        scale: Score scale; ``1 / sqrt(D)`` when ``None``.
        key_padding_mask: Optional bool ``[B, Nk]``, True = attend.

    Returns:
        ``[B, Hq, Nq, D]`` output in ``q``'s dtype; rows with no visible key are 0.
    """
    shp = check_qkv(q, k, v, key_padding_mask, scale)
    scale = 1.0 / math.sqrt(shp.head_dim) if scale is None else float(scale)
    if shp.group > 1:  # grouped-query heads: every k/v head serves `group` query heads
        k = k.repeat_interleave(shp.group, dim=1)
        v = v.repeat_interleave(shp.group, dim=1)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # S = Q Kᵀ · scale   [B, H, Nq, Nk]
    allowed = torch.ones(shp.seq_q, shp.seq_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()  # top-left aligned, SDPA's is_causal
    allowed = allowed.expand(shp.batch, 1, shp.seq_q, shp.seq_k)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # safe row max
    e = torch.exp(s - m)  # masked entries: exp(-inf) = 0
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)  # P = softmax(S), 0-rows
    return torch.matmul(p, v)  # O = P V
