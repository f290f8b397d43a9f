"""Transformer feed-forward blocks: the plain two-layer FFN and the gated (GLU-family) FFN.

The original Transformer's FFN is ``W₂ f(W₁ x)`` with ``f = ReLU``. Shazeer (2020, "GLU
Variants Improve Transformer", arXiv:2002.05202) replaces the first layer by a gated linear
unit: ``W₂ (f(W_g x) ⊗ W_u x)``; with ``f = SiLU`` this is the SwiGLU FFN of PaLM and LLaMA
(Touvron et al. 2023, arXiv:2302.13971). The gated block has three matrices instead of two, so
at equal parameter count its hidden size is ⅔ of the plain one (LLaMA: ``⅔ · 4d``).

Parameter names follow Hugging Face's ``LlamaMLP`` (``gate_proj``, ``up_proj``, ``down_proj``)
so checkpoints map one to one. The gated block is on every model's hot path, so its gate uses
torch's fused kernels (``F.silu`` …); the plain block takes any activation of
:mod:`mlatlas.nn.activations` (the hand-written, taught versions) by name.

=============  ===================================================
``d``          model width (``dim``)
``h``          hidden width (``hidden``)
``W_g, W_u``   ``gate_proj``, ``up_proj`` weights ``[h, d]``
``W₂``         ``down_proj`` weight ``[d, h]``
``f``          the gate's activation (σ, ReLU, GELU, SiLU)
=============  ===================================================
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.nn.activations import get_activation

__all__ = ["GLU_KINDS", "FeedForward", "GatedFeedForward"]

#: GLU variant → the activation applied to the gate projection (torch's fused kernels: the
#: hand-written :mod:`mlatlas.nn.activations` equal them, see tests/llm/test_activations.py).
GLU_KINDS = {"glu": torch.sigmoid, "reglu": F.relu, "geglu": F.gelu,
             "geglu_tanh": partial(F.gelu, approximate="tanh"), "swiglu": F.silu}


def _check_size(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_input(x: object, dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x must have last dim {dim} (dim), got shape {tuple(x.shape)}")
    return x


class FeedForward(nn.Module):
    """Plain FFN ``down_proj(f(up_proj(x)))`` (Vaswani et al. 2017, eq. (2) with ``f = ReLU``).

    Args:
        dim: Model width ``d``.
        hidden: Hidden width ``h`` (classically ``4d``).
        activation: Name of the activation, see :func:`mlatlas.nn.activations.get_activation`.
        bias: Whether the two linear layers have biases.

    Shapes:
        ``x [..., d]`` → ``[..., d]``.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "relu", bias: bool = False):
        super().__init__()
        self.dim = _check_size(dim, "dim")
        self.hidden = _check_size(hidden, "hidden")
        self.activation = activation
        self.act = get_activation(activation)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d]`` → ``[..., d]``."""
        x = _check_input(x, self.dim)
        # FFN(x) = W₂ f(W₁ x)
        return self.down_proj(self.act(self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class GatedFeedForward(nn.Module):
    """Gated FFN ``down_proj(f(gate_proj(x)) ⊗ up_proj(x))`` — GLU, ReGLU, GEGLU, SwiGLU.

    Args:
        dim: Model width ``d``.
        hidden: Hidden width ``h`` (``⅔ · 4d`` to match a plain FFN of width ``4d``).
        kind: ``"glu"`` (sigmoid gate), ``"reglu"``, ``"geglu"``, ``"geglu_tanh"`` (GELU's
            tanh approximation) or ``"swiglu"``.
        bias: Whether the three linear layers have biases (LLaMA: no).

    Shapes:
        ``x [..., d]`` → ``[..., d]``.

    Raises:
        ValueError: for an unknown ``kind`` or non-positive sizes.
    """

    def __init__(self, dim: int, hidden: int, kind: str = "swiglu", bias: bool = False):
        super().__init__()
        self.dim = _check_size(dim, "dim")
        self.hidden = _check_size(hidden, "hidden")
        if kind not in GLU_KINDS:
            raise ValueError(f"kind must be one of {sorted(GLU_KINDS)}, got {kind!r}")
        self.kind = kind
        self.act = GLU_KINDS[kind]
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d]`` → ``[..., d]``."""
        x = _check_input(x, self.dim)
        # FFN_GLU(x) = W₂ (f(W_g x) ⊗ W_u x)      (Shazeer 2020, eqs. (5)-(6))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
