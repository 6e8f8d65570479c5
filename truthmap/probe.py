"""Stage 4 — a logistic-regression probe per (site, layer, position, seed), all fitted together.

Reads ``activations/`` (features), ``answers.parquet`` (labels) and ``splits.json``; writes
``probe_results.csv`` — one row per (site, layer, position, seed) with
``site, layer, position, seed, auc, auc_lo, auc_hi, accuracy, n_train, n_test`` — and
``probe_scores.parquet`` (``site, layer, position, seed, id, score``: each test example's P(error)).

The positive class is *error* (the answer is wrong). Each probe is scikit-learn's
``LogisticRegression(C=1.0)`` on features standardised with the train split's mean and deviation; we
solve the same problem for many cells at once with a batched L-BFGS in torch (see
:class:`BatchedLogisticRegression`), so the AUCs agree with scikit-learn's to well within 0.01.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import TruthmapError
from .extract import load_layer
from .label import MIN_PER_CLASS
from .runfolder import ACTIVATIONS, read_json

RESULT_COLUMNS = ["site", "layer", "position", "seed", "auc", "auc_lo", "auc_hi", "accuracy", "n_train", "n_test"]


class BatchedLogisticRegression:
    """L2 logistic regression for many independent problems that share one feature matrix per cell.

    ``fit(X, y, train)`` with ``X`` float ``[C, N, d]`` (C cells), ``y`` ``[N]`` (1 = error) and
    ``train`` bool ``[C, S, N]`` (S splits, e.g. seeds) fits C×S problems: for each, features are
    standardised on its own train rows and ``0.5·|w|² + C·Σ logloss`` is minimised over w and an
    unpenalised intercept, the objective of scikit-learn's ``LogisticRegression(C=C)``. Learned state:
    ``coef_`` ``[C, S, d]`` and ``intercept_`` ``[C, S]`` in raw-feature units (standardisation folded in).

    The solver is L-BFGS run per problem in lock-step over the batch, with a backtracking line search
    per problem; the feature matrix is read once per iteration for all S splits.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 300, tol: float = 1e-4, history: int = 10):
        self.C, self.max_iter, self.tol, self.history = C, max_iter, tol, history

    def fit(self, X: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> "BatchedLogisticRegression":
        shift = X.float().mean(1, keepdim=True)  # centring first keeps the variance exact in float32
        X = X.float() - shift
        n_cells, n, d = X.shape
        y = y.float().to(X.device)
        train = train.float()
        count = train.sum(-1).clamp(min=1)  # [C, S]
        # train-split mean and deviation per problem: [C, S, d]
        mean = torch.bmm(train, X) / count[..., None]
        var = torch.bmm(train, X * X) / count[..., None] - mean * mean
        scale = 1.0 / var.clamp(min=0).sqrt().where(var > 1e-12, torch.ones_like(var))
        penalty = 1.0 / (self.C * count)  # mean-loss form: loss/n + |w|²/(2Cn)
        # per-cell state, compacted to the cells still iterating: X, train, count, penalty, mean, scale
        state = [X, train, count, penalty, mean, scale]

        def objective(theta, st):
            """Objective (float64) and gradient for the problems of state ``st``; theta ``[c, S, d+1]``."""
            Xc, tr, cnt, pen, mu, sc = st
            w, b = theta[..., :d], theta[..., d]
            v = w * sc  # weights on raw features
            logits = torch.bmm(v, Xc.transpose(1, 2)) + (b - (v * mu).sum(-1))[..., None]  # [c, S, N]
            loss = (torch.nn.functional.softplus(logits) - y * logits) * tr
            # float64 sums: the line search compares values closer than float32's resolution
            f = loss.double().sum(-1) / cnt.double() + 0.5 * pen.double() * (w.double() ** 2).sum(-1)
            r = (torch.sigmoid(logits) - y) * tr / cnt[..., None]  # d loss / d logit
            grad_v = torch.bmm(r, Xc) - mu * r.sum(-1, keepdim=True)
            grad = torch.cat([grad_v * sc + pen[..., None] * w, r.sum(-1, keepdim=True)], -1)
            return f, grad

        theta_out = torch.zeros((n_cells, train.shape[1], d + 1), dtype=X.dtype, device=X.device)
        cells = torch.arange(n_cells, device=X.device)  # original index of each active cell
        theta = theta_out.clone()
        f, g = objective(theta, state)
        history = []  # (s, y, rho) of the active cells, oldest first
        self.n_iter_ = self.n_evals_ = 0
        for it in range(self.max_iter):
            # a cell leaves the batch once all its problems meet the tolerance (scikit-learn's gtol)
            running = (g.abs().amax(-1) >= self.tol).any(-1)
            if not running.all():
                theta_out[cells[~running]] = theta[~running]
                keep = torch.nonzero(running).flatten()
                if len(keep) == 0:
                    break
                cells, theta, f, g = cells[keep], theta[keep], f[keep], g[keep]
                state = [t[keep] for t in state]
                history = [(s[keep], yk[keep], rho[keep]) for s, yk, rho in history]
            direction = -self._two_loop(g, history)
            slope = (direction * g).sum(-1)
            bad = slope >= 0  # not a descent direction (after a poor curvature pair): use the gradient
            direction = torch.where(bad[..., None], -g, direction)
            slope = torch.where(bad, -(g * g).sum(-1), slope)
            step = torch.ones_like(slope) if history else torch.clamp(1.0 / g.norm(dim=-1), max=1.0)
            f_new, g_new = objective(theta + step[..., None] * direction, state)
            self.n_evals_ += 1
            for _ in range(30):  # backtrack, re-evaluating only the cells where Armijo fails
                fail = f_new > f + 1e-4 * (step * slope).double()
                retry = torch.nonzero(fail.any(-1)).flatten()
                if len(retry) == 0:
                    break
                step[retry] = torch.where(fail[retry], step[retry] * 0.5, step[retry])
                f_new[retry], g_new[retry] = objective(
                    theta[retry] + step[retry, :, None] * direction[retry], [t[retry] for t in state]
                )
                self.n_evals_ += 1
            s = step[..., None] * direction
            yk = g_new - g
            sy = (s * yk).sum(-1)
            theta, f, g = theta + s, f_new, g_new
            history.append((s, yk, torch.where(sy > 1e-10, 1.0 / sy.clamp(min=1e-10), torch.zeros_like(sy))))
            if len(history) > self.history:
                history.pop(0)
            self.n_iter_ = it + 1
        else:
            theta_out[cells] = theta
        w, b = theta_out[..., :d], theta_out[..., d]
        self.coef_ = w * scale
        self.intercept_ = b - (self.coef_ * (mean + shift)).sum(-1)
        return self

    @staticmethod
    def _two_loop(g, history):
        """L-BFGS inverse-Hessian times ``g``; ``history`` holds (s, y, rho), oldest first."""
        q = g.clone()
        alphas = []
        for s, yk, rho in reversed(history):
            alpha = rho * (s * q).sum(-1)
            q = q - alpha[..., None] * yk
            alphas.append(alpha)
        if history:
            s, yk, _ = history[-1]
            gamma = (s * yk).sum(-1) / (yk * yk).sum(-1).clamp(min=1e-12)
            q = q * gamma.clamp(min=1e-8)[..., None]
        for (s, yk, rho), alpha in zip(history, reversed(alphas)):
            beta = rho * (yk * q).sum(-1)
            q = q + (alpha - beta)[..., None] * s
        return q

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits ``[C, S, N]`` of every problem on every row of ``X`` ``[C, N, d]``."""
        return torch.bmm(self.coef_, X.float().transpose(1, 2)) + self.intercept_[..., None]

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        """P(positive class) ``[C, S, N]``."""
        return torch.sigmoid(self.decision_function(X))


def auc_score(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC (ties count one half); with ``weights`` ``[B, n]`` one AUC per row of weights.

    Used with bootstrap counts as weights, so B resamples cost one sort.
    """
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order].astype(bool)
    w = np.ones((1, len(s))) if weights is None else np.asarray(weights, dtype=np.float64)[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    total = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (w_pos * (neg_below + 0.5 * w_neg)).sum(1) / total
    return auc if weights is not None else auc[0]


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` resampling counts (each row sums to n)."""
    rng = np.random.default_rng(10_000 + seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def check_split_sizes(labels: np.ndarray, splits: dict, ids: list[str], min_per_class: int = MIN_PER_CLASS) -> None:
    position = {i: k for k, i in enumerate(ids)}
    for seed, split in splits["seeds"].items():
        for part in ("train", "test"):
            y = labels[[position[i] for i in split[part]]]
            for value, name in ((1, "wrong"), (0, "right")):
                count = int((y == value).sum())
                if count < min_per_class:
                    raise TruthmapError(
                        f"splits.json, seed {seed}, {part} split: only {count} {name} answer{'s' * (count != 1)} "
                        f"(need at least {min_per_class}); study more questions (--limit) or a different mix, "
                        f"or accept wide AUC intervals with --min-per-class (at least 2)"
                    )


def run_probe(
    run_dir: Path,
    sites: list[str],
    C: float = 1.0,
    n_boot: int = 1000,
    device: str = "cpu",
    progress: bool = True,
    min_per_class: int = MIN_PER_CLASS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit and evaluate every probe; return (results table, test scores table).

    Every split must hold at least ``min_per_class`` right and wrong answers (an AUC from fewer is mostly
    noise; its bootstrap interval says how much).
    """
    from .runfolder import ANSWERS, SPLITS, read_parquet, read_splits

    run_dir = Path(run_dir)
    answers = read_parquet(run_dir / ANSWERS)
    splits = read_splits(run_dir / SPLITS)
    from .extract import read_index

    meta = read_index(run_dir)  # checked: a crafted index is a one-line error
    ids = meta["ids"]
    label_of = dict(zip(answers["id"], ~answers["correct"].astype(bool)))
    y = np.array([label_of[i] for i in ids], dtype=np.int64)  # 1 = error
    check_split_sizes(y, splits, ids, min_per_class)
    seeds = sorted(splits["seeds"], key=int)
    row_of = {i: k for k, i in enumerate(ids)}
    in_train = np.zeros((len(seeds), len(ids)), bool)
    in_test = np.zeros((len(seeds), len(ids)), bool)
    for s, seed in enumerate(seeds):
        in_train[s, [row_of[i] for i in splits["seeds"][seed]["train"]]] = True
        in_test[s, [row_of[i] for i in splits["seeds"][seed]["test"]]] = True
    boots = {s: bootstrap_counts(int(in_test[s].sum()), n_boot, int(seed)) for s, seed in enumerate(seeds)}
    y_t = torch.as_tensor(y, device=device)
    results, scores = [], []
    total = sum(len(meta["sites"][site]["layers"]) for site in sites)
    bar = tqdm(total=total, desc="probe", unit="layer", disable=not progress)
    for site in sites:
        for layer in meta["sites"][site]["layers"]:
            _, positions, features, valid = load_layer(run_dir, site, layer)
            X = torch.as_tensor(np.asarray(features), device=device).float()  # [P, N, d]
            train = torch.as_tensor(in_train[None] & valid.T[:, None], device=device)  # [P, S, N]
            model = BatchedLogisticRegression(C=C).fit(X, y_t, train)
            prob = model.predict_proba(X).cpu().numpy()  # [P, S, N]
            for p, position in enumerate(positions):
                for s, seed in enumerate(seeds):
                    test = in_test[s] & valid[:, p]
                    n_train = int((in_train[s] & valid[:, p]).sum())
                    if test.sum() == 0 or len(set(y[test])) < 2 or n_train == 0:
                        auc = lo = hi = acc = float("nan")
                    else:
                        score = prob[p, s, test]
                        auc = float(auc_score(score, y[test]))
                        # bootstrap over the seed's test split; rows of this cell's invalid examples get no weight
                        counts = boots[s][:, valid[in_test[s], p]]
                        lo, hi = np.nanpercentile(auc_score(score, y[test], counts), [2.5, 97.5])
                        acc = float(((score >= 0.5) == y[test]).mean())
                        scores.append(pd.DataFrame({"site": site, "layer": layer, "position": position,
                                                    "seed": int(seed), "id": np.asarray(ids)[test], "score": score}))
                    results.append([site, layer, position, int(seed), auc, float(lo), float(hi), acc, n_train, int(test.sum())])
            bar.update(1)
    bar.close()
    table = pd.DataFrame(results, columns=RESULT_COLUMNS)
    score_table = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(
        columns=["site", "layer", "position", "seed", "id", "score"])
    return table, score_table


def mean_over_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (site, layer, position): mean AUC over seeds, its spread (std), and mean interval."""
    grouped = results.groupby(["site", "layer", "position"], sort=False)
    out = grouped.agg(auc=("auc", "mean"), auc_std=("auc", "std"), auc_lo=("auc_lo", "mean"),
                      auc_hi=("auc_hi", "mean"), accuracy=("accuracy", "mean"),
                      n_train=("n_train", "mean"), n_test=("n_test", "mean"), seeds=("seed", "nunique"))
    out["auc_std"] = out["auc_std"].fillna(0.0)
    return out.reset_index()


def top_cells(results: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    return mean_over_seeds(results).sort_values("auc", ascending=False).head(k).reset_index(drop=True)


def heldout_best_auc(scores: pd.DataFrame, error_of: dict, rounds: int = 10) -> dict | None:
    """The AUC to expect of the best cell on answers that did not choose it.

    The heatmap's best cell is the best of hundreds on the test splits that score it, so its AUC is
    optimistic. Here each seed's test answers are cut into two stratified halves (``rounds`` times, seeded);
    the cell with the best AUC on one half is scored on the other half, both ways round. ``scores`` is
    ``probe_scores.parquet`` (site, layer, position, seed, id, score); ``error_of`` maps id -> wrong.
    Returns the mean and spread of those held-out AUCs, their number, and the cell chosen most often.
    """
    held_out, chosen = [], {}
    for seed, part in scores.groupby("seed", sort=True):
        ids = np.array(sorted(part["id"].unique()))
        y = np.array([bool(error_of[i]) for i in ids])
        rng = np.random.default_rng(20_000 + int(seed))
        halves = np.zeros((rounds, len(ids)), bool)
        for r in range(rounds):
            for value in (False, True):
                members = rng.permutation(np.flatnonzero(y == value))
                halves[r, members[: len(members) // 2]] = True
        weights = np.stack([halves, ~halves], axis=1).reshape(2 * rounds, len(ids)).astype(np.float64)
        row_of = {i: k for k, i in enumerate(ids)}
        cells, aucs = [], []
        for cell, rows in part.groupby(["site", "layer", "position"], sort=False):
            cols = np.fromiter((row_of[i] for i in rows["id"]), dtype=np.int64, count=len(rows))
            cells.append(cell)
            aucs.append(auc_score(rows["score"].to_numpy(np.float64), y[cols], weights[:, cols]))
        table = np.array(aucs)  # [cell, 2 * rounds]: AUC of every cell on every half
        for pick in range(2 * rounds):
            if np.isnan(table[:, pick]).all():
                continue
            best = int(np.nanargmax(table[:, pick]))
            other = pick + 1 if pick % 2 == 0 else pick - 1  # the other half of the same cut
            if not np.isnan(table[best, other]):
                held_out.append(float(table[best, other]))
                chosen[cells[best]] = chosen.get(cells[best], 0) + 1
    if not held_out:
        return None
    site, layer, position = max(chosen, key=chosen.get)
    return {"auc": float(np.mean(held_out)), "auc_std": float(np.std(held_out)), "n": len(held_out),
            "most_chosen": {"site": site, "layer": int(layer), "position": position,
                            "share": chosen[(site, layer, position)] / len(held_out)}}


def read_results(path) -> pd.DataFrame:
    """``probe_results.csv`` as written: positions stay text ("-1" is a position name, not a number)."""
    from .runfolder import read_csv

    return read_csv(path, dtype={"site": str, "position": str})  # a missing or damaged file: one line
