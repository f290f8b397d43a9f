"""Pretrain a tiny Llama 3-style model (GQA, RoPE, SwiGLU, RMSNorm) on the embedded corpus.

The corpus is the docstrings of the Python standard library (:mod:`mlatlas.datasets.corpus`),
tokenized with a 512-token byte-level BPE trained on the training documents. Claims:

* **it learns from context** — the final validation loss falls below the unigram entropy of
  the validation tokens, ``H = -Σ p(v) ln p(v)`` computed from the data before training.
  That is the loss of the best context-free predictor, fitted to the validation tokens
  themselves; a model below it must be using the preceding tokens. (A smoothed bigram model
  fitted on the training split is reported as a second, stronger reference, not a claim.)
* **the KV cache is exact** — greedy decoding with the cache produces the same tokens as
  recomputing the whole prefix at every step.

The run writes a resumable training checkpoint (weights, AdamW state, step, data RNG) with
:mod:`mlatlas.training_state`, and the trained model as a Hugging Face folder (``hf/``, with the
tokenizer) that ``transformers.LlamaForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.datasets.corpus import Corpus, load_corpus, sample_windows, unigram_entropy
from mlatlas.llm.hf_format import hf_key_map
from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.measure import compare_times
from mlatlas.plots import curves, figure
from mlatlas.report import Report
from mlatlas.runtime import progress
from mlatlas.training_state import load_checkpoint, save_checkpoint


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds the initial weights and the training-window sampler
    vocab_size: int = 512  # BPE vocabulary (incl. the 256 bytes and end-of-text)
    hidden_size: int = 96  # model width d
    intermediate_size: int = 256  # SwiGLU hidden width
    num_layers: int = 3  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA: 2 query heads share one)
    seq_len: int = 64  # training window length T
    batch: int = 16  # windows per step
    steps: int = 160  # optimizer steps
    lr: float = 3e-3  # peak AdamW learning rate
    warmup: int = 16  # linear warm-up steps, then cosine decay to lr/10
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    bench_hidden: int = 256  # bench(): model width (the size issue 10 measured)
    bench_intermediate: int = 688  # bench(): SwiGLU width (≈ 8/3 · hidden)
    bench_layers: int = 4  # bench(): decoder layers
    bench_heads: int = 4  # bench(): query heads (head_dim 64)
    bench_kv_heads: int = 2  # bench(): key/value heads (GQA)
    bench_batch: int = 4  # bench(): rows of the forward / forward+backward input
    bench_seq: int = 256  # bench(): tokens per row
    bench_prompt: int = 32  # bench(): prompt tokens per row for greedy decoding
    bench_new_tokens: int = 32  # bench(): tokens generated with the KV cache
    bench_repeats: int = 7  # bench(): interleaved timing rounds (median reported)
    eval_every: int = 40  # steps between validation evaluations
    eval_windows: int = 64  # validation windows per intermediate evaluation (all at the end)
    gen_tokens: int = 32  # tokens generated for the cached-vs-uncached check
    val_windows: int = 0  # validation windows of seq_len tokens used (0: the whole split)

    @classmethod
    def smoke(cls) -> Config:
        """A few steps, for tests: 3 steps of 4 windows, 20 validation windows; a bench of a
        tiny model, one timing round."""
        return cls(steps=3, eval_every=3, eval_windows=4, batch=4, gen_tokens=4, val_windows=20,
                   bench_hidden=24, bench_intermediate=40, bench_layers=2, bench_batch=2,
                   bench_seq=9, bench_prompt=3, bench_new_tokens=4, bench_repeats=1)

    @classmethod
    def full(cls) -> Config:
        """A longer run: a wider model, 2000 steps."""
        return cls(hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6,
                   num_kv_heads=2, seq_len=128, batch=32, steps=2000, lr=2e-3, warmup=100,
                   eval_every=100)


def model_config(cfg: Config, vocab_size: int) -> LlamaConfig:
    """The :class:`LlamaConfig` of the experiment's model."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                       num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                       rope_theta=10000.0, max_position_embeddings=4 * cfg.seq_len,
                       tie_word_embeddings=True)


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, cosine to ``lr/10``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def build(cfg: Config, vocab_size: int) -> tuple[Llama, torch.optim.Optimizer, torch.Generator]:
    """Fresh model, AdamW and data generator, all seeded from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = Llama(model_config(cfg, vocab_size))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    return model, opt, torch.Generator().manual_seed(cfg.seed)


@torch.no_grad()
def evaluate(model: Llama, tokens: torch.Tensor, seq_len: int, max_windows: int | None = None,
             batch: int = 64) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of ``tokens``."""
    n = (tokens.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    inputs = tokens[:n * seq_len].view(n, seq_len)
    targets = tokens[1:n * seq_len + 1].view(n, seq_len)
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        logits = model(inputs[i:i + batch])
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets[i:i + batch].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq_len)


def train(cfg: Config, model: Llama, opt: torch.optim.Optimizer, gen: torch.Generator,
          corpus: Corpus, start: int, stop: int, history: dict[str, list[float]]) -> None:
    """Run optimizer steps ``start … stop-1`` in place (resumable at any step)."""
    model.train()
    for step in progress(range(start, stop), stop - start, "pretrain llama"):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        x, y = sample_windows(corpus.train, cfg.batch, cfg.seq_len, gen)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history["train_step"].append(step + 1)
        history["train_loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history["val_step"].append(step + 1)
            history["val_loss"].append(evaluate(model, corpus.val, cfg.seq_len,
                                                cfg.eval_windows))


def resume(cfg: Config, path: Path, corpus: Corpus) -> tuple[Llama, torch.optim.Optimizer,
                                                              torch.Generator, int, dict]:
    """Rebuild model/optimizer/generator and restore them from a training checkpoint."""
    model, opt, gen = build(cfg, corpus.tokenizer.vocab_size)
    info = load_checkpoint(path, model, opt, generators={"data": gen})
    return model, opt, gen, info["step"], info["extra"]["history"]


def bigram_cross_entropy(train: torch.Tensor, val: torch.Tensor, vocab_size: int,
                         alpha: float = 0.1) -> float:
    """Validation cross-entropy (nats) of an add-α bigram model fitted on ``train``."""
    counts = torch.full((vocab_size, vocab_size), alpha, dtype=torch.float64)
    counts.index_put_((train[:-1], train[1:]), torch.ones(train.numel() - 1, dtype=torch.float64),
                      accumulate=True)
    logp = (counts / counts.sum(1, keepdim=True)).log()
    return float(-logp[val[:-1], val[1:]].mean())


def run(cfg: Config, out: Path) -> Report:
    """Pretrain, check the loss bound and the KV cache, write checkpoint and HF folder."""
    out = Path(out)
    rep = Report()
    corpus = load_corpus("bpe", cfg.vocab_size)
    V = corpus.tokenizer.vocab_size
    val = corpus.val[:cfg.val_windows * cfg.seq_len] if cfg.val_windows else corpus.val
    # the a-priori bound: computed from the data before any training
    h_uni = rep.metric("val unigram entropy (nats/token)", unigram_entropy(val, V))
    rep.metric("val bigram cross-entropy, add-0.1 fit on train (nats/token)",
               bigram_cross_entropy(corpus.train, val, V))
    rep.metric("train tokens", corpus.train.numel())
    rep.metric("val tokens", val.numel())

    model, opt, gen = build(cfg, V)
    rep.metric("parameters", sum(p.numel() for p in model.parameters()))
    history: dict[str, list[float]] = {"train_step": [], "train_loss": [], "val_step": [],
                                       "val_loss": []}
    train(cfg, model, opt, gen, corpus, 0, cfg.steps, history)
    ckpt = save_checkpoint(out / "checkpoint.safetensors", model, opt, step=cfg.steps,
                           generators={"data": gen}, extra={"history": history})
    rep.note(f"training checkpoint (weights + AdamW state + data RNG): {ckpt.name}")

    final = evaluate(model, val, cfg.seq_len)
    rep.claim("validation loss < unigram entropy of the validation tokens", final, h_uni,
              op="<", unit="nats/token",
              detail="the best context-free predictor's loss; below it ⇒ the model uses context")
    epochs = rep.metric("passes over the training tokens (steps × batch × seq_len / train)",
                        cfg.steps * cfg.batch * cfg.seq_len / corpus.train.numel())
    best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
    best_loss, best_step = history["val_loss"][best], history["val_step"][best]
    rep.metric(f"lowest validation loss during training ({cfg.eval_windows} windows)", best_loss)
    rep.metric("step of the lowest validation loss", best_step)
    if best_step < cfg.steps:
        train_end = statistics.fmean(history["train_loss"][-20:])
        memorised = epochs >= 2 and train_end < best_loss
        rep.note(f"validation loss ({cfg.eval_windows} windows) was lowest at step {best_step} "
                 f"({best_loss:.3f}) and ends at {history['val_loss'][-1]:.3f}; train loss "
                 f"{train_end:.3f} after {epochs:.1f} passes over {corpus.train.numel()} "
                 "training tokens" + (" — the model memorises the training split" if memorised
                                      else "") + ". The claim is measured on the final weights")

    # KV cache: greedy with the cache == greedy recomputing the prefix
    model.eval()
    prompt = corpus.val[:16][None]
    cached = model.generate(prompt, cfg.gen_tokens, use_cache=True)
    full = model.generate(prompt, cfg.gen_tokens, use_cache=False)
    n_new = cached.shape[1] - prompt.shape[1]
    rep.claim("greedy tokens that differ, cached vs uncached decoding",
              int((cached != full).sum()), 0, op="==", unit="tokens",
              detail=f"{n_new} new tokens from a 16-token validation prompt")
    with torch.no_grad():
        step_logits = _cached_logits(model, cached[:, :-1])
        rep.metric("max |logits cached - full recompute|",
                   (step_logits - model(cached[:, :-1])).abs().max().item())
    sample = model.generate(prompt, cfg.gen_tokens, temperature=0.8, top_k=50, top_p=0.95,
                            generator=torch.Generator().manual_seed(cfg.seed))
    tok = corpus.tokenizer
    rep.note(f"prompt: {tok.decode(prompt[0])!r}")
    rep.note(f"greedy: {tok.decode(cached[0, 16:])!r}")
    rep.note(f"sampled (T=0.8, top-k 50, top-p 0.95): {tok.decode(sample[0, 16:])!r}")

    hf_dir = model.save_pretrained(out / "hf")
    if tok._bpe is not None:
        tok._bpe.save(str(hf_dir / "tokenizer.json"))
    rep.note("Hugging Face folder: hf/ (config.json, model.safetensors, tokenizer.json)")

    with figure(out / "loss.png", title="tiny Llama on stdlib docstrings") as (_, ax):
        curves(ax, {"train": history["train_loss"]}, x=history["train_step"])
        ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
        ax.axhline(h_uni, color="k", ls="--", lw=1, label="val unigram entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize="small")
    rep.figure(out / "loss.png")
    return rep


def _cached_logits(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` computed one token at a time through a KV cache."""
    cache = model.new_cache()
    return torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], 1)


#: Issue 10's goal: our model at the reference's speed on the same weights.
BENCH_TARGET = 1.0
_BENCH_CASES = ("forward", "forward+backward", "greedy generate with KV cache")


def _bench_claim(case: str, cfg: Config) -> str:
    what = f"{cfg.bench_new_tokens} new tokens" if case.startswith("greedy") else \
        f"{cfg.bench_batch} x {cfg.bench_seq} tokens"
    return f"ours / transformers LlamaForCausalLM time, {case} ({what})"


def bench(cfg: Config, out: Path) -> Report:
    """Forward, forward+backward and cached greedy decoding vs transformers, same weights.

    Both models hold the same random weights (copied through :func:`hf_key_map`, which must
    cover both state dicts); each case is timed interleaved by
    :func:`mlatlas.measure.compare_times` (median of ``bench_repeats`` rounds). transformers
    runs its SDPA attention, the forward without its cache (``use_cache=False``, as ours).
    """
    rep = Report()
    try:
        import transformers
    except ImportError:
        for case in _BENCH_CASES:
            rep.not_measured(_bench_claim(case, cfg), BENCH_TARGET, "<=", "x",
                             reason="transformers is not installed (pip install mlatlas[ref])")
        return rep
    from transformers.utils import logging as hf_logging

    from mlatlas.llm.hf_format import config_to_hf

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.bench_hidden,
                         intermediate_size=cfg.bench_intermediate, num_layers=cfg.bench_layers,
                         num_heads=cfg.bench_heads, num_kv_heads=cfg.bench_kv_heads,
                         max_position_embeddings=max(cfg.bench_seq,
                                                     cfg.bench_prompt + cfg.bench_new_tokens))
    ours = Llama(config).eval()
    hf_config = transformers.LlamaConfig(**config_to_hf(config))
    hf_config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    key_map, state = hf_key_map(config), ours.state_dict()
    missing, unexpected = hf.load_state_dict({hf_k: state[k] for k, hf_k in key_map.items()},
                                             strict=False)
    if missing or unexpected or set(key_map) != set(state):
        raise RuntimeError(f"weight copy incomplete: missing {missing}, unexpected {unexpected}")
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.vocab_size, (cfg.bench_batch, cfg.bench_seq), generator=gen)
    prompt = ids[:, :cfg.bench_prompt]
    n_new = cfg.bench_new_tokens
    with torch.no_grad():
        rep.metric("max |logits ours - transformers|",
                   (ours(ids) - hf(ids, use_cache=False).logits).abs().max().item())

    def forward(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model(ids) if model is ours else model(ids, use_cache=False)

    def forward_backward(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        logits = model(ids) if model is ours else model(ids, use_cache=False).logits
        logits.float().square().mean().backward()

    def generate(model: torch.nn.Module) -> torch.Tensor:
        if model is ours:
            return ours.generate(prompt, n_new)
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                           do_sample=False, eos_token_id=None, pad_token_id=0)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate()'s notes on unset generation flags
    try:
        tokens = {name: generate(m) for name, m in (("ours", ours), ("transformers", hf))}
        assert tokens["ours"].shape == tokens["transformers"].shape == (cfg.bench_batch,
                                                                        cfg.bench_prompt + n_new)
        rep.metric("greedy tokens that differ, ours vs transformers (random weights: near-ties)",
                   int((tokens["ours"] != tokens["transformers"]).sum()))
        for case, fn in zip(_BENCH_CASES, (forward, forward_backward, generate)):
            t = compare_times({"ours": lambda fn=fn: fn(ours),
                               "transformers": lambda fn=fn: fn(hf)},
                              repeats=cfg.bench_repeats, warmup=1)
            ms = {name: timing.median_s * 1e3 for name, timing in t.items()}
            rep.metric(f"ms ours, {case}", ms["ours"])
            rep.metric(f"ms transformers, {case}", ms["transformers"])
            rep.claim(_bench_claim(case, cfg), ms["ours"] / ms["transformers"], BENCH_TARGET,
                      "<=", unit="x",
                      detail=f"{ms['ours']:.1f} ms vs {ms['transformers']:.1f} ms (median of "
                             f"{cfg.bench_repeats} interleaved rounds, {torch.get_num_threads()}"
                             f" threads); d={cfg.bench_hidden}, {cfg.bench_layers} layers, "
                             f"{cfg.bench_heads}/{cfg.bench_kv_heads} heads, fp32 CPU")
    finally:
        hf_logging.set_verbosity(verbosity)
    rep.note(f"transformers {transformers.__version__}, attention 'sdpa' in both models; same "
             "weights copied by hf_key_map; timed with mlatlas.measure.compare_times")
    return rep
