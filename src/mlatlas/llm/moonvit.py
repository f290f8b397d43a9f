"""MoonViT: a native-resolution vision Transformer with packed patches and 2-D RoPE.

MoonViT reads every image at its own resolution and aspect ratio: the image is cut into
``p × p`` patches (no resizing to a square), the patches of all images of a batch are packed
into one sequence, and attention is block-diagonal over images through ``cu_seqlens`` (as
NaViT's "Patch n' Pack"). Positions are encoded twice: a learned absolute table,
bicubically resampled to each image's patch grid (from SigLIP), and 2-D rotary embeddings
whose channels alternate between the column and the row index. The output tokens are merged
2 × 2 ("pixel shuffle": four neighbouring patches become one token of 4× the width) and an
MLP projector maps them into the language model's embedding space. Kimi Team 2025, "Kimi-VL
Technical Report", arXiv:2504.07491 (§2.1); Dehghani et al. 2023, "Patch n' Pack: NaViT",
arXiv:2307.06304; Su et al. 2021 (RoPE), arXiv:2104.09864.

Parameter names and the 2-D RoPE channel layout follow transformers' ``Kimi_K25VisionModel``
and ``Kimi_K25MultimodalProjection`` (Kimi-K2.5 ships the same MoonViT with a temporal axis;
for images, ``t = 1``). Attention goes through :func:`mlatlas.nn.attention.attend`.

===============  ===================================================================
``p``            patch side (``patch_size``);  images ``[3, H, W]`` with ``H, W`` multiples
                 of ``p · m``
``h, w``         patch grid of one image: ``H / p × W / p``;  ``N = Σ h·w`` packed patches
``d, D``         vision width, head dim;  ``θ_j = base^{−4j/D}``, ``j < D/4``
``m``            merge kernel (2 × 2);  ``M = N / m²`` merged tokens
``d_text``       the language model's width
===============  ===================================================================

2-D RoPE: channel ``c < D/2`` of a patch at row ``r``, column ``q`` is paired (rotate-half)
with ``c + D/2`` and turned by ``q θ_{c//2}`` for even ``c`` and ``r θ_{c//2}`` for odd ``c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.nn.attention import attend
from mlatlas.nn.rope import apply_rope

__all__ = ["MoonViT", "MoonViTConfig", "MoonViTProjector", "PackedImages", "patchify",
           "rope_2d_cos_sin"]


@dataclass(frozen=True)
class MoonViTConfig:
    """What a :class:`MoonViT` computes.

    Attributes:
        patch_size: ``p``.
        hidden_size: ``d``.
        num_layers: Encoder blocks.
        num_heads: Attention heads (``d % num_heads == 0``, head dim divisible by 4).
        intermediate_size: MLP hidden width.
        pos_emb_height: Rows of the learned absolute position table.
        pos_emb_width: Columns of the table.
        rope_theta: RoPE base.
        merge_kernel_size: ``(m_h, m_w)`` of the patch merger.
        layer_norm_eps: LayerNorm ``ε``.
        attn_backend: Backend of :func:`mlatlas.nn.attention.attend`.
    """

    patch_size: int = 14
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    rope_theta: float = 10000.0
    merge_kernel_size: tuple[int, int] = (2, 2)
    layer_norm_eps: float = 1e-5
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "pos_emb_height", "pos_emb_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size / num_heads must be an int divisible by 4 (2-D RoPE), "
                             f"got hidden_size={self.hidden_size}, num_heads={self.num_heads}")
        object.__setattr__(self, "merge_kernel_size", tuple(self.merge_kernel_size))

    @property
    def head_dim(self) -> int:
        """``D = d / num_heads``."""
        return self.hidden_size // self.num_heads


@dataclass
class PackedImages:
    """Images cut into patches and packed into one sequence.

    Attributes:
        pixel_values: ``[N, 3, p, p]`` patches, image by image, each in raster order.
        grid_hw: int64 ``[n_images, 2]`` patch grid ``(h, w)`` of every image.
        cu_seqlens: int32 ``[n_images + 1]`` boundaries of the images in the sequence.
    """

    pixel_values: Tensor
    grid_hw: Tensor
    cu_seqlens: Tensor

    def merged_counts(self, merge: tuple[int, int]) -> list[int]:
        """Tokens per image after the ``merge`` merger: ``h·w / (m_h m_w)``."""
        return [h * w // (merge[0] * merge[1]) for h, w in self.grid_hw.tolist()]


def patchify(images: list[Tensor], patch_size: int,
             merge: tuple[int, int] = (2, 2)) -> PackedImages:
    """Cut images of any size into ``p × p`` patches and pack them (no resizing).

    Args:
        images: ``[3, H, W]`` float tensors; ``H`` a multiple of ``p·m_h``, ``W`` of ``p·m_w``.
        patch_size: ``p``.
        merge: The merger's kernel (the patch grid must divide into it).

    Raises:
        TypeError: not a list of floating-point tensors.
        ValueError: an image not ``[3, H, W]``, smaller than a patch, or whose sides are not
            multiples of ``p · m`` (named by index, with its size).
    """
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError(f"images must be a non-empty list of [3, H, W] tensors, got "
                        f"{type(images).__name__}")
    p = patch_size
    patches, grids = [], []
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or not img.is_floating_point():
            raise TypeError(f"images[{i}] must be a floating-point tensor, got "
                            f"{getattr(img, 'dtype', type(img).__name__)}")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}] must be [3, H, W], got shape {tuple(img.shape)}")
        H, W = img.shape[1:]
        if H < p or W < p:
            raise ValueError(f"images[{i}] is smaller than one patch: patch_size={p} needs "
                             f"H, W >= {p}, got {H}x{W}")
        if H % (p * merge[0]) or W % (p * merge[1]):
            raise ValueError(f"images[{i}] must have H a multiple of {p * merge[0]} and W of "
                             f"{p * merge[1]} (patch_size · merge), got {H}x{W}")
        h, w = H // p, W // p
        # [3, h p, w p] → [h, w, 3, p, p]: raster order of patches
        patches.append(img.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3, p, p))
        grids.append((h, w))
    grid = torch.tensor(grids, dtype=torch.int64)
    lengths = grid.prod(-1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return PackedImages(torch.cat(patches), grid, cu)


def rope_2d_cos_sin(grid_hw: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor,
                                                                                      Tensor]:
    """Axial 2-D RoPE tables for packed raster-order patches (see the module notes).

    Args:
        grid_hw: int64 ``[n_images, 2]``.
        head_dim: ``D`` (divisible by 4).
        theta: RoPE base.

    Returns:
        ``(cos, sin)``, each float32 ``[N, D]``.
    """
    rows, cols = [], []
    for h, w in grid_hw.tolist():
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(r.flatten())
        cols.append(c.flatten())
    pos = torch.stack((torch.cat(cols), torch.cat(rows)), dim=-1).float()  # [N, 2]: (col, row)
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # θ_j
    # angle of channel 2j = col · θ_j, of channel 2j + 1 = row · θ_j
    angles = (pos[:, None, :] * inv_freq[None, :, None]).flatten(1)  # [N, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half pairs (c, c + D/2)
    return angles.cos(), angles.sin()


class MoonViTAttention(nn.Module):
    """Bidirectional multi-head attention within each packed image, 2-D RoPE on q and k."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.backend = config.attn_backend
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        """``x [N, d]`` → ``[N, d]`` (no attention across ``cu_seqlens`` boundaries)."""
        N = x.shape[0]
        q, k, v = (proj(x).view(1, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos[None], sin[None]), apply_rope(k, cos[None], sin[None])
        out = attend(q, k, v, cu_seqlens=cu_seqlens, backend=self.backend)  # softmax(qkᵀ/√D)v
        return self.proj(out.transpose(1, 2).reshape(N, -1))


class MoonViTMLP(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d]`` → ``[..., d]``."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MoonViTLayer(nn.Module):
    """Pre-LayerNorm block: ``h = x + Attn(LN(x))``, ``out = h + MLP(LN(h))``."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = MoonViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MoonViTMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        """``x [N, d]`` → ``[N, d]``."""
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    """``proj`` (a ``p × p`` stride-``p`` convolution) + the learned position table."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size)
        self.pos_emb = nn.Module()
        self.pos_emb.position_embeddings = nn.Parameter(
            torch.zeros(config.pos_emb_height, config.pos_emb_width, config.hidden_size))
        # transformers' Kimi_K25 init: truncated N(0, 1) on [−2, 2] (not the 0.02 of its Linears)
        nn.init.trunc_normal_(self.pos_emb.position_embeddings, std=1.0, a=-2.0, b=2.0)


class MoonViT(nn.Module):
    """The MoonViT encoder: packed patches → contextual patch features → merged tokens.

    Args:
        config: The :class:`MoonViTConfig`.

    Shapes:
        :meth:`forward`: ``pixel_values [N, 3, p, p]``, ``grid_hw [n, 2]`` → ``[M, m_h m_w, d]``
        (each merged token's ``m_h · m_w`` patch features, row-major in the kernel).
    """

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        if not isinstance(config, MoonViTConfig):
            raise TypeError(f"config must be a MoonViTConfig, got {type(config).__name__}")
        self.config = config
        self.patch_embed = _PatchEmbed(config)
        self.layers = nn.ModuleList(MoonViTLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def position_embedding(self, grid_hw: Tensor) -> Tensor:
        """The learned table resampled (bicubic) to every image's grid: ``[N, d]``."""
        table = self.patch_embed.pos_emb.position_embeddings.permute(2, 0, 1)[None]  # [1,d,H,W]
        out = []
        for h, w in grid_hw.tolist():
            grid = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
            out.append(grid[0].flatten(1).T)  # raster order
        return torch.cat(out)

    def forward(self, pixel_values: Tensor, grid_hw: Tensor) -> Tensor:
        """Encode packed patches (see :func:`patchify`) and merge them; see the class shapes."""
        c = self.config
        p = c.patch_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise ValueError(f"pixel_values must be [N, 3, {p}, {p}] (patch_size={p}), got "
                             f"{tuple(pixel_values.shape)}")
        lengths = grid_hw.prod(-1)
        if int(lengths.sum()) != pixel_values.shape[0]:
            raise ValueError(f"grid_hw covers {int(lengths.sum())} patches, pixel_values has "
                             f"{pixel_values.shape[0]}")
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        x = self.patch_embed.proj(pixel_values).flatten(1)  # [N, d]: one linear map per patch
        x = x + self.position_embedding(grid_hw).to(x.dtype)
        cos, sin = rope_2d_cos_sin(grid_hw, c.head_dim, c.rope_theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cu)
        return self.merge(self.final_layernorm(x), grid_hw)

    def merge(self, x: Tensor, grid_hw: Tensor) -> Tensor:
        """Pixel shuffle: group every ``m_h × m_w`` block of patches into one token.

        Args:
            x: ``[N, d]`` raster-order patch features.
            grid_hw: int64 ``[n, 2]`` (each side divisible by the kernel).

        Returns:
            ``[M, m_h m_w, d]``, merged tokens in raster order of the coarse grid.
        """
        mh, mw = self.config.merge_kernel_size
        out, start = [], 0
        for h, w in grid_hw.tolist():
            img = x[start:start + h * w].view(h // mh, mh, w // mw, mw, -1)
            out.append(img.transpose(1, 2).reshape((h // mh) * (w // mw), mh * mw, -1))
            start += h * w
        return torch.cat(out)


class MoonViTProjector(nn.Module):
    """Merged tokens → language-model embeddings: ``out(GELU(in(concat LN(patches))))``.

    Args:
        vision_size: ``d``.
        merge: ``m_h · m_w``.
        text_size: ``d_text``.
        eps: LayerNorm ``ε``.

    Shapes:
        ``[M, m_h m_w, d]`` → ``[M, d_text]``.
    """

    def __init__(self, vision_size: int, merge: int, text_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size = vision_size * merge
        self.pre_norm = nn.LayerNorm(vision_size, eps=eps)
        self.in_proj = nn.Linear(self.hidden_size, self.hidden_size)
        self.out_proj = nn.Linear(self.hidden_size, text_size)

    def forward(self, merged: Tensor) -> Tensor:
        """See the class shapes."""
        x = self.pre_norm(merged).reshape(merged.shape[0], self.hidden_size)
        return self.out_proj(F.gelu(self.in_proj(x)))
