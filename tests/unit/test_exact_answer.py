"""The exact answer is located without the gold answer (grading.locate_exact_answer); --exact-answer gold
keeps the reference study's choice, a right answer at its matched alias."""

import numpy as np
import pandas as pd
import pytest

from truthmap.grading import grade, locate_exact_answer
from truthmap.stages.label import exact_answer_summary, label_answers
from truthmap.textmatch import Vocabulary

CONTINENTS = ["Europe", "Asia", "Africa", "North America", "South America", "Oceania"]
VOCAB = {"continent": Vocabulary(CONTINENTS)}
MEXICO = "Mexico is located in South America, specifically in the continent of North America."


def test_a_right_answer_is_located_as_a_wrong_one_would_be():
    question = "On which continent is Mexico located?"
    correct, located, gold_span = grade("alias", MEXICO, question, ["North America"], [], "continent", VOCAB)
    assert correct  # the alias occurs ...
    assert located == ("South America", 21, 34, "vocabulary")  # ... but the answer first states South America
    assert MEXICO[gold_span[0] : gold_span[1]] == "North America"  # where the gold would have put it
    # the locator sees no gold: the same span whatever the gold answer is
    for gold in (["North America"], ["South America"], ["Asia"]):
        assert grade("alias", MEXICO, question, gold, [], "continent", VOCAB)[1] == located
    assert locate_exact_answer(MEXICO, question, "continent", VOCAB) == located


def test_a_choice_is_located_without_knowing_which_option_is_gold():
    answer = "The teacher is referring to the mover, not the baker."
    question = "The mover helped the baker because she was kind. Who is 'she'?"
    one = grade("choice", answer, question, ["the mover"], ["the baker"], "", {})
    other = grade("choice", answer, question, ["the baker"], ["the mover"], "", {})
    assert one[1] == other[1] and one[1][0] == "mover" and (one[0], other[0]) == (True, False)


@pytest.fixture
def answers_of(tokenizer):
    """label_answers over (question, answer, gold) rows of the continent type, in a given mode."""
    def label(rows, mode):
        questions = pd.DataFrame({"id": [f"q{i}" for i in range(len(rows))], "question": [q for q, _, _ in rows],
                                  "gold": [g for _, _, g in rows], "family": "continent", "subgroup": "",
                                  "answer_type": "continent"})
        prompt_ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q, _, _ in rows]
        generations = pd.DataFrame({"id": questions.id, "prompt": questions.question, "prompt_ids": prompt_ids,
                                    "answer_ids": [tokenizer(a, add_special_tokens=False)["input_ids"] for _, a, _ in rows],
                                    "answer": [a for _, a, _ in rows], "stopped": True})
        return label_answers(questions, generations, {"continent": CONTINENTS}, tokenizer,
                             ["exact_answer_before_first", "exact_answer_last", "-1"], progress=False,
                             exact_answer=mode), generations
    return label


def test_both_modes_record_the_label_blind_route_and_where_the_gold_span_differs(answers_of):
    rows = [("On which continent is Mexico located?", MEXICO, ["North America"]),
            ("On which continent is Peru located?", "Peru is in South America.", ["South America"]),
            ("On which continent is Chad located?", "Chad is in Asia.", ["Africa"])]
    blind, _ = answers_of(rows, "blind")
    gold, _ = answers_of(rows, "gold")
    assert blind.exact_answer.tolist() == ["South America", "South America", "Asia"]
    assert gold.exact_answer.tolist() == ["North America", "South America", "Asia"]
    assert gold.exact_answer_reason.tolist() == ["gold_alias", "gold_alias", "vocabulary"]
    for table in (blind, gold):
        assert table.exact_answer_route.tolist() == ["vocabulary"] * 3
        assert table.gold_span_differs.tolist() == [True, False, None]
        assert table.exact_answer_gold.tolist() == ["North America", "South America", ""]  # both spans recorded
    assert exact_answer_summary(blind, "blind") == {"mode": "blind", "right_answers": 2, "span_differs_from_gold": 1,
                                                    "right_answers_without_blind_span": 0}


def _cell_aucs(lm, table, generations, positions, train):
    """Test AUC (error = positive) of a logistic probe per (layer, position) on a tiny model's states."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score


    sequences = [list(p) + list(a) for p, a in zip(generations.prompt_ids, generations.answer_ids)]
    index = table[[f"pos_{p}" for p in positions]].to_numpy(dtype=np.int64)
    assert (index >= 0).all()
    states = lm.hidden_states(sequences, index, ["residual"])["residual"]  # [R, N, P, d]
    error = ~table.correct.to_numpy(dtype=bool)
    aucs = {}
    for layer in range(states.shape[0]):
        for k, position in enumerate(positions):
            X = states[layer, :, k]
            probe = LogisticRegression(max_iter=2000).fit(X[train], error[train])
            aucs[layer, position] = roc_auc_score(error[~train], probe.predict_proba(X[~train])[:, 1])
    return aucs


def test_a_gold_located_span_can_carry_a_signal_the_label_blind_span_does_not(answers_of, tokenizer):
    """Every answer is "It is in A, or maybe B.": right when B is the gold continent. A, the span a
    locator without the gold finds, never depends on the answer being right, and a causal model's state
    at A cannot see B; the gold-located span of a right answer sits at B. So the gold-located map shows
    the exact-answer columns far above the last token, and the label-blind map does not."""
    from _synthetic import tiny_model

    rng = np.random.default_rng(0)
    rows, right = [], rng.random(240) < 0.5  # drawn apart from the question (its text reaches every state)
    for i in range(240):
        gold = CONTINENTS[i % len(CONTINENTS)]
        others = [c for c in CONTINENTS if c != gold]
        first = others[rng.integers(len(others))]
        second = gold if right[i] else others[rng.integers(len(others))]
        rows.append((f"On which continent is land {i} located?", f"It is in {first}, or maybe {second}.", [gold]))
    positions = ["exact_answer_before_first", "exact_answer_last", "-1"]
    blind, generations = answers_of(rows, "blind")
    gold, _ = answers_of(rows, "gold")
    assert blind.correct.tolist() == right.tolist() == gold.correct.tolist()
    assert blind.gold_span_differs.sum() == right.sum()  # every right answer: the blind span is A, the gold span B
    # a small vocabulary for the tiny model: the token ids that occur, renumbered
    vocabulary = {t: k + 1 for k, t in enumerate(sorted({t for ids in generations.prompt_ids for t in ids}
                                                        | {t for ids in generations.answer_ids for t in ids}))}
    generations = generations.assign(prompt_ids=[[vocabulary[t] for t in ids] for ids in generations.prompt_ids],
                                     answer_ids=[[vocabulary[t] for t in ids] for ids in generations.answer_ids])
    lm = tiny_model(layers=2, vocab=len(vocabulary) + 1)
    train = np.arange(240) < 140

    def advantage(table):
        aucs = _cell_aucs(lm, table, generations, positions, train)
        exact = max(v for (_, p), v in aucs.items() if p.startswith("exact"))
        last = max(v for (_, p), v in aucs.items() if p == "-1")
        return exact, last

    gold_exact, gold_last = advantage(gold)
    blind_exact, blind_last = advantage(blind)
    assert gold_last == blind_last  # the same answers and states at the last token
    assert gold_exact > 0.95 and gold_exact - gold_last > 0.25
    assert blind_exact < 0.7 and blind_exact - blind_last < 0.15


def test_the_setting_is_checked_and_part_of_the_label_stage():
    from truthmap.config import Config
    from truthmap.errors import TruthmapError
    from truthmap.pipeline import STAGE_TABLE

    assert Config().exact_answer == "blind"
    with pytest.raises(TruthmapError, match="exact_answer: 'alias' is not a choice; use one of blind, gold"):
        Config(exact_answer="alias")
    settings = STAGE_TABLE["label"].settings
    assert settings(Config(exact_answer="gold"))["exact_answer"] == "gold" != settings(Config())["exact_answer"]


@pytest.mark.parametrize("answer,right,span", [
    ("The answer is the result of the division by 9.", False, None),  # the question's 9, as an operand
    ("81 divided by 9", False, None),
    ("9.", True, "9"),
    ("81 / 9 = 9.", True, "9"),
    ("81 divided by 9 is 9.", True, "9"),
    ("81 divided by 9 is 8.", False, "8"),
])
def test_a_number_of_the_question_does_not_make_an_answer_right_by_itself(answer, right, span):
    correct, (text, start, end, _), gold_span = grade("alias", answer, "What is 81 divided by 9?", ["9"], [],
                                                       "number", {})
    assert (correct, text) == (right, span)
    if right:  # the gold span is the stated result, not the operand before it
        assert (start, end) == gold_span == (len(answer) - 2, len(answer) - 1)
