import numpy as np
import pandas as pd
import pytest

from _synthetic import make_run
from truthmap.analyses.resample import TYPES, cluster_key, error_type, type_probes


@pytest.mark.parametrize("correct, clusters, expected", [
    ([0] * 6 + [1] * 4, [""] * 6 + ["x"] * 4, "refuses"),
    ([1] * 8 + [0] * 2, ["x"] * 8 + ["y", "z"], "consistently_correct"),
    ([0] * 9 + [1], ["paris"] * 9 + ["lyon"], "consistently_incorrect"),
    ([1] * 4 + [0] * 4 + [0] * 2, ["x"] * 4 + ["y"] * 4 + ["", ""], "two_competing"),
    ([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], ["x", "x", "a", "a", "b", "b", "c", "c", "d", "d"], "many_answers"),
    ([1] * 7 + [0] * 3, ["x"] * 7 + ["y", "z", "w"], "other"),
])
def test_error_types(correct, clusters, expected):
    assert error_type([bool(c) for c in correct], clusters)["error_type"] == expected


def test_thresholds_are_fractions_of_n():
    # the same pattern over 5 and over 10 samples is the same type
    five = error_type([False] * 4 + [True], ["paris"] * 4 + ["x"])
    ten = error_type([False] * 8 + [True] * 2, ["paris"] * 8 + ["x"] * 2)
    assert five["error_type"] == ten["error_type"] == "consistently_incorrect"
    assert five["n"] == 5 and five["largest_wrong"] == 4


def test_clusters_normalise_case_articles_and_accents():
    assert cluster_key("The Paris", True) == cluster_key("paris", True) == cluster_key("Páris", True)
    assert cluster_key("Paris", False) == ""


def test_type_probes_find_a_type_carried_by_the_features(tmp_path):
    run = make_run(tmp_path / "run", n=160)
    answers = pd.read_parquet(run / "answers.parquet")
    # the questions answered wrongly are "consistently incorrect": the features carry that signal
    types = pd.DataFrame({"id": answers.id, "error_type": np.where(answers.correct, "consistently_correct",
                                                                   "consistently_incorrect")})
    results = type_probes(run, types, site="residual", layer=1, position="-1", n_boot=50)
    assert set(results.error_type) == set(TYPES)
    wrong = results[results.error_type == "consistently_incorrect"]
    assert (wrong.auc > 0.85).all()
    assert results[results.error_type == "refuses"].auc.isna().all()  # no positives: no AUC


def test_answers_drawn_again_are_cut_as_the_runs_answers_were():
    from truthmap.analyses.resample import run_answer_length
    from truthmap.errors import TruthmapError

    facts = pd.DataFrame({"task": ["facts", "facts"]})
    assert run_answer_length({"protocol": "reference"}, facts) == 100  # the protocol's, not the default's
    assert run_answer_length({"protocol": "brief"}, facts) == run_answer_length({}, facts) == 24
    assert run_answer_length({"protocol": "reference", "max_new_tokens": 8}, facts) == 8  # the run's setting
    assert run_answer_length({"max_new_tokens": 8}, facts, max_new_tokens=12) == 12  # asked for
    assert run_answer_length({"protocol": "reference", "max_new_tokens": "9"}, facts) == 100  # not a length
    with pytest.raises(TruthmapError, match="protocol"):
        run_answer_length({"protocol": "evil"}, facts)


def test_sampling_for_semantic_entropy_uses_the_runs_protocol(tmp_path, monkeypatch):
    import json

    from truthmap.analyses import entropy, resample

    run = make_run(tmp_path / "run")
    pd.DataFrame({"id": pd.read_parquet(run / "generations.parquet")["id"], "task": "facts",
                  "question": "q?"}).to_parquet(run / "questions.parquet", index=False)
    (run / "config.json").write_text(json.dumps({"model": "tiny-model", "protocol": "reference"}))
    asked = {}

    def draw(lm, prompts, **kwargs):
        asked.update(kwargs)
        raise KeyboardInterrupt  # stop here: only the arguments matter

    monkeypatch.setattr(resample, "sample_answers", draw)
    with pytest.raises(KeyboardInterrupt):
        entropy.run_sampling(None, run, n=2, progress=False)
    assert asked["max_new_tokens"] == 100


CONTINENTS = ["Europe", "Asia", "Africa", "North America", "South America", "Oceania"]
MEXICO = "Mexico is located in South America, specifically in the continent of North America."
SAMPLED = {  # question -> its sampled answers, several of them right under either gold below
    "On which continent is Mexico located?": [MEXICO, "Mexico is in North America.", "It is in South America.",
                                              "Mexico is in North America, not in South America."],
    "On which continent is Chad located?": ["Chad is in Africa.", "Chad is in Asia.", "Africa, near Asia.",
                                            "Chad is in Africa, not in Asia."],
    "On which continent is Peru located?": ["Peru is in South America."] * 4,
}
GOLDS = ({"Mexico": ["North America"], "Chad": ["Africa"], "Peru": ["South America"]},
         {"Mexico": ["South America"], "Chad": ["Asia"], "Peru": ["Oceania"]})


def test_sampled_answers_and_the_entropy_targets_never_see_the_gold(tokenizer):
    """The same samples labelled under two different gold answers: spans, clusters, sampling scores and
    the entropy probes' targets are identical; only ``correct`` changes. Under ``--exact-answer gold``
    the same answers would be placed at the gold (the planted dependence the samples must not have)."""
    from types import SimpleNamespace

    from truthmap.analyses.entropy import high_entropy_labels, sampling_scores
    from truthmap.analyses.resample import label_resamples
    from truthmap.stages.label import label_answers

    lm = SimpleNamespace(tokenizer=tokenizer)
    texts = list(SAMPLED)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    generations = pd.DataFrame({"id": [f"q{i}" for i in range(len(texts))], "prompt": texts,
                                "prompt_ids": [encode(q) for q in texts],
                                "answer_ids": [encode(SAMPLED[q][0]) for q in texts],
                                "answer": [SAMPLED[q][0] for q in texts], "stopped": True})
    drawn = [[(encode(a), True) for a in SAMPLED[q]] for q in texts]
    positions = ["exact_answer_first", "exact_answer_last", "-1"]
    labelled, greedy_gold_mode = [], []
    for golds in GOLDS:
        questions = pd.DataFrame({"id": generations.id, "question": texts, "family": "continent", "subgroup": "",
                                  "answer_type": "continent", "gold": [golds[q.split()[-2]] for q in texts]})
        greedy = label_answers(questions, generations, {"continent": CONTINENTS}, tokenizer, positions,
                               progress=False)
        resamples = label_resamples(lm, questions, generations, drawn, {"continent": CONTINENTS}, positions)
        scores = sampling_scores(resamples, greedy, None)
        entropy = scores["semantic_entropy"].to_numpy(dtype=float)
        targets, _ = high_entropy_labels(entropy, np.ones((1, len(entropy)), dtype=bool))
        labelled.append((resamples, scores, targets))
        flat = questions.loc[questions.index.repeat(4)].assign(id=[f"s{k}" for k in range(12)])
        as_generations = pd.DataFrame({"id": flat.id, "prompt": flat.question.tolist(),
                                       "prompt_ids": [encode(q) for q in flat.question],
                                       "answer_ids": [ids for row in drawn for ids, _ in row],
                                       "answer": [a for q in texts for a in SAMPLED[q]], "stopped": True})
        greedy_gold_mode.append(label_answers(flat, as_generations, {"continent": CONTINENTS}, tokenizer, positions,
                                              progress=False, exact_answer="gold"))
    # the planted dependence: located at the gold, the same samples' spans would follow the gold answer
    assert greedy_gold_mode[0].exact_answer.tolist() != greedy_gold_mode[1].exact_answer.tolist()
    (one, one_scores, one_targets), (other, other_scores, other_targets) = labelled
    assert one.correct.tolist() != other.correct.tolist()  # the gold did grade
    spans = ["exact_answer", "exact_answer_valid", "exact_answer_start", "exact_answer_end", "cluster",
             *[f"pos_{p}" for p in positions]]
    pd.testing.assert_frame_equal(one[spans], other[spans])
    assert one.exact_answer.iloc[0] == "South America"  # MEXICO: the first continent it states, either gold
    pd.testing.assert_frame_equal(one_scores, other_scores)
    assert one_scores.semantic_entropy.nunique() > 1  # the targets are not trivially constant
    np.testing.assert_array_equal(one_targets, other_targets)
