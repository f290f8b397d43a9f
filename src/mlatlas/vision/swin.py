"""Swin Transformer: self-attention inside local windows that shift between layers.

A ViT attends over all ``N = HW/p²`` patches, so its attention costs ``O(N²)``. Swin (Liu et
al. 2021, arXiv:2103.14030) attends inside non-overlapping ``M × M`` windows only, ``O(N·M²)``
— linear in the image size — and lets information cross windows by shifting the window grid
by ``⌊M/2⌋`` in every second block (a cyclic roll of the feature map plus a mask that keeps
the wrapped-around pieces apart). Each window adds a learned relative position bias
``B[Δy, Δx]`` to its scores, and patch merging (2×2 neighbours concatenated, ``4C → 2C``)
halves the resolution between stages, so the features form a pyramid like a CNN's.

=============  ======================================================================
``x``          image ``[B, 3, H, W]`` (``H, W`` divisible by the patch size ``p``)
``C``          embedding width of stage 1 (96 for Swin-T); stage ``s`` has ``C·2^s``
``M``          window size (7); shift ``⌊M/2⌋`` in odd blocks
``B̂``         relative position table ``[(2M−1)², heads]``
``Attention``  ``softmax(QKᵀ/√d + B̂[idx] + mask) V`` per window, eq. (4)
=============  ======================================================================

Feature maps not divisible by the window are padded at the bottom/right after the cyclic
shift, as timm does; a map no larger than ``M`` in one direction uses one window of its
size there and no shift (timm's rule too; its bias is the matching block of the table).
Weights load from timm (:meth:`SwinTransformer.from_timm`) and torchvision
(:meth:`SwinTransformer.from_torchvision`) by explicit key maps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.nn.attention import attend
from mlatlas.vision.swin_weights import swin_config_from_state_dict, swin_key_map

__all__ = ["SwinConfig", "SwinTransformer", "relative_position_index", "shifted_window_mask",
           "window_partition", "window_reverse"]


@dataclass(frozen=True)
class SwinConfig:
    """Architecture of a :class:`SwinTransformer` (timm's and torchvision's names in brackets).

    Attributes:
        embed_dim: Stage-1 width ``C`` (``embed_dim``).
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Window side ``M``.
        patch_size: Patch side ``p`` of the patch embedding.
        in_chans: Image channels.
        num_classes: Classifier outputs.
        mlp_ratio: MLP hidden width / block width.
        layer_norm_eps: LayerNorm epsilon.
    """

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths and num_heads need one entry per stage, got {self.depths} "
                             f"and {self.num_heads}")
        for s, h in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** s) % h:
                raise ValueError(f"stage {s} width {self.embed_dim * 2 ** s} is not divisible "
                                 f"by its num_heads {h}")
        if self.window_size < 1 or self.patch_size < 1:
            raise ValueError(f"window_size and patch_size must be >= 1, got {self.window_size}, "
                             f"{self.patch_size}")

    @classmethod
    def swin_t(cls, **kw) -> SwinConfig:
        """Swin-T (28M parameters): C = 96, depths 2-2-6-2."""
        return cls(**kw)

    @classmethod
    def swin_s(cls, **kw) -> SwinConfig:
        """Swin-S (50M): C = 96, depths 2-2-18-2."""
        return cls(depths=(2, 2, 18, 2), **kw)

    @classmethod
    def swin_b(cls, **kw) -> SwinConfig:
        """Swin-B (88M): C = 128, depths 2-2-18-2, heads 4-8-16-32."""
        return cls(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **kw)

    @classmethod
    def toy(cls, **kw) -> SwinConfig:
        """A tiny test config: C = 12, two stages of 2 blocks, window 3, patch 2, 10 classes."""
        base = dict(embed_dim=12, depths=(2, 2), num_heads=(2, 3), window_size=3,
                    patch_size=2, num_classes=10)
        return cls(**{**base, **kw})


def window_partition(x: Tensor, wh: int, ww: int) -> Tensor:
    """``[B, H, W, C]`` (``H % wh == W % ww == 0``) → windows ``[B·nW, wh·ww, C]``, row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: Tensor, wh: int, ww: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B·nW, wh·ww, C]`` → ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


@functools.lru_cache(maxsize=64)
def relative_position_index(wh: int, ww: int, m: int) -> Tensor:
    """Row of the ``[(2M−1)², heads]`` bias table for every query/key pair of a window.

    Args:
        wh, ww: Window height and width (``≤ M``).
        m: Window size ``M`` the table was built for.

    Returns:
        Int64 ``[wh·ww, wh·ww]``: ``(Δy + M − 1)·(2M − 1) + Δx + M − 1`` (timm's index when
        ``wh = ww = M``).
    """
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + (m - 1)  # Δ shifted to start at 0
    return rel[0] * (2 * m - 1) + rel[1]


def shifted_window_mask(hp: int, wp: int, wh: int, ww: int, sh: int, sw: int,
                        device: torch.device | None = None) -> Tensor:
    """Which tokens of a shifted window may attend to which (the SW-MSA mask, Fig. 4).

    After the cyclic roll by ``(−sh, −sw)`` the last window row/column holds pieces that
    were not neighbours; the map is cut into 3 × 3 regions ``[0, −wh) [−wh, −sh) [−sh, ∞)``
    and a token attends only within its region.

    Args:
        hp, wp: Padded feature-map size (multiples of ``wh``, ``ww``).
        wh, ww: Window size. sh, sw: Shift.
        device: Where to build it.

    Returns:
        Bool ``[nW, wh·ww, wh·ww]``, True = may attend.
    """
    region = torch.zeros(1, hp, wp, 1, device=device)
    label = 0
    for rows in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for cols in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[:, rows, cols] = label
            label += 1
    win = window_partition(region, wh, ww)[..., 0]  # [nW, N]
    return win[:, :, None] == win[:, None, :]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with relative position bias (eq. 4)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, wh: int, ww: int, mask: Tensor | None) -> Tensor:
        """``x`` ``[B·nW, N, C]`` windows; ``mask`` bool ``[nW, N, N]`` or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        idx = relative_position_index(wh, ww, self.window).to(x.device)
        bias = self.relative_position_bias_table[idx].permute(2, 0, 1)  # [heads, N, N]
        scores_add = bias.unsqueeze(0)
        if mask is not None:  # SW-MSA: −∞ across regions (timm adds −100: same softmax)
            nw = mask.shape[0]
            scores_add = bias.masked_fill(~mask[:, None], -math.inf)  # [nW, heads, N, N]
            scores_add = scores_add.unsqueeze(0).expand(bw // nw, -1, -1, -1, -1)
            scores_add = scores_add.reshape(bw, self.heads, n, n)
        # eq. (4): softmax(QKᵀ/√d + B) V
        out = attend(q, k, v, attn_mask=scores_add.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """``x + W-MSA(LN(x))`` then ``x + MLP(LN(x))`` (eq. 3); odd blocks shift their windows."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float,
                 eps: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def _attention(self, x: Tensor) -> Tensor:
        _, h, w, c = x.shape
        m = self.window
        # a map no larger than the window: one window of its size there, no shift (timm)
        wh, ww = min(m, h), min(m, w)
        sh = self.shift if h > m else 0
        sw = self.shift if w > m else 0
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))  # cyclic shift
        ph, pw = (-h) % wh, (-w) % ww
        x = F.pad(x, (0, 0, 0, pw, 0, ph))  # pad bottom/right after the shift (timm)
        hp, wp = h + ph, w + pw
        mask = shifted_window_mask(hp, wp, wh, ww, sh, sw, x.device) if (sh or sw) else None
        out = self.attn(window_partition(x, wh, ww), wh, ww, mask)
        x = window_reverse(out, wh, ww, hp, wp)[:, :h, :w]
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, C]`` → same shape."""
        x = x + self._attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbours concatenated ``[x(0,0), x(1,0), x(0,1), x(1,1)]`` → LN → ``4C → 2C``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, C]`` → ``[B, ⌈H/2⌉, ⌈W/2⌉, 2C]`` (odd sizes zero-padded first)."""
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = x.view(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.flatten(3)))


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating W-MSA and SW-MSA."""

    def __init__(self, dim: int, depth: int, heads: int, cfg: SwinConfig, downsample: bool):
        super().__init__()
        self.downsample = PatchMerging(dim // 2, cfg.layer_norm_eps) if downsample else None
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, cfg.window_size, 0 if i % 2 == 0 else cfg.window_size // 2,
                      cfg.mlp_ratio, cfg.layer_norm_eps) for i in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer image classifier.

    Args:
        config: The architecture (:class:`SwinConfig`; ``SwinConfig.swin_t()`` by default).
    """

    def __init__(self, config: SwinConfig | None = None):
        super().__init__()
        cfg = self.config = config or SwinConfig()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size,
                                          stride=cfg.patch_size)
        self.patch_embed.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.stages = nn.ModuleList(
            SwinStage(cfg.embed_dim * 2 ** s, d, h, cfg, downsample=s > 0)
            for s, (d, h) in enumerate(zip(cfg.depths, cfg.num_heads)))
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(self.num_features, cfg.num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def _check(self, x: Tensor) -> None:
        cfg = self.config
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor [B, {cfg.in_chans}, H, W], got "
                            f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
        if x.dim() != 4 or x.shape[1] != cfg.in_chans:
            raise ValueError(f"x must have shape [B, {cfg.in_chans}, H, W], got "
                             f"{tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"image size must be divisible by the patch size "
                             f"{cfg.patch_size} (a partial patch would be dropped silently), "
                             f"got {h}×{w}; crop or pad the image")

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``[B, 3, H, W]`` → last-stage features ``[B, H/(p·2^(S−1)), …, C·2^(S−1)]``
        (channels last, after the final LayerNorm)."""
        self._check(x)
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """Image ``[B, 3, H, W]`` → logits ``[B, num_classes]`` (global average pool + head)."""
        return self.head(self.forward_features(x).mean((1, 2)))

    # -- weight loading ------------------------------------------------------------------
    @classmethod
    def from_timm(cls, model_or_state_dict) -> SwinTransformer:
        """Build from a timm ``SwinTransformer`` (``swin_*_patch4_window7_224``) or its
        ``state_dict``; the config is read off the weights' shapes.

        Raises:
            ValueError: a key the map does not expect, or one it expects that is missing.
        """
        return cls._load(model_or_state_dict, "timm")

    @classmethod
    def from_torchvision(cls, model_or_state_dict) -> SwinTransformer:
        """Build from a torchvision ``SwinTransformer`` (``swin_t/s/b``) or its state dict
        (its stored ``relative_position_index`` buffers are checked, not loaded)."""
        return cls._load(model_or_state_dict, "torchvision")

    @classmethod
    def _load(cls, model_or_state_dict, layout: str) -> SwinTransformer:
        sd = model_or_state_dict
        if isinstance(sd, nn.Module):
            sd = sd.state_dict()
        if not isinstance(sd, dict):
            raise TypeError(f"model_or_state_dict must be an nn.Module or a state dict, got "
                            f"{type(model_or_state_dict).__name__}")
        with torch.device("meta"):  # no init: every weight is loaded below
            model = cls(SwinConfig(**swin_config_from_state_dict(sd, layout)))
        key_map = swin_key_map(model.config.depths, layout)
        for theirs in key_map.values():
            if theirs.endswith("relative_position_index"):
                idx = relative_position_index(model.config.window_size,
                                              model.config.window_size, model.config.window_size)
                if not torch.equal(sd[theirs].view(-1).cpu(), idx.view(-1)):
                    raise ValueError(f"{theirs} is not the standard relative index")
        own = model.state_dict()
        new = {ours: sd[theirs].detach().clone() for ours, theirs in key_map.items()
               if ours in own}
        missing, unexpected = set(own) - set(new), set(sd) - set(key_map.values())
        if missing or unexpected:
            raise ValueError(f"{layout} key map: missing {sorted(missing)}, unexpected "
                             f"{sorted(unexpected)}")
        for key, value in new.items():
            if value.shape != own[key].shape:
                raise ValueError(
                    f"{layout} weight {key_map[key]} has shape {tuple(value.shape)}, expected "
                    f"{tuple(own[key].shape)}: a timm model built for an image whose feature "
                    f"map is smaller than the window shrinks its window (and bias table); "
                    f"build it at an image size of at least window × patch × 2^(stages−1)")
        model.load_state_dict(new, strict=True, assign=True)
        return model
