import numpy as np
import pandas as pd
import pytest

from _synthetic import make_run
from truthmap.analyses.resample import TYPES, cluster_key, error_type, type_probes


@pytest.mark.parametrize("correct, clusters, expected", [
    ([0] * 6 + [1] * 4, [""] * 6 + ["x"] * 4, "refuses"),
    ([1] * 8 + [0] * 2, ["x"] * 8 + ["y", "z"], "consistently_correct"),
    ([0] * 9 + [1], ["paris"] * 9 + ["lyon"], "consistently_incorrect"),
    ([1] * 4 + [0] * 4 + [0] * 2, ["x"] * 4 + ["y"] * 4 + ["", ""], "two_competing"),
    ([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], ["x", "x", "a", "a", "b", "b", "c", "c", "d", "d"], "many_answers"),
    ([1] * 7 + [0] * 3, ["x"] * 7 + ["y", "z", "w"], "other"),
])
def test_error_types(correct, clusters, expected):
    assert error_type([bool(c) for c in correct], clusters)["error_type"] == expected


def test_thresholds_are_fractions_of_n():
    # the same pattern over 5 and over 10 samples is the same type
    five = error_type([False] * 4 + [True], ["paris"] * 4 + ["x"])
    ten = error_type([False] * 8 + [True] * 2, ["paris"] * 8 + ["x"] * 2)
    assert five["error_type"] == ten["error_type"] == "consistently_incorrect"
    assert five["n"] == 5 and five["largest_wrong"] == 4


def test_clusters_normalise_case_articles_and_accents():
    assert cluster_key("The Paris", True) == cluster_key("paris", True) == cluster_key("Páris", True)
    assert cluster_key("Paris", False) == ""


def test_type_probes_find_a_type_carried_by_the_features(tmp_path):
    run = make_run(tmp_path / "run", n=160)
    answers = pd.read_parquet(run / "answers.parquet")
    # the questions answered wrongly are "consistently incorrect": the features carry that signal
    types = pd.DataFrame({"id": answers.id, "error_type": np.where(answers.correct, "consistently_correct",
                                                                   "consistently_incorrect")})
    results = type_probes(run, types, site="residual", layer=1, position="-1", n_boot=50)
    assert set(results.error_type) == set(TYPES)
    wrong = results[results.error_type == "consistently_incorrect"]
    assert (wrong.auc > 0.85).all()
    assert results[results.error_type == "refuses"].auc.isna().all()  # no positives: no AUC
