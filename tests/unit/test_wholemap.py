"""The whole-map probe (stacking) and the per-cell permutation null (analyses/wholemap.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from truthmap.analyses import wholemap as wm
from truthmap.stages.probe import run_probe

from _synthetic import make_run, seal


def _parts(n: int, seeds: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random train (0.5) / validation (0.2) / test (0.3) parts; one test part shared by the seeds."""
    rng = np.random.default_rng(seed)
    test = np.zeros(n, bool)
    test[rng.permutation(n)[: int(0.3 * n)]] = True
    parts = {name: np.zeros((seeds, n), bool) for name in ("train", "validation", "test")}
    for s in range(seeds):
        rest = rng.permutation(np.flatnonzero(~test))
        parts["validation"][s, rest[: int(0.2 * n)]] = True
        parts["train"][s, rest[int(0.2 * n):]] = True
        parts["test"][s] = test
    return parts


def test_ridge_cells_match_scikit_learn_and_leave_one_out():
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    n, d = 80, 6
    X = rng.normal(size=(2, n, d)).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.int64)
    train = np.zeros(n, bool)
    train[:50] = True
    evaluate = np.arange(50, n)
    scores, operator, rows = wm.ridge_cells(torch.as_tensor(X), y, np.stack([train, train]), evaluate, alpha=4.0)
    scaler = StandardScaler().fit(X[1][train])
    fitted = Ridge(alpha=4.0).fit(scaler.transform(X[1][train]), y[train]).predict(scaler.transform(X[1]))
    np.testing.assert_allclose(scores[1, evaluate], fitted[evaluate], atol=1e-4)
    # the operator maps the train labels to the same scores, up to the constant mean label
    np.testing.assert_allclose(operator[1].numpy() @ y[rows] + y[train].mean(), fitted[evaluate], atol=1e-4)
    # a train row's score is the fit without it (standardisation kept)
    keep = train.copy()
    keep[7] = False
    without = Ridge(alpha=4.0).fit(scaler.transform(X[1][keep]), y[keep]).predict(scaler.transform(X[1][7:8]))[0]
    assert scores[1, 7] == pytest.approx(without, abs=1e-4)
    assert abs(scores[1, 7] - fitted[7]) > 1e-3  # and not the in-sample fit


def test_permutations_stay_within_blocks():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    blocks = np.array([0, 0, 0, 0, 1, 1, -1, -1])
    out = wm.permutations(y, blocks, 50)
    assert (out[:, :4].sum(1) == 2).all() and (out[:, 4:6].sum(1) == 1).all()
    assert (out[:, 6:] == 0).all()  # a negative block keeps its labels
    assert len({tuple(row) for row in out[:, :4]}) > 1


def test_permutations_move_related_questions_together():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 2)  # thirty pairs of related questions whose labels agree
    y = np.repeat(rng.random(30) < 0.5, 2).astype(np.int64)
    blocks = np.zeros(60, int)
    whole = wm.permutations(y, blocks, 40, groups=groups)
    assert (whole[:, ::2] == whole[:, 1::2]).all()  # every pair still agrees
    assert (whole.sum(1) == y.sum()).all() and len({tuple(r) for r in whole}) > 30
    single = wm.permutations(y, blocks, 40)  # answer by answer, pairs split up
    assert (single[:, ::2] != single[:, 1::2]).any()
    # a group split by blocks is a unit per block; a unit without another of its size keeps its labels
    blocks = np.r_[np.zeros(59, int), 1]
    kept = wm.permutations(y, blocks, 20, groups=groups)
    assert (kept[:, 59] == y[59]).all()


def _probe(folder, n_boot: int):
    """Run the probe stage on a sealed synthetic run and seal its files (the wholemap stage reads them)."""
    results, scores = run_probe(folder, ["residual"], n_boot=n_boot, progress=False)
    results.to_csv(folder / "probe_results.csv", index=False)
    scores.to_parquet(folder / "probe_scores.parquet", index=False)
    return seal(folder)


def _write_run(folder, signal: np.ndarray, n: int = 400, d: int = 6, seed: int = 0):
    """A synthetic run folder whose cell (layer l, position p) carries ``signal[l, p]`` times the label
    in feature 0 (independent noise in every cell), with the probe stage's files."""
    layers = signal.shape[0]
    make_run(folder, n=n, d=d, layers=layers, seed=seed)
    answers = pd.read_parquet(folder / "answers.parquet")
    error = (~answers["correct"]).to_numpy()
    rng = np.random.default_rng(seed + 7)
    X = rng.normal(size=(layers, 2, n, d)).astype(np.float32)
    X[..., 0] += signal[..., None] * np.where(error, 1.0, -1.0)
    X[:, 1, :5] = 0
    np.save(folder / "activations" / "residual" / "shard-00000.npy", X.astype(np.float16))
    seal(folder)
    return _probe(folder, 300)


def test_signal_spread_over_many_weak_cells_is_found_by_the_whole_map(tmp_path):
    signal = np.full((8, 2), 0.25)  # 16 cells, each weak
    folder = _write_run(tmp_path / "spread", signal)
    results, scores, null, summary = wm.run_wholemap(folder, ["residual"], n_boot=300, n_permutations=0, progress=False)
    assert null["p"].isna().all() and len(null) == 16 and summary["cell_null"] is None  # no null asked for
    assert summary["graders"] is None  # one label only
    whole = summary["whole_map"]
    assert whole["against"] is not None
    paired = whole["paired"]
    assert paired["shown"] and paired["low"] > 0 and paired["diff"] > 0.05
    assert whole["auc"] > whole["against"]["auc"]
    assert set(results["site"]) == {wm.SITE} and len(results) == 2
    assert set(scores.columns) == set(wm.SCORE_COLUMNS)


def test_signal_in_one_cell_is_not_beaten_by_the_whole_map(tmp_path):
    signal = np.zeros((8, 2))
    signal[3, 1] = 1.0  # one strong cell, fifteen of noise
    folder = _write_run(tmp_path / "one", signal)
    _, _, _, summary = wm.run_wholemap(folder, ["residual"], n_boot=300, n_permutations=0, progress=False)
    whole = summary["whole_map"]
    assert (whole["against"]["layer"], whole["against"]["position"]) == (3, "-1")
    assert not whole["paired"]["shown"] and whole["paired"]["diff"] < 0.03


def _trial(rng, n=160, cells=10, d=4, planted: float = 0.0, B=99):
    y = (rng.random(n) < 0.4).astype(np.int64)
    X = rng.normal(size=(cells, n, d)).astype(np.float32)
    X[0, :, 0] += planted * np.where(y == 1, 1.0, -1.0)
    parts = _parts(n, seed=int(rng.integers(1 << 30)))
    evaluate = np.flatnonzero(parts["test"].any(0))
    permuted = wm.permutations(y, parts["test"][0].astype(int), B, seed=int(rng.integers(1 << 30)))
    _, observed, null, _ = wm.layer_pass(torch.as_tensor(X), np.ones((n, cells), bool), y, parts, evaluate, permuted, 4.0)
    keys = [("residual", 0, str(c)) for c in range(cells)]
    return wm.null_table(keys, observed.mean(0), null.mean(0), B)


def test_noise_flags_no_cell_at_the_stated_rate():
    rng = np.random.default_rng(5)
    trials = 40
    flagged = sum(int(_trial(rng)[1]["cells_beating_null"] > 0) for _ in range(trials))
    # family-wise 5%: 2 of 40 expected, 6 or more has probability 0.05 (uncorrected per-cell p: ~16)
    assert flagged <= 5


def test_a_planted_cell_is_flagged_and_the_noise_beside_it_is_not():
    table, summary = _trial(np.random.default_rng(3), planted=1.0)
    assert table.loc[0, "beats_null"] and table.loc[0, "p"] == pytest.approx(1 / 100)
    assert not table.loc[1:, "beats_null"].any()
    assert summary["beats_null"][0]["position"] == "0" and summary["p_resolution"] == 0.01


def test_stage_writes_the_null_of_every_cell(tmp_path):
    signal = np.zeros((4, 2))
    signal[2, 0] = 1.2
    folder = _write_run(tmp_path / "null", signal, n=240)
    _, _, table, summary = wm.run_wholemap(folder, ["residual"], n_boot=200, n_permutations=49, progress=False)
    assert len(table) == 8 and list(table.columns) == wm.NULL_COLUMNS
    flagged = table[table["beats_null"]]
    assert [(r.layer, r.position) for r in flagged.itertuples()] == [(2, "last_q")]
    assert summary["cell_null"]["cells_beating_null"] == 1 and summary["cell_null"]["permutations"] == 49
    json.dumps(summary)  # summary.json-ready


def test_the_heatmap_hatches_exactly_the_cells_below_the_null(tmp_path):
    from truthmap import runfolder as rf
    from truthmap.figures import new_figure
    from truthmap.stages.plot import cells_below_null, draw_heatmap

    folder = make_run(tmp_path / "run")
    assert cells_below_null(folder) is None  # no null computed: nothing hatched
    pd.DataFrame({"site": "residual", "layer": [0], "position": ["-1"], "ridge_auc": 0.6, "p": [np.nan],
                  "beats_null": [None]}).to_csv(folder / rf.CELL_NULL, index=False)
    seal(folder)
    assert cells_below_null(folder) is None  # --permutations 0: nothing hatched either
    pd.DataFrame({"site": "residual", "layer": [0, 1, 1], "position": ["last_q", "-1", "last_q"], "ridge_auc": 0.6,
                  "p": [0.5, 0.01, 0.2], "beats_null": [False, True, False]}).to_csv(folder / rf.CELL_NULL, index=False)
    seal(folder)
    below = cells_below_null(folder)
    assert below == {("residual", 0, "last_q"), ("residual", 1, "last_q")}
    fig, ax = new_figure()
    draw_heatmap(ax, np.full((3, 2), 0.7), [0, 1, 2], ["last_q", "-1"], "t",
                 hatched=[(layer, position) for _, layer, position in below])
    hatched = sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if p.get_hatch())
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert hatched == [(0.0, 0.0), (0.0, 1.0)]  # (column of last_q, rows of layers 0 and 1)


def test_graders_side_by_side_refit_the_probes_on_each_graders_labels(tmp_path):
    from sklearn.metrics import cohen_kappa_score

    folder = make_run(tmp_path / "graders", n=240)  # errors (correct = False) live in cell (1, "-1")
    answers = pd.read_parquet(folder / "answers.parquet")
    X = np.load(folder / "activations" / "residual" / "shard-00000.npy").astype(np.float32)
    answers["correct_alias"] = answers["correct"]
    # a strict grader whose labels another cell, (2, "last_q"), carries
    answers["correct_strict"] = X[2, 0, :, 1] < 0
    lenient = answers["correct"].astype(object)
    lenient[:3] = None  # not every answer graded: compared where graded, never probed
    answers["correct_lenient"] = lenient
    answers.to_parquet(folder / "answers.parquet", index=False)
    X[2, 0, :, 1] *= 3.0  # a clear signal for the strict labels
    np.save(folder / "activations" / "residual" / "shard-00000.npy", X.astype(np.float16))
    seal(folder)
    _probe(folder, 100)
    _, _, _, summary = wm.run_wholemap(folder, ["residual"], n_boot=100, n_permutations=0, progress=False)
    graders = summary["graders"]
    assert graders["columns"] == ["correct_alias", "correct_strict", "correct_lenient"]
    assert graders["ungraded"] == {"correct_lenient": 3}
    pair = next(p for p in graders["agreement"] if (p["a"], p["b"]) == ("correct_alias", "correct_strict"))
    alias, strict = answers["correct_alias"], answers["correct_strict"]
    assert pair["a_right_b_wrong"] == int((alias & ~strict).sum()) and pair["flips"] == int((alias != strict).sum())
    assert pair["kappa"] == pytest.approx(cohen_kappa_score(alias, strict), abs=1e-4)
    lenient_pair = next(p for p in graders["agreement"] if p["b"] == "correct_lenient" and p["a"] == "correct_alias")
    assert lenient_pair["n"] == 237 and lenient_pair["flips"] == 0 and lenient_pair["kappa"] == 1.0
    probes = {p["grader"]: p for p in graders["probes"]}
    assert set(probes) == {"correct_alias", "correct_strict"}
    assert (probes["correct_alias"]["layer"], probes["correct_alias"]["position"]) == (1, "-1")
    assert (probes["correct_strict"]["layer"], probes["correct_strict"]["position"]) == (2, "last_q")
    assert probes["correct_strict"]["auc"] > 0.8 and probes["correct_strict"]["auc_of_correct_cell"] < 0.65
    assert probes["correct_strict"]["correct_cell"] == {"site": "residual", "layer": 1, "position": "-1"}
    json.dumps(summary)


def test_the_stage_command_writes_the_files_and_prints_both_lines(tmp_path):
    from click.testing import CliRunner

    from truthmap.cli import cli

    signal = np.zeros((3, 2))
    signal[1, 1] = 1.5
    folder = _write_run(tmp_path / "cli", signal, n=200)
    answers = pd.read_parquet(folder / "answers.parquet")
    answers["correct_alias"] = answers["correct"]
    answers["correct_strict"] = answers["correct"] & (np.arange(len(answers)) % 10 != 0)  # stricter on 1 in 10
    flips = int((answers["correct_alias"] != answers["correct_strict"]).sum())
    answers.to_parquet(folder / "answers.parquet", index=False)
    seal(folder)
    result = CliRunner().invoke(cli, ["wholemap", "--out", str(folder), "--model", "tiny-model", "--quiet",
                                      "--permutations", "19", "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # the terminal's width wraps lines
    assert "whole map as one probe: test AUC" in output
    assert "cells above the label-permutation null (max over cells, 19 permutations, p ≤ 0.05): 1 of 6" in output
    right = answers.set_index("id")  # the graders line: each one's share right, the flips, the cell each chooses
    assert f"graders (share right): alias {right['correct_alias'].mean():.1%}, strict" in output
    assert f"labels that flip: alias·strict {flips} (κ" in output and "the cell each chooses: alias L1 -1" in output
    for name in ("wholemap_results.csv", "wholemap_scores.parquet", "cell_null.csv"):
        assert (folder / name).is_file()
    assert set(json.loads((folder / "manifest.json").read_text())["files"]) >= {"cell_null.csv", "wholemap_results.csv"}


def test_the_report_carries_the_whole_map_the_null_graders_and_cost(tmp_path):
    from test_report import page_data

    from truthmap.stages.report import write_report

    signal = np.zeros((3, 2))
    signal[1, 1] = 1.5
    folder = _write_run(tmp_path / "report", signal, n=200)
    _, _, _, fields = wm.run_wholemap(folder, ["residual"], n_boot=100, n_permutations=19, progress=False)
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(json.loads(json.dumps(fields)), cost={"methods": [{"method": "whole_map", "auc": 0.9,
                                                                      "forward_tokens": 0.0, "seconds": 0.1,
                                                                      "pareto": True}], "pareto": ["whole_map"]})
    (folder / "summary.json").write_text(json.dumps(summary))
    seal(folder)
    run = page_data(write_report([folder], tmp_path / "r.html"))["runs"][0]
    assert run["summary"]["whole_map"]["paired"] == fields["whole_map"]["paired"]
    assert run["summary"]["cell_null"]["cells_beating_null"] == fields["cell_null"]["cells_beating_null"]
    assert run["summary"]["cost"]["pareto"] == ["whole_map"]


def test_a_grader_without_both_classes_in_validation_is_noted_not_probed(tmp_path):
    folder = make_run(tmp_path / "onesided", n=160)
    answers = pd.read_parquet(folder / "answers.parquet")
    answers["correct_alias"] = answers["correct"]
    answers["correct_strict"] = True  # a grader that calls every answer right
    answers.to_parquet(folder / "answers.parquet", index=False)
    seal(folder)
    _probe(folder, 50)
    _, _, _, summary = wm.run_wholemap(folder, ["residual"], n_boot=50, n_permutations=0, progress=False)
    probes = {p["grader"]: p for p in summary["graders"]["probes"]}
    assert "note" in probes["correct_strict"] and "layer" in probes["correct_alias"]
    assert summary["graders"]["accuracy"]["correct_strict"] == 1.0
