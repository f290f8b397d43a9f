"""Sequence packing: exact against the padded batch, and faster on a long-tailed length mix.

``run`` packs a log-normal mix of random documents with first-fit-decreasing and checks that
a Llama (GQA, RoPE) gives every token the same loss, and every parameter the same gradient,
as the right-padded batch of the same documents; that changing one document leaves the
others' logits untouched (no cross-document attention); and reports both padding fractions.
``bench`` trains over the same documents both ways — padded batches and packed rows, each
step holding at most the same token budget — and reports real tokens per second.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.packing import PaddedBatch, pack, pad, token_losses
from mlatlas.plots import figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds the model, the document lengths and their tokens
    num_docs: int = 40  # documents in the parity batch
    median_len: float = 24.0  # median document length (log-normal: exp(μ) with μ = ln median)
    sigma: float = 1.0  # log-normal σ of the lengths (long tail)
    max_tokens: int = 128  # row length of the packed parity batch
    vocab_size: int = 97  # vocabulary of the random documents
    # benchmark (bench): a bigger model and rows, equal token budget per step
    bench_docs: int = 96  # documents per epoch
    bench_median_len: float = 48.0  # median length
    bench_max_tokens: int = 512  # packed row length = longest allowed document
    bench_rows: int = 4  # packed rows per step; the token budget per step is rows · max_tokens
    bench_hidden: int = 128  # model width of the benchmark model
    bench_layers: int = 4  # layers of the benchmark model
    repeats: int = 3  # timed epochs per method after one warm-up; median reported


def lognormal_lengths(n: int, median: float, sigma: float, max_len: int,
                      gen: torch.Generator, min_len: int = 2) -> list[int]:
    """``n`` lengths ``round(exp(ln median + σ z))``, clipped to ``[min_len, max_len]``."""
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    return (math.log(median) + sigma * z).exp().round().clamp(min_len, max_len).long().tolist()


def _documents(n: int, median: float, sigma: float, max_len: int, vocab: int,
               gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (m,), generator=gen)
            for m in lognormal_lengths(n, median, sigma, max_len, gen)]


def _parity_model(cfg: Config) -> Llama:
    torch.manual_seed(cfg.seed)
    return Llama(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=48, intermediate_size=88,
                             num_layers=3, num_heads=6, num_kv_heads=2, head_dim=10,
                             max_position_embeddings=4 * cfg.max_tokens))


def run(cfg: Config, out: Path, *, smoke: bool = False) -> Report:
    """Parity of packed vs padded per-token losses and gradients; padding fractions."""
    rep = Report()
    n_docs = 8 if smoke else cfg.num_docs
    gen = torch.Generator().manual_seed(cfg.seed)
    docs = _documents(n_docs, cfg.median_len, cfg.sigma, cfg.max_tokens, cfg.vocab_size, gen)
    model = _parity_model(cfg)
    packed = pack(docs, cfg.max_tokens)
    padded = pad(docs)
    n_targets = sum(len(d) - 1 for d in docs)
    params = list(model.parameters())

    lp = token_losses(model(packed.input_ids, packed.position_ids,
                            cu_seqlens=packed.cu_seqlens), packed.labels)
    g_packed = torch.autograd.grad(lp.sum() / n_targets, params)
    ld = token_losses(model(padded.input_ids), padded.labels)
    g_padded = torch.autograd.grad(ld.sum() / n_targets, params)
    per_doc = packed.unpack(lp.detach())
    d_loss = max((a - ld[i, :len(a)].detach()).abs().max().item()
                 for i, a in enumerate(per_doc))
    d_grad = max((a - b).abs().max().item() for a, b in zip(g_packed, g_padded))
    scale = max(b.abs().max().item() for b in g_padded)
    rep.claim("max |per-token loss packed - padded|", d_loss, 1e-5, op="<=",
              detail=f"{n_docs} documents, {n_targets} predicted tokens, fp32")
    rep.claim("max |gradient packed - padded|", d_grad, 1e-5, op="<=",
              detail=f"every parameter; largest gradient entry {scale:.3g}")

    # no cross-document attention: replace one document, the others do not move
    victim = packed.placement[0]
    changed = packed.input_ids.clone()
    r, s, n = victim
    changed[r, s:s + n] = (changed[r, s:s + n] + 1) % cfg.vocab_size
    with torch.no_grad():
        before = model(packed.input_ids, packed.position_ids, cu_seqlens=packed.cu_seqlens)
        after = model(changed, packed.position_ids, cu_seqlens=packed.cu_seqlens)
    others = torch.ones(packed.input_ids.shape, dtype=torch.bool)
    others[r, s:s + n] = False
    leak = (before - after)[others].abs().max().item()
    rep.claim("max |Δlogits| of other documents when one document changes", leak, 1e-6,
              op="<=", detail="its row neighbours included")

    rep.metric("padding fraction, padded batch", padded.padding_fraction)
    rep.metric("padding fraction, packed (FFD)", packed.padding_fraction)
    rep.metric("padded slots / packed slots", padded.input_ids.numel() / packed.input_ids.numel())
    rep.metric("packed rows", packed.input_ids.shape[0])
    rep.metric("documents", n_docs)
    rep.note("parity: Llama(packed.input_ids, position_ids, cu_seqlens) vs Llama(padded ids) "
             "on the same weights; losses summed over predicted tokens / their count")

    lengths = [len(d) for d in docs]
    with figure(out / "lengths.png", ncols=2, title="packing a long-tailed length mix") as (
            _, axes):
        axes = axes.ravel()
        axes[0].hist(lengths, bins=20, color="tab:blue")
        axes[0].set_xlabel("document length (tokens)")
        axes[0].set_ylabel("documents")
        axes[1].bar(["padded", "packed"], [padded.padding_fraction, packed.padding_fraction],
                    color=["tab:red", "tab:green"])
        axes[1].set_ylabel("padding fraction")
    rep.figure(out / "lengths.png")
    return rep


def _padded_batches(docs: list[torch.Tensor], budget: int,
                    gen: torch.Generator) -> list[PaddedBatch]:
    """Random order, each batch as many documents as fit ``n · max_len ≤ budget``."""
    order = torch.randperm(len(docs), generator=gen).tolist()
    batches, cur = [], []
    for i in order:
        longest = max([len(docs[j]) for j in cur] + [len(docs[i])])
        if cur and longest * (len(cur) + 1) > budget:
            batches.append(pad([docs[j] for j in cur]))
            cur = []
        cur.append(i)
    batches.append(pad([docs[j] for j in cur]))
    return batches


def bench(cfg: Config, out: Path) -> Report:
    """Tokens/s of a training epoch, packed vs padded, at an equal token budget per step."""
    rep = Report()
    gen = torch.Generator().manual_seed(cfg.seed)
    L = cfg.bench_max_tokens
    docs = _documents(cfg.bench_docs, cfg.bench_median_len, cfg.sigma, L, 512, gen)
    budget = cfg.bench_rows * L
    padded = _padded_batches(docs, budget, gen)
    packed = pack(docs, L).split(cfg.bench_rows)
    real = sum(len(d) for d in docs)
    n_targets = real - len(docs)
    torch.manual_seed(cfg.seed)
    h = cfg.bench_hidden
    model = Llama(LlamaConfig(vocab_size=512, hidden_size=h, intermediate_size=8 * h // 3,
                              num_layers=cfg.bench_layers, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=L))

    def epoch_padded() -> None:
        for b in padded:
            (token_losses(model(b.input_ids), b.labels).sum() / n_targets).backward()

    def epoch_packed() -> None:
        for b in packed:
            logits = model(b.input_ids, b.position_ids, cu_seqlens=b.cu_seqlens)
            (token_losses(logits, b.labels).sum() / n_targets).backward()

    times: dict[str, list[float]] = {"padded": [], "packed": []}
    runs: dict[str, Callable[[], None]] = {"padded": epoch_padded, "packed": epoch_packed}
    for rep_i in range(cfg.repeats + 1):  # first round is warm-up
        for name, fn in runs.items():  # interleaved
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            if rep_i:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: real / v for k, v in med.items()}
    pad_slots = sum(b.input_ids.numel() for b in padded)
    pack_slots = sum(b.input_ids.numel() for b in packed)
    rep.metric("tokens/s padded", tps["padded"])
    rep.metric("tokens/s packed", tps["packed"])
    rep.metric("padding fraction, padded batches", 1 - real / pad_slots)
    rep.metric("padding fraction, packed rows", 1 - real / pack_slots)
    rep.metric("steps padded", len(padded))
    rep.metric("steps packed", len(packed))
    rep.metric("real tokens per epoch", real)
    rep.claim("tokens/s packed / padded", tps["packed"] / tps["padded"], 1.8, op=">=",
              unit="x", detail=f"forward+backward, {cfg.bench_docs} log-normal documents "
              f"(median {cfg.bench_median_len:g}, σ {cfg.sigma:g}, ≤ {L}), ≤ {budget} "
              f"tokens per step; median of {cfg.repeats} epochs")
    rep.note(f"{n_targets} predicted tokens per epoch; threads: {torch.get_num_threads()}")
    return rep
