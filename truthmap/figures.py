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


# the heatmaps' colours: AUC 0.5 (chance) white, blue above it, red below it (a probe that ranks the wrong
# way); below AUC_LOW all red (the colour bar's arrow)
AUC_CMAP, AUC_LOW, AUC_CHANCE, AUC_HIGH = "RdBu", 0.3, 0.5, 1.0

# readable names of the token positions (the columns of every map), for figures a reader sees first
POSITION_LABELS = {
    "last_q": "last question token",
    "first_answer": "first answer token",
    "second_answer": "second answer token",
    "exact_answer_before_first": "token before exact answer",
    "exact_answer_first": "exact answer, first token",
    "exact_answer_last": "exact answer, last token",
    "exact_answer_after_last": "token after exact answer",
}


def position_label(position: str) -> str:
    """``exact_answer_first`` -> "exact answer, first token"; ``-1`` -> "last token"; ``-3`` -> "3rd last token"."""
    position = str(position)
    if position in POSITION_LABELS:
        return POSITION_LABELS[position]
    if position.startswith("-") and position[1:].isdigit():
        k = int(position[1:])
        if k == 1:
            return "last token"
        suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
        return f"{k}{suffix} last token"
    return position


def auc_norm():
    """The AUC colour scale of every heatmap (:data:`AUC_CMAP`): two slopes that meet at chance (0.5)."""
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vmin=AUC_LOW, vcenter=AUC_CHANCE, vmax=AUC_HIGH)


def draw_grid(ax, values: np.ndarray, *, cmap: str, vmin: float | None = None, vmax: float | None = None, columns,
              column_rotation: int = 60, rows=None, layers=None, xlabel: str = "", ylabel: str = "", title: str = "",
              norm=None, fontsize: float = 8):
    """Draw ``values`` [rows, columns] as coloured cells, NaN in grey; row ticks are ``layers`` (see
    :func:`layer_ticks`) or the labels ``rows``. ``norm`` (a matplotlib norm) replaces ``vmin``/``vmax``.
    Returns the image (for a colour bar)."""
    from matplotlib import colormaps

    scale = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormaps[cmap].with_extremes(bad=MISSING),
                      aspect="auto", interpolation="nearest", **scale)
    ax.set_xticks(range(len(columns)), list(columns), rotation=column_rotation, ha="right", fontsize=fontsize)
    if layers is not None:
        layer_ticks(ax, layers, fontsize)
    else:
        ax.set_yticks(range(len(rows)), list(rows), fontsize=fontsize)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize + 1)
    return image


def layer_ticks(ax, layers, fontsize: float = 8, most: int = MAX_LAYER_TICKS) -> None:
    """Label the rows with their layer numbers: every one up to 2·most − 1 layers, every k-th beyond
    (k = n // most)."""
    step = max(1, len(layers) // most)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=fontsize)


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


# the bars of every AUC comparison (baselines.png, the paper figure): what each bar is, by colour
BAR_COLOURS = {"probe": "#08519c", "probe within family": "#6baed6", "control": "#e6550d", "baseline": "#8c8c8c"}
BAR_NAMES = {"probe": "probe (chosen cell)", "probe within family": "probe within families",
             "control": "control", "baseline": "baseline"}


def draw_auc_bars(ax, bars: list[dict], *, level: dict | None = None, fontsize: float = 8, xlabel: str = "",
                  legend: str = "right") -> None:
    """Horizontal bars from chance (0.5) to each ``bars[i]["auc"]``, its 95% interval (``low``, ``high``;
    None: none) as whiskers, coloured by ``kind`` (``BAR_COLOURS``), with a legend of the kinds drawn;
    ``level`` (plot.control_level) draws the controls' bar as a dashed line. A bar without an AUC is the
    caller's to leave out (an empty bar would read as chance). The legend sits outside the bars, ``legend``
    ("right" or "below") of them."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    values = np.array([b["auc"] for b in bars], dtype=float)
    lows = np.array([np.nan if b.get("low") is None else b["low"] for b in bars], dtype=float)
    highs = np.array([np.nan if b.get("high") is None else b["high"] for b in bars], dtype=float)
    err = np.nan_to_num(np.abs(np.array([values - lows, highs - values])))
    ax.barh(range(len(bars)), values - 0.5, left=0.5, color=[BAR_COLOURS[b["kind"]] for b in bars],
            xerr=err, ecolor="#333333", capsize=2, error_kw={"linewidth": 0.8})
    ax.set_yticks(range(len(bars)), [b["label"] for b in bars], fontsize=fontsize)
    ax.tick_params(axis="x", labelsize=fontsize)
    ax.axvline(0.5, color="black", linewidth=0.8)
    handles = [Patch(color=BAR_COLOURS[k], label=BAR_NAMES[k]) for k in BAR_COLOURS if any(b["kind"] == k for b in bars)]
    if level is not None:
        ax.axvline(level["high"], color="black", linewidth=1.2, linestyle="--")
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"controls' bar ({level['high']:.2f})"))
    low = np.nanmin(np.concatenate([values, lows])) if len(values) else 0.5
    ax.set_xlim(min(0.3, low - 0.05), 1.0)
    ax.set_xlabel(xlabel, fontsize=fontsize)
    where = {"right": {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)},
             "below": {"loc": "upper center", "bbox_to_anchor": (0.5, -0.22)}}[legend]
    ax.legend(handles=handles, fontsize=fontsize - 1, frameon=False, **where)
