"""Stage 5 — the heatmaps: layers down, token positions across, probe AUC in blues.

Reads ``probe_results.csv`` (mean over seeds per cell) and ``summary.json`` (for the title); writes
``heatmap.png``/``.svg`` (each cell's test AUC) and ``heatmap_within.png``/``.svg`` (each cell's AUC within
strata: how well the probe tells wrong from right answers to questions of the same kind), one panel per
site when several were probed.

The black rectangle outlines the best region, chosen on validation AUCs only (:func:`best_region`): the
validation-best cell and the cells connected to it (sharing an edge) whose mean validation AUC is within
one bootstrap standard error of the best one's; the rectangle is the region's bounding box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..figures import draw_grid, new_figure, png_and_svg, save
from .probe import mean_over_seeds
from ..runfolder import HEATMAP, HEATMAP_WITHIN

VMIN, VMAX = 0.5, 1.0
# (shown, chosen on, its standard error) per heatmap: the test AUC is drawn, the validation AUC chooses
VIEWS = {HEATMAP: ("auc", "val_auc", "val_auc_se"), HEATMAP_WITHIN: ("within_auc", "within_val_auc", None)}


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


def draw_heatmap(ax, grid: np.ndarray, layers: list[int], positions: list[str], title: str, region=None,
                 hatched=()):
    """Draw one panel on ``ax`` with ``region`` outlined and the cells ``hatched`` ((layer, position)
    pairs) hatched; returns the image (for a colour bar)."""
    import matplotlib.patches as patches

    image = draw_grid(ax, grid, cmap="Blues", vmin=VMIN, vmax=VMAX, columns=positions, layers=layers,
                      xlabel="token position", ylabel="layer", title=title)
    for layer, position in hatched:
        if layer in layers and position in positions:
            ax.add_patch(patches.Rectangle((positions.index(position) - 0.5, layers.index(layer) - 0.5), 1, 1,
                                           fill=False, hatch="///", edgecolor="#888888", linewidth=0))
    if region:
        r0, c0, r1, c1 = region
        ax.add_patch(patches.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                                       edgecolor="black", linewidth=2))
    return image


def plot_heatmap(results: pd.DataFrame, positions: list[str], out_stem: Path, *, model: str, dataset: str,
                 n: int, view: str = "heatmap", what: str | None = None, label: str | None = None,
                 hatched: set | None = None) -> list[Path]:
    """Write ``<out_stem>.png`` and ``.svg`` of ``view`` (``VIEWS``); ``n`` is the population size;
    ``what`` and ``label`` replace the view's title words and colour-bar label (another kind of probe);
    ``hatched``: (site, layer, position) of cells drawn hatched, those that do not beat the per-cell
    permutation null (analyses/wholemap.py), or None."""
    shown = VIEWS[view][0]
    what = what or ("test AUC" if view == "heatmap" else "test AUC within strata")
    label = label or ("probe AUC (predicting an error)" if view == "heatmap"
                      else "probe AUC within strata (predicting an error)")
    sites = list(dict.fromkeys(results["site"]))
    n_layers = results["layer"].nunique()
    fig, axes = new_figure(1, len(sites), squeeze=False,
                           figsize=(1.6 + 0.42 * len(positions) * len(sites), 2.0 + 0.2 * n_layers))
    for ax, site in zip(axes[0], sites):
        layers, grid = auc_grid(results, site, positions, shown)
        title = f"{model}\n{dataset} · {site} · {what}, mean over seeds · n={n} answers\nbox: best region on validation"
        cells = [(layer, position) for s, layer, position in (hatched or ()) if s == site]
        if hatched is not None:
            title += " · hatched: not above the permutation null"
        image = draw_heatmap(ax, grid, [int(v) for v in layers], positions, title,
                             site_region(results, site, positions, view), cells)
    fig.colorbar(image, ax=axes[0].tolist(), label=label, fraction=0.05, pad=0.02)
    return save(fig, *png_and_svg(out_stem))
