"""Stage 6 — the report: one self-contained HTML page to look into every cell of one or several runs.

Reads, from each run folder, ``probe_results.csv`` and ``baseline_results.csv`` (one table:
:func:`truthmap.metrics.read_run_results`), ``entropy_probe_results.csv``, ``probe_scores.parquet``,
``answers.parquet``, ``splits.json``, ``summary.json`` and ``config.json``; writes one HTML file (``report.html`` beside the
heatmap when ``truthmap run`` makes it). The page's script and style are the project's own
(``report_assets/``), inlined; it loads nothing and works offline.

The page opens on the verdict (summary.json ``verdict``: its line, the chosen cell with its interval, the
paired comparisons; a run without one shows the validation-chosen cell) beside — on a phone, above — the
heatmap, whose cells that do not beat the controls are hatched (:func:`truthmap.stages.baselines.control_level`).

What the page gets, as one JSON document (see :func:`run_data`): per site and view (mean over seeds, or
one seed) the AUC table ``[layers][positions]`` with intervals and sizes; the test answers of every
seed; and each test answer's probe score per cell, quantised to uint16 and base64-encoded per
(site, seed) as a ``[layers, positions, n_test]`` array (``MISSING`` where the position does not exist).

Safety: every string from a dataset or a model travels as JSON data and the script inserts it as text
(``textContent``), never as markup. The embedded JSON has ``<``, ``>`` and ``&`` escaped, so no string can
close its ``<script>`` element, and a Content-Security-Policy allows only the page's own script and
style (by hash) and no requests at all.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..errors import TruthmapError
from ..constants import SITES as PROBE_SITES  # any other site of the results is a baseline
from ..figures import AUC_CMAP, AUC_CHANCE, AUC_HIGH, AUC_LOW
from .baselines import BASELINES, control_level
from .plot import best_region, chosen_cell
from ..metrics import RESULT_COLUMNS, mean_over_seeds, read_run_results
from .base import Stage, StageRun, register

REPORT = rf.REPORT
ASSETS = Path(__file__).parent / "report_assets"
SCORE_SCALE = 65534  # a score s in [0, 1] is stored as round(s * SCORE_SCALE)
MISSING = 65535  # no score: the position does not exist for this answer
SUMMARY_KEYS = ("model", "model_revision", "dataset", "n", "n_layers", "hidden_size", "accuracy",
                "valid_exact_answer_rate", "valid_exact_answer_rate_wrong", "invalid_exact_answer_reasons",
                "families", "top_cells", "best_cell", "best_on_test", "best_within_cell", "population", "controls",
                "probe_within_family_auc", "stage_seconds", "wall_seconds", "versions", "entropy_probe", "sampling",
                "verdict", "skipped", "whole_map", "cell_null", "graders", "cost", "exact_answer")


def _number(value, digits: int = 4):
    """A JSON-ready float rounded to ``digits``, or None for NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def _grid(table: pd.DataFrame, column: str, layers: list[int], positions: list[str], digits: int = 4) -> list:
    """``[layers][positions]`` of ``column``, None where a cell is absent or NaN."""
    pivot = table.pivot(index="layer", columns="position", values=column).reindex(index=layers, columns=positions)
    return [[_number(v, digits) for v in row] for row in pivot.to_numpy(dtype=float)]


def _view(table: pd.DataFrame, layers: list[int], positions: list[str], spread: bool, within: bool = False) -> dict:
    """The AUC table of one view (mean over seeds, one seed, or the mean within strata) and its best
    region, chosen on validation AUCs as the PNG's (plot.best_region)."""
    table = table.copy()
    for column in ("val_auc", "val_auc_se", "within_auc", "within_val_auc", "n_val"):
        if column not in table.columns:
            table[column] = np.nan
    if within:  # the within-strata map: same cells, AUCs over same-stratum pairs, no interval
        table = table.assign(auc=table["within_auc"], val_auc=table["within_val_auc"], auc_lo=np.nan, auc_hi=np.nan,
                             val_auc_se=np.nan)
    view = {name: _grid(table, name, layers, positions) for name in ("auc", "auc_lo", "auc_hi", "val_auc")}
    for name in ("n_train", "n_val", "n_test"):
        view[name] = _grid(table, name, layers, positions, 1)
    if spread:
        view["auc_std"] = _grid(table, "auc_std", layers, positions)
    chosen_on = np.array([[np.nan if v is None else v for v in row] for row in view["val_auc"]], dtype=float)
    region = None
    if chosen_on.size and not np.all(np.isnan(chosen_on)):
        best = np.unravel_index(np.nanargmax(chosen_on), chosen_on.shape)
        se = np.array(_grid(table, "val_auc_se", layers, positions), dtype=float)
        region = best_region(chosen_on, se[best])
    view["region"] = [int(v) for v in region] if region else None
    return view


def cell_tables(results: pd.DataFrame, positions: list[str]) -> dict:
    """``site -> {layers, views: {"mean" | "within" | "<seed>": view}}`` for the probe sites of ``results``."""
    sites = {}
    for site in dict.fromkeys(results["site"]):
        if site not in PROBE_SITES:
            continue
        rows = results[results["site"] == site]
        layers = sorted(int(v) for v in rows["layer"].unique())
        means = mean_over_seeds(rows)
        views = {"mean": _view(means, layers, positions, spread=True)}
        if "within_auc" in rows.columns and rows["within_auc"].notna().any():
            views["within"] = _view(means, layers, positions, spread=True, within=True)
        for seed in sorted(rows["seed"].unique()):
            views[str(int(seed))] = _view(rows[rows["seed"] == seed], layers, positions, spread=False)
        sites[site] = {"layers": layers, "views": views}
    return sites


def add_entropy_view(run: rf.Run | rf.Folder, sites: dict, positions: list[str]) -> None:
    """The ``"entropy"`` view of every site: the semantic-entropy probes' test AUC for errors (mean over
    seeds, region chosen on validation), when the open ``run`` has ``entropy_probe_results.csv``."""
    if not run.path(rf.ENTROPY_RESULTS).exists():
        return
    table = run.read_csv(rf.ENTROPY_RESULTS, dtype={"site": str, "position": str})  # verified against the manifest
    table = table[table["target"] == "error"]
    for site, entry in sites.items():
        rows = table[table["site"] == site]
        if not rows.empty:
            entry["views"]["entropy"] = _view(mean_over_seeds(rows), entry["layers"], positions, spread=True)


def baselines(results: pd.DataFrame) -> list[dict]:
    """Rows of sites other than the probe sites (``site = baseline`` …), mean over seeds, each with its kind
    and label from the baseline registry (stages/baselines.py)."""
    rows = results[~results["site"].isin(PROBE_SITES)]
    if rows.empty:
        return []
    means = mean_over_seeds(rows)
    known = {name: (b.kind, b.label) for name, b in BASELINES.items()}  # a name of another version: its own
    return [{"site": str(r.site), "layer": _number(r.layer, 0), "name": str(r.position), "auc": _number(r.auc),
             "auc_std": _number(r.auc_std), "auc_lo": _number(r.auc_lo), "auc_hi": _number(r.auc_hi),
             "n_test": _number(r.n_test, 1), "kind": known.get(str(r.position), ("baseline", str(r.position)))[0],
             "label": known.get(str(r.position), ("baseline", str(r.position)))[1]} for r in means.itertuples()]


def answer_table(answers: pd.DataFrame) -> dict:
    """Column-wise text of the answers shown (strings stay strings; the page inserts them as text).

    ``answer`` is split into the text before, at and after the exact answer, so the page can mark it
    without counting characters itself.
    """
    parts = []
    for answer, valid, start, end in zip(answers["answer"], answers["exact_answer_valid"],
                                         answers["exact_answer_start"], answers["exact_answer_end"]):
        answer = str(answer)
        if valid and 0 <= start <= end <= len(answer):
            parts.append([answer[:start], answer[start:end], answer[end:]])
        else:
            parts.append([answer, "", ""])
    table = {
        "id": [str(v) for v in answers["id"]],
        "question": [str(v) for v in answers["question"]],
        "gold": [[str(g) for g in gold] for gold in answers["gold"]],
        "family": [str(v) for v in answers["family"]],
        "correct": [bool(v) for v in answers["correct"]],
        "answer": parts,
    }
    if "task" in answers.columns:  # runs of several tasks can be filtered by task
        table["task"] = [str(v) for v in answers["task"]]
    return table


def score_arrays(scores: pd.DataFrame, sites: dict, positions: list[str], test_rows: dict[str, list[int]],
                 ids: list[str]) -> dict:
    """``site -> seed -> base64`` of uint16 ``[layers, positions, n_test]`` (little-endian): each test
    answer's P(error) × ``SCORE_SCALE``, ``MISSING`` where the cell did not score it."""
    out = {}
    for site, table in sites.items():
        out[site] = {}
        for seed, rows in test_rows.items():
            column_of = np.full(len(ids) + 1, -1)  # answer row -> column of this seed's block; -1: not tested
            column_of[rows] = np.arange(len(rows))
            block = np.full((len(table["layers"]), len(positions), len(rows)), MISSING, dtype="<u2")
            part = scores[(scores["site"] == site) & (scores["seed"] == int(seed))]
            li = pd.Index(table["layers"]).get_indexer(part["layer"])  # -1 where absent
            pi = pd.Index(positions).get_indexer(part["position"].astype(str))
            ci = column_of[pd.Index(ids).get_indexer(part["id"])]
            if (li < 0).any() or (pi < 0).any() or (ci < 0).any():
                raise TruthmapError(f"{rf.PROBE_SCORES}: site {site}, seed {seed}: scores for cells or answers "
                                    f"that {rf.PROBE_RESULTS} or {rf.SPLITS} do not list; rerun the probe stage")
            block[li, pi, ci] = np.rint(
                np.clip(part["score"].to_numpy(dtype=float), 0, 1) * SCORE_SCALE)
            out[site][seed] = base64.b64encode(block.tobytes()).decode("ascii")
    return out


def run_data(run_dir: Path | rf.Run) -> dict:
    """Everything the page shows about one run folder (a path, or an open :class:`~truthmap.runfolder.Run`;
    read through :func:`truthmap.runfolder.at`)."""
    run = rf.at(run_dir)
    run_dir = run.root
    if not (run_dir / rf.PROBE_RESULTS).exists():
        raise TruthmapError(f"{run_dir / rf.PROBE_RESULTS}: missing; is {run_dir} a run folder whose probe "
                            "stage has finished? (truthmap run, or truthmap probe --out RUN)")
    results = read_run_results(run.root)  # the probes' rows, then the baselines' (verified)
    problem = ", ".join(sorted(set(RESULT_COLUMNS[:10]) - set(results.columns)))  # the rest: optional
    problem = problem and f"no column {problem}"
    if problem:
        raise TruthmapError(f"{run_dir / rf.PROBE_RESULTS}: unreadable ({problem}); "
                            "rerun the probe stage (truthmap probe --force --out RUN)")
    scores = run.read_parquet(rf.PROBE_SCORES)
    answers = run.read_parquet(rf.ANSWERS)
    splits = run.read_splits(rf.SPLITS)
    summary = rf.finite(run.read_json_object(rf.SUMMARY, default={}))
    config = run.read_json_object(rf.CONFIG, default={})
    if not isinstance(config.get("positions", []), list):
        raise TruthmapError(f"{run_dir / rf.CONFIG}: 'positions' is not a list; rerun the run")

    probed = results[results["site"].isin(PROBE_SITES)]
    positions = [str(p) for p in config.get("positions", []) if str(p) in set(probed["position"])]
    positions += [p for p in dict.fromkeys(probed["position"]) if p not in positions]
    sites = cell_tables(results, positions)
    add_entropy_view(run, sites, positions)

    seeds = sorted((s for s in splits["seeds"] if int(s) in set(probed["seed"])), key=int)
    if not seeds:
        raise TruthmapError(f"{run_dir / rf.PROBE_RESULTS}: no seed of {rf.SPLITS} was probed; rerun the probe stage")
    tested = set().union(*(splits["seeds"][s]["test"] for s in seeds))
    shown = answers[answers["id"].isin(tested)].reset_index(drop=True)
    ids = shown["id"].tolist()
    row_of = {answer_id: k for k, answer_id in enumerate(ids)}
    test_rows = {}
    for seed in seeds:
        unknown = [i for i in splits["seeds"][seed]["test"] if i not in row_of]
        if unknown:
            raise TruthmapError(f"{run_dir / rf.SPLITS}: seed {seed} tests id '{unknown[0]}', which "
                                f"{rf.ANSWERS} lacks; rerun the label stage")
        test_rows[seed] = [row_of[i] for i in splits["seeds"][seed]["test"]]
    chosen = chosen_cell(results)  # the fallback of a run whose summary.json has no verdict
    return {
        "name": run_dir.resolve().name,
        "summary": {key: summary[key] for key in SUMMARY_KEYS if key in summary},
        # the bar a cell must clear to beat the controls (baselines.control_level): the map hatches the others
        "control": control_level(results),
        "chosen": None if chosen is None else {"site": str(chosen["site"]), "layer": int(chosen["layer"]),
                                               "position": str(chosen["position"]), "auc": _number(chosen["auc"]),
                                               "low": _number(chosen["auc_lo"]), "high": _number(chosen["auc_hi"]),
                                               "seed_sd": _number(chosen["auc_std"])},
        "positions": positions,
        "seeds": seeds,
        "sites": sites,
        "baselines": baselines(results),
        "answers": answer_table(shown),
        "test_rows": test_rows,
        "scores": score_arrays(scores, sites, positions, test_rows, ids),
    }


def palette(name: str, n: int = 64) -> list[str]:
    """``n`` hex colours sampled evenly from a matplotlib colour map (the PNG's, for the heatmap)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps[name]
    return [to_hex(cmap(k / (n - 1))) for k in range(n)]


def embed_json(data) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` become ``\\u003c`` … (they only occur
    inside strings), so no string can end the element or open a comment; line separators likewise."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible_bidi(value):
    """``value`` (a JSON value) with every bidirectional control character (U+202E RIGHT-TO-LEFT OVERRIDE and
    its kin), which would reorder the text around it on the page, shown as ``⟨U+202E⟩`` instead."""
    if isinstance(value, str):
        return _BIDI.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", value)
    if isinstance(value, dict):
        return {visible_bidi(k): visible_bidi(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [visible_bidi(v) for v in value]
    return value


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def render(runs: list[dict]) -> str:
    """The HTML page for the runs' data (:func:`run_data`)."""
    script = (ASSETS / "report.js").read_text()
    style = (ASSETS / "report.css").read_text()
    assert "</script" not in script.lower() and "</style" not in style.lower()
    runs = visible_bidi(runs)  # text from data and models: no character may reorder what the page shows
    data = {"runs": runs, "palette": {"auc": palette(AUC_CMAP), "difference": palette("PuOr")},
            # the AUC colours meet at chance: [low, chance] on the palette's first half, [chance, high] on its second
            "auc_scale": {"low": AUC_LOW, "chance": AUC_CHANCE, "high": AUC_HIGH},
            "score_scale": SCORE_SCALE, "missing": MISSING}
    policy = (f"default-src 'none'; script-src '{_sha256(script)}'; style-src '{_sha256(style)}'; "
              "base-uri 'none'; form-action 'none'")
    title = html.escape("truthmap report — " + ", ".join(run["name"] for run in runs))
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{title}</title>\n<style>{style}</style>\n</head>\n<body>\n"
        "<noscript>This report draws itself with JavaScript; please allow scripts for this file.</noscript>\n"
        "<div id=\"app\"></div>\n"
        f"<script type=\"application/json\" id=\"truthmap-data\">{embed_json(data)}</script>\n"
        f"<script>{script}</script>\n</body>\n</html>\n"
    )


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write the report of ``run_dirs`` (one page; several runs side by side) to ``out``, a path anywhere
    (``truthmap report --out``: the write is guarded, inside a run folder or not); return it."""
    if not run_dirs:
        raise TruthmapError("report: name at least one run folder")
    runs = []
    for d in run_dirs:
        with rf.Run.reading(d) as run:  # shared lock; every file checked against the manifest (a held run: itself)
            runs.append(run_data(run))
    names = [run["name"] for run in runs]
    for k, run in enumerate(runs):  # tabs are labelled by folder name: make them distinct
        if names.count(run["name"]) > 1:
            run["name"] = f"{run['name']} ({k + 1})"
    out = Path(out)
    with rf.atomic_path(out) as tmp:
        tmp.write_text(render(runs), encoding="utf-8")
    return out


# ---------------------------------------------------------------- the stage

def _report(s: StageRun) -> None:
    with s.run.atomic_path(rf.REPORT) as tmp:
        tmp.write_text(render([run_data(s.run)]), encoding="utf-8")  # (write_report, but through the Run)


# summary.json is not an input: every stage rewrites it, so the report would never be current
register(Stage(
    "report", "6", "The interactive report of the run (report.html).", _report,
    inputs=(rf.ANSWERS, rf.SPLITS, rf.PROBE_RESULTS, rf.PROBE_SCORES, rf.BASELINE_RESULTS, rf.ENTROPY_RESULTS,
            rf.WHOLEMAP_RESULTS),
    outputs=(rf.REPORT,), settings=lambda c: {}, labelled=True))
