"""Rotary position embedding (RoPE) and the frequency scalings that extend its context.

RoPE encodes position ``m`` by rotating each pair of query/key channels by the angle
``m θ_i``, so that the dot product of a query at ``m`` and a key at ``n`` depends only on
``m - n``. Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv:2104.09864. A model trained on ``L_orig`` positions is stretched to longer inputs by
changing the frequencies (Hugging Face's ``rope_type``):

* ``linear`` — position interpolation, ``θ_i / s`` (Chen et al. 2023, arXiv:2306.15595);
* ``dynamic`` — "dynamic NTK": beyond ``L_max`` the base grows with the input length ``L``,
  ``base' = base · (s L / L_max − (s − 1))^{D/(D−2)}`` (bloc97/emozilla 2023, no paper);
* ``yarn`` — NTK-by-parts: a ramp between interpolated and original frequencies by their
  number of rotations in ``L_orig``, plus an attention temperature ``0.1 ln s + 1`` applied to
  cos/sin (Peng et al. 2023, "YaRN", arXiv:2309.00071);
* ``longrope`` — a factor per frequency, one list for inputs up to ``L_orig`` and one beyond,
  attention factor ``sqrt(1 + ln s / ln L_orig)`` (Ding et al. 2024, "LongRoPE",
  arXiv:2402.13753);
* ``llama3`` — long wavelengths divided by ``s``, short ones kept, smooth in between
  (Grattafiori et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783).

We use the "rotate-half" channel pairing of Hugging Face/Meta's released weights: channel
``i`` is paired with channel ``i + D/2`` (not ``2i`` with ``2i + 1`` as in the paper).
Frequencies are computed in float32 exactly as transformers computes them, so logits match.

===============  ===============================================================
``D``            head dimension (even)
``θ_i``          ``base^(-2i/D)``, ``i = 0 … D/2-1`` (``inv_freq``), ``base = rope_theta``
``m``            position id
``cos, sin``     ``cos(m θ)``, ``sin(m θ)`` repeated twice along the last dim ``[..., D]``
``s``            scaling ``factor``
``L_orig``       ``original_max_position_embeddings`` (llama3, yarn, longrope)
``L_max``        the model's ``max_position_embeddings``;  ``L`` = longest position + 1
``c_s``          packed sequences: boundaries ``cu_seqlens`` of a flattened token stream
===============  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["LLAMA3_KEYS", "ROPE_TYPES", "apply_rope", "check_rope_scaling",
           "packed_position_ids", "rope_attention_factor", "rope_cos_sin", "rope_inv_freq",
           "rotate_half"]

#: Keys a ``rope_scaling`` dict of type ``"llama3"`` must hold.
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings")

#: Hugging Face ``rope_type`` values we compute (what transformers applies to Llama).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")

_KEYS = {  # rope_type → (required keys, optional keys)
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "truncate")),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"),
                 ("factor", "attention_factor")),
    "llama3": (LLAMA3_KEYS, ()),
}
_WITH_ORIGINAL = ("yarn", "longrope", "llama3")


def check_rope_scaling(scaling: Mapping[str, Any] | None, head_dim: int,
                       max_position_embeddings: int | None = None) -> dict[str, Any] | None:
    """Validate a ``rope_scaling`` dict; return it normalised (or ``None`` for plain RoPE).

    Normalised: ``"type"`` (the oldest spelling) becomes ``"rope_type"``; a missing
    ``original_max_position_embeddings`` of llama3/yarn/longrope defaults to
    ``max_position_embeddings``, as transformers does; a ``partial_rotary_factor`` of 1 is
    dropped.

    Raises:
        ValueError: an unknown ``rope_type``, a missing or unknown key, a value out of range,
            or a ``partial_rotary_factor`` other than 1 — each named.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    out = {k: v for k, v in scaling.items() if k != "type"}
    kind = out.setdefault("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type must be one of {ROPE_TYPES}, got {kind!r}")
    if out.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_scaling: partial_rotary_factor={scaling['partial_rotary_factor']}"
                         " is not supported (the Llama family rotates the whole head)")
    if kind == "default":
        return None if set(out) == {"rope_type"} else _unknown(out, kind, ())
    required, optional = _KEYS[kind]
    if kind in _WITH_ORIGINAL and max_position_embeddings is not None:
        out.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in required if k not in out]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs keys {list(required)}, missing "
                         f"{missing}")
    _unknown(out, kind, required + optional)
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(out[key]) != head_dim // 2:
                raise ValueError(f"rope_scaling {key} must hold head_dim/2 = {head_dim // 2} "
                                 f"factors, got {len(out[key])}")
    factor = out.get("factor")
    if factor is not None and not factor > 0 or kind != "longrope" and factor is None:
        raise ValueError(f"rope_scaling factor must be > 0, got {factor!r}")
    if kind == "llama3":
        low, high = float(out["low_freq_factor"]), float(out["high_freq_factor"])
        if not (factor >= 1 and 0 < low < high):
            raise ValueError(f"rope_scaling needs factor >= 1 and 0 < low_freq_factor < "
                             f"high_freq_factor, got factor={factor}, low={low}, high={high}")
    if kind == "dynamic" and max_position_embeddings is None:
        raise ValueError("rope_scaling of type 'dynamic' needs max_position_embeddings")
    return out


def _unknown(out: dict[str, Any], kind: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    extra = sorted(set(out) - set(allowed) - {"rope_type"})
    if extra:
        raise ValueError(f"rope_scaling of type {kind!r}: unsupported keys {extra}")
    return out


def rope_inv_freq(head_dim: int, theta: float = 10000.0,
                  scaling: Mapping[str, Any] | None = None, *,
                  max_position_embeddings: int | None = None,
                  seq_len: int | None = None) -> Tensor:
    """The rotation frequencies ``θ_i`` (float32 ``[D/2]``) of plain or scaled RoPE.

    Args:
        head_dim: ``D`` (even).
        theta: The base (``rope_theta``).
        scaling: ``None`` or a ``rope_scaling`` dict (see :func:`check_rope_scaling`).
        max_position_embeddings: ``L_max`` (needed by ``dynamic``; the default of
            ``original_max_position_embeddings`` and of longrope's ``factor``).
        seq_len: ``L``, the longest position of the call + 1 (``dynamic`` and ``longrope``
            depend on it; ``None`` = up to ``L_max`` / ``L_orig``).

    Raises:
        ValueError: odd ``head_dim``, non-positive ``theta``, a bad ``scaling``.
    """
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {theta!r}")
    scaling = check_rope_scaling(scaling, head_dim, max_position_embeddings)
    kind = "default" if scaling is None else scaling["rope_type"]
    D = head_dim
    exponent = torch.arange(0, D, 2, dtype=torch.int64).float() / D  # 2i / D
    if kind == "dynamic" and seq_len is not None and seq_len > max_position_embeddings:
        # dynamic NTK (transformers' float32 tensor arithmetic, for bitwise-equal angles):
        #   base' = base · (s L / L_max − (s − 1))^{D/(D−2)}
        s, length = scaling["factor"], torch.tensor(seq_len)
        theta = theta * ((s * length / max_position_embeddings) - (s - 1)) ** (D / (D - 2))
    elif kind == "dynamic":
        s = scaling["factor"]
        theta = theta * ((s * max_position_embeddings / max_position_embeddings) - (s - 1)) ** (
            D / (D - 2))
    # eq. (15): θ_i = base^(-2i/D)
    inv_freq = 1.0 / (theta ** exponent)
    if kind == "linear":  # position interpolation: m → m / s
        return inv_freq / scaling["factor"]
    if kind == "yarn":
        return _yarn(scaling, D, theta)
    if kind == "longrope":  # θ_i / λ_i with λ = long_factor beyond L_orig, else short_factor
        long = seq_len is not None and seq_len > scaling["original_max_position_embeddings"]
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"],
                           dtype=torch.float32)
        return 1.0 / (ext * theta ** exponent)
    if kind == "llama3":
        return _llama3(scaling, inv_freq)
    return inv_freq


def _yarn(scaling: Mapping[str, Any], D: int, theta: float) -> Tensor:
    """YaRN's NTK-by-parts frequencies (Peng et al. 2023, §3.2, eqs. (16)-(18))."""
    s, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the channel that turns `rotations` times in L_orig
        return D * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # no division by zero
    # γ_i: 1 for channels that rotate fast (kept), 0 for slow ones (interpolated), a ramp between
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, D, 2).float() / D)
    # θ'_i = (1 − γ_i) θ_i / s + γ_i θ_i
    return (1.0 / (s * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _llama3(scaling: Mapping[str, Any], inv_freq: Tensor) -> Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    # Llama 3.1: wavelength λ_i = 2π/θ_i; long waves (λ > L_orig/low) are slowed by `factor`,
    # short waves (λ < L_orig/high) kept, and in between
    #   θ'_i = (1 - s) θ_i / factor + s θ_i,   s = (L_orig/λ_i - low) / (high - low)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_attention_factor(scaling: Mapping[str, Any] | None,
                          max_position_embeddings: int | None = None) -> float:
    """The factor yarn and longrope multiply cos and sin by (1 for the other types).

    YaRN: ``attention_factor``, else ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` when both
    are given, else ``0.1 ln s + 1`` (``mscale(s, m) = 0.1 m ln s + 1`` for ``s > 1``).
    LongRoPE: ``attention_factor``, else ``sqrt(1 + ln s / ln L_orig)`` for ``s > 1`` with
    ``s = factor`` or ``L_max / L_orig``.
    """
    if scaling is None or scaling.get("rope_type") not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    old_len = scaling["original_max_position_embeddings"]
    s = scaling.get("factor")
    if scaling["rope_type"] == "longrope":
        s = max_position_embeddings / old_len if s is None else s
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(old_len))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(s, scaling["mscale"]) / mscale(s, scaling["mscale_all_dim"]))
    return mscale(s)


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor, dtype: torch.dtype = torch.float32,
                 scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``cos(m θ)`` and ``sin(m θ)`` for every position, computed in float32.

    Args:
        position_ids: Integer positions ``[B, T]``.
        inv_freq: ``θ`` ``[D/2]`` from :func:`rope_inv_freq`.
        dtype: Dtype of the returned tables.
        scale: Multiplies both tables (:func:`rope_attention_factor`).

    Returns:
        ``(cos, sin)``, each ``[B, T, D]`` (the ``D/2`` angles repeated twice).
    """
    if position_ids.is_floating_point() or position_ids.dim() != 2:
        raise ValueError(f"position_ids must be an integer tensor [B, T], got "
                         f"{position_ids.dtype} {tuple(position_ids.shape)}")
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device).float()  # m θ_i
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
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
