"""The probe's estimator: L2 logistic regression for many cells and seeds at once, in torch.

:class:`BatchedLogisticRegression` solves scikit-learn's ``LogisticRegression(C=C)`` objective for C×S
problems together (a batched, preconditioned L-BFGS); the probe stage (stages/probe.py), the detector and
the semantic-entropy probes fit with it. Torch is imported here, not by the stage modules, so that
listing the stages (``truthmap --help``) does not load it. Reads and writes no file.
"""

from __future__ import annotations

import torch

from .errors import TruthmapError

NOT_WHITENED = "probe: the features of a position cannot be whitened (are they finite?)"


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


def _compact(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows ``keep`` (ascending) of ``t``, moved to its front in place: a view, no new memory."""
    for to, row in enumerate(keep.tolist()):
        if to != row:
            t[to].copy_(t[row])
    return t[: len(keep)]
