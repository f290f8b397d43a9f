"""TransNormer: NormAttention in the higher layers, DiagAttention in the lower layers.

Qin et al. trace the gap between linear and softmax transformers to two causes: the scaling
denominator ``φ(q_i)ᵀ Σ_j φ(k_j)`` of linear attention makes its gradients unbounded, and
its attention spreads over the whole sequence instead of concentrating near the token
("attention dilution"). NormAttention drops the denominator and normalises the output
instead, ``O = Norm(φ(Q) (φ(K)ᵀ V))``; DiagAttention restricts softmax attention to
non-overlapping blocks, which is linear in N for a fixed block size and local by
construction. TransNormer uses DiagAttention in the first half of the layers and
NormAttention in the second. Qin, Han, Sun, Li, Kong, Barnes, Zhong 2022, "The Devil in
Linear Transformer", EMNLP 2022, arXiv:2210.10340.

Notation (tensors are ``[batch B, heads H, seq N, head_dim d]``):

=========  ==========================================================================
φ          kernel feature map of NormAttention, ``elu(x) + 1`` by default
b          ``block_size`` of DiagAttention; the last block may be shorter
Norm       RMSNorm (default) or LayerNorm over the concatenated heads
s          softmax scale of DiagAttention, ``1/√d`` by default
=========  ==========================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.attention.linear import (
    FeatureMap,
    HeadProjections,
    LinearAttention,
    get_feature_map,
    linear_attention_features,
    validate_qkv,
)

__all__ = [
    "DiagAttention",
    "NormAttention",
    "TransNormer",
    "TransNormerBlock",
    "diag_attention",
    "norm_attention",
]

_NORMS = ("rmsnorm", "layernorm")
_KINDS = ("diag", "norm", "linear")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def _diag_probs(q: Tensor, k: Tensor, block_size: int, causal: bool, scale: float | None
                ) -> tuple[Tensor, int]:
    """Softmax weights inside blocks: ``[B, H, n_blocks, b, b]`` and the padding added."""
    validate_qkv(q, k, k, causal=True)  # DiagAttention is self-attention: N == M
    _check_positive_int("block_size", block_size)
    n, d = q.shape[2], q.shape[3]
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bs = max(1, min(block_size, n))
    nb = -(-n // bs)
    pad = nb * bs - n
    if pad:
        q, k = F.pad(q, (0, 0, 0, pad)), F.pad(k, (0, 0, 0, pad))
    qb = q.reshape(*q.shape[:2], nb, bs, d)
    kb = k.reshape(*k.shape[:2], nb, bs, d)
    scores = torch.einsum("bhcid,bhcjd->bhcij", qb, kb) * s  # s · q_i·k_j within block c
    pos = torch.arange(nb * bs, device=q.device).view(nb, 1, bs)
    masked = pos >= n  # padded keys of the last block
    if causal:
        masked = masked | torch.ones(bs, bs, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(masked, float("-inf"))
    return torch.softmax(scores, dim=-1), pad


def diag_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, *, causal: bool = False,
                   scale: float | None = None) -> Tensor:
    """DiagAttention: softmax attention restricted to non-overlapping blocks.

    Token ``i`` attends to the tokens of its own block ``⌊i/b⌋`` only (and, when ``causal``,
    only to those up to ``i``): ``O = blockdiag(softmax(s · Q_c K_cᵀ)) V``. Equals softmax
    attention with a block-diagonal mask; ``O(N b d)`` time.

    Args:
        q: ``[B, H, N, d]``.
        k: ``[B, H, N, d]``.
        v: ``[B, H, N, d_v]``.
        block_size: ``b > 0``; ``N`` need not be a multiple (the last block is shorter).
        causal: Causal mask inside the blocks.
        scale: Softmax scale; ``1/√d`` by default.

    Returns:
        ``[B, H, N, d_v]``.
    """
    validate_qkv(q, k, v, causal=True)
    n = q.shape[2]
    probs, pad = _diag_probs(q, k, block_size, causal, scale)
    nb, bs = probs.shape[2], probs.shape[3]
    if pad:
        v = F.pad(v, (0, 0, 0, pad))
    vb = v.reshape(*v.shape[:2], nb, bs, v.shape[-1])
    out = torch.einsum("bhcij,bhcje->bhcie", probs, vb)
    return out.reshape(*v.shape[:2], nb * bs, v.shape[-1])[:, :, :n]


def norm_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   feature_map: str | FeatureMap = "elu+1", chunk_size: int = 64) -> Tensor:
    """The NormAttention numerator ``φ(Q) (φ(K)ᵀ V)``: linear attention with no denominator.

    :class:`NormAttention` normalises this over the concatenated heads; the function leaves
    that to the caller so that any norm can follow.

    Args:
        q: ``[B, H, N, d]``.
        k: ``[B, H, M, d]``.
        v: ``[B, H, M, d_v]``.
        causal: Prefix sums (needs ``N == M``), chunked as in linear attention.
        feature_map: Name of a map in ``mlatlas.attention.linear.FEATURE_MAPS`` or a callable.
        chunk_size: Causal chunk length.

    Returns:
        ``[B, H, N, d_v]`` (unnormalised).
    """
    validate_qkv(q, k, v, causal=causal)
    phi = get_feature_map(feature_map)
    return linear_attention_features(phi(q), phi(k), v, causal=causal, chunk_size=chunk_size,
                                     normalize=False)  # eq. NormAttention: Q(KᵀV), no 1/Σ


def _make_norm(norm: str, dim: int) -> nn.Module:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    return nn.RMSNorm(dim, eps=1e-6) if norm == "rmsnorm" else nn.LayerNorm(dim)


class DiagAttention(HeadProjections):
    """Multi-head DiagAttention layer (block-local softmax), for the lower layers.

    Shape: ``x [B, N, d_model] → [B, N, d_model]``.
    """

    def __init__(self, d_model: int, n_heads: int, block_size: int = 64, *,
                 causal: bool = False):
        super().__init__(d_model, n_heads)
        _check_positive_int("block_size", block_size)
        self.block_size, self.causal = block_size, causal

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split_heads(x)
        o = diag_attention(q, k, v, self.block_size, causal=self.causal)
        return self.out(self.merge_heads(o))

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """The ``[B, H, N, N]`` attention matrix (rows sum to 1; zero outside the blocks)."""
        q, k, _ = self.split_heads(x)
        n = q.shape[2]
        probs, _ = _diag_probs(q, k, self.block_size, self.causal, None)
        return _blocks_to_dense(probs)[..., :n, :n]


def _blocks_to_dense(probs: Tensor) -> Tensor:
    b, h, nb, bs, _ = probs.shape
    dense = probs.new_zeros(b, h, nb * bs, nb * bs)
    for c in range(nb):
        dense[:, :, c * bs:(c + 1) * bs, c * bs:(c + 1) * bs] = probs[:, :, c]
    return dense


class NormAttention(HeadProjections):
    """Multi-head NormAttention layer, for the higher layers.

    ``O = W_o · Norm(concat_h φ(Q_h) (φ(K_h)ᵀ V_h))``: linear attention without the scaling
    denominator, followed by RMSNorm (or LayerNorm) of the concatenated heads.

    Args:
        d_model: Model width.
        n_heads: Heads; must divide ``d_model``.
        causal: Causal prefix sums.
        feature_map: Kernel map φ.
        norm: ``"rmsnorm"`` or ``"layernorm"``.
        chunk_size: Causal chunk length.

    Shape: ``x [B, N, d_model] → [B, N, d_model]``.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False,
                 feature_map: str | FeatureMap = "elu+1", norm: str = "rmsnorm",
                 chunk_size: int = 64):
        super().__init__(d_model, n_heads)
        get_feature_map(feature_map)
        self.causal, self.feature_map, self.chunk_size = causal, feature_map, chunk_size
        self.norm = _make_norm(norm, d_model)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split_heads(x)
        o = norm_attention(q, k, v, causal=self.causal, feature_map=self.feature_map,
                           chunk_size=self.chunk_size)
        return self.out(self.norm(self.merge_heads(o)))  # O = Norm(Q(KᵀV))

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """Share of each key in ``φ(q_i)ᵀφ(k_j)`` per query: ``[B, H, N, N]``, rows sum to 1."""
        return _kernel_weights(self.split_heads(x), self.feature_map, self.causal)


def _kernel_weights(qkv: tuple[Tensor, Tensor, Tensor], feature_map: str | FeatureMap,
                    causal: bool) -> Tensor:
    phi = get_feature_map(feature_map)
    s = phi(qkv[0]) @ phi(qkv[1]).transpose(-1, -2)
    if causal:
        s = s.tril()
    return s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def _linear_attention_weights(layer: LinearAttention, x: Tensor) -> Tensor:
    with torch.no_grad():
        return _kernel_weights(layer.split_heads(x), layer.feature_map, layer.causal)


class TransNormerBlock(nn.Module):
    """Pre-norm residual block: token mixer (Diag/Norm/vanilla linear attention) + SGLU.

    ``x ← x + Mixer(Norm(x))``, ``x ← x + W_3((W_1 Norm(x)) ⊙ (W_2 Norm(x)))`` (a GLU channel
    mixer without activation).

    Args:
        d_model: Model width.
        n_heads: Heads.
        attention: ``"diag"``, ``"norm"`` or ``"linear"`` (vanilla linear attention, the
            baseline of the paper's analysis).
        block_size: DiagAttention block size.
        causal: Causal token mixing.
        feature_map: φ of NormAttention / linear attention.
        norm: ``"rmsnorm"`` or ``"layernorm"`` (block norms and NormAttention's norm).
        ffn_mult: Hidden width of the channel mixer, in multiples of ``d_model``.

    Shape: ``x [B, N, d_model] → [B, N, d_model]``.
    """

    def __init__(self, d_model: int, n_heads: int, attention: str = "norm", *,
                 block_size: int = 64, causal: bool = False,
                 feature_map: str | FeatureMap = "elu+1", norm: str = "rmsnorm",
                 ffn_mult: int = 2):
        super().__init__()
        if attention not in _KINDS:
            raise ValueError(f"attention must be one of {_KINDS}, got {attention!r}")
        _check_positive_int("ffn_mult", ffn_mult)
        self.kind = attention
        self.norm1, self.norm2 = _make_norm(norm, d_model), _make_norm(norm, d_model)
        if attention == "diag":
            self.mixer: nn.Module = DiagAttention(d_model, n_heads, block_size, causal=causal)
        elif attention == "norm":
            self.mixer = NormAttention(d_model, n_heads, causal=causal, feature_map=feature_map,
                                       norm=norm)
        else:
            self.mixer = LinearAttention(d_model, n_heads, causal=causal,
                                         feature_map=feature_map)
        hidden = ffn_mult * d_model
        self.w1, self.w2 = nn.Linear(d_model, hidden), nn.Linear(d_model, hidden)
        self.w3 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        h = self.norm2(x)
        return x + self.w3(self.w1(h) * self.w2(h))  # SGLU channel mixer

    def attention_weights(self, x: Tensor) -> Tensor:
        """``[B, H, N, N]`` attention shares of this block's mixer for input ``x``."""
        h = self.norm1(x)
        if isinstance(self.mixer, LinearAttention):
            return _linear_attention_weights(self.mixer, h)
        return self.mixer.attention_weights(h)


class TransNormer(nn.Module):
    """A stack of :class:`TransNormerBlock`: DiagAttention below, NormAttention above.

    Args:
        d_model: Model width.
        n_heads: Heads.
        n_layers: Number of blocks; the first ``n_layers // 2`` use DiagAttention.
        layer_types: Override the per-layer mixers (e.g. ``["linear"] * 4`` for the vanilla
            linear-attention baseline); length ``n_layers``.
        **block_kwargs: Passed to every block (``block_size``, ``causal``, ``norm`` …).

    Shape: ``x [B, N, d_model] → [B, N, d_model]`` (final norm applied).
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int, *,
                 layer_types: list[str] | None = None, **block_kwargs):
        super().__init__()
        _check_positive_int("n_layers", n_layers)
        if layer_types is None:
            layer_types = ["diag"] * (n_layers // 2) + ["norm"] * (n_layers - n_layers // 2)
        if len(layer_types) != n_layers:
            raise ValueError(f"layer_types must have n_layers={n_layers} entries, got "
                             f"{len(layer_types)}")
        self.layer_types = list(layer_types)
        self.blocks = nn.ModuleList(TransNormerBlock(d_model, n_heads, kind, **block_kwargs)
                                    for kind in layer_types)
        self.norm = _make_norm(block_kwargs.get("norm", "rmsnorm"), d_model)

    def forward(self, x: Tensor, *, return_attention: bool = False):
        """Run the stack; with ``return_attention`` also each block's ``[B, H, N, N]`` shares."""
        maps = []
        for block in self.blocks:
            if return_attention:
                maps.append(block.attention_weights(x))
            x = block(x)
        x = self.norm(x)
        return (x, maps) if return_attention else x
