"""DPO on the shared tiny pretrained Llama: learn a preference a program checks.

The task is a *lipogram* preference: of two continuations of the same prompt, the one with
fewer letters ``e`` is preferred (a program counts them). Prompts are 12-token windows of the
embedded corpus; for every prompt the reference model (the pretrained model, frozen) samples
``candidates`` continuations of 8 tokens, and the one with the fewest ``e`` is paired with the
one with the most (ties dropped). Chosen and rejected have the same number of tokens, so
length cannot explain a preference. Prompts are split into training and held-out prompts.

DPO (:mod:`mlatlas.alignment.dpo`) trains the policy on the training pairs only, against the
reference's precomputed log-probs. Claims (targets from issue 15, fixed before running):

* **held-out preference accuracy** — the fraction of held-out pairs whose implicit reward
  ``β log π/π_ref`` is higher for the chosen continuation — goes from 0.5 (policy =
  reference: every margin is 0, ties count ½) to **≥ 0.8**;
* **the implicit reward margin rises** on held-out pairs (mean ``r̂_w - r̂_l`` after > before).

Reported, not claimed: ``KL(π_θ || π_ref)`` per continuation on held-out prompts (Monte Carlo
over policy samples), the reference's own likelihood preference on the held-out pairs (how
often ``log π_ref(y_w) > log π_ref(y_l)``), and the mean number of ``e`` in continuations
sampled from the reference and from the trained policy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from mlatlas.alignment.dpo import DPOTrainer, PreferenceBatch, precompute_reference
from mlatlas.alignment.logprobs import completion_logps
from mlatlas.alignment.rollout import sample_completions
from mlatlas.datasets.corpus import load_corpus
from mlatlas.plots import curves, figure
from mlatlas.report import Report
from mlatlas.runtime import progress


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds prompt windows, sampling and batch order
    num_prompts: int = 160  # corpus windows used as prompts (train + held-out)
    heldout_prompts: int = 60  # of them, held out (their pairs are never trained on)
    prompt_tokens: int = 12  # tokens per prompt window
    completion_tokens: int = 8  # tokens per sampled continuation (no early stop)
    candidates: int = 16  # continuations sampled per prompt from the reference
    pairs_per_prompt: int = 1  # pairs per prompt: fewest-e vs most-e, next-fewest vs next-most …
    beta: float = 0.1  # DPO β
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    lr: float = 1e-4  # AdamW learning rate
    batch: int = 16  # pairs per step
    steps: int = 40  # optimizer steps
    eval_every: int = 10  # steps between held-out evaluations
    kl_samples: int = 4  # policy samples per held-out prompt for the KL and property rates
    accuracy_target: float = 0.8  # held-out preference accuracy claimed (issue 15)
    threads: int = 1  # torch threads (a tiny model: one thread is fastest)

    @classmethod
    def smoke(cls) -> Config:
        """A few steps on a handful of prompts (tests)."""
        return cls(num_prompts=12, heldout_prompts=4, candidates=4, steps=2, eval_every=1,
                   batch=4, kl_samples=1)

    @classmethod
    def full(cls) -> Config:
        """More prompts and steps."""
        return cls(num_prompts=640, heldout_prompts=200, steps=150, eval_every=25, kl_samples=8)


def e_count(text: str) -> int:
    """The checker: how many times the letter ``e`` occurs (either case); fewer is better."""
    return text.lower().count("e")


def _pairs(prompts: list[list[int]], which: range, rollout, texts: list[str], per_prompt: int,
           gen: torch.Generator) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token lists of prompts ``which`` (shuffled): per prompt, the
    candidates with the fewest ``e`` are paired with those with the most, strict ties dropped."""
    comps = rollout.completions()
    out = []
    for i in which:
        rows = (rollout.prompt_index == i).nonzero().flatten().tolist()
        rows.sort(key=lambda r: e_count(texts[r]))
        for k in range(min(per_prompt, len(rows) // 2)):
            good, bad = rows[k], rows[-1 - k]
            if e_count(texts[good]) < e_count(texts[bad]):
                out.append((prompts[i], comps[good], comps[bad]))
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[j] for j in order]


def _batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> PreferenceBatch:
    """Rows ``prompt + completion``; every prompt and completion has a fixed length here."""
    chosen = torch.tensor([p + c for p, c, _ in pairs])
    rejected = torch.tensor([p + r for p, _, r in pairs])
    mask = torch.zeros_like(chosen)
    mask[:, len(pairs[0][0]):] = 1
    return PreferenceBatch(chosen, mask, rejected, mask.clone())


@torch.no_grad()
def _policy_samples(policy, reference, prompts, tok, cfg: Config, gen: torch.Generator):
    """KL(π || π_ref) per continuation (mean of Σ_t log π/π_ref over policy samples) and the
    mean number of ``e`` per sampled continuation."""
    r = sample_completions(policy, prompts, num_samples=cfg.kl_samples,
                           max_new_tokens=cfg.completion_tokens, generator=gen)
    lp = completion_logps(policy, r.input_ids, r.completion_mask)
    ref = completion_logps(reference, r.input_ids, r.completion_mask)
    kl = float((lp.sequence - ref.sequence).mean())  # E_π[log π/π_ref] = KL(π || π_ref)
    rate = sum(e_count(tok.decode(c)) for c in r.completions()) / len(r)
    return kl, rate


def load_policy():
    """The shared tiny pretrained model: ``(model, tokenizer)``."""
    from mlatlas.llm.zoo import tiny_llama

    lm = tiny_llama()
    return lm.model, lm.tokenizer


def run(cfg: Config, out: Path) -> Report:
    """Build lipogram preference pairs, train DPO, evaluate on held-out pairs."""
    out = Path(out)
    rep = Report()
    gen = torch.Generator().manual_seed(cfg.seed)
    policy, tok = load_policy()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    corpus = load_corpus("bpe", tok.vocab_size)
    starts = torch.randint(0, corpus.val.numel() - cfg.prompt_tokens, (cfg.num_prompts,),
                           generator=gen)
    prompts = [corpus.val[s:s + cfg.prompt_tokens].tolist() for s in starts]
    rollout = sample_completions(reference, prompts, num_samples=cfg.candidates,
                                 max_new_tokens=cfg.completion_tokens, generator=gen)
    texts = [tok.decode(c) for c in rollout.completions()]
    rep.metric("letters e per reference continuation (mean)",
               sum(map(e_count, texts)) / len(texts))
    n_held = cfg.heldout_prompts
    held = _pairs(prompts, range(n_held), rollout, texts, cfg.pairs_per_prompt, gen)
    train = _pairs(prompts, range(n_held, len(prompts)), rollout, texts, cfg.pairs_per_prompt,
                   gen)
    if not held or not train:
        raise RuntimeError(f"too few preference pairs ({len(train)} train, {len(held)} held out)")
    rep.metric("training pairs", len(train))
    rep.metric("held-out pairs", len(held))
    held_batch = precompute_reference(reference, _batch(held))
    ref_pref = (held_batch.ref_chosen_logps > held_batch.ref_rejected_logps).float().mean()
    rep.metric("held-out pairs the reference already prefers by likelihood", float(ref_pref))

    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    trainer = DPOTrainer(policy, opt, beta=cfg.beta, loss_type=cfg.loss_type)
    train_batches = [precompute_reference(reference, _batch(train[i:i + cfg.batch]))
                     for i in range(0, len(train), cfg.batch)]
    start = trainer.evaluate(held_batch)
    history = {"step": [0], "held_acc": [start.accuracy],
               "held_margin": [float(start.margins.mean())], "train_loss": []}
    for step in progress(range(cfg.steps), cfg.steps, "dpo"):
        stats = trainer.step(train_batches[step % len(train_batches)])
        history["train_loss"].append(float(stats.losses.detach().mean()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            ev = trainer.evaluate(held_batch)
            history["step"].append(step + 1)
            history["held_acc"].append(ev.accuracy)
            history["held_margin"].append(float(ev.margins.mean()))

    end = trainer.evaluate(held_batch)
    rep.claim("held-out preference accuracy (implicit reward)", end.accuracy,
              cfg.accuracy_target, ">=", target_source="accuracy_target",
              detail=f"{len(held)} held-out pairs; {start.accuracy:.2f} before training "
                     f"(π = π_ref, ties ½)")
    rep.claim("held-out implicit reward margin after − before", float(end.margins.mean())
              - float(start.margins.mean()), 0.0, ">",
              detail=f"mean β(ρ_w − ρ_l): {float(start.margins.mean()):.3f} → "
                     f"{float(end.margins.mean()):.3f}")
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    kl, rate = _policy_samples(policy, reference, prompts[:n_held], tok, cfg, eval_gen)
    _, rate0 = _policy_samples(reference, reference, prompts[:n_held], tok, cfg,
                               torch.Generator().manual_seed(cfg.seed + 1))
    rep.metric("KL(policy || reference) per continuation (nats)", kl)
    rep.metric("letters e per sampled continuation, reference (held-out prompts)", rate0)
    rep.metric("letters e per sampled continuation, DPO policy (held-out prompts)", rate)
    rep.metric("held-out chosen reward (mean)", float(end.chosen_rewards.mean()))
    rep.metric("held-out rejected reward (mean)", float(end.rejected_rewards.mean()))
    rep.note("pairs: continuations sampled from the pretrained model, the one with the fewest "
             "letters e chosen over the one with the most; equal token counts")

    with figure(out / "dpo.png", ncols=2, title="DPO: prefer continuations with fewer e") as (
            _, axes):
        axes = axes.ravel()
        axes[0].plot(history["step"], history["held_acc"], "o-", label="held-out accuracy")
        axes[0].axhline(cfg.accuracy_target, color="k", ls="--", lw=1, label="target")
        axes[0].set_xlabel("step")
        axes[0].set_ylim(0, 1.05)
        axes[0].legend(fontsize="small")
        curves(axes[1], {"train loss": history["train_loss"]})
        axes[1].plot(history["step"], history["held_margin"], "o-", label="held-out margin")
        axes[1].set_xlabel("step")
        axes[1].legend(fontsize="small")
    rep.figure(out / "dpo.png")
    return rep

