"""Stage 5 — the heatmap: layers down, token positions across, probe AUC in blues.

Reads ``probe_results.csv`` (mean over seeds per cell) and ``summary.json`` (for the title); writes
``heatmap.png`` and ``heatmap.svg`` (one panel per site when several were probed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .probe import mean_over_seeds

VMIN, VMAX = 0.5, 1.0
BEST_MARGIN = 0.01


def auc_grid(results: pd.DataFrame, site: str, positions: list[str]) -> tuple[list[int], np.ndarray]:
    """(layers, mean AUC ``[layers, positions]``) of one site, NaN where a cell has no AUC."""
    means = mean_over_seeds(results[results["site"] == site])
    layers = sorted(means["layer"].unique())
    grid = means.pivot(index="layer", columns="position", values="auc").reindex(index=layers, columns=positions)
    return layers, grid.to_numpy(dtype=float)


def best_region(grid: np.ndarray, margin: float = BEST_MARGIN) -> tuple[int, int, int, int] | None:
    """Bounding box (row0, col0, row1, col1), inclusive, of the connected block of cells within
    ``margin`` of the best AUC that contains the best cell (4-neighbour connectivity)."""
    if np.all(np.isnan(grid)):
        return None
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


def draw_heatmap(ax, grid: np.ndarray, layers: list[int], positions: list[str], title: str):
    """Draw one panel on ``ax``; returns the image (for a colour bar)."""
    import matplotlib.patches as patches
    from matplotlib import colormaps

    cmap = colormaps["Blues"].with_extremes(bad="#dddddd")  # grey: cells with no AUC
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=VMIN, vmax=VMAX, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(positions)), positions, rotation=60, ha="right", fontsize=8)
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    region = best_region(grid)
    if region:
        r0, c0, r1, c1 = region
        ax.add_patch(patches.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                                       edgecolor="#d62728", linewidth=2))
    return image


def plot_heatmap(results: pd.DataFrame, positions: list[str], out_stem: Path, model: str, dataset: str,
                 n: int) -> list[Path]:
    """Write ``<out_stem>.png`` and ``.svg``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(dict.fromkeys(results["site"]))
    n_layers = results["layer"].nunique()
    fig, axes = plt.subplots(1, len(sites), squeeze=False,
                             figsize=(1.6 + 0.42 * len(positions) * len(sites), 1.8 + 0.2 * n_layers))
    for ax, site in zip(axes[0], sites):
        layers, grid = auc_grid(results, site, positions)
        image = draw_heatmap(ax, grid, layers, positions, f"{model}\n{dataset} · {site} · n={n}")
    fig.colorbar(image, ax=axes[0].tolist(), label="probe AUC (predicting an error)", fraction=0.05, pad=0.02)
    paths = []
    for suffix in (".png", ".svg"):
        path = Path(str(out_stem) + suffix)
        from .runfolder import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths
