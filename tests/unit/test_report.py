"""The HTML report without a browser: what it embeds, how it encodes scores, and that text stays text."""

import base64
import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest

from _synthetic import seal

from truthmap.cli import app
from truthmap.stages.plot import best_region
from truthmap.metrics import auc_score, mean_over_seeds
from truthmap.stages.report import MISSING, SCORE_SCALE, embed_json, write_report

POSITIONS = ["last_q", "exact_answer_last", "-1"]
HOSTILE = ["<script>window.__pwned = 1</script>", "<img src=x onerror=\"window.__pwned = 2\">",
           "javascript:window.__pwned = 3", "</script><script>window.__pwned = 4</script>", "<!-- &amp; \u2028"]


def make_run(folder, n=40, layers=(0, 1, 2), positions=POSITIONS, seeds=(0, 1), texts=None, test_fraction=0.5,
             sites=("residual",)):
    """A run folder as the probe stage leaves it, with scores that separate wrong from right answers
    by a known amount; ``texts`` (if given) replaces questions, answers, gold answers and families."""
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(n)]
    correct = np.arange(n) % 3 != 0
    texts = texts or []
    pick = (lambda i, default: texts[i % len(texts)] if texts else default)
    answers = pd.DataFrame({
        "id": ids,
        "question": [pick(i, f"What is {i} plus {i}?") for i in range(n)],
        "gold": [[pick(i + 1, str(2 * i)), "alias"] for i in range(n)],
        "family": [pick(i + 2, "addition" if i % 2 else "capital") for i in range(n)],
        "subgroup": "",
        "answer": [pick(i + 3, f"It is {2 * i if c else 2 * i + 1}.") for i, c in enumerate(correct)],
        "correct": correct,
    })
    answers["exact_answer_valid"] = True
    answers["exact_answer_start"] = 3
    answers["exact_answer_end"] = [min(len(a), 6) for a in answers["answer"]]
    answers["exact_answer"] = [a[3:e] for a, e in zip(answers["answer"], answers["exact_answer_end"])]
    answers["exact_answer_reason"] = "gold_alias"
    splits = {"test_fraction": test_fraction, "seeds": {}}
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(n)
        cut = int(n * test_fraction)
        splits["seeds"][str(seed)] = {"test": [ids[k] for k in order[:cut]], "train": [ids[k] for k in order[cut:]]}
    answers["split"] = ["test" if i in set(splits["seeds"][str(seeds[0])]["test"]) else "train" for i in ids]

    results, scores = [], {"site": [], "layer": [], "position": [], "seed": [], "id": [], "score": []}
    row_of = {i: k for k, i in enumerate(ids)}
    tested = {seed: np.array([row_of[i] for i in splits["seeds"][str(seed)]["test"]]) for seed in seeds}
    for site in sites:
        for layer in layers:
            for p, position in enumerate(positions):
                for seed in seeds:
                    test = tested[seed]
                    if position == "-1":  # a position that does not exist for every answer
                        test = test[test % 4 != 1]
                    y = ~correct[test]
                    score = np.clip(0.5 + (y - 0.5) * 0.1 * (layer + p) + rng.normal(0, 0.2, len(test)), 0.001, 0.999)
                    auc = float(auc_score(score, y))
                    val = auc + rng.normal(0, 0.05)  # validation AUCs choose the region, not these
                    results.append([site, layer, position, seed, auc, auc - 0.05, min(1.0, auc + 0.05), 0.7,
                                    n - len(test), len(test), val, 0.02, auc - 0.1, val - 0.1])
                    for column, value in (("site", site), ("layer", layer), ("position", position), ("seed", seed)):
                        scores[column] += [value] * len(test)
                    scores["id"] += [ids[k] for k in test]
                    scores["score"] += score.tolist()
    folder.mkdir(parents=True, exist_ok=True)
    answers.to_parquet(folder / "answers.parquet", index=False)
    (folder / "splits.json").write_text(json.dumps(splits))
    pd.DataFrame(results, columns=["site", "layer", "position", "seed", "auc", "auc_lo", "auc_hi", "accuracy",
                                   "n_train", "n_test", "val_auc", "val_auc_se", "within_auc", "within_val_auc"]
                 ).to_csv(folder / "probe_results.csv", index=False)
    scores = pd.DataFrame(scores).astype({"score": np.float32})
    scores.to_parquet(folder / "probe_scores.parquet", index=False)
    (folder / "config.json").write_text(json.dumps({"positions": list(positions), "seeds": list(seeds)}))
    (folder / "summary.json").write_text(json.dumps({
        "model": pick(4, "embedded:smollm2-135m-instruct"), "dataset": "facts", "n": n,
        "accuracy": float(correct.mean()), "stage_seconds": {"generate": 1.5, "probe": 0.5},
        "families": {pick(2, "addition"): {"n": n, "accuracy": 0.5, "valid_exact_answer_rate": 1.0}},
    }))
    return seal(folder)


def page_data(path) -> dict:
    text = path.read_text(encoding="utf-8")
    block = re.search(r'<script type="application/json" id="truthmap-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(block)


def decode(run, site, seed) -> np.ndarray:
    """The uint16 ``[layers, positions, n_test]`` score block of one (site, seed)."""
    raw = np.frombuffer(base64.b64decode(run["scores"][site][seed]), dtype="<u2")
    return raw.reshape(len(run["sites"][site]["layers"]), len(run["positions"]), len(run["test_rows"][seed]))


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "run")


def test_heatmap_tables_match_the_auc_table(run_dir, tmp_path):
    run = page_data(write_report([run_dir], tmp_path / "r.html"))["runs"][0]
    results = pd.read_csv(run_dir / "probe_results.csv", dtype={"position": str})
    assert run["positions"] == POSITIONS and run["seeds"] == ["0", "1"]
    site = run["sites"]["residual"]
    assert site["layers"] == [0, 1, 2] and set(site["views"]) == {"mean", "within", "0", "1"}
    means = mean_over_seeds(results).set_index(["layer", "position"])
    grid, chosen_on, within = np.full((3, 3), np.nan), np.full((3, 3), np.nan), np.full((3, 3), np.nan)
    for li, layer in enumerate(site["layers"]):
        for pi, position in enumerate(POSITIONS):
            row = means.loc[(layer, position)]
            assert site["views"]["mean"]["auc"][li][pi] == pytest.approx(row.auc, abs=1e-4)
            assert site["views"]["mean"]["auc_std"][li][pi] == pytest.approx(row.auc_std, abs=1e-4)
            assert site["views"]["mean"]["n_test"][li][pi] == pytest.approx(row.n_test, abs=0.05)
            one = results[(results.layer == layer) & (results.position == position) & (results.seed == 1)].iloc[0]
            assert site["views"]["1"]["auc_lo"][li][pi] == pytest.approx(one.auc_lo, abs=1e-4)
            grid[li, pi], chosen_on[li, pi], within[li, pi] = row.auc, row.val_auc, row.within_val_auc
            assert site["views"]["within"]["auc"][li][pi] == pytest.approx(row.within_auc, abs=1e-4)
    assert site["views"]["mean"]["region"] == list(best_region(chosen_on, 0.02))  # chosen on validation
    assert site["views"]["within"]["region"] == list(best_region(within))


def test_scores_decode_to_the_probe_scores(run_dir, tmp_path):
    run = page_data(write_report([run_dir], tmp_path / "r.html"))["runs"][0]
    scores = pd.read_parquet(run_dir / "probe_scores.parquet")
    results = pd.read_csv(run_dir / "probe_results.csv", dtype={"position": str})
    answers = run["answers"]
    for seed in run["seeds"]:
        block = decode(run, "residual", seed)
        ids = [answers["id"][r] for r in run["test_rows"][seed]]
        for li, layer in enumerate(run["sites"]["residual"]["layers"]):
            for pi, position in enumerate(run["positions"]):
                cell = scores[(scores.layer == layer) & (scores.position == position) & (scores.seed == int(seed))]
                expected = dict(zip(cell.id, cell.score))
                got = {i: q / SCORE_SCALE for i, q in zip(ids, block[li, pi]) if q != MISSING}
                assert got.keys() == expected.keys()
                assert max(abs(got[i] - expected[i]) for i in got) < 1 / SCORE_SCALE
                # the page's ROC is drawn from these: its AUC must be the table's
                wrong = np.array([not answers["correct"][answers["id"].index(i)] for i in got])
                auc = results[(results.layer == layer) & (results.position == position)
                              & (results.seed == int(seed))].auc.item()
                assert auc_score(np.array(list(got.values())), wrong) == pytest.approx(auc, abs=1e-9)
    assert (decode(run, "residual", "0")[:, 2] == MISSING).any()  # position -1 is missing for some answers


def test_exact_answer_is_split_out_of_the_answer(run_dir, tmp_path):
    run = page_data(write_report([run_dir], tmp_path / "r.html"))["runs"][0]
    table = pd.read_parquet(run_dir / "answers.parquet").set_index("id")
    for answer_id, (before, exact, after) in zip(run["answers"]["id"], run["answers"]["answer"]):
        row = table.loc[answer_id]
        assert before + exact + after == row.answer and exact == row.exact_answer


def test_hostile_text_is_data_not_markup(tmp_path):
    run_dir = make_run(tmp_path / "hostile", texts=HOSTILE)
    page = write_report([run_dir], tmp_path / "r.html")
    text = page.read_text(encoding="utf-8")
    assert len(re.findall(r"<script", text, re.I)) == 2  # the data block and the page's own script
    assert "<img" not in text.lower() and "<!--" not in text
    block = re.search(r'id="truthmap-data">(.*?)</script>', text, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block and "\u2028" not in block
    run = page_data(page)["runs"][0]
    shown = set(run["answers"]["question"]) | {run["summary"]["model"]} | set(run["answers"]["family"])
    assert set(HOSTILE) <= shown  # exactly the strings, unaltered, for the script to insert as text


def test_embed_json_round_trips():
    value = {"a": HOSTILE, "b": "\u2029 ok"}
    assert json.loads(embed_json(value)) == value


def test_policy_allows_only_the_inlined_script_and_style(run_dir, tmp_path):
    text = write_report([run_dir], tmp_path / "r.html").read_text(encoding="utf-8")
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text).group(1)
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)

    def digest(code):
        return "sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()

    assert f"script-src '{digest(script)}'" in policy and f"style-src '{digest(style)}'" in policy
    assert policy.startswith("default-src 'none'")
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink
    urls = re.findall(r"(?:https?|file|data):", text.replace("http://www.w3.org/2000/svg", ""))
    assert urls == []  # nothing to load: the SVG namespace is a name, not a request


def test_baseline_rows_are_listed_beside_not_in_the_map(run_dir, tmp_path):
    results = pd.read_csv(run_dir / "probe_results.csv")
    extra = pd.DataFrame([["baseline", 0, "logits_mean", seed, 0.61 + seed / 100, 0.55, 0.67, 0.6, 20, 20]
                          for seed in (0, 1)], columns=results.columns[:10])
    extra.to_csv(run_dir / "baseline_results.csv", index=False)  # the baselines stage's own file
    seal(run_dir)
    run = page_data(write_report([run_dir], tmp_path / "r.html"))["runs"][0]
    assert list(run["sites"]) == ["residual"]
    assert [(b["name"], b["auc"]) for b in run["baselines"]] == [("logits_mean", pytest.approx(0.615))]


def test_cli_writes_one_page_for_several_runs(tmp_path, capsys, monkeypatch):
    first = make_run(tmp_path / "a" / "run")
    second = make_run(tmp_path / "b" / "run", layers=(0, 1), seeds=(3,))
    out = tmp_path / "both.html"
    app(["report", str(first), str(second), "--out", str(out)])
    runs = page_data(out)["runs"]
    assert [r["name"] for r in runs] == ["run (1)", "run (2)"]  # same folder names, told apart
    assert runs[1]["seeds"] == ["3"] and runs[1]["sites"]["residual"]["layers"] == [0, 1]
    monkeypatch.chdir(tmp_path)
    app(["report", str(first)])
    assert (tmp_path / "report.html").is_file() and not (first / "report.html").exists()
    assert "report.html" in capsys.readouterr().out


def test_a_folder_without_probe_results_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        app(["report", str(tmp_path / "empty")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "manifest.json: missing, so nothing in" in err and "Traceback" not in err  # an unverified folder
    (tmp_path / "started").mkdir()
    seal(tmp_path / "started")
    with pytest.raises(SystemExit):
        app(["report", str(tmp_path / "started")])
    err = capsys.readouterr().err
    assert "probe_results.csv: missing" in err and "Traceback" not in err


def test_a_1000_question_run_fits_in_5_mb(tmp_path):
    from truthmap.positions import DEFAULT_POSITIONS

    run_dir = make_run(tmp_path / "big", n=1000, layers=range(31), positions=DEFAULT_POSITIONS, seeds=(0, 1, 2),
                       test_fraction=0.3)
    size = write_report([run_dir], tmp_path / "r.html").stat().st_size
    assert size < 5e6, f"{size / 1e6:.1f} MB"


def test_a_damaged_auc_table_is_a_clear_error(run_dir, capsys):
    (run_dir / "probe_results.csv").write_text("site,layer\nresidual,0\n")
    with pytest.raises(SystemExit):
        app(["report", str(run_dir), "--out", str(run_dir.parent / "r.html")])
    err = capsys.readouterr().err
    assert "probe_results.csv: damaged (its checksum differs" in err and "Traceback" not in err
    seal(run_dir)  # the same table as if truthmap had written it: its content is checked too
    with pytest.raises(SystemExit):
        app(["report", str(run_dir), "--out", str(run_dir.parent / "r.html")])
    err = capsys.readouterr().err
    assert "probe_results.csv: unreadable" in err and "Traceback" not in err


def test_the_entropy_view_is_read_through_the_manifest(run_dir, tmp_path):
    from truthmap.errors import TruthmapError

    probes = pd.read_csv(run_dir / "probe_results.csv", dtype={"site": str, "position": str})
    entropy = probes.assign(target="error", auc=0.61)
    entropy.to_csv(run_dir / "entropy_probe_results.csv", index=False)
    seal(run_dir)
    views = page_data(write_report([run_dir], tmp_path / "r.html"))["runs"][0]["sites"]["residual"]["views"]
    assert "entropy" in views  # written by truthmap: shown
    entropy.assign(auc=0.99).to_csv(run_dir / "entropy_probe_results.csv", index=False)  # changed afterwards
    with pytest.raises(TruthmapError, match="entropy_probe_results.csv: damaged"):
        write_report([run_dir], tmp_path / "tampered.html")
    assert not (tmp_path / "tampered.html").exists()


def test_the_page_carries_the_verdict_the_controls_bar_and_a_scale_below_chance(run_dir, tmp_path):
    pd.DataFrame([{"site": "baseline", "layer": -1, "position": name, "seed": s, "auc": auc, "mean_auc_lo": auc - 0.05,
                   "mean_auc_hi": auc + 0.05, "n_test": 20} for name, auc in (("surface", 0.6), ("logprob_mean", 0.8))
                  for s in (0, 1)]).to_csv(run_dir / "baseline_results.csv", index=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    verdict = {"line": "the exact-answer tokens beat the last tokens by +0.06 (−0.02 … +0.14): not shown at this size",
               "chosen": {"site": "residual", "layer": 2, "position": "-1", "auc": 0.8, "low": 0.7, "high": 0.9,
                          "seed_sd": 0.01},
               "comparisons": [{"against": "surface", "kind": "control", "auc": 0.6, "diff": 0.2, "low": 0.1,
                                "high": 0.3, "p": 0.001, "shown": True}],
               "beats_controls": True, "n_test": 20, "n_test_groups": 20}
    summary.update(verdict=verdict, skipped={"entropy": "too few low-entropy answers"})
    (run_dir / "summary.json").write_text(json.dumps(summary))
    seal(run_dir)
    data = page_data(write_report([run_dir], tmp_path / "r.html"))
    run = data["runs"][0]
    assert run["summary"]["verdict"] == verdict and run["summary"]["skipped"] == summary["skipped"]
    assert run["control"] == {"name": "surface", "auc": 0.6, "high": 0.65}  # logprob_mean is no control
    means = mean_over_seeds(pd.read_csv(run_dir / "probe_results.csv", dtype={"position": str}))
    best = means.loc[means.val_auc.idxmax()]  # the fallback of a run without a verdict: chosen on validation
    assert (run["chosen"]["layer"], run["chosen"]["position"]) == (best.layer, best.position)
    assert run["chosen"]["auc"] == pytest.approx(best.auc, abs=1e-4)
    palette, scale = data["palette"]["auc"], data["auc_scale"]
    assert scale == {"low": 0.3, "chance": 0.5, "high": 1.0}
    rgb = [[int(c[k:k + 2], 16) for k in (1, 3, 5)] for c in (palette[0], palette[len(palette) // 2], palette[-1])]
    assert rgb[0][0] > 2 * max(rgb[0][1:])  # the low end is red: AUC below chance never looks like chance
    assert min(rgb[1]) > 200 and rgb[2][2] > 2 * rgb[2][0]  # chance near white, the high end blue
