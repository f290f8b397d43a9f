"""Activation functions, from the perceptron's step to the gated linear units of LLMs.

Each function is written from its formula (the formula sits in a comment next to the line that
computes it) with plain tensor arithmetic, never by calling ``torch.nn.functional``; the
parity tests compare values and gradients with ``torch.nn.functional``. Exponentials are
evaluated only on the side where they cannot overflow (``x⁺ = max(x, 0)``, ``x⁻ = min(x, 0)``),
so values and gradients stay finite for large ``|x|``, and NaN propagates.

The history: the threshold unit (McCulloch & Pitts 1943; Rosenblatt 1957) is not
differentiable; sigmoid and tanh are, but saturate, so gradients vanish through deep stacks;
ReLU (Nair & Hinton 2010) does not saturate for ``x > 0`` but units can die; Leaky ReLU, PReLU
(He et al. 2015, arXiv:1502.01852), ELU (Clevert et al. 2015, arXiv:1511.07289) and SELU
(Klambauer et al. 2017, arXiv:1706.02515) keep a gradient for ``x < 0``; GELU (Hendrycks &
Gimpel 2016, arXiv:1606.08415), Swish/SiLU (Ramachandran et al. 2017, arXiv:1710.05941) and
Mish (Misra 2019, arXiv:1908.08681) are smooth; the GLU family (Dauphin et al. 2016,
arXiv:1612.08083; Shazeer 2020, arXiv:2002.05202) multiplies a linear path by a gate — SwiGLU
is the feed-forward of LLaMA (see :mod:`mlatlas.nn.feedforward`).

=========  ==========================================================
``x``      input tensor, any shape, floating point
``σ(x)``   logistic sigmoid ``1 / (1 + e^{-x})``
``Φ(x)``   standard normal CDF ``½ (1 + erf(x / √2))``
``a, b``   the two halves of the last dim of a GLU input (value, gate)
=========  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS", "PReLU", "elu", "gelu", "gelu_tanh", "geglu", "get_activation", "glu",
    "leaky_relu", "mish", "prelu", "reglu", "relu", "selu", "sigmoid", "silu", "softplus",
    "step", "swiglu", "swish", "tanh",
]

#: SELU's fixed point constants (Klambauer et al. 2017, eq. (14)).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _check(x: Any, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _split(x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
    # x where cond else 0, and x where not cond else 0: each branch of a torch.where below sees
    # only the inputs it is selected for, so an exponential that would overflow (and turn the
    # backward's 0 · ∞ into NaN) is never evaluated; gradients flow to exactly one branch.
    zero = torch.zeros_like(x)
    return torch.where(cond, x, zero), torch.where(cond, zero, x)


# ---------------------------------------------------------------------- classic
def step(x: Tensor, threshold: float = 0.0) -> Tensor:
    """Threshold (perceptron) unit: 1 where ``x > threshold`` else 0; NaN stays NaN.

    Its derivative is 0 almost everywhere, so nothing can be learned through it by
    backpropagation: the result is deliberately detached from the autograd graph.

    Args:
        x: Input, any shape.
        threshold: The firing threshold.

    Returns:
        Tensor of ``x``'s shape and dtype, values in {0, 1} (NaN where ``x`` is NaN).
    """
    x = _check(x)
    # H(x - θ) = 1 if x > θ else 0
    out = (x.detach() > threshold).to(x.dtype)
    return torch.where(torch.isnan(x.detach()), x.detach(), out)


def sigmoid(x: Tensor) -> Tensor:
    """Logistic sigmoid ``σ(x) = 1 / (1 + e^{-x})``; shape preserved."""
    x = _check(x)
    pos = x >= 0
    xp, xn = _split(x, pos)
    # σ(x) = 1 / (1 + e^{-x}) for x ≥ 0;  = e^{x} / (1 + e^{x}) for x < 0 (same value, no overflow)
    return torch.where(pos, 1.0 / (1.0 + torch.exp(-xp)), torch.exp(xn) / (1.0 + torch.exp(xn)))


def tanh(x: Tensor) -> Tensor:
    """Hyperbolic tangent ``(e^{x} - e^{-x}) / (e^{x} + e^{-x})``; shape preserved."""
    x = _check(x)
    pos = x >= 0
    xp, xn = _split(x, pos)
    # tanh(x) = (1 - e^{-2x}) / (1 + e^{-2x}) for x ≥ 0 (expm1 keeps precision near 0), odd
    tp = -torch.expm1(-2.0 * xp) / (1.0 + torch.exp(-2.0 * xp))
    tn = torch.expm1(2.0 * xn) / (1.0 + torch.exp(2.0 * xn))
    return torch.where(pos, tp, tn)


def softplus(x: Tensor) -> Tensor:
    """``softplus(x) = log(1 + e^{x})`` (the smooth ReLU used inside Mish); shape preserved."""
    x = _check(x)
    pos = x > 0
    xp, xn = _split(x, pos)
    # log(1 + e^{x}) = x + log(1 + e^{-x}) for x > 0;  = log(1 + e^{x}) for x ≤ 0
    return torch.where(pos, xp + torch.log1p(torch.exp(-xp)), torch.log1p(torch.exp(xn)))


def relu(x: Tensor) -> Tensor:
    """Rectified linear unit ``max(x, 0)``; gradient 0 at ``x = 0``; NaN propagates."""
    x = _check(x)
    # ReLU(x) = x if x > 0 else 0
    return torch.where(x <= 0, torch.zeros_like(x), x)


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """Leaky ReLU ``x if x > 0 else negative_slope · x``; shape preserved."""
    x = _check(x)
    # LReLU(x) = x if x > 0 else α x
    return torch.where(x > 0, x, negative_slope * x)


def prelu(x: Tensor, weight: Tensor) -> Tensor:
    """Parametric ReLU: :func:`leaky_relu` with a learned slope per channel.

    Args:
        x: Input ``[N, C, ...]`` (or any shape when ``weight`` has one element).
        weight: Slopes ``[1]`` (shared) or ``[C]`` (per channel, dim 1 of ``x``).

    Returns:
        Tensor of ``x``'s shape.

    Raises:
        ValueError: if ``weight`` has neither 1 nor ``x.shape[1]`` elements.
    """
    x = _check(x)
    weight = _check(weight, "weight")
    if weight.dim() != 1:
        raise ValueError(f"weight must be 1-D [1] or [C], got shape {tuple(weight.shape)}")
    if weight.numel() != 1:
        if x.dim() < 2 or x.shape[1] != weight.numel():
            raise ValueError(f"weight has {weight.numel()} slopes, expected 1 or x.shape[1] "
                             f"for x of shape {tuple(x.shape)}")
        weight = weight.reshape(1, -1, *([1] * (x.dim() - 2)))
    # PReLU(x) = x if x > 0 else a_c x
    return torch.where(x > 0, x, weight * x)


def elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Exponential linear unit ``x if x > 0 else α (e^{x} - 1)``; shape preserved."""
    x = _check(x)
    pos = x > 0
    _, xn = _split(x, pos)
    # ELU(x) = x if x > 0 else α (e^{x} - 1)
    return torch.where(pos, x, alpha * torch.expm1(xn))


def selu(x: Tensor) -> Tensor:
    """Scaled ELU ``λ · ELU(x, α)`` with the self-normalising constants λ ≈ 1.0507, α ≈ 1.6733."""
    # SELU(x) = λ (x if x > 0 else α (e^{x} - 1))
    return SELU_SCALE * elu(x, SELU_ALPHA)


def gelu(x: Tensor) -> Tensor:
    """Gaussian error linear unit ``x Φ(x)`` with the exact normal CDF (erf form)."""
    x = _check(x)
    # GELU(x) = x Φ(x) = ½ x (1 + erf(x / √2))
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation of Φ (GPT-2, BERT; ``approximate="tanh"``)."""
    x = _check(x)
    # GELU(x) ≈ ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + tanh(inner))


def silu(x: Tensor) -> Tensor:
    """Sigmoid linear unit ``x σ(x)`` (Swish with β = 1)."""
    # SiLU(x) = x σ(x)
    return _check(x) * sigmoid(x)


def swish(x: Tensor, beta: float = 1.0) -> Tensor:
    """Swish ``x σ(β x)``; ``beta=1`` is :func:`silu`."""
    # Swish_β(x) = x σ(β x)
    return _check(x) * sigmoid(beta * x)


def mish(x: Tensor) -> Tensor:
    """Mish ``x tanh(softplus(x))``; shape preserved."""
    # Mish(x) = x tanh(log(1 + e^{x}))
    return _check(x) * tanh(softplus(x))


# ---------------------------------------------------------------------- gated linear units
def _halves(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    x = _check(x)
    if x.dim() == 0 or x.shape[dim] % 2:
        raise ValueError(f"x must have an even size along dim {dim} to split into value and "
                         f"gate halves, got shape {tuple(x.shape)}")
    a, b = x.chunk(2, dim=dim)
    return a, b


def glu(x: Tensor, dim: int = -1) -> Tensor:
    """Gated linear unit: split ``x`` into halves ``a, b`` along ``dim``; ``a ⊗ σ(b)``.

    Args:
        x: Input with an even size ``2h`` along ``dim``.
        dim: The dimension to split.

    Returns:
        Tensor with size ``h`` along ``dim``.
    """
    a, b = _halves(x, dim)
    # GLU(a, b) = a ⊗ σ(b)        (Dauphin et al. 2016, eq. (1))
    return a * sigmoid(b)


def reglu(x: Tensor, dim: int = -1) -> Tensor:
    """ReGLU ``a ⊗ ReLU(b)`` (Shazeer 2020); halves as in :func:`glu`."""
    a, b = _halves(x, dim)
    # ReGLU(a, b) = a ⊗ max(b, 0)
    return a * relu(b)


def geglu(x: Tensor, dim: int = -1) -> Tensor:
    """GEGLU ``a ⊗ GELU(b)`` (Shazeer 2020); halves as in :func:`glu`."""
    a, b = _halves(x, dim)
    # GEGLU(a, b) = a ⊗ GELU(b)
    return a * gelu(b)


def swiglu(x: Tensor, dim: int = -1) -> Tensor:
    """SwiGLU ``a ⊗ SiLU(b)`` (Shazeer 2020; LLaMA's FFN); halves as in :func:`glu`."""
    a, b = _halves(x, dim)
    # SwiGLU(a, b) = a ⊗ b σ(b)
    return a * silu(b)


class PReLU(nn.Module):
    """Module form of :func:`prelu` with learnable slopes (initialised to ``init``).

    Args:
        num_parameters: 1 (one shared slope) or the channel count ``C``.
        init: Initial slope.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25):
        super().__init__()
        if not isinstance(num_parameters, int) or num_parameters < 1:
            raise ValueError(f"num_parameters must be a positive int, got {num_parameters!r}")
        self.weight = nn.Parameter(torch.full((num_parameters,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, C, ...]`` → same shape."""
        return prelu(x, self.weight)


# ---------------------------------------------------------------------- registry
#: Name → element-wise activation ``f(x) -> Tensor`` (parameter-free ones only).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "step": step, "threshold": step, "sigmoid": sigmoid, "tanh": tanh, "relu": relu,
    "leaky_relu": leaky_relu, "elu": elu, "selu": selu, "gelu": gelu, "gelu_tanh": gelu_tanh,
    "silu": silu, "swish": swish, "mish": mish, "softplus": softplus,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """Look an activation up by name (see :data:`ACTIVATIONS`).

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: for an unknown name; the message lists the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]
