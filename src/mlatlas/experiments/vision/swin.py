"""Swin: window attention costs FLOPs linear in the image size, global attention quadratic.

Swin-T and a ViT of the same width (C = 96, patch 4, 12 blocks of global attention, what the
paper compares against in eq. (1)–(2)) run on the ``meta`` device — shapes only, no
arithmetic — under :class:`torch.utils.flop_counter.FlopCounterMode`, at image sides from
224 to 896 px (some that the windows do not divide, which Swin pads). The attention FLOPs
are the counted batched matmuls of ``QKᵀ`` and ``AV`` (everything else is a plain matmul);
their log-log slope against the pixel count is the measured exponent: 1 for Swin, 2 for
the ViT. Our Swin also reproduces timm's logits on mapped random weights (a tiny config at
a size the windows do not divide by default; Swin-T at 224 px in ``full``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mlatlas.measure import compare_times, loglog_slope
from mlatlas.nn.attention import attend
from mlatlas.plots import figure
from mlatlas.report import Report
from mlatlas.vision.swin import SwinConfig, SwinTransformer, shifted_window_mask


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0
    image_sides: tuple[int, ...] = (224, 320, 448, 640, 896)  # square images, pixels per side
    vit_depth: int = 12  # blocks of the equal-width ViT (Swin-T has 2+2+6+2)
    swin_exponent: float = 1.1  # claim: Swin's attention-FLOP exponent in pixels ≤ this
    vit_exponent: float = 1.9  # claim: the ViT's exponent ≥ this (quadratic = 2)
    parity_model: str = "toy"  # "toy" (tiny config, 26×22 px) or "swin_t" (224 px)
    parity_tol: float = 1e-4  # claim: max |logit difference| vs timm ≤ this
    bench_model: str = "swin_t"  # bench: "swin_t" or "toy" (the tiny config)
    bench_batch: int = 1  # bench: images per forward call
    bench_side: int = 224  # bench: image side
    bench_repeats: int = 3
    bench_ratio: float = 1.2  # bench claim: our time / timm's ≤ this
    threads: int = 0

    @classmethod
    def smoke(cls) -> Config:
        return cls(image_sides=(224, 448), vit_depth=2, bench_repeats=1, bench_side=24,
                   bench_model="toy")

    @classmethod
    def full(cls) -> Config:
        return cls(image_sides=(224, 288, 320, 448, 512, 640, 768, 896, 1120),
                   parity_model="swin_t", bench_batch=8, bench_repeats=10)


class _GlobalViT(nn.Module):
    """Patch embedding + ``depth`` pre-norm blocks of global attention (a plain ViT)."""

    def __init__(self, width: int, heads: int, depth: int, patch: int):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, width, patch, stride=patch)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(width), qkv=nn.Linear(width, 3 * width),
            proj=nn.Linear(width, width), norm2=nn.LayerNorm(width),
            mlp=nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))))
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # [B, N, C]
        b, n, c = x.shape
        for blk in self.blocks:
            q, k, v = blk.qkv(blk.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            x = x + blk.proj(attend(q, k, v).transpose(1, 2).reshape(b, n, c))
            x = x + blk.mlp(blk.norm2(x))
        return x


def _count(model: nn.Module, side: int) -> tuple[float, float]:
    """(attention FLOPs, all FLOPs) of one forward on a ``side × side`` image (meta device)."""
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, side, side, device="meta"))
    ops = counter.get_flop_counts()["Global"]
    attn = sum(v for op, v in ops.items() if "bmm" in str(op) or "scaled_dot" in str(op))
    return float(attn), float(counter.get_total_flops())


def _timm_model(name: str, img_size) -> nn.Module:
    """timm's Swin-T (``"swin_t"``) or the tiny config (``"toy"``, random N(0, 0.2) weights)."""
    import timm
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    if name == "swin_t":
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                                 img_size=img_size)
    if name != "toy":
        raise ValueError(f"model must be 'swin_t' or 'toy', got {name!r}")
    ref = TimmSwin(img_size=img_size, patch_size=2, window_size=3, embed_dim=12, depths=(2, 2),
                   num_heads=(2, 3), num_classes=10)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def _parity(cfg: Config, rep: Report) -> None:
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        rep.not_measured("max |logit − timm logit| on mapped random weights", cfg.parity_tol,
                         "<=", reason=f"timm is not importable: {exc}")
        return
    torch.manual_seed(cfg.seed)
    hw = (224, 224) if cfg.parity_model == "swin_t" else (26, 22)
    ref = _timm_model(cfg.parity_model, hw).eval()
    ours = SwinTransformer.from_timm(ref).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        diff = float((ours(x) - ref(x)).abs().max())
    rep.claim(f"max |logit − timm logit| on mapped random weights ({cfg.parity_model}, "
              f"{hw[0]}×{hw[1]} px)", diff, cfg.parity_tol, "<=", target_source="parity_tol",
              detail="gradients and torchvision's swin_t: tests/vision/test_swin.py")


def run(cfg: Config, out: Path) -> Report:
    rep = Report()
    with torch.device("meta"):
        swin = SwinTransformer(SwinConfig.swin_t())
        vit = _GlobalViT(96, 3, cfg.vit_depth, 4)
    pixels = [s * s for s in cfg.image_sides]
    swin_attn, vit_attn = [], []
    for side in cfg.image_sides:
        a, total = _count(swin, side)
        swin_attn.append(a)
        rep.metric(f"Swin-T attention GFLOPs @ {side} px", a / 1e9, unit="GFLOP")
        rep.metric(f"Swin-T total GFLOPs @ {side} px", total / 1e9, unit="GFLOP")
        vit_attn.append(_count(vit, side)[0])
        rep.metric(f"ViT (C=96, depth {cfg.vit_depth}) attention GFLOPs @ {side} px",
                   vit_attn[-1] / 1e9, unit="GFLOP")
    k_swin, k_vit = loglog_slope(pixels, swin_attn), loglog_slope(pixels, vit_attn)
    rep.claim("Swin-T attention FLOPs ∝ pixels^k: k", k_swin, cfg.swin_exponent, "<=",
              target_source="swin_exponent", detail=f"log-log slope over sides {cfg.image_sides}")
    rep.claim("ViT (equal width) attention FLOPs ∝ pixels^k: k", k_vit, cfg.vit_exponent, ">=",
              target_source="vit_exponent", detail="global attention over all HW/16 patches")
    _parity(cfg, rep)
    with figure(out / "attention_flops.png", ncols=2, size=(10, 4)) as (_, axes):
        ax, ax2 = axes.flat
        ax.loglog(pixels, [f / 1e9 for f in swin_attn], "o-", label=f"Swin-T (k = {k_swin:.2f})")
        ax.loglog(pixels, [f / 1e9 for f in vit_attn], "s-",
                  label=f"ViT, C = 96 (k = {k_vit:.2f})")
        ax.set_xlabel("pixels (H·W)")
        ax.set_ylabel("attention GFLOPs (QKᵀ + AV)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both")
        m = shifted_window_mask(14, 14, 7, 7, 3, 3)
        ax2.imshow(m[3].float(), cmap="gray")  # the bottom-right window of a 14×14 map
        ax2.set_title("SW-MSA mask, bottom-right window\n(white: may attend)", fontsize=9)
    rep.figure(out / "attention_flops.png")
    rep.note("FLOPs are counted on the meta device (shapes only) with torch's FlopCounterMode; "
             "a multiply-add counts as 2 FLOPs. Sides the windows do not divide (320, 640) are "
             "padded, which adds the few windows that make Swin's points sit slightly above "
             "the line.")
    return rep


def bench(cfg: Config, out: Path) -> Report:
    """Forward time, ours vs timm's (Swin-T by default), same weights, interleaved."""
    rep = Report()
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        rep.not_measured(f"forward time ours / timm ({cfg.bench_model})", cfg.bench_ratio, "<=",
                         reason=f"timm is not importable: {exc}")
        return rep
    torch.manual_seed(cfg.seed)
    ref = _timm_model(cfg.bench_model, cfg.bench_side).eval()
    ours = SwinTransformer.from_timm(ref).eval()
    x = torch.randn(cfg.bench_batch, 3, cfg.bench_side, cfg.bench_side)

    def fwd(model):
        with torch.no_grad():
            return model(x)

    times = compare_times({"ours": lambda: fwd(ours), "timm": lambda: fwd(ref)},
                          repeats=cfg.bench_repeats)
    for name, t in times.items():
        rep.metric(f"forward time, {name}", t.median_s, unit="s")
    rep.claim(f"forward time ours / timm ({cfg.bench_model})", times["ours"].median_s / times["timm"].median_s,
              cfg.bench_ratio, "<=", unit="x", target_source="bench_ratio",
              detail=f"batch {cfg.bench_batch}, {cfg.bench_side}² px, median of "
              f"{cfg.bench_repeats}")
    return rep
