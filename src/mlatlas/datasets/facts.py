"""A synthetic fact base: invented people, three attributes each, stated in templated sentences.

Each entity is an invented two-syllable name (``"karan"``, one token) with one value per
relation — where it lives, what it works as, what it likes — drawn from a Zipf-like
distribution, so a few values are common (a prior a language model can fall back on) and most
are rare. The
entities are split three ways: *known* ones, whose biographies a language model is trained
on; *retrievable* ones, which are in the fact base but never shown to the model (only
retrieval can answer for them); and *unknown* ones, in neither (the right answer is to
abstain). Every sentence follows one template per relation, so generated text decomposes
into atomic facts by pattern matching.

==============  ====================================================================
``relation``    ``lives_in`` ("X lives in V ."), ``works_as`` ("X works as V ."),
                ``likes`` ("X likes V .")
``bio``         the three sentences of an entity, in random order
``rag doc``     ``context : <facts> answer : <bio>`` about any name with random values —
                teaches reading facts from context, leaks no fact of the base
==============  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FIRST", "RELATIONS", "SECOND", "FactTokenizer", "FactWorld", "make_fact_world",
           "names", "sentence"]

FIRST: tuple[str, ...] = ("ka", "lo", "mi", "su", "te", "bo", "ri", "na", "gu", "ze", "pa", "vi")
SECOND: tuple[str, ...] = ("ran", "tek", "vol", "mis", "dor", "lin", "gar", "pez", "sul", "kon",
                           "wex", "bia")
#: relation → (template words between entity and value, the values, most common first)
RELATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lives_in": ("lives in", ("paris", "rome", "oslo", "lima", "cairo", "quito", "perth",
                              "hanoi")),
    "works_as": ("works as", ("baker", "pilot", "nurse", "judge", "miner", "tailor", "poet",
                              "farmer")),
    "likes": ("likes", ("tea", "rice", "figs", "jazz", "chess", "kites", "maps", "owls")),
}
SPECIALS: tuple[str, ...] = ("<eos>", "<pad>", "context", "answer", ":", ".", "unknown")


class FactTokenizer:
    """Word-level tokenizer over the fact world's closed vocabulary.

    Attributes:
        vocab: Every word, ids in order.
        eos_id: Id of ``<eos>`` (documents are separated by it).
    """

    def __init__(self) -> None:
        words = list(SPECIALS) + names()
        for phrase, values in RELATIONS.values():
            words += [w for w in phrase.split() if w not in words] + list(values)
        self.vocab: tuple[str, ...] = tuple(words)
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.eos_id = self._ids["<eos>"]

    @property
    def vocab_size(self) -> int:
        """Number of words."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Space-separated words → ids.

        Raises:
            ValueError: a word outside the vocabulary (named).
        """
        out = []
        for w in text.split():
            if w not in self._ids:
                raise ValueError(f"text has a word outside the vocabulary: {w!r}")
            out.append(self._ids[w])
        return out

    def decode(self, ids: list[int]) -> str:
        """Ids → space-separated words."""
        return " ".join(self.vocab[i] for i in ids)


def names() -> list[str]:
    """Every entity name: ``first + second`` syllable (``len(FIRST) · len(SECOND)`` of them)."""
    return [a + b for a in FIRST for b in SECOND]


def sentence(entity: str, relation: str, value: str) -> str:
    """The template of ``relation``: ``"<entity> <phrase> <value> ."``."""
    return f"{entity} {RELATIONS[relation][0]} {value} ."


@dataclass
class FactWorld:
    """Entities, their attributes and the split between known, retrievable and unknown.

    Attributes:
        facts: Entity → relation → value, for the known and the retrievable entities (the
            fact base; unknown entities have no entry).
        known: Entities whose biographies the model is trained on.
        retrievable: Entities only in the fact base.
        unknown: Entities in neither.
        tokenizer: The :class:`FactTokenizer`.
    """

    facts: dict[str, dict[str, str]]
    known: list[str]
    retrievable: list[str]
    unknown: list[str]
    tokenizer: FactTokenizer = field(default_factory=FactTokenizer)

    def bio(self, entity: str, rng: np.random.Generator) -> str:
        """The entity's three sentences in random order."""
        rels = list(self.facts[entity])
        return " ".join(sentence(entity, r, self.facts[entity][r])
                        for r in rng.permutation(rels))

    def reading_exercise(self, rng: np.random.Generator) -> str:
        """``context : <facts> answer : <bio>`` about a random name with random (uniform) values,
        the context and the answer each in their own random order."""
        name = str(rng.choice(names()))
        vals = {r: str(rng.choice(v)) for r, (_, v) in RELATIONS.items()}
        ctx = " ".join(sentence(name, r, vals[r]) for r in rng.permutation(list(vals)))
        ans = " ".join(sentence(name, r, vals[r]) for r in rng.permutation(list(vals)))
        return f"context : {ctx} answer : {ans}"

    def training_stream(self, repeats: int, rag_docs: int, seed: int) -> list[int]:
        """Token ids of ``<eos>``-separated documents in random order.

        ``repeats`` shuffled biographies of every known entity, and ``rag_docs`` reading
        exercises ``context : <facts> answer : <bio>`` about random names with random (uniform)
        values, so that copying from context is the only way to predict their answers.
        """
        rng = np.random.default_rng(seed)
        docs = [self.bio(e, rng) for e in self.known for _ in range(repeats)]
        docs += [self.reading_exercise(rng) for _ in range(rag_docs)]
        ids: list[int] = []
        for i in rng.permutation(len(docs)):
            ids += [self.tokenizer.eos_id] + self.tokenizer.encode(docs[i])
        return ids


def make_fact_world(n_known: int = 60, n_retrievable: int = 24, n_unknown: int = 24,
                    zipf: float = 1.0, seed: int = 0) -> FactWorld:
    """Draw entities and their attributes, deterministically from ``seed``.

    Args:
        n_known: Entities the model is trained on.
        n_retrievable: Entities only in the fact base.
        n_unknown: Entities in neither.
        zipf: Value ``r`` (0-based rank) is drawn with probability ∝ ``(r + 1)^−zipf``.
        seed: The seed.

    Raises:
        ValueError: negative counts, or more entities than names (``len(FIRST)·len(SECOND)``).
    """
    total = n_known + n_retrievable + n_unknown
    if min(n_known, n_retrievable, n_unknown) < 0 or total > len(FIRST) * len(SECOND):
        raise ValueError(f"entity counts must be >= 0 and sum to <= {len(FIRST) * len(SECOND)}, "
                         f"got {n_known}, {n_retrievable}, {n_unknown}")
    rng = np.random.default_rng(seed)
    every = names()
    chosen = [every[i] for i in rng.permutation(len(every))[:total]]
    facts = {}
    for e in chosen[:n_known + n_retrievable]:
        facts[e] = {}
        for r, (_, values) in RELATIONS.items():
            p = (np.arange(len(values)) + 1.0) ** -zipf
            facts[e][r] = str(values[rng.choice(len(values), p=p / p.sum())])
    return FactWorld(facts, chosen[:n_known], chosen[n_known:n_known + n_retrievable],
                     chosen[n_known + n_retrievable:])
