import numpy as np
import pandas as pd
import pytest

from truthmap import textmatch
from truthmap.splits import make_splits, population, split_groups


def _answers(n=300, questions=None, task="generic"):
    return pd.DataFrame({"id": [str(i) for i in range(n)], "correct": [i % 4 == 0 for i in range(n)],
                         "question": questions or [f"question number {i}?" for i in range(n)], "task": task})


def _part_of(split):
    return {i: part for part, members in split.items() for i in members}


def test_splits_stratified_deterministic_disjoint_in_three_parts():
    answers = _answers()
    splits = make_splits(answers, [0, 1], 0.3, 0.2)
    assert splits == make_splits(answers, [0, 1], 0.3, 0.2)
    s0, s1 = splits["seeds"]["0"], splits["seeds"]["1"]
    parts = [set(s0[p]) for p in ("train", "validation", "test")]
    assert sum(map(len, parts)) == 300 and len(set.union(*parts)) == 300
    for part, fraction in (("train", 0.5), ("validation", 0.2), ("test", 0.3)):
        right = sum(int(i) % 4 == 0 for i in s0[part])
        assert abs(right - fraction * 75) <= 1 and abs(len(s0[part]) - fraction * 300) <= 2
    assert s0["validation"] != s1["validation"]  # the seeds vary train / validation …


def test_one_test_part_shared_by_every_seed_and_never_trained_or_validated_on():
    questions = [f"Which option, {i % 90}?" for i in range(300)]  # 90 groups of 3-4 answers
    answers = _answers(questions=questions)
    splits = make_splits(answers, [0, 1, 2, 7], 0.3, 0.2)
    test = set(splits["test"])
    assert 80 <= len(test) <= 100 and sum(int(i) % 4 == 0 for i in test) in range(20, 26)
    seen = set()
    for split in splits["seeds"].values():
        assert split["test"] == splits["test"]
        assert not test & (set(split["train"]) | set(split["validation"]))
        assert set(split["train"]) | set(split["validation"]) | test == set(answers["id"])
        seen |= set(split["validation"])
    assert len(seen) > len(splits["seeds"]["0"]["validation"])  # the seeds' validation parts differ
    # the test part does not move with the study's seeds
    assert make_splits(answers, [5], 0.3, 0.2)["test"] == splits["test"]
    groups = dict(zip(answers["id"], split_groups(answers)))
    in_test = {groups[i] for i in test}
    assert all((groups[i] in in_test) == (i in test) for i in answers["id"])  # groups kept whole


def test_duplicate_questions_never_straddle_two_parts():
    questions = [f"Which option, {i % 90}?" if i % 3 else f"which  OPTION {i % 90}" for i in range(300)]
    answers = _answers(questions=questions)
    splits = make_splits(answers, [0, 1, 2], 0.3, 0.2)
    key = {i: textmatch.normalize(q) for i, q in zip(answers.id, questions)}
    assert len(set(key.values())) == 90  # 300 rows, 90 questions
    for split in splits["seeds"].values():
        part_of = {}
        for i, part in _part_of(split).items():
            assert part_of.setdefault(key[i], part) == part
    assert splits["groups"] == {"n": 90, "largest": 4}


def test_facts_questions_about_one_entity_share_a_part():
    from truthmap.tasks.facts import entity

    assert entity("city-FR-lyon", "") == entity("capital-FR", "") == entity("currency-FR", "") == "country:FR"
    assert entity("symbol-Sc", "") == entity("element-Sc", "") == entity("atomic_number-Sc", "") == "element:Sc"
    assert entity("state_capital-CA", "") != entity("capital-CA", "") and entity("mul-3x4", "") == ""
    n = 40
    answers = pd.DataFrame({"id": [f"capital-C{k}" for k in range(n)] + [f"currency-C{k}" for k in range(n)]
                            + [f"city-C{k}-town" for k in range(n)], "task": "facts"})
    answers["question"] = [f"q {i}" for i in answers.id]
    answers["correct"] = [k % 3 == 0 for k in range(len(answers))]
    splits = make_splits(answers, [0, 1], 0.3, 0.2)
    for split in splits["seeds"].values():
        part_of = {}
        for i, part in _part_of(split).items():
            assert part_of.setdefault(entity(i, ""), part) == part
    assert splits["groups"] == {"n": n, "largest": 3}


def test_common_population_leaves_out_answers_without_every_position():
    answers = _answers(8).assign(exact_answer_valid=[True] * 6 + [False, False],
                                 exact_answer_reason=["gold_alias"] * 6 + ["no_candidate_in_answer"] * 2,
                                 pos_last_q=5, pos_exact_answer_first=[7] * 6 + [-1, -1],
                                 pos_second_answer=[7, -1, 7, 7, 7, 7, -1, 7])
    reasons = population(answers, ["last_q", "second_answer", "exact_answer_first"])
    assert reasons.tolist() == ["", "no_position:second_answer"] + [""] * 4 + [
        "no_exact_answer:no_candidate_in_answer"] * 2
    assert population(answers, ["last_q"]).eq("").all()  # no exact position asked: nobody is left out
    splits = make_splits(answers, [0], 0.3, 0.2, reasons)
    assert splits["n"] == 5 and set(splits["left_out"]) == {"1", "6", "7"}
    assert not set(splits["left_out"]) & set(sum(splits["seeds"]["0"].values(), []))
    assert make_splits(answers, [0], 0.3, 0.2, None, "each")["n"] == 8


@pytest.mark.parametrize("validation_fraction", [0.1, 0.25])
def test_validation_and_train_take_their_share_of_the_whole(validation_fraction):
    answers = _answers(400)
    split = make_splits(answers, [3], 0.3, validation_fraction)["seeds"]["3"]
    assert abs(len(split["validation"]) - validation_fraction * 400) <= 2
    assert abs(len(split["train"]) - (0.7 - validation_fraction) * 400) <= 2
    assert np.isclose(len(split["test"]), 120, atol=2)
