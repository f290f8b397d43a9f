"""Normalizing flows: RealNVP affine couplings, ActNorm and invertible linear mixing.

A normalizing flow is a stack of invertible maps ``z = f_K ∘ … ∘ f_1(x)`` with tractable
Jacobian determinants, so the exact log-likelihood is the change of variables
``log p(x) = log N(z; 0, I) + Σ_k log |det ∂f_k/∂h_{k−1}|``. RealNVP's affine coupling keeps
the masked part of the input and scales/shifts the rest by functions of it, which makes the
Jacobian triangular (``log det = Σ s``) and the inverse as cheap as the forward pass; ActNorm
(data-dependent initialised per-feature affine) and an invertible linear map (Glow's 1×1
convolution, here on feature vectors, LU-parametrised) or a fixed permutation mix features
between couplings.

Papers: Dinh, Sohl-Dickstein, Bengio 2017, "Density estimation using Real NVP",
arXiv:1605.08803; Kingma & Dhariwal 2018, "Glow", arXiv:1807.03039 (ActNorm, 1×1 conv).

==========  ===================================================================================
symbol      meaning
==========  ===================================================================================
``x, z``    data ``[B, D]`` and latent ``[B, D]``, ``z = f(x)``
``m``       binary coupling mask ``[D]`` (1 = passed through unchanged)
``s, t``    log-scale and shift predicted from ``m ⊙ x``
``logdet``  ``log |det ∂f/∂x|`` per sample ``[B]``
==========  ===================================================================================

Every layer has ``forward(x) -> (y, logdet)`` and ``inverse(y) -> x``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "InvertibleLinear",
    "Permutation",
    "RealNVP",
    "coupling_mask",
]


def _check_vec(x: object, dim: int, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor [B, {dim}], got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [B, {dim}], got {tuple(x.shape)}")
    return x


def coupling_mask(dim: int, kind: str = "checkerboard", parity: int = 0) -> Tensor:
    """Binary mask ``[dim]`` for an affine coupling (1 = conditioning part).

    Args:
        dim: Number of features (≥ 2).
        kind: ``"checkerboard"`` (alternating features) or ``"half"`` (first ⌈D/2⌉ features).
        parity: 0 or 1; 1 flips the mask.

    Returns:
        ``[dim]`` float mask.
    """
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    idx = torch.arange(dim)
    if kind == "checkerboard":
        m = (idx % 2 == 0).float()
    elif kind == "half":
        m = (idx < (dim + 1) // 2).float()
    else:
        raise ValueError(f"kind must be 'checkerboard' or 'half', got {kind!r}")
    return 1.0 - m if parity else m


class ActNorm(nn.Module):
    """Per-feature affine ``y = (x + b) ⊙ exp(log_s)``, initialised from the first batch so
    that ``y`` has zero mean and unit variance per feature (Glow, Sec. 3.1).

    Args:
        dim: Number of features ``D``.
        eps: Added to the first batch's std.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent init from a batch ``x [B, D]`` (B ≥ 2)."""
        _check_vec(x, self.dim)
        if x.shape[0] < 2:
            raise ValueError(f"ActNorm needs a batch of at least 2 to initialise, got "
                             f"{x.shape[0]}")
        self.bias.copy_(-x.mean(0))
        self.log_scale.copy_(-torch.log(x.std(0) + self.eps))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y [B, D], logdet [B])``; initialises itself on the first call."""
        _check_vec(x, self.dim)
        if not self.initialized:
            self.initialize(x)
        y = (x + self.bias) * self.log_scale.exp()
        # log|det| = Σ_d log s_d (diagonal Jacobian)
        return y, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """``x = y ⊙ exp(−log_s) − b``."""
        _check_vec(y, self.dim, "y")
        return y * (-self.log_scale).exp() - self.bias


class InvertibleLinear(nn.Module):
    """Invertible linear mixing ``y = x Wᵀ`` (Glow's 1×1 convolution on feature vectors).

    ``W = P L (U + diag(sign ⊙ exp(log_s)))`` (LU-parametrised, ``P`` fixed), so
    ``log |det W| = Σ log_s`` costs O(D). Initialised from a random rotation.

    Args:
        dim: Number of features ``D``.
        generator: Draws the initial rotation.
    """

    def __init__(self, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.dim = dim
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        p, low, up = torch.linalg.lu(q)
        s = torch.diagonal(up)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.lower = nn.Parameter(low.float())
        self.upper = nn.Parameter(torch.triu(up, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def weight(self) -> Tensor:
        """``W [D, D]``."""
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        low = self.lower * self.lower_mask + eye
        up = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ low @ up

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x Wᵀ [B, D], logdet [B])``."""
        _check_vec(x, self.dim)
        # log|det W| = Σ log|s| (P, L unit-triangular contribute 0)
        return x @ self.weight().T, self.log_s.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """``x = y W⁻ᵀ``."""
        _check_vec(y, self.dim, "y")
        return torch.linalg.solve(self.weight(), y.T).T


class Permutation(nn.Module):
    """Fixed feature permutation (log-det 0).

    Args:
        dim: Number of features.
        kind: ``"reverse"`` or ``"random"``.
        generator: Draws the random permutation.
    """

    def __init__(self, dim: int, kind: str = "reverse", generator: torch.Generator | None = None):
        super().__init__()
        if kind == "reverse":
            perm = torch.arange(dim - 1, -1, -1)
        elif kind == "random":
            perm = torch.randperm(dim, generator=generator)
        else:
            raise ValueError(f"kind must be 'reverse' or 'random', got {kind!r}")
        self.dim = dim
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x[:, perm], zeros [B])``."""
        _check_vec(x, self.dim)
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """``y[:, perm⁻¹]``."""
        _check_vec(y, self.dim, "y")
        return y[:, self.inv_perm]


class AffineCoupling(nn.Module):
    """RealNVP affine coupling ``y = m ⊙ x + (1 − m) ⊙ (x ⊙ exp(s(m ⊙ x)) + t(m ⊙ x))``.

    The log-scale is bounded, ``s = scale · tanh(raw)``, for stable training; the last layer
    starts at zero so the coupling starts as the identity.

    Args:
        dim: Number of features ``D``.
        mask: ``[D]`` binary mask (see :func:`coupling_mask`).
        hidden: Width of the conditioner MLP.
        depth: Hidden layers of the conditioner.
    """

    def __init__(self, dim: int, mask: Tensor, hidden: int = 64, depth: int = 2):
        super().__init__()
        if mask.shape != (dim,) or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask must be a binary tensor of shape [{dim}], got "
                             f"{tuple(mask.shape)}")
        if mask.sum() == 0 or mask.sum() == dim:
            raise ValueError("mask must keep some features and transform others")
        self.dim = dim
        self.register_buffer("mask", mask.float())
        self.register_buffer("free", 1.0 - mask.float(), persistent=False)
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 2 * dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.scale = nn.Parameter(torch.ones(dim))

    def _st(self, xm: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.net(xm).chunk(2, dim=1)
        return self.scale * torch.tanh(raw_s) * self.free, t * self.free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y [B, D], logdet [B])``."""
        _check_vec(x, self.dim)
        s, t = self._st(x * self.mask)
        # eq. (9): y = m⊙x + (1-m)⊙(x⊙exp(s) + t); s and t vanish on the mask, so this is
        # x⊙exp(s) + t;  eq. (6): log|det| = Σ_{free} s
        y = x * s.exp() + t
        return y, s.sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        """``x = m ⊙ y + (1 − m) ⊙ (y − t) ⊙ exp(−s)`` (s, t from the unchanged part)."""
        _check_vec(y, self.dim, "y")
        s, t = self._st(y * self.mask)
        return (y - t) * (-s).exp()  # s = t = 0 on the mask: those features pass through


class RealNVP(nn.Module):
    """A RealNVP flow for vectors: ``[ActNorm → mixing → AffineCoupling] × n_couplings``.

    Args:
        dim: Number of features ``D`` (≥ 2).
        n_couplings: Number of coupling layers (masks alternate parity).
        hidden: Conditioner width.
        depth: Conditioner hidden layers.
        mask: ``"checkerboard"`` or ``"half"``.
        actnorm: Insert an :class:`ActNorm` before every coupling.
        mixing: ``"none"``, ``"reverse"`` / ``"random"`` (:class:`Permutation`) or
            ``"linear"`` (:class:`InvertibleLinear`) before every coupling.
        generator: Draws the random permutations / rotations.
    """

    def __init__(self, dim: int = 2, n_couplings: int = 8, hidden: int = 64, depth: int = 2,
                 mask: str = "checkerboard", actnorm: bool = True, mixing: str = "none",
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(n_couplings, int) or n_couplings <= 0:
            raise ValueError(f"n_couplings must be a positive int, got {n_couplings!r}")
        if mixing not in ("none", "reverse", "random", "linear"):
            raise ValueError(f"mixing must be 'none', 'reverse', 'random' or 'linear', got "
                             f"{mixing!r}")
        self.dim = dim
        layers: list[nn.Module] = []
        for k in range(n_couplings):
            if actnorm:
                layers.append(ActNorm(dim))
            if mixing == "linear":
                layers.append(InvertibleLinear(dim, generator))
            elif mixing != "none":
                layers.append(Permutation(dim, mixing, generator))
            layers.append(AffineCoupling(dim, coupling_mask(dim, mask, k % 2), hidden, depth))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z [B, D], log|det ∂z/∂x| [B])``."""
        _check_vec(x, self.dim)
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        """``x = f⁻¹(z)`` ``[B, D]``."""
        _check_vec(z, self.dim, "z")
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x) = log N(f(x); 0, I) + log|det ∂f/∂x|``: ``[B]``."""
        z, logdet = self(x)
        log_pz = -0.5 * (z**2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)
        return log_pz + logdet

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``f⁻¹(z), z ~ N(0, I)``: ``[n, D]``."""
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        ref = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator).to(ref)
        return self.inverse(z)
