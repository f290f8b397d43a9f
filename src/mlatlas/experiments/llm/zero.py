"""ZeRO on CPU processes: what each rank holds, against the paper's memory model.

The experiment starts ``max(world_sizes)`` gloo processes on this machine and, on the
process groups of the first ``N`` of them for each ``N`` in ``world_sizes``, trains the same
tiny Llama a few AdamW steps under every strategy of :func:`mlatlas.llm.zero.distribute`:
``ddp`` (stage 0), ``zero1`` / ``zero2`` (:class:`mlatlas.llm.zero_optimizer.ZeroOptimizer`)
and ``fsdp2`` (stage 3, ``fully_shard``). Each rank trains on its ``1/N`` of every global
batch. After the last ``optimizer.step()`` every rank measures the bytes it holds, from the
tensors themselves (:func:`mlatlas.llm.zero.held_state_bytes`: the storages of its
parameters, gradients and optimizer state), and the full parameters are gathered.

Claims (targets from the issue, fixed before running; fp32 Adam: ``p = g = 4``, ``K = 8``
bytes per parameter in :func:`mlatlas.llm.zero.model_state_bytes`):

* every strategy, every ``N``, every rank: measured model-state bytes equal the memory model
  ``M_s`` within 1% (it fails if a rank kept full gradients at stage 2, or full optimizer
  state at stage 1, or if the sharding padded much);
* stage 3 (FSDP2) per-rank model-state bytes ≤ 0.3 × DDP's at the largest ``N`` (= 4:
  the model says 1/N = 0.25);
* every strategy ends where single-process training on the whole batch ends, and ZeRO and
  FSDP2 end where DDP ends (max |Δθ| ≤ 1e-6, fp32, the issue's setting);
* the same in float64, where rounding cannot reach 1e-6 and only an algorithmic difference
  can (fp32 Adam amplifies the ranks' different summation order; see the run's notes).

``bench`` builds the four strategies side by side on each group and times one training step
of each, interleaved (:func:`mlatlas.measure.compare_times`; on a CPU, for information),
next to the per-rank bytes; its claim is the same stage-3 / DDP memory ratio.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.zero import STAGES, STRATEGIES, Distributed, distribute, model_state_bytes
from mlatlas.measure import compare_times
from mlatlas.plots import figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores (4 processes)."""

    seed: int = 0  # seeds the model weights and the batches
    threads: int = 1  # torch threads per process
    world_sizes: tuple[int, ...] = (1, 2, 4)  # N: data-parallel processes
    hidden_size: int = 64  # model width (a multiple of 4: FSDP2 pads nothing)
    intermediate_size: int = 176  # SwiGLU hidden width
    layers: int = 2  # decoder layers
    heads: int = 4  # query heads
    kv_heads: int = 2  # key/value heads
    vocab_size: int = 256  # random tokens
    batch: int = 8  # global rows per step, split over the N ranks
    seq_len: int = 32  # tokens per row
    steps: int = 3  # AdamW steps per strategy
    lr: float = 1e-2  # AdamW learning rate
    bucket_numel: int = 2**15  # ZeRO bucket size (several buckets per param group)
    model_tolerance: float = 0.01  # claim: |measured − model| / model ≤ this (issue: 1%)
    stage3_ratio: float = 0.3  # claim: stage-3 bytes / DDP bytes at the largest N ≤ this
    parity_atol: float = 1e-6  # claim: max |Δθ| vs single process ≤ this (fp32)
    bench_repeats: int = 5  # timed rounds of every strategy's step (median)
    timeout_s: float = 120.0  # rendezvous and collectives; a lost process fails, not hangs
    dtype: str = "float32"  # of the weights (``float64`` shows the parity gap is rounding)

    @classmethod
    def smoke(cls) -> Config:
        """N ∈ {1, 4}, a narrower model, one step, one timed round."""
        return cls(world_sizes=(1, 4), hidden_size=32, intermediate_size=64, vocab_size=64,
                   batch=4, seq_len=8, steps=1, bench_repeats=1)


def _adam_bytes(cfg: Config) -> dict[str, int]:
    """Bytes per parameter of weights, gradients and Adam's two moments, all in ``cfg.dtype``
    (fp32: p = g = 4, K = 8; the paper's K = 12 adds fp32 master weights to fp16 training)."""
    e = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    return {"param_bytes": e, "grad_bytes": e, "optim_bytes": 2 * e}


def _model(cfg: Config) -> Llama:
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
    torch.manual_seed(cfg.seed)
    return Llama(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_layers=cfg.layers,
                             num_heads=cfg.heads, num_kv_heads=cfg.kv_heads,
                             tie_word_embeddings=True, max_position_embeddings=cfg.seq_len)
                 ).to(getattr(torch, cfg.dtype))


def _batches(cfg: Config) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return [torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.seq_len + 1), generator=g)
            for _ in range(cfg.steps)]


def _loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


def _adamw(cfg: Config, model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr)


def _single_process(cfg: Config) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole batch."""
    model = _model(cfg)
    opt = _adamw(cfg, model)
    for rows in _batches(cfg):
        _loss(model, rows).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_step(d: Distributed, rows: torch.Tensor) -> None:
    _loss(d.model, rows).backward()
    d.step()


def _worker(rank: int, world: int, cfg: Config, store: str, out: str, mode: str) -> None:
    """One process: every strategy on every group it belongs to; writes ``rank<r>.json``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=cfg.timeout_s))
    torch.set_num_threads(cfg.threads)
    result: dict[str, Any] = {}
    try:
        groups = {n: dist.new_group(list(range(n))) for n in cfg.world_sizes}  # all ranks
        full: dict[str, dict[str, torch.Tensor]] = {}
        for n, group in groups.items():
            if rank >= n:
                continue
            rows_per = cfg.batch // n
            mine = [rows[rank * rows_per:(rank + 1) * rows_per] for rows in _batches(cfg)]
            ds = {s: distribute(_model(cfg), lambda m: _adamw(cfg, m), s, group=group,
                                bucket_numel=cfg.bucket_numel) for s in STRATEGIES}
            for s, d in ds.items():
                for rows in mine:
                    _train_step(d, rows)
                    if mode == "run" and rows is mine[-1]:
                        result[f"{s}/{n}"] = dataclasses.asdict(d.state_bytes())
                    d.zero_grad()
                if mode == "run":
                    state = d.full_state_dict()  # collective under FSDP2
                    if rank == 0:
                        full[f"{s}/{n}"] = {k: v.detach().clone() for k, v in state.items()}
            if mode == "bench":  # every strategy's step, interleaved, the same on every rank
                for s, d in ds.items():  # bytes after a step, before zero_grad
                    _train_step(d, mine[0])
                    result[f"{s}/{n}"] = dataclasses.asdict(d.state_bytes())
                    d.zero_grad()
                times = compare_times(
                    {s: (lambda d=d, x=mine[0]: (_train_step(d, x), d.zero_grad())) for s, d in
                     ds.items()}, repeats=cfg.bench_repeats, warmup=1)
                for s, t in times.items():
                    result[f"{s}/{n}"]["step_s"] = t.median_s
        if rank == 0 and full:
            torch.save(full, Path(out, "params.pt"))
        dist.barrier()
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _launch(cfg: Config, mode: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run :func:`_worker` on ``max(world_sizes)`` processes.

    Returns:
        Each rank's results, and rank 0's gathered parameters per ``"<strategy>/<N>"``
        (``run`` mode; empty in ``bench`` mode).
    """
    for n in cfg.world_sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or cfg.batch % n:
            raise ValueError(f"world_sizes must be positive ints dividing batch={cfg.batch}, "
                             f"got {n!r}")
    world = max(cfg.world_sizes)
    # fork: the processes inherit what this one imported instead of importing it 4 times
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.nn.parallel  # noqa: F401
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory(prefix="mlatlas-zero-") as folder:
        tmp = Path(folder)
        mp.start_processes(_worker, args=(world, cfg, str(tmp / "store"), str(tmp), mode),
                           nprocs=world, join=True, start_method=method)
        results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
        for r, res in enumerate(results):
            if "error" in res:
                raise RuntimeError(f"rank {r} of {world} failed:\n{res['error']}")
        params = tmp / "params.pt"
        full = torch.load(params, weights_only=True) if params.is_file() else {}
    return results, full


def _num_params(cfg: Config) -> int:
    return sum(p.numel() for p in _model(cfg).parameters())


def _per_rank(results: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [res[key] for res in results if key in res]


def _parity(ref: dict[str, torch.Tensor], full: dict[str, dict[str, torch.Tensor]],
            strategy: str, n: int) -> dict[str, float]:
    """Max |Δθ| of ``strategy`` on ``n`` ranks vs single-process ``ref`` and vs DDP."""
    ours = full[f"{strategy}/{n}"]
    return {base: max(float((ours[k] - theirs[k]).abs().max()) for k in ref)
            for base, theirs in (("single", ref), ("ddp", full[f"ddp/{n}"]))}


def run(cfg: Config, out: Path) -> Report:
    """Per-rank bytes of every strategy and N against the model; parity with one process."""
    rep = Report()
    ref = _single_process(cfg)  # first: the forked processes inherit a warm torch
    results, full = _launch(cfg, "run")
    psi = _num_params(cfg)
    rep.metric("Ψ: parameters of the tiny Llama", psi)
    worst, worst_at = 0.0, ""
    parity = {"single": 0.0, "ddp": 0.0}
    measured: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    modelled: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for n in cfg.world_sizes:
        for s in STRATEGIES:
            model = model_state_bytes(psi, STAGES[s], n, **_adam_bytes(cfg))
            ranks = _per_rank(results, f"{s}/{n}")
            for r, held in enumerate(ranks):
                total = held["params"] + held["grads"] + held["optimizer"]
                err = abs(total - model) / model
                if err >= worst:
                    worst, worst_at = err, f"{s}, N={n}, rank {r}: {total} vs {model:.0f} B"
            top = max(h["params"] + h["grads"] + h["optimizer"] for h in ranks)
            measured[s].append(top)
            modelled[s].append(model)
            rep.metric(f"{s} N={n}: per-rank model-state KiB (max over ranks)", top / 1024,
                       unit="KiB")
            rep.metric(f"{s} N={n}: optimizer-state KiB on rank 0",
                       ranks[0]["optimizer"] / 1024, unit="KiB")
            for base, diff in _parity(ref, full, s, n).items():
                rep.metric(f"{s} N={n}: max |Δθ| vs {base}", diff)
                parity[base] = max(parity[base], diff)
    rep.claim("max over strategies, N and ranks of |measured − model| / model", worst,
              cfg.model_tolerance, "<=", target_source="model_tolerance",
              detail=f"{cfg.dtype} Adam {_adam_bytes(cfg)}, Ψ={psi}; worst: {worst_at}")
    n = max(cfg.world_sizes)
    ratio = measured["fsdp2"][-1] / measured["ddp"][-1]
    rep.claim(f"stage-3 (FSDP2) per-rank bytes / DDP's at N={n}", ratio, cfg.stage3_ratio,
              "<=", unit="x", target_source="stage3_ratio",
              detail=f"model: 1/N = {1 / n:.3f}")
    steps = f"{cfg.steps} AdamW steps, {cfg.dtype}, N ∈ {list(cfg.world_sizes)}"
    rep.claim(f"{cfg.dtype}: max |Δθ| of ZeRO-1, ZeRO-2 and FSDP2 vs DDP (same N, same "
              "batches)", parity["ddp"], cfg.parity_atol, "<=", target_source="parity_atol",
              detail=steps)
    rep.claim(f"{cfg.dtype}: max |Δθ| of every strategy (DDP included) vs single-process "
              "training on the whole batch", parity["single"], cfg.parity_atol, "<=",
              target_source="parity_atol", detail=steps)
    if cfg.dtype != "float64":  # the same runs in float64: what is left is the algorithm
        cfg64 = dataclasses.replace(cfg, dtype="float64")
        ref64 = _single_process(cfg64)
        _, full64 = _launch(cfg64, "run")
        worst64 = max(d for n in cfg.world_sizes for s in STRATEGIES
                      for d in _parity(ref64, full64, s, n).values())
        rep.claim("float64: max |Δθ| of every strategy vs single process and vs DDP",
                  worst64, cfg.parity_atol, "<=", target_source="parity_atol",
                  detail=steps.replace(cfg.dtype, "float64"))
    rep.note("Parity is measured twice. In the run's dtype (fp32, the issue's setting) the "
             "data-parallel ranks sum their gradients in another order than one process sums "
             "the whole batch, and N = 4 ranks reduce in another order under DDP's all-reduce "
             "than under ZeRO's reduce-scatter; Adam's normalised update m/(√v + ε) turns "
             "these rounding differences of near-zero gradient entries into parameter "
             "differences of up to ~1e-5 after 3 steps at lr 1e-2 — DDP itself misses "
             "single-process training by as much, so the fp32 claims can fail without any "
             "strategy being wrong. The same runs in float64 (rounding ~1e-16) can only "
             "reach the 1e-6 bound through an algorithmic difference: a wrong gradient "
             "average, a lost shard, a stale parameter. tests/llm/test_zero.py holds every "
             "strategy to 1e-6 in fp32 over 3 steps with the training command's warm-up.")
    rep.note("Bytes are counted from the tensors each rank holds after the last optimizer "
             "step (before zero_grad): each storage once, a flat buffer with its padding. "
             "Beyond the model, ranks hold AdamW's step counters (4 B per state entry) and "
             "the padding of shards to a multiple of N.")
    path = out / "per_rank_bytes.png"
    with figure(path, title=f"per-rank model-state bytes, Ψ = {psi}") as (fig, ax):
        ns = list(cfg.world_sizes)
        for s, mark in zip(STRATEGIES, "osd^"):
            line = ax.plot(ns, [b / 1024 for b in measured[s]], marker=mark, label=s)[0]
            ax.plot(ns, [b / 1024 for b in modelled[s]], ls=":", color=line.get_color())
        ax.set_xticks(ns, [str(x) for x in ns])
        ax.set_xlabel("processes N")
        ax.set_ylabel("KiB per rank (dotted: the model)")
        ax.legend(fontsize=8)
    rep.figure(path)
    return rep


def bench(cfg: Config, out: Path) -> Report:
    """Per-rank bytes and step time of every strategy and N, side by side."""
    rep = Report()
    _single_process(dataclasses.replace(cfg, steps=1))  # warm torch up before forking
    results, _ = _launch(cfg, "bench")
    for n in cfg.world_sizes:
        for s in STRATEGIES:
            ranks = _per_rank(results, f"{s}/{n}")
            top = max(h["params"] + h["grads"] + h["optimizer"] for h in ranks)
            rep.metric(f"{s} N={n}: per-rank model-state KiB", top / 1024, unit="KiB")
            rep.metric(f"{s} N={n}: step ms (rank 0, CPU, for information)",
                       1e3 * ranks[0]["step_s"], unit="ms")
    n = max(cfg.world_sizes)
    top = {s: max(h["params"] + h["grads"] + h["optimizer"]
                  for h in _per_rank(results, f"{s}/{n}")) for s in ("ddp", "fsdp2")}
    rep.claim(f"stage-3 (FSDP2) per-rank bytes / DDP's at N={n}", top["fsdp2"] / top["ddp"],
              cfg.stage3_ratio, "<=", unit="x", target_source="stage3_ratio",
              detail=f"model: 1/N = {1 / n:.3f}; {cfg.bench_repeats} interleaved rounds")
    return rep
