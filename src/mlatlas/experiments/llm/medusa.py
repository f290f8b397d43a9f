"""Medusa heads and tree attention on the shared tiny pretrained Llama.

Medusa-1: ``K`` heads (:class:`mlatlas.llm.medusa.MedusaHeads`, the paper's init) are trained
on the embedded corpus with the base model frozen, by default against the base model's own
greedy choices (self-distillation, Medusa §2.3.2 — under greedy acceptance a candidate counts
only when it is what the base would emit). Their top-``i`` accuracies ``a_k^(i)`` measured on
held-out windows build the sparse candidate tree (§2.3.3, :func:`sparse_tree`). On held-out
prompts :func:`medusa_generate` verifies the whole tree in one forward per step. Claims:

* **mean accepted length ≥ 2.3** tokens per decoding step (Spec-Bench's figure for Medusa on
  Vicuna-7B: 2.32).
* **lossless** under greedy acceptance — 0 tokens differ from :func:`generate`.

Typical acceptance (``τ = 0.7, ε = 0.09, δ = 0.3``) is reported beside them as a metric (it
is not lossless, so its tokens are not compared). ``bench`` reports the tokens/s ratio of
greedy Medusa decoding against greedy decoding with a KV cache, side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.datasets.corpus import load_corpus, sample_windows
from mlatlas.llm.generation import generate
from mlatlas.llm.llama import Llama
from mlatlas.llm.medusa import (
    DEFAULT_TREE,
    MedusaHeads,
    head_accuracy,
    medusa_generate,
    medusa_loss,
    sparse_tree,
)
from mlatlas.llm.speculative import DraftTree, acceptance_by_depth
from mlatlas.llm.zoo import tiny_llama
from mlatlas.measure import compare_times
from mlatlas.plots import curves, figure
from mlatlas.report import Report
from mlatlas.runtime import progress


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    threads: int = 1  # torch threads: batch-1 decoding of a tiny model gains nothing from more
    seed: int = 0  # seeds the heads' init and the training windows
    num_heads: int = 4  # K (the paper: 4–5)
    steps: int = 100  # AdamW steps on the heads (base frozen: Medusa-1)
    batch: int = 16  # training windows per step
    seq_len: int = 64  # training window length
    lr: float = 3e-3  # AdamW learning rate (constant after a 10-step warm-up)
    decay: float = 0.8  # λ_k = decay^k
    train_on: str = "generated"  # "generated": self-distillation (§2.3.2); "corpus": windows
    distill: bool = True  # targets: the base model's greedy choices (False: the tokens)
    pool: int = 128  # generated: greedy continuations (of training prompts) to train on
    tree_nodes: int = 24  # nodes of the calibrated sparse tree (0: the default tree)
    tree_top: int = 5  # ranks per head scored for the tree
    calibration_windows: int = 32  # greedy continuations (of training prompts) for a_k^(i)
    prompts: int = 8  # held-out prompts
    prompt_len: int = 16  # tokens per prompt
    new_tokens: int = 64  # tokens generated per prompt
    temperature: float = 0.7  # typical acceptance τ
    epsilon: float = 0.09  # typical acceptance ε
    delta: float = 0.3  # typical acceptance δ
    target_accepted_length: float = 2.3  # Spec-Bench's Medusa figure, 2.32
    repeats: int = 3  # bench: timed rounds (median reported)

    @classmethod
    def smoke(cls) -> Config:
        """A few steps and one short generation: checks the run, measures nothing."""
        return cls(steps=3, batch=4, seq_len=32, pool=4, calibration_windows=2, prompts=1,
                   prompt_len=8, new_tokens=8, repeats=1)

    @classmethod
    def full(cls) -> Config:
        """Longer training, a larger tree, more prompts."""
        return cls(steps=300, tree_nodes=40, prompts=16, new_tokens=128)


def train_heads(cfg: Config, model: Llama, train: torch.Tensor) -> tuple[MedusaHeads,
                                                                         list[float]]:
    """Medusa-1: train the heads on windows of ``train`` with the base frozen.

    Returns:
        The trained heads (eval mode) and the loss of every step.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    heads = MedusaHeads.for_model(model, cfg.num_heads)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.train_on == "generated":  # the base's own greedy text, as decoding will see it
        prompts, _ = sample_windows(train, cfg.pool, cfg.prompt_len, gen)
        pool = generate(model, prompts, cfg.seq_len - cfg.prompt_len)
    elif cfg.train_on != "corpus":
        raise ValueError(f"train_on must be 'generated' or 'corpus', got {cfg.train_on!r}")
    losses: list[float] = []
    for step in progress(range(cfg.steps), cfg.steps, f"train Medusa-1 (K={cfg.num_heads})"):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 10)
        if cfg.train_on == "generated":
            x = pool[torch.randint(0, cfg.pool, (cfg.batch,), generator=gen)]
        else:
            x, _ = sample_windows(train, cfg.batch, cfg.seq_len, gen)
        h, targets = _hidden_and_targets(model, x, cfg.distill)
        loss = medusa_loss(heads(h), targets, cfg.decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return heads.eval(), losses


@torch.no_grad()
def _hidden_and_targets(model: Llama, x: torch.Tensor, distill: bool) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    h = model.hidden_states(x)
    targets = x.clone()
    if distill:  # the base's greedy choice for every token after the first
        targets[:, 1:] = model.lm_head(h[:, :-1]).argmax(-1)
    return h, targets


@torch.no_grad()
def calibrated_tree(cfg: Config, model: Llama, heads: MedusaHeads, train: torch.Tensor
                    ) -> tuple[DraftTree, torch.Tensor]:
    """The sparse tree of ``cfg.tree_nodes`` nodes from ``a_k^(i)`` measured on calibration text.

    The calibration text is what decoding will see: the base model's greedy continuations
    of ``cfg.calibration_windows`` prompts drawn from the *training* stream (the evaluation
    prompts are held out); accuracy counts a candidate right when it is the base model's
    greedy choice (what greedy acceptance compares with).
    """
    x, _ = sample_windows(train, cfg.calibration_windows, cfg.prompt_len,
                          torch.Generator().manual_seed(cfg.seed + 1))
    seq = generate(model, x, cfg.seq_len)
    h, greedy = _hidden_and_targets(model, seq, distill=True)
    acc = head_accuracy(heads(h), greedy, cfg.tree_top)
    if cfg.tree_nodes == 0:
        return DraftTree([p for p in DEFAULT_TREE if len(p) <= cfg.num_heads]), acc
    return sparse_tree(acc, cfg.tree_nodes), acc


def held_out_prompts(val: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """``count`` prompts ``[1, length]`` evenly spaced over the validation stream."""
    starts = torch.linspace(0, val.numel() - length - 1, count).long().tolist()
    return [val[s:s + length][None] for s in starts]


def _setup(cfg: Config):
    lm = tiny_llama()
    corpus = load_corpus("bpe", lm.recipe.vocab_size)
    model = lm.model.eval()
    heads, losses = train_heads(cfg, model, corpus.train)
    tree, acc = calibrated_tree(cfg, model, heads, corpus.train)
    return model, heads, tree, acc, losses, held_out_prompts(corpus.val, cfg.prompts,
                                                             cfg.prompt_len)


def run(cfg: Config, out: Path) -> Report:
    """Train the heads, build the tree, decode held-out prompts, report the claims."""
    report = Report()
    model, heads, tree, acc, losses, prompts = _setup(cfg)
    differ, greedy_runs, typical_runs = 0, [], []
    gen = torch.Generator().manual_seed(cfg.seed)
    for prompt in progress(prompts, len(prompts), "decode held-out prompts"):
        ref = generate(model, prompt, cfg.new_tokens)
        res = medusa_generate(model, heads, prompt, cfg.new_tokens, tree=tree)
        differ += int((res.tokens != ref).sum()) if res.tokens.shape == ref.shape \
            else ref.numel()
        greedy_runs.append(res)
        typical_runs.append(medusa_generate(
            model, heads, prompt, cfg.new_tokens, tree=tree, acceptance="typical",
            temperature=cfg.temperature, epsilon=cfg.epsilon, delta=cfg.delta, generator=gen))
    accepted = [a for r in greedy_runs for a in r.accepted]
    mean_len = sum(a + 1 for a in accepted) / max(1, len(accepted))
    per_head = acceptance_by_depth(accepted, [d for r in greedy_runs for d in r.drafted],
                                   tree.max_depth)
    typical = [a for r in typical_runs for a in r.accepted]
    new, forwards = (sum(r.new_tokens for r in greedy_runs),
                     sum(r.forwards for r in greedy_runs))
    report.metric("final_medusa_loss", sum(losses[-10:]) / len(losses[-10:]))
    report.metric("tree_nodes", len(tree) - 1)
    report.metric("tokens_per_forward", new / forwards)
    report.metric("typical_mean_accepted_length", sum(a + 1 for a in typical)
                  / max(1, len(typical)))
    for k in range(acc.shape[0]):
        report.metric(f"head_{k + 1}_top1_accuracy", float(acc[k, 0]))
    for k, rate in enumerate(per_head, start=1):
        report.metric(f"acceptance_head_{k}", rate)
    report.claim("mean accepted length (tokens per decoding step)", mean_len,
                 cfg.target_accepted_length, ">=",
                 detail=f"{len(accepted)} steps over {len(prompts)} held-out prompts, "
                        f"K={cfg.num_heads}, {len(tree) - 1}-node tree {tree.top_k()}; "
                        "Spec-Bench (Vicuna-7B): 2.32",
                 target_source="target_accepted_length")
    report.claim("tokens differing from greedy decoding", differ, 0, "==",
                 detail=f"greedy acceptance, {len(prompts)} prompts x {cfg.new_tokens} tokens")
    data = ("the base's greedy continuations of training prompts (self-distillation)"
            if cfg.train_on == "generated" else "corpus windows")
    targets = "the base's greedy choices" if cfg.distill else "the tokens themselves"
    report.note(f"Base: the shared tiny Llama (frozen); heads trained {cfg.steps} steps on "
                f"{data}, targets {targets}; tree calibrated on greedy continuations of "
                f"training prompts: {tree.paths}.")
    with figure(out / "medusa.png", ncols=2, size=(9.0, 3.5)) as (_, axes):
        curves(axes[0, 0], {"Σ_k 0.8^k L_k": losses}, xlabel="step", ylabel="Medusa-1 loss")
        axes[0, 1].bar([f"head {k}" for k in range(1, len(per_head) + 1)], per_head,
                       label="accepted in decoding")
        axes[0, 1].plot(range(acc.shape[0]), acc[:, 0].tolist(), "ko", label="top-1 accuracy")
        axes[0, 1].set_ylim(0, 1)
        axes[0, 1].legend()
    report.figure(out / "medusa.png")
    return report


def bench(cfg: Config, out: Path) -> Report:
    """Tokens/s of greedy Medusa decoding vs greedy decoding with a KV cache."""
    report = Report()
    model, heads, tree, _, _, prompts = _setup(cfg)

    def greedy() -> None:
        for p in prompts:
            generate(model, p, cfg.new_tokens)

    def medusa() -> None:
        for p in prompts:
            medusa_generate(model, heads, p, cfg.new_tokens, tree=tree)

    times = compare_times({"greedy": greedy, "medusa": medusa}, repeats=cfg.repeats)
    tokens = len(prompts) * cfg.new_tokens
    for name, t in times.items():
        report.metric(f"{name}_tokens_per_s", tokens / t.median_s)
    report.claim("tokens/s vs greedy decoding (KV cache)",
                 times["greedy"].median_s / times["medusa"].median_s, 1.0, ">=", unit="x",
                 detail=f"K={cfg.num_heads}, {len(tree) - 1}-node tree, {len(prompts)} prompts "
                        f"x {cfg.new_tokens} tokens, median of {cfg.repeats}; Medusa-1 reports "
                        "2.2x on Vicuna-7B (GPU)")
    return report
