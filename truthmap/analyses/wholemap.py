"""The whole map as one probe, and which cells beat chance.

Reads ``activations/``, ``answers.parquet``, ``splits.json``, ``probe_results.csv`` and
``probe_scores.parquet``; writes

* ``wholemap_results.csv`` — the columns of ``probe_results.csv``, ``site = baseline``, ``layer = -1``,
  ``position = whole_map``: the whole-map probe per seed (a row of the baselines table);
* ``wholemap_scores.parquet`` — ``seed, id, score``: its P(error) for each test answer;
* ``cell_null.csv`` — per (site, layer, position): ``ridge_auc`` (mean test AUC over seeds of the
  ridge probe below), ``p`` (its p-value under the permutation null, corrected for every cell by the max
  statistic) and ``beats_null`` (p ≤ 0.05).

**One cheap probe per cell for both analyses.** A ridge (least-squares) probe per cell and seed, on the
features standardised with the train rows' mean and deviation, penalty ``α = 4 / C``: the heatmap's
logistic probe in the quadratic approximation of its loss at zero logits (``C·logloss(f) ≈ (C/8)·(4(y−½)
− f)² + const``). Its fit is linear in the labels: with ``K = (ZᵀZ + αI)⁻¹Zᵀ`` (Z the standardised train
rows) every score is a fixed matrix times the labels. Hence

* **out-of-fold train scores for free** — each train row's leave-one-out score is
  ``y − (y − ŷ) / (1 − h)``, h its leverage (the diagonal of the hat matrix, plus 1/n for the intercept);
* **a permutation null for the price of a matrix product** — under permuted labels only y changes, so
  the test scores of B permutations are ``Z_test K · Y_perm``, one product per cell, no refitting.

**The whole-map probe (stacking).** Level one: every cell's ridge probe (465 cells at the default model
and positions) — leave-one-out scores on train rows, full-train scores on validation and test rows.
Level two: an L2 logistic regression over the cells' standardised scores, fitted on the train rows'
out-of-fold scores, its C chosen on the validation part's AUC (grid ``STACK_CS``), scored on the test
part. Why this rather than one model over all the features (465 × 576 dimensions): each level-one
model sees one cell, as the heatmap's probes do, so the combiner asks only how much the cells add to
each other, with 465 inputs instead of 268 000; and its cost is one ridge fit per cell. Its paired
difference against the heatmap's best cell (chosen on validation) is the verdict's comparison
(:func:`truthmap.stages.verdict.compare`): on the run's shared cluster bootstrap, per replicate, the mean
over seeds of each side's test AUC on the answers both score, then their difference.

**The permutation null.** Labels are permuted within blocks of (stratum = family and subgroup) × (in the
first seed's test part or not): each family keeps its error rate and the test part its class counts, so a
cell that only tells which kind of question was asked does not beat the null. Related questions move
together: within a block, a group's answers (``splits.split_groups``) form a unit, and units of the same
size trade their labels whole, so the null keeps the labels' clustering that the bootstrap draws too. The statistic of a cell is
its ridge probe's mean test AUC over seeds; the null distribution is the largest statistic over all
cells in each permutation, so ``p = (1 + #{b: max_b ≥ observed}) / (1 + B)`` is corrected for the number
of cells exactly (family-wise). With B = 199 (``--permutations``) the smallest p is 0.005.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..errors import CannotRun, TruthmapError
from ..metrics import (RESULT_COLUMNS, bootstrap_for, cell_stats, cell_summary, choose_cell, mean_over_seeds,
                       read_results, result_rows, split_masks, strata_of)
from ..backends.base import resolve_device
from ..stages.base import Stage, StageRun, fields, register

if TYPE_CHECKING:  # torch is imported where it is used: listing the stages (truthmap --help) does not load it
    import torch

SITE = "baseline"  # a row of the baselines table (stages/baselines.py's SITE)
POSITION = "whole_map"
STACK_CS = tuple(float(c) for c in np.logspace(-3, 1, 9))  # the combiner's C, chosen on validation
NULL_LEVEL = 0.05  # a cell beats the null when its corrected p is at most this
NULL_COLUMNS = ["site", "layer", "position", "ridge_auc", "p", "beats_null"]
SCORE_COLUMNS = ["seed", "id", "score"]
GRADER_COLUMNS = ("correct_alias", "correct_strict", "correct_lenient")  # answers.parquet, true = right


# ---------------------------------------------------------------------- the ridge probe of every cell

def ridge_cells(X: torch.Tensor, y: np.ndarray, train: np.ndarray, evaluate: np.ndarray, alpha: float
                ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Ridge probes of P cells that share their rows, for one split.

    ``X`` float ``[P, N, d]``, ``y`` ``[N]`` (1 = error; or ``[G, N]``, G labellings of the same answers,
    each fitted), ``train`` bool ``[P, N]`` (the train rows of each cell: the split's train part where the
    position exists), ``evaluate`` int ``[n]`` (rows whose map from train labels is returned). Returns
    (``scores`` float64 ``[P, N]`` (``[G, P, N]``): leave-one-out scores on each cell's train rows,
    full-train scores elsewhere; ``operator`` float32 ``[P, n, T]`` and ``rows`` int
    ``[T]``, the rows in some cell's train part: the ``evaluate`` rows' scores as a linear map of the
    labels of ``rows`` (zero where a row is not in the cell's train part), so that
    ``operator @ y_permuted[rows]`` are their scores under permuted labels, up to a constant per cell).

    Products in float32; the penalised Gram matrix is inverted in float64."""
    import torch

    device = X.device
    rows = np.flatnonzero(train.any(0))
    mask = torch.as_tensor(train[:, rows], dtype=torch.float32, device=device)  # [P, T]
    count = mask.sum(1).clamp(min=1)  # [P]
    Xtr = X[:, torch.as_tensor(rows, device=device)].float()
    mean = torch.bmm(mask[:, None], Xtr) / count[:, None, None]  # [P, 1, d]
    Ztr = Xtr - mean
    Ztr *= mask[..., None]
    sd = torch.linalg.vector_norm(Ztr, dim=1, keepdim=True) / count.sqrt()[:, None, None]
    sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))
    Ztr /= sd
    d, n_rows = X.shape[-1], len(rows)
    # K = (ZᵀZ + αI)⁻¹Zᵀ = Zᵀ(ZZᵀ + αI)⁻¹: the smaller of the two systems is solved (d × d, or rows × rows)
    dual = n_rows < d
    gram = torch.bmm(Ztr, Ztr.transpose(1, 2)) if dual else torch.bmm(Ztr.transpose(1, 2), Ztr)
    gram = gram.double() + alpha * torch.eye(gram.shape[-1], dtype=torch.float64, device=device)
    lower, info = torch.linalg.cholesky_ex(gram)
    if bool(info.any()):
        raise TruthmapError("whole map: a cell's ridge system is not positive definite (are the features finite?)")
    if dual:  # [P, d, T]: w = K y; Zᵀ(ZZᵀ + αI)⁻¹ is the transpose of (ZZᵀ + αI)⁻¹Z
        K = torch.cholesky_solve(Ztr.double(), lower).float().transpose(1, 2)
    else:
        K = torch.cholesky_solve(Ztr.transpose(1, 2).double(), lower).float()
    labels = np.atleast_2d(y)  # [G, N]: one fit per row of labels, all from the same K
    rows_t = torch.as_tensor(rows, device=device)
    Zall = (X.float() - mean) / sd  # [P, N, d]
    leverage = (Ztr * K.transpose(1, 2)).sum(-1).double() + 1.0 / count[:, None].double()  # [P, T]
    out = []
    for label in labels:
        yt = torch.as_tensor(label[rows], dtype=torch.float32, device=device)[None] * mask
        mean_y = yt.sum(1) / count  # [P]
        w = torch.bmm(K, ((yt - mean_y[:, None]) * mask)[..., None])  # [P, d, 1]
        scores = (torch.bmm(Zall, w)[..., 0] + mean_y[:, None]).double()  # [P, N] full-train
        fitted = scores[:, rows_t]
        ytd = yt.double()
        loo = ytd - (ytd - fitted) / (1.0 - leverage).clamp(min=1e-6)
        scores[:, rows_t] = torch.where(mask > 0, loo, fitted)
        out.append(scores.cpu().numpy())
    scores = np.stack(out) if np.ndim(y) == 2 else out[0]
    Zev = Zall[:, torch.as_tensor(evaluate, device=device)]
    return scores, torch.bmm(Zev, K), rows


def auc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` ``[..., n]`` against ``positive`` bool (same shape or
    broadcastable), ties counted one half; NaN for a row without both classes."""
    from scipy.stats import rankdata

    positive = np.broadcast_to(positive, scores.shape)
    ranks = rankdata(scores, axis=-1)
    n_pos = positive.sum(-1)
    n_neg = positive.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * positive).sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def permutations(y: np.ndarray, blocks: np.ndarray, n: int, seed: int = 0, groups: np.ndarray | None = None
                 ) -> np.ndarray:
    """``[n, N]`` copies of ``y``, each permuted within the blocks (an int per row; rows of a negative
    block keep their label). With ``groups`` (an int per row), whole units move instead of single rows:
    a unit is a group's rows within one block, and units of the same size trade their labels as they
    are, so labels that go together in a group (related questions) stay together under the null."""
    rng = np.random.default_rng(seed)
    out = np.tile(y, (n, 1))
    units = np.arange(len(y)) if groups is None else pd.factorize(pd.Series(list(zip(groups, blocks))))[0]
    for block in np.unique(blocks[blocks >= 0]):
        in_block = np.flatnonzero(blocks == block)
        members = pd.Series(in_block).groupby(units[in_block]).agg(list)  # unit -> its rows
        for size, same in members.groupby(members.map(len)):
            rows = np.array(same.tolist())  # [m, size]: m units of this size
            if len(rows) < 2:
                continue
            order = rng.permuted(np.tile(np.arange(len(rows)), (n, 1)), axis=1)  # [n, m]
            out[:, rows.reshape(-1)] = y[rows][order].reshape(n, -1)
    return out


# ---------------------------------------------------------------------- the combiner

def stack(cell_scores: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray], Cs=STACK_CS
          ) -> tuple[np.ndarray, list[float], np.ndarray]:
    """The level-two model of each seed.

    ``cell_scores`` ``[S, N, F]`` (F cells; NaN where a cell has no score), ``y`` ``[N]``, ``parts``
    ``{"train" | "validation" | "test": bool [S, N]}``. Per seed: missing scores filled with the train
    rows' mean, features standardised on the train rows, ``LogisticRegression(C)`` fitted on the train
    rows for each C of ``Cs``, the C with the best validation AUC kept (the smaller on a tie). Returns
    (P(error) ``[S, N]`` of every row under the kept model, the kept C per seed, the validation AUC per
    seed)."""
    from sklearn.linear_model import LogisticRegression

    n_seeds, n, _ = cell_scores.shape
    out = np.full((n_seeds, n), np.nan)
    chosen, val_aucs = [], np.full(n_seeds, np.nan)
    for s in range(n_seeds):
        F = cell_scores[s].copy()
        train, val = parts["train"][s], parts["validation"][s]
        fill = np.nanmean(np.where(train[:, None], F, np.nan), axis=0)
        fill = np.where(np.isfinite(fill), fill, 0.0)
        F = np.where(np.isfinite(F), F, fill[None])
        mean, sd = F[train].mean(0), F[train].std(0)
        F = (F - mean) / np.where(sd > 1e-12, sd, 1.0)
        best = None
        for C in Cs:
            model = LogisticRegression(C=C, max_iter=5000).fit(F[train], y[train])
            prob = model.predict_proba(F)[:, 1]
            val_auc = float(auc_rows(prob[val], y[val].astype(bool)))
            if best is None or val_auc > best[0] + 1e-12:
                best = (val_auc, C, prob)
        val_aucs[s], out[s] = best[0], best[2]
        chosen.append(best[1])
    return out, chosen, val_aucs


# ---------------------------------------------------------------------- the stage

def layer_pass(X: torch.Tensor, valid: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray], evaluate: np.ndarray,
               permuted: np.ndarray | None, alpha: float, graders: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The ridge probes of P cells (one layer) for every seed.

    ``X`` ``[P, N, d]``, ``valid`` bool ``[N, P]``, ``y`` ``[N]``, ``parts`` ``{part: bool [S, N]}``,
    ``evaluate`` the rows of every seed's test part, ``permuted`` ``[B, N]`` labels or None, ``graders``
    ``[G, N]`` other labellings of the answers (1 = wrong by that grader) or None. Returns (scores
    ``[S, P, N]``: leave-one-out on train rows, NaN where the position is missing; the observed test AUC
    ``[S, P]``; the test AUC under each permutation ``[S, P, B]``; the probes refitted on each grader's
    labels, scores ``[G, S, P, N]`` float32, or None)."""
    import torch

    n_seeds, n_positions = parts["train"].shape[0], X.shape[0]
    n_perm = 0 if permuted is None else len(permuted)
    scores_out = np.full((n_seeds, n_positions, len(y)), np.nan)
    observed = np.full((n_seeds, n_positions), np.nan)
    null = np.full((n_seeds, n_positions, n_perm), np.nan)
    graded = None if graders is None else np.full((len(graders), n_seeds, n_positions, len(y)), np.nan, np.float32)
    for s in range(n_seeds):
        train = parts["train"][s][None] & valid.T  # [P, N]
        labels = y if graders is None else np.vstack([y[None], graders])
        scores, operator, rows = ridge_cells(X, labels, train, evaluate, alpha=alpha)
        if graders is not None:
            graded[:, s] = np.where(valid.T[None], scores[1:], np.nan)
            scores = scores[0]
        scores_out[s] = np.where(valid.T, scores, np.nan)
        if n_perm:
            Y = torch.as_tensor(permuted[:, rows].T, dtype=torch.float32, device=operator.device)
            null_scores = torch.matmul(operator, Y).cpu().numpy()  # [P, n_eval, B]
        for p in range(n_positions):
            tested = parts["test"][s] & valid[:, p]
            observed[s, p] = auc_rows(scores[p, tested], y[tested].astype(bool))
            if n_perm:
                keep = tested[evaluate]
                null[s, p] = auc_rows(null_scores[p, keep].T, permuted[:, evaluate[keep]].astype(bool))
    return scores_out, observed, null, graded


def run_wholemap(run_dir: Path | rf.Run, sites: list[str], *, C: float = 1.0, n_boot: int = 1000,
                 n_permutations: int = 199, device: str = "cpu", progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """The whole-map probe and the permutation null of every cell; returns (``wholemap_results.csv``'s
    table, ``wholemap_scores.parquet``'s, ``cell_null.csv``'s (without permutations: ``p`` and
    ``beats_null`` empty), the summary.json fields ``whole_map``, ``cell_null`` (with permutations) and
    ``graders`` (with two or more graders' labels)). ``run_dir``: a run folder or an open Run; the folder
    is read under one shared lock (:meth:`Run.reading <truthmap.runfolder.Run.reading>`)."""
    with rf.Run.reading(run_dir) as run:
        return _run_wholemap(run, sites, C=C, n_boot=n_boot, n_permutations=n_permutations,
                             device=device, progress=progress)


def _run_wholemap(run: rf.Run, sites: list[str], *, C: float, n_boot: int, n_permutations: int, device: str,
                  progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, dict]:
    import torch
    from tqdm.auto import tqdm

    from ..stages.extract import load_layer

    run_dir = run.root
    answers = run.read_parquet(rf.ANSWERS)
    splits = run.read_splits(rf.SPLITS)
    meta = run.read_activations_index()
    ids = meta["ids"]
    label_of = dict(zip(answers["id"], ~answers["correct"].astype(bool)))
    y = np.array([label_of[i] for i in ids], dtype=np.int64)  # 1 = error
    seeds, parts = split_masks(splits, ids)
    weights = bootstrap_for(answers, ids, n_boot)
    strata = strata_of(answers, ids)
    in_study = parts["train"].any(0) | parts["validation"].any(0) | parts["test"].any(0)
    evaluate = np.flatnonzero(parts["test"].any(0))  # every seed's test rows (one part, once the seeds share it)
    blocks = np.where(in_study, strata * 2 + parts["test"][0], -1)  # rows outside the study keep their label
    groups = _groups(answers, ids)
    permuted = permutations(y, blocks, n_permutations, groups=groups) if n_permutations else None
    graders, grader_errors, unlabelled = grader_labels(answers, ids, in_study)
    n_seeds = len(seeds)
    keys, columns, observed, null, graded = [], [], [], [], []
    total = sum(len(meta["sites"][site]["layers"]) for site in sites)
    bar = tqdm(total=total, desc="whole map", unit="layer", disable=not progress)
    for site in sites:
        for layer in meta["sites"][site]["layers"]:
            _, positions, features, valid = load_layer(run, site, layer)
            X = torch.as_tensor(np.asarray(features), device=device)  # [P, N, d] float16
            layer_scores, layer_obs, layer_null, layer_graded = layer_pass(
                X, valid, y, parts, evaluate, permuted, alpha=4.0 / C, graders=grader_errors)
            for p, position in enumerate(positions):
                keys.append((site, int(layer), position))
                columns.append(layer_scores[:, p])
                if layer_graded is not None:
                    graded.append(layer_graded[:, :, p])  # [G, S, N]
                observed.append(_seed_mean(layer_obs[:, p]))
                null.append(_seed_mean(layer_null[:, p]))
            bar.update(1)
    bar.close()
    if not keys:
        raise CannotRun(f"{run_dir}: no probe cells to combine (sites {sites})")

    stacked, chosen_C, val_aucs = stack(np.stack(columns, axis=-1), y, parts)
    per_seed, cell = cell_stats(stacked, y, parts, weights, strata)
    for row in per_seed:
        row["n_train"] = int(row["n_train"])
    results = pd.DataFrame(result_rows(SITE, -1, POSITION, seeds, per_seed, cell), columns=RESULT_COLUMNS)
    tested = [np.flatnonzero(parts["test"][s] & np.isfinite(stacked[s])) for s in range(n_seeds)]
    scores = pd.DataFrame({"seed": np.concatenate([np.full(len(t), int(seeds[s])) for s, t in enumerate(tested)]),
                           "id": np.asarray(ids, dtype=object)[np.concatenate(tested)],
                           "score": np.concatenate([stacked[s, t] for s, t in enumerate(tested)])},
                          columns=SCORE_COLUMNS)
    summary = {"whole_map": _against_best_cell(run, stacked, y, parts, weights, ids, seeds, results,
                                                chosen_C, val_aucs, len(keys)),
               "cell_null": None, "graders": None}  # None: not computed in this run (clears an earlier run's)
    if permuted is not None:
        table, summary["cell_null"] = null_table(keys, np.asarray(observed), np.stack(null), n_permutations)
    else:  # the ridge probes' AUCs without a null: every p empty (the file is still this run's)
        table = pd.DataFrame({"site": [k[0] for k in keys], "layer": [k[1] for k in keys],
                              "position": [k[2] for k in keys], "ridge_auc": np.asarray(observed),
                              "p": np.nan, "beats_null": None}, columns=NULL_COLUMNS)
    if len(graders) + len(unlabelled) >= 2:
        summary["graders"] = grader_summary(answers, ids, in_study, graders, unlabelled, keys, columns, y,
                                            np.stack(graded, axis=2) if graded else None, grader_errors, parts,
                                            weights, strata)
    return results, scores, table, summary


# ---------------------------------------------------------------------- grader sensitivity

def grader_labels(answers: pd.DataFrame, ids: list[str], in_study: np.ndarray
                  ) -> tuple[list[str], np.ndarray | None, list[str]]:
    """The graders of ``answers.parquet`` (its ``GRADER_COLUMNS``, true = right) whose label every
    answer of the study has: (their columns, their errors ``[G, N]`` (1 = wrong) or None, the columns
    that leave some answer of the study ungraded — compared for agreement where graded, never probed)."""
    present = [c for c in GRADER_COLUMNS if c in answers.columns]
    table = answers.set_index("id").reindex(ids)
    complete, partial = [], []
    for column in present:
        labelled = table[column].notna().to_numpy()
        (complete if labelled[in_study].all() else partial).append(column)
    if not complete:
        return [], None, partial
    errors = np.stack([(~table[c].fillna(True).astype(bool)).to_numpy().astype(np.int64) for c in complete])
    return complete, errors, partial


def grader_summary(answers: pd.DataFrame, ids: list[str], in_study: np.ndarray, graders: list[str],
                   unlabelled: list[str], keys: list[tuple], columns: list[np.ndarray], y: np.ndarray,
                   graded: np.ndarray | None, errors: np.ndarray | None, parts: dict, weights: np.ndarray,
                   strata: np.ndarray) -> dict:
    """summary.json's ``graders``: each grader's accuracy, every pair's agreement (counts, Cohen's kappa,
    the answers whose label flips), and per grader the cell chosen on validation by ridge probes refitted
    on its labels, with its test AUC (interval of the mean over seeds), and the AUC under its labels of
    the cell the run's own labels (``correct``) choose. ``graded`` ``[G, S, F, N]``: the refitted probes'
    scores of the F cells ``keys``; ``columns``: the F cells' ``[S, N]`` scores under ``correct``."""
    from sklearn.metrics import cohen_kappa_score

    table = answers.set_index("id").reindex(ids)[[*graders, *unlabelled]][in_study]
    right = {c: table[c] for c in table.columns}
    agreement = []
    names = [*graders, *unlabelled]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = right[a].notna() & right[b].notna()
            ra, rb = right[a][both].astype(bool), right[b][both].astype(bool)
            flips = list(ra.index[ra != rb])
            agreement.append({"a": a, "b": b, "n": int(both.sum()), "both_right": int((ra & rb).sum()),
                              "both_wrong": int((~ra & ~rb).sum()), "a_right_b_wrong": int((ra & ~rb).sum()),
                              "a_wrong_b_right": int((~ra & rb).sum()), "flips": len(flips),
                              "kappa": _round(cohen_kappa_score(ra, rb)) if len(set(ra) | set(rb)) > 1 else None,
                              "flipped_ids": flips[:10]})
    out = {"columns": names, "answers": int(in_study.sum()),
           "accuracy": {c: _round(right[c].dropna().astype(bool).mean()) for c in names},
           "ungraded": {c: int(right[c].isna().sum()) for c in unlabelled},
           "agreement": agreement, "probes": []}
    if graded is None:
        return out
    main = _choose(np.stack(columns, axis=1), y, parts)  # the cell the run's own labels choose (ridge probes)
    for g, grader in enumerate(graders):
        chosen = _choose(graded[g], errors[g], parts)
        if chosen is None or main is None:
            out["probes"].append({"grader": grader, "note": "its labels leave a validation part without both "
                                                            "right and wrong answers: no cell chosen"})
            continue
        per_seed, cell = cell_stats(graded[g][:, chosen].astype(np.float64), errors[g], parts, weights, strata,
                                    probability=False)
        main_rows, _ = cell_stats(graded[g][:, main].astype(np.float64), errors[g], parts, weights, strata,
                                  probability=False)
        site, layer, position = keys[chosen]
        out["probes"].append({
            "grader": grader, "site": site, "layer": layer, "position": position,
            "val_auc": _round(np.nanmean([r["val_auc"] for r in per_seed])),
            "auc": _round(np.nanmean([r["auc"] for r in per_seed])),
            "auc_lo": _round(cell["mean_auc_lo"]), "auc_hi": _round(cell["mean_auc_hi"]),
            "auc_of_correct_cell": _round(np.nanmean([r["auc"] for r in main_rows])),
            "correct_cell": {"site": keys[main][0], "layer": keys[main][1], "position": keys[main][2]}})
    return out


def _choose(scores: np.ndarray, y: np.ndarray, parts: dict) -> int | None:
    """Index of the cell with the highest mean validation AUC over seeds; ``scores`` ``[S, F, N]``; None
    when no cell has one (labels without both classes in every validation part)."""
    aucs = np.full(scores.shape[:2], np.nan)
    for s in range(scores.shape[0]):
        for f in range(scores.shape[1]):
            rows = parts["validation"][s] & np.isfinite(scores[s, f])
            aucs[s, f] = auc_rows(scores[s, f, rows].astype(np.float64), y[rows].astype(bool))
    means = _seed_mean(aucs)
    return None if np.isnan(means).all() else int(np.nanargmax(means))


def _round(value) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else round(value, 4)


def _groups(answers: pd.DataFrame, ids: list[str]) -> np.ndarray:
    """The group of related questions of each answer in ``ids`` (splits.split_groups, as the bootstrap)."""
    from ..splits import split_groups

    group_of = dict(zip(answers["id"], split_groups(answers.reset_index(drop=True))))
    return np.array([group_of[i] for i in ids], dtype=np.int64)


def _seed_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the first axis (seeds), NaN where no seed has a value."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def null_table(keys: list[tuple], observed: np.ndarray, null: np.ndarray, n_permutations: int,
               level: float = NULL_LEVEL) -> tuple[pd.DataFrame, dict]:
    """``cell_null.csv``'s table and summary.json's ``cell_null`` from each cell's observed statistic
    ``[F]`` and its statistic under each permutation ``[F, B]``: the max over cells per permutation is
    the null of every cell (family-wise correction)."""
    largest = np.nanmax(np.where(np.isfinite(null), null, -np.inf), axis=0)  # [B]
    p = (1 + (largest[None, :] >= observed[:, None]).sum(1)) / (1 + n_permutations)
    p = np.where(np.isfinite(observed), p, np.nan)
    table = pd.DataFrame({"site": [k[0] for k in keys], "layer": [k[1] for k in keys],
                          "position": [k[2] for k in keys], "ridge_auc": observed, "p": p,
                          "beats_null": np.isfinite(p) & (p <= level)}, columns=NULL_COLUMNS)
    beat = table[table["beats_null"]]
    summary = {"permutations": int(n_permutations), "p_resolution": round(1 / (1 + n_permutations), 4),
               "level": level, "cells": int(len(table)), "cells_beating_null": int(len(beat)),
               "null_max_auc_95": round(float(np.percentile(largest, 95)), 4),
               "beats_null": [{"site": r.site, "layer": int(r.layer), "position": r.position,
                               "ridge_auc": round(float(r.ridge_auc), 4), "p": round(float(r.p), 4)}
                              for r in beat.itertuples()]}
    return table, summary


def _against_best_cell(run: rf.Run, stacked: np.ndarray, y: np.ndarray, parts: dict, weights: np.ndarray,
                       ids: list[str], seeds: list, results: pd.DataFrame, chosen_C: list[float],
                       val_aucs: np.ndarray, n_cells: int) -> dict:
    """summary.json's ``whole_map``: its test AUC and the paired difference against the heatmap's cell
    chosen on validation (``probe_results.csv``, its test scores from ``probe_scores.parquet``)."""
    from ..stages.verdict import compare

    mean = mean_over_seeds(results).iloc[0]
    out = {"method": "stacking: a ridge probe per cell (leave-one-out scores on train), an L2 logistic "
                     "regression over the cells' scores fitted on train, its C chosen on validation",
           "cells": int(n_cells), "C": chosen_C, "val_auc": round(float(np.nanmean(val_aucs)), 4),
           **{k: None if pd.isna(mean[k]) else round(float(mean[k]), 4) for k in ("auc", "auc_lo", "auc_hi", "auc_std")},
           "against": None, "paired": None}
    best = choose_cell(mean_over_seeds(read_results(run.path(rf.PROBE_RESULTS))))
    if best is None:
        return out
    table = run.read_parquet(rf.PROBE_SCORES)
    table = table[(table["site"] == best["site"]) & (table["layer"] == best["layer"])
                  & (table["position"].astype(str) == str(best["position"]))]
    row_of = {i: k for k, i in enumerate(ids)}
    cell_scores = np.full_like(stacked, np.nan)
    for s, seed in enumerate(seeds):
        rows = table[table["seed"] == int(seed)]
        cell_scores[s, [row_of[i] for i in rows["id"]]] = rows["score"].to_numpy(dtype=float)
    # the verdict's paired comparison, on the one test part (the first seed's: the same for every seed)
    test = parts["test"][0]
    c = compare(stacked[:, test], cell_scores[:, test], y[test], weights[:, test])
    paired = {"auc_a": c["auc_a"], "auc_b": c["auc"], "diff": c["diff"], "low": c["low"], "high": c["high"],
              "p": c["p"], "shown": c["shown"], "n_test": c["n"]}
    out["against"], out["paired"] = cell_summary(best), paired
    return out


# ---------------------------------------------------------------- the stage

def _wholemap(s: StageRun) -> None:
    """The whole map as one probe and the per-cell permutation null."""
    c, run = s.config, s.run
    device = resolve_device(c.device) if c.device_map is None else "cpu"
    results, scores, null, summary = run_wholemap(run, c.sites, C=c.C, n_boot=c.bootstrap,
                                                  n_permutations=c.permutations, device=device, progress=c.progress)
    run.write_csv(rf.WHOLEMAP_RESULTS, results)
    run.write_parquet(rf.WHOLEMAP_SCORES, scores)
    run.write_csv(rf.CELL_NULL, null)
    run.update_summary(**summary)


register(Stage(
    "wholemap", "4a", "The whole map as one probe, and the cells that beat a label-permutation null "
    "(wholemap_results.csv, cell_null.csv).", _wholemap,
    inputs=(rf.ANSWERS, rf.SPLITS, rf.ACTIVATIONS, rf.PROBE_RESULTS, rf.PROBE_SCORES),
    outputs=(rf.WHOLEMAP_RESULTS, rf.WHOLEMAP_SCORES, rf.CELL_NULL),
    settings=fields("C", "bootstrap", "sites", "permutations"), labelled=True, optional=True, summary=True))
