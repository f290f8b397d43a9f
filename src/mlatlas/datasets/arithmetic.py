"""Small arithmetic problems with a verifier: the verifiable-reward task of RL fine-tuning.

Reinforcement learning with verifiable rewards (GSM8K/MATH in DeepSeekMath, Shao et al. 2024,
arXiv:2402.03300; "RLVR" in Lambert et al. 2024, arXiv:2411.15124) needs prompts whose answer
a program can check: the reward is 1 when the answer extracted from the completion equals the
reference answer exactly, else 0. Here the prompts are additions ``"a+b="`` with operands in
``[0, max_operand]``, every pair (or only those whose sum stays below a bound), in a fixed
order; the answer is the integer written at the very start of the completion (its leading run
of digits), so ``"7\\n"`` and ``"7 is"`` answer 7, while ``" 7"``, ``"71"`` and ``"seven"``
do not.

=============  ====================================================
``a, b``       operands;  the reference answer is ``a + b``
``extract``    leading digits of the completion text (or nothing)
``reward``     ``1[extract(completion) == str(a + b)]``
=============  ====================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Problem", "addition_problems", "exact_match", "extract_answer"]

_LEADING_INT = re.compile(r"\d+")


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` (text) and its reference ``answer`` (text)."""

    prompt: str
    answer: str


def addition_problems(max_operand: int = 9, max_sum: int | None = None) -> list[Problem]:
    """Every ``"a+b="`` with ``0 ≤ a, b ≤ max_operand`` (and ``a + b ≤ max_sum`` if given).

    Raises:
        ValueError: ``max_operand < 0`` or a ``max_sum`` that leaves no problem.
    """
    if not isinstance(max_operand, int) or max_operand < 0:
        raise ValueError(f"max_operand must be an int >= 0, got {max_operand!r}")
    if max_sum is not None and (not isinstance(max_sum, int) or max_sum < 0):
        raise ValueError(f"max_sum must be an int >= 0 or None, got {max_sum!r}")
    out = [Problem(f"{a}+{b}=", str(a + b)) for a in range(max_operand + 1)
           for b in range(max_operand + 1) if max_sum is None or a + b <= max_sum]
    return out


def extract_answer(completion: str) -> str | None:
    """The integer at the very start of ``completion`` (``None`` if it does not start with a
    digit)."""
    m = _LEADING_INT.match(completion)
    return None if m is None else m.group(0)


def exact_match(completion: str, answer: str) -> float:
    """The verifier: ``1.0`` when the completion's leading integer is ``answer``, else ``0.0``."""
    return float(extract_answer(completion) == answer)
