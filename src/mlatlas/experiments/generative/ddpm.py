"""DDPM learns a 2-D Gaussian mixture (default) and 8×8 digits (``--full``).

Claim (Ho et al. 2020): a network trained with the simple ε-prediction loss and sampled with
the 1000-step ancestral chain reproduces the data distribution.

* 2-D: the sliced Wasserstein distance SW₂ between DDPM samples and a large true sample
  (mean over 3 subsets of 1000 samples) is within ``sw_factor`` (2, fixed before running) of
  the noise floor — the SW₂ that 1000 *exact* samples score against the same reference
  (mean over 12 repeats).
* digits (``--full``): a class-conditional U-Net (trained with 10% label dropout so it is also
  unconditional) generates digits that a classifier trained on real digits recognises:
  conditional samples have class accuracy ≥ 0.8, and unconditional samples cover the classes
  (marginal label entropy ≥ 0.9·ln 10) with confident predictions (mean per-sample entropy
  ≤ 0.5 nats; real test digits: ≈ 0.06).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.datasets import toy2d
from mlatlas.datasets.digits import load_digits
from mlatlas.generative import metrics
from mlatlas.generative.ddpm import DDPMScheduler, denoise, network_fn
from mlatlas.generative.guidance import cfg_loss, classifier_free_guidance
from mlatlas.generative.networks import SmallUNet
from mlatlas.generative.toy_benchmark import (
    ToyDenoiserSettings,
    ToyDensityScore,
    train_toy_denoiser,
)
from mlatlas.generative.training import train_denoiser
from mlatlas.plots import figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    density: str = "8gaussians"  # 2-D density of mlatlas.datasets.toy2d
    train_steps: int = 2000  # AdamW steps on the 2-D density
    batch_size: int = 2048  # training batch
    lr: float = 8e-3  # peak learning rate (cosine decay to 0.1×)
    hidden: int = 48  # MLP width
    depth: int = 3  # MLP hidden layers
    ema_decay: float = 0.995  # EMA of the weights; samples come from the EMA model
    beta_schedule: str = "linear"  # "linear" or "squaredcos_cap_v2"
    num_train_timesteps: int = 1000  # T
    sample_steps: int = 1000  # ancestral steps when sampling (a sub-chain of T when fewer)
    n_sub: int = 1000  # points per scored subset (SW₂ depends on the sample size)
    n_subsets: int = 3  # generated subsets: n_sub × n_subsets samples, mean ± s.e. reported
    n_reference: int = 20000  # size of the true reference sample
    floor_repeats: int = 12  # exact subsets of n_sub points scored to get the noise floor
    sw_factor: float = 2.0  # claim: SW₂(model) ≤ sw_factor × noise floor (fixed a priori)
    digits: bool = False  # also train on 8×8 digits (the --full run)
    digit_train_steps: int = 3000  # AdamW steps of the digit U-Net (batch 128)
    digit_ema_decay: float = 0.999  # EMA of the digit U-Net's weights
    digit_base: int = 16  # U-Net channels at 8×8
    digit_samples: int = 200  # conditional and unconditional digits generated each
    digit_sample_steps: int = 250  # ancestral DDPM steps for digits (a sub-chain of T)
    threads: int = 1  # torch threads (tiny networks run faster on one)
    seed: int = 0

    @classmethod
    def smoke(cls) -> Config:
        """20 training steps, 20 sampling steps, 2 subsets of 100 points (for tests)."""
        return cls(train_steps=20, sample_steps=20, n_sub=100, n_subsets=2, n_reference=2000,
                   floor_repeats=2, digit_train_steps=5, digit_ema_decay=0.9, digit_samples=20,
                   digit_sample_steps=10)

    @classmethod
    def full(cls) -> Config:
        """The 2-D run with 8 scored subsets, plus digits (≈ 6–8 min of CPU, mostly the U-Net)."""
        return cls(digits=True, n_subsets=8, floor_repeats=32)


def _scatter(out: Path, name: str, panels: dict[str, torch.Tensor]) -> Path:
    path = out / f"{name}.png"
    with figure(path, ncols=len(panels)) as (fig, axes):
        for ax, (title, pts) in zip(axes[0], panels.items(), strict=True):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
            ax.set_title(title, fontsize="small")
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
    return path


def run(cfg: Config, out: Path) -> Report:
    """Train on the 2-D density, sample with 1000 ancestral steps, score against the truth."""
    rep = Report()
    _run_toy(cfg, out, rep)
    if cfg.digits:
        _run_digits(cfg, out, rep)
    return rep


def _run_toy(cfg: Config, out: Path, rep: Report) -> None:
    sched = DDPMScheduler(cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                          clip_sample=False)
    settings = ToyDenoiserSettings(cfg.density, cfg.train_steps, cfg.batch_size, cfg.lr,
                                   cfg.hidden, cfg.depth, cfg.ema_decay, cfg.seed)
    res = train_toy_denoiser(settings, sched, checkpoint=out / f"ddpm_{cfg.density}.safetensors",
                             desc="train ddpm")
    n_sub = cfg.n_sub
    n = n_sub * cfg.n_subsets
    score = ToyDensityScore(cfg.density, n_sub, cfg.n_reference, cfg.floor_repeats, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    sched.set_timesteps(cfg.sample_steps)
    x = denoise(network_fn(res.ema, cfg.num_train_timesteps), sched,
                torch.randn(n, 2, generator=g), generator=g)
    sw, sw_se = score(x)
    rep.metric("final_loss", sum(res.losses[-50:]) / len(res.losses[-50:]))
    rep.metric("sw2_model", sw)
    rep.metric("sw2_model_se", sw_se)
    rep.metric("sw2_floor_mean", score.floor)
    rep.metric("sw2_floor_std", score.floor_std)
    truth = toy2d.sample(cfg.density, n, g)
    k = min(n, 2000)
    rep.metric("energy_distance_model", metrics.energy_distance(x[:k], score.reference[:k]))
    rep.metric("energy_distance_truth", metrics.energy_distance(truth[:k], score.reference[:k]))
    if cfg.density == "8gaussians":
        rep.metric("mean_true_log_prob_model", float(toy2d.log_prob(cfg.density, x).mean()))
        rep.metric("mean_true_log_prob_truth", float(toy2d.log_prob(cfg.density, truth).mean()))
    elif cfg.density == "checkerboard":
        rep.metric("frac_samples_in_support",
                   float(torch.isfinite(toy2d.log_prob(cfg.density, x)).float().mean()))
    rep.claim(f"DDPM-{cfg.sample_steps} SW₂ / noise floor ({cfg.density})", sw / score.floor,
              cfg.sw_factor, op="<=", unit="x", target_source="sw_factor",
              detail=f"SW₂ of {n_sub} samples vs {score.reference.shape[0]} true samples = "
                     f"{sw:.4f} ± {sw_se:.4f} (mean ± s.e. over {n // n_sub} subsets); "
                     f"{n_sub} exact samples score {score.floor:.4f} (std {score.floor_std:.4f} "
                     f"over {cfg.floor_repeats})")
    rep.figure(_scatter(out, "samples", {"true": truth, f"DDPM ({len(sched.timesteps)} steps)": x}))
    with figure(out / "loss.png") as (fig, ax):
        ax.plot(res.losses, lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("ε-prediction MSE")
        ax.set_yscale("log")
    rep.figure(out / "loss.png")
    rep.note("Sampling: DDPMScheduler(variance_type='fixed_small', clip_sample=False), "
             "ancestral, from the EMA weights; SW₂ on 256 fixed random directions.")


def _run_digits(cfg: Config, out: Path, rep: Report) -> None:
    x_train, y_train = load_digits("train")
    T = cfg.num_train_timesteps
    sched = DDPMScheduler(T, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    torch.manual_seed(cfg.seed)
    net = SmallUNet(channels=1, base=cfg.digit_base, num_classes=10)

    def data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, x_train.shape[0], (n,), generator=gen)
        return x_train[idx], y_train[idx]

    steps = cfg.digit_train_steps
    res = train_denoiser(net, lambda m, b, gen: cfg_loss(m, b[0], b[1], sched, gen, 0.1), data,
                         steps, 2e-3, batch_size=128, generator=g, warmup=min(200, steps // 10),
                         schedule="cosine", ema_decay=cfg.digit_ema_decay,
                         checkpoint=out / "ddpm_digits.safetensors",
                         tag=f"digits/{cfg.digit_base}/{cfg.seed}", show_progress=True,
                         desc="train digits")
    model = res.ema
    clf = metrics.train_digit_classifier(seed=cfg.seed)
    n = cfg.digit_samples
    sched.set_timesteps(cfg.digit_sample_steps)
    y = torch.arange(n) % 10
    x_cond = denoise(classifier_free_guidance(model, y, 0.0, T), sched,
                     torch.randn(n, 1, 8, 8, generator=g), generator=g)
    x_unc = denoise(network_fn(model, T), sched, torch.randn(n, 1, 8, 8, generator=g),
                    generator=g)
    x_real, _ = load_digits("test")
    acc = metrics.class_accuracy(clf, x_cond, y)
    h_marg = metrics.label_entropy(clf, x_unc)
    h_cond = metrics.conditional_entropy(clf, x_unc)
    rep.metric("digits_classifier_test_accuracy", clf.test_accuracy)
    rep.metric("digits_real_conditional_entropy", metrics.conditional_entropy(clf, x_real))
    rep.claim("digits: class accuracy of conditional samples", acc, 0.8, op=">=",
              detail=f"{n} samples, DDPM {len(sched.timesteps)} steps; classifier trained "
                     f"on real digits ({clf.test_accuracy:.3f} held out)")
    rep.claim("digits: label entropy of unconditional samples", h_marg, 0.9 * math.log(10),
              op=">=", unit="nats", detail="0.9·ln 10: every digit is generated")
    rep.claim("digits: mean per-sample label entropy (unconditional)", h_cond, 0.5, op="<=",
              unit="nats", detail="recognisable digits (real test digits score ≈ 0.06)")
    path = out / "digits.png"
    with figure(path, ncols=2, size=(9, 4.5)) as (fig, axes):
        for ax, (title, imgs) in zip(axes[0], (("conditional (rows: 0…9)", x_cond),
                                               ("unconditional", x_unc)), strict=True):
            k = min(100, imgs.shape[0] - imgs.shape[0] % 10)
            # one blank (−1) pixel between tiles
            padded = torch.nn.functional.pad(imgs[:k, 0].clamp(-1, 1), (0, 1, 0, 1), value=-1.0)
            grid = padded.reshape(-1, 10, 9, 9)
            if title.startswith("conditional"):
                grid = grid.transpose(0, 1)  # sample i has label i % 10: one row per class
            tiles = grid.permute(0, 2, 1, 3).reshape(grid.shape[0] * 9, grid.shape[1] * 9)
            ax.imshow(tiles.clamp(-1, 1), cmap="gray_r")
            ax.set_title(title, fontsize="small")
            ax.axis("off")
    rep.figure(path)
