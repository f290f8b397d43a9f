"""Performer (FAVOR+): softmax attention approximated by positive orthogonal random features.

The softmax kernel is an expectation over Gaussian vectors ``w ~ N(0, I_d)``:
``exp(q·k) = E_w[exp(w·q − |q|²/2) · exp(w·k − |k|²/2)]``. Sampling ``m`` such ``w`` gives a
positive feature map ``φ(x) = exp(Wx − |x|²/2) / √m`` whose dot products estimate the kernel
without bias, so softmax attention becomes linear attention on ``φ(Q), φ(K)`` — ``O(N m d)``
time. Drawing the ``w`` in blocks of mutually orthogonal vectors (with the norms of Gaussian
vectors) keeps the estimate unbiased and lowers its variance. Choromanski, Likhosherstov,
Dohan, Song, Gane, Sarlos, Hawkins, Davis, Mohiuddin, Kaiser, Belanger, Colwell, Weller 2021,
"Rethinking Attention with Performers", arXiv:2009.14794.

Notation (tensors are ``[batch B, heads H, seq N, head_dim d]``):

=========  ==========================================================================
m          number of random features (``n_features``)
W          ``[m, d]`` projection; rows ``w_r`` marginally ``N(0, I_d)``
φ(x)       ``exp(W x − |x|²/2 − c) / √m``: positive random features (Lemma 1)
c          stabiliser: a per-query / per-(batch, head) key constant that cancels in the ratio
s          softmax scale ``1/√d``; ``x ← x · s^{1/2}`` so that ``q·k`` carries ``s``
=========  ==========================================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mlatlas.attention.linear import linear_attention_features, validate_qkv

__all__ = [
    "FavorAttention",
    "favor_attention",
    "gaussian_projection",
    "positive_random_features",
]


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def gaussian_projection(n_features: int, dim: int, *, orthogonal: bool = True,
                        generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Tensor:
    """Draw the ``[m, d]`` random projection ``W`` of FAVOR+.

    Orthogonal (Sec. 2.4): ``⌈m/d⌉`` independent blocks of ``d`` orthonormal rows (QR of a
    Gaussian matrix, sign-corrected so the block is Haar-distributed), each row rescaled by
    the norm of an independent ``N(0, I_d)`` vector (chi-distributed with ``d`` degrees of
    freedom); the last block is truncated. Every row is then marginally ``N(0, I_d)``, which
    keeps the kernel estimate unbiased, while rows inside a block are exactly orthogonal.

    Args:
        n_features: ``m > 0``.
        dim: ``d > 0``.
        orthogonal: Orthogonal blocks (True) or i.i.d. Gaussian rows (False).
        generator: Source of randomness (``torch.Generator`` on CPU); global RNG when None.
        dtype: Output dtype (drawn in float64, then cast).
        device: Output device.

    Returns:
        ``[n_features, dim]``.
    """
    _check_positive_int("n_features", n_features)
    _check_positive_int("dim", dim)
    if not orthogonal:
        w = torch.randn(n_features, dim, generator=generator, dtype=torch.float64)
        return w.to(dtype=dtype, device=device)
    n_blocks = -(-n_features // dim)
    g = torch.randn(n_blocks, dim, dim, generator=generator, dtype=torch.float64)
    qmat, rmat = torch.linalg.qr(g)  # one batched QR: n_blocks independent orthogonal blocks
    signs = torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1))
    qmat = qmat * signs.unsqueeze(-2)  # Haar: fix the QR signs (column j times sign R_jj)
    w = qmat.transpose(-1, -2).reshape(n_blocks * dim, dim)[:n_features]  # rows orthonormal
    norms = torch.randn(n_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms.unsqueeze(1)).to(dtype=dtype, device=device)  # |w_r| ~ chi_d


def positive_random_features(x: Tensor, projection: Tensor, *, is_query: bool,
                             stabilize: bool = True) -> Tensor:
    """FAVOR+ positive features ``φ(x) = exp(W x − |x|²/2 − c) / √m`` (Lemma 1).

    Without stabilisation (``c = 0``), ``E_W[φ(q)·φ(k)] = exp(q·k)`` exactly. With it, ``c``
    is the max of ``W x`` over features for each query, and over all positions and features
    of a ``(batch, head)`` for keys: constants that cancel between the numerator and the
    denominator of attention, so attention is unchanged while ``exp`` never overflows.

    Args:
        x: ``[..., N, d]`` (already scaled: softmax's ``1/√d`` split as ``d^{-1/4}`` on each
            side).
        projection: ``[m, d]`` from :func:`gaussian_projection`.
        is_query: Selects the stabiliser (per row for queries, shared for keys).
        stabilize: Subtract ``c`` (True) or not (False, for the unbiased kernel estimate).

    Returns:
        ``[..., N, m]`` non-negative features.
    """
    if not isinstance(projection, Tensor) or projection.dim() != 2:
        raise ValueError("projection must be a 2-D tensor [n_features, head_dim], got "
                         f"{getattr(projection, 'shape', type(projection).__name__)}")
    if projection.shape[1] != x.shape[-1]:
        raise ValueError(f"projection must have head_dim {x.shape[-1]} columns, got "
                         f"shape {tuple(projection.shape)}")
    if projection.dtype != x.dtype:
        raise TypeError(f"projection dtype must match x ({x.dtype}), got {projection.dtype}")
    m = projection.shape[0]
    wx = x @ projection.T  # [..., N, m]: w_r · x
    sq = 0.5 * (x * x).sum(dim=-1, keepdim=True)  # |x|² / 2
    logits = wx - sq
    if stabilize:
        if is_query:
            c = wx.amax(dim=-1, keepdim=True)
        else:
            c = wx.amax(dim=(-1, -2), keepdim=True)
        logits = logits - c.detach()  # constant cancels in the attention ratio
    return torch.exp(logits) / math.sqrt(m)  # Lemma 1: exp(w·x − |x|²/2) / √m


def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *,
                    causal: bool = False, scale: float | None = None, chunk_size: int = 64,
                    eps: float = 0.0) -> Tensor:
    """FAVOR+ attention: ≈ ``softmax(s · Q Kᵀ) V`` in ``O(N m d)``.

    Args:
        q: ``[B, H, N, d]``.
        k: ``[B, H, M, d]``.
        v: ``[B, H, M, d_v]``.
        projection: ``[m, d]`` random projection (shared by all heads).
        causal: Prefix sums (chunked) instead of global sums; needs ``N == M``.
        scale: Softmax scale ``s``; ``1/√d`` by default.
        chunk_size: Chunk length of the causal prefix sums.
        eps: Added to the denominator. Default 0: the stabilised features have an arbitrary
            common scale, so any fixed ε would bias some inputs; an exact zero is still
            guarded (see :func:`~mlatlas.attention.linear.linear_attention_features`).

    Note:
        The key stabiliser is one constant per ``(batch, head)`` taken over all keys, as in
        the paper. It cancels exactly, so causal outputs do not depend on future keys in exact
        arithmetic; in floating point a much larger future key can shift the rounding of
        earlier outputs (relative ~1e-6 in fp32).

    Returns:
        ``[B, H, N, d_v]``.
    """
    validate_qkv(q, k, v, causal=causal)
    d = q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if s <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = s ** 0.5  # q·k·s = (q √s)·(k √s)
    phi_q = positive_random_features(q * root, projection, is_query=True)
    phi_k = positive_random_features(k * root, projection, is_query=False)
    return linear_attention_features(phi_q, phi_k, v, causal=causal, chunk_size=chunk_size,
                                     eps=eps)


class FavorAttention(nn.Module):
    """Multi-head Performer attention layer with feature redrawing.

    The projection is a buffer shared by the heads. In training mode a fresh projection is
    drawn every ``redraw_interval`` forward calls (the paper's feature redrawing, which keeps
    one unlucky draw from persisting); in eval mode it stays fixed.

    Args:
        d_model: Model width.
        n_heads: Heads; must divide ``d_model``.
        n_features: Random features ``m`` per head.
        causal: Causal attention.
        orthogonal: Orthogonal (FAVOR+) or i.i.d. features.
        redraw_interval: Redraw every this many training forwards; ``None`` never.
        seed: Seed of the module's own generator (redraws are reproducible).

    Shape:
        ``x [B, N, d_model] → [B, N, d_model]``.
    """

    def __init__(self, d_model: int, n_heads: int, n_features: int = 64, *,
                 causal: bool = False, orthogonal: bool = True,
                 redraw_interval: int | None = 1000, seed: int = 0):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        _check_positive_int("n_features", n_features)
        if redraw_interval is not None:
            _check_positive_int("redraw_interval", redraw_interval)
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model, got d_model={d_model}, "
                             f"n_heads={n_heads}")
        self.n_heads, self.n_features, self.causal = n_heads, n_features, causal
        self.orthogonal, self.redraw_interval = orthogonal, redraw_interval
        self.generator = torch.Generator().manual_seed(seed)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.register_buffer("projection", torch.empty(n_features, d_model // n_heads))
        self.calls = 0
        self.redraw_features()

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a new projection ``W`` from the module's generator."""
        w = gaussian_projection(self.n_features, self.projection.shape[1],
                                orthogonal=self.orthogonal, generator=self.generator)
        self.projection.copy_(w)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if self.redraw_interval is not None and self.calls and \
                    self.calls % self.redraw_interval == 0:
                self.redraw_features()
            self.calls += 1
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        o = favor_attention(q, k, v, self.projection.to(x.dtype), causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(x.shape))
