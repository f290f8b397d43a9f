"""Adam with L2 vs AdamW: the same decay coefficient, a different effective decay per weight.

With L2 regularisation the term ``λθ`` is added to the gradient and then divided, like the
gradient, by Adam's ``√v̂``. A weight whose gradient is noisy (large ``v``) is therefore decayed
*less* and a weight with a quiet gradient *more*; AdamW shrinks every weight by the same factor
``(1 − αλ)`` per step (Loshchilov & Hutter 2019, §2–3).

The demonstration isolates the decay: ``groups`` of ``width`` weights, all starting at 1, whose
gradients are pure zero-mean noise of standard deviation ``σ`` (one ``σ`` per group, from very
quiet to very noisy). Without decay no group would drift on average, so the retained fraction
``r = mean θ_T / θ_0`` of each group is the effective decay. Both optimizers see the same
noise sequence. Claims (targets fixed before running):

* **AdamW decays every group alike** — ``max r / min r ≤ 1.1`` over the groups;
* **Adam + L2 does not** — the noisiest group retains ``≥ 0.5`` more of its weight than the
  quietest (``r_noisy − r_quiet ≥ 0.5``);
* **same trajectory as torch** — every step of ours equals ``torch.optim.Adam`` /
  ``torch.optim.AdamW`` on the same run (float64, max ``|Δθ| ≤ 1e-12``).

``bench`` times one optimizer step of ours against ``torch.optim.AdamW`` (foreach and for-loop
paths) on the parameter shapes of a small transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.measure import compare_times
from mlatlas.optim import Adam, AdamW
from mlatlas.plots import figure
from mlatlas.report import Report
from mlatlas.runtime import progress


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds the gradient noise
    steps: int = 1000  # optimizer steps
    lr: float = 1e-2  # learning rate α (both optimizers)
    weight_decay: float = 0.1  # λ (both optimizers): L2 for Adam, decoupled for AdamW
    sigmas: tuple[float, ...] = (0.01, 1.0, 100.0)  # gradient-noise std of each group
    width: int = 400  # weights per group (their mean averages out the random walk)
    alike_tolerance: float = 1.1  # claim: AdamW max r / min r ≤ this
    l2_gap: float = 0.5  # claim: Adam+L2 r_noisy − r_quiet ≥ this
    bench_layers: int = 4  # transformer blocks whose parameter shapes the bench optimizes
    bench_width: int = 256  # their width d (4d MLP, vocab 1000)
    bench_repeats: int = 30  # timed steps per variant (median), after 5 warm-up steps

    @classmethod
    def smoke(cls) -> Config:
        """A few steps, for tests: 100 optimizer steps, a tiny bench."""
        return cls(steps=100, bench_layers=1, bench_width=32, bench_repeats=2)


def _trajectories(cfg: Config) -> dict[str, torch.Tensor]:
    """Mean θ per group after every step: ``{name: [steps + 1, groups]}``; also runs torch."""
    sig = torch.tensor(cfg.sigmas, dtype=torch.float64).repeat_interleave(cfg.width)
    runs = {
        "Adam + L2": (Adam, torch.optim.Adam),
        "AdamW": (AdamW, torch.optim.AdamW),
    }
    params = {k: [torch.nn.Parameter(torch.ones(len(sig), dtype=torch.float64))
                  for _ in range(2)] for k in runs}
    opts = {k: [cls(params[k][i:i + 1], lr=cfg.lr, weight_decay=cfg.weight_decay)
                for i, cls in enumerate(pair)] for k, pair in runs.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    means = {k: [params[k][0].detach().view(len(cfg.sigmas), -1).mean(1)] for k in runs}
    max_dev = {k: 0.0 for k in runs}
    for _ in progress(range(cfg.steps), cfg.steps, "adam vs adamw"):
        noise = torch.randn(len(sig), generator=gen, dtype=torch.float64) * sig  # g = σ ξ
        for k in runs:
            for p, opt in zip(params[k], opts[k]):
                p.grad = noise.clone()
                opt.step()
            ours, ref = params[k]
            max_dev[k] = max(max_dev[k], (ours - ref).abs().max().item())
            means[k].append(ours.detach().view(len(cfg.sigmas), -1).mean(1))
    out = {k: torch.stack(v) for k, v in means.items()}
    out["_dev"] = torch.tensor([max_dev[k] for k in runs])
    return out


def run(cfg: Config, out: Path) -> Report:
    """Retained weight per gradient-noise group under Adam+L2 and AdamW."""
    rep = Report()
    steps = cfg.steps
    traj = _trajectories(cfg)
    dev = traj.pop("_dev")
    retained = {k: v[-1] for k, v in traj.items()}  # r = mean θ_T / θ_0 (θ_0 = 1)
    for k, r in retained.items():
        for s, val in zip(cfg.sigmas, r.tolist()):
            rep.metric(f"{k}: retained r (σ={s:g})", val)
    r_w = retained["AdamW"]
    rep.metric("AdamW: theory (1 − αλ)^T", (1 - cfg.lr * cfg.weight_decay) ** steps)
    rep.claim("AdamW: max r / min r over noise groups", (r_w.max() / r_w.min()).item(),
              cfg.alike_tolerance, "<=", target_source="alike_tolerance",
              detail=f"σ ∈ {list(cfg.sigmas)}, {steps} steps, α={cfg.lr}, λ={cfg.weight_decay}")
    r_l2 = retained["Adam + L2"]
    rep.claim("Adam + L2: r(noisiest) − r(quietest)", (r_l2[-1] - r_l2[0]).item(), cfg.l2_gap,
              ">=", target_source="l2_gap", detail="the L2 term is divided by √v̂: noisy weights are decayed less")
    rep.claim("max |θ_ours − θ_torch| over the run (Adam and AdamW)", dev.max().item(), 1e-12,
              "<=", detail="float64, every step compared")
    # the solutions differ: distance between the two final weight vectors per group
    rep.metric("|r_AdamW − r_Adam+L2| max over groups", (r_w - r_l2).abs().max().item())
    rep.note("Gradients are pure zero-mean noise, so any drift of the group mean is the decay. "
             "Adam+L2 decays the quiet group fastest (λθ dominates its tiny √v̂) and barely "
             "touches the noisy one; AdamW follows (1 − αλ)^t in every group.")

    path = out / "retained_weight.png"
    with figure(path, title="mean weight per gradient-noise group") as (fig, ax):
        t = range(steps + 1)
        for (k, v), style in zip(traj.items(), ("-", "--")):
            for j, s in enumerate(cfg.sigmas):
                ax.plot(t, v[:, j].tolist(), style, color=f"C{j}", label=f"{k}, σ={s:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("mean θ (started at 1)")
        ax.legend(fontsize=7)
    rep.figure(path)
    return rep


def _bench_params(cfg: Config) -> list[torch.nn.Parameter]:
    d, shapes = cfg.bench_width, [(1000, cfg.bench_width)]
    for _ in range(cfg.bench_layers):  # q, k, v, o, gate, up, down, two norms per block
        shapes += [(d, d)] * 4 + [(4 * d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
    g = torch.Generator().manual_seed(cfg.seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def bench(cfg: Config, out: Path) -> Report:
    """One AdamW step: ours vs torch, foreach and for-loop paths (interleaved, median)."""
    rep = Report()
    variants = {}
    for name, cls in (("ours", AdamW), ("torch", torch.optim.AdamW)):
        for foreach in (True, False):
            params = _bench_params(cfg)
            variants[f"{name} {'foreach' if foreach else 'for-loop'}"] = cls(
                params, lr=1e-3, weight_decay=0.1, foreach=foreach)
    timings = compare_times({k: opt.step for k, opt in variants.items()},
                            repeats=cfg.bench_repeats, warmup=5)
    med = {k: t.median_s for k, t in timings.items()}
    for k, v in med.items():
        rep.metric(f"step ms: {k}", 1e3 * v)
    n = sum(p.numel() for p in _bench_params(cfg))
    rep.metric("parameters", n)
    rep.metric("for-loop: ours / torch", med["ours for-loop"] / med["torch for-loop"])
    rep.claim("foreach step time: ours / torch.optim.AdamW(foreach=True)", med["ours foreach"] / med["torch foreach"],
              1.25, "<=", unit="x",
              detail=f"{n} parameters in {len(_bench_params(cfg))} tensors, median of "
                     f"{cfg.bench_repeats} interleaved rounds after 5 warm-up steps")
    return rep
