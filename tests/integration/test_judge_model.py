"""Model-backed: the lenient grader's judge, the embedded default model, on answers whose verdict is not in
doubt (the gold named plainly, or another answer of the same kind)."""

import pytest

from truthmap.grading import alias_match
from truthmap.stages.label import judge_answers

pytestmark = pytest.mark.model

PAIRS = [  # (question, gold, right answer, wrong answer)
    ("What is the capital of France?", ["Paris"], "The capital of France is Paris.", "The capital of France is Berlin."),
    ("Which planet is known as the Red Planet?", ["Mars"], "Mars is known as the Red Planet.",
     "Venus is known as the Red Planet."),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Shakespeare"],
     "Romeo and Juliet was written by William Shakespeare.", "Romeo and Juliet was written by Charles Dickens."),
]


def test_the_judge_leans_further_to_yes_for_the_right_answer_of_each_clear_pair(default_model):
    """At 135M parameters the judge's verdicts at 0 are not usable (it says yes to all six: README,
    "Is the map the grader's?"), but it does read the answer against the gold: for each question its
    log-odds of yes are higher for the right answer than for the wrong one (yes and no swapped, or the
    answer not read, fail this)."""
    questions = [q for q, *_ in PAIRS for _ in range(2)]
    golds = [g for _, g, *_ in PAIRS for _ in range(2)]
    answers = [a for *_, right, wrong in PAIRS for a in (right, wrong)]
    assert [alias_match(a, g)[0] for a, g in zip(answers, golds)] == [True, False] * 3
    odds, tokens = judge_answers(default_model, questions, golds, answers, batch_size=4)
    assert all(odds[2 * k] > odds[2 * k + 1] for k in range(3)), odds
    assert tokens > 6 * 50  # every prompt was read: the question, the gold and the answer
