"""Upsampling: parity with PyTorch's ops, and the checkerboard of transposed convolution.

Two small generators map a latent to a 32×32 RGB image through three ×2 stages that differ
only in how they upsample: a stride-2 transposed convolution (DCGAN's k=4, s=2, p=1) or
nearest resize followed by a 3×3 convolution (Odena et al.'s fix). The artefact is measured
as the fraction of the output's spectral energy on the Nyquist row and column
(:func:`~mlatlas.vision.upsampling.checkerboard_energy`), averaged over random inits and
latents; the claim is that resize-then-convolve has ≥ 10× less of it. The same two decoders
are then trained briefly as autoencoder decoders on synthetic shapes (metrics only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.datasets.shapes import SceneSpec, make_scenes
from mlatlas.plots import figure
from mlatlas.report import Report
from mlatlas.runtime import progress
from mlatlas.vision.upsampling import (
    ResizeConv2d,
    TransposedConv2d,
    checkerboard_energy,
    conv_transpose2d,
    interpolate,
    max_unpool2d,
    pixel_shuffle,
)


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds inits, latents and the shapes
    latent_dim: int = 32  # generator input size
    widths: tuple[int, ...] = (64, 32, 16)  # channels entering each ×2 stage (4→8→16→32)
    inits: int = 8  # random initialisations per generator
    latents: int = 16  # latents per initialisation
    target_ratio: float = 10.0  # claim: Nyquist energy deconv / resize-conv ≥ this (issue)
    train_steps: int = 120  # autoencoder steps per decoder (0: skip the trained comparison)
    train_images: int = 256  # 32×32 shapes scenes for the autoencoders
    batch: int = 16  # autoencoder batch size
    threads: int = 0  # torch threads; 0 keeps the default

    @classmethod
    def smoke(cls) -> Config:
        return cls(inits=2, latents=4, train_steps=3, train_images=32, batch=8)

    @classmethod
    def full(cls) -> Config:
        return cls(inits=32, latents=32, train_steps=2000, train_images=2048, batch=32)


def _stage(kind: str, c_in: int, c_out: int) -> nn.Module:
    if kind == "deconv k=4":
        return TransposedConv2d(c_in, c_out, 4, stride=2, padding=1)
    if kind == "deconv k=3":
        return TransposedConv2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
    return ResizeConv2d(c_in, c_out, scale=2, kernel_size=3, mode="nearest")


class _Decoder(nn.Module):
    """latent → 4×4×w0 → three ×2 stages (ReLU between) → 32×32×3 in [−1, 1]."""

    def __init__(self, kind: str, latent_dim: int, widths: tuple[int, ...]):
        super().__init__()
        self.w0 = widths[0]
        self.fc = nn.Linear(latent_dim, widths[0] * 16)
        chans = list(widths) + [3]
        self.stages = nn.ModuleList(_stage(kind, a, b) for a, b in zip(chans[:-1], chans[1:]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).reshape(-1, self.w0, 4, 4)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            h = torch.tanh(h) if i == len(self.stages) - 1 else F.relu(h)
        return h


KINDS = ("deconv k=4", "deconv k=3", "resize-conv")


def _parity(gen: torch.Generator) -> float:
    """Largest |ours − torch| over the upsampling ops on one input (forward)."""
    x = torch.randn(2, 4, 7, 9, generator=gen)
    errs = []
    for mode, ac in (("nearest", None), ("bilinear", False), ("bilinear", True),
                     ("bicubic", False), ("bicubic", True)):
        errs.append((interpolate(x, size=(15, 20), mode=mode, align_corners=ac)
                     - F.interpolate(x, size=(15, 20), mode=mode, align_corners=ac)).abs().max())
    w = torch.randn(4, 3, 4, 4, generator=gen)
    errs.append((conv_transpose2d(x, w, stride=2, padding=1)
                 - F.conv_transpose2d(x, w, stride=2, padding=1)).abs().max())
    errs.append((pixel_shuffle(x, 2) - F.pixel_shuffle(x, 2)).abs().max())
    pooled, idx = F.max_pool2d(x, 2, return_indices=True)
    errs.append((max_unpool2d(pooled, idx, 2, output_size=(7, 9))
                 - F.max_unpool2d(pooled, idx, 2, output_size=(7, 9))).abs().max())
    return float(torch.stack(errs).max())


def _random_init_energy(cfg: Config) -> dict[str, torch.Tensor]:
    energies: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    for i in progress(range(cfg.inits), description="random inits"):
        z = torch.randn(cfg.latents, cfg.latent_dim,
                        generator=torch.Generator().manual_seed(cfg.seed * 1000 + i))
        for kind in KINDS:
            torch.manual_seed(cfg.seed * 1000 + i)
            with torch.no_grad():
                energies[kind].append(checkerboard_energy(_Decoder(kind, cfg.latent_dim,
                                                                   cfg.widths)(z)))
    return {k: torch.cat(v) for k, v in energies.items()}


class _Encoder(nn.Sequential):
    def __init__(self, latent_dim: int):
        super().__init__(nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1),
                         nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 16, latent_dim))


def _train_autoencoders(cfg: Config, images: torch.Tensor) -> dict[str, dict[str, float]]:
    out = {}
    for kind in ("deconv k=4", "resize-conv"):
        torch.manual_seed(cfg.seed)
        enc, dec = _Encoder(cfg.latent_dim), _Decoder(kind, cfg.latent_dim, cfg.widths)
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=2e-3)
        order = torch.Generator().manual_seed(cfg.seed)
        for _ in progress(range(cfg.train_steps), description=f"autoencoder ({kind})"):
            batch = images[torch.randint(len(images), (cfg.batch,), generator=order)]
            loss = F.mse_loss(dec(enc(batch)), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            recon = dec(enc(images[:64]))
        out[kind] = {"mse": float(F.mse_loss(recon, images[:64])),
                     "nyquist": float(checkerboard_energy(recon).mean()),
                     "recon": recon[:4]}
    return out


def run(cfg: Config, out: Path) -> Report:
    rep = Report()
    rep.claim("max |ours − torch| over interpolate/conv_transpose2d/pixel_shuffle/max_unpool2d",
              _parity(torch.Generator().manual_seed(cfg.seed)), 1e-5, op="<=",
              detail="fp32 forward; gradients are checked in tests/vision/test_upsampling.py")
    energy = _random_init_energy(cfg)
    for kind, e in energy.items():
        rep.metric(f"Nyquist energy fraction, random init, {kind}", float(e.mean()))
    ratio = float(energy["deconv k=4"].mean() / energy["resize-conv"].mean())
    rep.claim("checkerboard: Nyquist energy of deconv (k=4, s=2) / resize-conv, random init",
              ratio, cfg.target_ratio, op=">=", unit="x", target_source="target_ratio",
              detail=f"mean over {cfg.inits} inits × {cfg.latents} latents, 32×32 outputs")
    rep.metric("ratio deconv (k=3, s=2) / resize-conv, random init",
               float(energy["deconv k=3"].mean() / energy["resize-conv"].mean()))
    trained = {}
    if cfg.train_steps > 0:
        spec = SceneSpec(image_size=32, min_size=6, max_size=14, max_objects=3, clutter=2)
        images = make_scenes(cfg.train_images, spec, seed=cfg.seed).images * 2 - 1
        rep.metric("Nyquist energy fraction of the target images", float(
            checkerboard_energy(images[:64]).mean()))
        trained = _train_autoencoders(cfg, images)
        for kind, m in trained.items():
            rep.metric(f"trained decoder {kind}: reconstruction MSE", m["mse"])
            rep.metric(f"trained decoder {kind}: Nyquist energy fraction", m["nyquist"])
        rep.metric("ratio deconv (k=4) / resize-conv after training",
                   trained["deconv k=4"]["nyquist"] / trained["resize-conv"]["nyquist"])
    torch.manual_seed(cfg.seed)
    z = torch.randn(4, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed))
    with figure(out / "checkerboard.png", ncols=4, nrows=3 if trained else 2,
                size=(10, 7.5 if trained else 5)) as (_, axes):
        for row, kind in enumerate(("deconv k=4", "resize-conv")):
            torch.manual_seed(cfg.seed * 1000)
            with torch.no_grad():
                img = _Decoder(kind, cfg.latent_dim, cfg.widths)(z)[:, 0]
            for col in range(3):
                axes[row, col].imshow(img[col].numpy(), cmap="gray")
                axes[row, col].set_title(f"{kind}, random init", fontsize=8)
                axes[row, col].axis("off")
            spec = torch.fft.fftshift(torch.fft.fft2(img - img.mean((-2, -1), keepdim=True)))
            axes[row, 3].imshow((spec.abs() ** 2).mean(0).log10().numpy(), cmap="magma")
            axes[row, 3].set_title("log power spectrum (Nyquist at the border)", fontsize=8)
            axes[row, 3].axis("off")
        if trained:
            for col, kind in enumerate(("deconv k=4", "resize-conv")):
                for j in range(2):
                    ax = axes[2, 2 * col + j]
                    ax.imshow(((trained[kind]["recon"][j].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
                    ax.set_title(f"trained {kind}", fontsize=8)
                    ax.axis("off")
    rep.figure(out / "checkerboard.png")
    rep.note("Nearest ×2 upsampling is a zero-insertion followed by the hold filter [1, 1], "
             "whose response at the Nyquist frequency is zero, so the resize-conv output has "
             "Nyquist energy only from zero-padded borders and the ReLU/tanh. A transposed "
             "convolution paints overlapping kernels: even and odd output pixels see "
             "different kernel taps, a period-2 pattern.")
    return rep
