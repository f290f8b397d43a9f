"""Score SDE on a 2-D density: reverse SDE vs probability-flow ODE, and the exact likelihood.

One ε-network is trained with continuous-time denoising score matching on the VP SDE. Two
samplers then use its score: the reverse-time SDE (Euler–Maruyama) and the probability-flow
ODE (scipy RK45). Claim 1: they sample the same distribution — the sliced Wasserstein distance
between their samples is within the metric's own noise (true vs true) plus the model's error.
Claim 2: the PF-ODE gives an exact likelihood close to the true log-density.

Targets (fixed before any run):

* ``SW(SDE, ODE) ≤ 2·floor + excess`` where ``floor`` is the mean SW between two independent
  true sample sets of the same size and ``excess = max(0, SW(ODE, data) − floor)`` the
  model's error above the floor (the two samplers agree exactly only for the exact score).
* ``E_x[log p_true(x) − log p_ODE(x)] ≤ 0.15`` nats on held-out true samples (a paired
  estimate of KL(p‖p_θ); the 8-Gaussians entropy is ≈ 2.14 nats).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.datasets import toy2d
from mlatlas.generative.metrics import sliced_wasserstein
from mlatlas.generative.networks import MLPDenoiser
from mlatlas.generative.sde import (
    VPSDE,
    denoising_score_loss,
    pf_ode_log_likelihood,
    pf_ode_sample,
    reverse_sde_sample,
    score_from_eps,
)
from mlatlas.generative.training import train_denoiser
from mlatlas.plots import figure
from mlatlas.report import Report

SW_TARGET_FACTOR = 2.0  # SW(SDE, ODE) ≤ 2·floor + excess model error
KL_TARGET_NATS = 0.15  # mean log p_true − log p_ODE on held-out data


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    density: str = "8gaussians"  # toy2d density with an exact log_prob (8gaussians|checkerboard)
    scale: float = 1.0  # the network sees scale·x; likelihoods are converted back to x
    steps: int = 4000  # AdamW steps of denoising score matching
    batch_size: int = 512  # training batch
    lr: float = 2e-3  # peak learning rate (cosine to 0.1·lr)
    hidden: int = 64  # MLPDenoiser width
    depth: int = 3  # MLPDenoiser hidden layers
    time_scale: float = 30.0  # sinusoidal time-embedding factor (smooth in continuous t)
    ema_decay: float = 0.995  # EMA of the weights used for sampling
    beta_min: float = 0.1  # VP SDE β(0)
    beta_max: float = 20.0  # VP SDE β(1)
    eps: float = 1e-3  # smallest time trained / integrated to
    t_sampling: str = "mixed"  # training times: uniform | log-uniform (likelihood) | mixed
    n_samples: int = 2000  # samples per sampler (and per true reference set)
    em_steps: int = 500  # Euler–Maruyama steps of the reverse SDE
    n_likelihood: int = 1000  # held-out points for the PF-ODE likelihood
    rtol: float = 1e-5  # RK45 relative (= absolute) tolerance for sampling and likelihood
    n_floor: int = 5  # pairs of true sample sets for the SW noise floor
    threads: int = 1  # torch threads (tiny networks run best on one)
    seed: int = 0  # seed of data, initialisation, noise and projections

    @classmethod
    def smoke(cls) -> Config:
        """20 training steps, 200 samples, 20 EM steps, loose RK45 (for tests)."""
        return cls(steps=20, n_samples=200, em_steps=20, n_likelihood=40, rtol=1e-3, n_floor=2)

    @classmethod
    def full(cls) -> Config:
        """Longer training, a wider network and more samples (≈ 4 min)."""
        return cls(steps=15000, hidden=128, n_samples=5000, em_steps=1000, n_likelihood=3000)


def _sw(a: torch.Tensor, b: torch.Tensor, seed: int) -> float:
    # the same projections for every comparison: differences are not projection noise
    return sliced_wasserstein(a, b, 256, generator=torch.Generator().manual_seed(seed + 7))


def run(cfg: Config, out: Path) -> Report:
    """Train the score, sample with the reverse SDE and the PF-ODE, compute the likelihood."""
    rep = Report()
    out = Path(out)
    g = torch.Generator().manual_seed(cfg.seed)
    sde = VPSDE(cfg.beta_min, cfg.beta_max)
    torch.manual_seed(cfg.seed)
    model = MLPDenoiser(dim=2, hidden=cfg.hidden, depth=cfg.depth)
    model.time_embed.scale = cfg.time_scale  # default 1000·t suits DDPM's integer steps
    t0 = time.process_time()
    result = train_denoiser(
        model, lambda m, x, gen: denoising_score_loss(m, sde, x, eps=cfg.eps,
                                                    t_sampling=cfg.t_sampling, generator=gen),
        lambda n, gen: cfg.scale * toy2d.sample(cfg.density, n, gen), cfg.steps, cfg.lr,
        batch_size=cfg.batch_size, generator=g, schedule="cosine", warmup=100,
        ema_decay=cfg.ema_decay, checkpoint=out / "eps_model.safetensors",
        tag=f"sde-{cfg.density}-{cfg.hidden}x{cfg.depth}-{cfg.batch_size}-{cfg.t_sampling}",
        show_progress=True, desc="score matching")
    rep.metric("train_cpu_s", time.process_time() - t0)
    rep.metric("final_loss", sum(result.losses[-100:]) / len(result.losses[-100:]))
    net = result.ema.eval()
    score = score_from_eps(net, sde)

    n = cfg.n_samples
    # independent prior draws: shared x_T would correlate the two sets and make them
    # look closer than two independent sets of one distribution (the noise floor)
    x_T, x_T_ode = sde.prior_sample((n, 2), g), sde.prior_sample((n, 2), g)
    t0 = time.perf_counter()
    x_sde = reverse_sde_sample(score, sde, x_T, cfg.em_steps, eps=cfg.eps, generator=g)
    rep.metric("sde_wall_s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    x_ode, nfe = pf_ode_sample(score, sde, x_T_ode, eps=cfg.eps, rtol=cfg.rtol,
                               atol=cfg.rtol)
    rep.metric("ode_wall_s", time.perf_counter() - t0)
    rep.metric("ode_nfe", nfe)
    x_sde, x_ode = x_sde / cfg.scale, x_ode / cfg.scale
    x_coarse = reverse_sde_sample(score, sde, sde.prior_sample((n, 2), g), 5, eps=cfg.eps,
                                  generator=g) / cfg.scale

    true = [toy2d.sample(cfg.density, n, g) for _ in range(2 * cfg.n_floor + 1)]
    floor_vals = [_sw(true[2 * i], true[2 * i + 1], cfg.seed) for i in range(cfg.n_floor)]
    floor = sum(floor_vals) / len(floor_vals)
    ref = true[-1]
    sw_sde, sw_ode = _sw(x_sde, ref, cfg.seed), _sw(x_ode, ref, cfg.seed)
    sw_between = _sw(x_sde, x_ode, cfg.seed)
    rep.metric("sw_floor_true_vs_true", floor)
    rep.metric("sw_floor_std", torch.tensor(floor_vals).std().item() if cfg.n_floor > 1
               else 0.0)
    rep.metric("sw_sde_vs_data", sw_sde)
    rep.metric("sw_ode_vs_data", sw_ode)
    rep.metric("sw_sde_vs_ode", sw_between)
    rep.metric("sw_5step_sde_vs_ode", _sw(x_coarse, x_ode, cfg.seed))
    excess = max(0.0, sw_ode - floor)
    rep.claim("SW(reverse SDE, PF-ODE) vs noise floor", sw_between,
              SW_TARGET_FACTOR * floor + excess, op="<=",
              detail=f"target = 2·floor ({floor:.4f}) + model excess over floor "
                     f"({excess:.4f}); {n} samples each, 256 fixed projections")

    # exact likelihood through the PF-ODE on held-out true samples (in x coordinates)
    x_test = toy2d.sample(cfg.density, cfg.n_likelihood, g)
    t0 = time.perf_counter()
    lp_scaled, nfe_ll = pf_ode_log_likelihood(score, sde, cfg.scale * x_test, eps=cfg.eps,
                                              trace="exact", rtol=cfg.rtol, atol=cfg.rtol)
    rep.metric("likelihood_wall_s", time.perf_counter() - t0)
    rep.metric("likelihood_nfe", nfe_ll)
    # change of variables y = s·x: log p_x(x) = log p_y(s x) + D log s
    lp = lp_scaled.double() + 2 * math.log(cfg.scale)
    lp_true = toy2d.log_prob(cfg.density, x_test.double())
    gap = lp_true - lp
    rep.metric("mean_log_p_true", float(lp_true.mean()))
    rep.metric("mean_log_p_ode", float(lp.mean()))
    rep.metric("kl_stderr", float(gap.std() / math.sqrt(len(gap))))
    rep.claim("E[log p_true − log p_PF-ODE] (nats)", float(gap.mean()), KL_TARGET_NATS,
              op="<=", unit="nats",
              detail=f"paired over {len(gap)} held-out points; exact trace, RK45 "
                     f"rtol={cfg.rtol}")

    _plots(out, rep, ref, x_sde, x_ode, x_test, lp, lp_true, cfg)
    rep.note("The ε-network's score −ε/s(t) drives both samplers; the PF-ODE is integrated by "
             "scipy's RK45 from t=1 to t=eps, the reverse SDE by Euler–Maruyama, from "
             "independent prior draws. Control: a 5-step reverse SDE is at SW "
             f"{rep.metrics['sw_5step_sde_vs_ode']:.4f} from the PF-ODE samples — visibly "
             "further than the converged sampler, but the a-priori band (2·floor + excess) is "
             "wide at this sample size, so the claim only rules out gross disagreement; "
             "--full uses 5000 samples per set.")
    if not rep.claims[-1].holds:
        rep.note("The PF-ODE likelihood gap is above the margin at this training budget (the "
                 "default run is cut to fit ≤ 30 s on 2 CPU cores); --full trains "
                 f"{Config.full().steps} steps with a wider network.")
    rep.note("The likelihood is that of x_eps (data + N(0, s(eps)²) noise, s(eps) ≈ "
             f"{float(sde.marginal_coeffs(torch.tensor([cfg.eps]))[1]) / cfg.scale:.3f} in x "
             "units) under the N(0, I) prior at t = 1.")
    return rep


def _plots(out, rep, ref, x_sde, x_ode, x_test, lp, lp_true, cfg) -> None:
    lim = 3.2
    with figure(out / "samples.png", ncols=3, size=(12, 4)) as (_, axes):
        for ax, (name, pts) in zip(axes.ravel(), [("true", ref), ("reverse SDE (EM)", x_sde),
                                          ("PF-ODE (RK45)", x_ode)]):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set(title=name, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    rep.figure(out / "samples.png")
    with figure(out / "likelihood.png") as (_, ax):
        ax.scatter(lp_true, lp, s=2, alpha=0.5)
        lo, hi = float(lp_true.min()), float(lp_true.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="true log p(x)", ylabel="PF-ODE log p(x)",
               title=f"{cfg.density}: exact likelihood via PF-ODE")
    rep.figure(out / "likelihood.png")
