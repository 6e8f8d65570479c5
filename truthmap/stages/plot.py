"""Stage 5 — the heatmaps: layers down, token positions across, probe AUC in colour; and the paper figure.

Reads ``probe_results.csv`` and ``baseline_results.csv`` (:func:`truthmap.metrics.read_run_results`;
mean over seeds per cell); writes ``heatmap.png``/``.svg`` (each cell's test AUC) and
``heatmap_within.png``/``.svg`` (each cell's AUC within strata: how well the probe tells wrong from right
answers to questions of the same kind), one panel per site when several were probed.

What the heatmap shows:

* colour: AUC 0.5 (chance) white, blue above, red below (``figures.auc_norm``; below 0.3 all red);
* the black rectangle: the best region, chosen on validation AUCs only (:func:`best_region`): the
  validation-best cell and the cells connected to it (sharing an edge) whose mean validation AUC is
  within one bootstrap standard error of the best one's; the rectangle is the region's bounding box;
* hatching: a cell that does not beat the controls (:func:`truthmap.stages.baselines.control_level`): its
  test AUC is at or below the highest upper 95% bound of the controls (the baselines registered as
  controls: the surface and family controls, the bag-of-answer-tokens baseline); the bar is marked on the
  colour bar;
* the title: the validation-chosen cell's test AUC and interval.

:func:`paper_figure` (``truthmap figure RUN``) draws the same map with readable position names beside the
baselines' AUCs with their intervals, for a paper (PDF, SVG or PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..figures import (AUC_CMAP, auc_norm, draw_auc_bars, draw_grid, layer_ticks, new_figure, png_and_svg,
                       position_label, save)
from ..metrics import choose_cell, mean_over_seeds, read_results, read_run_results
from ..runfolder import HEATMAP, HEATMAP_WITHIN
from .base import Stage, StageRun, fields, register, short_model
from .baselines import control_level, kind_of

# (shown, chosen on, its standard error) per heatmap: the test AUC is drawn, the validation AUC chooses
VIEWS = {HEATMAP: ("auc", "val_auc", "val_auc_se"), HEATMAP_WITHIN: ("within_auc", "within_val_auc", None)}
# the baselines that say what a probe reads besides the model's knowledge: the answer's look (surface), the
# kind of question (family, subgroup), which answer was given (bag of answer tokens)
PROBE_SITES = ("residual", "mlp", "attention")  # models.SITES; any other site of the results is a baseline
HATCH = "////"  # a cell that does not beat the controls
NULL_HATCH = "..."  # a cell not above the per-cell permutation null (analyses/wholemap.py)


def auc_grid(results: pd.DataFrame, site: str, positions: list[str], column: str = "auc") -> tuple[list[int], np.ndarray]:
    """(layers, mean ``column`` ``[layers, positions]``) of one site, NaN where a cell has no value."""
    means = mean_over_seeds(results[results["site"] == site])
    layers = sorted(means["layer"].unique())
    grid = means.pivot(index="layer", columns="position", values=column).reindex(index=layers, columns=positions)
    return layers, grid.to_numpy(dtype=float)


def best_region(grid: np.ndarray, margin: float = 0.0) -> tuple[int, int, int, int] | None:
    """Bounding box (row0, col0, row1, col1), inclusive, of the connected block of cells of ``grid`` (the
    validation AUCs) within ``margin`` of its best value that contains the best cell (4-neighbour)."""
    if grid.size == 0 or np.all(np.isnan(grid)):
        return None
    margin = 0.0 if margin is None or not np.isfinite(margin) else float(margin)
    best = np.unravel_index(np.nanargmax(grid), grid.shape)
    near = np.nan_to_num(grid, nan=-1.0) >= grid[best] - margin
    seen, stack = {best}, [best]
    while stack:
        r, c = stack.pop()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < grid.shape[0] and 0 <= nc < grid.shape[1] and near[nr, nc] and (nr, nc) not in seen:
                seen.add((nr, nc))
                stack.append((nr, nc))
    rows = [r for r, _ in seen]
    cols = [c for _, c in seen]
    return min(rows), min(cols), max(rows), max(cols)


def site_region(results: pd.DataFrame, site: str, positions: list[str], view: str = "heatmap"):
    """The validation-chosen region of one site's ``view`` (see ``VIEWS``)."""
    _, chosen_on, error = VIEWS[view]
    layers, grid = auc_grid(results, site, positions, chosen_on)
    margin = 0.0
    if error is not None and not np.all(np.isnan(grid)):
        _, se = auc_grid(results, site, positions, error)
        margin = se[np.unravel_index(np.nanargmax(grid), grid.shape)]
    return best_region(grid, margin)


def below_controls(grid: np.ndarray, level: dict | None) -> np.ndarray:
    """True where a cell of ``grid`` (test AUCs) does not beat the controls: AUC ≤ ``level["high"]``."""
    if level is None:
        return np.zeros(grid.shape, dtype=bool)
    return np.isfinite(grid) & (np.nan_to_num(grid, nan=np.inf) <= level["high"])


def chosen_cell(results: pd.DataFrame) -> dict | None:
    """The probe cell chosen on mean validation AUC (summary.json's ``best_cell``), with its test AUC and interval."""
    return choose_cell(mean_over_seeds(results[results["site"].isin(PROBE_SITES)]))


def interval(cell: dict) -> str:
    low, high = cell.get("auc_lo"), cell.get("auc_hi")
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return ""
    return f" ({low:.2f}–{high:.2f})"


def draw_heatmap(ax, grid: np.ndarray, layers: list[int], positions: list[str], title: str, region=None,
                 hatched=(), below: np.ndarray | None = None, labels: list[str] | None = None, fontsize: float = 8):
    """Draw one panel on ``ax`` with ``region`` outlined, the cells ``hatched`` ((layer, position) pairs:
    not above the per-cell permutation null) dotted and the cells of ``below`` (not beating the controls)
    hatched; ``labels`` name the columns (default: the positions). Returns the image (for a colour bar)."""
    import matplotlib.patches as patches

    image = draw_grid(ax, grid, cmap=AUC_CMAP, norm=auc_norm(), columns=labels or positions, layers=layers,
                      xlabel="token position", ylabel="layer", title=title, fontsize=fontsize)
    if below is not None:
        for r, c in zip(*np.nonzero(below)):
            ax.add_patch(patches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch=HATCH, linewidth=0,
                                           edgecolor=(0.25, 0.25, 0.25, 0.6)))
    for layer, position in hatched:
        if layer in layers and position in positions:
            ax.add_patch(patches.Rectangle((positions.index(position) - 0.5, layers.index(layer) - 0.5), 1, 1,
                                           fill=False, hatch=NULL_HATCH, edgecolor="#555555", linewidth=0))
    if region:
        r0, c0, r1, c1 = region
        ax.add_patch(patches.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                                       edgecolor="black", linewidth=2))
    return image


def auc_colorbar(fig, image, axes, label: str, level: dict | None, fontsize: float = 8):
    """The colour bar of an AUC map, chance marked, and the controls' bar (``level``) drawn across it."""
    bar = fig.colorbar(image, ax=axes, label=label, fraction=0.05, pad=0.02, extend="min")
    bar.set_ticks([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    bar.ax.tick_params(labelsize=fontsize)
    bar.set_label(label, fontsize=fontsize)
    bar.ax.axhline(0.5, color="#555555", linewidth=0.8)
    if level is not None:  # the hatching's bar; its legend is the title's (heatmap) or the bars' (paper figure)
        bar.ax.axhline(level["high"], color="black", linewidth=1.5, linestyle="--")
    return bar


def left_out_note(left_out: dict) -> str:
    """"; 44 left out (no_exact_answer:no_match 40, …)" from splits.json's ``left_out`` {id: reason} (the two
    commonest reasons); "" if none."""
    if not left_out:
        return ""
    reasons = pd.Series(list(left_out.values()), dtype=object).value_counts()
    shown = ", ".join(f"{reason} {count}" for reason, count in reasons.head(2).items())
    return f"; {len(left_out)} left out ({shown}{', …' if len(reasons) > 2 else ''})"


def plot_heatmap(results: pd.DataFrame, positions: list[str], out_stem: Path, *, model: str, dataset: str,
                 n: int, view: str = "heatmap", what: str | None = None, label: str | None = None,
                 left_out: str = "", hatched: set | None = None) -> list[Path]:
    """Write ``<out_stem>.png`` and ``.svg`` of ``view`` (``VIEWS``); ``n`` is the population size and
    ``left_out`` says who else was not studied and why (:func:`left_out_note`);
    ``what`` and ``label`` replace the view's title words and colour-bar label (another kind of probe).
    ``results`` may hold the baselines' rows: the controls among them set the hatching (main view only);
    ``hatched``: (site, layer, position) of cells drawn dotted, those that do not beat the per-cell
    permutation null (analyses/wholemap.py), or None."""
    shown = VIEWS[view][0]
    what = what or ("test AUC" if view == "heatmap" else "test AUC within strata")
    label = label or ("probe AUC (predicting an error)" if view == "heatmap"
                      else "probe AUC within strata (predicting an error)")
    # the controls score all answers, not within strata: they set a bar for the main view only
    level = control_level(results) if view == "heatmap" else None
    probes = results[results["site"].isin(PROBE_SITES)]
    sites = list(dict.fromkeys(probes["site"]))
    n_layers = probes["layer"].nunique()
    fig, axes = new_figure(1, len(sites), squeeze=False,
                           figsize=(2.2 + 0.42 * len(positions) * len(sites), 2.6 + 0.2 * n_layers))
    cell = chosen_cell(probes) if view == "heatmap" else None
    for ax, site in zip(axes[0], sites):
        layers, grid = auc_grid(probes, site, positions, shown)
        lines = [f"{model} · {dataset} · {site} · {what}, mean over seeds", f"n={n} answers{left_out}"]
        if cell is not None and cell["site"] == site:
            lines.append(f"chosen on validation: layer {cell['layer']}, {position_label(cell['position'])}: "
                         f"test AUC {cell['auc']:.3f}{interval(cell)}")
        lines.append("box: best region on validation"
                     + (f" · hatched: AUC ≤ {level['high']:.2f}, the controls' upper 95% bound ({level['name']})"
                        if level else "")
                     + (" · dotted: not above the permutation null" if hatched is not None else ""))
        cells = [(layer, position) for s, layer, position in (hatched or ()) if s == site]
        image = draw_heatmap(ax, grid, [int(v) for v in layers], positions, "\n".join(lines),
                             site_region(probes, site, positions, view), cells, below=below_controls(grid, level),
                             labels=[position_label(p) for p in positions])
    auc_colorbar(fig, image, axes[0].tolist(), label, level)
    return save(fig, *png_and_svg(out_stem))


# ---------------------------------------------------------------- the paper figure (truthmap figure RUN)

FIGURE_FORMATS = ("pdf", "svg", "png")


def _verdict_cell(summary: dict, results: pd.DataFrame) -> dict | None:
    """The chosen cell as summary.json's ``verdict`` has it (site, layer, position, auc, auc_lo, auc_hi), or
    — in a run without a verdict — the validation-chosen cell of ``results``."""
    verdict = summary.get("verdict") if isinstance(summary.get("verdict"), dict) else {}
    chosen = verdict.get("chosen")
    if isinstance(chosen, dict) and all(k in chosen for k in ("site", "layer", "position", "auc")):
        return {"site": str(chosen["site"]), "layer": int(chosen["layer"]), "position": str(chosen["position"]),
                "auc": float(chosen["auc"]), "auc_lo": chosen.get("low"), "auc_hi": chosen.get("high")}
    cell = chosen_cell(results)
    return None if cell is None else {k: cell[k] for k in ("site", "layer", "position", "auc", "auc_lo", "auc_hi")}


def paper_figure(run_dir: Path | rf.Run, out: Path, *, width: float = 7.0, height: float = 4.2, font_size: float = 8.0,
                 model: str = "", dataset: str = "") -> Path:
    """Draw the run's map for a paper into ``out`` (format from its suffix: ``FIGURE_FORMATS``).

    Left: the heatmap of the chosen cell's site — readable position names, the best region outlined, the
    chosen cell marked (○), the cells that do not beat the controls hatched, the controls' bar on the
    colour bar. Right: the chosen cell, the controls and the baselines as bars with their 95% intervals and
    a legend. The title holds the chosen cell's test AUC and interval; the caption, the verdict's line
    (when the run has one) and the hatching rule. Reads ``probe_results.csv``, ``baseline_results.csv``,
    ``answers.parquet``, ``summary.json`` and ``config.json`` of ``run_dir`` (a folder, read under
    ``Run.reading``, or an open Run: :func:`truthmap.runfolder.at`); ``out`` may be anywhere.
    """
    import matplotlib

    from .. import runfolder as rf
    from ..errors import TruthmapError

    run = rf.at(run_dir)
    run_dir = run.root
    if not (run_dir / rf.PROBE_RESULTS).exists():
        raise TruthmapError(f"{run_dir / rf.PROBE_RESULTS}: missing; is {run_dir} a run folder whose probe stage "
                            "has finished? (truthmap run)")
    results = read_run_results(run_dir)
    summary = run.read_json_object(rf.SUMMARY, default={})
    config = run.read_json_object(rf.CONFIG, default={})
    probes = results[results["site"].isin(PROBE_SITES)]
    if probes.empty:
        raise TruthmapError(f"{run_dir / rf.PROBE_RESULTS}: no probe rows; rerun the probe stage")
    saved = config.get("positions") if isinstance(config.get("positions"), list) else []
    positions = [str(p) for p in saved if str(p) in set(probes["position"].astype(str))]
    positions += [p for p in dict.fromkeys(probes["position"].astype(str)) if p not in positions]
    cell = _verdict_cell(summary, probes)
    site = cell["site"] if cell else str(probes["site"].iloc[0])
    level = control_level(results)
    model = model or str(summary.get("model") or config.get("model") or "").replace("embedded:", "").split("::")[-1]
    dataset = dataset or str(summary.get("dataset") or config.get("dataset") or "")
    population = summary.get("population") if isinstance(summary.get("population"), dict) else {}

    with matplotlib.rc_context({"font.size": font_size, "axes.titlesize": font_size + 1,
                                "axes.labelsize": font_size, "svg.fonttype": "none", "pdf.fonttype": 42}):
        fig, (ax_map, ax_bars) = new_figure(1, 2, figsize=(width, height), layout="constrained",
                                            gridspec_kw={"width_ratios": [2.3, 1.0]})
        layers, grid = auc_grid(probes, site, positions)
        image = draw_heatmap(ax_map, grid, layers, positions, "", site_region(probes, site, positions),
                             below=below_controls(grid, level), labels=[position_label(p) for p in positions],
                             fontsize=font_size - 1)
        ax_map.set_xlabel("")
        layer_ticks(ax_map, layers, font_size - 1, most=max(4, int(height * 2.5)))  # no crowded rows in a small figure
        if cell is not None and cell["site"] == site and int(cell["layer"]) in layers and cell["position"] in positions:
            ax_map.plot(positions.index(cell["position"]), layers.index(int(cell["layer"])), marker="o", markersize=6,
                        markerfacecolor="none", markeredgecolor="#f0a000", markeredgewidth=1.8)
        auc_colorbar(fig, image, ax_map, "probe test AUC (predicting an error)", level, fontsize=font_size - 1)
        bars = _bars(results, cell)
        draw_auc_bars(ax_bars, bars, level=level, fontsize=font_size - 1, xlabel="test AUC (95% interval)",
                      legend="below")
        title = f"{model} · {dataset}" + (f" · {site}" if probes["site"].nunique() > 1 else "")
        if cell is not None:
            title += (f"\nchosen on validation: layer {cell['layer']}, {position_label(cell['position'])} — "
                      f"test AUC {cell['auc']:.3f}{interval(cell)}")
        fig.suptitle(title, fontsize=font_size + 1)
        caption = []
        verdict = summary.get("verdict") if isinstance(summary.get("verdict"), dict) else {}
        if isinstance(verdict.get("line"), str):
            caption.append(rf.sanitise(verdict["line"], 300))
        note = "box: best region on validation; ○ chosen cell"
        if level is not None:
            note += f"; hatched: AUC ≤ {level['high']:.2f}, the controls' highest upper 95% bound ({level['name']})"
        if population.get("n"):
            note += f"; n = {population['n']} answers" + (f", {population['left_out']} left out"
                                                          if population.get("left_out") else "")
        caption.append(note)
        import textwrap

        per_line = int(width * 72 / (0.55 * (font_size - 1)))  # characters of the caption's font across the figure
        fig.supxlabel("\n".join(textwrap.fill(line, per_line) for line in caption), x=0.01, ha="left",
                      fontsize=font_size - 1)
        return save(fig, Path(out))[0]


def _bars(results: pd.DataFrame, cell: dict | None) -> list[dict]:
    """The paper figure's bars, lowest first: baselines and controls with an AUC on this data, then the chosen cell."""
    rows = results[~results["site"].isin(PROBE_SITES)]
    bars = []
    if not rows.empty:
        means = mean_over_seeds(rows).dropna(subset=["auc"]).sort_values("auc")
        bars = [{"label": str(r.position).replace("_", " "), "auc": r.auc, "low": r.auc_lo, "high": r.auc_hi,
                 "kind": "control" if kind_of(str(r.position)) == "control" else "baseline"} for r in means.itertuples()]
    if cell is not None:
        bars.append({"label": f"probe L{cell['layer']} {position_label(cell['position'])}", "auc": cell["auc"],
                     "low": cell.get("auc_lo"), "high": cell.get("auc_hi"), "kind": "probe"})
    return bars


# ---------------------------------------------------------------- the stage

def cells_below_null(run_dir: Path | rf.Run) -> set[tuple[str, int, str]] | None:
    """(site, layer, position) of every cell of ``cell_null.csv`` (the wholemap stage's) that does not beat
    the null (the cells a heatmap marks); None when the run has no such file or no null (``--permutations 0``).
    ``run_dir``: a run folder or an open :class:`~truthmap.runfolder.Run` (:func:`truthmap.runfolder.at`)."""
    run = rf.at(run_dir)
    if not run.path(rf.CELL_NULL).exists():
        return None
    table = run.read_csv(rf.CELL_NULL, dtype={"site": str, "position": str})
    if table["p"].isna().all():
        return None
    return {(r.site, int(r.layer), r.position) for r in table.itertuples() if not bool(r.beats_null)}


def _plot(s: StageRun) -> None:
    config, run = s.config, s.run
    results = read_run_results(run.root, baselines=False)
    if run.path(rf.BASELINE_RESULTS).exists():  # the controls among the baselines' rows set the hatching
        results = pd.concat([results, read_results(run.path(rf.BASELINE_RESULTS))], ignore_index=True)
    n = len(run.read_parquet(rf.ANSWERS).query("split != ''"))  # the population
    hatched = cells_below_null(run)  # None without the per-cell null (--permutations 0)
    left_out = left_out_note(run.read_splits(rf.SPLITS).get("left_out") or {})  # who else, and why
    for view in VIEWS:
        plot_heatmap(results, config.positions, run.path(view), model=short_model(config.model),
                     dataset=config.dataset, n=n, view=view, left_out=left_out,
                     hatched=hatched if view == "heatmap" else None)


register(Stage(
    "plot", "5", "The heatmap (heatmap.png, heatmap.svg).", _plot,
    inputs=(rf.PROBE_RESULTS, rf.BASELINE_RESULTS, rf.ANSWERS, rf.SPLITS, rf.CELL_NULL),
    outputs=tuple(name for view in rf.HEATMAPS for name in rf.figures(view)), settings=fields("positions"),
    labelled=True, summary=True))
