"""Model-backed: the lenient grader's judge, the embedded default model, agrees with the alias match on
answers whose verdict is not in doubt (the gold named plainly, or another answer of the same kind)."""

import pytest

from truthmap.grading import alias_match
from truthmap.stages.label import judge_answers

pytestmark = pytest.mark.model

CLEAR = [  # (question, gold, answer)
    ("What is the capital of France?", ["Paris"], "The capital of France is Paris."),
    ("What is the capital of France?", ["Paris"], "The capital of France is Berlin."),
    ("Which planet is known as the Red Planet?", ["Mars"], "Mars is known as the Red Planet."),
    ("Which planet is known as the Red Planet?", ["Mars"], "Venus is known as the Red Planet."),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Shakespeare"], "Romeo and Juliet was written by William Shakespeare."),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Shakespeare"], "Romeo and Juliet was written by Charles Dickens."),
]


def test_the_judge_agrees_with_the_alias_match_on_clear_cases(default_model):
    questions, golds, answers = zip(*CLEAR)
    odds, tokens = judge_answers(default_model, list(questions), list(golds), list(answers), batch_size=4)
    alias = [alias_match(a, g)[0] for _, g, a in CLEAR]
    assert alias == [True, False] * 3
    assert [bool(v > 0) for v in odds] == alias, odds
    assert tokens > 6 * 40  # the judge read every prompt: question, gold and answer
