import json

import numpy as np
import pandas as pd
import pytest
import torch

from _synthetic import make_run, seal, tiny_model
from truthmap.metrics import auc_score
from truthmap.stages.baselines import SITE, evaluate, family_table, group_rates, summarise_tokens, within_family_auc


def test_every_score_is_higher_for_the_less_confident_answer():
    keep = np.ones(3, bool)
    sure = summarise_tokens(np.array([0.9, 0.95, 0.99]), np.array([0.1, 0.2, 0.1]), keep)
    unsure = summarise_tokens(np.array([0.3, 0.5, 0.2]), np.array([2.0, 1.5, 2.5]), keep)
    assert set(sure) == {"logprob_mean", "logprob_min", "logprob_max", "logprob_last", "entropy_mean"}
    assert all(unsure[k] > sure[k] for k in sure)
    assert sure["logprob_min"] == pytest.approx(-np.log(0.9)) and sure["logprob_last"] == pytest.approx(-np.log(0.99))
    exact = summarise_tokens(np.array([0.9, 0.1, 0.99]), np.zeros(3), np.array([False, True, False]), "_exact")
    assert exact["logprob_mean_exact"] == pytest.approx(-np.log(0.1))
    assert np.isnan(summarise_tokens(np.ones(2), np.ones(2), np.zeros(2, bool))["logprob_mean"])


def test_token_statistics_match_a_plain_forward_pass():
    lm = tiny_model()
    sequences = [[1, 5, 7, 9, 11], [2, 3, 4, 8, 12, 15, 20]]
    stats = lm.token_statistics(sequences, [3, 4])
    for seq, n_prompt, (prob, entropy) in zip(sequences, [3, 4], stats):
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([seq])).logits[0], -1)
        expected = [logp[t - 1, seq[t]].exp().item() for t in range(n_prompt, len(seq))]
        assert np.allclose(prob, expected, atol=1e-5)
        assert np.allclose(entropy, [-(logp[t - 1].exp() * logp[t - 1]).sum().item()
                                     for t in range(n_prompt, len(seq))], atol=1e-4)


def test_group_rates_learn_on_train_only_and_fall_back_to_the_overall_rate():
    answers = pd.DataFrame({"id": list("abcdef"), "correct": [False, False, True, True, True, False],
                            "family": ["x", "x", "y", "y", "z", "x"]})
    rates = group_rates(answers, {"a", "b", "c", "d"}, ["family"])
    assert rates.tolist() == [1.0, 1.0, 0.0, 0.0, 0.5, 1.0]  # z has no train answer: overall 2/4


def test_evaluate_same_positive_class_and_paired_bootstrap(tmp_path):
    run = make_run(tmp_path / "run")
    answers = pd.read_parquet(run / "answers.parquet")
    splits = json.loads((run / "splits.json").read_text())
    error = (~answers.correct).to_numpy(float)
    scores = pd.DataFrame({"id": answers.id, "logprob_mean": error + 0.5 * np.arange(len(error)) / len(error),
                           "p_true_answer": 1 - error, "logprob_mean_exact": np.where(np.arange(len(error)) < 50,
                                                                                       np.nan, error)})
    results = evaluate(scores, answers, splits, n_boot=100)
    assert (results.site == SITE).all() and set(results.seed) == {0, 1}
    by = results[results.seed == 0].set_index("position")
    assert by.loc["logprob_mean", "auc"] == 1.0 and by.loc["p_true_answer", "auc"] == 0.0
    assert by.loc["logprob_mean", "auc_lo"] == 1.0  # labels travel with scores in every bootstrap draw
    assert by.loc["logprob_mean_exact", "n_test"] < by.loc["logprob_mean", "n_test"]
    assert by.loc["family_rate", "n_train"] == len(splits["seeds"]["0"]["train"])
    assert by.loc["logprob_mean", "n_test"] == len(splits["seeds"]["0"]["test"])
    assert by.loc["logprob_mean", "n_val"] == len(splits["seeds"]["0"]["validation"])
    assert by.loc["logprob_mean", "val_auc"] == 1.0
    # the interval of the mean over seeds is the same for both seeds' rows and brackets their mean
    both = results[results.position == "logprob_mean_exact"]
    assert both.mean_auc_lo.nunique() == 1 and both.mean_auc_lo.iloc[0] <= both.auc.mean() <= both.mean_auc_hi.iloc[0]
    assert np.isnan(by.loc["logprob_mean", "accuracy"]) and not np.isnan(by.loc["p_true_answer", "accuracy"])


def test_readers_get_probes_and_baselines_from_their_own_files(tmp_path):
    from truthmap.metrics import read_run_results

    # probe_results.csv as an older truthmap left it, with baseline rows merged in; baseline_results.csv
    pd.DataFrame({"site": ["residual", SITE], "layer": [1, -1], "position": ["-1", "old"], "seed": [0, 0],
                  "auc": [0.8, 0.1]}).to_csv(tmp_path / "probe_results.csv", index=False)
    assert read_run_results(tmp_path).position.tolist() == ["-1"]  # no baselines stage yet
    pd.DataFrame({"site": [SITE], "layer": [-1], "position": ["new"], "seed": [0], "auc": [0.6]}
                 ).to_csv(tmp_path / "baseline_results.csv", index=False)
    both = read_run_results(tmp_path)
    assert both.position.tolist() == ["-1", "new"] and both.auc.tolist() == [0.8, 0.6]
    assert read_run_results(tmp_path, baselines=False).position.tolist() == ["-1"]


def test_family_table_and_within_family_auc(tmp_path):
    run = make_run(tmp_path / "run")
    answers = pd.read_parquet(run / "answers.parquet")
    splits = json.loads((run / "splits.json").read_text())
    rows = [{"site": "residual", "layer": 1, "position": "-1", "seed": int(s), "id": i,
             "score": float(not answers.set_index("id").correct[i])} for s in ("0", "1") for i in splits["seeds"][s]["test"]]
    cell = {"site": "residual", "layer": 1, "position": "-1"}
    families = family_table(answers, splits, pd.DataFrame(rows), cell)
    assert set(families.family) == {"a", "b"} and (families.probe_auc == 1.0).all()
    assert within_family_auc(families) == 1.0


def test_finish_keeps_numeric_looking_positions_as_text(tmp_path):
    from truthmap.stages.baselines import finish_baselines

    run = make_run(tmp_path / "run")
    answers = pd.read_parquet(run / "answers.parquet")
    splits = json.loads((run / "splits.json").read_text())
    wrong = dict(zip(answers.id, ~answers.correct))
    # a study of the position "-1" only: read back as a number, it would match no probe score
    pd.DataFrame([{"site": "residual", "layer": 1, "position": "-1", "seed": int(s), "auc": 0.9, "auc_lo": 0.8,
                   "auc_hi": 1.0, "accuracy": 0.8, "n_train": 60, "n_test": 60, "val_auc": 0.9}
                   for s in ("0", "1")]
                 ).to_csv(run / "probe_results.csv", index=False)
    pd.DataFrame([{"site": "residual", "layer": 1, "position": "-1", "seed": int(s), "id": i,
                   "score": float(wrong[i])} for s in ("0", "1") for i in splits["seeds"][s]["test"]]
                 ).to_parquet(run / "probe_scores.parquet", index=False)
    scores = pd.DataFrame({"id": answers.id, "logprob_mean": (~answers.correct).astype(float)})
    fields = finish_baselines(run, scores, n_boot=20)
    assert fields["probe_within_family_auc"] == 1.0 and fields["baselines"]["logprob_mean"] == 1.0
    assert set(pd.read_csv(run / "probe_results.csv").site) == {"residual"}  # the probe stage's file, untouched
    written = pd.read_csv(run / "baseline_results.csv", dtype={"position": str})
    assert set(written.site) == {SITE} and "logprob_mean" in set(written.position)
    assert (run / "baselines.png").is_file()
    verdict = fields["verdict"]  # the one cell against every baseline and control, paired on the test part
    by = {c["against"]: c for c in verdict["comparisons"]}
    assert {"logprob_mean", "surface", "family_rate", "bag_of_tokens"} <= set(by)
    assert by["logprob_mean"]["diff"] == 0.0 and by["logprob_mean"]["kind"] == "baseline"
    assert by["bag_of_tokens"]["kind"] == "control" and verdict["n_test"] == len(splits["test"])
    assert fields["controls"]["exact_minus_surface"] is None  # no exact-answer column in this study


def test_surface_control_catches_a_study_confounded_by_answer_length():
    """Wrong answers are the long ones that ran to the token limit: the surface control alone finds them,
    and ``controls`` flags exact-answer columns that do no better."""
    from truthmap.stages.baselines import controls, surface_scores

    rng = np.random.default_rng(0)
    n = 400
    wrong = rng.random(n) < 0.5
    answers = pd.DataFrame({"id": [str(i) for i in range(n)], "correct": ~wrong,
                            "n_answer_tokens": np.where(wrong, 20, 6) + rng.integers(0, 5, n),
                            "exact_answer_valid": True, "exact_answer_start": 0, "exact_answer_end": 5,
                            "exact_answer_reason": np.where(wrong, "vocabulary", "gold_alias"),  # gives the label away
                            "exact_answer_route": np.where(rng.random(n) < 0.5, "number", "vocabulary"),
                            "stopped": ~wrong})
    train = np.arange(n) < 200
    score = surface_scores(answers, train)
    assert auc_score(score[~train], wrong[~train]) > 0.95
    answers["n_answer_tokens"] = 10  # nothing on the surface: the control is near chance
    answers["stopped"] = True
    assert abs(auc_score(surface_scores(answers, train)[~train], wrong[~train]) - 0.5) < 0.1

    def rows(site, position, auc, lo, hi):
        return [{"site": site, "layer": 3 if site != SITE else -1, "position": position, "seed": s, "auc": auc,
                 "val_auc": auc, "mean_auc_lo": lo, "mean_auc_hi": hi} for s in (0, 1)]

    table = pd.DataFrame(rows("residual", "exact_answer_last", 0.90, 0.86, 0.94) + rows("residual", "-1", 0.80, 0.75, 0.85)
                         + rows(SITE, "surface", 0.88, 0.84, 0.92) + rows(SITE, "family_rate", 0.70, 0.65, 0.75))
    # the flag reads the paired interval of (best exact-answer cell − surface), not the two separate intervals
    found = controls(table, {"diff": 0.02, "low": -0.01, "high": 0.05, "p": 0.2, "shown": False})
    assert found["exact_answer_confounded"] is True and found["surface"]["auc"] == 0.88
    assert found["best_exact_answer_cell"]["position"] == "exact_answer_last" and found["best_other_cell"]["position"] == "-1"
    assert controls(table, {"diff": 0.02, "low": 0.005, "high": 0.04, "p": 0.01, "shown": True})[
        "exact_answer_confounded"] is False
    assert controls(table)["exact_answer_confounded"] is None  # not measured: not claimed either way


def test_p_true_choices_of_config_and_baselines_agree():
    """Every --p-true value the configuration accepts names the score columns the baselines add."""
    from truthmap.stages.baselines import P_TRUE_CHOICES as COLUMNS
    from truthmap.config import P_TRUE_CHOICES, Config

    assert set(P_TRUE_CHOICES) == set(COLUMNS) and Config().p_true == "exact"
    assert COLUMNS["both"] == ("p_true_exact", "p_true_answer") and COLUMNS["none"] == ()


def test_bag_of_tokens_knows_which_answer_was_given_and_reads_the_exact_span():
    """Wrong answers name one of a few wrong entities (their tokens): the bag-of-tokens control, fitted on
    train, finds them on the held-out answers; its exact-span bag holds only the span's tokens."""
    from truthmap.stages.baselines import bag_of_tokens_scores, token_bags

    rng = np.random.default_rng(0)
    n = 300
    wrong = rng.random(n) < 0.4
    entity = np.where(wrong, rng.integers(100, 105, n), rng.integers(200, 260, n))  # the exact answer's token
    answer_ids = [[11, 12, int(e), 13] for e in entity]  # "The answer is <entity>."
    answers = pd.DataFrame({"id": [str(i) for i in range(n)], "correct": ~wrong, "answer_ids": answer_ids,
                            "exact_answer_valid": True, "n_prompt_tokens": 5,
                            "pos_exact_answer_first": 7, "pos_exact_answer_last": 7})
    bags = token_bags(answers)
    width = bags.shape[1] // 2
    assert bags[0].sum() == 5 and bags[0, width:].sum() == 1  # 4 answer tokens, 1 exact-span token
    train = np.arange(n) < 200
    score = bag_of_tokens_scores(answers, train)
    assert auc_score(score[~train], wrong[~train]) > 0.95
    shuffled = answers.assign(answer_ids=[[11, 12, 13]] * n)  # no entity token: nothing to know
    assert np.ptp(bag_of_tokens_scores(shuffled, train)) < 1e-9


def test_every_score_column_the_stages_make_is_registered_by_name():
    """The registry (BASELINES) is the one list of baseline names: each column the baselines and samples
    stages write, and the whole-map row, is in it with a kind and a cost the cost table knows."""
    from truthmap.analyses.entropy import SCORE_NAMES
    from truthmap.stages.baselines import BASELINES, COSTS, P_TRUE_CHOICES

    made = set(summarise_tokens(np.ones(2), np.ones(2), np.ones(2, bool)))
    made |= set(summarise_tokens(np.ones(2), np.ones(2), np.ones(2, bool), "_exact"))
    made |= {c for columns in P_TRUE_CHOICES.values() for c in columns}
    made |= {n + judged for n in SCORE_NAMES for judged in ("", "_judged") if n + judged != "naive_entropy_judged"}
    made |= {"whole_map"}
    assert made <= set(BASELINES), made - set(BASELINES)
    assert {b.kind for b in BASELINES.values()} <= {"token scores", "p(True)", "control", "sampling", "probe"}
    assert all(b.cost in COSTS and b.label for b in BASELINES.values())


def test_a_registered_control_is_fitted_scored_and_read_by_every_view(tmp_path, monkeypatch):
    """Adding a baseline is its registration: evaluate fits it on each seed's train part, it sets the
    controls' bar, summary.json's controls name it, the report labels it and the cost table counts it;
    a name the registry does not know (another version's) is still shown, as a baseline."""
    from truthmap import runfolder as rf
    from truthmap.analyses import cost
    from truthmap.stages import baselines as bl
    from truthmap.stages.report import baselines as report_rows

    fitted = []

    def fit(answers):
        error = (~answers["correct"].astype(bool)).to_numpy(float)

        def score(train):
            fitted.append(int(train.sum()))
            return np.where(train, 0.5, error * 0.9 + 0.05)  # knows the errors of the answers it was not fitted on
        return score

    monkeypatch.setitem(bl.BASELINES, "oracle", bl.Baseline("oracle", "control", "none", "oracle control",
                                                            probability=True, fit=fit))
    run = make_run(tmp_path / "run")
    answers = pd.read_parquet(run / "answers.parquet")
    splits = json.loads((run / "splits.json").read_text())
    results = evaluate(pd.DataFrame({"id": answers.id, "some_future_score": 0.0}), answers, splits, n_boot=50)
    by = results[results.seed == 0].set_index("position")
    assert fitted == [len(splits["seeds"][s]["train"]) for s in sorted(splits["seeds"], key=int)]
    assert by.loc["oracle", "auc"] == 1.0 and by.loc["oracle", "n_train"] == len(splits["seeds"]["0"]["train"])
    assert by.loc["some_future_score", "n_train"] == 0 and np.isnan(by.loc["some_future_score", "accuracy"])
    assert bl.control_level(results)["name"] == "oracle"  # the highest bar of the controls
    assert bl.controls(results)["oracle"]["auc"] == 1.0
    shown = {row["name"]: row for row in report_rows(results)}
    assert (shown["oracle"]["kind"], shown["oracle"]["label"]) == ("control", "oracle control")
    assert (shown["some_future_score"]["kind"], shown["some_future_score"]["label"]) == ("baseline", "some_future_score")
    results.to_csv(run / rf.BASELINE_RESULTS, index=False)
    pd.DataFrame([{"site": "residual", "layer": 1, "position": "-1", "seed": 0, "auc": 0.7, "val_auc": 0.7}]
                 ).to_csv(run / rf.PROBE_RESULTS, index=False)
    seal(run)
    table = cost.cost_table(run).set_index("method")
    assert table.loc["oracle", "kind"] == "control" and table.loc["oracle", "forward_tokens"] == 0
