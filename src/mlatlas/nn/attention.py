"""The one attention entry point every model of mlatlas calls: :func:`attend`.

Scaled dot-product attention ``O = softmax(Q Kᵀ · scale + M) V`` (Vaswani et al. 2017,
arXiv:1706.03762, eq. (1)) with the masks a model needs — causal, key padding, an explicit
mask (tree attention, windows, prefixes) and packed variable-length sequences — computed by
one of four backends chosen by name, so that a model is written once and its attention
kernel is a switch:

================  ==========================================================================
``"sdpa"``        ``torch.nn.functional.scaled_dot_product_attention`` (torch picks its
                  fastest kernel); the default
``"math"``        the same call forced onto SDPA's reference math kernel (materialises
                  ``[Nq, Nk]``; the baseline of the efficient ones)
``"flash"``       :func:`mlatlas.attention.flash.flash_attention` (tiled, online softmax,
                  O(N) memory, pure PyTorch)
``"flash_triton"`` :func:`mlatlas.attention.flash_triton.flash_attention_triton` (the
                  Triton kernels; CUDA, or the CPU under ``TRITON_INTERPRET=1``)
================  ==========================================================================

Conventions (shapes as in :mod:`mlatlas.attention.reference`, which also validates them):

========================  ==================================================================
``q``                     ``[B, Hq, Nq, D]``
``k``, ``v``              ``[B, Hk, Nk, D]``, ``Hq % Hk == 0`` (grouped-query heads)
``causal``                query ``i`` sits at position ``Nk − Nq + i`` and sees keys
                          ``j ≤ Nk − Nq + i`` (bottom-right aligned: decoding ``Nq`` new
                          tokens after ``Nk − Nq`` cached ones). Equal to SDPA's
                          ``is_causal`` when ``Nq == Nk``; ``Nq > Nk`` is refused.
``key_padding_mask``      bool ``[B, Nk]``, True = real key
``attn_mask``             bool (True = may attend) or float (added to the scores), broadcast
                          to ``[B, Hq, Nq, Nk]``; combined with the two above
``cu_seqlens``            int ``[S + 1]``: ``S`` sequences packed along ``seq`` (``B == 1``),
                          starting at 0, non-decreasing, ending at ``Nq``; no query attends
                          across a boundary (``cu_seqlens_k`` for keys, default the same)
``window``                ``W``: query ``i`` (at position ``p_i = Nk − Nq + i``, per packed
                          sequence) sees only keys ``j > p_i − W``; with ``causal`` this is
                          the sliding-window attention of Longformer/Mistral (Beltagy et al.
                          2020, arXiv:2004.05150; Jiang et al. 2023, arXiv:2310.06825)
fully masked query row    output 0 (every backend)
========================  ==================================================================
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlatlas.attention.reference import QKVShape, check_cu_seqlens, check_qkv

__all__ = ["BACKENDS", "attend"]

#: Backend names :func:`attend` accepts.
BACKENDS: tuple[str, ...] = ("sdpa", "math", "flash", "flash_triton")


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
           key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
           cu_seqlens: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
           scale: float | None = None, window: int | None = None,
           backend: str = "sdpa") -> Tensor:
    """Scaled dot-product attention through the chosen backend.

    Args:
        q: Queries ``[B, Hq, Nq, D]``.
        k: Keys ``[B, Hk, Nk, D]``.
        v: Values ``[B, Hk, Nk, D]``.
        causal: Bottom-right aligned causal mask (see the module notes).
        key_padding_mask: Bool ``[B, Nk]``, True = attend.
        attn_mask: Bool or float mask broadcastable to ``[B, Hq, Nq, Nk]`` (``"sdpa"`` and
            ``"math"`` only; not with ``cu_seqlens``).
        cu_seqlens: Int ``[S + 1]`` packed-sequence boundaries of the queries (``B == 1``).
        cu_seqlens_k: Key boundaries when they differ from ``cu_seqlens``.
        scale: Score scale; ``1 / sqrt(D)`` when ``None``.
        window: Look-back window ``W >= 1`` (see the module notes; ``"sdpa"`` and ``"math"``
            only); ``None`` = unlimited.
        backend: One of :data:`BACKENDS`.

    Returns:
        ``[B, Hq, Nq, D]`` in ``q``'s dtype.

    Raises:
        TypeError, ValueError: bad shapes, dtypes or masks (named, with what was expected
            and what came), an unknown backend, or an option the backend does not have.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    shp = check_qkv(q, k, v, key_padding_mask, scale)
    cu_q, cu_k = check_cu_seqlens(cu_seqlens, cu_seqlens_k, shp)
    segs = _segments(shp, cu_q, cu_k)
    if attn_mask is not None:
        _check_attn_mask(attn_mask, shp, q)
        if cu_q is not None:
            raise ValueError("attn_mask cannot be combined with cu_seqlens (packed sequences "
                             "are already masked block-diagonally)")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if causal and cu_q is None and shp.seq_q == 1:
        causal = False  # one query after Nk - 1 keys (decoding) sees them all
    if causal and any(qe - qs > ke - ks for qs, qe, ks, ke in segs):
        raise ValueError(f"causal attention needs no more queries than keys (bottom-right "
                         f"aligned), got Nq={shp.seq_q}, Nk={shp.seq_k}")
    if backend in ("flash", "flash_triton"):
        if attn_mask is not None:
            raise ValueError(f"backend {backend!r} takes no attn_mask; use 'sdpa' or 'math'")
        if window is not None:
            raise ValueError(f"backend {backend!r} takes no window; use 'sdpa' or 'math'")
        if causal and any(qe - qs != ke - ks for qs, qe, ks, ke in segs):
            raise ValueError(f"backend {backend!r} computes causal attention for Nq == Nk only "
                             f"(got Nq={shp.seq_q}, Nk={shp.seq_k}); use 'sdpa' or 'math'")
        if backend == "flash":
            from mlatlas.attention.flash import flash_attention as kernel
        else:
            from mlatlas.attention.flash_triton import flash_attention_triton as kernel
        return kernel(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                      cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    forced = sdpa_kernel(SDPBackend.MATH) if backend == "math" else contextlib.nullcontext()
    gqa = shp.group > 1
    with forced:
        if cu_q is None:
            return _sdpa(q, k, v, causal, key_padding_mask, attn_mask, scale, gqa, window)
        # packed sequences: one independent problem per segment (no score across documents)
        return torch.cat([_sdpa(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], causal, None,
                                None, scale, gqa, window) for qs, qe, ks, ke in segs], dim=2)


def _segments(shp: QKVShape, cu_q: Tensor | None,
              cu_k: Tensor | None) -> list[tuple[int, int, int, int]]:
    if cu_q is None:
        return [(0, shp.seq_q, 0, shp.seq_k)]
    a, b = cu_q.tolist(), cu_k.tolist()
    return [(a[i], a[i + 1], b[i], b[i + 1]) for i in range(len(a) - 1)]


def _check_attn_mask(mask: Tensor, shp: QKVShape, q: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise TypeError(f"attn_mask must be bool (True = attend) or q's dtype {q.dtype} "
                        f"(added to the scores), got {mask.dtype}")
    full = (shp.batch, shp.heads_q, shp.seq_q, shp.seq_k)
    if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
        raise ValueError(f"attn_mask must broadcast to [B, Hq, Nq, Nk] = {list(full)}, got "
                         f"shape {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {mask.device}")


def _combine(mask: Tensor | None, allowed: Tensor) -> Tensor:
    """``mask`` restricted to the bool ``allowed`` (float masks get ``-inf`` outside)."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, -math.inf)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor | None,
          attn_mask: Tensor | None, scale: float | None, gqa: bool,
          window: int | None = None) -> Tensor:
    nq, nk = q.shape[2], k.shape[2]
    if nq == 0:  # an empty packed segment
        return q.new_zeros(q.shape[:3] + v.shape[3:])
    mask = attn_mask
    if key_padding_mask is not None:
        mask = _combine(mask, key_padding_mask[:, None, None, :])
    causal = causal and nq > 1  # one query after Nk - 1 keys sees them all (packed too)
    windowed = window is not None and window < nk
    if windowed or (causal and (mask is not None or nq != nk)):
        # query i sits at position p_i = Nk − Nq + i
        rows = torch.arange(nq, device=q.device)[:, None] + (nk - nq)
        cols = torch.arange(nk, device=q.device)[None, :]
        if windowed:  # sliding window: keys j > p_i − W only
            mask = _combine(mask, cols > rows - window)
        if causal:
            mask = _combine(mask, cols <= rows)  # keys j ≤ p_i
            causal = False
    # O = softmax(Q Kᵀ · scale + M) V
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=scale, enable_gqa=gqa)
