import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from truthmap.metrics import auc_score, bootstrap_counts
from truthmap.logistic import BatchedLogisticRegression


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


@pytest.mark.parametrize("low_rank", [False, True])
def test_matches_scikit_learn_per_cell_and_seed(low_rank):
    X, y = synthetic()
    n_seeds = 2
    train = np.zeros((X.shape[0], n_seeds, X.shape[1]), bool)
    for s in range(n_seeds):
        train[:, s, np.random.default_rng(s).permutation(X.shape[1])[:280]] = True
    train[1, :, :50] = False  # a cell with invalid rows: they are in no split
    model = BatchedLogisticRegression(C=1.0, low_rank=low_rank).fit(torch.tensor(X), torch.tensor(y), torch.tensor(train))
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


def test_fewer_answers_than_half_the_dimensions_whiten_by_a_low_rank_update(monkeypatch):
    """40 answers, 300 features: the whitening is λ^-½·I plus a rank-40 update (no 300 × 300 matrix is
    factorised); the probe is the one the Cholesky whitening reaches, and scikit-learn's."""
    X, y = synthetic(n=40, d=300, cells=2, seed=5)
    train = np.zeros((2, 2, 40), bool)
    train[:, 0, :30], train[:, 1, 10:] = True, True
    args = torch.tensor(X), torch.tensor(y), torch.tensor(train)
    cholesky = BatchedLogisticRegression(low_rank=False).fit(*args)
    monkeypatch.setattr(BatchedLogisticRegression, "_whitening",
                        staticmethod(lambda *_: pytest.fail("the automatic choice factorised a d × d matrix")))
    auto = BatchedLogisticRegression().fit(*args)
    assert auto.n_iter_ < auto.max_iter and cholesky.n_iter_ < cholesky.max_iter
    p_auto, p_chol = auto.predict_proba(args[0]).numpy(), cholesky.predict_proba(args[0]).numpy()
    assert np.abs(p_auto - p_chol).max() < 0.02
    for c in range(2):
        for s in range(2):
            rows = train[c, s]
            scaler = StandardScaler().fit(X[c][rows])
            reference = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(scaler.transform(X[c][rows]), y[rows])
            ref = reference.predict_proba(scaler.transform(X[c]))[:, 1]
            assert np.abs(p_auto[c, s] - ref).max() < 0.02


def one_token_cell(n=200, d=24, seed=0):
    """Features of a position where most answers have the same token (layer 0: the token's embedding):
    134 train rows of one vector, 6 of another that differs by 1e-5 to 0.1 per feature, and 60 rows of a
    third that are in no train part. Their correlation in float32 is not positive definite."""
    rng = np.random.default_rng(seed)
    first = 0.05 * rng.normal(size=d)
    second = first + np.logspace(-5, -1, d) * rng.choice([-1, 1], size=d)
    third = 0.05 * rng.normal(size=d)
    X = np.concatenate([np.tile(first, (134, 1)), np.tile(second, (6, 1)), np.tile(third, (n - 140, 1))])
    y = np.r_[np.zeros(130), np.ones(4), np.ones(6), rng.integers(0, 2, n - 140)].astype(int)
    return X.astype(np.float32), y


def test_a_position_where_most_answers_have_one_token_is_still_fitted():
    degenerate, y = one_token_cell(d=96)
    plain, _ = synthetic(n=200, d=96, cells=1)
    X = np.concatenate([plain, degenerate[None]])
    train = np.zeros((2, 1, 200), bool)
    train[:, :, :140] = True
    model = BatchedLogisticRegression().fit(torch.tensor(X), torch.tensor(y), torch.tensor(train))
    assert torch.isfinite(model.coef_).all() and model.n_iter_ < model.max_iter
    p = model.predict_proba(torch.tensor(X)).numpy()[1, 0]
    assert p[134:140].min() > p[:134].max()  # the second token's answers are the wrong ones
    # the fallback for the degenerate cell leaves the other cell's probe as it is alone
    alone = BatchedLogisticRegression().fit(torch.tensor(plain), torch.tensor(y), torch.tensor(train[:1]))
    torch.testing.assert_close(model.coef_[0], alone.coef_[0], rtol=1e-4, atol=1e-6)


def test_auc_score_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.integers(0, 2, size=200)
    assert auc_score(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


@pytest.fixture(params=["pair product", "sorted sums"])
def weighted_auc_path(request, monkeypatch):
    """Both ways auc_score sums weighted pairs: one matrix product (small sets) and cumulative sums."""
    import truthmap.metrics as metrics

    if request.param == "sorted sums":
        monkeypatch.setattr(metrics, "PAIR_LIMIT", 0)
    return request.param


def test_weighted_auc_equals_auc_of_resampled_rows(weighted_auc_path):
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=60), rng.integers(0, 2, size=60)
    counts = bootstrap_counts(60, 5, seed=0)
    for row, weights in zip(auc_score(scores, labels, counts), counts):
        index = np.repeat(np.arange(60), weights)
        assert row == pytest.approx(roc_auc_score(labels[index], scores[index]))
    assert (counts.sum(1) == 60).all()


def test_weighted_auc_with_ties_equals_auc_of_resampled_rows(weighted_auc_path):
    rng = np.random.default_rng(3)
    scores, labels = rng.integers(0, 4, size=60).astype(float), rng.integers(0, 2, size=60)  # many ties
    counts = bootstrap_counts(60, 5, seed=1)
    for row, weights in zip(auc_score(scores, labels, counts), counts):
        index = np.repeat(np.arange(60), weights)
        assert row == pytest.approx(roc_auc_score(labels[index], scores[index]))


@pytest.mark.parametrize("kind", ["counts", "fractions", "large counts"])
def test_weighted_auc_with_a_few_ties_among_distinct_scores_equals_scikit_learn(kind, weighted_auc_path):
    rng = np.random.default_rng(4)
    scores = rng.normal(size=300).round(1)  # distinct mostly, ties in groups of 2..6, adjacent groups too
    scores[:40] = np.repeat(rng.normal(size=10), 4)
    labels = rng.integers(0, 2, size=300)
    weights = {"counts": bootstrap_counts(300, 20, seed=2),  # float32 inside
               "fractions": rng.uniform(0, 3, size=(20, 300)),  # float64 inside
               "large counts": bootstrap_counts(300, 20, seed=2) * 1000}[kind]  # beyond float32: float64
    assert (scores[1:] == scores[:-1]).sum() < 150
    for row, w in zip(auc_score(scores, labels, weights), weights):
        assert row == pytest.approx(roc_auc_score(labels, scores, sample_weight=w), abs=1e-12)
    assert auc_score(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_split_sizes_name_the_short_class_and_honour_min_per_class():
    from truthmap.errors import TruthmapError
    from truthmap.stages.probe import check_split_sizes

    labels = np.array([1] * 34 + [0] * 8)  # 8 right answers: 4 in train, 2 in validation, 2 in test
    ids = [f"q{i}" for i in range(42)]
    splits = {"seeds": {"0": {"train": ids[:20] + ids[34:38], "validation": ids[20:26] + ids[38:40],
                              "test": ids[26:34] + ids[40:]}}}
    with pytest.raises(TruthmapError, match=r"seed 0, train part: only 4 right answers \(need at least 10\)"):
        check_split_sizes(labels, splits, ids)
    with pytest.raises(TruthmapError, match=r"validation part: only 2 right answers \(need at least 3\)"):
        check_split_sizes(labels, splits, ids, min_per_class=3)
    check_split_sizes(labels, splits, ids, min_per_class=2)
    with pytest.raises(TruthmapError, match=r"test part: only 1 right answer \(need at least 2\)"):
        check_split_sizes(np.r_[labels[:-1], 1], splits, ids, min_per_class=2)
    with pytest.raises(TruthmapError, match=r"no validation part .* rerun the label stage"):
        check_split_sizes(labels, {"seeds": {"0": {"train": ids[:30], "test": ids[30:]}}}, ids)
    # a test part per seed (an older design): the seeds' test answers were another seed's validation answers
    other = {"train": splits["seeds"]["0"]["train"], "validation": ids[26:32] + ids[38:40],
             "test": ids[20:26] + ids[32:34] + ids[40:]}
    with pytest.raises(TruthmapError, match=r"the seeds' test parts differ .* rerun the label stage"):
        check_split_sizes(labels, {"seeds": {**splits["seeds"], "1": other}}, ids, min_per_class=2)


def test_min_per_class_below_two_is_refused():
    from truthmap.config import Config
    from truthmap.errors import TruthmapError

    with pytest.raises(TruthmapError, match="min_per_class: 1 is out of range; use a whole number from 2"):
        Config(min_per_class=1).validate()


def test_the_best_cell_is_chosen_on_validation_not_on_test():
    """Cell 3 is strong on test only (luck on the answers that score it); cell 7 on validation and test:
    the validation choice is 7, and its reported AUC is its test AUC."""
    import pandas as pd

    from truthmap.metrics import choose_cell, mean_over_seeds

    rows = []
    for seed in (0, 1):
        for layer in range(12):
            val, test = {3: (0.55, 0.95), 7: (0.85, 0.84)}.get(layer, (0.6, 0.6))
            rows.append({"site": "residual", "layer": layer, "position": "-1", "seed": seed, "auc": test,
                         "val_auc": val})
    means = mean_over_seeds(pd.DataFrame(rows))
    chosen = choose_cell(means)
    assert chosen["layer"] == 7 and chosen["auc"] == pytest.approx(0.84) and chosen["val_auc"] == pytest.approx(0.85)
    assert choose_cell(means, "auc")["layer"] == 3  # what choosing on test would have said


def test_within_strata_auc_of_a_score_that_only_encodes_the_stratum_is_one_half():
    from truthmap.metrics import within_auc

    rng = np.random.default_rng(0)
    strata = rng.integers(0, 6, 600)
    rate = np.linspace(0.1, 0.9, 6)[strata]  # strata differ in error rate
    wrong = rng.random(600) < rate
    assert auc_score(rate, wrong) > 0.75  # across strata, the stratum alone looks like knowledge
    assert within_auc(rate, wrong, strata) == pytest.approx(0.5)
    knows = wrong + rng.normal(0, 0.5, 600)
    assert within_auc(knows, wrong, strata) > 0.8
    # pooled over strata it equals the pair-count-weighted mean of the strata's AUCs
    pairs = [(wrong[strata == g].sum() * (~wrong[strata == g]).sum(), auc_score(knows[strata == g], wrong[strata == g]))
             for g in range(6)]
    assert within_auc(knows, wrong, strata) == pytest.approx(sum(w * a for w, a in pairs) / sum(w for w, _ in pairs))


def test_group_bootstrap_moves_whole_groups_and_the_mean_interval_is_of_the_mean():
    from truthmap.metrics import cell_stats, group_bootstrap

    groups = np.repeat(np.arange(50), 4)
    weights = group_bootstrap(groups, 200, seed=0)
    assert weights.shape == (200, 200) and (weights.reshape(200, 50, 4).std(-1) == 0).all()
    assert (weights.reshape(200, 50, 4)[..., 0].sum(1) == 50).all()
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.5).astype(int)
    score = np.stack([y + rng.normal(0, 1.0, 200) for _ in range(3)])
    part = rng.permutation(np.repeat(["train", "validation", "test"], [100, 40, 60]))
    parts = {p: np.tile(part == p, (3, 1)) for p in ("train", "validation", "test")}
    per_seed, cell = cell_stats(score, y, parts, weights)
    mean = np.mean([r["auc"] for r in per_seed])
    assert cell["mean_auc_lo"] < mean < cell["mean_auc_hi"]
    assert cell["val_auc_se"] > 0


def test_reference_protocol_probe_is_scikit_learns_default_logistic_regression_on_raw_features(tmp_path):
    """protocol: reference fits ``LogisticRegression()`` with its defaults on the raw features: the
    scores equal scikit-learn's own fit on the same rows; the default (standardised, batched) probe's do not."""
    import json

    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from tests.unit._synthetic import make_run
    from truthmap import runfolder as rf
    from truthmap.stages.extract import load_features
    from truthmap.stages.probe import run_probe

    run = make_run(tmp_path / "run", n=160, d=6)
    with rf.open_run(run):
        _, reference_scores = run_probe(run, ["residual"], n_boot=20, progress=False, min_per_class=2, reference=True)
        _, default_scores = run_probe(run, ["residual"], n_boot=20, progress=False, min_per_class=2)
        ids, X = load_features(run, "residual", 1, "-1")
    answers = pd.read_parquet(run / "answers.parquet").set_index("id")
    split = json.loads((run / "splits.json").read_text())["seeds"]["1"]
    row = {i: k for k, i in enumerate(ids)}
    train = [row[i] for i in split["train"] if i in row]
    test = [i for i in split["test"] if i in row]
    y = (~answers.loc[ids, "correct"]).to_numpy().astype(int)
    expected = LogisticRegression().fit(X[train], y[train]).predict_proba(X[[row[i] for i in test]])[:, 1]

    def cell(scores):
        found = scores[(scores.layer == 1) & (scores.position == "-1") & (scores.seed == 1)].set_index("id")
        return found.loc[test, "score"].to_numpy()

    assert np.allclose(cell(reference_scores), expected, rtol=0, atol=1e-9)
    assert np.abs(cell(default_scores) - expected).max() > 1e-4  # standardised features: another problem
