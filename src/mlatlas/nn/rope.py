"""Rotary position embedding (RoPE), with Llama 3's frequency scaling.

RoPE encodes position ``m`` by rotating each pair of query/key channels by the angle
``m θ_i``, so that the dot product of a query at ``m`` and a key at ``n`` depends only on
``m - n``. Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv:2104.09864. Llama 3.1 extends the context by dividing the low frequencies by ``factor``,
keeping the high ones and interpolating smoothly in between (Grattafiori et al. 2024, "The
Llama 3 Herd of Models", arXiv:2407.21783; ``rope_type="llama3"`` in Hugging Face).

We use the "rotate-half" channel pairing of Hugging Face/Meta's released weights: channel
``i`` is paired with channel ``i + D/2`` (not ``2i`` with ``2i + 1`` as in the paper).

===============  ===============================================================
``D``            head dimension (even)
``θ_i``          ``base^(-2i/D)``, ``i = 0 … D/2-1`` (``inv_freq``), ``base = rope_theta``
``m``            position id
``cos, sin``     ``cos(m θ)``, ``sin(m θ)`` repeated twice along the last dim ``[..., D]``
``L_orig``       ``original_max_position_embeddings`` (llama3 scaling)
``c_s``          packed sequences: boundaries ``cu_seqlens`` of a flattened token stream
===============  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["LLAMA3_KEYS", "apply_rope", "packed_position_ids", "rope_cos_sin", "rope_inv_freq",
           "rotate_half"]

#: Keys a ``rope_scaling`` dict of type ``"llama3"`` must hold.
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings")


def rope_inv_freq(head_dim: int, theta: float = 10000.0,
                  scaling: Mapping[str, Any] | None = None) -> Tensor:
    """The rotation frequencies ``θ_i`` (float32 ``[D/2]``), optionally llama3-scaled.

    Args:
        head_dim: ``D`` (even).
        theta: The base (``rope_theta``).
        scaling: ``None`` or a dict with ``rope_type``/``type`` ``"llama3"`` and the keys of
            :data:`LLAMA3_KEYS`.

    Raises:
        ValueError: odd ``head_dim``, non-positive ``theta``, unknown scaling type or missing
            scaling keys.
    """
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {theta!r}")
    # eq. (15): θ_i = base^(-2i/D)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float()
                                / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling type must be 'llama3' (or None), got {kind!r}")
    missing = [k for k in LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' needs keys {list(LLAMA3_KEYS)}, "
                         f"missing {missing}")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    if not (factor >= 1 and 0 < low < high):
        raise ValueError(f"rope_scaling needs factor >= 1 and 0 < low_freq_factor < "
                         f"high_freq_factor, got factor={factor}, low={low}, high={high}")
    # Llama 3.1: wavelength λ_i = 2π/θ_i; long waves (λ > L_orig/low) are slowed by `factor`,
    # short waves (λ < L_orig/high) kept, and in between
    #   θ'_i = (1 - s) θ_i / factor + s θ_i,   s = (L_orig/λ_i - low) / (high - low)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``cos(m θ)`` and ``sin(m θ)`` for every position, computed in float32.

    Args:
        position_ids: Integer positions ``[B, T]``.
        inv_freq: ``θ`` ``[D/2]`` from :func:`rope_inv_freq`.
        dtype: Dtype of the returned tables.

    Returns:
        ``(cos, sin)``, each ``[B, T, D]`` (the ``D/2`` angles repeated twice).
    """
    if position_ids.is_floating_point() or position_ids.dim() != 2:
        raise ValueError(f"position_ids must be an integer tensor [B, T], got "
                         f"{position_ids.dtype} {tuple(position_ids.shape)}")
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device).float()  # m θ_i
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def packed_position_ids(cu_seqlens: Tensor) -> Tensor:
    """Position ids that restart at 0 in every packed sequence: ``pos(t) = t - c_{seg(t)}``.

    Args:
        cu_seqlens: Int ``[S + 1]`` boundaries of ``S`` sequences packed into one stream of
            ``N = cu_seqlens[-1]`` tokens (the contract of
            :func:`mlatlas.attention.reference.check_cu_seqlens`; validated there).

    Returns:
        int64 ``[N]``.
    """
    cu = cu_seqlens.long()
    t = torch.arange(int(cu[-1]), device=cu.device)
    seg = torch.searchsorted(cu[1:], t, right=True)  # seg(t) = s with c_s ≤ t < c_{s+1}
    return t - cu[seg]


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] → [-x2, x1]`` along the last dim (the 90° rotation of each channel pair)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys by their positions.

    Args:
        x: ``[B, H, T, D]``.
        cos: ``[B, T, D]`` (or ``[1, T, D]``) from :func:`rope_cos_sin`.
        sin: Same shape as ``cos``.

    Returns:
        ``[B, H, T, D]``: ``x cos + rotate_half(x) sin`` (eq. (34) in rotate-half pairing).
    """
    if cos.shape[-1] != x.shape[-1] or cos.shape[-2] != x.shape[-2]:
        raise ValueError(f"cos/sin must be [B, T={x.shape[-2]}, D={x.shape[-1]}], got "
                         f"{tuple(cos.shape)}")
    h = x.shape[-1] // 2
    # rotate_half(x) ⊙ sin = roll(x, D/2) ⊙ [-sin_{:D/2}, sin_{D/2:}]: one copy of x instead of
    # a negation and a concatenation, and one fused multiply-add (the hot path of every layer)
    sin_signed = torch.cat((-sin[..., :h], sin[..., h:]), dim=-1).unsqueeze(1)
    # eq. (34): R_m x = x ⊙ cos(mθ) + rotate_half(x) ⊙ sin(mθ)
    return torch.addcmul(x * cos.unsqueeze(1), x.roll(h, dims=-1), sin_signed)
