"""Model-backed: a dataset with a question column only is studied end to end with semantic-entropy
probes (20 questions, 3 samples each, answers of 12 tokens at most), and the run folder says that no
correctness AUC exists."""

import json

import numpy as np
import pandas as pd
import pytest

from truthmap.cli import app

pytestmark = pytest.mark.model
EASY = [f"On which continent is {c} located?" for c in ("France", "Germany", "Italy", "Spain", "Kenya", "Brazil",
                                                         "China", "Japan", "Egypt", "Canada")]
HARD = [f"What is the capital of {c}?" for c in ("East Timor", "Burkina Faso", "Vanuatu", "Eswatini", "Tuvalu",
                                                  "Comoros", "Palau", "Kiribati", "Nauru", "Djibouti")]
POSITIONS = ["last_q", "-1", "-2"]


def test_a_question_only_dataset_runs_end_to_end_with_entropy_probes(tmp_path):
    source = tmp_path / "questions.csv"
    pd.DataFrame({"question": EASY + HARD}).to_csv(source, index=False)
    out = tmp_path / "run"
    app(["run", "--dataset", str(source), "--out", str(out), "--samples", "3", "--sample-temperature", "0.7",
         "--seeds", "0", "--positions", *POSITIONS, "--min-per-class", "2", "--extractor-model", "none",
         "--bootstrap", "50", "--max-new-tokens", "12", "--quiet"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == "none" and "no correctness AUC" in summary["no_correctness_auc"]
    answers = pd.read_parquet(out / "answers.parquet")
    assert len(answers) == 20 and answers["correct"].isna().all()
    # nothing that needs a correctness label was made
    for name in ("probe_results.csv", "heatmap.png", "baseline_results.csv", "report.html"):
        assert not (out / name).exists(), name

    resamples = pd.read_parquet(out / "resamples.parquet")
    assert (resamples.groupby("id").size() == 3).all() and set(resamples["id"]) == set(answers["id"])
    for ids, logprobs in zip(resamples["answer_ids"], resamples["token_logprobs"]):
        assert 0 < len(logprobs) <= len(ids) <= 12 and np.all(np.asarray(logprobs) <= 0)  # the run's length too
    assert summary["sampling"]["generated_samples"] == 60 and summary["sampling"]["judge_calls"] == 0

    scores = pd.read_parquet(out / "sampling_scores.parquet")
    assert scores["semantic_entropy"].between(0, np.log(3) + 1e-9).all()
    assert (scores["n_clusters"] >= 1).all() and (scores["n_clusters"] <= 3).all()

    results = pd.read_csv(out / "entropy_probe_results.csv", dtype={"position": str})
    assert set(results["target"]) == {"high_entropy"}  # no gold answers: agreement with entropy only
    assert len(results) == 31 * len(POSITIONS) and set(results["position"]) == set(POSITIONS)
    assert (out / "heatmap_entropy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entropy = summary["entropy_probe"]
    assert entropy["labelled"] is False and entropy["best_cell"] is None
    assert entropy["best_cell_label_free"]["position"] in POSITIONS
