"""Small denoiser networks shared by every generative method of the atlas.

Diffusion (ε- or x₀-prediction), score SDEs (score = −ε/σ), rectified flow and flow matching
(velocity) all train the same kind of network: a function ``f(x, t, y)`` of a noisy sample,
a time and optionally a class label, with the output shaped like the input. Two sizes cover
the atlas's data: :class:`MLPDenoiser` for 2-D toy densities and :class:`SmallUNet` for 8×8
digit images. Time enters through the sinusoidal embedding of the Transformer (Vaswani et
al. 2017, arXiv:1706.03762) as used by DDPM (Ho et al. 2020, arXiv:2006.11239).

==========  =================================================================
``x``       ``[B, dim]`` points or ``[B, C, 8, 8]`` images
``t``       ``[B]`` float time in [0, 1] (callers normalise: DDPM passes t/T)
``y``       ``[B]`` int64 labels in ``[0, num_classes]``; ``num_classes`` is the
            "null" label of classifier-free guidance; ``None`` means null
==========  =================================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MLPDenoiser", "SinusoidalTimeEmbedding", "SmallUNet"]


class SinusoidalTimeEmbedding(nn.Module):
    """``t ∈ [0, 1]`` → ``[sin(1000 t ω_i), cos(1000 t ω_i)]`` with ``ω_i = 10000^(−i/half)``.

    The factor 1000 puts a normalised time on the scale of DDPM's integer timesteps, where the
    embedding's frequencies were designed to resolve neighbouring steps.

    Args:
        dim: Embedding size (even).
        scale: Multiplier applied to ``t`` before the sinusoids.
    """

    def __init__(self, dim: int, scale: float = 1000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be an even int >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, t: Tensor) -> Tensor:
        """``[B]`` → ``[B, dim]``."""
        arg = (self.scale * t.float())[:, None] * self.freqs[None]  # eq.: PE(t)_i = sin(t ω_i)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


def _check_inputs(x: Tensor, t: Tensor | float, y: Tensor | None, num_classes: int | None,
                  sample_shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """Validate ``x``/``t``/``y``; return ``t`` as ``[B]`` and ``y`` with nulls filled in."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if tuple(x.shape[1:]) != sample_shape or x.ndim != len(sample_shape) + 1:
        raise ValueError(f"x must have shape [B, {', '.join(map(str, sample_shape))}], "
                         f"got {tuple(x.shape)}")
    b = x.shape[0]
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t))
    if not t.is_floating_point():
        raise TypeError(f"t must be a float tensor of times in [0, 1] (normalise integer "
                        f"timesteps first, e.g. t / num_train_timesteps), got {t.dtype}")
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"t must have shape [{b}] (or be a scalar), got {tuple(t.shape)}")
    t = t.to(x.device)
    if y is None:
        if num_classes is None:
            return t, None
        return t, torch.full((b,), num_classes, dtype=torch.long, device=x.device)
    if num_classes is None:
        raise ValueError("y was given but the network is unconditional (num_classes=None)")
    if not isinstance(y, Tensor) or y.dtype != torch.long:
        raise TypeError(f"y must be an int64 tensor of labels, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (b,):
        raise ValueError(f"y must have shape [{b}], got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"y must hold labels in [0, {num_classes}] ({num_classes} = null "
                         f"label), got values in [{int(y.min())}, {int(y.max())}]")
    return t, y


class MLPDenoiser(nn.Module):
    """MLP ``f(x, t, y) → [B, dim]`` for low-dimensional data.

    ``[x, PE(t)]`` → Linear → SiLU → (Linear → SiLU) × (depth − 1) → Linear; a class
    embedding is added to the first hidden layer. Deliberately plain: on 2-D data it fits the
    densities of the atlas as well as residual/normalised variants at a fraction of the per-op
    overhead that dominates tiny networks on a CPU.

    Args:
        dim: Data dimension.
        hidden: Width of the hidden layers.
        depth: Number of hidden layers (>= 1).
        time_dim: Size of the sinusoidal time embedding.
        num_classes: Number of class labels for a conditional model (an extra "null" label
            ``num_classes`` is added for classifier-free guidance); ``None`` for unconditional.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 64,
                 num_classes: int | None = None):
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim = dim
        self.num_classes = num_classes
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        self.inp = nn.Linear(dim + time_dim, hidden)
        self.class_embed = (nn.Embedding(num_classes + 1, hidden)
                            if num_classes is not None else None)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Args: ``x`` ``[B, dim]``, ``t`` ``[B]`` in [0, 1], ``y`` ``[B]`` or None.

        Returns:
            ``[B, dim]``.
        """
        t, y = _check_inputs(x, t, y, self.num_classes, (self.dim,))
        h = self.inp(torch.cat([x, self.time_embed(t).to(x.dtype)], dim=1))
        if self.class_embed is not None:
            h = h + self.class_embed(y)
        h = nn.functional.silu(h)
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        return self.out(h)


def _groups(ch: int) -> int:
    return math.gcd(8, ch)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(cond_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        z = self.conv1(nn.functional.silu(self.norm1(h)))
        z = z + self.cond(c)[:, :, None, None]
        z = self.conv2(nn.functional.silu(self.norm2(z)))
        return self.skip(h) + z


class SmallUNet(nn.Module):
    """A two-level U-Net ``f(x, t, y) → [B, C, H, W]`` for 8×8 images (H, W divisible by 2).

    8×8 (``base`` ch) → 4×4 (``2·base`` ch) → back up with skip connections; every residual
    block receives the time (+ class) embedding as a per-channel bias.

    Args:
        channels: Image channels.
        base: Channels at full resolution.
        time_dim: Size of the sinusoidal time embedding.
        num_classes: As in :class:`MLPDenoiser`.
    """

    def __init__(self, channels: int = 1, base: int = 32, time_dim: int = 64,
                 num_classes: int | None = None):
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.channels = channels
        self.num_classes = num_classes
        cond = 4 * base
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, cond), nn.SiLU(), nn.Linear(cond, cond))
        self.class_embed = nn.Embedding(num_classes + 1, cond) if num_classes is not None else None
        b2 = 2 * base
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.down1 = _ResBlock(base, base, cond)
        self.downsample = nn.Conv2d(base, b2, 3, stride=2, padding=1)
        self.down2 = _ResBlock(b2, b2, cond)
        self.mid = _ResBlock(b2, b2, cond)
        self.up2 = _ResBlock(2 * b2, b2, cond)
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                      nn.Conv2d(b2, base, 3, padding=1))
        self.up1 = _ResBlock(2 * base, base, cond)
        self.norm_out = nn.GroupNorm(_groups(base), base)
        self.conv_out = nn.Conv2d(base, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Args: ``x`` ``[B, C, H, W]``, ``t`` ``[B]`` in [0, 1], ``y`` ``[B]`` or None.

        Returns:
            ``[B, C, H, W]``.
        """
        if isinstance(x, Tensor) and x.ndim == 4 and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(f"x must have even height and width, got {tuple(x.shape)}")
        shape = (self.channels, *x.shape[2:]) if isinstance(x, Tensor) and x.ndim == 4 else (
            self.channels, 8, 8)
        t, y = _check_inputs(x, t, y, self.num_classes, shape)
        c = self.time_mlp(self.time_embed(t))
        if self.class_embed is not None:
            c = c + self.class_embed(y)
        c = nn.functional.silu(c)
        h1 = self.down1(self.conv_in(x), c)  # [B, base, H, W]
        h2 = self.down2(self.downsample(h1), c)  # [B, 2base, H/2, W/2]
        h = self.mid(h2, c)
        h = self.up2(torch.cat([h, h2], dim=1), c)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), c)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
