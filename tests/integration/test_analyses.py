"""Model-backed: baselines, the detector, transfer, resampling, answer choice and the attention view on
the shared small study (tests/conftest.py). Tests that write copy the run folder first."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import truthmap
from truthmap.cli import app

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def run_copy(small_study, tmp_path_factory):
    """A copy of the small study that the tests of this module may write into."""
    out = tmp_path_factory.mktemp("analyses") / "study"
    shutil.copytree(small_study[0], out)
    return out


def test_baselines_are_rows_of_their_own_results_and_a_figure(small_study):
    out, table = small_study
    results = pd.read_csv(out / "probe_results.csv")
    assert "baseline" not in set(results.site)  # the probe stage's file: the probes' rows only
    baselines = pd.read_csv(out / "baseline_results.csv")
    assert list(baselines.columns) == list(results.columns)
    whole_map = pd.read_csv(out / "wholemap_results.csv")  # the whole map as one probe: a row of the table
    assert (table.site == "baseline").sum() == len(baselines) + len(whole_map)  # truthmap.run() returns them
    names = set(baselines.position)
    for name in ("logprob_mean", "logprob_min", "logprob_max", "logprob_last", "entropy_mean", "logprob_mean_exact",
                 "entropy_mean_exact", "p_true_exact", "family_rate", "subgroup_rate"):
        assert name in names, name
    assert "p_true_answer" not in names  # the whole answer's p(True) is asked only with --p-true both
    assert set(baselines.seed) == {0, 1} and baselines.auc.between(0, 1).all()
    # same test split as the probes: each baseline is measured on the seed's test answers
    probe_n = results[(results.site == "residual") & (results.position == "last_q")].groupby("seed").n_test.max()
    assert (baselines[baselines.position == "logprob_mean"].set_index("seed").n_test == probe_n).all()
    # higher = more likely wrong: the exact answer's improbability points at errors on these questions
    assert baselines[baselines.position == "logprob_mean_exact"].auc.mean() > 0.55
    assert (out / "baselines.png").read_bytes()[:4] == b"\x89PNG"
    families = pd.read_csv(out / "family_results.csv")
    assert {"family", "seed", "n_test", "train_error_rate", "probe_auc"} <= set(families.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert "family_rate" in summary["baselines"] and "probe_within_family_auc" in summary


def test_p_true_setting_chooses_the_variants_and_reruns_the_baselines(run_copy):
    """--p-true both adds the whole answer's p(True) (as the reference study asks it), with the exact
    answer's scores unchanged; none asks neither; the setting is part of the stage's fingerprint."""
    def scores():
        return pd.read_parquet(run_copy / "baseline_scores.parquet").set_index("id")

    before = scores()
    app(["baselines", "--out", str(run_copy), "--p-true", "both", "--quiet"])
    both = scores()
    assert {"p_true_exact", "p_true_answer"} <= set(both.columns)
    np.testing.assert_allclose(both.p_true_exact, before.p_true_exact.reindex(both.index), atol=1e-5)
    assert both.p_true_answer.notna().mean() > 0.9 and not np.allclose(both.p_true_answer, both.p_true_exact)
    assert "p_true_answer" in set(pd.read_csv(run_copy / "baseline_results.csv").position)
    app(["baselines", "--out", str(run_copy), "--p-true", "none", "--quiet"])
    assert not {"p_true_exact", "p_true_answer"} & set(scores().columns)


def test_transfer_diagonal_is_the_in_task_probe(small_study, tmp_path):
    out, table = small_study
    app(["transfer", "--train", str(out), "--test", str(out), "--layer", "15", "--position", "exact_answer_last",
         "--out", str(tmp_path / "t"), "--bootstrap", "50"])
    transfer = pd.read_csv(tmp_path / "t" / "transfer.csv")
    probe = table[(table.site == "residual") & (table.layer == 15) & (table.position == "exact_answer_last")]
    for seed in (0, 1):
        assert transfer[transfer.seed == seed].auc.item() == pytest.approx(probe[probe.seed == seed].auc.item(), abs=0.01)
    assert (tmp_path / "t" / "transfer.png").is_file()


def test_exported_detector_reloads_in_a_fresh_process_and_scores_like_the_probe(run_copy, default_model, tmp_path):
    app(["export", str(run_copy), "--layer", "20", "--position", "-1", "--out", str(tmp_path / "det")])
    card = json.loads((tmp_path / "det" / "card.json").read_text())
    assert card["model"] == truthmap.Detector.load(tmp_path / "det").card["model"] == "embedded:smollm2-135m-instruct"
    assert card["model_revision"].startswith("sha256:") and 0 <= card["test_auc"] <= 1
    code = ("import truthmap; from truthmap.analyses.detector import check_card_auc; "
            f"print(*check_card_auc(truthmap.Detector.load({str(tmp_path / 'det')!r}), {str(run_copy)!r}))")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(printed[0]) == float(printed[1]) == card["test_auc"]

    # new pairs: the detector runs the model on (question, answer) and reads the same hidden state
    detector = truthmap.Detector.load(tmp_path / "det")
    scorer = truthmap.ModelScorer(detector, default_model)
    answers = pd.read_parquet(run_copy / "answers.parquet")
    generations = pd.read_parquet(run_copy / "generations.parquet").set_index("id")
    stopped = answers[answers.id.map(generations.stopped)].head(4)
    p = scorer.score(stopped.question.tolist(), stopped.answer.tolist())
    with pytest.warns(DeprecationWarning):  # the 0.1 spelling still works for one release
        assert np.allclose(detector.score(stopped.question.tolist(), stopped.answer.tolist(), model=default_model), p)
    ids, X = truthmap.load_features(run_copy, "residual", 20, "-1")
    rows = [ids.index(i) for i in stopped.id]
    assert np.abs(p - detector.predict_proba(X[rows])[:, 1]).max() < 0.02  # float16 storage of X
    # an exact-answer position: given the exact answer, the detector finds its tokens as the label stage did
    app(["export", str(run_copy), "--layer", "15", "--position", "exact_answer_last",
         "--out", str(tmp_path / "det15")])
    exact = truthmap.Detector.load(tmp_path / "det15")
    once = answers[answers.exact_answer_valid & answers.id.map(generations.stopped)]
    once = once[[a.count(x) == 1 for a, x in zip(once.answer, once.exact_answer)]].head(3)
    p15 = truthmap.ModelScorer(exact, default_model).score(once.question.tolist(), once.answer.tolist(),
                                                           exact_answer=once.exact_answer.tolist())
    ids15, X15 = truthmap.load_features(run_copy, "residual", 15, "exact_answer_last")
    assert np.abs(p15 - exact.predict_proba(X15[[ids15.index(i) for i in once.id]])[:, 1]).max() < 0.02
    # the card's prompt frame rebuilds the run's prompt of any question
    first = stopped.id.iloc[0]
    assert scorer.prompt_ids(default_model, stopped.question.iloc[0]) == list(generations.prompt_ids[first])
    asked = scorer.ask(stopped.question.iloc[0])[0]
    assert asked["answer"].strip() and 0 <= asked["p_error"] <= 1 and asked["flagged"] == (asked["p_error"] >= 0.5)
    with pytest.raises(truthmap.TruthmapError, match="trained on model"):
        truthmap.ModelScorer(detector, "someone/another-model").score("q?", "a")


def test_sampling_is_seeded(default_model, run_copy):
    from truthmap.analyses.resample import sample_answers

    prompts = pd.read_parquet(run_copy / "generations.parquet").prompt_ids.head(3).map(list).tolist()
    first = sample_answers(default_model, prompts, n=2, temperature=1.0, seed=7, max_new_tokens=8, progress=False)
    again = sample_answers(default_model, prompts, n=2, temperature=1.0, seed=7, max_new_tokens=8, progress=False)
    other = sample_answers(default_model, prompts, n=2, temperature=1.0, seed=8, max_new_tokens=8, progress=False)
    assert first == again and first != other
    # each prompt draws from its own stream: the batch size and the other prompts change nothing
    one_by_one = sample_answers(default_model, prompts, n=2, temperature=1.0, seed=7, max_new_tokens=8,
                                batch_size=1, progress=False)
    reversed_ = sample_answers(default_model, prompts[::-1], n=2, temperature=1.0, seed=7, max_new_tokens=8,
                               batch_size=4, progress=False)
    assert one_by_one == first and reversed_[::-1] == first
    assert sample_answers(default_model, prompts[1:2], n=2, temperature=1.0, seed=7, max_new_tokens=8,
                          progress=False) == first[1:2]


def test_resample_error_types_and_answer_choice(default_model, run_copy):
    from truthmap import runfolder as rf
    from truthmap.analyses.choice import run_choice
    from truthmap.analyses.resample import TYPES, run_resample

    cell = {"site": "residual", "layer": 20, "position": "-1"}
    with rf.open_run(run_copy):
        results = run_resample(default_model, run_copy, n=2, seed=0, cell=cell, n_boot=50, progress=False,
                               max_new_tokens=10)
        table = run_choice(default_model, run_copy, cell=cell, n_boot=50)
    resamples = pd.read_parquet(run_copy / "resamples.parquet")
    assert (resamples.groupby("id").size() == 2).all() and len(resamples) == 2 * 80
    valid = resamples[resamples.exact_answer_valid]
    assert all(a[s:e] == x for a, s, e, x in zip(valid.answer, valid.exact_answer_start, valid.exact_answer_end,
                                                  valid.exact_answer))
    types = pd.read_parquet(run_copy / "error_types.parquet")
    assert len(types) == 80 and set(types.error_type) <= set(TYPES)
    assert set(results.error_type) == set(TYPES) and set(results.seed) == {0, 1}
    overall = table[table.error_type == "all"].set_index("strategy")
    answers = pd.read_parquet(run_copy / "answers.parquet").set_index("id")
    test = json.loads((run_copy / "splits.json").read_text())["seeds"]["0"]["test"]
    assert overall.loc["greedy", "accuracy"] == pytest.approx(answers.loc[test, "correct"].mean())
    assert overall.accuracy.between(0, 1).all() and (overall.n == len(test)).all()
    assert (run_copy / "choice.png").is_file() and (run_copy / "error_types.png").is_file()


def test_attention_view_with_the_same_axes(run_copy):
    app(["run", "--out", str(run_copy), "--also", "attention", "--quiet"])
    attention = pd.read_csv(run_copy / "attention.csv")
    assert sorted(set(attention.layer)) == list(range(1, 31)) and attention.position.nunique() == 15
    assert attention.attention.dropna().between(0, 1).all()
    stages = json.loads((run_copy / "stages.json").read_text())
    assert "attention" in stages
    assert (run_copy / "attention.png").read_bytes()[:4] == b"\x89PNG"
