"""Linear attention: exact against its quadratic form, and linear in N against softmax SDPA.

``run`` checks the two correctness claims (the O(N) forms equal the explicit quadratic form
``φ(Q)φ(K)ᵀV`` normalised, forward and gradients; step-by-step decoding with the recurrent
state equals the causal parallel form) and times a short length sweep against
``F.scaled_dot_product_attention``. ``bench`` runs the full sweep to N = 16k with memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from mlatlas.attention.linear import LinearAttentionState, get_feature_map, linear_attention
from mlatlas.measure import PeakMemory, compare_times, loglog_slope
from mlatlas.plots import curves, figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds the random q, k, v
    parity_len: int = 203  # sequence length of the parity checks (not a multiple of chunks)
    parity_dim: int = 24  # head dim of the parity checks
    chunk_size: int = 64  # causal chunk length C of linear_attention
    batch: int = 1  # batch of the timing sweeps
    heads: int = 1  # heads of the timing sweeps
    head_dim: int = 64  # head dim d of the timing sweeps
    run_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)  # N swept by run()
    bench_lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # bench N
    materialised_max: int = 8192  # largest N for the materialised-softmax memory baseline
    repeats: int = 3  # timed repeats per (method, N) after one warm-up; median reported
    threads: int = 0  # torch intra-op threads while timing; 0 keeps torch's default

    @classmethod
    def smoke(cls) -> Config:
        """Tiny sizes, for tests (the bench sweeps N ≤ 256 once)."""
        return cls(parity_len=37, parity_dim=8, chunk_size=16, run_lengths=(64, 128, 256),
                   bench_lengths=(64, 128, 256), materialised_max=256, repeats=1)


# ----------------------------------------------------------------------------- parity
def _quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               eps: float = 1e-6) -> torch.Tensor:
    """The O(N²) reference: A = φ(Q)φ(K)ᵀ (masked), O = A V / rowsum(A)."""
    phi = get_feature_map("elu+1")
    a = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def _parity(cfg: Config, gen: torch.Generator) -> dict[str, float]:
    n, d = cfg.parity_len, cfg.parity_dim
    errs: dict[str, float] = {}
    for causal in (False, True):
        q, k, v = (torch.randn(2, 3, n, d, generator=gen) for _ in range(3))
        qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        qr = [t.double().requires_grad_(True) for t in (q, k, v)]
        out = linear_attention(*qs, causal=causal, chunk_size=cfg.chunk_size)
        ref = _quadratic(*qr, causal=causal)
        g = torch.randn(out.shape, generator=gen)
        out.backward(g)
        ref.backward(g.double())
        tag = "causal" if causal else "noncausal"
        errs[f"max |out - quadratic| ({tag})"] = (out.double() - ref).abs().max().item()
        errs[f"max |grad - quadratic grad| ({tag})"] = max(
            (a.grad.double() - b.grad).abs().max().item() for a, b in zip(qs, qr))
    # Recurrent decoding == causal parallel form.
    q, k, v = (torch.randn(2, 3, n, d, generator=gen) for _ in range(3))
    par = linear_attention(q, k, v, causal=True, chunk_size=cfg.chunk_size)
    state = LinearAttentionState.zeros(2, 3, d, d)
    steps = torch.stack([state.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(n)], 2)
    errs["max |step decoding - parallel|"] = (steps - par).abs().max().item()
    return errs


# ----------------------------------------------------------------------------- timing
def _softmax_sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _ours(q, k, v, causal, chunk):
    return linear_attention(q, k, v, causal=causal, chunk_size=chunk)


def _materialised(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _inference(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return fn()
    return call


def _sweep(cfg: Config, lengths: tuple[int, ...], gen: torch.Generator,
           causal: bool) -> dict[str, list[float]]:
    """Median seconds per forward of softmax SDPA and ours at each N (interleaved)."""
    res: dict[str, list[float]] = {"softmax SDPA": [], "linear (ours)": []}
    for n in lengths:
        q, k, v = (torch.randn(cfg.batch, cfg.heads, n, cfg.head_dim, generator=gen)
                   for _ in range(3))
        t = compare_times({
            "softmax SDPA": _inference(partial(_softmax_sdpa, q, k, v, causal)),
            "linear (ours)": _inference(partial(_ours, q, k, v, causal, cfg.chunk_size)),
        }, repeats=cfg.repeats, warmup=1)
        for name in res:
            res[name].append(t[name].median_s)
    return res


def _crossover(lengths: tuple[int, ...], soft: list[float], lin: list[float]) -> float:
    """Smallest N where linear beats softmax, interpolated in log-log; nan if never/always."""
    r = [math.log(s / max(li, 1e-12)) for s, li in zip(soft, lin)]
    if r[0] >= 0:
        return float(lengths[0])  # already faster at the shortest length
    for i in range(1, len(r)):
        if r[i] >= 0:
            x0, x1 = math.log(lengths[i - 1]), math.log(lengths[i])
            return math.exp(x0 + (x1 - x0) * (-r[i - 1]) / (r[i] - r[i - 1]))
    return float("nan")


# ----------------------------------------------------------------------------- memory
def _peak_tensor_bytes(fn: Callable[[], object]) -> float:
    """Peak bytes of tensors alive at once among those ``fn`` allocates (output included).

    :class:`mlatlas.measure.PeakMemory` on the CPU: every aten op's new output storage until
    it is freed. Scratch memory inside a fused kernel (e.g. SDPA's per-thread tiles) is not
    visible.
    """
    with torch.inference_mode(), PeakMemory("cpu") as mem:
        out = fn()
    del out
    return float(mem.peak_bytes)


# ----------------------------------------------------------------------------- entry points
def run(cfg: Config, out: Path) -> Report:
    """Parity with the quadratic form and recurrent decoding; a short timing sweep."""
    rep = Report()
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, err in _parity(cfg, gen).items():
        rep.claim(name, err, 1e-5, op="<=", detail="fp32 ours vs fp64 quadratic reference")
    lengths = cfg.run_lengths
    curves_nc = _sweep(cfg, lengths, gen, causal=False)
    curves_c = _sweep(cfg, lengths, gen, causal=True)
    soft, lin = curves_nc["softmax SDPA"], curves_nc["linear (ours)"]
    for n, s, li in zip(lengths, soft, lin):
        rep.metric(f"speedup vs SDPA @N={n}", s / li)
    rep.metric(f"causal speedup vs SDPA @N={lengths[-1]}",
               curves_c["softmax SDPA"][-1] / curves_c["linear (ours)"][-1])
    rep.metric("crossover N (non-causal)", _crossover(lengths, soft, lin))
    rep.metric("softmax time slope (log t vs log N)", loglog_slope(lengths[-3:], soft[-3:]))
    rep.claim("linear time: slope of log t vs log N (3 longest)", loglog_slope(lengths[-3:], lin[-3:]),
              1.3, op="<=", detail="O(N) predicts 1; softmax predicts 2")
    with figure(out / "time_vs_n.png") as (_, ax):
        curves(ax, {**{f"{k}": v for k, v in curves_nc.items()},
                    **{f"{k}, causal": v for k, v in curves_c.items()}}, x=lengths,
               xlabel="sequence length N", ylabel="seconds (median)", logx=True, logy=True,
               title=f"B={cfg.batch} H={cfg.heads} d={cfg.head_dim}, fp32 CPU")
    rep.figure(out / "time_vs_n.png")
    rep.metric("torch threads while timing", torch.get_num_threads())
    rep.note("The ≥ 5× at N=16k speed claim is measured by `mlatlas bench linear-attention`. "
             "On a loaded machine, multi-threaded timings of many small ops (ours) suffer more "
             "from OpenMP wake-ups than one fused SDPA call: `--set threads=1` is steadier.")
    return rep


def bench(cfg: Config, out: Path) -> Report:
    """The full length sweep to N = 16k: time (the ≥ 5× claim) and peak tensor memory."""
    rep = Report()
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = cfg.bench_lengths
    curves_nc = _sweep(cfg, lengths, gen, causal=False)
    curves_c = _sweep(cfg, lengths, gen, causal=True)
    soft, lin = curves_nc["softmax SDPA"], curves_nc["linear (ours)"]
    for n, s, li, sc, lc in zip(lengths, soft, lin, curves_c["softmax SDPA"],
                                curves_c["linear (ours)"]):
        rep.metric(f"time softmax SDPA @N={n} [s]", s)
        rep.metric(f"time linear @N={n} [s]", li)
        rep.metric(f"causal speedup vs SDPA @N={n}", sc / lc)
    rep.metric("torch threads while timing", torch.get_num_threads())
    rep.claim(f"speedup vs softmax SDPA @N={lengths[-1]} (non-causal)", soft[-1] / lin[-1], 5.0,
              op=">=", unit="x", detail=f"median of {cfg.repeats}, interleaved, after warm-up")
    rep.metric("crossover N (non-causal)", _crossover(lengths, soft, lin))
    rep.metric("crossover N (causal)", _crossover(lengths, curves_c["softmax SDPA"],
                                                  curves_c["linear (ours)"]))
    mem: dict[str, list[float]] = {"softmax SDPA": [], "linear (ours)": [],
                                   "materialised softmax": []}
    for n in lengths:
        q, k, v = (torch.randn(cfg.batch, cfg.heads, n, cfg.head_dim, generator=gen)
                   for _ in range(3))
        mem["softmax SDPA"].append(_peak_tensor_bytes(partial(_softmax_sdpa, q, k, v, False)))
        mem["linear (ours)"].append(
            _peak_tensor_bytes(partial(_ours, q, k, v, False, cfg.chunk_size)))
        mem["materialised softmax"].append(
            _peak_tensor_bytes(partial(_materialised, q, k, v, False))
            if n <= cfg.materialised_max else float("nan"))
        for name in mem:
            rep.metric(f"peak tensor memory {name} @N={n} [MiB]", mem[name][-1] / 2**20)
    with figure(out / "bench.png", ncols=2) as (_, axes):
        ax_time, ax_mem = axes.flat
        curves(ax_time, {**curves_nc, **{f"{k}, causal": v for k, v in curves_c.items()}},
               x=lengths, xlabel="N", ylabel="seconds (median)", logx=True, logy=True,
               title="time")
        curves(ax_mem, {k: [x / 2**20 for x in v] for k, v in mem.items()}, x=lengths,
               xlabel="N", ylabel="peak tensor memory [MiB]", logx=True, logy=True,
               title="memory (non-causal)")
    rep.figure(out / "bench.png")
    rep.note("Memory is the peak of the bytes of tensors alive at once among those allocated "
             "during one forward (output included), counted per aten op at the dispatcher. "
             "PyTorch's CPU SDPA is a fused kernel that never stores the N×N matrix either "
             "(its tiles are internal scratch, not counted), so it is O(N) too; the "
             "materialised softmax (QKᵀ stored) shows the O(N²) that linear attention avoids.")
    return rep
