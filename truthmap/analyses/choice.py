"""Answer choice: can the probe pick a better answer than greedy decoding?

For every test question (first split seed) and its N resamples (``resamples.parquet``), four ways to
choose one answer; the chosen answer's correctness is read from the grading afterwards. The
candidates are the same for every strategy that chooses: the samples with an exact answer (a span,
so a non-empty ``cluster``); a sample without one (a refusal, an empty answer, nothing located) is
no candidate of any strategy. When no sample of a question has a span, all N are the candidates,
for every strategy alike.

* ``greedy`` — the greedy answer (``answers.parquet``), graded as it is: one answer, nothing to choose;
* ``random`` — a candidate drawn uniformly: its expected accuracy, the share of right candidates;
* ``majority`` — a candidate of the largest cluster of normalised exact answers (no gold label is
  read: right answers are clustered by their own text like any other; ties go to the cluster seen
  first; with no span among the samples, the first sample);
* ``probe`` — the candidate a Detector (an exported one, or one fitted on the run's train split at the
  chosen cell) finds least likely to be wrong; a candidate where the position does not exist scores
  as certainly wrong; ties go to the first.

Accuracy is reported overall and per error type (``error_types.parquet``) with a bootstrap 95%
interval over questions. Reads the run folder; writes ``choice.csv`` (``strategy, error_type, n,
accuracy, acc_lo, acc_hi``), ``choice_answers.parquet`` (per question: the sample each strategy chose)
and ``choice.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..errors import TruthmapError
from ..metrics import bootstrap_counts

CHOICE, CHOICE_ANSWERS, FIGURE = rf.CHOICE, rf.CHOICE_ANSWERS, rf.CHOICE_FIGURE  # the names: runfolder/names.py
STRATEGIES = ("greedy", "random", "majority", "probe")


def majority_pick(clusters: list[str]) -> int:
    """Index of the first sample of the largest non-empty cluster (first-seen wins a tie); 0 if none."""
    counts: dict[str, int] = {}
    for c in clusters:
        if c:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        return 0
    best = max(counts.values())
    winner = next(c for c in clusters if c and counts[c] == best)  # dicts keep first-seen order too
    return clusters.index(winner)


def probe_pick(scores: np.ndarray) -> int:
    """Index of the lowest P(error); NaN (no such position) counts as 1.0; the first wins a tie."""
    return int(np.argmin(np.where(np.isfinite(scores), scores, 1.0)))


def resample_features(lm, run_dir: Path | rf.Run, resamples: pd.DataFrame, *, site: str, layer: int, position: str,
                      batch_size: int = 16) -> np.ndarray:
    """Features ``[n_resamples, d]`` of each resample at (site, layer, position); NaN rows where it does
    not exist. Reads prompt ids from ``generations.parquet``."""
    from ..positions import site_rows

    run = rf.at(run_dir)
    generations = run.read_parquet(rf.GENERATIONS).set_index("id")
    column = f"pos_{position}"
    if column not in resamples.columns:
        raise TruthmapError(f"{rf.ACTIVATIONS}: position '{position}' was not located in {run.path(rf.RESAMPLES)}")
    index = resamples[column].to_numpy(dtype=np.int64)
    out = np.full((len(resamples), lm.hidden_size), np.nan, dtype=np.float32)
    keep = np.flatnonzero(index >= 0)
    row = site_rows(lm, site).index(layer)
    prompts = generations.loc[resamples["id"], "prompt_ids"].tolist()
    for start in range(0, len(keep), batch_size):
        batch = keep[start : start + batch_size]
        sequences = [list(prompts[i]) + list(resamples["answer_ids"].iloc[i]) for i in batch]
        features = lm.hidden_states(sequences, index[batch][:, None], [site])[site]  # [R, B, 1, d]
        out[batch] = features[row, :, 0]
    return out


def candidates(clusters: list[str]) -> np.ndarray:
    """Indices of the samples every strategy chooses among: those with a span (a non-empty cluster),
    or all of them when none has one."""
    has_span = np.array([bool(c) for c in clusters], dtype=bool)
    return np.flatnonzero(has_span) if has_span.any() else np.arange(len(clusters))


def choose(answers: pd.DataFrame, resamples: pd.DataFrame, probe_scores: np.ndarray, test_ids: list[str]) -> pd.DataFrame:
    """Per test question: correctness of each strategy's choice (``random``: expected correctness), all
    strategies choosing among the same :func:`candidates`."""
    greedy = answers.set_index("id")["correct"].astype(bool)
    resamples = resamples.assign(_score=probe_scores).sort_values(["id", "sample"])
    rows = []
    groups = dict(tuple(resamples.groupby("id", sort=False)))
    for qid in test_ids:
        if qid not in groups:
            continue
        group = groups[qid]
        clusters = group["cluster"].fillna("").astype(str).tolist()
        keep = candidates(clusters)
        correct = group["correct"].to_numpy(dtype=bool)
        scores = group["_score"].to_numpy(dtype=float)
        m = keep[majority_pick([clusters[i] for i in keep])]
        p = keep[probe_pick(scores[keep])]
        rows.append({"id": qid, "greedy": float(greedy[qid]), "random": float(correct[keep].mean()),
                     "majority": float(correct[m]), "probe": float(correct[p]),
                     "majority_sample": int(group["sample"].iloc[m]), "probe_sample": int(group["sample"].iloc[p])})
    if not rows:
        raise TruthmapError("no test question has resamples; run 'truthmap resample' on this run first")
    return pd.DataFrame(rows)


def accuracy_table(chosen: pd.DataFrame, types: pd.DataFrame | None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy of each strategy overall and per error type, bootstrap 95% interval over questions."""
    kind = types.set_index("id")["error_type"] if types is not None else pd.Series(dtype=object)
    chosen = chosen.assign(error_type=chosen["id"].map(kind).fillna("unknown"))
    groups = [("all", chosen)] + [(name, g) for name, g in chosen.groupby("error_type", sort=True)]
    rows = []
    for name, group in groups:
        counts = bootstrap_counts(len(group), n_boot, seed)  # one draw resamples whole questions
        for strategy in STRATEGIES:
            values = group[strategy].to_numpy(dtype=float)
            lo, hi = np.percentile(counts @ values / len(values), [2.5, 97.5])
            rows.append({"strategy": strategy, "error_type": name, "n": len(group), "accuracy": float(values.mean()),
                         "acc_lo": float(lo), "acc_hi": float(hi)})
    return pd.DataFrame(rows)


def plot_choice(table: pd.DataFrame, path: Path, title: str) -> None:
    from ..figures import new_figure, save

    groups = list(dict.fromkeys(table["error_type"]))
    fig, ax = new_figure(figsize=(1.5 + 1.3 * len(groups), 3.2))
    width = 0.8 / len(STRATEGIES)
    colours = {"greedy": "#7f7f7f", "random": "#c7c7c7", "majority": "#ff7f0e", "probe": "#08519c"}
    for k, strategy in enumerate(STRATEGIES):
        part = table[table["strategy"] == strategy].set_index("error_type").reindex(groups)
        acc = part["accuracy"].to_numpy(float)
        err = np.abs(np.array([acc - part["acc_lo"].to_numpy(float), part["acc_hi"].to_numpy(float) - acc]))
        ax.bar(np.arange(len(groups)) + (k - 1.5) * width, acc, width, yerr=err, label=strategy,
               color=colours[strategy], ecolor="#333333", capsize=2)
    n = table.drop_duplicates("error_type").set_index("error_type")["n"]
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={n[g]})" for g in groups], fontsize=7, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy of the chosen answer")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.set_title(title, fontsize=9)
    save(fig, path)


def run_choice(lm, run_dir: Path | rf.Run, *, detector=None, cell: dict | None = None, seed: int | str | None = None,
               C: float = 1.0, n_boot: int = 1000) -> pd.DataFrame:
    """Score every test question's resamples and compare the strategies; returns the accuracy table.

    ``detector``: a loaded Detector (its card's site/layer/position are used, and its model must be the
    run's); otherwise one is fitted on the run's train split at ``cell`` (default: the best probe cell).
    ``run_dir``: a run folder or an open Run (:func:`truthmap.runfolder.at`).
    """
    from .detector import fit_cell
    from .resample import ERROR_TYPES, RESAMPLES, default_cell

    run = rf.at(run_dir)
    splits = run.read_splits(rf.SPLITS)["seeds"]
    seed = str(seed if seed is not None else min(splits, key=int))
    if detector is None:
        cell = cell or default_cell(run)
        detector, *_ = fit_cell(run.root, cell["site"], int(cell["layer"]), cell["position"], seed, C)
    else:
        run_model = run.read_json_object(rf.CONFIG).get("model")
        if detector.card.get("model") != run_model:
            raise TruthmapError(f"the detector was trained on model '{detector.card.get('model')}', this run "
                                f"studied '{run_model}'; export a detector from a run of this model")
        cell = {k: detector.card[k] for k in ("site", "layer", "position")}
    resamples = run.read_parquet(RESAMPLES)
    answers = run.read_parquet(rf.ANSWERS)
    test_ids = splits[seed]["test"]
    resamples = resamples[resamples["id"].isin(set(test_ids))].reset_index(drop=True)
    features = resample_features(lm, run, resamples, site=cell["site"], layer=int(cell["layer"]),
                                 position=cell["position"])
    scores = np.full(len(resamples), np.nan)
    valid = np.isfinite(features).all(1)
    if valid.any():
        scores[valid] = detector.predict_proba(features[valid])[:, 1]
    chosen = choose(answers, resamples, scores, test_ids)
    types = run.read_parquet(ERROR_TYPES) if run.trusted(ERROR_TYPES) else None
    table = accuracy_table(chosen, types, n_boot, int(seed))
    run.write_parquet(CHOICE_ANSWERS, chosen)
    run.write_csv(CHOICE, table)
    n = int(resamples.groupby("id").size().max())
    plot_choice(table, run.path(FIGURE), f"answer choice among {n} samples · probe at {cell['site']} "
                                        f"L{cell['layer']} {cell['position']} · seed {seed} test split")
    overall = table[table["error_type"] == "all"].set_index("strategy")["accuracy"].round(4).to_dict()
    run.update_summary(choice={"cell": cell, "accuracy": overall})
    return table
