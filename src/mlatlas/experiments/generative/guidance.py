"""Guidance trades diversity for class accuracy: classifier and classifier-free, one curve each.

Data: a class-conditional 2-D Gaussian mixture whose classes overlap — K = 4 isotropic
components (std 0.75) at the corners of a square inscribed in the circle of radius 1.5 — so
that even exact samples are not perfectly classifiable (Bayes accuracy ≈ 0.85) and guidance
has room to raise accuracy. *Class accuracy* is judged by the exact Bayes classifier
(``toy2d.mixture_class_log_posterior``), the 2-D stand-in for the Inception network.
*Diversity* is the differential entropy of the samples generated for one class
(Kozachenko–Leonenko k-NN estimate, nats; the true class entropy is ln(2πe·0.75²) ≈ 2.41),
averaged over classes; it falls when samples collapse towards a point or a curve.

One ε-network is trained with conditioning dropout (p_uncond = 0.1), so it is both ε(x, y)
and ε(x, ∅); a noise-aware classifier p_φ(y | x_t, t) is trained on the same forward process.
Every sample uses DDIM (η = 0, 50 steps) from the same noise:

* classifier-free guidance: ε̂ = (1 + w) ε(x, y) − w ε(x, ∅) for w in ``cfg_scales``;
* classifier guidance on the unconditional ε(x, ∅): ε̂ = ε − s √(1−ᾱ) ∇ log p_φ(y | x_t).

Claims, fixed before running: over the scales, Spearman ρ(scale, accuracy) ≥ 0.8 and
ρ(scale, diversity) ≤ −0.8, for each of the two kinds of guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import spearmanr

from mlatlas.datasets import toy2d
from mlatlas.generative import metrics
from mlatlas.generative.ddim import DDIMScheduler, ddim_sample
from mlatlas.generative.ddpm import network_fn
from mlatlas.generative.guidance import (
    NoisyClassifier,
    cfg_loss,
    classifier_free_guidance,
    classifier_guidance,
    noisy_classifier_loss,
)
from mlatlas.generative.noise_schedule import NoiseSchedule
from mlatlas.generative.toy_benchmark import toy_model
from mlatlas.generative.training import train_denoiser
from mlatlas.plots import figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    num_classes: int = 4  # mixture components = classes (equally spaced on a circle)
    radius: float = 1.5  # distance of the component means from the origin
    std: float = 0.75  # component standard deviation (classes overlap)
    train_steps: int = 1500  # AdamW steps of the conditional ε-network
    classifier_steps: int = 600  # AdamW steps of the noise-aware classifier
    batch_size: int = 1024  # training batch of the ε-network
    classifier_batch_size: int = 512  # training batch of the classifier
    lr: float = 5e-3  # peak learning rate (cosine decay to 0.1×)
    hidden: int = 64  # MLP width of the ε-network
    depth: int = 3  # MLP hidden layers
    p_uncond: float = 0.1  # conditioning dropout of classifier-free guidance
    ema_decay: float = 0.995  # EMA of the ε-network's weights
    num_train_timesteps: int = 1000  # T (linear β schedule)
    sample_steps: int = 50  # DDIM steps per sample
    per_class: int = 250  # samples per class and scale
    cfg_scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # w of CFG
    classifier_scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # s of CG
    rho_target: float = 0.8  # claim: |Spearman ρ| ≥ this, with the predicted sign
    threads: int = 1  # torch threads (tiny networks run faster on one)
    seed: int = 0

    @classmethod
    def smoke(cls) -> Config:
        """20 steps of each network, 10 samples per class, 5 DDIM steps (for tests)."""
        return cls(train_steps=20, classifier_steps=20, per_class=10, sample_steps=5)


def _diversity(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Per-class k-NN entropy estimate (nats), averaged over classes."""
    return sum(metrics.knn_entropy(x[y == c], k=3) for c in range(k)) / k


def run(cfg: Config, out: Path) -> Report:
    """Train a CFG ε-network and a noisy classifier; sweep both guidance scales."""
    rep = Report()
    k = cfg.num_classes
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = (cfg.radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()
    sched = NoiseSchedule(cfg.num_train_timesteps)
    T = cfg.num_train_timesteps
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = toy_model(cfg.hidden, cfg.depth, num_classes=k)

    def data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return toy2d.mixture_sample_labeled(means, cfg.std, n, gen)

    steps = cfg.train_steps
    res = train_denoiser(
        model, lambda m, b, gen: cfg_loss(m, b[0], b[1], sched, gen, cfg.p_uncond), data,
        steps, cfg.lr, batch_size=cfg.batch_size, generator=g,
        warmup=min(100, steps // 10), schedule="cosine", ema_decay=cfg.ema_decay,
        checkpoint=out / "guidance_eps.safetensors",
        tag=f"mixture{k}/{cfg.hidden}x{cfg.depth}/{cfg.p_uncond}/{cfg.seed}",
        show_progress=True, desc="train ε(x, y)")
    eps_model = res.ema
    torch.manual_seed(cfg.seed + 1)
    clf = NoisyClassifier(2, k, hidden=64, depth=3, time_dim=32)
    csteps = cfg.classifier_steps
    cres = train_denoiser(
        clf, lambda m, b, gen: noisy_classifier_loss(m, b[0], b[1], sched, gen), data,
        csteps, cfg.lr, batch_size=cfg.classifier_batch_size, generator=g,
        warmup=min(50, csteps // 10), schedule="cosine",
        checkpoint=out / "guidance_classifier.safetensors",
        tag=f"mixture{k}/clf/{cfg.seed}", show_progress=True, desc="train p(y|x_t)")
    clf.eval().requires_grad_(False)

    per = cfg.per_class
    y = torch.arange(k).repeat_interleave(per)
    z = torch.randn(y.shape[0], 2, generator=torch.Generator().manual_seed(cfg.seed + 2))
    ddim = DDIMScheduler(T, clip_sample=False, timestep_spacing="trailing")
    ddim.set_timesteps(cfg.sample_steps)
    uncond = network_fn(eps_model, T)  # y = None → the null label ∅
    curves: dict[str, dict[str, list[float]]] = {}
    samples: dict[str, torch.Tensor] = {}
    for kind, scales in (("classifier-free", cfg.cfg_scales),
                         ("classifier", cfg.classifier_scales)):
        acc, div = [], []
        for s in scales:
            fn = (classifier_free_guidance(eps_model, y, s, T) if kind == "classifier-free"
                  else classifier_guidance(uncond, clf, y, s, sched))
            x = ddim_sample(fn, ddim, z)
            judge = toy2d.mixture_class_log_posterior(x, means, cfg.std).argmax(dim=1)
            acc.append(float((judge == y).float().mean()))
            div.append(_diversity(x, y, k))
            samples[f"{kind} {s:g}"] = x
        curves[kind] = {"scale": list(scales), "accuracy": acc, "diversity": div}

    xt, yt = toy2d.mixture_sample_labeled(means, cfg.std, 20000,
                                          torch.Generator().manual_seed(cfg.seed + 3))
    rep.metric("bayes_accuracy_true_samples",
               float((toy2d.mixture_class_log_posterior(xt, means, cfg.std).argmax(1) == yt)
                     .float().mean()))
    rep.metric("diversity_true_samples", _diversity(xt[:k * per], yt[:k * per], k))
    rep.metric("eps_final_loss", sum(res.losses[-50:]) / len(res.losses[-50:]))
    rep.metric("classifier_final_loss", sum(cres.losses[-50:]) / len(cres.losses[-50:]))
    for kind, c in curves.items():
        tag = "cfg" if kind == "classifier-free" else "cg"
        for s, a, d in zip(c["scale"], c["accuracy"], c["diversity"], strict=True):
            rep.metric(f"{tag}_accuracy_{s:g}", a)
            rep.metric(f"{tag}_diversity_{s:g}", d)
        rho_acc = float(spearmanr(c["scale"], c["accuracy"]).statistic)
        rho_div = float(spearmanr(c["scale"], c["diversity"]).statistic)
        detail = (f"accuracy {c['accuracy'][0]:.3f} → {c['accuracy'][-1]:.3f}, diversity "
                  f"{c['diversity'][0]:.3f} → {c['diversity'][-1]:.3f} over scales "
                  f"{c['scale'][0]:g} … {c['scale'][-1]:g}")
        c_acc = rep.claim(f"{kind} guidance: Spearman ρ(scale, class accuracy)", rho_acc,
                          cfg.rho_target, op=">=", detail=detail, target_source="rho_target")
        top = max(c["accuracy"])
        if not c_acc.holds and top >= 0.99:
            first = next(s for s, a in zip(c["scale"], c["accuracy"], strict=True) if a >= 0.99)
            drops = [f"{a:.3f} at {s:g}" for s, a in zip(c["scale"], c["accuracy"], strict=True)
                     if s > first and a < top]
            rep.note(f"{kind} guidance: accuracy saturates (≥ 0.99 from scale {first:g} on); "
                     "beyond that the curve is flat up to sampling noise "
                     f"({', '.join(drops) or 'no drops'} vs max {top:.3f}), and the ties cap the "
                     "rank correlation below the target. The a-priori scale grid reaches far "
                     "past saturation for this toy.")
        rep.claim(f"{kind} guidance: Spearman ρ(scale, diversity)", rho_div,
                  -cfg.rho_target, op="<=", detail=detail, target_source="rho_target")

    path = out / "accuracy_vs_diversity.png"
    with figure(path, ncols=2) as (fig, axes):
        for kind, c in curves.items():
            axes[0][0].plot(c["diversity"], c["accuracy"], "o-", label=kind)
            for s, a, d in zip(c["scale"], c["accuracy"], c["diversity"], strict=True):
                axes[0][0].annotate(f"{s:g}", (d, a), fontsize="x-small")
            axes[0][1].plot(c["scale"], c["accuracy"], "o-", label=f"{kind}: accuracy")
            axes[0][1].plot(c["scale"], c["diversity"], "s--", label=f"{kind}: diversity")
        axes[0][0].set_xlabel("diversity (per-class entropy, nats)")
        axes[0][0].set_ylabel("class accuracy")
        axes[0][0].invert_xaxis()
        axes[0][0].legend(fontsize="small")
        axes[0][1].set_xlabel("guidance scale")
        axes[0][1].legend(fontsize="x-small")
        for ax in axes[0]:
            ax.grid(alpha=0.3)
    rep.figure(path)
    path = out / "samples.png"
    show = [f"classifier-free {cfg.cfg_scales[0]:g}", f"classifier-free {cfg.cfg_scales[-1]:g}",
            f"classifier {cfg.classifier_scales[0]:g}", f"classifier {cfg.classifier_scales[-1]:g}"]
    with figure(path, ncols=4, size=(16, 4)) as (fig, axes):
        for ax, name in zip(axes[0], show, strict=True):
            x = samples[name]
            ax.scatter(x[:, 0], x[:, 1], c=y, s=1, cmap="tab10")
            ax.set_title(name.replace("classifier-free", "CFG w =").replace("classifier",
                                                                           "CG s ="))
            lim = max(4.0, 1.05 * float(x.abs().max().clamp(max=12)))
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
    rep.figure(path)
    rep.note("Diffusers' guidance_scale = 1 + w. Classifier guidance starts from the "
             "unconditional ε(x, ∅) of the same network, so at s = 0 its samples ignore y.")
    return rep
