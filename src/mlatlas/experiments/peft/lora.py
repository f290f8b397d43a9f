"""LoRA on the shared tiny pretrained Llama: a fraction of the parameters, full-FT accuracy.

The base is :func:`mlatlas.llm.zoo.tiny_llama` (pretrained on the embedded corpus); the
downstream task is the synthetic instruction task of
:mod:`mlatlas.datasets.instructions` (``"largest: 3 7 1 9 5 ->"`` → ``"9"``, exact match),
whose format the base has never seen. The same schedule fine-tunes every parameter (full
fine-tuning) and, from the same base, only LoRA factors on ``q_proj``/``v_proj`` (rank 4 and
8, ``α = 2r``; Hu et al. §4.2 adapt ``W_q, W_v``). Reported per method: trainable share, exact
match (mean over ``seeds``), gradient and AdamW-state bytes counted from the tensors, and the
training-step time (:func:`mlatlas.measure.compare_times`, interleaved).

Claims (targets from the issue, fixed before running):

* full fine-tuning learns the task: ≥ 3× the frozen base's exact match (the issue's
  criterion for learning; without it the gap claims below would hold vacuously);
* LoRA r = 4 trains ≤ 1% of the parameters;
* its exact match is within 1 point of full fine-tuning's (``full − LoRA ≤ 1`` point), and so
  is rank 8's (whose share, 1.8% at ``d = 128``, is reported, not claimed: ``r/d`` is large
  in a model this small);
* ``bench``: peak training memory and step time of LoRA vs full fine-tuning side by side
  (the paper: VRAM 1.2 TB → 350 GB, 25% faster training on GPT-3 175B).

Each run also writes the rank-4 adapter as a peft folder (``adapter-r4/``):
``PeftModel.from_pretrained`` loads it onto the transformers copy of the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.llm.zoo import tiny_llama
from mlatlas.measure import PeakMemory, compare_times
from mlatlas.peft.finetuning import (
    Comparison,
    FineTuneSchedule,
    Method,
    compare_methods,
    exact_match,
    instruction_task,
    make_optimizer,
    train_step,
    training_state_bytes,
)
from mlatlas.peft.lora import LoraConfig, apply_lora
from mlatlas.peft.peft_format import save_adapter
from mlatlas.plots import curves, figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds the task split, the LoRA init and the batch order
    seeds: int = 1  # fine-tuning seeds per method (claims compare the means)
    n_train: int = 2000  # training examples
    n_eval: int = 200  # held-out examples scored by exact match
    length: int = 3  # digits per instruction
    steps: int = 150  # optimizer steps per method
    batch: int = 16  # examples per step
    lr_full: float = 1e-3  # peak learning rate of full fine-tuning
    lr_lora: float = 5e-3  # peak learning rate of LoRA (the paper tunes it per method)
    ranks: tuple[int, ...] = (4, 8)  # LoRA ranks; the share claim is on the first
    alpha_per_rank: float = 2.0  # α = this · r
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # Hu et al.: W_q and W_v
    max_share: float = 0.01  # claim: LoRA's trainable share ≤ this (issue: 1%)
    min_learned_ratio: float = 3.0  # claim: full FT ≥ this × the frozen base (issue's "learns")
    max_gap: float = 0.01  # claim: full − LoRA exact match ≤ this (issue: 1 point)
    timing_repeats: int = 3  # interleaved step-time rounds per method
    bench_batch: int = 16  # bench: examples per training step
    bench_repeats: int = 5  # bench: timed rounds
    threads: int = 2  # torch threads (the runner pins them)

    @classmethod
    def smoke(cls) -> Config:
        """A few steps on a few examples (for tests)."""
        return cls(n_train=32, n_eval=8, steps=2, batch=4, timing_repeats=1, bench_batch=4,
                   bench_repeats=1)

    @classmethod
    def full(cls) -> Config:
        """Three seeds, longer training, a larger eval split."""
        return cls(seeds=3, steps=600, n_eval=500, n_train=8000)


def _lora_model(cfg: Config, r: int, seed: int) -> torch.nn.Module:
    model = tiny_llama().model
    torch.manual_seed(seed)  # the LoRA A init
    apply_lora(model, LoraConfig(r=r, lora_alpha=cfg.alpha_per_rank * r,
                                 target_modules=list(cfg.target_modules)))
    return model


def _key(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


def run(cfg: Config, out: Path) -> Report:
    """Full fine-tuning vs LoRA r = 4, 8 on the instruction task; save the r = 4 adapter."""
    rep = Report()
    lm = tiny_llama()
    task = instruction_task(lm.tokenizer, cfg.n_train, cfg.n_eval, cfg.seed, cfg.length)
    base_acc = rep.metric("accuracy_frozen_base", exact_match(lm.model, lm.tokenizer, task.eval))
    methods = {"full": Method(lambda s: tiny_llama().model,
                              FineTuneSchedule(cfg.steps, cfg.batch, cfg.lr_full))}
    for r in cfg.ranks:
        methods[f"lora r={r}"] = Method(lambda s, r=r: _lora_model(cfg, r, s),
                                        FineTuneSchedule(cfg.steps, cfg.batch, cfg.lr_lora))
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    cmp = compare_methods(methods, task, seeds, cfg.timing_repeats)
    for name, value in cmp.metrics(_key).items():
        rep.metric(name, value)
    first = f"lora r={cfg.ranks[0]}"
    said = f"mean of seeds {seeds}, {len(task.eval)} held-out instructions"
    lead = cmp.results[first][0]
    rep.claim(f"LoRA r={cfg.ranks[0]} trainable share", 100 * lead.share, 100 * cfg.max_share,
              "<=", "%", target_source="max_share",
              detail=f"{lead.trainable} of {lead.total} parameters")
    full = cmp.accuracy("full")
    floor = 1 / len(task.eval)
    rep.claim("full fine-tuning learns the task: exact match / frozen base's",
              full / max(base_acc, floor), cfg.min_learned_ratio, ">=", "x",
              target_source="min_learned_ratio",
              detail=f"full {full:.3f} vs frozen base {base_acc:.3f} (floored at 1/"
                     f"{len(task.eval)}); without it the gap claims below are vacuous")
    for r in cfg.ranks:
        name = f"lora r={r}"
        rep.claim(f"exact match: full fine-tuning − LoRA r={r}",
                  100 * (full - cmp.accuracy(name)), 100 * cfg.max_gap, "<=", "points",
                  target_source="max_gap",
                  detail=f"full {full:.3f} vs LoRA {cmp.accuracy(name):.3f}, {said}")
    save_adapter(lead.model, out / f"adapter-r{cfg.ranks[0]}")
    rep.note(f"Frozen base: {base_acc:.3f} exact match. Full fine-tuning {full:.3f}; "
             + "; ".join(f"{n} {cmp.accuracy(n):.3f} ({100 * rs[0].share:.2f}% trainable)"
                         for n, rs in cmp.results.items() if n != "full") + f" — {said}.")
    rep.note(f"The rank-{cfg.ranks[0]} adapter (seed {seeds[0]}) is saved as a peft folder in "
             f"adapter-r{cfg.ranks[0]}/ (adapter_config.json + adapter_model.safetensors).")
    _figure(rep, out, cmp, base_acc)
    return rep


def _figure(rep: Report, out: Path, cmp: Comparison, base_acc: float) -> None:
    with figure(out / "lora.png", ncols=2) as (_, axes):
        names = list(cmp.results)
        axes[0, 0].bar(["frozen base"] + names, [base_acc] + [cmp.accuracy(n) for n in names],
                       color="tab:blue")
        axes[0, 0].set_ylabel("exact match (held-out)")
        axes[0, 0].set_ylim(0, 1)
        smooth = {n: rs[0].smoothed_losses() for n, rs in cmp.results.items()}
        curves(axes[0, 1], smooth, xlabel="step", ylabel="answer loss (nats, smoothed)",
               logy=True)
        axes[0, 1].legend()
    rep.figure(out / "lora.png")


def bench(cfg: Config, out: Path) -> Report:
    """Peak training memory and step time: LoRA r = first rank vs full fine-tuning."""
    rep = Report()
    lm = tiny_llama()
    task = instruction_task(lm.tokenizer, max(cfg.bench_batch, 64), 1, cfg.seed, cfg.length)
    ids, labels = task.train.input_ids[:cfg.bench_batch], task.train.labels[:cfg.bench_batch]
    models = {"full": tiny_llama().model, "lora": _lora_model(cfg, cfg.ranks[0], cfg.seed)}
    peak, state, steps = {}, {}, {}
    for name, model in models.items():
        schedule = FineTuneSchedule(1, cfg.bench_batch, cfg.lr_lora)
        opt = make_optimizer(model, schedule)
        weights = sum(p.nbytes for p in model.parameters())
        with PeakMemory("cpu") as mem:  # the first step allocates grads and AdamW's state
            train_step(model, opt, ids, labels)
        peak[name] = weights + mem.peak_bytes
        nbytes = training_state_bytes(model, opt)
        state[name] = nbytes["gradients"] + nbytes["optimizer_state"]
        rep.metric(f"{name}_weights_bytes", weights)
        rep.metric(f"{name}_step_peak_bytes", mem.peak_bytes)
        rep.metric(f"{name}_grad_and_optimizer_bytes", state[name])
        steps[name] = lambda m=model, o=opt: train_step(m, o, ids, labels)
    times = compare_times(steps, repeats=cfg.bench_repeats, warmup=1)
    mem_ratio = peak["lora"] / peak["full"]
    time_ratio = times["lora"].median_s / times["full"].median_s
    rep.metric("full_step_s", times["full"].median_s)
    rep.metric("lora_step_s", times["lora"].median_s)
    rep.claim("training memory LoRA / full (weights + step peak)", mem_ratio, 350 / 1200, "<=",
              "x", detail=f"r={cfg.ranks[0]} on {list(cfg.target_modules)}, batch "
                          f"{cfg.bench_batch}; paper: 1.2 TB → 350 GB on GPT-3 175B")
    rep.claim("training step time LoRA / full", time_ratio, 1 / 1.25, "<=", "x",
              detail="median of interleaved rounds; paper: 25% higher throughput on GPT-3")
    mib = 2 ** 20
    rep.note(f"Peak training memory = weights + what one step allocates (activations, "
             f"gradients, AdamW state): full {peak['full'] / mib:.2f} MiB (gradients + AdamW "
             f"{state['full'] / mib:.2f} MiB), LoRA {peak['lora'] / mib:.2f} MiB (gradients + "
             f"AdamW {state['lora'] / mib:.3f} MiB). LoRA removes the gradient and optimizer "
             "state of the frozen weights, not the weights or the activations, so the ratio "
             "approaches the paper's only where those states dominate.")
    return rep
