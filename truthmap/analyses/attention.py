"""The attention view: a second heatmap with the probe heatmap's axes, read the other way.

The probe heatmap answers "where is the error decodable?"; a figure of the same shape can also be read
as "where does the model look?". ``truthmap run --also attention`` draws that second reading: each cell
(layer l, position p) is the attention weight that the last generated token pays to position p in the
attention of block l, averaged over heads and over the answers where p exists.

The weights come from the backend (``attention_weights``, truthmap/backends/base.py); the Hugging Face
backend switches the model to eager attention for the pass (the only implementation that returns
weights) and keeps one query row per sequence, so nothing of size tokens × tokens leaves a layer.

Reads ``answers.parquet`` (position indices) and ``generations.parquet``; writes ``attention.csv``
(``layer, position, attention, n``; layers 1..L) and ``attention.png`` / ``attention.svg`` (layer 0,
the embeddings, has no attention and stays grey).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..stages.base import Stage, StageRun, fields, register, short_model

ATTENTION, FIGURE = rf.ATTENTION, rf.ATTENTION_FIGURE  # the names: runfolder/names.py


def attention_table(lm, answers: pd.DataFrame, generations: pd.DataFrame, positions: list[str],
                    batch_size: int = 8) -> pd.DataFrame:
    """Mean attention from the last generated token to each position, per layer (see the module docstring)."""
    table = answers[["id"] + [f"pos_{p}" for p in positions]].merge(
        generations[["id", "prompt_ids", "answer_ids"]], on="id", validate="one_to_one")
    sequences = [list(p) + list(a) for p, a in zip(table.prompt_ids, table.answer_ids)]
    index = table[[f"pos_{p}" for p in positions]].to_numpy(dtype=np.int64)
    total = np.zeros((lm.n_layers, len(positions)))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        weights = lm.attention_weights([sequences[i] for i in batch], index[batch])  # [L, B, P]
        total += (weights * (index[batch] >= 0)[None]).sum(1)
    n = (index >= 0).sum(0)
    mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    layers = np.repeat(np.arange(1, lm.n_layers + 1), len(positions))
    return pd.DataFrame({"layer": layers, "position": positions * lm.n_layers, "attention": mean.ravel(),
                         "n": np.tile(n, lm.n_layers)})


def plot_attention(table: pd.DataFrame, positions: list[str], out_stem: Path, title: str) -> list[Path]:
    """Layers down (0..L, 0 empty), positions across, mean attention weight in purples."""
    from ..figures import draw_grid, new_figure, png_and_svg, save

    layers = list(range(0, int(table["layer"].max()) + 1))
    grid = table.pivot(index="layer", columns="position", values="attention").reindex(index=layers, columns=positions)
    values = grid.to_numpy(dtype=float)
    fig, ax = new_figure(figsize=(1.6 + 0.42 * len(positions), 1.8 + 0.2 * len(layers)))
    image = draw_grid(ax, values, cmap="Purples", vmin=0.0, vmax=max(float(np.nanmax(values)), 1e-6),
                      columns=positions, layers=layers, xlabel="token position (attended to)", ylabel="layer",
                      title=title)
    fig.colorbar(image, ax=ax, label="attention from the last generated token (mean over heads)")
    return save(fig, *png_and_svg(out_stem))


def run_attention(lm, run_dir: Path | rf.Run, *, positions: list[str], title: str = "",
                  batch_size: int = 8) -> pd.DataFrame:
    run = rf.at(run_dir)  # a folder or an open Run
    answers = run.read_parquet(rf.ANSWERS)
    generations = run.read_parquet(rf.GENERATIONS)
    table = attention_table(lm, answers, generations, positions, batch_size)
    run.write_csv(ATTENTION, table)
    plot_attention(table, positions, run.path(FIGURE), title or "attention of the last generated token")
    return table


# ---------------------------------------------------------------- the stage

def _attention(s: StageRun) -> None:
    title = f"{short_model(s.config.model)} · {s.config.dataset} · attention of the last generated token"
    run_attention(s.models.lm, s.run, positions=s.config.positions, title=title)


register(Stage(
    "attention", "4d", "The attention heatmap (attention.png); `run` draws it with --also attention.", _attention,
    inputs=(rf.ANSWERS, rf.GENERATIONS), outputs=(rf.ATTENTION, *rf.figures(rf.ATTENTION_FIGURE)),
    settings=fields("positions"), model="here", labelled=True, when=lambda c, run_dir: "attention" in c.also,
    optional=True, also=True))
