"""Every method's test AUC against its extra cost beyond answering.

Reads ``summary.json`` (``stage_seconds``, ``baseline_seconds``, ``baseline_forward_tokens``, ``extract``,
``sampling``, ``best_cell``), ``answers.parquet`` (prompt and answer lengths), ``generations.parquet``
(prompt lengths of the samples), ``resamples.parquet`` (the samples' lengths, when the run drew
samples), ``probe_results.csv`` and ``baseline_results.csv`` / ``wholemap_results.csv`` (test AUCs);
writes ``cost.csv`` (``COLUMNS``: one row per method, and ``answering`` for scale) and ``cost.png`` (test
AUC against extra forward tokens per answer, the Pareto front marked), and returns summary.json's ``cost``.

Two costs per method, both per studied answer and beyond what answering cost:

* ``forward_tokens`` — tokens the model runs through for it: 0 for what is read while the model
  answers (hidden states in one-pass runs, token probabilities and entropies, answer length, family
  rates); the p(True) prompts for p(True); for the sampling scores, each sample's prompt and tokens
  (generation) and, for the scores that use log-probabilities, the same again (the log-probability pass).
  Tokens count what a plain forward pass would run: shared prefixes cached by the run are not subtracted.
  ``lenient grader`` (when the run asked the judge, ``--judge-grader``): the judge's prompts, a cost of
  grading shown for scale, with no AUC.
* ``seconds`` — wall seconds the run spent producing the method's scores over all answers, divided by
  the answers: the probe and extract stages for a probe cell (fitting every cell included; at inference a
  probe is one dot product), the wholemap stage for the whole-map probe, the baselines' timed parts, the
  sampling stage's parts. ``answering``: the generate stage.

A method is on the Pareto front when no other method has at least its AUC at no more tokens, with one
of the two strictly better.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..metrics import mean_over_seeds, read_run_results
from ..stages.base import Stage, StageRun, register, short_model
from ..stages.baselines import BASELINES, COSTS

COLUMNS = ["method", "kind", "auc", "auc_lo", "auc_hi", "forward_tokens", "seconds", "pareto", "note"]



def cost_table(run_dir: Path | rf.Run) -> pd.DataFrame:
    """``cost.csv``'s table (``COLUMNS``) of a finished run (a folder or an open Run:
    :func:`truthmap.runfolder.at`); methods without a test AUC are left out."""
    run = rf.at(run_dir)
    summary = run.read_json_object(rf.SUMMARY)
    answers = run.read_parquet(rf.ANSWERS)
    studied = answers[answers["split"].fillna("") != ""] if "split" in answers.columns else answers
    n = max(len(studied), 1)
    n_all = max(len(answers), 1)  # the stages' seconds cover every answer, studied or not
    stage = _numbers(summary.get("stage_seconds"))
    baseline_seconds = _numbers(summary.get("baseline_seconds"))
    baseline_tokens = _numbers(summary.get("baseline_forward_tokens"))
    means = mean_over_seeds(read_run_results(run.root))
    baselines = means[means["site"] == "baseline"].set_index("position")
    means = means.set_index(["site", "layer", "position"])
    rows = []

    def add(method, kind, auc_row, tokens, seconds, note=""):
        if auc_row is None or pd.isna(auc_row.get("auc")):
            return
        rows.append({"method": method, "kind": kind, "auc": float(auc_row["auc"]),
                     "auc_lo": _float(auc_row.get("auc_lo")), "auc_hi": _float(auc_row.get("auc_hi")),
                     "forward_tokens": tokens, "seconds": seconds, "note": note})

    answer_tokens = float((answers["n_prompt_tokens"] + answers["n_answer_tokens"]).mean())
    rows.append({"method": "answering", "kind": "answering", "auc": np.nan, "auc_lo": np.nan, "auc_hi": np.nan,
                 "forward_tokens": answer_tokens, "seconds": _per(stage.get("generate"), n_all),
                 "note": "the answer itself: prompt and answer tokens, the generate stage (for scale)"})
    judge = summary.get("grader_judge") if isinstance(summary.get("grader_judge"), dict) else {}
    if judge:  # the lenient grader's judge: a cost of grading, not of detecting (no AUC)
        judge = _numbers(judge)
        rows.append({"method": "lenient grader", "kind": "grading", "auc": np.nan, "auc_lo": np.nan, "auc_hi": np.nan,
                     "forward_tokens": _per(judge.get("forward_tokens"), n_all),
                     "seconds": _per(judge.get("seconds"), n_all),
                     "note": "the judge asked whether each answer means the gold (correct_lenient): one forward "
                             "pass per answer, at label time"})
    extract = summary.get("extract") if isinstance(summary.get("extract"), dict) else {}
    one_pass = extract.get("mode", "onepass") == "onepass"
    read_again = extract.get("read_again", 0) if one_pass else len(answers)
    read_again = read_again if isinstance(read_again, (int, float)) and not isinstance(read_again, bool) else 0
    state_tokens = answer_tokens * read_again / n_all  # answers whose states needed a pass of their own
    best = summary.get("best_cell")
    if isinstance(best, dict) and best.get("site") is not None:
        key = (best["site"], int(best["layer"]), str(best["position"]))
        if key in means.index:
            add(f"probe {best['site']} L{best['layer']} {best['position']}", "probe", means.loc[key], state_tokens,
                _per(_sum(stage.get("extract"), stage.get("probe")), n_all),
                "the cell chosen on validation; seconds: extract and fit every cell")
    token_tokens = _per(baseline_tokens.get("token_statistics"), n_all)
    sample_tokens = _sample_tokens(run)
    sampling = summary.get("sampling") if isinstance(summary.get("sampling"), dict) else {}
    per_question = _numbers(sampling.get("seconds_per_question"))
    # every registered baseline the run scored (stages/baselines.py), grouped by what it costs
    for cost in COSTS:
        for name, baseline in BASELINES.items():
            if baseline.cost != cost or name not in baselines.index:
                continue
            row = baselines.loc[name]
            if cost == "probes":
                add(name, baseline.kind, row, state_tokens,
                    _per(_sum(stage.get("extract"), stage.get("probe"), stage.get("wholemap")), n_all),
                    "every cell combined (stacking); seconds: extract, the probes and the wholemap stage")
            elif cost == "token statistics":
                add(name, baseline.kind, row, token_tokens if token_tokens is not None else np.nan,
                    _per(baseline_seconds.get("token_statistics"), n_all),
                    "read while answering" if token_tokens == 0 else "tokens not recorded (an older run)"
                    if token_tokens is None else "a forward pass over prompt and answer")
            elif cost == "p(True)":
                add(name, baseline.kind, row, _per(baseline_tokens.get(name), n_all),
                    _per(baseline_seconds.get("p_true"), n_all), "one more forward pass (variants asked share it)")
            elif cost == "none":
                add(name, baseline.kind, row, 0.0, 0.0, "no model pass")
            else:  # samples, and with log-probabilities a second pass over them
                judged = name.endswith("_judged")
                passes = 2 if cost == "samples and log-probabilities" else 1
                seconds = _sum(per_question.get("sampling"), per_question.get("labels_and_logprobs"),
                               per_question.get("judge") if judged else 0.0)
                note = f"{sampling.get('n', '?')} samples" + (" and their log-probabilities" if passes == 2 else "")
                note += "; judge calls not counted in tokens" if judged else ""
                add(name, baseline.kind, row, sample_tokens * passes if sample_tokens is not None else np.nan,
                    seconds, note)
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "pareto"])
    table["pareto"] = pareto_front(table["auc"].to_numpy(float), table["forward_tokens"].to_numpy(float))
    return table[COLUMNS]


def pareto_front(auc: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Whether each (AUC, cost) is undominated: no other point has AUC ≥ and cost ≤, one strictly.
    Points without an AUC or a cost are never on the front."""
    ok = np.isfinite(auc) & np.isfinite(cost)
    front = np.zeros(len(auc), bool)
    for i in np.flatnonzero(ok):
        others = ok & (np.arange(len(auc)) != i)
        dominated = others & (auc >= auc[i]) & (cost <= cost[i]) & ((auc > auc[i]) | (cost < cost[i]))
        front[i] = not dominated.any()
    return front


def plot_cost(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Test AUC (95% interval) against extra forward tokens per answer (symmetric log scale: 0 shown),
    the Pareto front joined and its methods named; the cost of answering as a dotted line."""
    from ..figures import new_figure, save

    fig, ax = new_figure(figsize=(7.5, 4.8))
    shown = table[table["auc"].notna() & table["forward_tokens"].notna()].sort_values("forward_tokens")
    kinds = list(dict.fromkeys(shown["kind"]))
    for kind, group in shown.groupby("kind", sort=False):
        # kinds side by side where they cost the same (most cost 0): a small offset in the linear part of the axis
        x = group["forward_tokens"] + np.where(group["forward_tokens"] < 1, 0.12 * (kinds.index(kind) - (len(kinds) - 1) / 2), 0)
        ax.errorbar(x, group["auc"],
                    yerr=[group["auc"] - group["auc_lo"].fillna(group["auc"]),
                          group["auc_hi"].fillna(group["auc"]) - group["auc"]],
                    fmt="o", capsize=2, label=kind, alpha=0.8)
    front = shown[shown["pareto"]].sort_values("forward_tokens")
    ax.plot(front["forward_tokens"], front["auc"], "k--", linewidth=1, label="Pareto front")
    for row in front.itertuples():  # the front's methods named (at their true cost)
        ax.annotate(row.method, (row.forward_tokens, row.auc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    answering = table[table["kind"] == "answering"]["forward_tokens"]
    if len(answering) and np.isfinite(answering.iloc[0]):
        ax.axvline(answering.iloc[0], color="grey", linestyle=":", linewidth=1)
        ax.annotate("answering", (answering.iloc[0], ax.get_ylim()[0]), fontsize=7, color="grey", rotation=90,
                    xytext=(2, 4), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1.0)
    largest = np.nanmax([*table["forward_tokens"].to_numpy(float), 1.0])
    ax.set_xlim(-0.6, largest * 2)
    ax.axhline(0.5, color="black", linewidth=0.6)
    ax.set_xlabel("extra forward tokens per answer, beyond answering")
    ax.set_ylabel("test AUC predicting an error (mean over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    save(fig, path)


def cost_summary(table: pd.DataFrame) -> dict:
    """summary.json's ``cost``: the table's rows as dicts (numbers rounded) and the front's methods."""
    records = []
    for row in table.to_dict("records"):
        records.append({k: (None if isinstance(v, float) and not np.isfinite(v) else
                            round(v, 4) if isinstance(v, float) else bool(v) if isinstance(v, np.bool_) else v)
                        for k, v in row.items()})
    return {"methods": records, "pareto": [r["method"] for r in records if r["pareto"]]}


def _sample_tokens(run: rf.Run | rf.Folder) -> float | None:
    """Tokens per studied question of generating the run's samples (each sample's prompt and tokens),
    from ``resamples.parquet``; None without samples."""
    if not run.path(rf.RESAMPLES).exists():
        return None
    samples = run.read_parquet(rf.RESAMPLES)
    if samples.empty or "answer_ids" not in samples.columns:
        return None
    prompts = run.read_parquet(rf.GENERATIONS).set_index("id")["prompt_ids"].map(len)
    lengths = samples["answer_ids"].map(len) + samples["id"].map(prompts).fillna(0)
    return float(lengths.groupby(samples["id"]).sum().mean())


def _numbers(value) -> dict:
    if not isinstance(value, dict):
        return {}
    return {k: float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _sum(*values) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


def _per(value, n: int) -> float | None:
    return None if value is None else float(value) / n


def _float(value) -> float:
    return np.nan if value is None or pd.isna(value) else float(value)


# ---------------------------------------------------------------- the stage

def _cost(s: StageRun) -> None:
    """Every method's test AUC against its extra cost beyond answering."""
    table = cost_table(s.run)
    s.run.write_csv(rf.COST, table)
    title = f"{short_model(s.config.model)} · {s.config.dataset} · test AUC against extra cost beyond answering"
    plot_cost(table, s.run.path(rf.COST_FIGURE), title)
    s.run.update_summary(cost=cost_summary(table))


# summary.json's timings and token counts are read, not fingerprinted (every stage rewrites it)
register(Stage(
    "cost", "4e", "Every method's test AUC against its extra cost beyond answering (cost.csv, cost.png).", _cost,
    inputs=(rf.ANSWERS, rf.GENERATIONS, rf.PROBE_RESULTS, rf.BASELINE_RESULTS, rf.WHOLEMAP_RESULTS, rf.RESAMPLES),
    outputs=(rf.COST, rf.COST_FIGURE), settings=lambda c: {}, labelled=True, optional=True))
