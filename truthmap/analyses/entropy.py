"""Semantic entropy from sampled answers, and probes that learn it without gold labels.

**Sampling scores** (one row per question, from its N sampled answers — ``resamples.parquet``, drawn by
``truthmap resample`` or by ``truthmap run --also samples``): the samples are clustered by meaning and

* ``semantic_entropy`` — the entropy (nats) of the cluster frequencies (Farquhar et al. 2024's discrete
  semantic entropy): 0 when every sample means the same, log N when all N differ;
* ``semantic_entropy_prob`` — the entropy of the clusters' probabilities: a cluster's probability is the sum
  of its samples' sequence probabilities (each the exp of the *mean* token log-probability, as the paper's
  code does), normalised over the clusters;
* ``naive_entropy`` — minus the mean of the samples' mean token log-probabilities (no clustering);
* ``n_clusters`` — the number of distinct meanings among the N samples;
* ``sample_disagreement`` — the share of samples whose meaning differs from the greedy answer's.

Each score is oriented like every baseline: higher means "more likely wrong". Two clusterings:

* by the normalised exact answer (``meaning_key``): the exact answer the label stage's rules find in a
  sample (not the extractor model: no model calls), or, when a sample has none, its whole normalised
  answer — so a label-free question (no vocabulary, no gold) still clusters by what was said;
* with ``judge`` (``*_judged`` columns): two answers mean the same when the judge says each entails the
  other (the paper's bidirectional entailment); answers with the same normalised text are the same
  without asking. Greedy clustering, as in the paper: each distinct answer is compared with the first
  member of each cluster so far, in order, until one is equivalent; a comparison costs 2 judge calls
  (both directions). :class:`ModelJudge` asks a language model (``--extractor-model``, or the studied
  model) with one forward pass per call; ``judge_calls`` counts them per question.

**Semantic-entropy probes** (Kossen et al. 2024): for every cell, a probe on the *greedy* answer's hidden
state is trained on each seed's train part to predict high (1) vs low (0) semantic entropy — no gold
label is used in training. The threshold is the paper's best split, found on the train part of each
seed (:func:`best_split_threshold`: the cut that minimises the two groups' summed squared deviation).
Each probe is then scored on the validation and test parts, with the same bootstrap as the correctness
probes, for two targets: ``error`` (detecting wrong answers; only when the study has gold answers) and
``high_entropy`` (its agreement with semantic entropy, the label-free measure).

Reads ``resamples.parquet``, ``answers.parquet``, ``generations.parquet`` (the greedy answers),
``splits.json``, ``activations/``; writes ``sampling_scores.parquet``, ``entropy_probe_results.csv`` (the
columns of ``probe_results.csv`` and ``target``), ``entropy_probe_scores.parquet`` (``site, layer,
position, seed, id, score``: each test answer's P(high entropy)) and ``heatmap_entropy.png``/``.svg``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..errors import CannotRun, TruthmapError
from ..metrics import (RESULT_COLUMNS, bootstrap_for, cell_stats, cell_summary, choose_cell, mean_over_seeds,
                       result_rows, split_masks, strata_of)
from ..config import Config
from ..backends.base import resolve_device
from ..stages.base import Stage, StageRun, register, short_model
from ..stages.label import has_labels, judge_model

# the names: runfolder/names.py
SAMPLING_SCORES, ENTROPY_RESULTS, ENTROPY_SCORES = rf.SAMPLING_SCORES, rf.ENTROPY_RESULTS, rf.ENTROPY_SCORES
FIGURE = rf.ENTROPY_FIGURE
TARGETS = ("error", "high_entropy")
SCORE_NAMES = ("semantic_entropy", "semantic_entropy_prob", "naive_entropy", "n_clusters", "sample_disagreement")
JUDGE_PROMPT = ("We are evaluating answers to the question: {question}\nPossible answer 1: {a}\nPossible answer 2: {b}\n"
                "Does possible answer 1 say everything that possible answer 2 says (it may say more)?\n(A) Yes\n(B) No")
JUDGE_REPLY = "The answer is: ("


# ---------------------------------------------------------------------- entropies of one question

def cluster_entropy(clusters: list, logprobs: list[float] | None = None) -> tuple[float, float]:
    """(discrete, probability-weighted) semantic entropy of one question's samples.

    ``clusters``: the cluster of each sample; ``logprobs``: each sample's sequence log-probability (None:
    the second value is NaN)."""
    if not clusters:
        return float("nan"), float("nan")
    keys, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    share = np.bincount(index, minlength=len(keys)) / len(clusters)
    discrete = float(-(share * np.log(share)).sum()) + 0.0  # + 0.0: no "-0.0"
    if logprobs is None or not np.all(np.isfinite(logprobs)):
        return discrete, float("nan")
    lp = np.asarray(logprobs, dtype=float)
    cluster_lp = np.array([_logsumexp(lp[index == k]) for k in range(len(keys))])
    cluster_lp -= _logsumexp(cluster_lp)  # normalised over the clusters the samples reached
    return discrete, float(-(np.exp(cluster_lp) * cluster_lp).sum()) + 0.0


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + float(np.log(np.exp(values - top).sum()))


def sequence_logprob(token_logprobs) -> float:
    """A sample's sequence log-probability: the mean of its tokens' log-probabilities (length-normalised)."""
    values = np.asarray(token_logprobs, dtype=float)
    return float(values.mean()) if len(values) else float("nan")


def meaning_key(answer: str, exact_answer: str, valid: bool, reason: str = "") -> str:
    """The meaning cluster of an answer by text: its normalised exact answer when the rules found one,
    else its whole normalised answer (an exact answer the extractor model gave is not used, so the
    greedy answer and the samples are keyed alike)."""
    from ..textmatch import normalize

    if valid and reason != "extractor" and exact_answer:
        return normalize(exact_answer)
    return normalize(answer or "")


# ---------------------------------------------------------------------- clustering by a judge

def judge_clusters(items: list[tuple[str, list[str]]], judge) -> tuple[list[list[int]], list[int]]:
    """Greedy clustering of each question's answers by bidirectional entailment, all questions at once.

    ``items``: (question, answers) per question; ``judge``: a callable taking a list of (question, a, b)
    and returning, for each, whether a entails b. Returns (cluster number of every answer, per question;
    judge calls per question). Answers with the same normalised text share a cluster without a call.
    Comparisons of all questions are sent to the judge together, one round per comparison step."""
    from ..textmatch import normalize

    state = []
    for question, answers in items:
        keys = [normalize(a) for a in answers]
        distinct = list(dict.fromkeys(keys))
        state.append({"question": question, "keys": keys, "distinct": distinct,
                      "text": {k: answers[keys.index(k)] for k in distinct},
                      "cluster_of": {}, "reps": [], "next": 0, "rep": 0, "calls": 0})
    for s in state:
        _advance(s)
    while True:
        pending = [s for s in state if s["next"] < len(s["distinct"])]
        if not pending:
            break
        pairs = []
        for s in pending:
            a, b = s["text"][s["distinct"][s["next"]]], s["text"][s["reps"][s["rep"]]]
            pairs += [(s["question"], a, b), (s["question"], b, a)]
        verdicts = list(judge(pairs))
        if len(verdicts) != len(pairs):
            raise TruthmapError(f"the equivalence judge gave {len(verdicts)} verdicts for {len(pairs)} pairs")
        for k, s in enumerate(pending):
            s["calls"] += 2
            key = s["distinct"][s["next"]]
            if verdicts[2 * k] and verdicts[2 * k + 1]:
                s["cluster_of"][key] = s["rep"]
                s["next"] += 1
                s["rep"] = 0
            else:
                s["rep"] += 1
            _advance(s)
    return [[s["cluster_of"][k] for k in s["keys"]] for s in state], [s["calls"] for s in state]


def _advance(s: dict) -> None:
    """Open a new cluster for the next distinct answer while no cluster is left to compare it with."""
    while s["next"] < len(s["distinct"]) and s["rep"] >= len(s["reps"]):
        key = s["distinct"][s["next"]]
        s["cluster_of"][key] = len(s["reps"])
        s["reps"].append(key)
        s["next"] += 1
        s["rep"] = 0


class ModelJudge:
    """Whether answer a entails answer b to a question, as a language model says: the A/B question
    ``JUDGE_PROMPT`` (its reply begun with ``JUDGE_REPLY``), yes when P(B: no) < 0.5 over the two letters.
    One forward pass per call; ``calls`` counts them."""

    def __init__(self, lm, batch_size: int = 16):
        self.lm, self.batch_size, self.calls = lm, batch_size, 0

    def prompt(self, question: str, a: str, b: str) -> str:
        text = JUDGE_PROMPT.format(question=question, a=a, b=b)
        tokenizer = self.lm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": text}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + JUDGE_REPLY
        return text + "\n" + JUDGE_REPLY

    def __call__(self, pairs: list[tuple[str, str, str]]) -> list[bool]:
        from ..stages.baselines import option_b_probability

        self.calls += len(pairs)
        no = option_b_probability(self.lm, [self.prompt(*p) for p in pairs], self.batch_size)
        return [bool(v < 0.5) for v in no]


# ---------------------------------------------------------------------- scores of every question

def sampling_scores(resamples: pd.DataFrame, answers: pd.DataFrame, judge=None) -> pd.DataFrame:
    """The sampling scores of every question that has samples (see the module docstring).

    ``resamples``: ``resamples.parquet`` (``token_logprobs`` optional: without it the probability-weighted
    and naive entropies are NaN); ``answers``: the greedy answers (``answers.parquet``)."""
    greedy = answers.set_index("id")
    rows, judged_items = [], []
    for qid, group in resamples.sort_values(["id", "sample"]).groupby("id", sort=False):
        g = greedy.loc[qid]
        keys = [meaning_key(a, e, v, r) for a, e, v, r in zip(group["answer"], group["exact_answer"],
                                                              group["exact_answer_valid"], group["exact_answer_reason"])]
        greedy_key = meaning_key(g["answer"], g["exact_answer"], g["exact_answer_valid"], g["exact_answer_reason"])
        logprobs = ([sequence_logprob(t) for t in group["token_logprobs"]] if "token_logprobs" in group.columns
                    else None)
        rows.append({"id": qid, "n_samples": len(group), **_scores(keys, greedy_key, logprobs)})
        judged_items.append((str(g["question"]), [str(g["answer"])] + group["answer"].astype(str).tolist(), logprobs))
    table = pd.DataFrame(rows)
    if judge is not None and len(table):
        clusters, calls = judge_clusters([(q, texts) for q, texts, _ in judged_items], judge)
        judged = [_scores(c[1:], c[0], lp) for c, (_, _, lp) in zip(clusters, judged_items)]
        for name in SCORE_NAMES:
            if name != "naive_entropy":  # no clustering: the same with or without a judge
                table[f"{name}_judged"] = [j[name] for j in judged]
        table["judge_calls"] = calls
    return table


def _scores(clusters: list, greedy_cluster, logprobs: list[float] | None) -> dict:
    discrete, weighted = cluster_entropy(clusters, logprobs)
    naive = -float(np.mean(logprobs)) if logprobs is not None and len(logprobs) else float("nan")
    return {"semantic_entropy": discrete, "semantic_entropy_prob": weighted, "naive_entropy": naive,
            "n_clusters": len(set(map(str, clusters))),
            "sample_disagreement": float(np.mean([str(c) != str(greedy_cluster) for c in clusters]))}


def token_logprobs(lm, generations: pd.DataFrame, resamples: pd.DataFrame) -> list[list[float]]:
    """Each sample's token log-probabilities under the model (special tokens such as end-of-turn left
    out), read by one teacher-forced pass over prompt + sample: at temperature 1 with no top-k/top-p these
    are the probabilities the samples were drawn with."""
    prompt_of = generations.set_index("id")["prompt_ids"]
    prompts = [list(prompt_of[i]) for i in resamples["id"]]
    answers = [list(a) for a in resamples["answer_ids"]]
    stats = lm.token_statistics([p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts])
    special = set(lm.tokenizer.all_special_ids)
    out = []
    for ids, (prob, _) in zip(answers, stats):
        keep = np.array([t not in special for t in ids], dtype=bool)
        out.append(np.log(np.clip(prob[keep], 1e-30, 1.0)).tolist())
    return out


# ---------------------------------------------------------------------- semantic-entropy probes

def best_split_threshold(values: np.ndarray) -> float | None:
    """The threshold t that splits ``values`` into low (≤ t) and high (> t) with the least summed squared
    deviation from the two groups' means (Kossen et al.'s best split); None when all values are equal."""
    values = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
    distinct = np.unique(values)
    if len(distinct) < 2:
        return None
    cuts = (distinct[:-1] + distinct[1:]) / 2
    best, best_cost = None, np.inf
    for t in cuts:
        low, high = values[values <= t], values[values > t]
        cost = ((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum()
        if cost < best_cost - 1e-12:
            best, best_cost = float(t), cost
    return best


def high_entropy_labels(entropy: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, list]:
    """(``[S, N]`` 1 = high entropy, the threshold of each seed) with each seed's threshold found on its
    train part; NaN entropy gives label -1 (no label)."""
    labels = np.full(train.shape, -1, dtype=np.int64)
    thresholds = []
    finite = np.isfinite(entropy)
    for s in range(train.shape[0]):
        t = best_split_threshold(entropy[train[s] & finite])
        thresholds.append(t)
        if t is not None:
            labels[s, finite] = (entropy[finite] > t).astype(np.int64)
    return labels, thresholds


def run_entropy_probe(run_dir: Path | rf.Run, sites: list[str], *, column: str = "semantic_entropy", C: float = 1.0,
                      n_boot: int = 1000, device: str = "cpu", progress: bool = True,
                      min_per_class: int = 2) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Fit and evaluate every semantic-entropy probe; return (results, test scores, details).

    Results have ``probe_results.csv``'s columns and ``target`` (``TARGETS``); the ``error`` rows exist
    only when the study has gold answers (:func:`truthmap.stages.label.has_labels`). ``run_dir``: a run
    folder or an open Run (:func:`truthmap.runfolder.at`)."""
    import torch
    from tqdm.auto import tqdm

    from ..stages.extract import load_layer
    from ..logistic import BatchedLogisticRegression

    run = rf.at(run_dir)
    run_dir = run.root
    answers = run.read_parquet(rf.ANSWERS)
    splits = run.read_splits(rf.SPLITS)
    meta = run.read_activations_index()
    ids = meta["ids"]
    scores = run.read_parquet(SAMPLING_SCORES).set_index("id")
    if column not in scores.columns:
        raise TruthmapError(f"{run_dir / SAMPLING_SCORES}: no column '{column}'")
    entropy = scores[column].reindex(ids).to_numpy(dtype=float)
    seeds, parts = split_masks(splits, ids)
    high, thresholds = high_entropy_labels(entropy, parts["train"])
    for s, seed in enumerate(seeds):
        n_high = int((high[s][parts["train"][s]] == 1).sum())
        n_low = int((high[s][parts["train"][s]] == 0).sum())
        if min(n_high, n_low) < min_per_class:
            raise CannotRun(
                f"{run_dir / SAMPLING_SCORES}, seed {seed}: the train part holds {n_high} high- and {n_low} "
                f"low-entropy answers (need at least {min_per_class} of each); draw more samples per question "
                f"(--samples) or study more questions")
    labelled = has_labels(answers)
    error = None
    if labelled:
        label_of = dict(zip(answers["id"], ~answers["correct"].astype(bool)))
        error = np.array([label_of[i] for i in ids], dtype=np.int64)
    weights = bootstrap_for(answers, ids, n_boot)
    strata = strata_of(answers, ids)
    results, test_scores = [], []
    bar = tqdm(total=sum(len(meta["sites"][s]["layers"]) for s in sites), desc="entropy probe", unit="layer",
               disable=not progress)
    for site in sites:
        for layer in meta["sites"][site]["layers"]:
            _, positions, features, valid = load_layer(run, site, layer)
            X = torch.as_tensor(np.asarray(features), device=device).float()  # [P, N, d]
            prob = np.empty((len(positions), len(seeds), len(ids)))
            for s in range(len(seeds)):  # one target per seed: its threshold comes from its train part
                train = parts["train"][s] & (high[s] >= 0)
                mask = torch.as_tensor(train[None, None, :] & valid.T[:, None, :], device=device)
                y = torch.as_tensor(np.clip(high[s], 0, 1), device=device)
                model = BatchedLogisticRegression(C=C).fit(X, y, mask)
                prob[:, s] = model.predict_proba(X).cpu().numpy()[:, 0].astype(np.float64)
            for p, position in enumerate(positions):
                score = np.where(valid[:, p][None, :] & (high >= 0), prob[p], np.nan)  # [S, N]
                targets = [("high_entropy", high.clip(0, 1), None)]
                if labelled:
                    targets.insert(0, ("error", error, strata))
                for target, y, strata_of_target in targets:
                    per_seed, cell = cell_stats(score, y, parts, weights, strata_of_target)
                    results += [row + [target] for row in result_rows(site, layer, position, seeds, per_seed, cell)]
                for s, seed in enumerate(seeds):
                    test = parts["test"][s] & np.isfinite(score[s])
                    test_scores.append(pd.DataFrame({"site": site, "layer": layer, "position": position,
                                                     "seed": int(seed), "id": np.asarray(ids)[test],
                                                     "score": score[s, test]}))
            bar.update(1)
    bar.close()
    table = pd.DataFrame(results, columns=RESULT_COLUMNS + ["target"])
    score_table = pd.concat(test_scores, ignore_index=True) if test_scores else pd.DataFrame()
    details = {"column": column, "labelled": labelled,
               "thresholds": {str(seed): None if t is None else round(t, 4) for seed, t in zip(seeds, thresholds)},
               "train_high_share": {str(seed): round(float((high[s][parts["train"][s]] == 1).mean()), 4)
                                    for s, seed in enumerate(seeds)}}
    return table, score_table, details


def entropy_summary(results: pd.DataFrame, details: dict) -> dict:
    """summary.json's ``entropy_probe``: the cell chosen as the correctness heatmap chooses (validation
    AUC for errors), and the cell chosen without labels (validation agreement with semantic entropy),
    each with its test AUCs for both targets."""
    means = {t: mean_over_seeds(results[results["target"] == t]) for t in TARGETS
             if (results["target"] == t).any()}
    out = {**details, "best_cell": None, "best_cell_label_free": None}

    def with_other(cell, other):
        if cell is None:
            return None
        summary = cell_summary(cell)
        if other in means:
            table = means[other]
            row = table[(table["site"] == cell["site"]) & (table["layer"] == cell["layer"])
                        & (table["position"] == cell["position"])]
            if len(row):
                summary[f"{other}_auc"] = None if pd.isna(row["auc"].iloc[0]) else round(float(row["auc"].iloc[0]), 4)
        return summary

    for key, target, other in (("best_cell", "error", "high_entropy"), ("best_cell_label_free", "high_entropy", "error")):
        cell = with_other(choose_cell(means[target]), other) if target in means else None
        if cell is not None:  # None: no cell has a validation AUC (a part lacked one of the classes)
            out[key] = {**cell, "target": target}
    return out


def plot_entropy_heatmap(results: pd.DataFrame, positions: list[str], run_dir: Path | rf.Run, *, model: str, dataset: str,
                         n: int) -> list[Path]:
    """``heatmap_entropy.png``/``.svg``: the entropy probes' test AUC for errors (or, in a label-free
    study, for high semantic entropy), box on the validation choice, as the correctness heatmap."""
    from ..stages.plot import plot_heatmap

    target = "error" if (results["target"] == "error").any() else "high_entropy"
    rows = results[results["target"] == target]
    if target == "error":
        what, label = "entropy probes, test AUC for errors", "semantic-entropy probe AUC (predicting an error)"
    else:
        what = "entropy probes, test AUC for high SE (no gold answers)"
        label = "agreement with semantic entropy (AUC for high SE)"
    return plot_heatmap(rows, positions, rf.at(run_dir).path(FIGURE), model=model, dataset=dataset, n=n, what=what,
                        label=label)


def run_sampling(lm, run_dir: Path | rf.Run, *, n: int = 5, temperature: float = 1.0, seed: int = 0, judge_lm=None,
                 grader_lm=None, batch_size: int | None = None, progress: bool = True,
                 max_new_tokens: int | None = None) -> dict:
    """Draw ``n`` samples per question, keep their token log-probabilities, write ``resamples.parquet``
    and ``sampling_scores.parquet``; return the cost figures for summary.json (``sampling``).

    ``judge_lm`` clusters by meaning (``--judge-equivalence``); ``grader_lm`` grades every sample as the
    lenient grader (``--judge-grader``; its calls are ``grader_calls``). ``run_dir``: a run folder or an
    open Run (:func:`truthmap.runfolder.at`)."""
    import time

    from .resample import RESAMPLES, label_resamples, run_answer_length, sample_answers

    from ..config import saved_settings

    run = rf.at(run_dir)
    config = saved_settings(run.path(rf.CONFIG), required=False)  # the run's settings, checked by the schema
    questions = run.read_parquet(rf.QUESTIONS)
    generations = run.read_parquet(rf.GENERATIONS)
    answers = run.read_parquet(rf.ANSWERS)
    questions = questions[questions["id"].isin(set(generations["id"]))]
    vocabularies = run.read_json(rf.VOCABULARIES, default={})
    positions = run.read_activations_index(default={}).get("positions") or []
    prompts = generations.set_index("id").loc[questions["id"], "prompt_ids"].map(list).tolist()
    max_new = run_answer_length(config, questions, max_new_tokens)
    started = time.perf_counter()
    drawn = sample_answers(lm, prompts, n=n, temperature=temperature, seed=seed, max_new_tokens=max_new,
                           batch_size=batch_size, progress=progress)
    sampled = time.perf_counter()
    # the samples' exact answers come from the rules alone: the extractor model is not asked
    resamples = label_resamples(lm, questions, generations, drawn, vocabularies, positions, progress=False,
                                judge=grader_lm, grader=str(config.get("grader", "alias")), batch_size=batch_size,
                                protocol=str(config.get("protocol", "brief")))
    resamples["token_logprobs"] = token_logprobs(lm, generations, resamples)
    run.write_parquet(RESAMPLES, resamples)
    scored = time.perf_counter()
    judge = ModelJudge(judge_lm) if judge_lm is not None else None
    table = sampling_scores(resamples, answers, judge)
    run.write_parquet(SAMPLING_SCORES, table)
    done = time.perf_counter()
    q = max(len(questions), 1)
    return {"n": n, "temperature": temperature, "seed": seed, "questions": len(questions),
            "generated_samples": n * len(questions), "logprob_passes": n * len(questions),
            "judge_calls": judge.calls if judge else 0,
            "grader_calls": resamples.attrs.get("judge", {}).get("calls", 0),
            "grader_forward_tokens": resamples.attrs.get("judge", {}).get("forward_tokens", 0),
            "seconds_per_question": {"sampling": round((sampled - started) / q, 3),
                                     "labels_and_logprobs": round((scored - sampled) / q, 3),
                                     "judge": round((done - scored) / q, 3)}}


def refresh_sampling_scores(lm, run_dir: Path | rf.Run, judge_lm=None) -> pd.DataFrame:
    """After ``truthmap resample``: the samples' token log-probabilities (added to ``resamples.parquet``)
    and ``sampling_scores.parquet``, so that the next ``truthmap run`` scores them as baselines and trains
    semantic-entropy probes."""
    from .resample import RESAMPLES

    run = rf.at(run_dir)
    resamples = run.read_parquet(RESAMPLES)
    resamples["token_logprobs"] = token_logprobs(lm, run.read_parquet(rf.GENERATIONS), resamples)
    run.write_parquet(RESAMPLES, resamples)
    judge = ModelJudge(judge_lm) if judge_lm is not None else None
    table = sampling_scores(resamples, run.read_parquet(rf.ANSWERS), judge)
    run.write_parquet(SAMPLING_SCORES, table)
    return table


# ---------------------------------------------------------------- the stages (samples, entropy)

def wants_samples(config: Config, run_dir: Path) -> bool:
    """Sampling runs with ``--also samples``, and always for a study without gold answers."""
    return "samples" in config.also or not has_labels(rf.read_parquet(run_dir / rf.ANSWERS))


def _samples(s: StageRun) -> None:
    """N sampled answers per question and their sampling scores (semantic entropy …)."""
    c, models = s.config, s.models
    judge = (models.extractor or models.lm) if c.judge_equivalence else None
    info = run_sampling(models.lm, s.run, n=c.samples, temperature=c.sample_temperature, seed=0,
                        judge_lm=judge, grader_lm=judge_model(c, models), batch_size=c.batch_size,
                        progress=c.progress)
    s.run.update_summary(sampling=info)


def _entropy_column(c: Config) -> str:
    return "semantic_entropy_judged" if c.judge_equivalence else "semantic_entropy"


def _entropy(s: StageRun) -> None:
    """Semantic-entropy probes for every cell and their heatmap."""
    c, run = s.config, s.run
    device = resolve_device(c.device) if c.device_map is None else "cpu"
    results, scores, details = run_entropy_probe(run, c.sites, column=_entropy_column(c), C=c.C,
                                                 n_boot=c.bootstrap, device=device, progress=c.progress,
                                                 min_per_class=c.min_per_class)
    run.write_csv(rf.ENTROPY_RESULTS, results)
    run.write_parquet(rf.ENTROPY_SCORES, scores)
    n = len(run.read_parquet(rf.ANSWERS).query("split != ''"))
    plot_entropy_heatmap(results, c.positions, run, model=short_model(c.model), dataset=c.dataset, n=n)
    run.update_summary(entropy_probe=entropy_summary(results, details))


register(Stage(
    "samples", "3b", "N sampled answers per question and their semantic entropy (sampling_scores.parquet).",
    _samples, inputs=(rf.QUESTIONS, rf.VOCABULARIES, rf.ANSWERS, rf.GENERATIONS, rf.ACTIVATIONS_INDEX),
    outputs=(rf.RESAMPLES, rf.SAMPLING_SCORES),
    settings=lambda c: {"samples": c.samples, "temperature": c.sample_temperature, "judge": c.judge_equivalence,
                        "judge_model": c.extractor_model if c.judge_equivalence else None,
                        "max_new_tokens": c.max_new_tokens, "model": c.model, "dtype": c.dtype,
                        "grader": c.grader, "judge_grader": c.judge_grader},
    model="here", when=wants_samples, also=True))
register(Stage(
    "entropy", "4c", "Semantic-entropy probes for every cell (heatmap_entropy.png).", _entropy,
    inputs=(rf.ANSWERS, rf.SPLITS, rf.ACTIVATIONS, rf.SAMPLING_SCORES),
    outputs=(rf.ENTROPY_RESULTS, rf.ENTROPY_SCORES, *rf.figures(rf.ENTROPY_FIGURE)),
    settings=lambda c: {"C": c.C, "bootstrap": c.bootstrap, "sites": c.sites, "column": _entropy_column(c),
                        "positions": c.positions, "min_per_class": c.min_per_class},
    when=lambda c, run_dir: (run_dir / rf.SAMPLING_SCORES).exists(), optional=True, summary=True))
