"""The addition problems and their exact-match verifier."""

from __future__ import annotations

import pytest

from mlatlas.datasets.arithmetic import addition_problems, exact_match, extract_answer


def test_problems():
    every = addition_problems(9)
    assert len(every) == 100 and every[0].prompt == "0+0=" and every[-1].answer == "18"
    single = addition_problems(9, max_sum=9)
    assert len(single) == 55 and all(len(p.answer) == 1 for p in single)
    assert all(int(p.answer) == eval(p.prompt[:-1]) for p in single)


@pytest.mark.parametrize("completion,answer,reward", [
    ("7", "7", 1.0), ("7\n", "7", 1.0), ("7 is it", "7", 1.0), ("7.", "7", 1.0),
    ("71", "7", 0.0), (" 7", "7", 0.0), ("seven", "7", 0.0), ("", "7", 0.0), ("12+", "12", 1.0),
])
def test_exact_match(completion, answer, reward):
    assert exact_match(completion, answer) == reward


def test_extract_and_bad_input():
    assert extract_answer("42abc") == "42" and extract_answer("x42") is None
    with pytest.raises(ValueError, match="max_operand must be an int >= 0, got -1"):
        addition_problems(-1)
    with pytest.raises(ValueError, match="max_sum must be an int >= 0 or None"):
        addition_problems(3, max_sum=-2)
