"""Performer / FAVOR+: unbiased softmax-kernel estimate, error ∝ 1/m, orthogonal < i.i.d.

Three measurements on random ``q, k, v`` (fp64, so that only the estimator's randomness is
measured):

1. **Unbiasedness.** For fixed pairs ``(q, k)``, the mean of ``φ(q)·φ(k)`` over many
   independent draws of the projection approaches ``exp(q·k)``; the deviation is compared
   with the standard error of the mean (a z-score).
2. **Error ∝ 1/m.** The mean squared error of FAVOR+ attention against exact softmax
   attention, averaged over draws, for m = 16 … 1024; the slope of log MSE against log m is
   fitted (theory: −1, since bias and variance of the ratio estimator are both O(1/m)).
3. **Orthogonal vs i.i.d.** The same MSE with i.i.d. Gaussian projections.

Regime: the variance of the positive estimator grows like ``exp(|q + k|²)`` (Lemma 2 of the
paper), so the 1/m law is asymptotic and only visible once ``m ≫ exp(|q + k|²)``. The
claims use entries of ``q, k`` with std ``input_std = 0.5`` at d = 16 (``|q·d^{-1/4}|² ≈ 1``),
a regime where that holds over the swept m; the slope in a unit-variance regime
(``high_norm_std = 1``) is reported as a metric to show where FAVOR+ struggles.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mlatlas.attention.performer import (
    favor_attention,
    gaussian_projection,
    positive_random_features,
)
from mlatlas.measure import loglog_slope
from mlatlas.plots import curves, figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds q, k, v and every projection draw
    head_dim: int = 16  # d
    seq_len: int = 64  # N of the attention-error measurement
    heads: int = 4  # independent attention instances (batch 1)
    input_std: float = 0.5  # std of q, k entries in the claim regime (see module docstring)
    high_norm_std: float = 1.0  # std of q, k entries of the reported high-norm regime
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)  # m swept
    draws: int = 48  # projection draws per m (MSE averaged over them)
    kernel_pairs: int = 8  # (q, k) pairs of the unbiasedness test
    kernel_draws: int = 4000  # projection draws of the unbiasedness test
    kernel_features: int = 16  # m of the unbiasedness test (one orthogonal block at d = 16)
    slope_tolerance: float = 0.2  # claim: |fitted slope + 1| <= this (fixed a priori)
    threads: int = 1  # torch intra-op threads (tiny tensors gain nothing from more); 0: default

    @classmethod
    def smoke(cls) -> Config:
        """A few draws, for tests: m ∈ {16, 32, 64}, 2 draws, N = 16, 200 kernel draws."""
        return cls(features=cls.features[:3], draws=2, kernel_draws=200, seq_len=16)


def _kernel_bias(cfg: Config, gen: torch.Generator, orthogonal: bool) -> dict[str, list[float]]:
    d, m, r = cfg.head_dim, cfg.kernel_features, cfg.kernel_draws
    q = torch.randn(cfg.kernel_pairs, d, generator=gen, dtype=torch.float64) * cfg.input_std
    k = torch.randn(cfg.kernel_pairs, d, generator=gen, dtype=torch.float64) * cfg.input_std
    q, k = q * d ** -0.25, k * d ** -0.25  # softmax scale 1/√d split over q and k
    exact = torch.exp((q * k).sum(-1))  # exp(q·k)
    # r independent draws of m features at once: with m a multiple of d, the orthogonal
    # blocks of one [r·m, d] projection are independent, so consecutive groups of m rows are
    # r independent FAVOR+ projections.
    if orthogonal and m % d:
        raise ValueError(f"kernel_features must be a multiple of head_dim, got {m} and {d}")
    w = gaussian_projection(r * m, d, orthogonal=orthogonal, generator=gen, dtype=torch.float64)
    fq = positive_random_features(q, w, is_query=True, stabilize=False)  # [P, r·m] / √(r·m)
    fk = positive_random_features(k, w, is_query=False, stabilize=False)
    est = (fq * fk).view(cfg.kernel_pairs, r, m).sum(-1) * r  # rescale 1/(r·m) → 1/m
    mean, std = est.mean(1), est.std(1)  # est[p, i]: draw i of φ(q_p)·φ(k_p)
    z = (mean - exact) / (std / math.sqrt(r))
    return {"z": z.tolist(), "rel_bias": ((mean - exact) / exact).tolist(),
            "rel_std": (std / exact).tolist()}


def _mse_curve(cfg: Config, gen: torch.Generator, std: float, orthogonal: bool, causal: bool,
               features: tuple[int, ...], draws: int) -> list[float]:
    shape = (1, cfg.heads, cfg.seq_len, cfg.head_dim)
    q = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    k = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mses = []
    for m in features:
        errs = []
        for _ in range(draws):
            w = gaussian_projection(m, cfg.head_dim, orthogonal=orthogonal, generator=gen,
                                    dtype=torch.float64)
            approx = favor_attention(q, k, v, w, causal=causal, chunk_size=32)
            errs.append((approx - exact).pow(2).mean().item())
        mses.append(statistics.fmean(errs))
    return mses


def run(cfg: Config, out: Path) -> Report:
    """Unbiasedness of the kernel estimate, the 1/m error law, orthogonal vs i.i.d."""
    rep = Report()
    gen = torch.Generator().manual_seed(cfg.seed)
    features, draws = cfg.features, cfg.draws

    # 1. Unbiasedness of the kernel estimate.
    kb = _kernel_bias(cfg, gen, orthogonal=True)
    kb_iid = _kernel_bias(cfg, gen, orthogonal=False)
    max_z = max(abs(z) for z in kb["z"])
    rep.claim("unbiased: max |mean − exp(q·k)| / standard error over pairs", max_z, 4.0,
              op="<=", detail=f"{cfg.kernel_pairs} pairs, {cfg.kernel_draws} orthogonal draws "
              f"of m={cfg.kernel_features}; |z| ≤ 4 for unbiased estimates")
    rep.metric("kernel: max |relative bias| (orthogonal)", max(map(abs, kb["rel_bias"])))
    rep.metric("kernel: mean per-draw relative std (orthogonal)", statistics.fmean(kb["rel_std"]))
    rep.metric("kernel: max |z| (i.i.d.)", max(abs(z) for z in kb_iid["z"]))
    rep.metric("kernel: mean per-draw relative std (i.i.d.)",
               statistics.fmean(kb_iid["rel_std"]))

    # 2-3. Attention MSE vs m, orthogonal and i.i.d.
    orth = _mse_curve(cfg, gen, cfg.input_std, True, False, features, draws)
    iid = _mse_curve(cfg, gen, cfg.input_std, False, False, features, draws)
    orth_c = _mse_curve(cfg, gen, cfg.input_std, True, True, features, draws)
    high = _mse_curve(cfg, gen, cfg.high_norm_std, True, False, features, draws)
    slope = loglog_slope(list(features), orth)
    rep.metric("MSE slope vs m (orthogonal)", slope)
    rep.claim("error ∝ 1/m: |fitted log-log slope of MSE vs m + 1| (orthogonal)",
              abs(slope + 1.0), cfg.slope_tolerance, op="<=", target_source="slope_tolerance",
              detail=f"slope {slope:.3f}; m = {features[0]}…{features[-1]}, {draws} draws each")
    upper = len(features) // 2
    rep.metric(f"MSE slope vs m for m >= {features[upper]} (orthogonal)",
               loglog_slope(list(features[upper:]), orth[upper:]))
    rep.metric("MSE slope vs m (i.i.d.)", loglog_slope(list(features), iid))
    rep.metric("MSE slope vs m (orthogonal, causal)", loglog_slope(list(features), orth_c))
    rep.metric(f"MSE slope vs m (orthogonal, input std {cfg.high_norm_std})",
               loglog_slope(list(features), high))
    ratios = [o / i for o, i in zip(orth, iid)]
    for m, o, i, r in zip(features, orth, iid, ratios):
        rep.metric(f"MSE orthogonal @m={m}", o)
        rep.metric(f"MSE iid @m={m}", i)
        rep.metric(f"MSE ratio orth/iid @m={m}", r)
    rep.metric("MSE ratio orth/iid, geometric mean over m",
               math.exp(statistics.fmean(math.log(r) for r in ratios)))
    rep.claim("orthogonal beats i.i.d.: max over m of MSE_orth / MSE_iid", max(ratios), 1.0,
              op="<", detail="equal m, same q, k, v, independent draws")
    with figure(out / "mse_vs_m.png") as (_, ax):
        ref = [orth[0] * features[0] / m for m in features]
        curves(ax, {"orthogonal (FAVOR+)": orth, "i.i.d.": iid, "orthogonal, causal": orth_c,
                    f"orthogonal, input std {cfg.high_norm_std}": high, "∝ 1/m": ref},
               x=list(features), xlabel="random features m", ylabel="MSE vs exact attention",
               logx=True, logy=True, title=f"FAVOR+ error, d={cfg.head_dim}, N={cfg.seq_len}")
    rep.figure(out / "mse_vs_m.png")
    rep.note("The fitted slope comes out shallower than the asymptotic −1 (about −0.80 to "
             "−0.83 for seeds 0-2 at these settings), close to the a-priori tolerance. A "
             "plausible cause: FAVOR+ outputs are convex combinations of the values, which "
             "caps the error at small m below the linearised 1/m law; the slope over the "
             "larger m is reported separately.")
    rep.note("Regime: the estimator's variance grows like exp(|q+k|²); at input std "
             f"{cfg.high_norm_std} the MSE falls more slowly than 1/m over this range of m "
             "(see its slope metric): the 1/m law is asymptotic in m.")
    return rep
