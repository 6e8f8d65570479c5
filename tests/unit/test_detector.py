import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from _synthetic import make_run
from truthmap import Detector, TruthmapError
from truthmap.analyses.detector import check_card_auc, export_detector, prompt_frame


def data(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * rng.uniform(0.1, 20, size=d) + 5).astype(np.float32)
    y = (X[:, 0] / X[:, 0].std() + 0.7 * rng.normal(size=n) > 0.2).astype(int)
    return X, y


def test_estimator_contract_and_agreement_with_scikit_learn():
    X, y = data()
    detector = Detector(C=1.0)
    assert detector.fit(X[:200], y[:200]) is detector
    proba = detector.predict_proba(X[200:])
    assert proba.shape == (100, 2) and np.allclose(proba.sum(1), 1) and list(detector.classes_) == [0, 1]
    scaler = StandardScaler().fit(X[:200])
    reference = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(scaler.transform(X[:200]), y[:200])
    ref = reference.predict_proba(scaler.transform(X[200:]))[:, 1]
    assert np.abs(proba[:, 1] - ref).max() < 0.02
    assert abs(roc_auc_score(y[200:], proba[:, 1]) - roc_auc_score(y[200:], ref)) < 0.01
    assert set(detector.predict(X[200:])) <= {0, 1}


def test_one_class_is_a_clear_error():
    X, _ = data(20)
    with pytest.raises(TruthmapError, match="all of one class"):
        Detector().fit(X, np.zeros(20))


def test_save_load_is_exact_and_pickle_free(tmp_path):
    X, y = data()
    detector = Detector(C=0.5, threshold=0.3, card={"model": "m", "site": "residual"}).fit(X, y)
    detector.save(tmp_path / "det")
    # and the list of what truthmap wrote there (runfolder.OUTPUTS_LIST), so a later export may replace it
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == [".truthmap-outputs.json", "card.json",
                                                                     "detector.safetensors"]
    again = Detector.load(tmp_path / "det")
    assert np.array_equal(again.predict_proba(X), detector.predict_proba(X))
    assert again.C == 0.5 and again.threshold == 0.3 and again.card["model"] == "m"


def test_load_of_a_wrong_folder_says_what_is_missing(tmp_path):
    with pytest.raises(TruthmapError, match="no detector.safetensors"):
        Detector.load(tmp_path)


def test_export_reloads_in_a_fresh_process_with_the_same_auc(tmp_path):
    run = make_run(tmp_path / "run")
    folder = export_detector(run, site="residual", layer=1, position="-1", out=tmp_path / "det")
    card = json.loads((folder / "card.json").read_text())
    for key in ("model", "model_revision", "site", "layer", "position", "task", "train_size", "test_auc",
                "threshold"):
        assert key in card, key
    assert card["model"] == "tiny-model" and card["layer"] == 1 and card["test_auc"] > 0.8
    splits = json.loads((run / "splits.json").read_text())["seeds"]["0"]
    without_position = {f"toy-{i}" for i in range(5)}  # 5 answers have no position -1
    validation = len(set(splits["validation"]) - without_position)  # chooses cells; neither trains nor tests
    assert card["train_size"] + card["test_size"] == 115 - validation
    code = ("import truthmap; from truthmap.analyses.detector import check_card_auc; "
            f"print(*check_card_auc(truthmap.Detector.load({str(folder)!r}), {str(run)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) == float(out[1]) == card["test_auc"]
    assert check_card_auc(Detector.load(folder), run) == (card["test_auc"], card["test_auc"])
    assert card["run"] == "run" and str(tmp_path) not in (folder / "card.json").read_text()  # no machine path


def test_prompt_frame_recovers_the_text_around_the_question(tmp_path):
    run = make_run(tmp_path / "run")
    assert prompt_frame(run) == ("<u>", "</u>")


def test_another_model_is_refused_unless_forced(tmp_path):
    run = make_run(tmp_path / "run")
    detector = Detector.load(export_detector(run, site="residual", layer=1, position="-1", out=tmp_path / "det"))
    with pytest.raises(TruthmapError, match="trained on model 'tiny-model', not 'other/model'"):
        detector.score("q?", "a", model="other/model")


def test_detector_is_a_scikit_learn_estimator_inside_a_pipeline():
    from sklearn.base import clone
    from sklearn.preprocessing import StandardScaler
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    original = Detector(C=0.3, threshold=0.4, card={"model": "m"})
    copy = clone(original)
    assert copy is not original and copy.get_params() == {"C": 0.3, "threshold": 0.4, "card": {"model": "m"}}
    assert not hasattr(copy, "coef_")  # a clone is unfitted
    pipe = make_pipeline(StandardScaler(), Detector(C=1.0)).fit(X[:200], y[:200])
    assert pipe.score(X[200:], y[200:]) > 0.85 and pipe.predict_proba(X[200:]).shape == (100, 2)
    assert cross_val_score(Detector(), X, y, cv=3, scoring="roc_auc").min() > 0.9
    pipe.set_params(detector__C=0.01)
    assert pipe.get_params()["detector__C"] == 0.01


def test_the_scorer_gets_its_model_from_the_backend_factory(tmp_path, monkeypatch):
    from _synthetic import fake_model

    from truthmap import ModelScorer
    from truthmap.backends import Models

    run = make_run(tmp_path / "run")
    detector = Detector.load(export_detector(run, site="residual", layer=1, position="-1", out=tmp_path / "det"))
    card = detector.card
    asked = []
    lm = fake_model(model_id=card["model"], revision=card.get("model_revision") or "fake")

    def factory_lm(models):
        asked.append((models.config.model, models.config.dtype, models.config.device))
        return lm

    monkeypatch.setattr(Models, "lm", property(factory_lm))
    scorer = ModelScorer(detector, dtype="float32", device="cpu")
    assert scorer.lm is lm and scorer.lm is lm  # loaded once
    assert asked == [(card["model"], "float32", "cpu")]


def test_an_unscored_answer_is_never_called_likely_right():
    """ask/score's verdict line: an answer whose position does not exist says so and why, and shows the
    fallback cell's P(error) under its own name; a scored answer keeps its usual words."""
    from types import SimpleNamespace

    from truthmap.cli import _verdict

    fallback = SimpleNamespace(card={"position": "-1", "test_auc": 0.71}, threshold=0.4)
    scorer = SimpleNamespace(card={"position": "exact_answer_last"}, threshold=0.5, fallback=fallback,
                             fallback_threshold=0.4)
    row = {"p_error": float("nan"), "flagged": None, "status": "not scored",
           "reason": "no exact answer found in the answer (route no_candidate_in_answer)",
           "fallback_p_error": 0.45, "fallback_flagged": True}
    line = _verdict(row, scorer)
    assert "likely right" not in line.split(";")[0] and "NOT COMPUTED" in line and "no exact answer found" in line
    assert "position -1 instead" in line and "likely WRONG" in line and "0.71" in line
    assert "no verdict" in _verdict({**row, "fallback_p_error": None}, SimpleNamespace(**{**vars(scorer), "fallback": None}))
    scored = {"p_error": 0.2, "flagged": False, "status": "not flagged"}
    assert "likely right" in _verdict(scored, scorer)


def test_the_cards_exact_answer_mode_is_what_the_label_stage_did(tmp_path):
    """summary.json's exact_answer.mode where it says; otherwise gold when any span is the gold alias."""
    import pandas as pd

    from truthmap.analyses.detector import exact_answer_mode

    run = make_run(tmp_path / "run")  # its answers' route is gold_alias
    assert exact_answer_mode(run) == "gold"
    answers = pd.read_parquet(run / "answers.parquet").assign(exact_answer_reason="vocabulary")
    answers.to_parquet(run / "answers.parquet", index=False)
    assert exact_answer_mode(run) == "blind"
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "exact_answer": {"mode": "gold"}}))
    assert exact_answer_mode(run) == "gold"
