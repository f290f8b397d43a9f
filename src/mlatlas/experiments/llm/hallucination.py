"""Hallucination: detect it by sampling consistency, measure it by atomic-fact precision,
mitigate it by contrastive-layer decoding (DoLa) and retrieval-augmented generation.

``run`` trains a tiny Llama on an embedded synthetic fact base
(:mod:`mlatlas.datasets.facts`): biographies of *known* people, plus reading exercises
(``context : … answer : …`` about random names with random values) that teach it to copy facts
from a context — in exactly the format retrieval uses at inference, every training window
starting at a document so that no exercise loses its context. How well it reads is measured
on held-out exercises. It then questions the model about known people, people only in the
fact base (*retrievable*) and people in neither (*unknown*):

* **detection** — for every (person, relation) prompt the greedy answer is labelled
  hallucinated when the fact base does not support it; SelfCheck's score ``1 − agreement``
  of 10 sampled answers with the greedy one is ranked against those labels (AUROC);
* **FActScore** — every person's generated biography is split into atomic facts (templated
  sentences) and each fact checked against the fact base;
* **mitigation** — the same biographies decoded with DoLa (premature layer chosen per step
  by Jensen–Shannon divergence), and with retrieval: the facts the base holds about the name
  are put in the context, and the model abstains when the base holds none (the cost in
  answer rate is reported); SelfCheck used as a filter (drop facts whose score > 0.5) is
  reported beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlatlas.datasets.facts import RELATIONS, FactWorld, make_fact_world
from mlatlas.llm.dola import dola_generate
from mlatlas.llm.hallucination import (
    Fact,
    FactBase,
    auroc,
    decompose,
    fact_precision,
    selfcheck_score,
)
from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.pretraining import PretrainSchedule, adamw_for, pretrain
from mlatlas.plots import figure
from mlatlas.report import Report


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores.

    Targets fixed before running: SelfCheck detection AUROC ≥ ``min_auroc = 0.8`` (the
    issue's); retrieval-augmented generation raises FActScore precision over greedy decoding
    by ≥ ``min_rag_gain = 0.2`` (absolute); DoLa raises it by ≥ ``min_dola_gain = 0.02``
    (absolute; the scale of the paper's gains on FACTOR, 2–4 points).
    """

    seed: int = 0  # seeds the fact base, the model and the sampling
    threads: int = 1  # torch threads: these tiny models are op-overhead bound; more threads spin
    n_known: int = 60  # people the model is trained on
    n_retrievable: int = 24  # people only in the fact base
    n_unknown: int = 24  # people in neither
    zipf: float = 1.0  # popularity skew of attribute values
    repeats: int = 16  # shuffled biographies per known person in the training stream
    rag_docs: int = 1200  # context-reading exercises in the training stream
    steps: int = 600  # pretraining steps
    batch: int = 16  # windows per step
    seq_len: int = 40  # window length; windows start at a document (a whole exercise is 33)
    lr: float = 3e-3  # AdamW peak learning rate
    hidden: int = 64  # model width
    layers: int = 4  # decoder layers
    samples: int = 10  # SelfCheck's N sampled answers (temperature 1)
    dola_layers: tuple[int, ...] = (0, 1, 2)  # DoLa's candidate premature layers J
    relative_top: float = 0.1  # DoLa's α
    bio_tokens: int = 16  # tokens generated per biography
    min_auroc: float = 0.8  # claim target
    min_rag_gain: float = 0.2  # claim target
    min_dola_gain: float = 0.02  # claim target

    @classmethod
    def smoke(cls) -> Config:
        """A few steps, for tests."""
        return cls(n_known=8, n_retrievable=4, n_unknown=4, repeats=2, rag_docs=20, steps=40,
                   batch=8, samples=3, bio_tokens=6)

    @classmethod
    def full(cls) -> Config:
        """Five times the default's training steps."""
        return cls(steps=3000)


NOTES = (
    "Design, diagnosed on the shared 2-core VM (2026-11-30; this run's own numbers are above). "
    "First version (init std 0.02, random 64-token windows, 200 steps × 32): RAG −0.018 (default), "
    "+0.014 (1000 steps) — the LM did not read its context although the retrieval prompt had the "
    "exercises' format and exercises were 73 % of the training tokens: on held-out exercises it "
    "copied the value at chance (0.11/0.12/0.15 for lives_in/works_as/likes, chance 0.125) after "
    "200 steps and 0.63/0.14/0.91 after 1000. Two causes, each measured: (1) Hugging Face's init "
    "std 0.02 (the 1/√d scale of d ≈ 2500) is 6× too small at d = 64 and leaves the copying "
    "attention heads in a long plateau — the fan-in std 1/√64 makes them form within ~300 steps; "
    "(2) random windows cut exercises: only 62 % of the answer values had their context inside the "
    "window — windows now start at a document (every exercise, 33 tokens, whole in 40). With (1) "
    "alone copying reached 0.11/0.24/0.31 (RAG +0.065); with (1)+(2) 0.97/0.96/0.79 (RAG +0.34), on"
    " the same 410k training tokens. The three per-relation lookups form one at a time at a "
    "seed-dependent step, so the default spends its budget on steps (600 × 16 windows of 40, fewer "
    "tokens than before; 400 × 24 left one relation uncopied on seed 1). DoLa: facts surface late "
    "as DoLa assumes (early-exit accuracy on known people 0.00/0.32/0.89/1.00 at layers 0-3), but "
    "greedy is already right on known people, so there is little to correct; what DoLa changes is "
    "answers about people the model never saw. SelfCheck: the better-trained LM confabulates "
    "confidently about people it never saw — 37 % of its hallucinated answers get all 10 samples "
    "agreeing (10 % for the first version at 1000 steps), which sampling consistency cannot flag: "
    "its premise fails for a model that is consistently wrong (the first version's AUROC, 0.84 at "
    "1000 steps, came from a model that could not read either)."
)


def train_model(world: FactWorld, cfg: Config) -> Llama:
    """Pretrain a tiny Llama on the world's training stream."""
    tok = world.tokenizer
    stream = torch.tensor(world.training_stream(cfg.repeats, cfg.rag_docs, cfg.seed))
    # windows start at an <eos>: a reading exercise is never cut off from its context
    starts = (stream == tok.eos_id).nonzero().flatten()
    starts = starts[starts < stream.numel() - cfg.seq_len]
    torch.manual_seed(cfg.seed)
    # fan-in init std 1/√d: Hugging Face's 0.02 is that scale for d ≈ 2500; at d = 64 it is 6×
    # too small and stalls the attention heads that copy from context (see the run's notes)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden,
                              intermediate_size=int(8 * cfg.hidden / 3), num_layers=cfg.layers,
                              num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                              tie_word_embeddings=True, initializer_range=cfg.hidden ** -0.5))
    schedule = PretrainSchedule(steps=cfg.steps, batch=cfg.batch, seq_len=cfg.seq_len,
                                lr=cfg.lr, warmup=20)
    pretrain(model, adamw_for(model, schedule), stream, schedule,
             torch.Generator().manual_seed(cfg.seed), description="train fact LM", starts=starts)
    return model.eval()


@torch.no_grad()
def reading_accuracy(model: Llama, world: FactWorld, n: int, seed: int) -> dict[str, float]:
    """Per relation, how often the model copies the value from the context: ``n`` held-out
    reading exercises (the training format, fresh random names and values), teacher-forced,
    argmax at each answer value. Chance is 1/8 (uniform values)."""
    tok = world.tokenizer
    rng = np.random.default_rng(seed + 1)  # the training stream draws from ``seed``
    answer = tok.encode("answer")[0]
    docs = [world.reading_exercise(rng) for _ in range(n)]
    ids = torch.tensor([[tok.eos_id] + tok.encode(d) for d in docs])
    pred = model(ids).argmax(-1)
    hits: dict[str, list[bool]] = {r: [] for r in RELATIONS}
    for row, guess in zip(ids.tolist(), pred.tolist()):
        for t in range(row.index(answer) + 1, len(row)):
            for r, (_, values) in RELATIONS.items():
                if tok.vocab[row[t]] in values:
                    hits[r].append(guess[t - 1] == row[t])
    return {r: sum(h) / len(h) for r, h in hits.items()}


def fact_base(world: FactWorld) -> FactBase:
    """The world's facts as a :class:`FactBase`."""
    facts = [Fact(e, r, v) for e, rel in world.facts.items() for r, v in rel.items()]
    return FactBase.from_facts(facts, {r: phrase for r, (phrase, _) in RELATIONS.items()})


@torch.no_grad()
def detect(model: Llama, world: FactWorld, base: FactBase, cfg: Config) -> dict:
    """Greedy answer, SelfCheck score and ground-truth label of every (person, relation)."""
    tok = world.tokenizer
    people = world.known + world.retrievable + world.unknown
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    scores, labels, groups = [], [], []
    for relation, (phrase, _) in RELATIONS.items():
        prompts = torch.tensor([[tok.eos_id] + tok.encode(f"{p} {phrase}") for p in people])
        logits = model(prompts)[:, -1].float()
        greedy = logits.argmax(-1)
        sampled = torch.multinomial(logits.softmax(-1), cfg.samples, replacement=True,
                                    generator=gen)
        scores += selfcheck_score(greedy, sampled).tolist()
        labels += [int(not base.supports(Fact(p, relation, tok.vocab[int(a)])))
                   for p, a in zip(people, greedy)]
        groups += [_group(world, p) for p in people]
    return {"scores": scores, "labels": labels, "groups": groups}


def _group(world: FactWorld, person: str) -> str:
    return ("known" if person in world.known else
            "retrievable" if person in world.retrievable else "unknown")


def _continuations(tok, rows: torch.Tensor, start: int) -> list[str]:
    out = []
    for row in rows.tolist():
        new = row[start:]
        if tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        out.append(tok.decode(new))
    return out


@torch.no_grad()
def biographies(model: Llama, world: FactWorld, base: FactBase, cfg: Config) -> dict:
    """Biographies of every person: greedy, DoLa and retrieval-augmented ('' = abstain)."""
    tok = world.tokenizer
    people = world.known + world.retrievable + world.unknown
    prompts = torch.tensor([[tok.eos_id] + tok.encode(p) for p in people])
    greedy = model.generate(prompts, cfg.bio_tokens, eos_token_id=tok.eos_id)
    dola = dola_generate(model, prompts, cfg.bio_tokens, list(cfg.dola_layers),
                         relative_top=cfg.relative_top, eos_token_id=tok.eos_id)
    rag = [""] * len(people)
    found = [(i, base.retrieve(p)) for i, p in enumerate(people)]
    found = [(i, f) for i, f in found if f]  # nothing retrieved: abstain
    by_len: dict[int, list[tuple[int, list[int]]]] = {}
    for i, facts in found:
        ctx = " ".join(base.sentence(f) for f in facts)
        ids = [tok.eos_id] + tok.encode(f"context : {ctx} answer : {people[i]}")
        by_len.setdefault(len(ids), []).append((i, ids))
    for length, items in by_len.items():
        out = model.generate(torch.tensor([ids for _, ids in items]), cfg.bio_tokens,
                             eos_token_id=tok.eos_id)
        for (i, _), text in zip(items, _continuations(tok, out, length)):
            rag[i] = f"{people[i]} {text}"
    start = prompts.shape[1]
    return {"greedy": [f"{p} {t}" for p, t in zip(people, _continuations(tok, greedy, start))],
            "DoLa": [f"{p} {t}" for p, t in zip(people, _continuations(tok, dola, start))],
            "retrieval (RAG)": rag}


def selfcheck_filter(bios: list[str], det: dict, world: FactWorld, base: FactBase,
                     threshold: float = 0.5) -> list[str]:
    """Greedy biographies with the facts whose SelfCheck score exceeds ``threshold`` removed."""
    people = world.known + world.retrievable + world.unknown
    score = {(p, r): det["scores"][k * len(people) + i]
             for k, r in enumerate(RELATIONS) for i, p in enumerate(people)}
    out = []
    for p, text in zip(people, bios):
        kept = [f for f in decompose(text, base.templates)
                if score.get((p, f.relation), 1.0) <= threshold]
        out.append(" ".join(base.sentence(f) for f in kept))
    return out


def run(cfg: Config, out: Path) -> Report:
    """Train the fact LM, detect its hallucinations, score and mitigate them."""
    rep = Report()
    world = make_fact_world(cfg.n_known, cfg.n_retrievable, cfg.n_unknown, cfg.zipf, cfg.seed)
    base = fact_base(world)
    model = train_model(world, cfg)
    det = detect(model, world, base, cfg)
    n_pos = sum(det["labels"])
    if 0 < n_pos < len(det["labels"]):
        rep.claim("SelfCheck detection AUROC (10 samples vs fact-base labels)",
                  auroc(det["scores"], det["labels"]), cfg.min_auroc, ">=",
                  detail=f"{len(det['labels'])} answers, {n_pos} hallucinated",
                  target_source="min_auroc")
    else:
        rep.not_measured("SelfCheck detection AUROC (10 samples vs fact-base labels)",
                         cfg.min_auroc, ">=", reason=f"one class only ({n_pos} hallucinated "
                         f"of {len(det['labels'])})", target_source="min_auroc")
    bios = biographies(model, world, base, cfg)
    bios["SelfCheck filter"] = selfcheck_filter(bios["greedy"], det, world, base)
    scores = {name: fact_precision(texts, base) for name, texts in bios.items()}
    g = scores["greedy"].precision
    for name, target, field_ in (("retrieval (RAG)", cfg.min_rag_gain, "min_rag_gain"),
                                 ("DoLa", cfg.min_dola_gain, "min_dola_gain")):
        s = scores[name]
        rep.claim(f"FActScore precision gain, {name} − greedy", s.precision - g, target, ">=",
                  detail=f"{s.precision:.3f} vs {g:.3f}; answer rate {s.answer_rate:.2f} vs "
                         f"{scores['greedy'].answer_rate:.2f}", target_source=field_)
    answered = [g for g, r in zip(bios["greedy"], bios["retrieval (RAG)"]) if r]
    if answered:  # greedy on the same people: RAG's gain without its abstentions
        rep.metric("FActScore precision, greedy, on the people RAG answers",
                   fact_precision(answered, base).precision)
    for name, s in scores.items():
        rep.metric(f"FActScore precision, {name}", s.precision)
        rep.metric(f"answer rate, {name}", s.answer_rate)
        rep.metric(f"atomic facts stated, {name}", s.facts)
    people = world.known + world.retrievable + world.unknown
    for group in ("known", "retrievable", "unknown"):
        rows = [i for i, p in enumerate(people) if _group(world, p) == group]
        sub = fact_precision([bios["greedy"][i] for i in rows], base)
        rep.metric(f"FActScore precision, greedy, {group} people", sub.precision)
        lab = [lb for lb, gr in zip(det["labels"], det["groups"]) if gr == group]
        rep.metric(f"hallucinated answers, {group} people", sum(lab) / len(lab))
    for relation, acc in reading_accuracy(model, world, 300, cfg.seed).items():
        rep.metric(f"reads the context: {relation} value copied (held-out exercises)", acc)
    rep.metric("fact-base contradictions", len(base.contradictions))
    with figure(out / "hallucination", ncols=2) as (_, axes):
        pos = [s for s, lb in zip(det["scores"], det["labels"]) if lb]
        neg = [s for s, lb in zip(det["scores"], det["labels"]) if not lb]
        bins = [i / cfg.samples - 0.5 / cfg.samples for i in range(cfg.samples + 2)]
        axes[0, 0].hist([neg, pos], bins=bins, label=["supported", "hallucinated"])
        axes[0, 0].set_xlabel("SelfCheck score 1 − agreement")
        axes[0, 0].legend(fontsize=7)
        names = list(scores)
        axes[0, 1].bar(range(len(names)), [scores[n].precision for n in names], 0.4,
                       label="FActScore precision")
        axes[0, 1].bar([i + 0.4 for i in range(len(names))],
                       [scores[n].answer_rate for n in names], 0.4, label="answer rate")
        axes[0, 1].set_xticks([i + 0.2 for i in range(len(names))], names, fontsize=6)
        axes[0, 1].legend(fontsize=7)
    rep.figure(out / "hallucination.png")
    rep.note(NOTES)
    rep.note(f"example (unknown person), greedy: {bios['greedy'][-1]!r}; RAG: "
             f"{bios['retrieval (RAG)'][-1]!r} (abstains: not in the fact base)")
    return rep
