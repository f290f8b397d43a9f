"""A synthetic instruction-following task with exact-match answers, generated and seeded.

Every example is an instruction over a short list of distinct digits and its one correct
answer, e.g. ``"largest: 3 7 1 9 5 ->"`` → ``"9"``. The instruction word decides which digit
is meant (the first, the last, the largest, the smallest), so a model must read the
instruction, not just the list; none of this format occurs in the embedded corpus, so a
model pretrained on it has to be fine-tuned to follow it. Scored by exact match of the
generated answer (the standard metric of instruction benchmarks with closed answers).

=============  ===============================================================
``op``         the instruction: ``first``, ``last``, ``largest``, ``smallest``
``k``          list length (distinct digits, uniformly drawn and shuffled)
prompt         ``"{op}: d₁ d₂ … d_k ->"``;  answer ``"d"`` (one digit)
=============  ===============================================================
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OPERATIONS", "Instruction", "InstructionBatch", "encode_instructions",
           "instruction_split"]

#: Instruction word → the answer it asks for.
OPERATIONS: dict[str, Callable[[Sequence[int]], int]] = {
    "first": lambda xs: xs[0],
    "last": lambda xs: xs[-1],
    "largest": max,
    "smallest": min,
}


@dataclass(frozen=True)
class Instruction:
    """One example.

    Attributes:
        prompt: ``"{op}: d₁ … d_k ->"``.
        answer: The correct answer (no leading space).
        operation: ``op``.
    """

    prompt: str
    answer: str
    operation: str


def _example(rng: random.Random, length: int, operations: Sequence[str]) -> Instruction:
    op = operations[rng.randrange(len(operations))]
    digits = rng.sample(range(10), length)
    return Instruction(f"{op}: {' '.join(map(str, digits))} ->", str(OPERATIONS[op](digits)), op)


def instruction_split(n_train: int, n_eval: int, seed: int = 0, length: int = 5,
                      operations: Sequence[str] = tuple(OPERATIONS)
                      ) -> dict[str, list[Instruction]]:
    """Seeded train and eval examples; no eval prompt occurs in the train split.

    Args:
        n_train: Training examples.
        n_eval: Evaluation examples (drawn first, from their own stream).
        seed: Seeds both streams.
        length: ``k``, digits per list (2 … 10).
        operations: Which instructions occur (keys of :data:`OPERATIONS`).

    Returns:
        ``{"train": [...], "eval": [...]}``.

    Raises:
        ValueError: a count < 0, ``length`` outside [2, 10], or an unknown operation.
    """
    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= 10:
        raise ValueError(f"length must be an int in [2, 10] (distinct digits), got {length!r}")
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"operations must be a non-empty subset of {list(OPERATIONS)}, got "
                         f"{list(operations)}")
    ops = list(operations)
    held = random.Random(f"instructions-eval-{seed}")
    evals = [_example(held, length, ops) for _ in range(n_eval)]
    seen = {e.prompt for e in evals}
    rng = random.Random(f"instructions-train-{seed}")
    train: list[Instruction] = []
    while len(train) < n_train:
        ex = _example(rng, length, ops)
        if ex.prompt not in seen:
            train.append(ex)
    return {"train": train, "eval": evals}


@dataclass
class InstructionBatch:
    """Examples tokenised for supervised fine-tuning.

    Attributes:
        input_ids: int64 ``[N, T]``: prompt, ``" " + answer``, end-of-text, right-padded with
            end-of-text.
        labels: int64 ``[N, T]``: ``input_ids`` on the answer and its end-of-text, ``-100``
            elsewhere (the loss is on the answer only).
    """

    input_ids: Tensor
    labels: Tensor


def encode_instructions(examples: Sequence[Instruction], tokenizer) -> InstructionBatch:
    """Tokenise ``examples`` with a corpus tokenizer (``encode``, ``eot_id``).

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("examples must be non-empty, got 0")
    rows, targets = [], []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt)
        answer = tokenizer.encode(" " + ex.answer) + [tokenizer.eot_id]
        rows.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.eot_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(target)] = torch.tensor(target)
    return InstructionBatch(ids, labels)
