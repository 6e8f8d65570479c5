"""The exact-answer locator against the hand-checked audit (tests/fixtures/exact_answer_audit.csv).

No model is loaded: rows whose route is the extractor replay the extractor's reply recorded in the file.
"""

import pandas as pd
import pytest

from truthmap.analyses import audit
from truthmap.errors import TruthmapError

# The published figure: docs/exact-answer-audit.md, "precision on wrong answers" (after tightening).
# Regenerate with `python -m truthmap.analyses.audit` and update both places together.
PUBLISHED_WRONG_PRECISION = 0.748
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def scored():
    return audit.score_rows(audit.read_audit())


def test_audit_file_is_large_and_varied_enough():
    table = audit.read_audit()
    assert len(table) >= 300 and table.task.nunique() >= 5
    assert (~table.correct).sum() >= 150
    assert set(table.exact_answer) - {audit.NONE}, "every row says none"


def test_precision_on_wrong_answers_holds_the_published_figure(scored):
    assert (scored["class"] == "wrong").sum() >= 150
    assert audit.wrong_precision(scored) >= PUBLISHED_WRONG_PRECISION - TOLERANCE


def test_agreement_is_normalised_equality_and_none_counts_against_precision():
    rows = pd.DataFrame([
        # right answer, alias found: agrees despite case and article
        {"task": "movies", "id": "a", "question": "Who starred in X?", "gold": ["Tom Hanks"], "wrong_answers": [],
         "answer_type": "", "answer": "It was tom hanks.", "correct": True, "extractor_reply": "Tom Hanks",
         "exact_answer": "tom hanks", "note": ""},
        # wrong answer, the hand says none but the extractor's reply is placed: a false span
        {"task": "movies", "id": "b", "question": "Who starred in Y?", "gold": ["Meryl Streep"], "wrong_answers": [],
         "answer_type": "", "answer": "Many actors starred in it.", "correct": False,
         "extractor_reply": "Many actors", "exact_answer": "none", "note": ""},
        # wrong answer, the hand names a span the locator misses
        {"task": "movies", "id": "c", "question": "Who starred in Z?", "gold": ["Cher"], "wrong_answers": [],
         "answer_type": "", "answer": "Starring: Bob Odenkirk.", "correct": False, "extractor_reply": "",
         "exact_answer": "Bob Odenkirk", "note": ""},
    ])
    scored = audit.score_rows(rows, vocabularies={})
    assert scored.agree.tolist() == [True, False, False]
    by_class = audit.summarise(scored, ["class"]).set_index("class")
    assert by_class.loc["wrong", "precision"] == 0.0 and by_class.loc["wrong", "span_on_none"] == 1
    assert by_class.loc["wrong", "recall"] == 0.0 and by_class.loc["right", "recall"] == 1.0


def test_a_hand_span_not_in_the_answer_is_refused(tmp_path):
    path = tmp_path / "audit.csv"
    row = {c: "" for c in audit.COLUMNS} | {"task": "movies", "id": "x", "gold": '["A"]', "wrong_answers": "[]",
                                             "answer": "It is B.", "correct": "False", "exact_answer": "C"}
    pd.DataFrame([row]).to_csv(path, index=False)
    with pytest.raises(TruthmapError, match=r"row 2, field 'exact_answer'"):
        audit.read_audit(path)


def test_a_located_head_agrees_and_a_longer_span_does_not():
    assert audit.agrees("Yen", "Uzbekistani Yen") and audit.agrees("the Lira", "Lira")
    assert not audit.agrees("Uzbekistani", "Uzbekistani Yen")  # not the head
    assert not audit.agrees("also known as irridium", "irridium")  # describes around the answer


def test_rows_behind_each_tightening_keep_their_answer(scored):
    """Each tightening of the routes was made for a kind of error the audit found."""
    table = audit.read_audit()
    rows = scored.set_index(["task", "id"])
    assert rows.loc[("facts", "element-Sc"), "route"] == "refusal"  # "… is not known yet."
    assert pd.isna(rows.loc[("facts", "capital-DK"), "located"])  # "Denmark is a country in Northern Europe"
    assert rows.loc[("winobias", "744"), "located"] == "laborer"  # "The baker is referring to the laborer"
    assert len(table) == len(scored)
