"""RMSNorm — root-mean-square layer normalisation.

RMSNorm rescales a vector by the root mean square of its entries and a learned gain, without
LayerNorm's mean subtraction and bias: cheaper, and as good in Transformers. LLaMA applies it
*before* each attention and feed-forward block (pre-norm) and once after the last block.
Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467.

==========  ==================================
``x``       input ``[..., d]``
``g``       learned gain ``[d]`` (``weight``)
``ε``       ``eps``, added under the root
==========  ==================================
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``g ⊙ x / sqrt(mean(x²) + ε)``, computed in float32 and cast back to ``x.dtype``.

    Args:
        x: Input ``[..., d]`` (floating point).
        weight: Gain ``g`` ``[d]``.
        eps: ``ε > 0``.

    Returns:
        ``[..., d]`` in the dtype of ``weight * x`` (the order Hugging Face's LlamaRMSNorm uses).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x must have last dim {weight.shape[-1]}, got shape {tuple(x.shape)}")
    dtype = x.dtype
    xf = x.to(torch.float32)
    # eq. (4): RMS(x) = sqrt(1/d Σ x_i²) = ‖x‖₂ / √d;  x̄ = x / RMS(x);  y = g ⊙ x̄
    # (‖x‖₂ is one fused reduction; x.pow(2).mean() would write and re-read an x-sized tensor)
    mean_sq = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
    xf = xf * torch.rsqrt(mean_sq + eps)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain (initialised to ones).

    Args:
        dim: Normalised width ``d``.
        eps: ``ε`` added to the mean square.

    Shapes:
        ``x [..., d]`` → ``[..., d]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d]`` → ``[..., d]``."""
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
