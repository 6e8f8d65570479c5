"""The verdict: the chosen cell against the other positions, layer 0, the baselines and the controls, paired.

Model-free. Reads ``probe_results.csv`` (to choose cells on validation), ``probe_scores.parquet`` (the
probes' test scores), ``answers.parquet`` and ``splits.json``; the baselines stage hands in its scores
(``{name: float [S, N]}``, one row per seed). Writes nothing: :func:`study_verdict` returns the dict
that summary.json holds as ``"verdict"`` (docs/run-folder.md), and :func:`verdict_lines` its text for
the terminal.

Every comparison is paired: both sides are scored on the same test answers (the one test part, where
both have a score), and on each replicate of the run's cluster bootstrap (:func:`probe.bootstrap_for`:
question groups drawn with replacement, the probes' own replicates) the mean over seeds of each side's
test AUC is taken; the difference of the two means, replicate by replicate, gives the 95% percentile
interval and the one-sided p (the share of replicates where the difference is ≤ 0). A claim "A beats
B" is ``shown`` when the interval's lower end is above 0. The probes are not refitted per replicate,
so the interval covers the sampling of the test answers, not training.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..metrics import auc_score, bootstrap_for, choose_cell, interval, mean_over_seeds
from ..positions import EXACT_POSITIONS

LAST_TOKENS = re.compile(r"-\d+")  # the "-k" positions: counted back from the last token


def paired_replicates(a: np.ndarray, b: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """(mean AUC of a, mean AUC of b, their difference): the seeds' mean test AUC of each side on the
    answers both score in every seed, once unweighted (``[1]``-shaped point values first) and on each
    bootstrap replicate.

    ``a``, ``b``: scores ``[S, n]`` (NaN: no score), ``y`` ``[n]`` (1 = error), ``weights`` ``[B, n]``.
    Returns (point_a, point_b, reps_a [B], reps_b [B]) with NaN where one class is missing."""
    both = np.isfinite(a).all(0) & np.isfinite(b).all(0)
    y, w = y[both], weights[:, both]
    if len(set(y.tolist())) < 2:
        nan = np.full(weights.shape[0], np.nan)
        return np.nan, np.nan, nan, nan
    out = []
    for side in (a[:, both], b[:, both]):
        point = float(np.mean([auc_score(s, y) for s in side]))
        reps = np.mean([auc_score(s, y, w) for s in side], axis=0)
        out.append((point, reps))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def compare(a: np.ndarray, b: np.ndarray, y: np.ndarray, weights: np.ndarray) -> dict:
    """``{"auc_a", "auc", "diff", "low", "high", "p", "shown", "n"}``: side a against side b, paired
    (see the module's docstring); ``auc`` is b's mean test AUC on the shared answers."""
    point_a, point_b, reps_a, reps_b = paired_replicates(a, b, y, weights)
    diff = reps_a - reps_b
    finite = diff[np.isfinite(diff)]
    low, high = interval(diff)
    p = float((finite <= 0).mean()) if len(finite) else float("nan")
    n = int((np.isfinite(a).all(0) & np.isfinite(b).all(0)).sum())
    return {"auc_a": _round(point_a), "auc": _round(point_b), "diff": _round(point_a - point_b),
            "low": _round(low), "high": _round(high), "p": _round(p), "shown": bool(np.isfinite(low) and low > 0),
            "n": n}


def _round(value) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def cell_matrix(probe_scores: pd.DataFrame, cell: dict, seeds: list, ids: list) -> np.ndarray:
    """A probe cell's test scores ``[S, N]`` over ``ids`` (NaN where the cell has no score)."""
    rows = probe_scores[(probe_scores["site"] == cell["site"]) & (probe_scores["layer"] == int(cell["layer"]))
                        & (probe_scores["position"].astype(str) == str(cell["position"]))]
    table = rows.pivot_table(index="seed", columns="id", values="score", aggfunc="first")
    table = table.reindex(index=[int(s) for s in seeds], columns=ids)
    return table.to_numpy(dtype=float)


def _best(means: pd.DataFrame, keep) -> dict | None:
    """The validation-chosen cell among the rows of ``means`` where ``keep`` holds."""
    return choose_cell(means[keep]) if keep.any() else None


def _label(cell: dict) -> str:
    return f"{cell['site']} L{int(cell['layer'])} {cell['position']}"


def opponents(means: pd.DataFrame, chosen: dict) -> list[tuple[str, str, dict]]:
    """(against, kind, cell) of every probe cell the chosen one is compared with, each chosen on
    validation: the best ``-k`` (any k), the best ``last_q``, the best of the other kind of column (exact
    answer or not), layer 0 at the chosen position, then the best cell of each other position."""
    position = means["position"].astype(str)
    exact = position.isin(EXACT_POSITIONS)
    chosen_exact = str(chosen["position"]) in EXACT_POSITIONS
    found = [("best -k", "position", _best(means, position.str.fullmatch(LAST_TOKENS.pattern))),
             ("best last_q", "position", _best(means, position == "last_q")),
             ("best non-exact" if chosen_exact else "best exact-answer", "position", _best(means, ~exact if chosen_exact else exact))]
    layer0 = means[(means["layer"] == 0) & (position == str(chosen["position"]))]
    layer0 = layer0[layer0["site"] == chosen["site"]] if (layer0["site"] == chosen["site"]).any() else layer0
    if not layer0.empty:  # the token embeddings (residual row 0): which tokens stand there, nothing more
        found.append(("layer 0 (same position)", "layer0", layer0.iloc[0].to_dict()))
    for other in dict.fromkeys(position):
        if other != str(chosen["position"]):
            found.append((f"best {other}", "position", _best(means, position == other)))
    out, seen = [], set()
    for against, kind, cell in found:
        if cell is None:
            continue
        key = (cell["site"], int(cell["layer"]), str(cell["position"]))
        if key == (chosen["site"], int(chosen["layer"]), str(chosen["position"])) or (kind == "position" and key in seen):
            continue  # the chosen cell itself, or a cell already compared under an earlier name
        seen.add(key)
        out.append((against, kind, cell))
    return out


def compare_cell(cell: dict, other: np.ndarray, probe_scores: pd.DataFrame, answers: pd.DataFrame, splits: dict,
                 n_boot: int = 1000) -> dict:
    """:func:`compare` of a probe cell (its test scores in ``probe_scores``) against the scores ``other``
    ``[S, N]`` (``answers``' row order) on the one test part, with the run's bootstrap."""
    seeds = sorted(splits["seeds"], key=int)
    test = set(splits["seeds"][seeds[0]]["test"])
    rows = [k for k, i in enumerate(answers["id"]) if i in test]
    ids = answers["id"].iloc[rows].tolist()
    y = (~answers["correct"].astype(bool)).to_numpy()[rows].astype(np.int64)
    return compare(cell_matrix(probe_scores, cell, seeds, ids), np.asarray(other, float)[:, rows], y,
                   bootstrap_for(answers, ids, n_boot))


def study_verdict(results: pd.DataFrame, probe_scores: pd.DataFrame, answers: pd.DataFrame, splits: dict,
                  n_boot: int = 1000, others: dict[str, np.ndarray] | None = None,
                  controls: tuple[str, ...] = ()) -> dict | None:
    """summary.json's ``verdict`` (docs/run-folder.md): the validation-chosen cell's test AUC, its interval
    and the seeds' spread, and its paired comparisons. ``results``: the probes' rows of
    probe_results.csv; ``others``: ``{baseline name: scores [S, N]}`` over ``answers``' row order
    (seeds in ``splits`` order), from the baselines stage; None: the probe cells only; ``controls``: the
    names among them that are controls (the others are baselines). None when no cell has a validation AUC."""
    from ..splits import split_groups

    means = mean_over_seeds(results)
    chosen = choose_cell(means)
    if chosen is None:
        return None
    seeds = sorted(splits["seeds"], key=int)
    test = list(splits["seeds"][seeds[0]]["test"])
    ids = [i for i in answers["id"] if i in set(test)]
    error = dict(zip(answers["id"], ~answers["correct"].astype(bool)))
    y = np.array([error[i] for i in ids], dtype=np.int64)
    weights = bootstrap_for(answers, ids, n_boot)
    mine = cell_matrix(probe_scores, chosen, seeds, ids)
    sides = [(against, kind, cell_matrix(probe_scores, cell, seeds, ids), _label(cell))
             for against, kind, cell in opponents(means, chosen)]
    if others:
        row_of = {i: k for k, i in enumerate(answers["id"])}
        rows = [row_of[i] for i in ids]
        for name, score in others.items():
            sides.append((name, "control" if name in controls else "baseline", np.asarray(score, float)[:, rows], name))
    # the headline comparisons first (other kinds of column, layer 0), then controls, baselines, other positions
    order = {"position": 3, "layer0": 0, "control": 1, "baseline": 2}
    headline = ("best -k", "best last_q", "best non-exact", "best exact-answer")
    sides.sort(key=lambda side: (0, headline.index(side[0])) if side[0] in headline else (1 + order[side[1]], 0))
    comparisons = []
    for against, kind, score, cell in sides:
        c = compare(mine, score, y, weights)
        comparisons.append({"against": against, "kind": kind, "cell": cell, "auc": c["auc"], "diff": c["diff"],
                            "low": c["low"], "high": c["high"], "p": c["p"], "shown": c["shown"], "n": c["n"]})
    point, _, reps, _ = paired_replicates(mine, mine, y, weights)
    low, high = interval(reps)
    scored = np.isfinite(mine).all(0)
    groups = split_groups(answers.reset_index(drop=True))
    group_of = dict(zip(answers["id"], groups))
    seed_aucs = [auc_score(s[scored], y[scored]) for s in mine] if len(set(y[scored].tolist())) == 2 else []
    controls = [c for c in comparisons if c["kind"] == "control"]
    verdict = {
        "chosen": {"site": chosen["site"], "layer": int(chosen["layer"]), "position": str(chosen["position"]),
                   "auc": _round(point), "low": _round(low), "high": _round(high),
                   "seed_sd": _round(float(np.std(seed_aucs, ddof=1))) if len(seed_aucs) > 1 else None},
        "comparisons": comparisons,
        # every control (surface, family rates, bag of tokens) below the chosen cell, paired; False before
        # the baselines stage has measured them
        "beats_controls": bool(controls) and all(c["shown"] for c in controls),
        "n_test": int(scored.sum()),
        "n_test_groups": len({group_of[i] for i, keep in zip(ids, scored) if keep}),
    }
    verdict["line"] = verdict_line(verdict)
    return verdict


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}".replace("-", "−")


def _tokens(position: str) -> str:
    if position in EXACT_POSITIONS:
        return "the exact-answer tokens"
    return "the last tokens" if LAST_TOKENS.fullmatch(position) else f"the {position} token"


def verdict_line(verdict: dict) -> str:
    """One sentence: the chosen columns against the main other columns (the last tokens for an exact-answer
    cell, the exact-answer tokens otherwise), paired, and whether the controls are beaten."""
    chosen = verdict["chosen"]
    mine = _tokens(chosen["position"])
    rival = "best -k" if mine == "the exact-answer tokens" else "best exact-answer"
    main = next((c for c in verdict["comparisons"] if c["against"] == rival), None)
    main = main or next((c for c in verdict["comparisons"] if c["kind"] == "position"), None)
    head = (f"{mine} ({chosen['site']} L{chosen['layer']} {chosen['position']}, test AUC "
            f"{chosen['auc'] if chosen['auc'] is None else format(chosen['auc'], '.2f')})")
    if main is None:
        line = f"{head}: no other column to compare with"
    else:
        names = {"best -k": "the last tokens", "best exact-answer": "the exact-answer tokens",
                 "best non-exact": "every other column"}
        theirs = names.get(main["against"], f"the {main['against'].removeprefix('best ')} token")
        line = (f"{head} beat {theirs} by {_signed(main['diff'])} ({_signed(main['low'])} … {_signed(main['high'])}): "
                f"{'shown' if main['shown'] else 'not shown at this size'}")
    controls = [c for c in verdict["comparisons"] if c["kind"] == "control"]
    if not controls:
        return line + "; the controls are not measured yet"
    unbeaten = [c["against"] for c in controls if not c["shown"]]
    return line + ("; above every control" if not unbeaten else f"; not shown above {', '.join(unbeaten)}")


def verdict_lines(verdict: dict, limit: int = 12) -> list[str]:
    """The verdict for the terminal: its line, then a compact table of the first ``limit`` comparisons
    (against, its AUC, chosen − it with the 95% interval, p, shown)."""
    from ..runfolder import sanitise

    lines = [f"verdict: {sanitise(verdict.get('line'), 400)}"]
    comparisons = [c for c in verdict.get("comparisons") or [] if isinstance(c, dict)]
    if not comparisons:
        return lines
    lines.append(f"  {'chosen − …':<26} {'its AUC':>7} {'diff':>7} {'95% interval':>17} {'p':>6}")
    for c in comparisons[:limit]:
        number = (lambda v, spec: "n/a" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, spec))
        lines.append(f"  {sanitise(c.get('against'), 26):<26} {number(c.get('auc'), '.3f'):>7} "
                     f"{number(c.get('diff'), '+.3f'):>7} {number(c.get('low'), '+.3f'):>8} … "
                     f"{number(c.get('high'), '+.3f'):<6} {number(c.get('p'), '.3f'):>6}"
                     f"{'  shown' if c.get('shown') is True else ''}")
    if len(comparisons) > limit:
        lines.append(f"  … {len(comparisons) - limit} more in summary.json (verdict.comparisons)")
    return lines
