"""How well a score tells wrong answers from right ones, in one place: the AUC (alone, per bootstrap
replicate, within strata), the run's shared cluster bootstrap, one cell's evaluation over seeds and the
results tables every method writes in one format.

Used by the probes (stages/probe.py), the baselines and the verdict, the views (plot, report) and the
analyses (whole map, entropy probe, cost, transfer, resample, choice, detector). One orientation
everywhere: the positive class is an *error*, a higher score means "more likely wrong".

The bootstrap is shared: :func:`bootstrap_for` draws one ``[B, N]`` set of cluster weights (groups of
related questions, truthmap/splits.py) from a fixed seed, so every cell, seed and baseline of a run is
scored on the same replicates and paired differences between them are meaningful.

Reads ``probe_results.csv``, ``baseline_results.csv`` and ``wholemap_results.csv`` (:func:`read_results`,
:func:`read_run_results`); writes nothing. The results tables have the columns ``RESULT_COLUMNS``: one row
per (site, layer, position, seed); a baseline's row has ``site = baseline``, ``layer = -1`` and its name in
``position``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .constants import BASELINE_SITE
from .runfolder import BASELINE_RESULTS, PROBE_RESULTS, WHOLEMAP_RESULTS, read_csv
from .splits import split_groups

RESULT_COLUMNS = ["site", "layer", "position", "seed", "auc", "auc_lo", "auc_hi", "accuracy", "n_train", "n_test",
                  "val_auc", "n_val", "within_auc", "within_val_auc", "mean_auc_lo", "mean_auc_hi", "val_auc_se",
                  "seed_sd"]


def auc_score(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC (ties count one half); with ``weights`` ``[B, n]`` one AUC per row of weights.

    Used with bootstrap counts as weights, so B resamples cost one sort. Counts (whole numbers) are
    summed in float32 where exact, the pairs in float64: the AUCs are those of float64 throughout.
    Up to ``PAIR_LIMIT`` (positive, negative) pairs, the weighted pairs are one matrix product instead.
    """
    positive = np.asarray(positive).astype(bool)
    if weights is not None and int(positive.sum()) * int((~positive).sum()) <= PAIR_LIMIT:
        return _auc_of_pairs(np.asarray(scores), positive, np.asarray(weights))
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order]
    w = np.ones((1, len(s))) if weights is None else np.asarray(weights)[:, order]
    # whole counts m at most: every partial sum and product below is a multiple of one half under m²n,
    # exact in float32 while that is under 2²³ (half the memory traffic of float64)
    most = _largest_whole_count(w)
    w = w.astype(np.float32 if most * most * len(s) < 1 << 23 else np.float64, copy=False)
    w_pos, w_neg = w * pos, w * ~pos
    # each positive against the negatives sorted before it, and half of itself: every pair once
    neg_below = np.cumsum(w_neg, axis=1, dtype=w.dtype) - w_neg
    pairs = (w_pos * (neg_below + 0.5 * w_neg)).sum(1, dtype=np.float64)
    same = s[1:] == s[:-1]
    if same.any():  # tied scores: their pairs were counted in sort order; each counts one half
        tied = np.flatnonzero(np.r_[same, False] | np.r_[False, same])  # the members of groups of ties
        starts = np.flatnonzero(np.r_[True, s[tied][1:] != s[tied][:-1]])
        t_pos, t_neg = w_pos[:, tied].astype(np.float64), w_neg[:, tied].astype(np.float64)
        below = np.cumsum(t_neg, axis=1) - t_neg
        below -= np.repeat(below[:, starts], np.diff(np.r_[starts, len(tied)]), axis=1)  # within the group
        counted = (t_pos * (below + 0.5 * t_neg)).sum(1)
        half = 0.5 * (np.add.reduceat(t_pos, starts, axis=1) * np.add.reduceat(t_neg, starts, axis=1)).sum(1)
        pairs += half - counted
    total = w_pos.sum(1, dtype=np.float64) * w_neg.sum(1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = pairs / total
    return auc if weights is not None else auc[0]


def _largest_whole_count(weights: np.ndarray) -> float:
    """The largest of ``weights`` if they are all whole numbers (counts), else infinity."""
    whole = weights.dtype.kind in "iu" or (weights.dtype.kind == "f" and bool(np.all(weights == np.round(weights))))
    return (float(weights.max()) if weights.size else 0.0) if whole else float("inf")


PAIR_LIMIT = 1 << 20  # below ~2000 scores the product of every pair is faster than sorting each replicate


def _auc_of_pairs(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC per row of ``weights`` ``[B, n]`` as ``Σ w_i·w_j·[s_i > s_j, ½ if equal]`` over (positive i,
    negative j): a ``[B, n₊] @ [n₊, n₋]`` product. Whole counts whose sums stay under 2²³ are exact in
    float32 in any order of summation; anything else is summed in float64."""
    s_pos, s_neg = scores[positive], scores[~positive]
    w_pos, w_neg = weights[:, positive], weights[:, ~positive]
    dtype = np.float32 if 2 * _largest_whole_count(weights) * len(s_pos) < 1 << 23 else np.float64
    beats = (s_pos[:, None] > s_neg[None, :]).astype(dtype)
    beats += 0.5 * (s_pos[:, None] == s_neg[None, :])
    w_pos, w_neg = w_pos.astype(dtype, copy=False), w_neg.astype(dtype, copy=False)
    pairs = np.einsum("bj,bj->b", w_pos @ beats, w_neg, dtype=np.float64)
    total = w_pos.sum(1, dtype=np.float64) * w_neg.sum(1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pairs / total


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` resampling counts (each row sums to n)."""
    rng = np.random.default_rng(10_000 + seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def group_bootstrap(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, N]`` weights of a cluster bootstrap: each replicate draws the G groups with replacement
    (multinomial counts) and every member of a group gets its group's count, so related questions stay
    together in the resampling as in the splits."""
    groups = np.asarray(groups)
    if len(groups) == 0:
        return np.zeros((n_boot, 0), dtype=np.int32)
    n_groups = int(groups.max()) + 1
    counts = bootstrap_counts(n_groups, n_boot, seed)
    return counts[:, groups].astype(np.int32)  # whole counts: auc_score sums them in float32


def within_auc(scores: np.ndarray, positive: np.ndarray, strata: np.ndarray) -> float:
    """AUC over the (wrong, right) pairs of the same stratum only: the share of same-stratum pairs ranked
    correctly (ties count one half). It is the strata's AUCs averaged with weights n_wrong · n_right, so a
    score that only tells strata apart gets 0.5, and strata with one class count for nothing."""
    strata = np.asarray(strata)
    if strata.dtype.kind not in "iu":
        strata = pd.factorize(strata)[0]
    order = np.lexsort((scores, strata))  # by stratum, then score
    g, s, y = strata[order], np.asarray(scores)[order], np.asarray(positive, dtype=np.float64)[order]
    n = len(s)
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]  # first row of each stratum
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n])) + 1.0  # 1-based, within the stratum
    ties = np.r_[0, np.flatnonzero((g[1:] != g[:-1]) | (s[1:] != s[:-1])) + 1]  # runs of equal scores
    lengths = np.diff(np.r_[ties, n])
    rank = np.repeat(np.add.reduceat(rank, ties) / lengths, lengths)  # tied scores share their mean rank
    n_strata = int(g.max()) + 1 if n else 0
    pos = np.bincount(g, weights=y, minlength=n_strata)
    size = np.bincount(g, minlength=n_strata)
    pairs = (pos * (size - pos)).sum()
    if pairs == 0:
        return float("nan")
    return float((np.bincount(g, weights=rank * y, minlength=n_strata) - pos * (pos + 1) / 2).sum() / pairs)


def cell_stats(score: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray], weights: np.ndarray,
               strata: np.ndarray | None = None, probability: bool = True) -> tuple[list[dict], dict]:
    """One cell's evaluation: per seed and for the mean over seeds.

    ``score`` ``[S, N]`` (NaN where an answer has no score), ``y`` ``[N]`` (1 = error; or ``[S, N]``, a
    target per seed, as the semantic-entropy probes' high/low entropy), ``parts``
    ``{"train" | "validation" | "test": bool [S, N]}``, ``weights`` the ``[B, N]`` bootstrap of
    :func:`group_bootstrap`, ``strata`` ``[N]`` or None. Returns (per-seed dicts with auc, auc_lo, auc_hi,
    accuracy, n_train, n_val, n_test, val_auc, within_auc, within_val_auc; the cell's dict with
    mean_auc_lo, mean_auc_hi and val_auc_se, the bootstrap deviation of the mean validation AUC)."""
    n_seeds = score.shape[0]
    reps = {"test": np.full((n_seeds, weights.shape[0]), np.nan), "validation": np.full((n_seeds, weights.shape[0]), np.nan)}
    rows = []
    for s in range(n_seeds):
        row = {"n_train": int((parts["train"][s] & np.isfinite(score[s])).sum())}
        for part, key in (("test", "auc"), ("validation", "val_auc")):
            rows_in = parts[part][s] & np.isfinite(score[s])
            row["n_test" if part == "test" else "n_val"] = int(rows_in.sum())
            values, labels = score[s, rows_in], (y[s] if y.ndim == 2 else y)[rows_in]
            if len(set(labels.tolist())) < 2:
                row[key] = np.nan
                row["within_" + key] = np.nan
                continue
            row[key] = float(auc_score(values, labels))
            reps[part][s] = auc_score(values, labels, weights[:, rows_in])
            row["within_" + key] = within_auc(values, labels, strata[rows_in]) if strata is not None else np.nan
            if part == "test":
                row["auc_lo"], row["auc_hi"] = (float(v) for v in interval(reps[part][s]))
                row["accuracy"] = float(((values >= 0.5) == labels).mean()) if probability else np.nan
        rows.append(row)
    mean_lo, mean_hi = interval(_nanmean(reps["test"]))
    val_means = _nanmean(reps["validation"])
    finite = val_means[np.isfinite(val_means)]
    seed_aucs = np.array([row.get("auc", np.nan) for row in rows], dtype=float)
    seed_aucs = seed_aucs[np.isfinite(seed_aucs)]
    return rows, {"mean_auc_lo": mean_lo, "mean_auc_hi": mean_hi,
                  "val_auc_se": float(np.std(finite)) if len(finite) > 1 else np.nan,
                  # what training on another train part changes (the test part is the same in every seed)
                  "seed_sd": float(np.std(seed_aucs, ddof=1)) if len(seed_aucs) > 1 else np.nan}


def _nanmean(replicates: np.ndarray) -> np.ndarray:
    """Mean over seeds of each bootstrap replicate ``[S, B] -> [B]``; NaN where no seed has a value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": NaN is the answer
        return np.nanmean(replicates, axis=0)


def interval(replicates: np.ndarray) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the finite replicates (NaN, NaN when none is)."""
    finite = replicates[np.isfinite(replicates)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def result_rows(site: str, layer: int, position: str, seeds: list, per_seed: list[dict], cell: dict) -> list[list]:
    """``probe_results.csv`` rows (``RESULT_COLUMNS``) of one cell from :func:`cell_stats`'s output."""
    out = []
    for seed, row in zip(seeds, per_seed):
        values = {"site": site, "layer": layer, "position": position, "seed": int(seed), **cell, **row}
        out.append([values.get(c, np.nan) for c in RESULT_COLUMNS])
    return out


def split_masks(splits: dict, ids: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(seeds in order, ``{part: bool [S, N]}``) of ``splits.json`` over the row order ``ids``."""
    seeds = sorted(splits["seeds"], key=int)
    row_of = {i: k for k, i in enumerate(ids)}
    parts = {}
    for part in ("train", "validation", "test"):
        mask = np.zeros((len(seeds), len(ids)), bool)
        for s, seed in enumerate(seeds):
            mask[s, [row_of[i] for i in splits["seeds"][seed].get(part, []) if i in row_of]] = True
        parts[part] = mask
    return seeds, parts


def strata_of(answers: pd.DataFrame, ids: list[str]) -> np.ndarray:
    """The stratum of each answer in ``ids`` order: its family and subgroup, as its task sets them."""
    table = answers.set_index("id")
    subgroup = table["subgroup"].fillna("").astype(str) if "subgroup" in table.columns else ""
    keys = (table["family"].fillna("").astype(str) + "|" + subgroup).reindex(ids)
    return pd.factorize(keys)[0]


def bootstrap_for(answers: pd.DataFrame, ids: list[str], n_boot: int) -> np.ndarray:
    """The run's shared cluster bootstrap over ``ids`` (groups of splits.split_groups)."""
    # groups numbered over the whole answers table, so the probes and the baselines share every replicate
    group_of = dict(zip(answers["id"], split_groups(answers.reset_index(drop=True))))
    return group_bootstrap(np.array([group_of[i] for i in ids], dtype=np.int64), n_boot, seed=0)


def mean_over_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (site, layer, position): mean test and validation AUC over seeds, the seeds' spread
    (``auc_std``), and the bootstrap interval of the mean (``auc_lo``, ``auc_hi``; NaN in a table
    without it). The within-strata AUCs are averaged the same way."""
    results = results.copy()
    for column in RESULT_COLUMNS:
        if column not in results.columns:
            results[column] = np.nan
    grouped = results.groupby(["site", "layer", "position"], sort=False)
    out = grouped.agg(auc=("auc", "mean"), auc_std=("auc", "std"), auc_lo=("mean_auc_lo", "first"),
                      auc_hi=("mean_auc_hi", "first"), val_auc=("val_auc", "mean"), val_auc_se=("val_auc_se", "first"),
                      within_auc=("within_auc", "mean"), within_val_auc=("within_val_auc", "mean"),
                      accuracy=("accuracy", "mean"), n_train=("n_train", "mean"), n_val=("n_val", "mean"),
                      n_test=("n_test", "mean"), seeds=("seed", "nunique"))
    out["auc_std"] = out["auc_std"].fillna(0.0)
    return out.reset_index()


def choose_cell(means: pd.DataFrame, on: str = "val_auc") -> dict | None:
    """The cell of ``means`` (:func:`mean_over_seeds`) with the highest ``on`` — the validation AUC by
    default, never the test AUC it reports — as a dict of that row; None when no cell has one."""
    scored = means[means[on].notna()]
    if scored.empty:
        return None
    row = scored.loc[scored[on].idxmax()]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.to_dict().items()}


def top_cells(results: pd.DataFrame, k: int = 5, on: str = "val_auc") -> pd.DataFrame:
    """The ``k`` cells with the highest mean ``on`` (validation AUC by default)."""
    return mean_over_seeds(results).sort_values(on, ascending=False).head(k).reset_index(drop=True)


def cell_summary(cell: dict | None) -> dict | None:
    """The fields of a chosen cell that summary.json records."""
    if cell is None:
        return None
    keys = ("site", "layer", "position", "val_auc", "val_auc_se", "auc", "auc_std", "auc_lo", "auc_hi",
            "within_val_auc", "within_auc", "n_val", "n_test")  # auc_std: the seeds' spread (training only)
    out = {}
    for key in keys:
        value = cell.get(key)
        if isinstance(value, float):
            value = None if np.isnan(value) else round(value, 4)
        out[key] = int(value) if key == "layer" else value
    return out


def read_results(path) -> pd.DataFrame:
    """``probe_results.csv`` as written: positions stay text ("-1" is a position name, not a number)."""
    return read_csv(path, dtype={"site": str, "position": str})  # a missing or damaged file: one line


def read_run_results(run_dir, baselines: bool = True) -> pd.DataFrame:
    """The probes' rows of a run (``probe_results.csv``) and, with ``baselines``, the baselines' rows
    after them (``baseline_results.csv`` and ``wholemap_results.csv``, when their stages have run): one table, for readers that
    compare probes with baselines. Each file has one writer; this is where they meet."""
    run_dir = Path(run_dir)
    probes = read_results(run_dir / PROBE_RESULTS)
    probes = probes[probes["site"] != BASELINE_SITE]  # a run of an older truthmap had the baselines' rows merged in
    extra = [read_results(run_dir / name) for name in (BASELINE_RESULTS, WHOLEMAP_RESULTS)
             if baselines and (run_dir / name).exists()]  # the whole-map probe is a row of the baselines table
    return pd.concat([probes, *extra], ignore_index=True) if extra else probes.reset_index(drop=True)
