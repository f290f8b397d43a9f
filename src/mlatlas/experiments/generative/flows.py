"""Exact-likelihood flows on 2-D densities: RealNVP, a maximum-likelihood CNF, flow matching.

Three ways to get a density with an exact likelihood, trained on the same data:

* **RealNVP** (affine couplings + ActNorm + invertible linear mixing), maximum likelihood;
* **flow matching** (conditional OT path), trained by regression — no ODE solve in training;
* **CNF** (neural ODE), maximum likelihood through a fixed-step RK4 solve of the augmented ODE
  with the exact 2-D trace (the documented training discretisation). Maximum-likelihood CNF
  training costs ~25 network passes per step, so both runs fine-tune the flow-matching field
  by maximum likelihood (``cnf_init="fm"``). ``cnf_init="scratch"`` trains from a random
  field; with a fixed-step solver the optimiser can then exploit the discretisation (a
  1500-step run with 6 RK4 steps reached an RK4 NLL of −4.5 nats while the true, scipy-solved
  NLL was 13.2), which is why the experiment reports the training-solver NLL next to the
  exact one (``nll_rk4_*``).

Every model's test NLL is computed exactly (RealNVP by its log-determinants, the two ODE models
by scipy RK45 on the augmented ODE with the exact trace) on fresh true samples and compared
with the density's true entropy ``H = −E log p`` (Monte Carlo over 200 000 exact samples for
8 Gaussians, ``log 8`` exactly for the checkerboard). Since ``NLL − H = KL(p‖q) ≥ 0`` in
expectation, the gap measures how close the model is.

Target (fixed before any run): ``NLL − H ≤ 0.2`` nats for every model and density
(≈ 10% of the entropy, ≈ 2.1 nats, of both densities).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.datasets import toy2d
from mlatlas.generative.cnf import CNF, flow_matching_loss
from mlatlas.generative.flows import RealNVP
from mlatlas.generative.networks import MLPDenoiser
from mlatlas.generative.training import train_denoiser
from mlatlas.plots import figure
from mlatlas.report import Report

NLL_MARGIN_NATS = 0.2  # NLL − H ≤ 0.2 nats
MODELS = ("realnvp", "fm", "cnf")


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    densities: tuple[str, ...] = ("8gaussians",)  # toy2d densities with an exact log_prob
    models: tuple[str, ...] = MODELS  # any of realnvp, cnf, fm
    realnvp_steps: int = 260  # RealNVP maximum-likelihood steps
    realnvp_couplings: int = 8  # coupling layers
    realnvp_hidden: int = 32  # conditioner width
    realnvp_mixing: str = "linear"  # between couplings: none | reverse | random | linear
    realnvp_batch_size: int = 1024  # RealNVP batch (per-step overhead dominates: go wide)
    fm_steps: int = 1000  # flow-matching regression steps
    fm_hidden: int = 128  # flow-matching velocity network width
    sigma_min: float = 1e-3  # width of the conditional OT path at the data end
    batch_size: int = 512  # flow-matching batch
    ema_decay: float = 0.995  # EMA of the flow-matching / CNF weights
    cnf_init: str = "fm"  # CNF start: "fm" (fine-tune the flow-matching field) | "scratch"
    cnf_steps: int = 25  # CNF maximum-likelihood steps (RK4 through the ODE: costly)
    cnf_rk4_steps: int = 4  # RK4 steps of the training solve
    cnf_hidden: int = 64  # CNF velocity network width (with cnf_init="scratch")
    cnf_batch_size: int = 256  # CNF training batch
    cnf_lr: float = 3e-4  # CNF peak learning rate
    lr: float = 2e-3  # flow-matching peak learning rate (cosine to 0.1·lr)
    realnvp_lr: float = 3e-3  # RealNVP peak learning rate
    n_test: int = 1000  # fresh true samples for the NLL
    entropy_samples: int = 200_000  # exact samples of the Monte Carlo entropy H
    plot_samples: int = 2000  # samples drawn from each model for the figure
    rtol: float = 1e-5  # RK45 tolerance of the likelihood solves
    time_scale: float = 30.0  # sinusoidal time-embedding factor of the ODE networks
    threads: int = 1  # torch threads (tiny networks run best on one)
    seed: int = 0  # seed of data, initialisation and noise

    @classmethod
    def smoke(cls) -> Config:
        """A few steps of each model, small networks, loose RK45 (for tests)."""
        return cls(realnvp_steps=10, cnf_steps=2, fm_steps=10, n_test=64, rtol=1e-3,
                   realnvp_couplings=2, fm_hidden=32, entropy_samples=2000, plot_samples=64)

    @classmethod
    def full(cls) -> Config:
        """Both densities, longer training (≈ 15 min of CPU)."""
        return cls(densities=("8gaussians", "checkerboard"), realnvp_steps=4000,
                   realnvp_hidden=64, cnf_steps=300, cnf_rk4_steps=8, fm_steps=8000,
                   n_test=3000)


def _velocity_net(hidden: int, time_scale: float) -> MLPDenoiser:
    net = MLPDenoiser(dim=2, hidden=hidden, depth=3)
    # continuous time: a smooth embedding (the default 1000·t suits DDPM's integer steps and
    # makes the ODE stiff for adaptive solvers)
    net.time_embed.scale = time_scale
    return net


def _train(kind: str, cfg: Config, density: str, out: Path, g: torch.Generator,
           fm_net: torch.nn.Module | None = None):
    """Train one model; return ``(log_prob(x) -> [n], sampler(n) -> [n, 2], module)``."""
    data = lambda n, gen: toy2d.sample(density, n, gen)  # noqa: E731
    common = dict(generator=g, schedule="cosine", show_progress=True, desc=f"{kind} {density}",
                  checkpoint=out / f"{kind}_{density}.safetensors")
    torch.manual_seed(cfg.seed)
    if kind == "realnvp":
        flow = RealNVP(2, cfg.realnvp_couplings, cfg.realnvp_hidden, mixing=cfg.realnvp_mixing,
                       generator=torch.Generator().manual_seed(cfg.seed))
        flow(data(4096, g))  # ActNorm data-dependent initialisation
        train_denoiser(flow, lambda m, x, gen: -m.log_prob(x).mean(), data, cfg.realnvp_steps,
                       cfg.realnvp_lr, batch_size=cfg.realnvp_batch_size, warmup=50,
                       tag=f"realnvp-{cfg.realnvp_couplings}x{cfg.realnvp_hidden}-"
                           f"{cfg.realnvp_mixing}", **common)
        flow.eval()

        def log_prob(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return flow.log_prob(x)

        return log_prob, lambda n: flow.sample(n, g), flow
    if kind == "fm":
        cnf = CNF(_velocity_net(cfg.fm_hidden, cfg.time_scale))
        res = train_denoiser(
            cnf, lambda m, x, gen: flow_matching_loss(m, x, sigma_min=cfg.sigma_min,
                                                      generator=gen),
            data, cfg.fm_steps, cfg.lr, batch_size=cfg.batch_size, warmup=100,
            ema_decay=cfg.ema_decay, tag=f"fm-{cfg.fm_hidden}-{cfg.sigma_min}", **common)
    elif kind == "cnf":
        if cfg.cnf_init == "fm":
            if fm_net is None:
                raise ValueError("cnf_init='fm' needs 'fm' before 'cnf' in models")
            cnf = copy.deepcopy(fm_net).train().requires_grad_(True)
        elif cfg.cnf_init == "scratch":
            cnf = CNF(_velocity_net(cfg.cnf_hidden, cfg.time_scale))
        else:
            raise ValueError(f"cnf_init must be 'fm' or 'scratch', got {cfg.cnf_init!r}")
        res = train_denoiser(
            cnf, lambda m, x, gen: -m.log_prob(x, solver="rk4", n_steps=cfg.cnf_rk4_steps).mean(),
            data, cfg.cnf_steps, cfg.cnf_lr, batch_size=cfg.cnf_batch_size, warmup=10,
            ema_decay=cfg.ema_decay, tag=f"cnf-{cfg.cnf_init}-{cfg.cnf_rk4_steps}", **common)
    else:
        raise ValueError(f"models must be among {MODELS}, got {kind!r}")
    cnf = res.ema.eval()

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        return cnf.log_prob(x, solver="scipy", rtol=cfg.rtol, atol=cfg.rtol, trace="exact")

    return log_prob, lambda n: cnf.sample(torch.randn(n, 2, generator=g), rtol=1e-4,
                                          atol=1e-4), cnf


def run(cfg: Config, out: Path) -> Report:
    """Train each model on each density; exact test NLL against the true entropy."""
    rep = Report()
    out = Path(out)
    g = torch.Generator().manual_seed(cfg.seed)
    results: dict[tuple[str, str], dict] = {}
    for density in cfg.densities:
        if density not in ("8gaussians", "checkerboard"):
            raise ValueError(f"densities must have an exact log_prob (8gaussians, "
                             f"checkerboard), got {density!r}")
        entropy = toy2d.entropy(density, cfg.entropy_samples,
                                torch.Generator().manual_seed(cfg.seed + 1))
        rep.metric(f"entropy_{density}", entropy)
        x_test = toy2d.sample(density, cfg.n_test, g)
        lp_true = toy2d.log_prob(density, x_test.double())
        trained: dict[str, torch.nn.Module] = {}
        for kind in cfg.models:
            t0 = time.process_time()
            log_prob, sampler, trained[kind] = _train(kind, cfg, density, out, g,
                                                      trained.get("fm"))
            rep.metric(f"train_cpu_s_{kind}_{density}", time.process_time() - t0)
            t0 = time.process_time()
            lp = log_prob(x_test).double()
            rep.metric(f"nll_cpu_s_{kind}_{density}", time.process_time() - t0)
            nll = float(-lp.mean())
            rep.metric(f"nll_{kind}_{density}", nll)
            rep.metric(f"nll_stderr_{kind}_{density}", float(lp.std() / math.sqrt(len(lp))))
            rep.metric(f"paired_kl_{kind}_{density}", float((lp_true - lp).mean()))
            if kind == "cnf":  # the training solver's NLL: a large gap = exploited steps
                with torch.no_grad():
                    nll_rk4 = float(-trained[kind].log_prob(
                        x_test, solver="rk4", n_steps=cfg.cnf_rk4_steps).mean())
                rep.metric(f"nll_rk4_{kind}_{density}", nll_rk4)
            rep.claim(f"{kind} on {density}: NLL − H (nats)", nll - entropy,
                      NLL_MARGIN_NATS, op="<=", unit="nats",
                      detail=f"{cfg.n_test} fresh test points; H = {entropy:.4f}")
            results[(kind, density)] = {"samples": sampler(cfg.plot_samples)}
    _plot(out, rep, results, cfg)
    if any(not c.holds for c in rep.claims if "checkerboard" in c.name):
        rep.note("The checkerboard density is discontinuous (uniform on the dark squares, 0 "
                 "elsewhere): every smooth flow blurs its edges and puts mass on the light "
                 "squares, which is where its NLL gap comes from.")
    if any(not c.holds for c in rep.claims if c.name.startswith("realnvp")):
        rep.note("RealNVP is a diffeomorphism of a unimodal Gaussian: it cannot separate the "
                 "modes and leaves thin bridges of density between them, which costs "
                 "likelihood; at this training budget it stays above the margin (see --full "
                 "for the longer run).")
    if any(not c.holds for c in rep.claims if c.name.startswith(("fm", "cnf"))):
        rep.note("The flow-matching and CNF models stay above the margin at this budget too: the "
                 "default run is cut to fit ≤ 30 s on 2 CPU cores (fm_steps, cnf_steps and "
                 "realnvp_steps scaled down together by wall time alone); --full trains "
                 f"{Config.full().fm_steps} flow-matching steps.")
    rep.note("NLL is exact for every model: RealNVP by its log-determinants, the CNF and "
             "flow-matching models by the instantaneous change of variables solved with scipy "
             "RK45 and the exact 2-D trace. The CNF is *trained* through a fixed-step RK4 "
             f"solve ({cfg.cnf_rk4_steps} steps), a discretisation of its likelihood; "
             f"cnf_init={cfg.cnf_init!r}.")
    return rep


def _plot(out: Path, rep: Report, results: dict, cfg: Config) -> None:
    n_rows, n_cols = len(cfg.densities), len(cfg.models)
    with figure(out / "samples.png", ncols=n_cols, nrows=n_rows,
                size=(3.4 * n_cols, 3.4 * n_rows)) as (_, axes):
        for r, density in enumerate(cfg.densities):
            for c, kind in enumerate(cfg.models):
                ax, x = axes[r][c], results[(kind, density)]["samples"]
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
                nll = rep.metrics[f"nll_{kind}_{density}"]
                ax.set(title=f"{kind}, {density}\nNLL {nll:.3f}", xlim=(-3.2, 3.2),
                       ylim=(-3.2, 3.2), aspect="equal")
    rep.figure(out / "samples.png")
