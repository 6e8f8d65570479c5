"""Model-backed: an exported detector scores the study's own test answers as the study did, and an
answer it cannot score is said to be unscored (never "likely right")."""

import json

import numpy as np
import pandas as pd
import pytest

import truthmap
from truthmap.cli import app

pytestmark = pytest.mark.model


def test_score_gives_the_study_scores_of_its_test_answers(small_study, default_model, tmp_path):
    run, _ = small_study
    app(["export", str(run), "--layer", "15", "--position", "exact_answer_last", "--out", str(tmp_path / "det")])
    card = json.loads((tmp_path / "det" / "card.json").read_text())
    locator = card["locator"]
    assert locator["exact_answer"] in ("blind", "gold") and "number" in {v[1] for v in locator["questions"].values()}
    assert locator["vocabularies"]["country"] and card["fallback"]["position"] == "-1"
    assert card["calibration"]["part"] == "validation" and card["risk_coverage"]["n"] == card["test_size"]

    answers = pd.read_parquet(run / "answers.parquet").set_index("id")
    generations = pd.read_parquet(run / "generations.parquet").set_index("id")
    test = answers.loc[[i for i in card["test_ids"] if generations.stopped[i]]]  # the text rebuilds the tokens
    pairs = pd.DataFrame({"question": test.question, "answer": test.answer})
    if locator["exact_answer"] == "gold":  # the study placed right answers at their alias: give it the gold
        pairs["gold"] = ["|".join(g) for g in test.gold]
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    app(["score", "--detector", str(tmp_path / "det"), "--file", str(tmp_path / "pairs.csv"),
         "--out", str(tmp_path / "scored.csv")])
    scored = pd.read_csv(tmp_path / "scored.csv", keep_default_na=False)
    assert len(scored) == len(test) >= 10

    detector = truthmap.Detector.load(tmp_path / "det")
    ids, X = truthmap.load_features(run, "residual", 15, "exact_answer_last")
    row = {i: k for k, i in enumerate(ids)}
    had = np.array([i in row for i in test.index])
    study = detector.predict_proba(X[[row[i] for i in test.index[had]]])[:, 1]
    p = pd.to_numeric(scored.p_error, errors="coerce").to_numpy()
    assert np.isfinite(p[had]).all() and np.abs(p[had] - study).max() < 0.02  # float16 storage of X
    # where the study found no exact answer, the detector finds none either and says so
    assert np.isnan(p[~had]).all()
    assert (scored.status[~had] == "not scored").all() and (scored.flagged[~had] == "").all()
    assert all(r for r in scored.reason[~had]) and not any(scored.reason[had])
    assert set(scored.status[had]) <= {"flagged", "not flagged"}


def test_an_answer_without_an_exact_answer_is_not_scored_and_says_why(small_study, default_model, tmp_path):
    run, _ = small_study
    truthmap.Detector  # noqa: B018
    app(["export", str(run), "--layer", "15", "--position", "exact_answer_last", "--out", str(tmp_path / "det")])
    scorer = truthmap.ModelScorer(truthmap.Detector.load(tmp_path / "det"), default_model)
    with pytest.warns(UserWarning, match="not scored"):
        p = scorer.score(["What is 571 plus 480?", "What is the capital of France?"], ["", "Paris."])
    assert np.isnan(p[0]) and np.isfinite(p[1])
    table = scorer.score_table(["What is 571 plus 480?"], [""])
    assert table.status[0] == "not scored" and table.flagged.isna()[0] and "empty" in table.reason[0]
    assert table.answer_type[0] == "number" and table.answer_type_from[0] in ("run", "nearest")
    assert np.isfinite(table.fallback_p_error[0]) and table.fallback_position[0] == "-1"
