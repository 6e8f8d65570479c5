"""Every method's test AUC against its extra cost beyond answering (analyses/cost.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from truthmap.analyses import cost

from _synthetic import make_run, seal


def test_pareto_front_keeps_only_undominated_methods():
    auc = np.array([0.70, 0.80, 0.75, 0.80, np.nan, 0.90])
    tokens = np.array([0.0, 0.0, 50.0, 10.0, 0.0, 300.0])
    # 0.80 at 0 tokens dominates 0.70 at 0, 0.75 at 50 and 0.80 at 10 (same AUC, more tokens); 0.90 costs more
    assert cost.pareto_front(auc, tokens).tolist() == [False, True, False, False, False, True]


def _rows(position, auc, seeds=(0, 1)):
    return [{"site": "baseline", "layer": -1, "position": position, "seed": s, "auc": auc, "auc_lo": auc - 0.05,
             "auc_hi": auc + 0.05, "val_auc": auc, "n_train": 0, "n_test": 40} for s in seeds]


def test_the_cost_table_reads_the_runs_timings_and_tokens(tmp_path):
    folder = make_run(tmp_path / "run", n=100)
    answers = pd.read_parquet(folder / "answers.parquet")
    answers["split"] = "train"
    answers.to_parquet(folder / "answers.parquet", index=False)
    probes = [{"site": "residual", "layer": 1, "position": "-1", "seed": s, "auc": 0.9, "auc_lo": 0.85,
               "auc_hi": 0.95, "val_auc": 0.9, "n_train": 50, "n_test": 30} for s in (0, 1)]
    pd.DataFrame(probes).to_csv(folder / "probe_results.csv", index=False)
    pd.DataFrame(_rows("logprob_mean", 0.6) + _rows("p_true_exact", 0.7) + _rows("family_rate", 0.55)
                 + _rows("semantic_entropy", 0.65) + _rows("semantic_entropy_prob", 0.66)
                 ).to_csv(folder / "baseline_results.csv", index=False)
    # five samples of three tokens per question, after a prompt of six (make_run's)
    pd.DataFrame({"id": np.repeat(answers["id"], 5), "sample": np.tile(range(5), len(answers)),
                  "answer_ids": [[1, 2, 3]] * (5 * len(answers))}).to_parquet(folder / "resamples.parquet", index=False)
    pd.DataFrame(_rows("whole_map", 0.92)).to_csv(folder / "wholemap_results.csv", index=False)
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(best_cell={"site": "residual", "layer": 1, "position": "-1"},
                   stage_seconds={"generate": 50.0, "extract": 2.0, "probe": 8.0, "wholemap": 10.0},
                   baseline_seconds={"token_statistics": 0.5, "p_true": 30.0},
                   baseline_forward_tokens={"token_statistics": 0, "p_true_exact": 4500},
                   extract={"mode": "onepass", "read_again": 0},
                   grader_judge={"calls": 100, "forward_tokens": 12000, "seconds": 20.0, "model": "m"},
                   sampling={"n": 5, "seconds_per_question": {"sampling": 1.0, "labels_and_logprobs": 0.5, "judge": 0.0}})
    (folder / "summary.json").write_text(json.dumps(summary))
    seal(folder)
    table = cost.cost_table(folder).set_index("method")
    answering = (answers["n_prompt_tokens"] + answers["n_answer_tokens"]).mean()
    assert table.loc["answering", "forward_tokens"] == pytest.approx(answering)
    assert table.loc["answering", "seconds"] == pytest.approx(0.5)
    assert table.loc["p_true_exact", "forward_tokens"] == pytest.approx(45.0)  # 4500 tokens over 100 answers
    assert table.loc["p_true_exact", "seconds"] == pytest.approx(0.3)
    assert table.loc["probe residual L1 -1", "forward_tokens"] == 0
    assert table.loc["probe residual L1 -1", "seconds"] == pytest.approx(0.1)  # extract + probe
    assert table.loc["whole_map", "seconds"] == pytest.approx(0.2)
    assert table.loc["logprob_mean", "forward_tokens"] == 0 and table.loc["family_rate", "seconds"] == 0
    assert table.loc["semantic_entropy", "forward_tokens"] == pytest.approx(45.0)  # 5 × (6 + 3)
    assert table.loc["semantic_entropy_prob", "forward_tokens"] == pytest.approx(90.0)  # and the log-prob pass
    assert table.loc["semantic_entropy", "seconds"] == pytest.approx(1.5)
    # the lenient grader's judge: a cost of grading, per answer, with no AUC (never on the front)
    assert table.loc["lenient grader", "forward_tokens"] == pytest.approx(120.0)
    assert table.loc["lenient grader", "seconds"] == pytest.approx(0.2) and np.isnan(table.loc["lenient grader", "auc"])
    # the whole map has the best AUC at no extra tokens: it alone is the front (p(True) costs more, scores less)
    assert table.index[table["pareto"]].tolist() == ["whole_map"]
    cost.plot_cost(table.reset_index(), folder / "cost.png", "t")
    assert (folder / "cost.png").read_bytes()[:4] == b"\x89PNG"
    fields = cost.cost_summary(table.reset_index())
    assert fields["pareto"] == ["whole_map"] and json.dumps(fields)
    assert fields["methods"][0]["method"] == "answering" and fields["methods"][0]["auc"] is None
