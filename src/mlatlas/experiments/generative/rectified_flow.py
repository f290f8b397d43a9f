"""Rectified flow on a 2-D density: reflow makes one- and two-step sampling work.

1-RF is trained on independent (noise, data) pairs; its ODE (100 Euler steps) then produces
the deterministic couplings ``(x0, ODE(x0))`` on which 2-RF is trained (initialised from 1-RF,
as in the paper). Quality is the sliced Wasserstein distance (SW) to fresh true samples.

Targets (fixed before any run):

* 2-RF with 1 and with 2 Euler steps: ``SW_k ≤ 1.2 · SW_100 + 2·σ_floor`` with ``SW_100`` the
  2-RF's own 100-step SW (``reference_steps``) and ``σ_floor`` the standard deviation of SW
  between two independent true sample sets (the metric's noise: a 20% band is meaningless
  below it).
* Straightness ``S = ∫ E‖(Z1 − Z0) − v(Z_t, t)‖² dt`` along each flow's own 100-step paths:
  ``S(2-RF) ≤ 0.5 · S(1-RF)``.

``bench()`` (``mlatlas bench rectified-flow``) puts 1-RF, 2-RF, DDIM (η = 0) and DDPM
(ancestral, all T = 1000 steps) side by side: SW and wall time against network evaluations.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.datasets import toy2d
from mlatlas.generative.metrics import sliced_wasserstein
from mlatlas.generative.networks import MLPDenoiser
from mlatlas.generative.rectified_flow import (
    rectified_flow_loss,
    reflow_couplings,
    sample_euler,
    straightness,
)
from mlatlas.generative.training import train_denoiser
from mlatlas.measure import compare_times
from mlatlas.plots import curves, figure
from mlatlas.report import Report

FEW_STEP_FACTOR = 1.2  # k-step SW within 20% of the 100-step SW (+ 2 σ of the metric)
STRAIGHTNESS_RATIO = 0.5  # S(2-RF) ≤ 0.5 · S(1-RF)


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    density: str = "8gaussians"  # toy2d density
    scale: float = 0.5  # the flows transport N(0, I) to scale·x
    steps: int = 2000  # 1-RF training steps
    reflow_steps: int = 1300  # 2-RF training steps (initialised from 1-RF)
    n_couplings: int = 12000  # (x0, ODE(x0)) pairs generated for reflow
    coupling_steps: int = 100  # Euler steps of the 1-RF ODE that generates them
    batch_size: int = 512  # training batch
    lr: float = 2e-3  # 1-RF peak learning rate (cosine to 0.1·lr)
    reflow_lr: float = 1e-3  # 2-RF peak learning rate
    hidden: int = 64  # MLPDenoiser width
    depth: int = 3  # MLPDenoiser hidden layers
    time_scale: float = 30.0  # sinusoidal time-embedding factor (smooth in continuous t)
    ema_decay: float = 0.995  # EMA of the weights used for sampling
    n_eval: int = 3000  # samples per quality measurement
    eval_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 100)  # Euler step counts evaluated
    reference_steps: int = 100  # Euler steps of the reference SW and of the straightness paths
    n_floor: int = 5  # pairs of true sample sets for the SW noise floor
    threads: int = 1  # torch threads (tiny networks run best on one)
    bench_nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 100)  # bench(): NFEs besides eval_steps
    ddpm_timesteps: int = 1000  # bench(): T of the DDPM/DDIM baseline (DDPM samples all T)
    bench_repeats: int = 3  # timed rounds per sampler in bench() (median reported)
    seed: int = 0  # seed of data, initialisation, noise and projections

    @classmethod
    def smoke(cls) -> Config:
        """A few training steps, 256 samples, 8-step reference (for tests)."""
        return cls(steps=15, reflow_steps=10, n_couplings=256, coupling_steps=8, n_eval=256,
                   eval_steps=(1, 2, 8), reference_steps=8, n_floor=2, bench_nfes=(1, 2),
                   ddpm_timesteps=100, bench_repeats=1)

    @classmethod
    def full(cls) -> Config:
        """Longer training (≈ 2 min)."""
        return cls(steps=10000, reflow_steps=6000, n_couplings=50000, n_eval=10000)


def _sw(a: torch.Tensor, b: torch.Tensor, seed: int) -> float:
    # the same projections for every comparison: differences are not projection noise
    return sliced_wasserstein(a, b, 256, generator=torch.Generator().manual_seed(seed + 7))


def _floor(cfg: Config, g: torch.Generator) -> tuple[float, float, torch.Tensor]:
    sets = [toy2d.sample(cfg.density, cfg.n_eval, g) for _ in range(2 * cfg.n_floor + 1)]
    vals = torch.tensor([_sw(sets[2 * i], sets[2 * i + 1], cfg.seed)
                         for i in range(cfg.n_floor)])
    return float(vals.mean()), float(vals.std()) if cfg.n_floor > 1 else 0.0, sets[-1]


def train_flows(cfg: Config, out: Path, g: torch.Generator
                ) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, float]]:
    """Train 1-RF, generate its couplings, train 2-RF; return both EMA models and timings."""
    info: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    model = MLPDenoiser(dim=2, hidden=cfg.hidden, depth=cfg.depth)
    model.time_embed.scale = cfg.time_scale  # the default 1000·t is tuned to DDPM's integer t
    tag = f"{cfg.density}-{cfg.hidden}x{cfg.depth}-{cfg.batch_size}-{cfg.time_scale}"
    t0 = time.process_time()
    r1 = train_denoiser(
        model, lambda m, x1, gen: rectified_flow_loss(m, x1, generator=gen),
        lambda n, gen: cfg.scale * toy2d.sample(cfg.density, n, gen), cfg.steps, cfg.lr,
        batch_size=cfg.batch_size, generator=g, schedule="cosine", warmup=100,
        ema_decay=cfg.ema_decay, checkpoint=out / "rf1.safetensors", tag=f"rf1-{tag}",
        show_progress=True, desc="1-RF")
    info["train_1rf_cpu_s"] = time.process_time() - t0
    rf1 = r1.ema.eval()

    # reflow: the 1-RF ODE pairs each noise sample with a data point deterministically
    t0 = time.process_time()
    x0 = torch.randn(cfg.n_couplings, 2, generator=g)
    x0, x1 = reflow_couplings(rf1, x0, cfg.coupling_steps)
    info["couplings_cpu_s"] = time.process_time() - t0

    def pairs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, x0.shape[0], (n,), generator=gen)
        return x0[idx], x1[idx]

    model2 = MLPDenoiser(dim=2, hidden=cfg.hidden, depth=cfg.depth)
    model2.time_embed.scale = cfg.time_scale
    model2.load_state_dict(rf1.state_dict())  # 2-RF starts from 1-RF (paper, Sec. 3)
    t0 = time.process_time()
    r2 = train_denoiser(
        model2, lambda m, b, gen: rectified_flow_loss(m, b[1], b[0], generator=gen), pairs,
        cfg.reflow_steps, cfg.reflow_lr, batch_size=cfg.batch_size, generator=g,
        schedule="cosine", ema_decay=cfg.ema_decay, checkpoint=out / "rf2.safetensors",
        tag=f"rf2-{tag}-{cfg.n_couplings}", show_progress=True, desc="2-RF (reflow)")
    info["train_2rf_cpu_s"] = time.process_time() - t0
    return rf1, r2.ema.eval(), info


def run(cfg: Config, out: Path) -> Report:
    """Train 1-RF and 2-RF; SW against Euler steps, straightness of both flows."""
    ref_steps = cfg.reference_steps
    if ref_steps not in cfg.eval_steps or 1 not in cfg.eval_steps or 2 not in cfg.eval_steps:
        raise ValueError(f"eval_steps must contain 1, 2 and reference_steps={ref_steps}, got "
                         f"{cfg.eval_steps}")
    rep = Report()
    out = Path(out)
    g = torch.Generator().manual_seed(cfg.seed)
    rf1, rf2, info = train_flows(cfg, out, g)
    for k, v in info.items():
        rep.metric(k, v)
    floor, floor_std, ref = _floor(cfg, g)
    rep.metric("sw_floor_true_vs_true", floor)
    rep.metric("sw_floor_std", floor_std)
    z = torch.randn(cfg.n_eval, 2, generator=g)
    sw: dict[str, list[float]] = {"1-RF": [], "2-RF": []}
    samples = {}
    for name, net in (("1-RF", rf1), ("2-RF", rf2)):
        for k in cfg.eval_steps:
            x = sample_euler(net, z, k) / cfg.scale
            samples[(name, k)] = x
            sw[name].append(_sw(x, ref, cfg.seed))
            rep.metric(f"sw_{name}_{k}step", sw[name][-1])
    s1, c1 = straightness(rf1, z, ref_steps)
    s2, c2 = straightness(rf2, z, ref_steps)
    rep.metric("straightness_1rf", s1)
    rep.metric("straightness_2rf", s2)

    sw100 = dict(zip(cfg.eval_steps, sw["2-RF"]))[ref_steps]
    sw100_1rf = dict(zip(cfg.eval_steps, sw["1-RF"]))[ref_steps]
    target = FEW_STEP_FACTOR * sw100 + 2 * floor_std
    for k in (1, 2):
        measured = dict(zip(cfg.eval_steps, sw["2-RF"]))[k]
        rep.claim(f"2-RF {k}-step SW vs its {ref_steps}-step SW", measured, target, op="<=",
                  detail=f"target = 1.2·{sw100:.4f} + 2·σ_floor ({floor_std:.4f}); "
                         f"{cfg.n_eval} samples, 256 fixed projections")
        rep.metric(f"ratio_2rf_{k}step_to_1rf_{ref_steps}step",
                   dict(zip(cfg.eval_steps, sw["2-RF"]))[k] / sw100_1rf)
    rep.metric("ratio_1rf_1step_to_1rf_100step",
               dict(zip(cfg.eval_steps, sw["1-RF"]))[1] / sw100_1rf)
    rep.claim("straightness S(2-RF) / S(1-RF)", s2 / s1 if s1 > 0 else float("nan"),
              STRAIGHTNESS_RATIO, op="<=",
              detail="S along each flow's own Euler paths from the same noise (flow space)")

    with figure(out / "straightness.png") as (_, ax):
        t = (torch.arange(len(c1)) / len(c1)).tolist()
        curves(ax, {f"1-RF (S={s1:.3f})": c1.tolist(), f"2-RF (S={s2:.3f})": c2.tolist()}, x=t,
               xlabel="t", ylabel="E‖(Z1−Z0) − v(Z_t, t)‖²", logy=True,
               title="straightness along the ODE paths")
    rep.figure(out / "straightness.png")
    with figure(out / "quality_vs_steps.png") as (_, ax):
        curves(ax, {**sw, "true vs true": [floor] * len(cfg.eval_steps)}, x=cfg.eval_steps,
               xlabel="Euler steps (network evaluations)", ylabel="sliced Wasserstein",
               logx=True, logy=True, title=f"{cfg.density}: quality vs steps")
    rep.figure(out / "quality_vs_steps.png")
    show = [k for k in (1, 2, ref_steps) if k in cfg.eval_steps]
    with figure(out / "samples.png", ncols=len(show), nrows=2,
                size=(3.2 * len(show), 6.4)) as (_, axes):
        for r, name in enumerate(("1-RF", "2-RF")):
            for c, k in enumerate(show):
                ax, x = axes[r][c], samples[(name, k)]
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
                ax.set(title=f"{name}, {k} step{'s' if k > 1 else ''}", xlim=(-3.2, 3.2),
                       ylim=(-3.2, 3.2), aspect="equal")
    rep.figure(out / "samples.png")
    rep.note("SW is measured in data coordinates against a fresh true set of the same size; "
             "the noise floor is SW between two independent true sets. 1-RF's 1-step samples "
             "collapse towards the mean of the data (the averaged velocity), which reflow fixes.")
    return rep


# ------------------------------------------------------------------------------ bench
def bench(cfg: Config, out: Path) -> Report:
    """Quality (SW) and sampling wall time vs network evaluations: 1-RF, 2-RF, DDIM, DDPM."""
    from mlatlas.generative.ddim import DDIMScheduler, ddim_sample
    from mlatlas.generative.ddpm import DDPMScheduler, denoise, network_fn
    from mlatlas.generative.noise_schedule import NoiseSchedule, epsilon_loss

    rep = Report()
    out = Path(out)
    g = torch.Generator().manual_seed(cfg.seed)
    nfes = sorted(set(cfg.eval_steps) | set(cfg.bench_nfes))
    if 2 not in nfes:
        raise ValueError(f"bench_nfes or eval_steps must contain 2 (the claims), got {nfes}")
    T = cfg.ddpm_timesteps
    ddpm_name = f"DDPM-{T}"
    rf1, rf2, _ = train_flows(cfg, out, g)
    torch.manual_seed(cfg.seed)
    eps_net = MLPDenoiser(dim=2, hidden=cfg.hidden, depth=cfg.depth)
    sched = NoiseSchedule(T)
    rd = train_denoiser(
        eps_net, lambda m, x, gen: epsilon_loss(m, x, sched, gen),
        lambda n, gen: cfg.scale * toy2d.sample(cfg.density, n, gen), cfg.steps, cfg.lr,
        batch_size=cfg.batch_size, generator=g, schedule="cosine", warmup=100,
        ema_decay=cfg.ema_decay, checkpoint=out / "ddpm.safetensors",
        tag=f"ddpm-{cfg.density}-{cfg.hidden}x{cfg.depth}", show_progress=True, desc="DDPM")
    eps_fn = network_fn(rd.ema.eval(), T)
    floor, floor_std, ref = _floor(cfg, g)
    rep.metric("sw_floor_true_vs_true", floor)
    z = torch.randn(cfg.n_eval, 2, generator=g)

    # every sampler is deterministic given z (DDPM re-seeds its generator): it can be timed
    # repeatedly and its samples scored once
    def ddim(k: int) -> torch.Tensor:
        s = DDIMScheduler(T, clip_sample=False, timestep_spacing="trailing")
        s.set_timesteps(k)
        return ddim_sample(eps_fn, s, z)

    def ddpm() -> torch.Tensor:
        s = DDPMScheduler(T, clip_sample=False)
        s.set_timesteps(T)
        return denoise(eps_fn, s, z, generator=torch.Generator().manual_seed(cfg.seed))

    methods = {"1-RF": lambda k: sample_euler(rf1, z, k),
               "2-RF": lambda k: sample_euler(rf2, z, k), "DDIM": ddim}
    quality: dict[str, list[float]] = {m: [] for m in methods}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    t_ddpm = float("nan")
    sw_ddpm = _sw(ddpm() / cfg.scale, ref, cfg.seed)
    for k in nfes:  # interleaved: every method at this NFE, median of rounds
        candidates = {name: functools.partial(fn, k) for name, fn in methods.items()}
        for name, draw in candidates.items():  # scored once: also each one's warm-up
            quality[name].append(_sw(draw() / cfg.scale, ref, cfg.seed))
            rep.metric(f"sw_{name}_{k}nfe", quality[name][-1])
        if k == 2:  # the speed-up claim: 2-RF 2-step and DDPM T-step in the same rounds
            candidates[ddpm_name] = ddpm
        times = compare_times(candidates, repeats=cfg.bench_repeats, warmup=0)
        for name in methods:
            wall[name].append(times[name].median_s)
            rep.metric(f"wall_s_{name}_{k}nfe", wall[name][-1])
        if k == 2:
            t_ddpm = times[ddpm_name].median_s
    rep.metric(f"sw_DDPM_{T}nfe", sw_ddpm)
    rep.metric(f"wall_s_DDPM_{T}nfe", t_ddpm)

    i2 = nfes.index(2)
    rep.claim("SW 2-RF / SW DDIM at 2 network evaluations", quality["2-RF"][i2] /
              quality["DDIM"][i2], 1.0, op="<=", unit="x",
              detail=f"{cfg.n_eval} samples each, same noise, same network size and steps")
    rep.claim(f"wall-time speed-up 2-RF 2-step vs DDPM {T}-step", t_ddpm / wall["2-RF"][i2],
              100.0, op=">=", unit="x",
              detail=f"median of {cfg.bench_repeats} interleaved rounds, {cfg.n_eval} samples")
    rep.metric(f"sw_ratio_2rf_2nfe_to_ddpm_{T}", quality["2-RF"][i2] / sw_ddpm)
    with figure(out / "bench_quality_vs_nfe.png", ncols=2, size=(10, 4)) as (_, axes):
        curves(axes[0][0], {**quality, ddpm_name: [sw_ddpm] * len(nfes),
                            "true vs true": [floor] * len(nfes)}, x=nfes,
               xlabel="network evaluations", ylabel="sliced Wasserstein", logx=True, logy=True,
               title="quality vs NFE")
        curves(axes[0][1], {**wall, ddpm_name: [t_ddpm] * len(nfes)}, x=nfes,
               xlabel="network evaluations", ylabel="wall time (s)", logx=True, logy=True,
               title=f"sampling {cfg.n_eval} points")
    rep.figure(out / "bench_quality_vs_nfe.png")
    rep.note("DDIM uses η = 0 and 'trailing' timestep spacing (the spacing that keeps the "
             f"first step at t = T for very few steps); the ε-network (linear β, T = {T}) has "
             "the same size, data scaling and training budget as the flows and is not tuned "
             "further (the ddim experiment has its own, larger-batch setup). Wall times are "
             f"sampling only, on {cfg.threads} thread(s), median of {cfg.bench_repeats} "
             "interleaved rounds after a warm-up (mlatlas.measure.compare_times).")
    return rep
