"""Resampling and error types: what kind of error is the model about to make?

``truthmap resample RUN --n 10`` draws N answers per question at temperature 1 (seedable; all questions ×
N in one batched, length-sorted generation) from the whole vocabulary, or, in a run of the reference
protocol, from the ``REFERENCE_TOP_K`` = 50 likeliest tokens as the reference study did. It grades
each and locates its exact answer with the label stage's own rules, over the whole answer, always
label-blind (the gold answer grades but never places a span, whatever ``exact_answer`` says). Each
question then gets one error type from the pattern of its N answers. Wrong answers are clustered by
their normalised exact answer; all right answers form one cluster. With shares as fractions of N
(``THRESHOLDS``), checked in this order:

* ``refuses`` — no answer (no exact answer could be found) in ≥ 0.5 of the samples;
* ``consistently_correct`` — right in ≥ 0.8;
* ``consistently_incorrect`` — one wrong answer in ≥ 0.8;
* ``two_competing`` — the two largest clusters each hold ≥ 0.25 and together ≥ 0.7;
* ``many_answers`` — at least 3 different answers and none holds ≥ 0.5;
* ``other`` — none of these (e.g. mostly right with scattered errors).

Then, for every type, a probe on the *greedy* answer's hidden state (one cell, by default the best
probe cell) predicts "this question is of that type" (one vs rest) on the run's splits.

Reads ``questions.parquet``, ``vocabularies.json``, ``generations.parquet``, ``answers.parquet``,
``splits.json``, ``activations/``; writes

* ``resamples.parquet`` — one row per (question, sample): ``id, sample, answer_ids, answer, stopped,
  correct`` (by the run's ``grader``), ``correct_alias, correct_strict`` (and ``correct_lenient`` when the
  run asks the judge: ``judge_grader``), ``exact_answer, exact_answer_valid, exact_answer_reason, exact_answer_start,
  exact_answer_end, cluster`` and the ``pos_<position>`` indices (into the question's prompt_ids +
  this answer_ids);
* ``error_types.parquet`` — one row per question: ``id, error_type, n, n_correct, n_no_answer,
  largest_wrong, n_answers`` (counts out of n);
* ``error_type_results.csv`` — ``error_type, seed, site, layer, position, auc, auc_lo, auc_hi,
  n_train, n_train_positive, n_test, n_test_positive``;
* ``error_types.png`` — questions per type, and each type's probe AUC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..errors import TruthmapError
from ..metrics import auc_score, bootstrap_counts
from ..positions import check_cell

# the names: runfolder/names.py
RESAMPLES, ERROR_TYPES, ERROR_TYPE_RESULTS = rf.RESAMPLES, rf.ERROR_TYPES, rf.ERROR_TYPE_RESULTS
FIGURE = rf.ERROR_TYPES_FIGURE
TYPES = ("refuses", "consistently_correct", "consistently_incorrect", "two_competing", "many_answers", "other")
THRESHOLDS = {"refuses": 0.5, "consistent": 0.8, "competing_each": 0.25, "competing_together": 0.7,
              "many_largest_below": 0.5}
REFERENCE_TOP_K = 50  # the reference study sampled with transformers' default top_k


def sample_answers(lm, prompt_ids: list[list[int]], *, n: int, temperature: float = 1.0, seed: int = 0,
                   max_new_tokens: int = 24, batch_size: int | None = None, progress: bool = True,
                   top_k: int = 0):
    """``n`` sampled (answer_ids, stopped) per prompt: a list per prompt, in the order given.

    ``top_k``: draw from the ``top_k`` likeliest tokens only (0: from the whole vocabulary)."""
    from ..stages.generate import generate_answers

    if n < 1:
        raise TruthmapError(f"--n {n}: draw at least one answer per question")
    if temperature <= 0:
        raise TruthmapError(f"--temperature {temperature}: must be above 0 (0 is greedy decoding)")
    flat = [p for p in prompt_ids for _ in range(n)]
    drawn = generate_answers(lm, flat, max_new_tokens, batch_size, progress, sample=(temperature, seed, top_k))
    return [drawn[i * n : (i + 1) * n] for i in range(len(prompt_ids))]


def cluster_key(exact_answer: str, valid: bool) -> str:
    """The cluster of an answer: its normalised exact answer ("" when it has none)."""
    from ..textmatch import normalize

    return normalize(exact_answer) if valid else ""


def label_resamples(lm, questions: pd.DataFrame, generations: pd.DataFrame, drawn: list, vocabularies: dict,
                    positions: list[str], *, extractor=None, judge=None, grader: str = "alias",
                    batch_size: int | None = None, progress: bool = False, protocol: str = "brief") -> pd.DataFrame:
    """Grade and locate the exact answer of every sample with the label stage's rules (whole answer).

    Always label-blind (``exact_answer="blind"``, whatever the run's setting): a sample's span, its
    cluster and so the sampling scores and the entropy probes' targets never depend on the gold answer,
    which only grades (by substring of an alias under the ``reference`` ``protocol``, as the run's answers
    were). Every grader's column is kept, as in answers.parquet (``correct_lenient`` with a ``judge``), and
    ``correct`` is the run's ``grader``'s."""
    from ..stages.generate import decode_answer
    from ..stages.label import label_answers

    n = len(drawn[0]) if drawn else 0
    base = questions.merge(generations[["id", "prompt", "prompt_ids"]], on="id", validate="one_to_one")
    rows_q, rows_g = [], []
    for row, samples in zip(base.itertuples(index=False), drawn):
        for k, (ids, stopped) in enumerate(samples):
            key = f"{row.id}#{k}"
            rows_q.append({**{c: getattr(row, c) for c in questions.columns}, "id": key})
            rows_g.append({"id": key, "prompt": row.prompt, "prompt_ids": list(row.prompt_ids), "answer_ids": ids,
                           "answer": decode_answer(lm.tokenizer, ids), "stopped": stopped})
    q_table, g_table = pd.DataFrame(rows_q), pd.DataFrame(rows_g)
    labelled = label_answers(q_table, g_table, vocabularies, lm.tokenizer, positions, extractor=extractor,
                             judge=judge, batch_size=batch_size, progress=progress, exact_answer="blind",
                             grader=grader, protocol=protocol)
    cost = dict(labelled.attrs)  # the judge's calls and tokens, when it graded (a merge drops attrs)
    labelled = labelled.merge(g_table[["id", "answer_ids", "stopped"]], on="id")
    out = pd.DataFrame({"id": labelled["id"].str.rsplit("#", n=1).str[0],
                        "sample": labelled["id"].str.rsplit("#", n=1).str[1].astype(int)})
    graders = [c for c in ("correct_alias", "correct_strict", "correct_lenient") if c in labelled.columns]
    for column in ["answer_ids", "answer", "stopped", "correct", *graders, "exact_answer", "exact_answer_valid",
                   "exact_answer_reason", "exact_answer_start", "exact_answer_end"]:
        out[column] = labelled[column].to_numpy()
    out["cluster"] = [cluster_key(e, v) for e, v in zip(out["exact_answer"], out["exact_answer_valid"])]
    for p in positions:
        out[f"pos_{p}"] = labelled[f"pos_{p}"].to_numpy()
    assert n == 0 or (out.groupby("id").size() == n).all()
    out.attrs = cost
    return out


def error_type(correct: list[bool], clusters: list[str], thresholds: dict = THRESHOLDS) -> dict:
    """The error type of one question from its samples' correctness and clusters ("" = no answer)."""
    n = len(correct)
    no_answer = sum(1 for ok, c in zip(correct, clusters) if not ok and c == "")
    n_correct = sum(bool(ok) for ok in correct)
    wrong = pd.Series([c for ok, c in zip(correct, clusters) if not ok and c != ""], dtype=object).value_counts()
    sizes = sorted(([n_correct] if n_correct else []) + wrong.tolist(), reverse=True)
    largest_wrong = int(wrong.iloc[0]) if len(wrong) else 0
    t = thresholds
    if no_answer >= t["refuses"] * n:
        kind = "refuses"
    elif n_correct >= t["consistent"] * n:
        kind = "consistently_correct"
    elif largest_wrong >= t["consistent"] * n:
        kind = "consistently_incorrect"
    elif (len(sizes) >= 2 and sizes[1] >= t["competing_each"] * n
          and sizes[0] + sizes[1] >= t["competing_together"] * n):
        kind = "two_competing"
    elif len(sizes) >= 3 and sizes[0] < t["many_largest_below"] * n:
        kind = "many_answers"
    else:
        kind = "other"
    return {"error_type": kind, "n": n, "n_correct": n_correct, "n_no_answer": no_answer,
            "largest_wrong": largest_wrong, "n_answers": len(sizes)}


def error_types(resamples: pd.DataFrame, thresholds: dict = THRESHOLDS) -> pd.DataFrame:
    rows = []
    for qid, group in resamples.sort_values(["id", "sample"]).groupby("id", sort=False):
        rows.append({"id": qid, **error_type(group["correct"].tolist(), group["cluster"].tolist(), thresholds)})
    return pd.DataFrame(rows)


def type_probes(run_dir: Path | rf.Run, types: pd.DataFrame, *, site: str, layer: int, position: str, C: float = 1.0,
                n_boot: int = 1000) -> pd.DataFrame:
    """One-vs-rest AUC of a probe on the greedy answer's features for each error type and seed."""
    from .detector import Detector
    from ..stages.extract import load_features

    ids, X = load_features(run_dir, site, layer, position)
    kind = types.set_index("id").reindex(ids)["error_type"].to_numpy()
    splits = rf.at(run_dir).read_splits(rf.SPLITS)["seeds"]
    rows = []
    for seed, split in sorted(splits.items(), key=lambda kv: int(kv[0])):
        train, test = np.isin(ids, split["train"]), np.isin(ids, split["test"])
        counts = bootstrap_counts(int(test.sum()), n_boot, int(seed))
        for name in TYPES:
            y = (kind == name).astype(np.int64)
            row = {"error_type": name, "seed": int(seed), "site": site, "layer": layer, "position": position,
                   "auc": np.nan, "auc_lo": np.nan, "auc_hi": np.nan, "n_train": int(train.sum()),
                   "n_train_positive": int(y[train].sum()), "n_test": int(test.sum()),
                   "n_test_positive": int(y[test].sum())}
            # a probe needs two of each class to learn from and both classes to be measured on
            if min(row["n_train_positive"], row["n_train"] - row["n_train_positive"]) >= 2 and \
                    0 < row["n_test_positive"] < row["n_test"]:
                score = Detector(C=C).fit(X[train], y[train]).predict_proba(X[test])[:, 1]
                row["auc"] = float(auc_score(score, y[test]))
                row["auc_lo"], row["auc_hi"] = (float(v) for v in np.nanpercentile(
                    auc_score(score, y[test], counts), [2.5, 97.5]))
            rows.append(row)
    return pd.DataFrame(rows)


def plot_error_types(types: pd.DataFrame, results: pd.DataFrame, path: Path, title: str) -> None:
    from ..figures import new_figure, save

    counts = types["error_type"].value_counts().reindex(TYPES, fill_value=0)
    means = results.groupby("error_type")[["auc", "auc_lo", "auc_hi"]].mean().reindex(TYPES)
    fig, (left, right) = new_figure(1, 2, figsize=(10, 3.2))
    left.barh(range(len(TYPES)), counts.to_numpy(), color="#9ecae1")
    left.set_yticks(range(len(TYPES)), TYPES, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("questions")
    auc = means["auc"].to_numpy(dtype=float)
    err = np.abs(np.array([auc - means["auc_lo"].to_numpy(float), means["auc_hi"].to_numpy(float) - auc]))
    right.barh(range(len(TYPES)), np.nan_to_num(auc - 0.5), left=0.5, color="#08519c", xerr=np.nan_to_num(err),
               ecolor="#333333", capsize=2)
    right.set_yticks(range(len(TYPES)), [], fontsize=8)
    right.invert_yaxis()
    right.axvline(0.5, color="black", linewidth=0.8)
    right.set_xlim(0.2, 1.0)
    right.set_xlabel("one-vs-rest probe AUC (greedy answer's features; none: too few)")
    fig.suptitle(title, fontsize=9)
    save(fig, path)


def run_answer_length(config: dict, questions: pd.DataFrame, max_new_tokens: int | None = None) -> int:
    """The length limit of answers drawn again for a run: ``max_new_tokens``, else the run's own (its
    config.json's setting, or its tasks' length under its protocol), so samples are cut as its answers were."""
    from ..tasks import answer_length

    saved = config.get("max_new_tokens")
    saved = saved if isinstance(saved, int) and not isinstance(saved, bool) and saved > 0 else None
    protocol = config.get("protocol", "brief")
    return answer_length(questions.get("task", ()), max_new_tokens or saved, str(protocol))


def run_resample(lm, run_dir: Path | rf.Run, *, n: int = 10, temperature: float = 1.0, seed: int = 0,
                 cell: dict | None = None, extractor=None, judge=None, C: float = 1.0, n_boot: int = 1000,
                 batch_size: int | None = None, progress: bool = True, max_new_tokens: int | None = None) -> pd.DataFrame:
    """Draw, label, type, probe, plot (see the module docstring); return error_type_results.

    ``max_new_tokens``: the answers' length limit (default: the run's). ``judge``: the lenient grader's
    model (the run's ``judge_grader``), or None. ``run_dir``: a run folder or an open Run
    (:func:`truthmap.runfolder.at`)."""
    from ..config import saved_settings

    run = rf.at(run_dir)
    config = saved_settings(run.path(rf.CONFIG))  # the run's settings, checked by the schema
    questions = run.read_parquet(rf.QUESTIONS)
    generations = run.read_parquet(rf.GENERATIONS)
    questions = questions[questions["id"].isin(set(generations["id"]))]
    vocabularies = run.read_json(rf.VOCABULARIES, default={})

    positions = run.read_activations_index()["positions"]
    prompts = generations.set_index("id").loc[questions["id"], "prompt_ids"].map(list).tolist()
    protocol = config.get("protocol", "brief")
    max_new = run_answer_length(config, questions, max_new_tokens)
    top_k = REFERENCE_TOP_K if protocol == "reference" else 0
    drawn = sample_answers(lm, prompts, n=n, temperature=temperature, seed=seed, max_new_tokens=max_new,
                           batch_size=batch_size, progress=progress, top_k=top_k)
    resamples = label_resamples(lm, questions, generations, drawn, vocabularies, positions, extractor=extractor,
                                judge=judge, grader=str(config.get("grader", "alias")), batch_size=batch_size,
                                progress=progress, protocol=str(protocol))
    run.write_parquet(RESAMPLES, resamples)
    types = error_types(resamples)
    run.write_parquet(ERROR_TYPES, types)
    cell = cell or default_cell(run)
    results = type_probes(run, types, site=cell["site"], layer=int(cell["layer"]), position=cell["position"],
                          C=C, n_boot=n_boot)
    run.write_csv(ERROR_TYPE_RESULTS, results)
    plot_error_types(types, results, run.path(FIGURE),
                     f"error types over {n} samples (T={temperature}) · probe at {cell['site']} "
                     f"L{cell['layer']} {cell['position']}")
    run.update_summary(resample={"n": n, "temperature": temperature, "seed": seed, "top_k": top_k,
                                 "error_types": types["error_type"].value_counts().to_dict(),
                                 "type_auc": results.groupby("error_type")["auc"].mean().round(4)
                                 .dropna().to_dict()})
    return results


def default_cell(run_dir: Path | rf.Run) -> dict:
    """The run's best probe cell (summary.json), the cell analyses use unless told otherwise."""
    run = rf.at(run_dir)
    run_dir = run.root
    best = run.read_json_object(rf.SUMMARY, default={}).get("best_cell")
    if not best:
        raise TruthmapError(f"{run_dir}: no best probe cell yet; run 'truthmap probe --out {run_dir}' "
                            f"or give --layer and --position")
    if not isinstance(best, dict):
        raise TruthmapError(f"{Path(run_dir) / rf.SUMMARY}: best_cell is not a cell; give --layer and --position")
    return check_cell(best.get("site"), best.get("layer"), best.get("position"), Path(run_dir) / rf.SUMMARY)
