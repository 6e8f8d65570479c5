import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from truthmap.splits import make_splits
from truthmap.metrics import bootstrap_for, group_bootstrap
from truthmap.stages.baselines import control_names
from truthmap.stages.verdict import compare, paired_replicates, study_verdict, verdict_lines


def _scores(rng, y, strength, seeds=3):
    return np.stack([y * strength + rng.normal(size=len(y)) for _ in range(seeds)])


def test_paired_difference_is_the_difference_of_the_two_aucs_on_each_draw():
    rng = np.random.default_rng(0)
    y = (rng.random(90) < 0.4).astype(np.int64)
    a, b = _scores(rng, y, 1.0), _scores(rng, y, 0.3)
    a[1, 4] = np.nan  # an answer one side cannot score leaves both sides
    weights = group_bootstrap(np.arange(90) // 3, 200, seed=0)  # groups of three answers drawn together
    point_a, point_b, reps_a, reps_b = paired_replicates(a, b, y, weights)
    keep = np.ones(90, bool)
    keep[4] = False
    for r in (0, 57, 199):
        w = weights[r, keep]
        mean_a = np.mean([roc_auc_score(y[keep], s[keep], sample_weight=w) for s in a])
        mean_b = np.mean([roc_auc_score(y[keep], s[keep], sample_weight=w) for s in b])
        assert reps_a[r] - reps_b[r] == pytest.approx(mean_a - mean_b, abs=1e-12)
    assert point_a == pytest.approx(np.mean([roc_auc_score(y[keep], s[keep]) for s in a]), abs=1e-12)
    out = compare(a, b, y, weights)
    diff = reps_a - reps_b
    assert out["low"] == pytest.approx(np.percentile(diff, 2.5), abs=1e-4)
    assert out["p"] == pytest.approx((diff <= 0).mean(), abs=1e-4) and out["n"] == 89


def test_a_cell_against_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(1)
    y = (rng.random(60) < 0.5).astype(np.int64)
    a = _scores(rng, y, 0.8)
    out = compare(a, a, y, group_bootstrap(np.arange(60), 300, seed=0))
    assert (out["diff"], out["low"], out["high"]) == (0.0, 0.0, 0.0)
    assert out["p"] == 1.0 and out["shown"] is False


def _study(n, seed=0):
    """A study with two positions at layers 0 and 3: exact_answer_last at layer 3 truly better than -1."""
    rng = np.random.default_rng(seed)
    answers = pd.DataFrame({"id": [f"q{i}" for i in range(n)], "question": [f"question {i // 2}?" for i in range(n)],
                            "task": "generic", "correct": rng.random(n) < 0.5, "family": "f", "subgroup": ""})
    splits = make_splits(answers, [0, 1, 2], 0.3, 0.2)
    y = (~answers["correct"]).to_numpy().astype(int)
    strength = {("exact_answer_last", 3): 1.6, ("-1", 3): 0.9, ("exact_answer_last", 0): 0.2, ("-1", 0): 0.1}
    results, scores = [], []
    for (position, layer), k in strength.items():
        for s, seed in enumerate(sorted(splits["seeds"], key=int)):
            score = y * k + rng.normal(size=n)
            test = answers["id"].isin(splits["test"]).to_numpy()
            val = answers["id"].isin(splits["seeds"][seed]["validation"]).to_numpy()
            results.append({"site": "residual", "layer": layer, "position": position, "seed": int(seed),
                            "auc": roc_auc_score(y[test], score[test]), "val_auc": roc_auc_score(y[val], score[val])})
            scores += [{"site": "residual", "layer": layer, "position": position, "seed": int(seed), "id": i,
                        "score": v} for i, v in zip(answers["id"][test], score[test])]
    surface = np.tile(y * 0.2 + rng.normal(size=n), (3, 1))
    return pd.DataFrame(results), pd.DataFrame(scores), answers, splits, {"surface": surface}


def test_a_truly_better_position_is_shown_at_enough_answers_and_not_at_few():
    big = study_verdict(*_study(3000)[:4], n_boot=300, others=_study(3000)[4], controls=control_names())
    chosen = big["chosen"]
    assert (chosen["position"], chosen["layer"]) == ("exact_answer_last", 3)
    by = {c["against"]: c for c in big["comparisons"]}
    assert by["best -k"]["shown"] and by["best -k"]["diff"] > 0.05 and by["best -k"]["p"] < 0.025
    assert by["layer 0 (same position)"]["shown"] and by["layer 0 (same position)"]["kind"] == "layer0"
    assert by["surface"]["kind"] == "control" and big["beats_controls"]
    assert big["n_test"] == len(_study(3000)[3]["test"]) and big["n_test_groups"] == big["n_test"] // 2
    assert big["chosen"]["low"] < big["chosen"]["auc"] < big["chosen"]["high"]
    assert "beat the last tokens by +0." in big["line"] and ": shown" in big["line"]
    small = study_verdict(*_study(40, seed=3)[:4], n_boot=300)
    assert small["comparisons"][0]["low"] < 0 and not small["comparisons"][0]["shown"]
    assert "not shown at this size" in small["line"] and "controls are not measured" in small["line"]
    text = "\n".join(verdict_lines(big))
    assert text.startswith("verdict: ") and "best -k" in text and "surface" in text


def test_verdict_uses_the_runs_bootstrap_draws():
    results, scores, answers, splits, _ = _study(200)
    verdict = study_verdict(results, scores, answers, splits, n_boot=100)
    ids = [i for i in answers["id"] if i in set(splits["test"])]
    weights = bootstrap_for(answers, ids, 100)
    chosen = verdict["chosen"]
    table = scores[(scores.position == chosen["position"]) & (scores.layer == chosen["layer"])]
    mine = table.pivot(index="seed", columns="id", values="score")[ids].to_numpy()
    y = (~answers.set_index("id").loc[ids, "correct"]).to_numpy().astype(int)
    _, _, reps, _ = paired_replicates(mine, mine, y, weights)
    assert chosen["low"] == pytest.approx(np.percentile(reps, 2.5), abs=1e-4)


def test_the_probe_command_ends_with_the_verdict_and_its_comparisons(tmp_path):
    """``truthmap probe`` on a synthetic run: summary.json holds the verdict (the contract's keys) and the
    terminal's last lines are its line and the comparisons table."""
    import json

    from click.testing import CliRunner

    from truthmap.cli import cli
    from tests.unit._synthetic import make_run

    folder = make_run(tmp_path / "run", n=300)  # the signal: layer 1 at -1; layer 0 holds none
    result = CliRunner().invoke(cli, ["probe", "--out", str(folder), "--model", "tiny-model", "--quiet",
                                      "--bootstrap", "200", "--min-per-class", "2"])
    assert result.exit_code == 0, result.output
    verdict = json.loads((folder / "summary.json").read_text())["verdict"]
    assert set(verdict) == {"line", "chosen", "comparisons", "beats_controls", "n_test", "n_test_groups"}
    assert (verdict["chosen"]["layer"], verdict["chosen"]["position"]) == (1, "-1")
    assert set(verdict["chosen"]) == {"site", "layer", "position", "auc", "low", "high", "seed_sd"}
    by = {c["against"]: c for c in verdict["comparisons"]}
    assert by["layer 0 (same position)"]["shown"] and by["best last_q"]["shown"]
    assert verdict["beats_controls"] is False  # no control measured yet
    lines = result.output.strip().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("verdict: "))
    assert lines[start].startswith("verdict: the last tokens (residual L1 -1, test AUC")
    assert len(lines) - start == 2 + len(verdict["comparisons"])  # the line, the header, one row each: the end
    assert lines[start + 2].startswith("  best last_q") and "layer 0 (same position)" in lines[start + 3]
    assert lines[start + 3].endswith("shown")
