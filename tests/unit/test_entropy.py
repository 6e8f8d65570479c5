"""Semantic entropy of hand-built sample sets, the equivalence judge's call count, and semantic-entropy
probes that recover a planted direction without gold labels (no model)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from truthmap.analyses import entropy as se
from _synthetic import make_run, seal


def test_one_meaning_has_zero_entropy_and_n_distinct_meanings_have_log_n():
    discrete, weighted = se.cluster_entropy(["paris"] * 5, [-0.1, -2.0, -0.5, -3.0, -1.0])
    assert discrete == pytest.approx(0.0) and weighted == pytest.approx(0.0)
    discrete, _ = se.cluster_entropy(["a", "b", "c", "d", "e"])
    assert discrete == pytest.approx(math.log(5))
    discrete, _ = se.cluster_entropy(["a", "a", "b", "b"])
    assert discrete == pytest.approx(math.log(2))


def test_probability_weighted_entropy_uses_the_clusters_summed_probabilities():
    # cluster a: p = 0.3 + 0.1, cluster b: p = 0.2 -> normalised 2/3 and 1/3 (frequencies would say 2/3, 1/3
    # too, so b gets a second, improbable sample: frequencies 2/4 vs 2/4, probabilities 0.4 vs 0.2 + 0.0001)
    clusters = ["a", "a", "b", "b"]
    logprobs = np.log([0.3, 0.1, 0.2, 0.0001])
    discrete, weighted = se.cluster_entropy(clusters, logprobs.tolist())
    p_a = 0.4 / 0.6001
    expected = -(p_a * math.log(p_a) + (1 - p_a) * math.log(1 - p_a))
    assert discrete == pytest.approx(math.log(2))
    assert weighted == pytest.approx(expected, rel=1e-9)
    assert weighted < discrete


def test_sequence_logprob_is_the_mean_token_logprob():
    assert se.sequence_logprob([-1.0, -3.0]) == pytest.approx(-2.0)


def _samples(rows):
    """resamples.parquet rows from (id, [answers]) with exact answers = the answers themselves."""
    out = []
    for qid, answers in rows:
        for k, a in enumerate(answers):
            out.append({"id": qid, "sample": k, "answer": a, "exact_answer": a, "exact_answer_valid": bool(a),
                        "exact_answer_reason": "gold_alias" if a else "no_candidate_in_answer"})
    return pd.DataFrame(out)


def _greedy(rows):
    return pd.DataFrame([{"id": qid, "question": f"q{qid}?", "answer": a, "exact_answer": a,
                          "exact_answer_valid": True, "exact_answer_reason": "gold_alias", "correct": True}
                         for qid, a in rows])


def test_sampling_scores_count_clusters_and_disagreement_with_the_greedy_answer():
    resamples = _samples([("1", ["Paris", "paris", "Lyon", "Paris"]), ("2", ["Rome", "Oslo", "Bern", "Nice"])])
    table = se.sampling_scores(resamples, _greedy([("1", "Paris"), ("2", "Rome")])).set_index("id")
    assert table.loc["1", "n_clusters"] == 2 and table.loc["2", "n_clusters"] == 4
    assert table.loc["1", "sample_disagreement"] == pytest.approx(0.25)
    assert table.loc["2", "sample_disagreement"] == pytest.approx(0.75)
    assert table.loc["2", "semantic_entropy"] == pytest.approx(math.log(4))
    assert np.isnan(table.loc["1", "semantic_entropy_prob"])  # no token log-probabilities kept


def test_a_sample_without_an_exact_answer_is_clustered_by_its_whole_answer():
    assert se.meaning_key("I do not know.", "", False, "no_candidate_in_answer") == "i do not know"
    assert se.meaning_key("It is Paris.", "Paris", True, "gold_alias") == "paris"
    assert se.meaning_key("It is Paris.", "Paris", True, "extractor") == "it is paris"


class FakeJudge:
    """a entails b when they share their first word (case-insensitive); counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pairs):
        self.calls += len(pairs)
        return [a.lower().split()[0] == b.lower().split()[0] for _, a, b in pairs]


def test_the_judge_is_called_twice_per_comparison_and_never_for_identical_texts():
    judge = FakeJudge()
    # q1: "Paris" opens cluster 0; "paris" is the same text (no call); "Lyon" vs "Paris": 2 calls, new
    # cluster; "Paris city" vs "Paris": 2 calls, joins 0; "Lyon!" same text as "Lyon" (no call) -> 4 calls.
    # q2: "a" opens 0; "b" vs a: 2, new 1; "c" vs a: 2, vs b: 2, new 2; "b x" vs a: 2, vs b: 2 joins 1 -> 10.
    items = [("q1", ["Paris", "paris", "Lyon", "Paris city", "Lyon!"]), ("q2", ["a", "b", "c", "b x"])]
    clusters, calls = se.judge_clusters(items, judge)
    assert clusters == [[0, 0, 1, 0, 1], [0, 1, 2, 1]]
    assert calls == [4, 10] and judge.calls == 14


def test_judged_scores_put_the_greedy_answer_first_and_count_calls():
    resamples = _samples([("1", ["Paris city", "Paris", "Lyon"])])
    judge = FakeJudge()
    table = se.sampling_scores(resamples, _greedy([("1", "Paris")]), judge)
    row = table.iloc[0]
    assert row["n_clusters"] == 3 and row["n_clusters_judged"] == 2  # "Paris city" = "Paris" by the judge
    assert row["sample_disagreement_judged"] == pytest.approx(1 / 3)
    assert row["judge_calls"] == judge.calls == 4  # "Paris city" vs "Paris", "Lyon" vs "Paris"


def test_best_split_threshold_separates_two_groups():
    values = np.array([0.0, 0.0, 0.1, 1.0, 1.1, 1.3])
    t = se.best_split_threshold(values)
    assert 0.1 < t < 1.0
    assert se.best_split_threshold(np.zeros(4)) is None
    labels, thresholds = se.high_entropy_labels(np.array([0.0, 1.0, np.nan, 0.0]),
                                                np.array([[True, True, False, True]]))
    assert labels.tolist() == [[0, 1, -1, 0]] and thresholds == [0.5]


def _plant_entropy(run, noise: float, seed: int = 0) -> None:
    """sampling_scores.parquet whose semantic entropy follows the planted direction (wrong answers,
    feature 0 of layer 1 at position -1), with some questions flipped."""
    answers = pd.read_parquet(run / "answers.parquet")
    rng = np.random.default_rng(seed)
    wrong = ~answers["correct"].to_numpy()
    flip = rng.random(len(wrong)) < noise
    entropy = np.where(wrong ^ flip, math.log(5), 0.0) + rng.random(len(wrong)) * 0.2
    pd.DataFrame({"id": answers["id"], "semantic_entropy": entropy}).to_parquet(run / se.SAMPLING_SCORES, index=False)
    seal(run)  # listed in the manifest, as the samples stage would: readers verify what they read


def _cell(table, target, layer, position):
    means = table[(table["target"] == target) & (table["layer"] == layer) & (table["position"] == position)]
    return float(means["auc"].mean())


def test_entropy_probes_recover_a_planted_direction_without_gold_labels(tmp_path):
    run = make_run(tmp_path / "run", n=200)
    _plant_entropy(run, noise=0.1)
    results, scores, details = se.run_entropy_probe(run, ["residual"], n_boot=50, progress=False)
    assert set(results["target"]) == {"error", "high_entropy"}
    assert _cell(results, "high_entropy", 1, "-1") > 0.85
    assert _cell(results, "error", 1, "-1") > 0.8
    assert _cell(results, "error", 0, "-1") < 0.7 and _cell(results, "error", 1, "last_q") < 0.7
    summary = se.entropy_summary(results, details)
    for key in ("best_cell", "best_cell_label_free"):
        assert (summary[key]["layer"], summary[key]["position"]) == (1, "-1")
    assert summary["best_cell"]["high_entropy_auc"] > 0.85

    # the same study with the gold labels removed: the probes and their scores do not change
    answers = pd.read_parquet(run / "answers.parquet")
    answers["correct"] = pd.array([pd.NA] * len(answers), dtype="boolean")
    answers.to_parquet(run / "answers.parquet", index=False)
    unlabelled, scores_unlabelled, details_unlabelled = se.run_entropy_probe(run, ["residual"], n_boot=50,
                                                                             progress=False)
    assert set(unlabelled["target"]) == {"high_entropy"} and not details_unlabelled["labelled"]
    pd.testing.assert_frame_equal(scores.reset_index(drop=True), scores_unlabelled.reset_index(drop=True))
    summary = se.entropy_summary(unlabelled, details_unlabelled)
    assert summary["best_cell"] is None and summary["best_cell_label_free"]["layer"] == 1
    assert summary["best_cell_label_free"]["target"] == "high_entropy"
    # a study too small for any validation AUC of agreement: no label-free cell, and no crash
    summary = se.entropy_summary(results.assign(val_auc=results["val_auc"].where(results["target"] == "error")), details)
    assert summary["best_cell_label_free"] is None and summary["best_cell"]["target"] == "error"


def test_entropy_probe_refuses_a_study_whose_samples_all_agree(tmp_path):
    from truthmap.errors import TruthmapError

    run = make_run(tmp_path / "run", n=60)
    answers = pd.read_parquet(run / "answers.parquet")
    pd.DataFrame({"id": answers["id"], "semantic_entropy": 0.0}).to_parquet(run / se.SAMPLING_SCORES, index=False)
    with pytest.raises(TruthmapError, match="high- and"):
        se.run_entropy_probe(run, ["residual"], n_boot=10, progress=False)


def test_transfer_trains_either_kind_of_probe(tmp_path):
    from truthmap.errors import TruthmapError
    from truthmap.analyses.transfer import matrix, transfer_table

    a = make_run(tmp_path / "a", dataset="alpha", seed=0, n=160)
    b = make_run(tmp_path / "b", dataset="beta", seed=1, n=160)
    _plant_entropy(a, noise=0.1)
    table = transfer_table([a], [b], site="residual", layer=1, position="-1", n_boot=20, probes=("correctness", "entropy"))
    assert set(table["probe"]) == {"correctness", "entropy"}
    grid = matrix(table)
    assert list(grid.index) == ["alpha [correctness]", "alpha [entropy]"]
    assert grid.loc["alpha [entropy]", "beta"] > 0.8  # learned without labels, tested on errors elsewhere
    with pytest.raises(TruthmapError, match="sampling_scores.parquet"):
        transfer_table([b], [a], site="residual", layer=1, position="-1", n_boot=20, probes=("entropy",))


def test_sampling_scores_are_baseline_rows_on_the_probes_test_answers(tmp_path):
    import json

    from truthmap.stages.baselines import SITE, evaluate, with_sampling_scores

    run = make_run(tmp_path / "run", n=120)
    _plant_entropy(run, noise=0.2)
    answers = pd.read_parquet(run / "answers.parquet").merge(
        pd.read_parquet(run / "generations.parquet")[["id", "stopped"]], on="id")
    scores = with_sampling_scores(run, pd.DataFrame({"id": answers["id"], "logprob_mean": 0.0}))
    assert list(scores.columns) == ["id", "logprob_mean", "semantic_entropy"]
    splits = json.loads((run / "splits.json").read_text())
    rows = evaluate(scores, answers, splits, n_boot=20)
    entropy_rows = rows[rows["position"] == "semantic_entropy"]
    assert (entropy_rows["site"] == SITE).all() and len(entropy_rows) == 2
    assert entropy_rows["n_test"].tolist() == [len(splits["seeds"][s]["test"]) for s in ("0", "1")]
    assert entropy_rows["auc"].min() > 0.7  # planted: high entropy on wrong answers (20% flipped)


def test_a_question_only_file_is_a_label_free_study_and_a_partly_answered_one_is_refused(tmp_path):
    from truthmap.data import load_questions
    from truthmap.errors import TruthmapError

    plain = tmp_path / "plain.csv"
    plain.write_text("question\nWhat is the capital of Peru?\nWho wrote Hamlet?\n")
    questions, _ = load_questions(str(plain))
    assert questions["gold"].map(len).tolist() == [0, 0]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"id": "a", "question": "Q1?", "answer": "x"}\n{"id": "b", "question": "Q2?"}\n')
    with pytest.raises(TruthmapError, match="question id 'b' has no answer while others have one"):
        load_questions(str(mixed))


def test_the_report_has_an_entropy_view_of_the_entropy_probes_error_aucs(tmp_path):
    from test_report import make_run as make_report_run

    from truthmap.metrics import mean_over_seeds
    from truthmap.stages.report import run_data

    run = tmp_path / "run"
    make_report_run(run)
    assert "entropy" not in run_data(run)["sites"]["residual"]["views"]
    entropy = pd.read_csv(run / "probe_results.csv", dtype={"position": str})
    entropy["auc"] = 1.0 - entropy["auc"]  # unlike the correctness probes', so the view cannot copy them
    rows = pd.concat([entropy.assign(target="error"), entropy.assign(target="high_entropy", auc=0.5)])
    rows.to_csv(run / se.ENTROPY_RESULTS, index=False)
    site = run_data(run)["sites"]["residual"]
    view = site["views"]["entropy"]
    means = mean_over_seeds(entropy).set_index(["layer", "position"])
    positions = run_data(run)["positions"]
    for li, layer in enumerate(site["layers"]):
        for pi, position in enumerate(positions):
            assert view["auc"][li][pi] == pytest.approx(means.loc[(layer, position), "auc"], abs=1e-4)


def test_sampling_settings_are_checked():
    from truthmap.config import Config
    from truthmap.errors import TruthmapError

    assert Config(also=["samples"], samples=5).validate().samples == 5
    with pytest.raises(TruthmapError, match="samples: 1 is out of range; use a whole number from 2 to"):
        Config(samples=1).validate()
    with pytest.raises(TruthmapError, match="sample_temperature: 0 is out of range; use a finite number, above 0"):
        Config(sample_temperature=0).validate()
