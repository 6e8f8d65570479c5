"""Model-backed: one whole study on built-in questions, and the run folder contract it leaves."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

import truthmap
from truthmap.cli import app
from truthmap.positions import DEFAULT_POSITIONS
from truthmap.metrics import mean_over_seeds

pytestmark = pytest.mark.model
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def study(small_study, small_study_settings):
    assert small_study_settings["limit"] == 80 and small_study_settings["seeds"] == SEEDS  # what the tests expect
    return small_study


def test_auc_table(study):
    out, table = study
    table = table[table.site != "baseline"]  # the baselines' rows are checked in test_analyses.py
    assert list(table.columns) == ["site", "layer", "position", "seed", "auc", "auc_lo", "auc_hi", "accuracy",
                                   "n_train", "n_test", "val_auc", "n_val", "within_auc", "within_val_auc",
                                   "mean_auc_lo", "mean_auc_hi", "val_auc_se", "seed_sd"]
    assert len(table) == 31 * len(DEFAULT_POSITIONS) * len(SEEDS)
    assert set(table.layer) == set(range(31)) and set(table.position) == set(DEFAULT_POSITIONS)
    scored = table.dropna(subset=["auc"])
    assert len(scored) > 0.8 * len(table)
    assert ((scored.auc_lo <= scored.auc + 1e-9) & (scored.auc <= scored.auc_hi + 1e-9)).all()
    # the embedding of the last prompt token is the same token for every question: nothing to learn
    assert table[(table.layer == 0) & (table.position == "last_q")].auc.max() == pytest.approx(0.5, abs=0.05)


def test_run_folder_contract(study):
    out, _ = study
    for name in ("answers.parquet", "splits.json", "probe_results.csv", "heatmap.png", "heatmap.svg",
                 "summary.json", "activations/index.json", "report.html"):
        assert (out / name).is_file(), name
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = pd.read_parquet(out / "answers.parquet")
    for column in ["id", "question", "gold", "prompt", "answer", "correct", "exact_answer", "exact_answer_valid",
                   "exact_answer_reason", "split"] + [f"pos_{p}" for p in DEFAULT_POSITIONS]:
        assert column in answers.columns, column
    assert len(answers) == 80 and answers.id.is_unique
    assert 0 < answers.correct.mean() < 1
    valid = answers[answers.exact_answer_valid]
    assert all(a[s:e] == x for a, s, e, x in zip(valid.answer, valid.exact_answer_start, valid.exact_answer_end,
                                                  valid.exact_answer))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "dataset", "n", "accuracy", "valid_exact_answer_rate", "best_cell", "top_cells",
                "stage_seconds", "versions", "families"):
        assert key in summary, key
    assert summary["n"] == 80 and len(summary["top_cells"]) == 5
    assert summary["model_revision"].startswith("sha256:")  # the embedded GGUF file's
    best, means = summary["best_cell"], mean_over_seeds(pd.read_csv(out / "probe_results.csv",
                                                                                  dtype={"position": str}))
    probes = means[means.site == "residual"]
    assert best["val_auc"] == pytest.approx(probes.val_auc.max(), abs=1e-4)  # chosen on validation
    assert best["auc"] == pytest.approx(probes.set_index(["layer", "position"]).loc[(best["layer"], best["position"]), "auc"], abs=1e-4)
    assert summary["best_on_test"]["auc"] == pytest.approx(probes.auc.max(), abs=1e-4)
    # one population: every column of a layer and seed scored the same test answers, the baselines too
    population = answers[answers.split != ""]
    assert summary["population"]["n"] == len(population) == len(answers) - summary["population"]["left_out"]
    assert population.exact_answer_valid.all()
    scores = pd.read_parquet(out / "probe_scores.parquet")
    scored = scores.groupby(["layer", "seed", "position"]).id.apply(frozenset)
    assert scored.groupby(level=["layer", "seed"]).nunique().eq(1).all()
    for seed in (0, 1):
        assert set(scores[scores.seed == seed].id) == set(json.loads((out / "splits.json").read_text())["seeds"][str(seed)]["test"])
    results = pd.read_csv(out / "probe_results.csv", dtype={"position": str})
    baselines = pd.read_csv(out / "baseline_results.csv", dtype={"position": str})
    assert results.groupby("seed").n_test.nunique().eq(1).all()
    assert (baselines[baselines.position == "logprob_mean"].set_index("seed").n_test
            == results.groupby("seed").n_test.first()).all()
    assert (out / "heatmap_within.png").is_file()
    assert set(summary["stage_seconds"]) == {"generate", "label", "extract", "probe", "wholemap", "baselines", "cost",
                                             "plot", "report"}
    # every method against its extra cost: p(True) runs its prompts, the probes run nothing more
    methods = {m["method"]: m for m in summary["cost"]["methods"]}
    assert methods["p_true_exact"]["forward_tokens"] > 10 and methods["whole_map"]["forward_tokens"] == 0
    assert summary["cost"]["pareto"] and (out / "cost.png").is_file()
    # the whole map as one probe beside the best cell, and every cell under the permutation null
    assert summary["whole_map"]["paired"]["n_test"] > 0 and summary["whole_map"]["against"] == summary["best_cell"]
    assert summary["cell_null"]["cells"] == len(means) == len(pd.read_csv(out / "cell_null.csv"))
    splits = json.loads((out / "splits.json").read_text())
    assert set(splits["seeds"]) == {"0", "1"}
    assert set(answers.id[answers.split == "test"]) == set(splits["seeds"]["0"]["test"])


def test_load_features_refits_to_the_same_auc(study):
    out, table = study
    answers = pd.read_parquet(out / "answers.parquet").set_index("id")
    splits = json.loads((out / "splits.json").read_text())["seeds"]["0"]
    for layer, position in [(15, "exact_answer_last"), (20, "-1")]:
        ids, X = truthmap.load_features(out, "residual", layer, position)
        assert X.dtype == np.float32 and X.shape[1] == 576 and len(ids) == len(X)
        y = (~answers.loc[ids, "correct"].to_numpy()).astype(int)
        train = np.isin(ids, splits["train"])
        test = np.isin(ids, splits["test"])
        scaler = StandardScaler().fit(X[train])
        clf = LogisticRegression(max_iter=5000).fit(scaler.transform(X[train]), y[train])
        auc = roc_auc_score(y[test], clf.predict_proba(scaler.transform(X[test]))[:, 1])
        ours = table[(table.layer == layer) & (table.position == position) & (table.seed == 0)].auc.item()
        assert abs(auc - ours) < 0.01


def test_rerun_skips_unchanged_stages_and_plot_command_works(study, small_study_settings):
    out, _ = study
    before = json.loads((out / "stages.json").read_text())
    truthmap.run(out=str(out), **small_study_settings)
    assert json.loads((out / "stages.json").read_text()) == before  # nothing reran
    (out / "heatmap.png").unlink()
    app(["plot", "--out", str(out), "--quiet"])
    assert (out / "heatmap.png").is_file()
    assert json.loads((out / "stages.json").read_text())["probe"] == before["probe"]


def test_every_answer_wrong_is_a_clear_error(tmp_path, capsys, default_model):
    data = tmp_path / "impossible.csv"
    # 20 questions, 2 per class: a file big enough for its split (a smaller one is refused before generation)
    data.write_text("question,answer\n" + "".join(f"What is {i} plus {i}?,zzqxv\n" for i in range(20)))
    with pytest.raises(SystemExit) as exit_:
        app(["run", "--dataset", str(data), "--out", str(tmp_path / "run"), "--min-per-class", "2", "--quiet"])
    assert exit_.value.code == 2
    assert "every one of the 20 answers is wrong" in capsys.readouterr().err
    assert (tmp_path / "run" / "answers.parquet").is_file()  # the graded answers are kept


def test_unknown_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        app(["generate", "--model", "no-such-org/no-such-model", "--limit", "3", "--out", str(tmp_path), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'no-such-org/no-such-model': could not be loaded") and "Traceback" not in err
