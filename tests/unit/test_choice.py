import numpy as np
import pandas as pd

from truthmap.analyses.choice import accuracy_table, choose, majority_pick, probe_pick


def test_majority_reads_clusters_only_and_can_pick_a_wrong_answer():
    # the largest cluster is wrong: majority vote must still pick it (it never sees correctness)
    assert majority_pick(["lyon", "paris", "lyon", "", "lyon"]) == 0
    assert majority_pick(["", "b", "a", "a", "b"]) == 1  # a tie goes to the cluster seen first
    assert majority_pick(["", ""]) == 0


def test_probe_pick_prefers_lowest_error_and_never_a_missing_position():
    assert probe_pick(np.array([0.9, 0.2, 0.4])) == 1
    assert probe_pick(np.array([np.nan, 0.95, np.nan])) == 1


def resamples_for(groups):
    rows = []
    for qid, samples in groups.items():
        for k, (correct, cluster) in enumerate(samples):
            rows.append({"id": qid, "sample": k, "correct": correct, "cluster": cluster})
    return pd.DataFrame(rows)


def test_choose_and_accuracy_table():
    answers = pd.DataFrame({"id": ["q1", "q2", "q3"], "correct": [False, True, False]})
    resamples = resamples_for({
        "q1": [(False, "lyon"), (True, "paris"), (False, "lyon")],
        "q2": [(True, "x"), (True, "x"), (False, "y")],
        "q3": [(False, "a"), (False, "b"), (True, "c")],
    })
    scores = np.array([0.9, 0.1, 0.8, 0.5, 0.4, 0.3, 0.7, 0.6, 0.2])
    chosen = choose(answers, resamples, scores, ["q1", "q2", "q3", "q-none"])
    assert chosen.set_index("id").loc["q1", ["greedy", "majority", "probe"]].tolist() == [0.0, 0.0, 1.0]
    assert chosen.set_index("id").loc["q2", "random"] == 2 / 3
    assert chosen.set_index("id").loc["q2", "probe"] == 0.0  # the probe picked the wrong "y"
    types = pd.DataFrame({"id": ["q1", "q2", "q3"], "error_type": ["two_competing", "other", "many_answers"]})
    table = accuracy_table(chosen, types, n_boot=200)
    overall = table[table.error_type == "all"].set_index("strategy")
    assert overall.loc["probe", "accuracy"] == 2 / 3 and overall.loc["majority", "accuracy"] == 1 / 3
    assert (table.acc_lo <= table.accuracy + 1e-9).all() and (table.accuracy <= table.acc_hi + 1e-9).all()
    assert set(table.error_type) == {"all", "two_competing", "other", "many_answers"}


def test_every_strategy_chooses_among_the_same_candidates_the_answers_with_a_span():
    """A sample without a span is no candidate of any strategy; with no span at all, every sample is."""
    from truthmap.analyses.choice import candidates

    answers = pd.DataFrame({"id": ["q1", "q2"], "correct": [False, True]})
    resamples = resamples_for({
        # a right sample without a span (the gold occurs, nothing was located) that the probe likes best
        "q1": [(True, ""), (False, "a"), (False, "a"), (True, "b"), (False, "")],
        "q2": [(False, ""), (True, ""), (False, "")],  # no span anywhere: all three are candidates
    })
    scores = np.array([0.05, 0.6, 0.7, 0.3, 0.01, np.nan, 0.2, 0.4])
    chosen = choose(answers, resamples, scores, ["q1", "q2"]).set_index("id")
    assert candidates(["", "a", "a", "b", ""]).tolist() == [1, 2, 3]
    assert candidates(["", "", ""]).tolist() == [0, 1, 2]
    one = chosen.loc["q1"]
    assert one["random"] == 1 / 3  # among the three with a span, not 2 / 5 over all five
    assert one["probe_sample"] == 3 and one["probe"] == 1.0  # not sample 4 (0.01) nor sample 0 (0.05)
    assert one["majority_sample"] == 1 and one["majority"] == 0.0
    two = chosen.loc["q2"]
    assert two["random"] == 1 / 3 and two["probe_sample"] == 1 and two["majority_sample"] == 0
    assert chosen["greedy"].tolist() == [0.0, 1.0]
