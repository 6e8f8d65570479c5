"""Stage 4 — a logistic-regression probe per (site, layer, position, seed), all fitted together.

Reads ``activations/`` (features), ``answers.parquet`` (labels) and ``splits.json``; writes
``probe_results.csv`` — one row per (site, layer, position, seed), columns ``RESULT_COLUMNS`` (test AUC
and its interval, validation AUC, the AUC within strata, and the interval of the mean over seeds) — and
``probe_scores.parquet`` (``site, layer, position, seed, id, score``: each test example's P(error)).

The positive class is *error* (the answer is wrong). Each probe is scikit-learn's
``LogisticRegression(C=1.0)`` on features standardised with the train split's mean and deviation; we
solve the same problem for many cells at once with a batched, preconditioned L-BFGS in torch (see
:class:`BatchedLogisticRegression`), so the AUCs agree with scikit-learn's to well within 0.01.

Every probe is fitted on its seed's train part and scored on its validation part and on the one test
part, the same in every seed and never seen by any (truthmap/splits.py). The heatmap shows test AUCs; the
best cell and its region are chosen on validation AUCs alone (:func:`choose_cell`, :func:`best_region`),
so the AUC reported for the choice is free of it. Intervals come from one cluster bootstrap shared by
every cell and seed (:func:`group_bootstrap`): a replicate re-weights whole groups of related questions;
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
import torch
from tqdm.auto import tqdm

from ..errors import TruthmapError
from .extract import load_layer
from .label import MIN_PER_CLASS


NOT_WHITENED = "probe: the features of a position cannot be whitened (are they finite?)"
RESULT_COLUMNS = ["site", "layer", "position", "seed", "auc", "auc_lo", "auc_hi", "accuracy", "n_train", "n_test",
                  "val_auc", "n_val", "within_auc", "within_val_auc", "mean_auc_lo", "mean_auc_hi", "val_auc_se",
                  "seed_sd"]
SCORE_COLUMNS = ["site", "layer", "position", "seed", "id", "score"]


class BatchedLogisticRegression:
    """L2 logistic regression for many independent problems that share one feature matrix per cell.

    ``fit(X, y, train)`` with ``X`` float ``[C, N, d]`` (C cells), ``y`` ``[N]`` (1 = error) and
    ``train`` bool ``[C, S, N]`` (S splits, e.g. seeds) fits C×S problems: for each, features are
    standardised on its own train rows and ``0.5·|w|² + C·Σ logloss`` is minimised over w and an
    unpenalised intercept, the objective of scikit-learn's ``LogisticRegression(C=C)``, to the same
    stopping rule (every gradient entry below ``tol``). Learned state: ``coef_`` ``[C, S, d]`` and
    ``intercept_`` ``[C, S]`` in raw-feature units (standardisation folded in).

    The solver is L-BFGS run per problem in lock-step over the batch, with a backtracking line search
    per problem. The logits are linear in the parameters, so each iteration reads the feature matrix twice
    for all S splits, whatever the line search tries: once for the logits of the search direction, once
    for the gradient at the step taken. Hidden states are strongly correlated, which makes the plain
    problem ill-conditioned (hundreds of iterations); the solver therefore works in whitened coordinates
    ``w = L⁻ᵀu`` with ``L Lᵀ = R/4 + λI`` (R: the correlation of the cell's standardised features over the
    rows that are in some split's train part, λ: the penalty) — features only, no labels. With fewer rows
    than half the features, ``w = Mu`` with ``M² = (R/4 + λI)⁻¹`` in a low-rank form instead
    (:meth:`_whitening_low_rank`). This changes the path to the optimum, not the optimum (the problem is
    strictly convex), and cuts the iterations about sixfold.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 300, tol: float = 1e-4, history: int = 10,
                 low_rank: bool | None = None):
        self.C, self.max_iter, self.tol, self.history = C, max_iter, tol, history
        self.low_rank = low_rank  # the whitening as a low-rank update (None: with fewer rows than d / 2)

    def fit(self, X: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> "BatchedLogisticRegression":
        # the features are copied twice, into X and into one work buffer of the same size that serves in
        # turn as the squares, the whitening's scratch and the solver's feature matrix: a fresh buffer of
        # this size costs more in page faults than the arithmetic done with it
        X = X.float()
        shift = X.mean(1, keepdim=True)  # centring first keeps the variance exact in float32
        used = train.reshape(-1, train.shape[-1]).any(0)  # rows in no problem's train part weigh nothing
        X = X[:, used]
        X -= shift
        n_cells, n, d = X.shape
        y = y.float().to(X.device)[used]
        train = train[..., used].float()
        count = train.sum(-1).clamp(min=1)  # [C, S]
        # train-split mean and deviation per problem: [C, S, d]
        mean = torch.bmm(train, X) / count[..., None]
        work = torch.mul(X, X)
        var = torch.bmm(train, work) / count[..., None] - mean * mean
        scale = 1.0 / var.clamp(min=0).sqrt().where(var > 1e-12, torch.ones_like(var))
        penalty = 1.0 / (self.C * count)  # mean-loss form: loss/n + |w|²/(2Cn)
        low_rank = 2 * n < d if self.low_rank is None else self.low_rank
        if low_rank:  # (a, Q, D): M = a·I + Q diag(D) Qᵀ, symmetric, M² = (R/4 + λI)⁻¹
            whitening = self._whitening_low_rank(X, train, penalty, work)
        else:  # (L⁻¹,): [C, d, d], lower triangular
            whitening = (self._whitening(X, train, penalty, work),)
        # per-cell state, compacted to the cells still iterating: X, train, count, penalty, mean, scale and
        # the whitening. X is held as [C, d, N] (rows contiguous per feature): both products with it read it
        # faster so. The large tensors (X, L⁻¹ or Q) are compacted in place, the others copied
        state = [work.view(n_cells, d, n).copy_(X.transpose(1, 2)), train, count, penalty, mean, scale, *whitening]
        in_place = {0, 7 if low_rank else 6}
        del X

        def update(x, a, Q, D):  # x M, rows of x [c, S, d]: a·x + ((x Q) ⊙ D) Qᵀ
            return a * x + torch.bmm(torch.bmm(x, Q) * D, Q.transpose(1, 2))

        def weights(u, whitening):
            """w of the whitened coordinates ``u`` ``[c, S, d]``: L⁻ᵀu, or Mu."""
            return update(u, *whitening) if low_rank else torch.bmm(u, whitening[0])

        def whitened(grad_w, whitening):
            """A gradient in w as a gradient in the whitened coordinates: L⁻¹ grad, or M grad."""
            return update(grad_w, *whitening) if low_rank else torch.bmm(grad_w, whitening[0].transpose(1, 2))

        def margins(theta, st):
            """Logits ``[c, S, N]`` and weights w of ``theta`` ``[c, S, d+1]``: linear in theta, so the logits
            of theta + step·direction are those of theta plus step times those of the direction."""
            Xt, mu, sc = st[0], st[4], st[5]
            w = weights(theta[..., :d], st[6:])
            v = w * sc  # weights on raw features
            return torch.bmm(v, Xt) + (theta[..., d] - (v * mu).sum(-1))[..., None], w

        def value(logits, w, st):
            """Objective (float64) of each problem from its logits and weights."""
            _, tr, cnt, pen = st[:4]
            loss = (torch.nn.functional.softplus(logits) - y * logits) * tr
            # float64 sums: the line search compares values closer than float32's resolution
            return loss.double().sum(-1) / cnt.double() + 0.5 * pen.double() * (w.double() ** 2).sum(-1)

        def gradient(logits, w, st):
            """Gradient in (u, b) and the largest gradient entry in (w, b) of each problem."""
            Xt, tr, cnt, pen, mu, sc = st[:6]
            r = (torch.sigmoid(logits) - y) * tr / cnt[..., None]  # d loss / d logit
            grad_w = (torch.bmm(r, Xt.transpose(1, 2)) - mu * r.sum(-1, keepdim=True)) * sc + pen[..., None] * w
            grad_b = r.sum(-1, keepdim=True)
            grad_u = whitened(grad_w, st[6:])
            largest = torch.maximum(grad_w.abs().amax(-1), grad_b[..., 0].abs())
            return torch.cat([grad_u, grad_b], -1), largest

        theta_out = torch.zeros((n_cells, train.shape[1], d + 1), dtype=mean.dtype, device=mean.device)
        w_out = torch.zeros((n_cells, train.shape[1], d), dtype=mean.dtype, device=mean.device)
        cells = torch.arange(n_cells, device=mean.device)  # original index of each active cell
        theta = theta_out.clone()
        logits, w = margins(theta, state)
        f = value(logits, w, state)
        g, largest = gradient(logits, w, state)
        history = []  # (s, y, rho) of the active cells, oldest first
        self.n_iter_ = self.n_evals_ = 0
        for it in range(self.max_iter):
            # a cell leaves the batch once all its problems meet the tolerance (scikit-learn's gtol)
            running = (largest >= self.tol).any(-1)
            if not running.all():
                theta_out[cells[~running]], w_out[cells[~running]] = theta[~running], w[~running]
                keep = torch.nonzero(running).flatten()
                if len(keep) == 0:
                    break
                cells, theta, f, g, largest, logits, w = (t[keep] for t in (cells, theta, f, g, largest, logits, w))
                state = [_compact(t, keep) if k in in_place else t[keep] for k, t in enumerate(state)]
                history = [(s[keep], yk[keep], rho[keep]) for s, yk, rho in history]
            direction = -self._two_loop(g, history)
            slope = (direction * g).sum(-1)
            bad = slope >= 0  # not a descent direction (after a poor curvature pair): use the gradient
            direction = torch.where(bad[..., None], -g, direction)
            slope = torch.where(bad, -(g * g).sum(-1), slope)
            # one read of the features per iteration for the line search: every step tried costs no more
            d_logits, d_w = margins(direction, state)
            step = torch.ones_like(slope)  # whitened: the unit step is the natural first try
            f_new = value(logits + d_logits, w + d_w, state)
            self.n_evals_ += 1
            for _ in range(30):  # backtrack the problems where Armijo's condition fails
                fail = f_new > f + 1e-4 * (step * slope).double()
                if not fail.any():
                    break
                step = torch.where(fail, step * 0.5, step)
                f_new = value(logits + step[..., None] * d_logits, w + step[..., None] * d_w, state)
                self.n_evals_ += 1
            s = step[..., None] * direction
            logits, w = logits + step[..., None] * d_logits, w + step[..., None] * d_w
            g_new, largest = gradient(logits, w, state)  # and one for the gradient
            yk = g_new - g
            sy = (s * yk).sum(-1)
            theta, f, g = theta + s, f_new, g_new
            history.append((s, yk, torch.where(sy > 1e-10, 1.0 / sy.clamp(min=1e-10), torch.zeros_like(sy))))
            if len(history) > self.history:
                history.pop(0)
            self.n_iter_ = it + 1
        else:
            theta_out[cells], w_out[cells] = theta, w
        self.coef_ = w_out * scale
        b = theta_out[..., d]
        self.intercept_ = b - (self.coef_ * (mean + shift)).sum(-1)
        return self

    @staticmethod
    def _whitening(X: torch.Tensor, train: torch.Tensor, penalty: torch.Tensor, work: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Per cell, the inverse of the Cholesky factor L of ``R/4 + λI``: R the correlation of the
        features over the rows in some split's train part, λ the mean penalty of the cell's problems.
        ``[C, d, d]``. ``work``: a scratch tensor shaped as ``X`` (overwritten), or None."""
        rows = train.amax(1)  # [C, N]
        eye = torch.eye(X.shape[-1], dtype=torch.float64, device=X.device)
        ridge = penalty.double().mean(1)[:, None, None] * eye

        def matrix(X, rows, ridge, work=None):  # R/4 + λI of each cell
            z = BatchedLogisticRegression._quarter_root(X, rows, work)
            a = torch.bmm(z.transpose(1, 2), z).double() + ridge
            return 0.5 * (a + a.transpose(1, 2))

        a = matrix(X, rows, ridge, work)
        lower, info = torch.linalg.cholesky_ex(a)
        bad = torch.nonzero(info).flatten()
        if len(bad):
            # float32 rounding can leave R/4 + λI indefinite (features that barely vary, such as the embedding
            # of a token most answers share at a position, have their tiny spread divided out): those cells'
            # R again in float64, then a larger ridge if still needed. The whitening only preconditions the
            # solver; the optimum does not depend on it.
            a[bad] = matrix(X[bad].double(), rows[bad].double(), ridge[bad])
            extra = 1e-6
            for _ in range(12):
                lower[bad], info = torch.linalg.cholesky_ex(a[bad])
                bad = bad[info > 0]
                if not len(bad):
                    break
                a[bad] += extra * eye
                extra *= 10
            else:
                raise TruthmapError(NOT_WHITENED)
        return torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False).to(X.dtype)

    @staticmethod
    def _quarter_root(X: torch.Tensor, rows: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
        """``z`` ``[C, N, d]`` with ``zᵀz = R/4``: the features of the rows ``rows`` ``[C, N]`` standardised
        and scaled, other rows zero (in ``work`` if given)."""
        count = rows.sum(-1).clamp(min=1)[:, None, None]
        mean = torch.bmm(rows[:, None], X) / count  # [C, 1, d]
        z = torch.sub(X, mean, out=work) if work is not None else X - mean
        z *= rows[..., None]
        std = torch.linalg.vector_norm(z, dim=1, keepdim=True) / count.sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        z *= 0.5 / (std * count.sqrt())
        return z

    @staticmethod
    def _whitening_low_rank(X: torch.Tensor, train: torch.Tensor, penalty: torch.Tensor,
                            work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whitening of a cell with N rows, fewer than its d features: ``R/4 + λI = λI + zᵀz`` is λI
        plus a matrix of rank N at most, so with ``z zᵀ = V diag(s) Vᵀ`` (N × N) and ``Q = zᵀ V diag(s)^-½``
        (orthonormal columns), its inverse square root is ``M = λ^-½ I + Q diag((λ + s)^-½ − λ^-½) Qᵀ``.
        Applying M costs O(d·N) instead of O(d²), and no d × d matrix is factorised. Returns (a [C, 1, 1],
        Q [C, d, N], D [C, 1, N]) with M = a·I + Q diag(D) Qᵀ; directions of z zᵀ with no spread (s near 0)
        are left out (D = 0)."""
        z = BatchedLogisticRegression._quarter_root(X, train.amax(1), work).double()
        gram = torch.bmm(z, z.transpose(1, 2))  # [C, N, N]
        if not torch.isfinite(gram).all():
            raise TruthmapError(NOT_WHITENED)
        s, V = torch.linalg.eigh(gram)
        spread = s > 1e-9 * s.amax(-1, keepdim=True).clamp(min=1e-30)
        Q = torch.bmm(z.transpose(1, 2), V) / s.clamp(min=1e-30).sqrt()[:, None, :]
        lam = penalty.double().mean(1)[:, None]  # [C, 1]
        D = torch.where(spread, (lam + s).rsqrt() - lam.rsqrt(), torch.zeros_like(s))
        Q = torch.where(spread[:, None, :], Q, torch.zeros_like(Q))
        return lam.rsqrt()[..., None].to(X.dtype), Q.to(X.dtype), D[:, None, :].to(X.dtype)

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


def _compact(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows ``keep`` (ascending) of ``t``, moved to its front in place: a view, no new memory."""
    for to, row in enumerate(keep.tolist()):
        if to != row:
            t[to].copy_(t[row])
    return t[: len(keep)]


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
                row["auc_lo"], row["auc_hi"] = (float(v) for v in _interval(reps[part][s]))
                row["accuracy"] = float(((values >= 0.5) == labels).mean()) if probability else np.nan
        rows.append(row)
    mean_lo, mean_hi = _interval(_nanmean(reps["test"]))
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


def _interval(replicates: np.ndarray) -> tuple[float, float]:
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
    from ..splits import split_groups

    # groups numbered over the whole answers table, so the probes and the baselines share every replicate
    group_of = dict(zip(answers["id"], split_groups(answers.reset_index(drop=True))))
    return group_bootstrap(np.array([group_of[i] for i in ids], dtype=np.int64), n_boot, seed=0)


def run_probe(
    run_dir: Path,
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

    The folder is read under one shared lock (:func:`truthmap.runfolder.reading`), so each file is checked
    against the manifest once, not once per layer.
    """
    from ..runfolder import reading

    with reading(Path(run_dir)):
        return _run_probe(Path(run_dir), sites, C=C, n_boot=n_boot, device=device, progress=progress,
                          min_per_class=min_per_class, reference=reference)


def _run_probe(run_dir: Path, sites: list[str], *, C: float, n_boot: int, device: str, progress: bool,
               min_per_class: int, reference: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    from ..runfolder import ANSWERS, SPLITS, read_activations_index, read_parquet, read_splits

    answers = read_parquet(run_dir / ANSWERS)
    splits = read_splits(run_dir / SPLITS)

    meta = read_activations_index(run_dir)  # checked: a crafted index is a one-line error
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
            _, positions, features, valid = load_layer(run_dir, site, layer)
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
    from ..runfolder import read_csv

    return read_csv(path, dtype={"site": str, "position": str})  # a missing or damaged file: one line


def read_run_results(run_dir, baselines: bool = True) -> pd.DataFrame:
    """The probes' rows of a run (``probe_results.csv``) and, with ``baselines``, the baselines' rows
    after them (``baseline_results.csv`` and ``wholemap_results.csv``, when their stages have run): one table, for readers that
    compare probes with baselines. Each file has one writer; this is where they meet."""
    from ..constants import BASELINE_SITE as SITE
    from ..runfolder import BASELINE_RESULTS, PROBE_RESULTS, WHOLEMAP_RESULTS

    run_dir = Path(run_dir)
    probes = read_results(run_dir / PROBE_RESULTS)
    probes = probes[probes["site"] != SITE]  # a run of an older truthmap had the baselines' rows merged in
    extra = [read_results(run_dir / name) for name in (BASELINE_RESULTS, WHOLEMAP_RESULTS)
             if baselines and (run_dir / name).exists()]  # the whole-map probe is a row of the baselines table
    return pd.concat([probes, *extra], ignore_index=True) if extra else probes.reset_index(drop=True)
