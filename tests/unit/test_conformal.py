"""Split-conformal thresholds and the risk-coverage curve (truthmap/analyses/conformal.py)."""

import json
import math

import numpy as np
import pytest

from _synthetic import make_run
from truthmap import Detector, ModelScorer, TruthmapError
from truthmap.analyses.conformal import (conformal_rank, conformal_rank_min, conformal_threshold, false_flag_bound,
                                         risk_coverage)
from truthmap.analyses.detector import export_detector


def test_the_rank_is_the_finite_sample_one():
    assert conformal_rank(50, 0.1) == math.ceil(51 * 0.9) == 46
    assert conformal_rank(9, 0.1) == 9 and conformal_rank(8, 0.1) == 9  # (n + 1)(1 - a) = 9 exactly: 9
    assert conformal_rank_min(0.1) == 9 and conformal_rank_min(0.05) == 19
    found = conformal_threshold(np.arange(1, 51) / 100, 0.1)
    assert found["score_at_rank"] == 0.46 and found["threshold"] > 0.46 and found["threshold"] == np.nextafter(0.46, 1)
    assert found["expected_false_flag"] == pytest.approx(5 / 51)
    with pytest.raises(TruthmapError, match="too few.*at least 9"):
        conformal_threshold(np.arange(8) / 10, 0.1)
    with pytest.raises(TruthmapError, match="strictly between"):
        conformal_rank(10, 1.0)


def test_false_flag_rate_of_held_out_right_answers_is_within_the_conformal_bound():
    """Scores of right answers uniform on (0, 1): the false-flag rate given one calibration part is exactly
    1 - threshold. Over 4000 calibration parts its mean is at most alpha (and at least alpha - 1/(n + 1)),
    and 95% of them fall in the Beta(n + 1 - k, k) interval. ceil(n(1 - alpha)) instead of
    ceil((n + 1)(1 - alpha)) gives a mean of 6/51 = 0.118 and fails."""
    rng = np.random.default_rng(0)
    n, alpha, reps = 50, 0.1, 4000
    rates = np.array([1 - conformal_threshold(rng.uniform(size=n), alpha)["threshold"] for _ in range(reps)])
    k = conformal_rank(n, alpha)
    assert rates.mean() <= alpha + 0.003 and rates.mean() >= alpha - 1 / (n + 1) - 0.003
    assert rates.mean() == pytest.approx((n + 1 - k) / (n + 1), abs=0.003)
    low, high = false_flag_bound(n, k)
    inside = ((rates >= low) & (rates <= high)).mean()
    assert 0.935 <= inside <= 0.965


def test_a_fitted_detector_keeps_its_false_flag_rate_on_held_out_synthetic_answers():
    """The whole path: a Detector fitted on train, calibrated on the right answers of a validation part,
    measured on 5000 held-out answers, 300 times; mean false-flag rate on right answers <= target."""
    rng = np.random.default_rng(1)
    alpha, rates = 0.2, []
    w = rng.normal(size=6)

    def answers(n):
        X = rng.normal(size=(n, 6)).astype(np.float32)
        y = (X @ w + rng.logistic(size=n) > 0.5).astype(int)
        return X, y

    detector = Detector().fit(*answers(400))
    for _ in range(300):
        X_val, y_val = answers(60)
        threshold = conformal_threshold(detector.predict_proba(X_val[y_val == 0])[:, 1], alpha)["threshold"]
        X_test, y_test = answers(5000)
        p = detector.predict_proba(X_test[y_test == 0])[:, 1]
        rates.append((p >= threshold).mean())
    assert np.mean(rates) <= alpha + 0.005
    assert np.mean(rates) >= alpha - 0.06  # not trivially conservative either (n right ~ 20-40)


def test_risk_coverage_by_hand():
    curve = risk_coverage([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    assert curve["accuracy"] == pytest.approx([1, 0.5, 2 / 3, 0.5]) and curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["area"] == pytest.approx(np.mean([1, 0.5, 2 / 3, 0.5])) and curve["base"] == 0.5
    assert curve["best"] == pytest.approx(np.mean([1, 1, 2 / 3, 0.5]))
    tied = risk_coverage([0.1, 0.1, 0.9], [1, 0, 1])  # answered together: their order does not matter
    assert tied["accuracy"] == pytest.approx([0.5, 0.5, 1 / 3])
    assert risk_coverage([0.1, 0.1, 0.9], [0, 1, 1])["accuracy"] == tied["accuracy"]


def test_export_calibrates_on_validation_and_score_takes_another_target(tmp_path):
    run = make_run(tmp_path / "run", n=300)
    folder = export_detector(run, site="residual", layer=1, position="-1", out=tmp_path / "det",
                             target_false_flag=0.2)
    card = json.loads((folder / "card.json").read_text())
    calibration = card["calibration"]
    splits = json.loads((run / "splits.json").read_text())["seeds"]["0"]
    detector = Detector.load(folder)
    from truthmap.analyses.detector import cell_data

    ids, X, y = cell_data(run, "residual", 1, "-1")
    validation = np.isin(ids, splits["validation"]) & (y == 0)
    right_scores = np.sort(detector.predict_proba(X[validation])[:, 1])
    assert calibration["status"] == "calibrated" and calibration["n_right"] == validation.sum()
    np.testing.assert_allclose(calibration["right_scores"], right_scores, rtol=1e-6)
    assert card["threshold"] == conformal_threshold(right_scores, 0.2)["threshold"]
    assert 0 <= calibration["interval_95"][0] < 0.2 < calibration["interval_95"][1]
    curve = card["risk_coverage"]
    assert curve["n"] == card["test_size"] and curve["base"] <= curve["area"] <= curve["best"]
    assert (folder / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    scorer = ModelScorer(detector, target_false_flag=0.05)  # no model is loaded to set a threshold
    assert scorer.threshold == conformal_threshold(right_scores, 0.05)["threshold"] > card["threshold"]
    with pytest.raises(TruthmapError, match="too few"):
        ModelScorer(detector, target_false_flag=0.001)
