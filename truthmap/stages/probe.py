"""Stage 4 — a logistic-regression probe per (site, layer, position, seed), all fitted together.

Reads ``activations/`` (features), ``answers.parquet`` (labels) and ``splits.json``; writes
``probe_results.csv`` — one row per (site, layer, position, seed), columns ``RESULT_COLUMNS`` (test AUC
and its interval, validation AUC, the AUC within strata, and the interval of the mean over seeds) — and
``probe_scores.parquet`` (``site, layer, position, seed, id, score``: each test example's P(error)).

The positive class is *error* (the answer is wrong). Each probe is scikit-learn's
``LogisticRegression(C=1.0)`` on features standardised with the train split's mean and deviation; we
solve the same problem for many cells at once with a batched, preconditioned L-BFGS in torch (see
:class:`truthmap.logistic.BatchedLogisticRegression`), so the AUCs agree with scikit-learn's to well within 0.01.

Every probe is fitted on its seed's train part and scored on its validation part and on the one test
part, the same in every seed and never seen by any (truthmap/splits.py). The heatmap shows test AUCs; the
best cell is chosen on validation AUCs alone (:func:`truthmap.metrics.choose_cell`), so the AUC
reported for the choice is free of it. Intervals come from one cluster bootstrap shared by every cell,
seed and baseline (:func:`truthmap.metrics.bootstrap_for`; the AUCs, intervals and results tables are
truthmap/metrics.py): a replicate re-weights whole groups of related questions;
a seed's interval reads the weights of the test answers, and the interval of the mean over seeds
averages the seeds' AUCs within each replicate. The probes are not refitted in a replicate, so an
interval covers the sampling of the test answers; ``seed_sd`` (the seeds' spread of test AUCs on the
same answers) covers what training on another train part changes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import runfolder as rf
from ..constants import MIN_PER_CLASS
from ..errors import TruthmapError
from ..metrics import (RESULT_COLUMNS, bootstrap_for, cell_stats, cell_summary, choose_cell, mean_over_seeds, result_rows,
                       split_masks, strata_of)
from ..backends.base import resolve_device
from ..runfolder import ANSWERS, SPLITS, Run
from .base import Stage, StageRun, fields, register
from .extract import load_layer
from .verdict import study_verdict


SCORE_COLUMNS = ["site", "layer", "position", "seed", "id", "score"]


def check_split_sizes(labels: np.ndarray, splits: dict, ids: list[str], min_per_class: int = MIN_PER_CLASS) -> None:
    """Refuse splits of an older design (no validation part, or a test part per seed) and parts with fewer
    than ``min_per_class`` right or wrong answers (the one test part is counted once)."""
    position = {i: k for k, i in enumerate(ids)}
    tests = set()
    for seed, split in splits["seeds"].items():
        missing = [part for part in ("train", "validation", "test") if part not in split]
        if missing:
            raise TruthmapError(f"splits.json, seed {seed}: no {missing[0]} part (made by an older truthmap); "
                                f"rerun the label stage (truthmap label --force)")
        tests.add(frozenset(split["test"]))
    if len(tests) > 1:
        raise TruthmapError("splits.json: the seeds' test parts differ (made by an older truthmap, which drew a test "
                            "part per seed); rerun the label stage (truthmap label --force)")
    for s, (seed, split) in enumerate(splits["seeds"].items()):
        for part in ("train", "validation", "test")[: 3 if s == 0 else 2]:
            y = labels[[position[i] for i in split[part]]]
            for value, name in ((1, "wrong"), (0, "right")):
                count = int((y == value).sum())
                if count < min_per_class:
                    raise TruthmapError(
                        f"splits.json, seed {seed}, {part} part: only {count} {name} answer{'s' * (count != 1)} "
                        f"(need at least {min_per_class}); study more questions (--limit) or a different mix, "
                        f"or accept wide AUC intervals with --min-per-class (at least 2)"
                    )


def run_probe(
    run_dir: Path | Run,
    sites: list[str],
    *,
    C: float = 1.0,
    n_boot: int = 1000,
    device: str = "cpu",
    progress: bool = True,
    min_per_class: int = MIN_PER_CLASS,
    reference: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit and evaluate every probe; return (results table, test scores table).

    ``reference``: the reference study's probe instead (``protocol: reference``): scikit-learn's
    ``LogisticRegression()`` with its defaults (C = 1, lbfgs, at most 100 iterations) on the raw features,
    not standardised, one fit per cell and seed (:func:`reference_probabilities`); ``C`` is not used.

    Every part of every split must hold at least ``min_per_class`` right and wrong answers (an AUC from
    fewer is mostly noise; its bootstrap interval says how much). A probe is fitted and scored only on
    the answers its splits hold (the study's population) at which its position exists.

    ``run_dir``: a run folder, or an open :class:`~truthmap.runfolder.Run`. The folder is read under one
    shared lock (:meth:`Run.reading <truthmap.runfolder.Run.reading>`), so each file is checked against
    the manifest once, not once per layer.
    """
    with Run.reading(run_dir) as run:
        return _run_probe(run, sites, C=C, n_boot=n_boot, device=device, progress=progress,
                          min_per_class=min_per_class, reference=reference)


def _run_probe(run: Run, sites: list[str], *, C: float, n_boot: int, device: str, progress: bool,
               min_per_class: int, reference: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    import torch  # here, not at the top: listing the stages (truthmap --help) does not load torch

    from ..logistic import BatchedLogisticRegression
    answers = run.read_parquet(ANSWERS)
    splits = run.read_splits(SPLITS)

    meta = run.read_activations_index()  # checked: a crafted index is a one-line error
    ids = meta["ids"]
    label_of = dict(zip(answers["id"], ~answers["correct"].astype(bool)))
    y = np.array([label_of[i] for i in ids], dtype=np.int64)  # 1 = error
    check_split_sizes(y, splits, ids, min_per_class)
    seeds, parts = split_masks(splits, ids)
    weights = bootstrap_for(answers, ids, n_boot)
    strata = strata_of(answers, ids)
    y_t = torch.as_tensor(y, device=device)
    results, scores = [], []
    total = sum(len(meta["sites"][site]["layers"]) for site in sites)
    bar = tqdm(total=total, desc="probe", unit="layer", disable=not progress)
    for site in sites:
        for layer in meta["sites"][site]["layers"]:
            _, positions, features, valid = load_layer(run, site, layer)
            X = torch.as_tensor(np.asarray(features), device=device).float()  # [P, N, d]
            train = torch.as_tensor(parts["train"][None] & valid.T[:, None], device=device)  # [P, S, N]
            if reference:
                prob = reference_probabilities(X.cpu().numpy(), y, train.cpu().numpy())
            else:
                model = BatchedLogisticRegression(C=C).fit(X, y_t, train)
                prob = model.predict_proba(X).cpu().numpy().astype(np.float64)  # [P, S, N]
            for p, position in enumerate(positions):
                score = np.where(valid[:, p][None, :], prob[p], np.nan)  # [S, N]
                per_seed, cell = cell_stats(score, y, parts, weights, strata)
                results.extend(result_rows(site, layer, position, seeds, per_seed, cell))
                for s, seed in enumerate(seeds):
                    test = np.flatnonzero(parts["test"][s] & valid[:, p])
                    scores.append(((site, layer, position, int(seed)), test, prob[p, s, test]))
            bar.update(1)
    bar.close()
    table = pd.DataFrame(results, columns=RESULT_COLUMNS)
    return table, _score_table(scores, np.asarray(ids))


def reference_probabilities(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    """P(error) ``[P, S, N]`` of the reference study's probe: for each cell p and split s, scikit-learn's
    ``LogisticRegression()`` (its defaults) fitted on the raw features ``X[p]`` (``[P, N, d]``) of the rows
    ``train[p, s]`` (bool ``[P, S, N]``), labels ``y`` ``[N]``; NaN where the train rows lack a class.
    Its convergence warnings (100 iterations on raw hidden states often stop short) are not shown: the
    reference keeps what the defaults give, and so do we."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    prob = np.full(train.shape, np.nan)
    for p in range(train.shape[0]):
        for s in range(train.shape[1]):
            rows = train[p, s]
            if len(set(y[rows].tolist())) < 2:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LogisticRegression().fit(X[p, rows], y[rows])
            prob[p, s] = model.predict_proba(X[p])[:, 1]
    return prob


def _score_table(scores: list, ids: np.ndarray) -> pd.DataFrame:
    """``probe_scores.parquet``'s table from (cell key, test rows, scores) triples, built once (a frame
    per cell and seed costs more than the probes of a small study)."""
    if not scores:
        return pd.DataFrame(columns=SCORE_COLUMNS)
    sizes = [len(rows) for _, rows, _ in scores]
    keys = list(zip(*(key for key, _, _ in scores)))
    columns = {name: np.repeat(np.asarray(values, dtype=object if name in ("site", "position") else None), sizes)
               for name, values in zip(("site", "layer", "position", "seed"), keys)}
    columns["id"] = ids[np.concatenate([rows for _, rows, _ in scores])]
    columns["score"] = np.concatenate([values for _, _, values in scores])
    return pd.DataFrame(columns)


# ---------------------------------------------------------------- the stage

def best_cells(means: pd.DataFrame) -> dict:
    """summary.json's choices among probe cells: every "best" is chosen on validation AUCs."""
    top = means.sort_values("val_auc", ascending=False).head(5)
    return {
        "best_cell": cell_summary(choose_cell(means)),  # chosen on validation; its test AUC is free of the choice
        "top_cells": [cell_summary(row) for row in top.to_dict("records")],
        "best_within_cell": cell_summary(choose_cell(means, "within_val_auc")),
        # what choosing on test would report (optimistic: the best of hundreds on the answers that score it)
        "best_on_test": cell_summary(choose_cell(means, "auc")),
    }


def _probe(s: StageRun) -> None:
    c, run = s.config, s.run
    device = resolve_device(c.device) if c.device_map is None else "cpu"
    results, scores = run_probe(run, c.sites, C=c.C, n_boot=c.bootstrap, device=device, progress=c.progress,
                                min_per_class=c.min_per_class, reference=c.protocol == "reference")
    run.write_csv(rf.PROBE_RESULTS, results)  # the probes' rows; the baselines have their own file
    run.write_parquet(rf.PROBE_SCORES, scores)
    run.update_summary(**best_cells(mean_over_seeds(results)))
    # the probe cells' part of the verdict; the baselines stage adds the baselines and controls
    verdict = study_verdict(results, scores, run.read_parquet(rf.ANSWERS), run.read_splits(rf.SPLITS), c.bootstrap)
    run.update_summary(verdict=verdict)


register(Stage(
    "probe", "4", "A probe per (site, layer, position, seed) (probe_results.csv).", _probe,
    inputs=(rf.ANSWERS, rf.SPLITS, rf.ACTIVATIONS), outputs=(rf.PROBE_RESULTS, rf.PROBE_SCORES),
    settings=fields("C", "bootstrap", "sites", "min_per_class", "protocol"), labelled=True, summary=True))
