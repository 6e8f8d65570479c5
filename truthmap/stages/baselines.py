"""Baselines beside the probes: what a probe must beat before its AUC means anything.

Reads ``answers.parquet``, ``generations.parquet``, ``splits.json`` and (for the per-family probe AUC)
``probe_results.csv`` / ``probe_scores.parquet``; writes

* ``baseline_scores.parquet`` — one row per answer: ``id`` and one column per model-based baseline;
* ``baseline_results.csv`` — the columns of ``probe_results.csv`` with ``site = baseline``,
  ``layer = -1`` and the baseline's name in ``position`` (``probe_results.csv`` holds the probes'
  rows only; :func:`truthmap.metrics.read_run_results` reads both as one table);
* ``family_results.csv`` — per family and seed: test size, wrong answers, the family's train error
  rate and the best probe cell's AUC within the family;
* ``baselines.png`` — every baseline's AUC beside the best probe's.

**One orientation for every score: higher means "more likely wrong"**, and every AUC takes an error
as the positive class, as the probes do. The baselines:

* ``logprob_{mean,min,max,last}`` — minus the mean / min / max / last log-probability of the greedy
  answer's tokens (special tokens such as end-of-turn left out); ``entropy_mean`` — the mean entropy
  (nats) of the next-token distribution at those tokens; each also ``*_exact``: over the exact-answer
  tokens only (missing where the answer has no valid exact answer);
* ``p_true_exact`` (and ``p_true_answer`` with ``--p-true both``) — the model is asked whether the
  proposed answer (the exact answer, or the whole answer) is true (``P_TRUE_PROMPT``, its reply begun
  with ``P_TRUE_REPLY`` so that the next token is the option letter); score = P(B) / (P(A) + P(B)),
  the probability it gives to "(B) False";
* ``family_rate`` (and ``subgroup_rate`` where the questions have subgroups) — the error rate of the
  question's family on the seed's train split: a probe no better than this only recognises kinds of
  question.

Only two scalars per answer token (its probability and the entropy) are ever kept, never logits.

Every baseline is registered by name in ``BASELINES`` (:class:`Baseline`: its kind, what it costs beyond
answering, a label, whether its score is a probability, and for a control fitted on the train part how
it is fitted). The verdict, the heatmap's controls bar, summary.json's ``controls``, the cost table
(analyses/cost.py) and the report read the names of a run's rows and their kinds from the registry;
adding a baseline is registering it (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..backends.base import chat_prompt, encode_prompt
from ..constants import BASELINE_SITE, SITES
from ..errors import TruthmapError
from ..metrics import (RESULT_COLUMNS, auc_score, bootstrap_for, cell_stats, cell_summary, choose_cell,
                       mean_over_seeds, read_run_results, result_rows, split_masks, strata_of)
from ..positions import EXACT_POSITIONS, char_span_to_tokens, token_char_spans
from .base import Stage, StageRun, fields, register, short_model
from .verdict import compare_cell, study_verdict
from ..runfolder import BASELINE_RESULTS, FAMILY_RESULTS  # the names: runfolder/names.py
from ..runfolder import BASELINES_FIGURE as FIGURE

SITE = BASELINE_SITE
P_TRUE_PROMPT = "Question: {question}\nPossible answer: {answer}\nIs the possible answer:\n(A) True\n(B) False"
# the reply is begun for the model, so that its next token is the option letter (not "The", "True", …)
P_TRUE_REPLY = "The possible answer is: ("
# which p(True) variants a run asks (--p-true): the score columns each choice adds
P_TRUE_CHOICES = {"exact": ("p_true_exact",), "both": ("p_true_exact", "p_true_answer"), "none": ()}


# ---------------------------------------------------------------------- per-token scalars
# (the probability and entropy of each answer token come from the backend: ``lm.token_statistics``, or
# read while generating)

TOKEN_STATISTICS = ("logprob_mean", "logprob_min", "logprob_max", "logprob_last", "entropy_mean")  # per answer
TOKEN_SPANS = {"": "the answer's tokens", "_exact": "the exact answer's tokens"}  # each statistic over each span


def summarise_tokens(prob: np.ndarray, entropy: np.ndarray, keep: np.ndarray, suffix: str = "") -> dict:
    """The log-probability and entropy scores over the tokens ``keep`` (bool), oriented higher = wrong."""
    if not keep.any():
        return {f"{name}{suffix}": np.nan for name in TOKEN_STATISTICS}
    logp = np.log(np.clip(prob[keep], 1e-30, 1.0))
    return {
        f"logprob_mean{suffix}": -float(logp.mean()),
        f"logprob_min{suffix}": -float(logp.min()),  # the least likely token
        f"logprob_max{suffix}": -float(logp.max()),
        f"logprob_last{suffix}": -float(logp[-1]),
        f"entropy_mean{suffix}": float(entropy[keep].mean()),
    }


# ---------------------------------------------------------------------- p(True)

def letter_token_ids(tokenizer, letters: str = "AB") -> list[list[int]]:
    """For each option letter, every token that reads as it ("A", " A", …)."""
    texts = [t.strip() for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])]
    return [[i for i, t in enumerate(texts) if t == letter] for letter in letters]


def p_true_prompt(tokenizer, question: str, proposed: str) -> str:
    """The p(True) question as a user message, and the start of the model's reply."""
    text = P_TRUE_PROMPT.format(question=question, answer=proposed)
    if getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, text) + P_TRUE_REPLY
    return text + "\n" + P_TRUE_REPLY


def option_letters(lm) -> tuple[list[int], list[int]]:
    """The token ids that read as "A" and as "B" in ``lm``'s vocabulary; a one-line error when either has none."""
    a_ids, b_ids = letter_token_ids(lm.tokenizer)
    if not a_ids or not b_ids:
        raise TruthmapError(f"model '{lm.model_id}': its tokenizer has no token for the option letters A/B")
    return a_ids, b_ids


def option_b_share(logp: np.ndarray) -> np.ndarray:
    """P(B) / (P(A) + P(B)) from the log masses ``[N, 2]`` of the options A and B."""
    from scipy.special import expit

    return expit(logp[:, 1] - logp[:, 0])


def p_true(lm, questions: list[str], proposed: list[str | None], batch_size: int = 16) -> np.ndarray:
    """P("False") normalised over the A/B options for each (question, proposed answer); NaN where None."""
    texts = [p_true_prompt(lm.tokenizer, q, p) if p else None for q, p in zip(questions, proposed)]
    return option_b_probability(lm, texts, batch_size)


def option_b_probability(lm, prompts: list[str | None], batch_size: int = 16) -> np.ndarray:
    """P(B) / (P(A) + P(B)) of the next token after each prompt text (which ends where the model names an
    option letter); NaN where the prompt is None."""
    options = option_letters(lm)
    out = np.full(len(prompts), np.nan)
    todo = [i for i, p in enumerate(prompts) if p]
    if todo:
        logp = lm.next_token_logprobs([encode_prompt(lm.tokenizer, prompts[i]) for i in todo], list(options), batch_size)
        out[todo] = option_b_share(logp)
    return out


def p_true_variants(lm, questions: list[str], variants: list[list[str | None]], batch_size: int = 16,
                    share_prefix: bool = True) -> np.ndarray:
    """:func:`p_true` of several proposed answers per question (``variants[v][i]``), float ``[V, N]``.

    All proposals of a question go to the backend as one group, ``batch_size`` questions at a time, with
    a marker prompt (the question with the proposal "?") that says where the question's shared part
    ends: with ``share_prefix`` the backend computes what prompts share once (``next_token_logprobs`` in
    truthmap/backends/base.py), the beginning of every prompt and each question once for all its
    proposals; questions run in order of their longest prompt (similar lengths, little padding).
    """
    options = option_letters(lm)
    out = np.full((len(variants), len(questions)), np.nan)
    prompts, marker = {}, {}
    for i, question in enumerate(questions):
        for v, proposed in enumerate(variants):
            if proposed[i]:
                prompts[(v, i)] = encode_prompt(lm.tokenizer, p_true_prompt(lm.tokenizer, question, proposed[i]))
        if share_prefix:  # ends where any proposal would begin: what a question's prompts share
            marker[i] = encode_prompt(lm.tokenizer, p_true_prompt(lm.tokenizer, question, "?"))
    keys_of = {i: [(v, i) for v in range(len(variants)) if (v, i) in prompts] for i in range(len(questions))}
    todo = sorted((i for i in keys_of if keys_of[i]), key=lambda i: max(len(prompts[key]) for key in keys_of[i]))
    keys = [key for i in todo for key in keys_of[i]]
    if not keys:
        return out
    groups, first = None, 0
    if share_prefix:
        groups = []
        for i in todo:
            groups.append((list(range(first, first + len(keys_of[i]))), marker[i]))
            first += len(keys_of[i])
    scores = option_b_share(lm.next_token_logprobs([prompts[key] for key in keys], list(options), batch_size, groups))
    for (v, i), value in zip(keys, scores):
        out[v, i] = value
    return out


# ---------------------------------------------------------------------- all model-based scores

def compute_scores(lm, answers: pd.DataFrame, generations: pd.DataFrame, progress: bool = False,
                   one_pass: bool = True, p_true_of: str = "exact") -> pd.DataFrame:
    """The model-based baseline scores of every answer (one row per answer, ``id`` first).

    ``one_pass``: the token scores read while generating (``generations.parquet``'s ``token_prob`` and
    ``token_entropy``, capture.py) are used where present, and only the other answers go through the
    token-statistics pass; the p(True) variants share one pass. Otherwise (``--extract separate``)
    the token statistics and each p(True) variant have a pass of their own. ``p_true_of`` (one of
    ``P_TRUE_CHOICES``): which p(True) variants are asked — ``exact`` (the default: the exact answer;
    the whole-answer variant costs about as much again and has scored below chance on the built-in
    task), ``both`` (also the whole answer, as the reference study), ``none``. ``scores.attrs["seconds"]``
    says how long each part took, ``scores.attrs["forward_tokens"]`` how many tokens each ran through the
    model (``token_statistics``: the answers not read while generating, prompt and answer; ``p_true_*``: the
    tokens of the variant's prompts, as a pass without shared prefixes would run them).
    """
    import time

    columns = ["id", "prompt_ids", "answer_ids"] + [c for c in ("token_prob", "token_entropy")
                                                     if one_pass and c in generations.columns]
    table = answers.merge(generations[columns], on="id", how="left", validate="one_to_one")
    started = time.perf_counter()
    stats, reread = _token_statistics_of(lm, table)
    seconds = {"token_statistics": time.perf_counter() - started}
    tokens = {"token_statistics": int(sum(len(table.prompt_ids.iloc[i]) + len(table.answer_ids.iloc[i]) for i in reread))}
    special = set(lm.tokenizer.all_special_ids)
    rows = []
    for row, (prob, entropy) in zip(table.itertuples(), stats):
        answer_ids = list(row.answer_ids)
        content = np.array([t not in special for t in answer_ids], dtype=bool)
        exact = np.zeros(len(answer_ids), dtype=bool)
        if row.exact_answer_valid:
            span = char_span_to_tokens(token_char_spans(lm.tokenizer, answer_ids, row.answer),
                                       row.exact_answer_start, row.exact_answer_end, row.answer)
            if span is not None:
                exact[span[0] : span[1] + 1] = True
        rows.append({"id": row.id, **summarise_tokens(prob, entropy, content),
                     **summarise_tokens(prob, entropy, exact & content, "_exact")})
    scores = pd.DataFrame(rows)
    questions = table["question"].tolist()
    exact = [e if v else None for e, v in zip(table.exact_answer, table.exact_answer_valid)]
    whole = [a if a.strip() else None for a in table.answer]
    variants = {"p_true_exact": exact, "p_true_answer": whole}
    asked = {name: variants[name] for name in P_TRUE_CHOICES[p_true_of]}
    started = time.perf_counter()
    if asked and one_pass:
        for name, values in zip(asked, p_true_variants(lm, questions, list(asked.values()))):
            scores[name] = values
    else:
        for name, proposed in asked.items():
            scores[name] = p_true(lm, questions, proposed)
    seconds["p_true"] = time.perf_counter() - started
    for name, proposed in asked.items():
        tokens[name] = int(sum(len(encode_prompt(lm.tokenizer, p_true_prompt(lm.tokenizer, q, a)))
                               for q, a in zip(questions, proposed) if a))
    scores.attrs["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    scores.attrs["forward_tokens"] = tokens
    return scores


def _token_statistics_of(lm, table: pd.DataFrame) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
    """(token probabilities, entropies) of each answer: read while generating where ``table`` has them
    (one per answer token), else by the backend's ``token_statistics``; and the rows that needed that pass."""
    stats: list = [None] * len(table)
    if "token_prob" in table.columns:
        for i, (answer, prob, entropy) in enumerate(zip(table.answer_ids, table.token_prob, table.token_entropy)):
            if prob is not None and entropy is not None and len(prob) == len(answer) == len(entropy):
                stats[i] = (np.asarray(prob, dtype=np.float32), np.asarray(entropy, dtype=np.float32))
    todo = [i for i, s in enumerate(stats) if s is None]
    if todo:
        sequences = [list(table.prompt_ids.iloc[i]) + list(table.answer_ids.iloc[i]) for i in todo]
        for i, found in zip(todo, lm.token_statistics(sequences, [len(table.prompt_ids.iloc[i]) for i in todo])):
            stats[i] = found
    return stats, todo


def group_rates(answers: pd.DataFrame, train_ids: set, keys: list[str]) -> np.ndarray:
    """Each answer's score = the error rate of its group (``keys``) on the train split; a group with no
    train answers falls back to the overall train rate."""
    error = ~answers["correct"].astype(bool)
    train = answers["id"].isin(train_ids)
    overall = float(error[train].mean())
    rates = error[train].groupby([answers.loc[train, k] for k in keys]).mean()
    index = pd.MultiIndex.from_frame(answers[keys]) if len(keys) > 1 else pd.Index(answers[keys[0]])
    return rates.reindex(index).fillna(overall).to_numpy(dtype=float)


# ---------------------------------------------------------------------- the controls fitted on the train part

def surface_features(answers: pd.DataFrame) -> np.ndarray:
    """``[N, k]`` what an answer looks like from outside, nothing the model holds inside: its length in
    tokens, its exact answer's length in characters, the route of the exact-answer rules (one-hot:
    ``exact_answer_route``, the route taken without the gold answer — ``exact_answer_reason`` would give
    the label away under ``--exact-answer gold``, where a right answer's is its gold alias; ``locator_route``
    in runs of truthmap before 0.3) and whether it stopped on its own (end of turn before the token limit)."""
    route = next((c for c in ("exact_answer_route", "locator_route") if c in answers.columns), None)
    if route is not None:
        routes = pd.get_dummies(answers[route].astype(str)).to_numpy(dtype=float)
    else:  # a table without the label-blind route: no route feature rather than a leak of the label
        routes = np.zeros((len(answers), 0))
    length = answers["n_answer_tokens"].to_numpy(dtype=float)[:, None]
    exact = np.where(answers["exact_answer_valid"], answers["exact_answer_end"] - answers["exact_answer_start"], 0)
    stopped = answers["stopped"].astype(float).to_numpy()[:, None] if "stopped" in answers.columns \
        else np.zeros((len(answers), 1))
    return np.hstack([length, np.asarray(exact, dtype=float)[:, None], routes, stopped])


def surface_scores(answers: pd.DataFrame, train: np.ndarray) -> np.ndarray:
    """P(error) of a logistic model of :func:`surface_features`, fitted on the ``train`` rows: the
    surface control. If it matches the exact-answer columns, those columns may only read the surface."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = surface_features(answers)
    y = ~answers["correct"].astype(bool).to_numpy()
    if len(set(y[train].tolist())) < 2:
        return np.full(len(answers), np.nan)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(X[train], y[train])
    return model.predict_proba(X)[:, 1]


def token_bags(answers: pd.DataFrame) -> "scipy.sparse.csr_matrix":
    """``[N, 2V]`` 0/1 features: which token ids the answer contains (first V columns) and which its exact
    answer contains (last V; none where it has no valid exact answer), V the token ids seen in any answer.
    Reads ``answer_ids`` and ``n_prompt_tokens`` with ``pos_exact_answer_first`` / ``pos_exact_answer_last``
    (indices into prompt + answer); without those positions only the answer's bag is filled."""
    from scipy.sparse import csr_matrix

    vocabulary: dict[int, int] = {}
    rows, columns = [], []
    has_span = {"pos_exact_answer_first", "pos_exact_answer_last"} <= set(answers.columns)
    for r, row in enumerate(answers.itertuples()):
        tokens = [int(t) for t in row.answer_ids]
        exact = []
        if has_span and row.exact_answer_valid and row.pos_exact_answer_first >= 0 and row.pos_exact_answer_last >= 0:
            exact = tokens[row.pos_exact_answer_first - row.n_prompt_tokens : row.pos_exact_answer_last - row.n_prompt_tokens + 1]
        for offset, bag in ((0, tokens), (1, exact)):
            for t in set(bag):
                rows.append(r)
                columns.append((vocabulary.setdefault(t, len(vocabulary)), offset))
    width = len(vocabulary)
    cols = [k + offset * width for k, offset in columns]
    return csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(answers), 2 * width))


def bag_of_tokens_scores(answers: pd.DataFrame, train: np.ndarray, bags=None) -> np.ndarray:
    """P(error) of scikit-learn's ``LogisticRegression(C=1.0)`` on :func:`token_bags`, fitted on the
    ``train`` rows: the control for "which answer was given" (an exact-answer column that only knows
    which tokens stand there is no better than this)."""
    from sklearn.linear_model import LogisticRegression

    X = token_bags(answers) if bags is None else bags
    y = ~answers["correct"].astype(bool).to_numpy()
    if len(set(y[train].tolist())) < 2 or X.shape[1] == 0:
        return np.full(len(answers), np.nan)
    model = LogisticRegression(C=1.0, max_iter=1000).fit(X[train], y[train])
    return model.predict_proba(X)[:, 1]


# ---------------------------------------------------------------------- every baseline, by name

@dataclass(frozen=True)
class Baseline:
    """One score a probe must beat, registered by its name: the name of its column of
    baseline_scores.parquet (or sampling_scores.parquet) and its ``position`` in baseline_results.csv.
    Higher always means "more likely wrong"."""

    name: str
    kind: str  # "token scores", "p(True)", "control", "sampling" or "probe": how it is made (the report groups by it)
    cost: str  # its extra cost beyond answering (analyses/cost.py): one of COSTS
    label: str  # a few words naming it in the report ("surface control", "p(True) of the exact answer")
    probability: bool = False  # its score is a probability: accuracy at 0.5 is reported
    # a control fitted on each seed's train part: answers -> (train mask [N] -> score [N]), or None where it
    # cannot be made on these answers (no subgroups, no token ids); None for a column of a scores file
    fit: Callable[[pd.DataFrame], Callable[[np.ndarray], np.ndarray] | None] | None = None


# what a baseline costs beyond answering (analyses/cost.py counts each), in the order the cost table lists them
COSTS = {"probes": "the hidden states and the probes of every cell",
         "token statistics": "the answer's token probabilities: read while answering, or one forward pass",
         "p(True)": "one more forward pass of its own prompt per answer",
         "none": "no model pass: the answer and the train part",
         "samples": "N sampled answers per question",
         "samples and log-probabilities": "N sampled answers and a forward pass over each"}

BASELINES: dict[str, Baseline] = {}


def register_baseline(baseline: Baseline) -> Baseline:
    """Add ``baseline`` to the registry (a name may be registered once; its cost one of COSTS)."""
    if baseline.name in BASELINES:
        raise ValueError(f"baseline '{baseline.name}' is registered twice")
    if baseline.cost not in COSTS:
        raise ValueError(f"baseline '{baseline.name}': cost '{baseline.cost}' is not one of {', '.join(COSTS)}")
    BASELINES[baseline.name] = baseline
    return baseline


def kind_of(name: str) -> str:
    """The kind of a baseline row's name; "baseline" for a name this version does not register (another
    version's run)."""
    return BASELINES[name].kind if name in BASELINES else "baseline"


def _rates(keys: list[str]):
    def fit(answers):
        if "subgroup" in keys and not answers["subgroup"].fillna("").astype(str).str.len().gt(0).any():
            return None  # no question has a subgroup: the family rate says it all
        ids = answers["id"].to_numpy()
        return lambda train: group_rates(answers, set(ids[train]), keys)
    return fit


def _bags(answers):
    if "answer_ids" not in answers.columns:
        return None
    bags = token_bags(answers)  # once for every seed
    return lambda train: bag_of_tokens_scores(answers, train, bags)


for _suffix, _span in TOKEN_SPANS.items():
    for _name in TOKEN_STATISTICS:
        register_baseline(Baseline(f"{_name}{_suffix}", "token scores", "token statistics",
                                   f"{_name.replace('_', ' ')} over {_span}"))
register_baseline(Baseline("p_true_exact", "p(True)", "p(True)", "p(True) of the exact answer", probability=True))
register_baseline(Baseline("p_true_answer", "p(True)", "p(True)", "p(True) of the whole answer", probability=True))
register_baseline(Baseline("family_rate", "control", "none", "family control", probability=True,
                           fit=_rates(["family"])))
register_baseline(Baseline("subgroup_rate", "control", "none", "family + subgroup control", probability=True,
                           fit=_rates(["family", "subgroup"])))
register_baseline(Baseline("surface", "control", "none", "surface control", probability=True,
                           fit=lambda answers: lambda train: surface_scores(answers, train)))
register_baseline(Baseline("bag_of_tokens", "control", "none", "bag-of-tokens control", probability=True, fit=_bags))
# from the samples stage (analyses/entropy.py: sampling_scores.parquet; "_judged": with --judge-equivalence)
for _name, _cost in (("semantic_entropy", "samples"), ("semantic_entropy_prob", "samples and log-probabilities"),
                     ("naive_entropy", "samples and log-probabilities"), ("n_clusters", "samples"),
                     ("sample_disagreement", "samples")):
    for _judged in ("", "_judged") if _name != "naive_entropy" else ("",):  # no clusters: nothing to judge
        register_baseline(Baseline(_name + _judged, "sampling", _cost,
                                   _name.replace("_", " ") + (" (judged clusters)" if _judged else "")))
# a row of wholemap_results.csv (analyses/wholemap.py), read with the baselines' rows
register_baseline(Baseline("whole_map", "probe", "probes", "the whole map as one probe", probability=True))


def control_names() -> tuple[str, ...]:
    """The registered controls: the baselines a probe cell must beat to count (the heatmap hatches the others)."""
    return tuple(name for name, b in BASELINES.items() if b.kind == "control")


def control_level(results: pd.DataFrame) -> dict | None:
    """The bar a probe cell must clear to beat the controls: ``{"name", "auc", "high"}`` of the control
    (the rows of :func:`control_names`, mean over seeds) with the highest upper 95% bound (its AUC where
    it has no interval); None when the run has no control rows."""
    rows = results[~results["site"].isin(SITES) & results["position"].astype(str).isin(control_names())]
    if rows.empty:
        return None
    means = mean_over_seeds(rows)
    means["bar"] = means["auc_hi"].fillna(means["auc"])
    means = means.dropna(subset=["bar"])
    if means.empty:
        return None
    top = means.loc[means["bar"].idxmax()]
    return {"name": str(top["position"]), "auc": round(float(top["auc"]), 4), "high": round(float(top["bar"]), 4)}


# ---------------------------------------------------------------------- AUCs on the probes' test splits

def evaluate(scores: pd.DataFrame, answers: pd.DataFrame, splits: dict, n_boot: int = 1000,
             columns_out: dict | None = None) -> pd.DataFrame:
    """Rows in ``probe_results.csv``'s format for every baseline and seed: scored, like the probes, on
    the test part (the same answers) and the seed's validation part, with the same bootstrap.
    ``columns_out``, a dict: filled with every baseline's scores ``{name: float [S, N]}`` (seeds in
    ``splits`` order, answers in ``answers``' order) for the paired comparisons of the verdict."""
    ids = answers["id"].tolist()
    seeds, parts = split_masks(splits, ids)
    error = (~answers["correct"].astype(bool)).to_numpy().astype(np.int64)
    weights = bootstrap_for(answers, ids, n_boot)
    strata = strata_of(answers, ids)
    table = scores.set_index("id").reindex(ids)
    columns = {name: np.tile(table[name].to_numpy(dtype=float), (len(seeds), 1)) for name in table.columns}
    for name, baseline in BASELINES.items():  # the controls fitted on each seed's train part
        per_seed = baseline.fit(answers) if baseline.fit is not None else None
        if per_seed is not None:
            columns[name] = np.stack([per_seed(parts["train"][s]) for s in range(len(seeds))])
    if columns_out is not None:
        columns_out.update(columns)
    rows = []
    for name, score in columns.items():
        known = BASELINES.get(name)
        per_seed, cell = cell_stats(score, error, parts, weights, strata,
                                    probability=known is not None and known.probability)
        if known is None or known.fit is None:
            for row in per_seed:
                row["n_train"] = 0
        rows.extend(result_rows(SITE, -1, name, seeds, per_seed, cell))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def best_probe_cell(results: pd.DataFrame, positions: list[str] | None = None) -> dict | None:
    """The probe cell (not a baseline), among ``positions`` if given, chosen on mean validation AUC."""
    probes = results[results["site"] != SITE]
    if positions is not None:
        probes = probes[probes["position"].isin(positions)]
    if probes["auc"].notna().sum() == 0:
        return None
    return choose_cell(mean_over_seeds(probes))


def family_table(answers: pd.DataFrame, splits: dict, probe_scores: pd.DataFrame, cell: dict | None) -> pd.DataFrame:
    """Per family and seed: n_test, n_wrong, train error rate, and the best cell's probe AUC within the family."""
    error = dict(zip(answers["id"], ~answers["correct"].astype(bool)))
    family = dict(zip(answers["id"], answers["family"]))
    rows = []
    for seed, split in sorted(splits["seeds"].items(), key=lambda kv: int(kv[0])):
        train_rate = pd.Series([error[i] for i in split["train"]]).groupby([family[i] for i in split["train"]]).mean()
        scored = pd.DataFrame(columns=["id", "score"])
        if cell is not None:
            scored = probe_scores[(probe_scores["site"] == cell["site"]) & (probe_scores["layer"] == cell["layer"])
                                  & (probe_scores["position"] == cell["position"]) & (probe_scores["seed"] == int(seed))]
        score_of = dict(zip(scored["id"], scored["score"]))
        for name in sorted(set(family.values())):
            test = [i for i in split["test"] if family[i] == name]
            y = np.array([error[i] for i in test if i in score_of], dtype=bool)
            s = np.array([score_of[i] for i in test if i in score_of], dtype=float)
            auc = float(auc_score(s, y)) if len(set(y.tolist())) == 2 else np.nan
            rows.append({"family": name, "seed": int(seed), "n_test": len(test),
                         "n_wrong": int(sum(error[i] for i in test)),
                         "train_error_rate": float(train_rate.get(name, np.nan)), "probe_auc": auc,
                         "site": cell["site"] if cell else "", "layer": cell["layer"] if cell else -1,
                         "position": cell["position"] if cell else ""})
    return pd.DataFrame(rows)


def within_family_auc(families: pd.DataFrame) -> float:
    """Mean over seeds of the test-size-weighted mean of the probe's AUC within each family."""
    scored = families.dropna(subset=["probe_auc"])
    if scored.empty:
        return float("nan")
    per_seed = scored.groupby("seed").apply(lambda g: np.average(g["probe_auc"], weights=g["n_test"]),
                                            include_groups=False)
    return float(per_seed.mean())


def plot_baselines(results: pd.DataFrame, cell: dict | None, within_family: float, path: Path, title: str) -> None:
    """Horizontal bars: each baseline's mean AUC (bootstrap interval as whiskers) and the best probe's,
    coloured by kind (probe, control, baseline) with a legend; a baseline without an AUC on this data (the
    family rate of a one-family file) is named in the title, not drawn as an empty bar."""
    from ..figures import draw_auc_bars, new_figure, save
    means = mean_over_seeds(results[results["site"] == SITE]).sort_values("auc", na_position="first")
    missing = means.loc[means["auc"].isna(), "position"].tolist()
    bars = [{"label": row.position, "auc": row.auc, "low": row.auc_lo, "high": row.auc_hi,
             "kind": "control" if kind_of(row.position) == "control" else "baseline"}
            for row in means.dropna(subset=["auc"]).itertuples()]
    if np.isfinite(within_family):
        bars.append({"label": "probe within family", "auc": within_family, "kind": "probe within family"})
    if cell is not None:
        bars.append({"label": f"probe {cell['site']} L{cell['layer']} {cell['position']}", "auc": cell["auc"],
                     "low": cell["auc_lo"], "high": cell["auc_hi"], "kind": "probe"})
    fig, ax = new_figure(figsize=(6.5, 1.3 + 0.28 * len(bars)))
    draw_auc_bars(ax, bars, level=control_level(results),
                  xlabel="AUC predicting an error (mean over seeds, 95% bootstrap interval)")
    if missing:
        title += "\nno AUC on this data (not drawn): " + ", ".join(missing)
    ax.set_title(title, fontsize=9)
    save(fig, path)


def finish_baselines(run_dir: Path | rf.Run, scores: pd.DataFrame, *, n_boot: int = 1000, title: str = "") -> dict:
    """The model-free part: AUCs on the test splits (baseline_results.csv), the family table, the
    figure, and the summary fields. probe_results.csv is read, never written. ``run_dir``: a run folder or
    an open Run (:func:`truthmap.runfolder.at`)."""
    run = rf.at(run_dir)
    answers = run.read_parquet(rf.ANSWERS)
    generations = run.read_parquet(rf.GENERATIONS)
    answers = answers.merge(generations[["id", "stopped", "answer_ids"]], on="id", how="left")
    splits = run.read_json(rf.SPLITS)
    columns: dict = {}
    results = evaluate(scores, answers, splits, n_boot, columns)
    run.write_csv(BASELINE_RESULTS, results)
    # the probes beside these baselines (positions stay text: "-1")
    merged = pd.concat([read_run_results(run.root, baselines=False), results], ignore_index=True)
    cell = best_probe_cell(merged)
    probe_scores = run.read_parquet(rf.PROBE_SCORES)
    families = family_table(answers, splits, probe_scores, cell)
    run.write_csv(FAMILY_RESULTS, families)
    within = within_family_auc(families)
    plot_baselines(merged, cell, within, run.path(FIGURE), title)
    means = mean_over_seeds(results)
    probes = merged[merged["site"] != SITE]
    verdict = study_verdict(probes, probe_scores, answers, splits, n_boot, others=columns, controls=control_names())
    exact = best_probe_cell(merged, [p for p in probes["position"].unique() if p in EXACT_POSITIONS])
    exact_minus_surface = None
    if exact is not None and "surface" in columns:
        exact_minus_surface = compare_cell(exact, columns["surface"], probe_scores, answers, splits, n_boot)
    return {"baselines": {r.position: None if pd.isna(r.auc) else round(float(r.auc), 4) for r in means.itertuples()},
            "probe_within_family_auc": None if np.isnan(within) else round(within, 4),
            "controls": controls(merged, exact_minus_surface), **({"verdict": verdict} if verdict else {})}


def controls(results: pd.DataFrame, exact_minus_surface: dict | None = None) -> dict:
    """Every control's mean AUC (:func:`control_names`, by name; None where it has none) beside the validation-chosen
    cells of the exact-answer columns and of the other columns. ``exact_minus_surface``: the paired difference of the best exact-answer cell's
    test AUC and the surface control's (:func:`truthmap.stages.verdict.compare`); ``confounded`` is true
    when its 95% interval reaches 0 (those columns are not shown to read more than what the answer looks
    like), None without it."""
    means = mean_over_seeds(results[results["site"] == SITE]).set_index("position")
    positions = results.loc[results["site"] != SITE, "position"].unique()
    exact = best_probe_cell(results, [p for p in positions if p in EXACT_POSITIONS])
    other = best_probe_cell(results, [p for p in positions if p not in EXACT_POSITIONS])

    def auc_of(name):
        if name not in means.index or pd.isna(means.loc[name, "auc"]):
            return None
        row = means.loc[name]
        return {k: None if pd.isna(row[k]) else round(float(row[k]), 4) for k in ("auc", "auc_lo", "auc_hi")}

    confounded = None
    if exact_minus_surface is not None and exact_minus_surface.get("low") is not None:
        confounded = not exact_minus_surface["shown"]
    return {**{name: auc_of(name) for name in control_names()},
            "best_exact_answer_cell": cell_summary(exact), "best_other_cell": cell_summary(other),
            "exact_minus_surface": exact_minus_surface, "exact_answer_confounded": confounded}


# ---------------------------------------------------------------- the stage

def with_sampling_scores(run_dir: Path | rf.Run, scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` (baseline scores, one row per answer) with the run's sampling scores as further
    columns, when it has them (``sampling_scores.parquet``); the bookkeeping columns are left out."""
    run = rf.at(run_dir)
    if not run.path(rf.SAMPLING_SCORES).exists():
        return scores
    sampled = run.read_parquet(rf.SAMPLING_SCORES)
    keep = ["id"] + [c for c in sampled.columns if c not in ("id", "n_samples", "judge_calls")]
    return scores.drop(columns=[c for c in keep[1:] if c in scores.columns]).merge(sampled[keep], on="id", how="left")


def _baselines(s: StageRun) -> None:
    config, run = s.config, s.run
    answers = run.read_parquet(rf.ANSWERS)
    scores = compute_scores(s.models.lm, answers, run.read_parquet(rf.GENERATIONS), config.progress,
                            one_pass=config.extract == "onepass", p_true_of=config.p_true)
    run.update_summary(baseline_seconds=scores.attrs.get("seconds"),
                       baseline_forward_tokens=scores.attrs.get("forward_tokens"))
    scores = with_sampling_scores(run, scores)  # semantic entropy … when the run drew samples
    run.write_parquet(rf.BASELINE_SCORES, scores)
    title = f"{short_model(config.model)} · {config.dataset} · baselines beside the best probe"
    run.update_summary(**finish_baselines(run, scores, n_boot=config.bootstrap, title=title))


register(Stage(
    "baselines", "4b", "Logit, entropy, p(True) and family baselines beside the probes (baselines.png).",
    _baselines,
    inputs=(rf.ANSWERS, rf.GENERATIONS, rf.SPLITS, rf.PROBE_RESULTS, rf.PROBE_SCORES, rf.SAMPLING_SCORES),
    outputs=(rf.BASELINE_SCORES, rf.BASELINE_RESULTS, rf.FAMILY_RESULTS, rf.BASELINES_FIGURE),
    settings=fields("bootstrap", "extract", "p_true"), model="here", labelled=True, summary=True))
