"""The study's split design: one test part for every seed, train / validation drawn per seed.

Reads nothing from the run folder; the label stage calls :func:`population` (who is left out of a
common-population study) and :func:`make_splits`, and writes its dict as ``splits.json`` (format in
docs/run-folder.md):

* the **test part** is drawn once (seeded by ``TEST_SEED``, whatever the study's seeds), grouped and
  stratified by correctness, and is the same in every seed: no seed ever trains on or chooses with an
  answer of it, so the chosen cell's test AUC is free of the choice in every seed;
* each **seed** splits the rest into train and validation, grouped and stratified the same way: the
  seeds' spread measures what training on other answers changes, not test sampling.

Related answers (:func:`split_groups`: the same normalised question, or the group key the task declares)
always share a part. ``splits["seeds"][s]["test"]`` is the same list for every ``s``, and
``splits["test"]`` repeats it once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import textmatch
from .positions import EXACT_POSITIONS

SPLIT_PARTS = ("train", "validation", "test")
TEST_SEED = 0  # the random stream of the test part's draw: fixed, so a run's seeds never move it


def population(answers: pd.DataFrame, positions: list[str]) -> pd.Series:
    """Why each answer is left out of a common-population study ("" = kept), indexed like ``answers``.

    An answer is kept when every requested position exists for it; with any exact-answer position
    requested, an answer without a valid exact answer leaves every column (as in the reference study),
    under the reason of its exact answer (``no_candidate_in_answer``, …)."""
    reasons = pd.Series("", index=answers.index, dtype=object)
    if EXACT_POSITIONS & set(positions):
        invalid = ~answers["exact_answer_valid"].astype(bool)
        reasons[invalid] = "no_exact_answer:" + answers.loc[invalid, "exact_answer_reason"].astype(str)
    for p in positions:
        column = f"pos_{p}"
        if column in answers.columns:
            missing = (answers[column] < 0) & (reasons == "")
            reasons[missing] = f"no_position:{p}"
    return reasons


def split_groups(answers: pd.DataFrame) -> np.ndarray:
    """A group number per answer: answers whose questions normalise to the same text, or that share the
    group key their task declares (facts: the entity asked about), get the same number. ``[N]`` int."""
    from .tasks import REGISTRY

    parent = list(range(len(answers)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of = {}
    tasks = answers["task"] if "task" in answers.columns else pd.Series("generic", index=answers.index)
    for k, (answer_id, question, task) in enumerate(zip(answers["id"], answers["question"], tasks)):
        keys = [("question", textmatch.normalize(str(question)) or str(question))]
        declared = getattr(REGISTRY.get(task), "group", None)
        if declared is not None:
            key = declared(str(answer_id), str(question))
            if key:
                keys.append(("task", key))
        for key in keys:
            if key in first_of:
                parent[find(k)] = find(first_of[key])
            else:
                first_of[key] = k
    roots = [find(k) for k in range(len(answers))]
    return pd.factorize(pd.Series(roots))[0]


def assign_groups(wrong: np.ndarray, right: np.ndarray, fractions: np.ndarray, rng) -> np.ndarray:
    """Part (an index into ``fractions``) of each group, stratified by correctness: groups go, largest
    first (ties in a random order), to the part whose share of the group's classes is furthest below its
    target. ``wrong``, ``right``: ``[G]`` counts per group."""
    counts = np.stack([wrong, right], axis=1).astype(float)  # [G, 2]
    target = fractions[:, None] * counts.sum(0)[None, :]  # [parts, 2]
    have = np.zeros_like(target)
    order = rng.permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    part = np.zeros(len(counts), dtype=np.int64)
    for g in order:
        shortfall = ((target - have) / np.maximum(target, 1.0) * counts[g][None, :]).sum(1)
        shortfall[fractions == 0] = -np.inf
        part[g] = int(np.argmax(shortfall))
        have[part[g]] += counts[g]
    return part


def make_splits(answers: pd.DataFrame, seeds: list[int], test_fraction: float = 0.3,
                validation_fraction: float = 0.2, left_out: pd.Series | None = None,
                population_rule: str = "common") -> dict:
    """``splits.json``'s dict: one test part, and train / validation ids per seed, grouped and stratified.

    ``left_out``: why each row of ``answers`` is outside the study's population ("" = kept; indexed like
    ``answers``), or None to keep every answer; ``population_rule`` is only recorded. The test part takes
    ``test_fraction`` of the population, validation ``validation_fraction`` (both of the whole).
    """
    reasons = left_out if left_out is not None else pd.Series("", index=answers.index, dtype=object)
    kept = answers[reasons == ""]
    ids = kept["id"].to_numpy()
    groups = split_groups(kept)
    wrong = ~kept["correct"].astype(bool).to_numpy()
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    group_wrong = np.bincount(groups, weights=wrong, minlength=n_groups)
    group_right = np.bincount(groups, weights=~wrong, minlength=n_groups)
    sizes = np.bincount(groups, minlength=n_groups) if len(groups) else np.zeros(0, int)
    # the test part once: [rest, test]
    in_test = assign_groups(group_wrong, group_right, np.array([1.0 - test_fraction, test_fraction]),
                            np.random.default_rng(TEST_SEED)) == 1
    rest = np.flatnonzero(~in_test)
    test = ids[in_test[groups]].tolist()
    # train and validation share the rest in the proportions they have of the whole
    rest_fractions = np.array([1.0 - test_fraction - validation_fraction, validation_fraction])
    rest_fractions = rest_fractions / max(rest_fractions.sum(), 1e-12)
    splits = {
        "test_fraction": test_fraction, "validation_fraction": validation_fraction,
        "population": population_rule, "n": len(ids),
        "left_out": {str(i): r for i, r in zip(answers["id"], reasons) if r},
        "groups": {"n": n_groups, "largest": int(sizes.max()) if len(sizes) else 0},
        "test_seed": TEST_SEED, "test": test,
        "seeds": {},
    }
    for seed in seeds:
        part_of_group = np.full(n_groups, 2, dtype=np.int64)  # 2: test
        part_of_group[rest] = assign_groups(group_wrong[rest], group_right[rest], rest_fractions,
                                            np.random.default_rng(seed))
        part = part_of_group[groups]
        splits["seeds"][str(seed)] = {name: ids[part == k].tolist() for k, name in enumerate(SPLIT_PARTS)}
    return splits


def population_summary(splits: dict, n_answers: int) -> dict:
    """summary.json's account of the answers studied: the rule, how many, who was left out and why."""
    reasons = pd.Series(list(splits["left_out"].values()), dtype=object)
    return {"rule": splits["population"], "n": splits["n"], "n_answers": n_answers,
            "left_out": int(len(reasons)), "left_out_reasons": reasons.value_counts().to_dict(),
            "fractions": {"train": round(1 - splits["test_fraction"] - splits["validation_fraction"], 4),
                          "validation": splits["validation_fraction"], "test": splits["test_fraction"]},
            "groups": splits["groups"]}
