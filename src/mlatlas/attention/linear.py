"""Linear attention: kernelised attention computed in O(N) as a sum, or step by step as an RNN.

Softmax attention weighs value ``j`` for query ``i`` by ``exp(q_i·k_j)``. Replacing that
similarity with a kernel ``φ(q_i)·φ(k_j)`` of a positive feature map lets the sum over keys be
taken once for all queries: ``V'_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / φ(q_i)ᵀ Σ_j φ(k_j)`` costs
``O(N d d_v)`` instead of ``O(N² d)``. With a causal mask the two sums become prefix sums, which
is a recurrent network with a constant-size state ``(S_t, z_t)``: decoding one token costs
``O(d d_v)`` whatever the length. Katharopoulos, Vyas, Pappas, Fleuret 2020, "Transformers
are RNNs: Fast Autoregressive Transformers with Linear Attention", arXiv:2006.16236.

Notation (tensors are ``[batch B, heads H, seq N, head_dim d]``):

=========  ==========================================================================
φ          feature map applied per row; ``elu(x) + 1`` by default (eq. 7 of the paper)
S_t        ``Σ_{j≤t} φ(k_j) v_jᵀ``, the ``[d, d_v]`` key-value state
z_t        ``Σ_{j≤t} φ(k_j)``, the ``[d]`` normaliser state
C          chunk length of the causal form: quadratic inside a chunk, state between chunks
ε          ``eps``, added to the denominator ``φ(q_i)ᵀ z`` against division by zero
=========  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURE_MAPS",
    "HeadProjections",
    "LinearAttention",
    "LinearAttentionState",
    "get_feature_map",
    "linear_attention",
    "linear_attention_features",
    "validate_qkv",
]

FeatureMap = Callable[[Tensor], Tensor]


def _elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0  # eq. (7): φ(x) = elu(x) + 1 > 0


#: Named feature maps; ``"identity"`` is for features computed elsewhere (e.g. Performer).
FEATURE_MAPS: dict[str, FeatureMap] = {
    "elu+1": _elu_plus_one,
    "relu": F.relu,
    "identity": lambda x: x,
}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def get_feature_map(feature_map: str | FeatureMap) -> FeatureMap:
    """Resolve a feature map given by name (one of :data:`FEATURE_MAPS`) or as a callable.

    Raises:
        ValueError: for an unknown name.
        TypeError: for something that is neither a string nor callable.
    """
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, "
                             f"got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map must be a string or a callable, got {type(feature_map).__name__}")


def validate_qkv(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False) -> None:
    """Check ``q [B, H, N, d]``, ``k [B, H, M, d]``, ``v [B, H, M, d_v]`` (same float dtype).

    Raises:
        TypeError: a non-tensor, a non-floating dtype or mixed dtypes.
        ValueError: wrong rank, mismatched batch/heads/head_dim/length, an empty head dim, or
            ``causal`` with ``N != M``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/"
                            f"float64), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], "
                             f"got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError("q, k, v must share [batch, heads], got "
                         f"{tuple(q.shape[:2])}, {tuple(k.shape[:2])}, {tuple(v.shape[:2])}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head_dim must match, got q {q.shape[-1]} and k {k.shape[-1]}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head_dim must be positive, got q/k {q.shape[-1]}, v {v.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got k {k.shape[2]} and "
                         f"v {v.shape[2]}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal linear attention needs as many queries as keys, got "
                         f"q length {q.shape[2]} and k length {k.shape[2]} (decode step by step "
                         "with LinearAttentionState instead)")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Prefix sums over thousands of tokens lose too much in half precision: accumulate in fp32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _safe_den(den: Tensor, eps: float) -> Tensor:
    # eps > 0: added (the paper's ε). eps == 0: no bias, only a guard against an exact 0.
    return den + eps if eps > 0 else den.clamp_min(torch.finfo(den.dtype).tiny)


def linear_attention_features(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool = False,
                              chunk_size: int = 64, normalize: bool = True,
                              eps: float = 1e-6) -> Tensor:
    """Linear attention on already-mapped features ``φ(Q)``, ``φ(K)``.

    Args:
        phi_q: ``[B, H, N, F]`` query features.
        phi_k: ``[B, H, M, F]`` key features.
        v: ``[B, H, M, d_v]`` values.
        causal: Query ``i`` sees keys ``j ≤ i`` only (needs ``N == M``).
        chunk_size: ``C`` of the causal form; the ``N × N`` matrix is never built, only
            ``C × C`` blocks.
        normalize: Divide by ``φ(q_i)ᵀ z`` (True, eq. 4/10) or return the raw sum (False, the
            TransNormer NormAttention numerator).
        eps: Added to the denominator; ``0`` adds nothing and only clamps an exact zero to
            the smallest normal float (for stabilised features whose scale is arbitrary).

    Returns:
        ``[B, H, N, d_v]`` in the dtype of ``v``.
    """
    validate_qkv(phi_q, phi_k, v, causal=causal)
    _check_positive_int("chunk_size", chunk_size)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out_dtype = v.dtype
    cd = _compute_dtype(out_dtype)
    phi_q, phi_k, v = phi_q.to(cd), phi_k.to(cd), v.to(cd)
    if not causal:
        kv = torch.einsum("bhmf,bhme->bhfe", phi_k, v)  # eq. (4)-(5): S = Σ_j φ(k_j) v_jᵀ
        num = torch.einsum("bhnf,bhfe->bhne", phi_q, kv)  # φ(q_i)ᵀ S
        if not normalize:
            return num.to(out_dtype)
        z = phi_k.sum(dim=2)  # z = Σ_j φ(k_j)
        den = torch.einsum("bhnf,bhf->bhn", phi_q, z)  # φ(q_i)ᵀ z
        return (num / _safe_den(den, eps).unsqueeze(-1)).to(out_dtype)
    return _causal_chunked(phi_q, phi_k, v, chunk_size, normalize, eps).to(out_dtype)


def _causal_chunked(phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk: int, normalize: bool,
                    eps: float) -> Tensor:
    """Causal prefix sums (eq. 9-10) chunk by chunk, all chunks at once."""
    b, h, n, f = phi_q.shape
    e = v.shape[-1]
    chunk = min(chunk, n) if n > 0 else 1
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    if pad:  # zero key features contribute nothing to any sum
        phi_q = F.pad(phi_q, (0, 0, 0, pad))
        phi_k = F.pad(phi_k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    qc = phi_q.reshape(b, h, n_chunks, chunk, f)
    kc = phi_k.reshape(b, h, n_chunks, chunk, f)
    vc = v.reshape(b, h, n_chunks, chunk, e)
    # State entering chunk c: S_{<c} = Σ_{chunks c' < c} Σ_j φ(k_j) v_jᵀ (exclusive cumsum).
    kv_chunk = torch.einsum("bhcjf,bhcje->bhcfe", kc, vc)
    kv_prev = torch.cumsum(kv_chunk, dim=2) - kv_chunk
    # Inside a chunk: the C × C lower-triangular block of φ(Q)φ(K)ᵀ, eq. (9) within the block.
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).tril()
    scores = torch.einsum("bhcif,bhcjf->bhcij", qc, kc).masked_fill(~mask, 0.0)
    num = torch.einsum("bhcij,bhcje->bhcie", scores, vc)
    num = num + torch.einsum("bhcif,bhcfe->bhcie", qc, kv_prev)
    if normalize:
        z_chunk = kc.sum(dim=3)
        z_prev = torch.cumsum(z_chunk, dim=2) - z_chunk
        den = scores.sum(dim=-1) + torch.einsum("bhcif,bhcf->bhci", qc, z_prev)  # φ(q_i)ᵀ z_i
        num = num / _safe_den(den, eps).unsqueeze(-1)  # eq. (10)
    return num.reshape(b, h, n_chunks * chunk, e)[:, :, :n]


def linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                     feature_map: str | FeatureMap = "elu+1", chunk_size: int = 64,
                     eps: float = 1e-6) -> Tensor:
    """Kernelised attention ``φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)`` in linear time.

    Non-causal: ``O(N d d_v)``. Causal: chunked prefix sums, ``O(N C d + N d d_v)`` time and
    never an ``N × N`` matrix. There is no ``1/√d`` scale: it would cancel in the ratio only
    for homogeneous maps, and the paper applies φ to the raw projections.

    Args:
        q: ``[B, H, N, d]`` queries.
        k: ``[B, H, M, d]`` keys.
        v: ``[B, H, M, d_v]`` values.
        causal: Mask keys after the query (needs ``N == M``).
        feature_map: A name of :data:`FEATURE_MAPS` or a callable applied to the last dim.
        chunk_size: Chunk length ``C`` of the causal form (positive).
        eps: Added to the denominator.

    Returns:
        ``[B, H, N, d_v]``, dtype of ``q``.

    Raises:
        TypeError, ValueError: see :func:`validate_qkv`, :func:`get_feature_map`.
    """
    validate_qkv(q, k, v, causal=causal)
    phi = get_feature_map(feature_map)
    return linear_attention_features(phi(q), phi(k), v, causal=causal, chunk_size=chunk_size,
                                     eps=eps)


@dataclass
class LinearAttentionState:
    """Recurrent state of causal linear attention: constant memory per decoded token.

    ``step`` applies eq. (9)-(10) once: ``S ← S + φ(k) vᵀ``, ``z ← z + φ(k)``,
    ``out = φ(q)ᵀ S / (φ(q)ᵀ z + ε)``. Feeding a sequence token by token gives exactly the
    rows of ``linear_attention(..., causal=True)``.

    Attributes:
        kv: ``[B, H, d, d_v]`` the state ``S``.
        z: ``[B, H, d]`` the normaliser state.
        feature_map: As in :func:`linear_attention`.
        eps: Added to the denominator.
        steps: Tokens consumed so far.
    """

    kv: Tensor
    z: Tensor
    feature_map: str | FeatureMap = "elu+1"
    eps: float = 1e-6
    steps: int = 0

    @classmethod
    def zeros(cls, batch: int, heads: int, head_dim: int, value_dim: int, *,
              feature_map: str | FeatureMap = "elu+1", eps: float = 1e-6,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> LinearAttentionState:
        """An empty state (no tokens seen)."""
        for name, val in (("batch", batch), ("heads", heads), ("head_dim", head_dim),
                          ("value_dim", value_dim)):
            _check_positive_int(name, val)
        get_feature_map(feature_map)
        cd = _compute_dtype(dtype)
        return cls(torch.zeros(batch, heads, head_dim, value_dim, dtype=cd, device=device),
                   torch.zeros(batch, heads, head_dim, dtype=cd, device=device),
                   feature_map, eps)

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Consume one token and return its output.

        Args:
            q: ``[B, H, d]`` query of the new token.
            k: ``[B, H, d]`` its key.
            v: ``[B, H, d_v]`` its value.

        Returns:
            ``[B, H, d_v]``, dtype of ``q``.
        """
        for name, t, want in (("q", q, self.z.shape), ("k", k, self.z.shape),
                              ("v", v, (*self.kv.shape[:2], self.kv.shape[-1]))):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
            if tuple(t.shape) != tuple(want):
                raise ValueError(f"{name} must have shape {tuple(want)} [batch, heads, dim], "
                                 f"got {tuple(t.shape)}")
        phi = get_feature_map(self.feature_map)
        cd = self.kv.dtype
        fq, fk = phi(q.to(cd)), phi(k.to(cd))
        # Out-of-place updates: constant memory, and autograd can still flow through them.
        self.kv = self.kv + fk.unsqueeze(-1) * v.to(cd).unsqueeze(-2)  # eq. (9): S_i
        self.z = self.z + fk  # z_i
        num = torch.einsum("bhf,bhfe->bhe", fq, self.kv)
        den = torch.einsum("bhf,bhf->bh", fq, self.z)
        self.steps += 1
        return (num / _safe_den(den, self.eps).unsqueeze(-1)).to(q.dtype)  # eq. (10)


class HeadProjections(nn.Module):
    """Base of the multi-head layers: one fused q/k/v projection, the head split and merge.

    Args:
        d_model: Model width.
        n_heads: Heads; must divide ``d_model``.

    Attributes:
        qkv: ``nn.Linear(d_model, 3 d_model)``.
        out: ``nn.Linear(d_model, d_model)``.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model, got d_model={d_model}, "
                             f"n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, d_model] → q, k, v`` each ``[B, H, N, d_model / H]``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    @staticmethod
    def merge_heads(o: Tensor) -> Tensor:
        """``[B, H, N, E] → [B, N, H E]``."""
        b, h, n, e = o.shape
        return o.transpose(1, 2).reshape(b, n, h * e)


class LinearAttention(HeadProjections):
    """Multi-head linear-attention layer: projections, :func:`linear_attention`, output.

    Args:
        d_model: Model width.
        n_heads: Heads; must divide ``d_model``.
        causal: Causal masking.
        feature_map: As in :func:`linear_attention`.
        chunk_size: Causal chunk length.

    Shape:
        ``x [B, N, d_model] → [B, N, d_model]``.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False,
                 feature_map: str | FeatureMap = "elu+1", chunk_size: int = 64):
        super().__init__(d_model, n_heads)
        get_feature_map(feature_map)
        self.causal, self.chunk_size = causal, chunk_size
        self.feature_map = feature_map

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split_heads(x)
        o = linear_attention(q, k, v, causal=self.causal, feature_map=self.feature_map,
                             chunk_size=self.chunk_size)
        return self.out(self.merge_heads(o))
