"""Sequence packing: exact against the padded batch, and faster on a long-tailed length mix.

``run`` packs a log-normal mix of random documents with first-fit-decreasing and checks that
a Llama (GQA, RoPE) gives every token the same loss, and every parameter the same gradient,
as the right-padded batch of the same documents; that changing one document leaves the
others' logits untouched (no cross-document attention); and reports both padding fractions.
``bench`` trains over the same documents three ways, each step holding at most the same token
budget — padded batches in random order, length-grouped padded batches (what transformers'
``group_by_length=True`` does: shuffle, sort by length within mega-batches, then pad per
batch) and packed rows — and reports real tokens per second, packed against each baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.packing import PaddedBatch, pack, pad, token_losses
from mlatlas.measure import compare_times
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

    @classmethod
    def smoke(cls) -> Config:
        """A few documents, for tests (and a tiny bench that only checks it runs)."""
        return cls(num_docs=8, bench_docs=12, bench_median_len=16.0, bench_max_tokens=64,
                   bench_rows=2, bench_hidden=32, bench_layers=1, repeats=1)


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


def run(cfg: Config, out: Path) -> Report:
    """Parity of packed vs padded per-token losses and gradients; padding fractions."""
    rep = Report()
    n_docs = cfg.num_docs
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


def _budget_batches(docs: list[torch.Tensor], order: Sequence[int],
                    budget: int) -> list[PaddedBatch]:
    """Documents in ``order``, each batch as many as fit ``n · max_len ≤ budget``, padded."""
    batches, cur = [], []
    for i in order:
        longest = max([len(docs[j]) for j in cur] + [len(docs[i])])
        if cur and longest * (len(cur) + 1) > budget:
            batches.append(pad([docs[j] for j in cur]))
            cur = []
        cur.append(i)
    batches.append(pad([docs[j] for j in cur]))
    return batches


def length_grouped_order(lengths: Sequence[int], batch_size: int,
                         gen: torch.Generator) -> list[int]:
    """The document order of transformers' ``group_by_length=True`` (``LengthGroupedSampler``).

    Shuffle, cut into mega-batches of ``mult · batch_size`` documents with transformers'
    default ``mult = min(n // (4 · batch_size), 50)`` (at least 1), sort each mega-batch by
    length, longest first, and move the longest document of all to the front.
    """
    mult = max(1, min(len(lengths) // (batch_size * 4), 50))
    size = mult * batch_size
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    megas = [sorted(perm[i:i + size], key=lambda j: lengths[j], reverse=True)
             for i in range(0, len(perm), size)]
    top = max(range(len(megas)), key=lambda m: lengths[megas[m][0]])
    megas[0][0], megas[top][0] = megas[top][0], megas[0][0]
    return [j for mega in megas for j in mega]


def bench(cfg: Config, out: Path) -> Report:
    """Tokens/s of a training epoch, packed vs padded (random order and length-grouped), at an
    equal token budget per step."""
    rep = Report()
    gen = torch.Generator().manual_seed(cfg.seed)
    L = cfg.bench_max_tokens
    docs = _documents(cfg.bench_docs, cfg.bench_median_len, cfg.sigma, L, 512, gen)
    budget = cfg.bench_rows * L
    batches = {"padded, random order": _budget_batches(
        docs, torch.randperm(len(docs), generator=gen).tolist(), budget)}
    packed = pack(docs, L).split(cfg.bench_rows)
    # group_by_length's batch size: the documents per step of the random-order batches
    per_step = max(1, round(len(docs) / len(batches["padded, random order"])))
    batches["padded, length-grouped"] = _budget_batches(
        docs, length_grouped_order([len(d) for d in docs], per_step, gen), budget)
    real = sum(len(d) for d in docs)
    n_targets = real - len(docs)
    torch.manual_seed(cfg.seed)
    h = cfg.bench_hidden
    model = Llama(LlamaConfig(vocab_size=512, hidden_size=h, intermediate_size=8 * h // 3,
                              num_layers=cfg.bench_layers, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=L))

    def epoch_padded(padded: list[PaddedBatch]) -> None:
        model.zero_grad(set_to_none=True)
        for b in padded:
            (token_losses(model(b.input_ids), b.labels).sum() / n_targets).backward()

    def epoch_packed() -> None:
        model.zero_grad(set_to_none=True)
        for b in packed:
            logits = model(b.input_ids, b.position_ids, cu_seqlens=b.cu_seqlens)
            (token_losses(logits, b.labels).sum() / n_targets).backward()

    epochs = {name: (lambda b=b: epoch_padded(b)) for name, b in batches.items()}
    epochs["packed"] = epoch_packed
    timings = compare_times(epochs, repeats=cfg.repeats, warmup=1)  # interleaved
    tps = {k: real / t.median_s for k, t in timings.items()}
    slots = {k: sum(b.input_ids.numel() for b in v) for k, v in batches.items()}
    slots["packed"] = sum(b.input_ids.numel() for b in packed)
    steps = {k: len(v) for k, v in batches.items()}
    steps["packed"] = len(packed)
    for k in tps:
        rep.metric(f"tokens/s {k}", tps[k])
        rep.metric(f"padding fraction, {k}", 1 - real / slots[k])
        rep.metric(f"steps, {k}", steps[k])
    rep.metric("real tokens per epoch", real)
    rep.metric("group_by_length batch size (documents per step)", per_step)
    detail = (f"forward+backward, {cfg.bench_docs} log-normal documents (median "
              f"{cfg.bench_median_len:g}, σ {cfg.sigma:g}, ≤ {L}), ≤ {budget} tokens per step; "
              f"median of {cfg.repeats} interleaved epochs")
    rep.claim("tokens/s packed / padded batches in random order",
              tps["packed"] / tps["padded, random order"], 1.8, op=">=", unit="x",
              detail=detail)
    rep.claim("tokens/s packed / length-grouped padded batches (group_by_length)",
              tps["packed"] / tps["padded, length-grouped"], 1.0, op=">=", unit="x",
              detail=detail)
    rep.note("Baselines: padded batches in random order, and length-grouped padded batches as "
             "transformers' group_by_length=True builds them (shuffle, sort by length within "
             f"mega-batches of {per_step}·mult documents, then pad per batch); every step of "
             f"every method holds at most {budget} token slots.")
    rep.note(f"{n_targets} predicted tokens per epoch; threads: {torch.get_num_threads()}")
    return rep
