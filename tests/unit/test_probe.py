import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from truthmap.probe import BatchedLogisticRegression, auc_score, bootstrap_counts


def synthetic(n=400, d=24, cells=3, seed=0):
    """Cells share a label; each sees it through its own noisy projection, with offsets and odd scales."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    y = (latent[:, 0] + 0.8 * rng.normal(size=n) > 0.3).astype(int)
    X = np.stack([
        (latent @ rng.normal(size=(4, d)) + rng.normal(size=(n, d))) * rng.uniform(0.1, 30, size=d) + 40
        for _ in range(cells)
    ]).astype(np.float32)
    return X, y


def test_matches_scikit_learn_per_cell_and_seed():
    X, y = synthetic()
    n_seeds = 2
    train = np.zeros((X.shape[0], n_seeds, X.shape[1]), bool)
    for s in range(n_seeds):
        train[:, s, np.random.default_rng(s).permutation(X.shape[1])[:280]] = True
    train[1, :, :50] = False  # a cell with invalid rows: they are in no split
    model = BatchedLogisticRegression(C=1.0).fit(torch.tensor(X), torch.tensor(y), torch.tensor(train))
    proba = model.predict_proba(torch.tensor(X)).numpy()
    for c in range(X.shape[0]):
        for s in range(n_seeds):
            tr, te = train[c, s], ~train[:, s].any(0)
            if c == 1:
                te = te & (np.arange(X.shape[1]) >= 50)
            scaler = StandardScaler().fit(X[c][tr])
            reference = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(scaler.transform(X[c][tr]), y[tr])
            ref_auc = roc_auc_score(y[te], reference.predict_proba(scaler.transform(X[c][te]))[:, 1])
            our_auc = roc_auc_score(y[te], proba[c, s, te])
            assert abs(ref_auc - our_auc) < 0.01
            # same solution, not just the same ranking: raw-unit weights agree closely
            ref_coef = reference.coef_[0] / scaler.scale_
            assert np.abs(model.coef_[c, s].numpy() - ref_coef).max() < 0.05 * np.abs(ref_coef).max()


def test_learns_the_positive_class_direction():
    X, y = synthetic(cells=1)
    train = np.ones((1, 1, X.shape[1]), bool)
    model = BatchedLogisticRegression().fit(torch.tensor(X), torch.tensor(y), torch.tensor(train))
    p = model.predict_proba(torch.tensor(X)).numpy()[0, 0]
    assert p[y == 1].mean() > p[y == 0].mean() + 0.2


def test_auc_score_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.integers(0, 2, size=200)
    assert auc_score(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_weighted_auc_equals_auc_of_resampled_rows():
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=60), rng.integers(0, 2, size=60)
    counts = bootstrap_counts(60, 5, seed=0)
    for row, weights in zip(auc_score(scores, labels, counts), counts):
        index = np.repeat(np.arange(60), weights)
        assert row == pytest.approx(roc_auc_score(labels[index], scores[index]))
    assert (counts.sum(1) == 60).all()


def test_split_sizes_name_the_short_class_and_honour_min_per_class():
    from truthmap.errors import TruthmapError
    from truthmap.probe import check_split_sizes

    ids = [f"q{i}" for i in range(40)]
    labels = np.array([1] * 34 + [0] * 6)  # 6 right answers: 4 in train, 2 in test
    splits = {"seeds": {"0": {"train": ids[:28] + ids[34:38], "test": ids[28:34] + ids[38:]}}}
    with pytest.raises(TruthmapError, match=r"seed 0, train split: only 4 right answers \(need at least 10\)"):
        check_split_sizes(labels, splits, ids)
    with pytest.raises(TruthmapError, match=r"test split: only 2 right answers \(need at least 3\)"):
        check_split_sizes(labels, splits, ids, min_per_class=3)
    check_split_sizes(labels, splits, ids, min_per_class=2)
    with pytest.raises(TruthmapError, match=r"test split: only 1 right answer \(need at least 2\)"):
        check_split_sizes(np.r_[labels[:-1], 1], splits, ids, min_per_class=2)


def test_min_per_class_below_two_is_refused():
    from truthmap.config import Config
    from truthmap.errors import TruthmapError

    with pytest.raises(TruthmapError, match="min_per_class 1"):
        Config(min_per_class=1).validate()


def _scores_table(signal_cells: dict, n_cells: int = 200, n: int = 120, seeds=(0, 1), seed: int = 0):
    """probe_scores-like rows: ``n_cells`` cells of pure noise, plus cells whose score carries the label."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    ids = [f"q{i}" for i in range(n)]
    wrong = rng.random(n) < 0.4
    rows = []
    for s in seeds:
        for c in range(n_cells):
            strength = signal_cells.get(c, 0.0)
            score = rng.normal(size=n) + strength * wrong
            rows.append(pd.DataFrame({"site": "residual", "layer": c, "position": "last_q", "seed": s,
                                      "id": ids, "score": score}))
    return pd.concat(rows, ignore_index=True), dict(zip(ids, wrong))


def test_heldout_best_auc_removes_the_winners_curse():
    from truthmap.probe import heldout_best_auc

    scores, error_of = _scores_table({})  # nothing to find
    y = np.array(list(error_of.values()))
    per_cell = scores.groupby(["seed", "layer"]).score.apply(lambda s: auc_score(s.to_numpy(), y)).groupby("layer").mean()
    assert per_cell.max() > 0.58  # the best of 200 noise cells looks like a finding
    heldout = heldout_best_auc(scores, error_of)
    assert abs(heldout["auc"] - 0.5) < 0.04 and heldout["n"] == 2 * 10 * 2

    scores, error_of = _scores_table({17: 1.5})  # one cell knows
    heldout = heldout_best_auc(scores, error_of)
    assert heldout["most_chosen"]["layer"] == 17 and heldout["most_chosen"]["share"] > 0.9
    assert 0.75 < heldout["auc"] < 0.95
