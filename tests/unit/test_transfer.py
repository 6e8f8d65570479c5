import json

import numpy as np
import pandas as pd
import pytest

from _synthetic import make_run
from truthmap import TruthmapError
from truthmap.analyses.transfer import matrix, resolve_run, run_transfer, transfer_table


def test_matrix_diagonal_is_in_task_and_reversed_task_transfers_below_chance(tmp_path):
    a = make_run(tmp_path / "a", dataset="alpha", seed=0)
    b = make_run(tmp_path / "b", dataset="beta", seed=1)
    c = make_run(tmp_path / "c", dataset="gamma", seed=2, direction=-1.0)
    table = transfer_table([a, b], [c], site="residual", layer=1, position="-1", n_boot=100)
    assert set(table.seed) == {0, 1} and len(table) == 2 * 3 * 2
    grid = matrix(table)
    assert list(grid.index) == ["alpha", "beta"] and list(grid.columns) == ["alpha", "beta", "gamma"]
    assert grid.loc["alpha", "alpha"] > 0.85 and grid.loc["alpha", "beta"] > 0.85
    assert grid.loc["beta", "gamma"] < 0.15  # the signal points the other way there
    assert (table.auc_lo <= table.auc + 1e-9).all() and (table.auc <= table.auc_hi + 1e-9).all()


def test_in_task_cell_matches_the_detector_on_the_same_split(tmp_path):
    from truthmap.analyses.detector import fit_cell
    from truthmap.metrics import auc_score

    a = make_run(tmp_path / "a", dataset="alpha")
    table = transfer_table([a], [], site="residual", layer=1, position="-1", n_boot=50)
    detector, _, X, y = fit_cell(a, "residual", 1, "-1", seed=0)
    assert table[table.seed == 0].auc.item() == pytest.approx(auc_score(detector.predict_proba(X)[:, 1], y))


def test_outputs_and_errors(tmp_path):
    a = make_run(tmp_path / "a", dataset="alpha")
    b = make_run(tmp_path / "b", dataset="beta", model="other-model")
    with pytest.raises(TruthmapError, match="runs of one model"):
        run_transfer([str(a)], [str(b)], site="residual", layer=1, position="-1", out=str(tmp_path / "t"), n_boot=10)
    with pytest.raises(TruthmapError, match="neither a run folder nor a task"):
        resolve_run(str(tmp_path / "nothing"))
    c = make_run(tmp_path / "c", dataset="gamma")
    out, grid = run_transfer([str(a)], [str(c)], site="residual", layer=1, position="-1", out=str(tmp_path / "t"), n_boot=10)
    assert {p.name for p in out.iterdir()} >= {"transfer.csv", "transfer_matrix.csv", "transfer.png"}
    saved = pd.read_csv(out / "transfer_matrix.csv", index_col=0)
    assert np.allclose(saved.to_numpy(), grid.to_numpy(), equal_nan=True)


def test_questions_the_train_run_holds_are_left_out_of_the_test_side(tmp_path):
    """Two runs of one dataset whose questions 60-119 overlap: transferring a -> b tests only b's answers
    to questions a does not hold, and says how many it left out; the diagonal leaves out none."""
    a = make_run(tmp_path / "a", dataset="alpha", seed=0)
    b = make_run(tmp_path / "b", dataset="alpha", seed=1, first_question=60)
    table = transfer_table([a], [b], site="residual", layer=1, position="-1", n_boot=50)
    splits = json.loads((b / "splits.json").read_text())["seeds"]["0"]
    valid = {f"alpha-{60 + i}" for i in range(5, 120)}  # b's first 5 answers lack position -1
    test = set(splits["test"]) & valid
    own_questions = {i for i in test if int(i.split("-")[1]) >= 120}  # questions 120-179: only b has them
    row = table[(table.test == "alpha (b)") & (table.seed == 0)].iloc[0]
    assert row.n_test == len(own_questions) and row.n_shared == len(test - own_questions) > 0
    diagonal = table[(table.test == "alpha (a)") & (table.seed == 0)].iloc[0]
    assert diagonal.n_shared == 0 and diagonal.n_test == len(set(json.loads((a / "splits.json").read_text())
                                                                    ["seeds"]["0"]["test"]) - {f"alpha-{i}" for i in range(5)})


def test_a_facts_group_key_counts_as_a_shared_question():
    from truthmap.analyses.transfer import shared_with

    train = pd.DataFrame({"id": ["capital-FR"], "question": ["What is the capital of France?"], "task": ["facts"]})
    test = pd.DataFrame({"id": ["currency-FR", "currency-DE", "x"], "task": ["facts", "facts", "generic"],
                         "question": ["What is the currency of France?", "What is the currency of Germany?",
                                      "what is the capital of FRANCE"]})
    assert shared_with(test, train).tolist() == [True, False, True]


def test_the_bootstrap_draws_groups_of_answers_not_single_answers(tmp_path):
    """Every question asked 4 times (copies; the synthetic splits are not grouped, so the test part holds
    about 1.6 of each): the cluster bootstrap's interval is wider than one that resamples single answers
    (which treats the copies as independent)."""
    from truthmap.analyses.detector import fit_cell
    from truthmap.metrics import auc_score, bootstrap_counts

    a = make_run(tmp_path / "a", dataset="alpha", n=400, repeat=4, direction=0.4)
    row = transfer_table([a], [], site="residual", layer=1, position="-1", n_boot=400).query("seed == 0").iloc[0]
    assert row.n_test_groups < 0.75 * row.n_test  # copies share a group
    detector, _, X, y = fit_cell(a, "residual", 1, "-1", seed=0)
    p = detector.predict_proba(X)[:, 1]
    lo, hi = np.nanpercentile(auc_score(p, y, bootstrap_counts(len(p), 400, 0)), [2.5, 97.5])
    assert row.auc_hi - row.auc_lo > 1.15 * (hi - lo)


def test_each_run_is_verified_on_its_own_manifest_and_all_are_released(tmp_path):
    """Transfer holds both runs open at once: the test run's altered activations, read while the train run
    is open too, are checked against the test run's own manifest and refused; every run is released
    after, whether the transfer ended well or not."""
    from truthmap import runfolder as rf

    a = make_run(tmp_path / "a", dataset="alpha", seed=0)
    b = make_run(tmp_path / "b", dataset="beta", seed=1)
    shard = b / "activations" / "residual" / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TruthmapError, match=r"b/activations/residual/shard-00000.npy: damaged"):
        transfer_table([a], [b], site="residual", layer=1, position="-1", n_boot=10)
    assert not rf.open_runs()
    with rf.Run.open(a) as held:  # a run this process writes is read through the same Run, not reopened
        table = transfer_table([a], [], site="residual", layer=1, position="-1", n_boot=10)
        assert rf.open_runs() == (held,) and len(table) == 2
    assert not rf.open_runs()
