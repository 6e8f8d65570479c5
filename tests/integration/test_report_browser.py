"""Model-backed, in a real browser: the report of a small study of the default model, driven by Playwright
on Debian's Chromium (``apt-get install chromium``; Playwright's own browser download is not used).
Screenshots are saved under test-artifacts/."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from truthmap import runfolder as rf
from truthmap.metrics import mean_over_seeds
from truthmap.stages.report import write_report

pytestmark = pytest.mark.model
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
HOSTILE = ["<script>alert('script')</script>", "<img src=x onerror=alert('img')>", "javascript:alert('url')",
           "</script><script>alert('close')</script>", "<img src=\"http://127.0.0.1:9/beacon.png\">",
           "<a href=\"javascript:alert('link')\">click</a>"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


class Opened:
    """A page with what it said (console errors), asked (dialogs) and fetched (requests) since opening."""

    def __init__(self, browser, path: Path, width: int, height: int):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors, self.dialogs, self.requests = [], [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)

    def cell(self, scope: str, layer, position):
        return self.page.locator(f'{scope} td[data-layer="{layer}"][data-position="{position}"]')

    def tip(self) -> str:
        return self.page.locator("#tip").inner_text()

    def shot(self, name: str):
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.fixture
def open_report(browser):
    opened = []

    def open_(path, width=1280, height=800):
        opened.append(Opened(browser, Path(path), width, height))
        return opened[-1]

    yield open_
    for o in opened:
        assert o.errors == [], o.errors
        o.context.close()


@pytest.fixture(scope="module")
def study(small_study):
    out, _ = small_study
    results = pd.read_csv(out / "probe_results.csv", dtype={"position": str})
    return out, results


def number_after(label: str, text: str) -> float:
    return float(re.search(re.escape(label) + r" ([−+-]?[0-9.]+)", text).group(1).replace("−", "-"))


def copy_run(source: Path, target: Path) -> Path:
    """A copy of the run folder, manifest included (the report reads only files its manifest vouches for)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("lock"))
    return target


def rewrite(run: Path, stage: str, name: str, frame_or_obj) -> None:
    """Replace one file of ``run`` the way its stage writes it, so the manifest vouches for the new content."""
    with rf.open_run(run), rf.stage(stage):
        if name.endswith(".csv"):
            rf.write_csv(run / name, frame_or_obj)
        elif name.endswith(".parquet"):
            rf.write_parquet(run / name, frame_or_obj)
        else:
            rf.write_json(run / name, frame_or_obj)


def best_cell(out: Path) -> tuple[int, str]:
    best = json.loads((out / "summary.json").read_text())["best_cell"]
    return int(best["layer"]), str(best["position"])


def test_run_writes_the_report_and_it_loads_cleanly(study, open_report):
    out, _ = study
    assert (out / "report.html").is_file()  # truthmap run wrote it beside the heatmap
    o = open_report(out / "report.html")
    assert o.page.locator("#run-0 table.heatmap td").count() == 31 * 15
    assert o.page.locator("#run-0 td[aria-selected='true']").count() == 0  # no cell chosen yet
    o.shot("report-1280x800.png")
    assert [u for u in o.requests if u != o.url] == []


def test_hover_shows_the_cell_of_the_auc_table(study, open_report):
    out, results = study
    layer, position = best_cell(out)
    o = open_report(out / "report.html")
    o.cell("#run-0", layer, position).hover()
    text = o.tip()
    row = mean_over_seeds(results).set_index(["layer", "position"]).loc[(layer, position)]
    assert f"layer {layer} · {position}" in text
    assert number_after("AUC", text) == pytest.approx(row.auc, abs=6e-4)
    assert number_after("±", text) == pytest.approx(row.auc_std, abs=6e-4)
    lo, hi = re.search(r"95% interval ([0-9.]+)–([0-9.]+)", text).groups()
    assert (float(lo), float(hi)) == (pytest.approx(row.auc_lo, abs=6e-4), pytest.approx(row.auc_hi, abs=6e-4))
    assert number_after("n_train", text) == pytest.approx(row.n_train) and number_after("n_test", text) == pytest.approx(row.n_test)


def test_clicking_a_cell_lists_its_test_answers(study, open_report):
    out, results = study
    layer, position = best_cell(out)
    seed0 = results[(results.layer == layer) & (results.position == position) & (results.seed == 0)].iloc[0]
    o = open_report(out / "report.html")
    o.cell("#run-0", layer, position).click()
    rows = o.page.locator("#run-0 table.answers tbody tr")
    assert rows.count() == seed0.n_test
    assert o.page.locator("#run-0 table.answers caption").inner_text().startswith(f"{seed0.n_test} test answers")
    # the ROC drawn from the embedded scores has the AUC of the table
    assert number_after("AUC of the answers listed", o.page.locator("#run-0 .cell-auc").inner_text()) == \
        pytest.approx(seed0.auc, abs=1e-3)
    scores = [float(t) for t in rows.locator("td:nth-child(2)").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    # the family filter keeps exactly that family's answers
    answers = pd.read_parquet(out / "answers.parquet").set_index("id")
    tested = pd.read_parquet(out / "probe_scores.parquet").query(
        "site == 'residual' and layer == @layer and position == @position and seed == 0")
    families = answers.loc[tested.id, "family"].value_counts()
    family = families.index[0]
    o.page.locator("#run-0 .detail select[name=family]").select_option(family)
    assert rows.count() == families[family]
    assert set(rows.locator("td:nth-child(5)").all_inner_texts()) == {family}
    o.shot("report-cell.png")


def test_the_map_is_reachable_and_usable_by_keyboard(study, open_report):
    out, results = study
    o = open_report(out / "report.html")
    for _ in range(40):  # Tab from the top of the page reaches the map
        o.page.keyboard.press("Tab")
        if o.page.evaluate("document.activeElement.getAttribute('role')") == "gridcell":
            break
    else:
        pytest.fail("Tab never reached the heatmap")
    for key in ("ArrowDown", "ArrowDown", "ArrowRight", "ArrowRight", "ArrowRight", "Enter"):
        o.page.keyboard.press(key)
    positions = json.loads((out / "config.json").read_text())["positions"]
    assert o.page.locator("#run-0 .detail h2").inner_text() == f"Cell: layer 2 · {positions[3]} · residual"
    assert "layer 2 · " + positions[3] in o.tip()  # focus shows the same numbers as hover


def test_two_runs_side_by_side_and_their_difference(study, open_report, tmp_path):
    out, results = study
    other = copy_run(out, tmp_path / "weaker")
    shifted = results[results.site != "baseline"].copy()
    shifted[["auc", "auc_lo", "auc_hi"]] -= 0.1
    rewrite(other, "probe", "probe_results.csv", shifted)
    page_path = write_report([out, other], tmp_path / "two.html")
    o = open_report(page_path)
    o.page.locator("#tab-compare").click()
    assert o.page.locator("#compare .run-map table.heatmap").count() == 2
    layer, position = best_cell(out)
    o.cell("#difference", layer, position).hover()
    text = o.tip()
    assert number_after("B − A", text) == pytest.approx(-0.1, abs=6e-4)
    # framed: the differences beyond noise, |B − A| > 1.96 √(se_A² + se_B²), se from each cell's 95% interval
    a = mean_over_seeds(results[results.site == "residual"]).set_index(["layer", "position"])
    b = mean_over_seeds(shifted[shifted.site == "residual"]).set_index(["layer", "position"])
    se_a, se_b = (a.auc_hi - a.auc_lo) / 3.92, (b.auc_hi - b.auc_lo) / 3.92
    noise = 1.96 * np.sqrt(se_a ** 2 + se_b ** 2)
    beyond = int(((b.auc - a.auc).abs() > noise).sum())
    judged = int(((b.auc - a.auc).notna() & noise.notna()).sum())
    assert o.page.locator("#difference td.beyond-noise").count() == beyond
    assert o.page.locator("#difference .noise-count").inner_text().startswith(f"{beyond} of {judged} differences")
    o.shot("report-compare.png")
    # a cell of a side-by-side map opens it in its run
    o.cell("#compare .run-map[data-run='1']", layer, position).click()
    assert o.page.locator("#run-1").is_visible() and not o.page.locator("#compare").is_visible()
    assert o.page.locator("#run-1 .detail h2").inner_text() == f"Cell: layer {layer} · {position} · residual"


def with_verdict(out: Path, target: Path, beats_controls: bool) -> Path:
    """A copy of the run whose summary.json holds a verdict in the shared shape (the probe stage's), its
    chosen cell the validation-chosen one, one control comparison not shown when ``beats_controls`` is false."""
    run = copy_run(out, target)
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best_cell"]
    surface = {"against": "surface", "kind": "control", "auc": 0.7, "diff": 0.04, "low": -0.03, "high": 0.1, "p": 0.12,
               "shown": beats_controls}
    summary["verdict"] = {
        "line": "the exact-answer tokens beat the last tokens by +0.06 (−0.02 … +0.14): not shown at this size",
        "chosen": {"site": best["site"], "layer": best["layer"], "position": best["position"], "auc": best["auc"],
                   "low": best["auc_lo"], "high": best["auc_hi"], "seed_sd": best["auc_std"]},
        "comparisons": [{"against": "best -1", "kind": "position", "auc": 0.797, "diff": 0.061, "low": -0.018,
                         "high": 0.141, "p": 0.07, "shown": False}, surface],
        "beats_controls": beats_controls, "n_test": 24, "n_test_groups": 24}
    summary["exact_answer"] = {"mode": "blind", "right_answers": 31, "span_differs_from_gold": 4,
                               "right_answers_without_blind_span": 0}  # the label stage's
    rewrite(run, "probe", "summary.json", summary)
    return run


@pytest.mark.parametrize("width,height", [(1366, 768), (390, 844)])
def test_the_verdict_and_the_heatmap_are_on_the_first_screen(study, open_report, tmp_path, width, height):
    out, results = study
    run = with_verdict(out, tmp_path / "verdict", beats_controls=False)
    o = open_report(write_report([run], tmp_path / "page.html"), width, height)
    verdict = o.page.locator("#verdict-0")
    text = verdict.inner_text()
    assert "beat the last tokens by +0.06" in text and "Does not beat the controls (1 of 1 not shown below it)" in text
    assert "for 4 of 31 right answers the span differs from the matched gold alias" in text
    box = verdict.bounding_box()
    assert box["y"] + box["height"] <= height  # the whole verdict, its warning included, on the first screen
    first_row = o.page.locator("#run-0 section.map table.heatmap tbody tr").first.bounding_box()
    assert box["y"] < first_row["y"] and first_row["y"] + first_row["height"] <= height  # and the map under or beside it
    chosen = o.page.locator("#run-0 section.map td.chosen")  # the verdict's cell, marked on the map
    layer, position = best_cell(out)
    assert chosen.count() == 1 and (chosen.get_attribute("data-layer"), chosen.get_attribute("data-position")) == (
        str(layer), position)
    # the comparisons table: each figure on one line (a number never wraps mid-figure)
    numbers = o.page.locator("#run-0 .comparisons .num")
    assert numbers.count() == 6
    line = float(o.page.evaluate("parseFloat(getComputedStyle(document.querySelector('#run-0 .comparisons td')).lineHeight)"))
    assert all(numbers.nth(k).bounding_box()["height"] <= line * 1.2 for k in range(numbers.count()))
    assert o.page.evaluate("document.documentElement.scrollWidth") <= width
    # a cell that does not beat the controls is hatched: AUC at or below the controls' highest upper bound
    from truthmap.stages.baselines import control_level

    level = control_level(pd.concat([results, pd.read_csv(out / "baseline_results.csv", dtype={"position": str})]))
    means = mean_over_seeds(results[results.site == "residual"])
    assert o.page.locator("#run-0 section.map td.below-controls").count() == int((means.auc <= level["high"]).sum())
    ARTIFACTS.mkdir(exist_ok=True)
    o.page.screenshot(path=str(ARTIFACTS / f"report-first-screen-{width}x{height}.png"))


def test_phone_width_has_no_page_wide_scrolling(study, open_report):
    out, _ = study
    o = open_report(out / "report.html", width=390, height=844)
    layer, position = best_cell(out)
    o.cell("#run-0", layer, position).click()
    assert o.page.evaluate("document.documentElement.scrollWidth") <= 390
    o.shot("report-390-phone.png")


def test_hostile_text_shows_literally_and_runs_nothing(study, open_report, tmp_path):
    out, _ = study
    hostile = copy_run(out, tmp_path / "hostile")
    answers = pd.read_parquet(hostile / "answers.parquet")
    k = range(len(answers))
    answers["question"] = [HOSTILE[i % len(HOSTILE)] for i in k]
    answers["answer"] = [HOSTILE[(i + 1) % len(HOSTILE)] + " and " + HOSTILE[(i + 2) % len(HOSTILE)] for i in k]
    answers["exact_answer_start"] = 0
    answers["exact_answer_end"] = [len(HOSTILE[(i + 1) % len(HOSTILE)]) for i in k]
    answers["exact_answer_valid"] = True
    answers["gold"] = [[HOSTILE[(i + 3) % len(HOSTILE)], "4"] for i in k]
    answers["family"] = [HOSTILE[i % 3] for i in k]
    rewrite(hostile, "label", "answers.parquet", answers)
    summary = json.loads((hostile / "summary.json").read_text())
    summary.update(model=HOSTILE[0], dataset=HOSTILE[1], model_revision=HOSTILE[4])
    summary["families"] = {name: {"n": 1, "accuracy": 0.5, "valid_exact_answer_rate": 1.0} for name in HOSTILE}
    rewrite(hostile, "label", "summary.json", summary)
    page_path = write_report([hostile], tmp_path / "hostile.html")  # outside the run: its report.html is the run's

    o = open_report(page_path)
    layer, position = best_cell(out)
    o.cell("#run-0", layer, position).hover()
    o.cell("#run-0", layer, position).click()
    o.page.locator("#run-0 .detail select[name=family]").select_option(HOSTILE[0])
    shown = o.page.locator("#run-0").inner_text()
    for text in HOSTILE:
        assert text in shown  # literally, as text
    assert o.page.locator("#run-0 table.answers mark").first.inner_text() in HOSTILE
    assert o.page.locator("img, a, iframe, object, embed").count() == 0
    assert o.page.locator("script").count() == 2
    o.page.wait_for_timeout(300)  # give an onerror handler time to fire, were there one
    assert o.dialogs == []
    assert [u for u in o.requests if u != o.url] == []
    o.shot("report-hostile.png")
