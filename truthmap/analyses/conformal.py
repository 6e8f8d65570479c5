"""A detector's threshold with a meaning: split-conformal calibration of the false-flag rate, and the
risk–coverage curve of abstaining on flagged answers.

Pure functions on score vectors (P(error), higher = more likely wrong); :mod:`.detector` calls them at
export time on the validation part (calibration) and the test part (what the card reports).

**The rule.** Given the P(error) scores ``s_1 … s_n`` of the *right* answers of the calibration part
and a target false-flag rate ``alpha``, let ``k = ⌈(n + 1)(1 − alpha)⌉`` and ``s_(k)`` the k-th smallest
score. Flag an answer when its P(error) is *above* ``s_(k)``. For a new right answer exchangeable with
the calibration ones, P(flagged) = P(s_new > s_(k)) ≤ 1 − k/(n + 1) ≤ alpha, over the draw of both the
calibration part and the new answer (and ≥ alpha − 1/(n + 1) when scores have no ties). Conditional on
one calibration part, the false-flag rate on future right answers is distributed as
Beta(n + 1 − k, k) (Vovk 2012; Angelopoulos & Bates 2021, "A gentle introduction to conformal
prediction", section 3.2): its mean is (n + 1 − k)/(n + 1) ≤ alpha, and :func:`false_flag_bound` gives
the interval one calibration part's rate falls in with a stated probability. ``k > n`` (fewer than
⌈1/alpha⌉ − 1 right answers) admits no such threshold: :func:`conformal_threshold` says so.

The threshold is stored as the next float above ``s_(k)``, so the card's one rule "flag when P(error) ≥
threshold" is the conformal "above ``s_(k)``".
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import TruthmapError


def conformal_rank(n: int, alpha: float) -> int:
    """k = ⌈(n + 1)(1 − alpha)⌉: the rank (1-based, ascending) of the calibration score to flag above."""
    if not 0 < alpha < 1:
        raise TruthmapError(f"target false-flag rate {alpha}: must lie strictly between 0 and 1")
    # the small tolerance keeps (n + 1)(1 − alpha) that is a whole number in exact arithmetic whole
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)


def conformal_threshold(right_scores, alpha: float) -> dict:
    """The threshold for a target false-flag rate ``alpha`` from right answers' calibration scores ``[n]``.

    Returns ``{threshold, score_at_rank, rank, n_right, alpha, expected_false_flag}``; raises
    TruthmapError when ``n`` right answers are too few for ``alpha``."""
    scores = np.sort(np.asarray(right_scores, dtype=float))
    scores = scores[np.isfinite(scores)]
    n = len(scores)
    k = conformal_rank(n, alpha)
    if k > n:
        raise TruthmapError(f"{n} right answers in the calibration part are too few for a false-flag rate of "
                            f"{alpha:g}: it needs at least {conformal_rank_min(alpha)}")
    at_rank = float(scores[k - 1])
    return {"threshold": float(np.nextafter(at_rank, np.inf)), "score_at_rank": at_rank, "rank": k, "n_right": n,
            "alpha": float(alpha), "expected_false_flag": (n + 1 - k) / (n + 1)}


def conformal_rank_min(alpha: float) -> int:
    """The fewest right calibration answers for which a threshold of rate ``alpha`` exists."""
    n = 1
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


def false_flag_bound(n: int, k: int, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of the false-flag rate given one calibration part of ``n`` right
    answers and rank ``k``: quantiles of Beta(n + 1 − k, k)."""
    from scipy.stats import beta

    low, high = beta.ppf([(1 - level) / 2, (1 + level) / 2], n + 1 - k, k)
    return float(low), float(high)


def risk_coverage(p_error, wrong) -> dict:
    """Accuracy kept against the fraction answered when answers are withheld most-likely-wrong first.

    ``p_error [n]`` (finite), ``wrong [n]`` (1 = the answer is wrong). Answering the ``m`` answers of
    lowest P(error), m = 1 … n: ``coverage = m / n``, ``accuracy`` = the right fraction of those ``m``
    (ties in P(error) are answered together, so the curve does not depend on their order). ``area``
    is the mean of ``accuracy`` over m (area under the accuracy–coverage curve, higher is better);
    ``base`` is the accuracy when answering all (the area of a detector that ranks at random), ``best``
    the area of one that withholds every wrong answer first."""
    p, wrong = np.asarray(p_error, dtype=float), np.asarray(wrong).astype(bool)
    if len(p) == 0 or not np.isfinite(p).all():
        raise TruthmapError("risk_coverage: needs finite scores of at least one answer")
    order = np.argsort(p, kind="stable")
    right_cum = np.cumsum(~wrong[order])
    # answers tied in P(error) enter together: each m takes the accuracy at the end of its tie block
    sorted_p = p[order]
    block_end = np.searchsorted(sorted_p, sorted_p, side="right")  # 1-based end of each m's tie block
    m = np.arange(1, len(p) + 1)
    accuracy = right_cum[block_end - 1] / block_end
    right = int((~wrong).sum())
    best = np.minimum(m, right) / m
    return {"coverage": (m / len(p)).tolist(), "accuracy": accuracy.tolist(), "area": float(accuracy.mean()),
            "base": float(right / len(p)), "best": float(best.mean()), "n": int(len(p))}


def plot_risk_coverage(curve: dict, path, title: str, operating: tuple[float, float] | None = None) -> None:
    """The accuracy–coverage curve with its area, the random-ranking level and the oracle, as a figure;
    ``operating``: (coverage, accuracy) at the card's threshold, marked."""
    from ..figures import new_figure, save

    fig, ax = new_figure(figsize=(5.2, 3.8))
    coverage, accuracy = np.asarray(curve["coverage"]), np.asarray(curve["accuracy"])
    best = np.minimum(coverage * curve["n"], curve["base"] * curve["n"]) / (coverage * curve["n"])
    ax.plot(coverage, accuracy, color="#1f4e9c", lw=1.8, label=f"detector (area {curve['area']:.3f})")
    ax.plot(coverage, best, color="#777777", lw=1, ls=":", label=f"withholding every wrong answer first ({curve['best']:.3f})")
    ax.axhline(curve["base"], color="#b0413e", lw=1, ls="--", label=f"answering all / random order ({curve['base']:.3f})")
    if operating is not None:
        ax.plot(*operating, "o", color="black", ms=6, label=f"threshold: answers {operating[0]:.0%}, accuracy {operating[1]:.1%}")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(max(0.0, min(accuracy.min(), curve["base"]) - 0.05), 1.01)
    ax.set_xlabel("fraction answered (coverage)")
    ax.set_ylabel("accuracy of the answers kept")
    ax.set_title(f"{title} · n = {curve['n']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    save(fig, path)
