"""Hallucination detection: sampling consistency (SelfCheck) and atomic-fact precision (FActScore).

A language model *hallucinates* when it states facts its training data or context does not
support. Two black-box detectors:

* **SelfCheck** (Manakul, Liusie, Gales 2023, "SelfCheckGPT", arXiv:2303.08896): sample the
  answer ``N`` times; a fact the model knows is reproduced consistently, an invented one
  varies. The hallucination score of an answer is ``1 − agreement`` with the samples (the
  paper's n-gram / QA variants reduce, for one-word answers, to exact agreement).
* **FActScore** (Min et al. 2023, "FActScore", arXiv:2305.14251): split a generation into
  atomic facts and check each against a knowledge source found by retrieval; the score is
  the fraction supported. Here facts come from templated sentences, so the decomposition is
  pattern matching, and the knowledge source is a :class:`FactBase`.

Detectors are judged by the AUROC of their scores against ground-truth labels
(:func:`auroc`, the Mann–Whitney statistic). Mitigation by retrieval-augmented generation uses
:meth:`FactBase.retrieve`; contrastive decoding (DoLa) is :mod:`mlatlas.llm.dola`.

================  ===============================================================
``a``             the answer to check;  ``s_1 … s_N`` sampled answers
``agree(a)``      ``1/N Σ_n [s_n = a]``;  hallucination score ``1 − agree(a)``
``F(y)``          atomic facts of a generation ``y``;  ``precision = |supported| / |F(y)|``
================  ===============================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Fact", "FactBase", "FactScore", "auroc", "decompose", "fact_precision",
           "selfcheck_score"]


@dataclass(frozen=True)
class Fact:
    """One atomic fact ``(entity, relation, value)``."""

    entity: str
    relation: str
    value: str


@dataclass
class FactBase:
    """A knowledge source of atomic facts, with the contradictions it holds.

    Build it with :meth:`from_facts`. A contradictory base — one ``(entity, relation)`` with
    two different values — is accepted: the pair is listed in :attr:`contradictions` and
    *neither* value counts as supported (documented behaviour, not an error).

    Attributes:
        facts: ``(entity, relation)`` → value, for the uncontested pairs.
        contradictions: ``(entity, relation)`` → the conflicting values (sorted).
        templates: relation → the words between entity and value (``"lives in"``).
    """

    facts: dict[tuple[str, str], str]
    contradictions: dict[tuple[str, str], tuple[str, ...]]
    templates: dict[str, str]
    _entities: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def from_facts(cls, facts: Iterable[Fact], templates: Mapping[str, str]) -> FactBase:
        """Collect facts; duplicates are merged, conflicting values reported.

        Raises:
            TypeError: an item that is not a :class:`Fact`.
            ValueError: a relation without a template.
        """
        values: dict[tuple[str, str], set[str]] = {}
        for f in facts:
            if not isinstance(f, Fact):
                raise TypeError(f"facts must hold Fact items, got {type(f).__name__}")
            if f.relation not in templates:
                raise ValueError(f"fact relation {f.relation!r} has no template; templates "
                                 f"cover {sorted(templates)}")
            values.setdefault((f.entity, f.relation), set()).add(f.value)
        agreed = {k: next(iter(v)) for k, v in values.items() if len(v) == 1}
        clashes = {k: tuple(sorted(v)) for k, v in values.items() if len(v) > 1}
        return cls(agreed, clashes, dict(templates), {e for e, _ in values})

    def __contains__(self, entity: str) -> bool:
        return entity in self._entities

    def supports(self, fact: Fact) -> bool:
        """True when the base states ``fact`` (and does not contradict itself on it)."""
        return self.facts.get((fact.entity, fact.relation)) == fact.value

    def retrieve(self, query: str) -> list[Fact]:
        """The facts about the longest entity name that ``query`` mentions (word-aligned).

        Returns ``[]`` when no known entity is mentioned (the caller then abstains). Contested
        pairs are left out.
        """
        padded = f" {query} "
        mentioned = [e for e in self._entities if f" {e} " in padded]
        if not mentioned:
            return []
        entity = max(mentioned, key=len)
        return [Fact(entity, r, v) for (e, r), v in sorted(self.facts.items()) if e == entity]

    def sentence(self, fact: Fact) -> str:
        """``fact`` in its template: ``"<entity> <phrase> <value> ."``."""
        return f"{fact.entity} {self.templates[fact.relation]} {fact.value} ."


def decompose(text: str, templates: Mapping[str, str]) -> list[Fact]:
    """Atomic facts of a generation: every ``"<entity> <phrase> <value> ."`` sentence.

    Sentences that match no template are not facts and are skipped (a generation with no
    sentence matching any template states nothing: it abstained).

    Args:
        text: Generated words, sentences ended by ``"."``.
        templates: relation → phrase.
    """
    facts = []
    for sent in text.split("."):
        words = sent.split()
        for relation, phrase in templates.items():
            m = re.fullmatch(rf"(?P<e>.+?) {re.escape(phrase)} (?P<v>\S+)", " ".join(words))
            if m:
                facts.append(Fact(m["e"], relation, m["v"]))
                break
    return facts


@dataclass(frozen=True)
class FactScore:
    """FActScore-style precision of a set of generations.

    Attributes:
        precision: Mean over answered generations of ``|supported| / |facts|``.
        answer_rate: Fraction of generations that stated at least one fact.
        facts: Atomic facts stated in total.
        supported: Of which supported by the base.
    """

    precision: float
    answer_rate: float
    facts: int
    supported: int


def fact_precision(generations: Sequence[str], base: FactBase) -> FactScore:
    """Decompose every generation and check each atomic fact against ``base``.

    Raises:
        ValueError: no generations.
    """
    if not generations:
        raise ValueError("generations must not be empty")
    per, n_facts, n_sup = [], 0, 0
    for text in generations:
        facts = decompose(text, base.templates)
        if facts:
            sup = sum(base.supports(f) for f in facts)
            per.append(sup / len(facts))  # FActScore of one response
            n_facts, n_sup = n_facts + len(facts), n_sup + sup
    precision = sum(per) / len(per) if per else float("nan")
    return FactScore(precision, len(per) / len(generations), n_facts, n_sup)


def selfcheck_score(answer: Tensor, samples: Tensor) -> Tensor:
    """SelfCheck hallucination score ``1 − 1/N Σ_n [s_n = a]`` of one-token answers.

    Args:
        answer: int64 ``[Q]`` the answers to check (e.g. greedy).
        samples: int64 ``[Q, N]`` answers sampled for the same prompts.

    Returns:
        float32 ``[Q]`` in ``[0, 1]``: 0 = every sample agrees, 1 = none does.
    """
    if samples.dim() != 2 or answer.shape != samples.shape[:1] or samples.shape[1] == 0:
        raise ValueError(f"samples must be [Q, N >= 1] with answer [Q], got "
                         f"{tuple(samples.shape)} and {tuple(answer.shape)}")
    return 1.0 - (samples == answer[:, None]).float().mean(-1)


def auroc(scores: Sequence[float] | Tensor, labels: Sequence[int] | Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    The Mann–Whitney form: ``P(score of a positive > score of a negative)``, ties counting ½
    (average ranks), equal to scikit-learn's ``roc_auc_score``.

    Raises:
        ValueError: shapes that differ, labels other than 0/1, or a single class.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.numel()} and "
                         f"{y.numel()}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels must hold both classes, got {n_pos} positives and {n_neg} "
                         f"negatives")
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    for v in s.unique():  # ties share their average rank
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    # U = Σ ranks of positives − n₊(n₊+1)/2;  AUROC = U / (n₊ n₋)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
