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
    from truthmap.stages.probe import auc_score

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
