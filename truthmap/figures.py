"""The one place truthmap draws with matplotlib: a headless figure, a grid of values (cells without a
value in grey, layer numbers as row ticks), and writing it through the run folder's atomic writes.

Every figure of a run (heatmaps, attention, baselines, transfer, error types, answer choice) is made with
:func:`new_figure`, drawn, and written with :func:`save`, which closes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MISSING = "#dddddd"  # grey: a cell with no value (too few answers, a position that does not exist, …)
DPI = 150
MAX_LAYER_TICKS = 16


def new_figure(*args, **kwargs):
    """``plt.subplots(*args, **kwargs)`` on the headless Agg backend: (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def draw_grid(ax, values: np.ndarray, *, cmap: str, vmin: float, vmax: float, columns, column_rotation: int = 60,
              rows=None, layers=None, xlabel: str = "", ylabel: str = "", title: str = ""):
    """Draw ``values`` [rows, columns] as coloured cells, NaN in grey; row ticks are ``layers`` (see
    :func:`layer_ticks`) or the labels ``rows``. Returns the image (for a colour bar)."""
    from matplotlib import colormaps

    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormaps[cmap].with_extremes(bad=MISSING),
                      vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(columns)), list(columns), rotation=column_rotation, ha="right", fontsize=8)
    if layers is not None:
        layer_ticks(ax, layers)
    else:
        ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return image


def layer_ticks(ax, layers) -> None:
    """Label the rows with their layer numbers: every one up to 31 layers, every k-th beyond (k = n // 16)."""
    step = max(1, len(layers) // MAX_LAYER_TICKS)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)


def png_and_svg(stem: Path) -> tuple[Path, Path]:
    """``<stem>.png`` and ``<stem>.svg``."""
    return Path(f"{stem}.png"), Path(f"{stem}.svg")


def save(fig, *paths: Path) -> list[Path]:
    """Write ``fig`` to each path (format from its suffix) through ``runfolder.atomic_path``, then close it."""
    import matplotlib.pyplot as plt

    from .runfolder import atomic_path

    try:
        for path in paths:
            with atomic_path(Path(path)) as tmp:
                fig.savefig(tmp, format=Path(path).suffix[1:], dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return [Path(path) for path in paths]
