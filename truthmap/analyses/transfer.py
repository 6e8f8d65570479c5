"""Transfer between tasks: a probe trained on one task, tested on others.

``truthmap transfer --train A --test B [C …] --layer L --position P`` takes run folders (or task names,
whose run folder for ``--model`` must exist). For every train task T and every task U (the train tasks
and the test tasks), and every seed both runs share, a :class:`~truthmap.analyses.detector.Detector` is fitted
on T's train split at (site, layer, position) and scored on U's test split — the same test split as
U's own probes, so the diagonal is the in-task AUC.

**Shared questions are left out.** Off the diagonal (two run folders), a test answer whose question the
train run also holds — the same normalised question text, or the same group key its task declares
(facts: the country, state or element asked about; splits.split_groups) — is left out of the test side:
the probe may have trained on it. ``n_shared`` counts them, and the command prints it. The bootstrap
draws groups of related test answers (splits.split_groups of the test run, as the probe stage's
cluster bootstrap does), not single answers. Writes, into ``--out``:

* ``transfer.csv`` — ``train, test, seed, auc, auc_lo, auc_hi, n_train, n_test, probe, n_test_groups,
  n_shared`` (cluster-bootstrap 95% interval over the test answers kept, each draw resampling whole
  groups with their labels; ``n_test`` answers in ``n_test_groups`` groups, ``n_shared`` left out);
* ``transfer_matrix.csv`` — rows: train task (with ``[probe]`` when both kinds were trained), columns: test
  task, mean AUC over seeds;
* ``transfer.png`` — that matrix as a heatmap, each cell with its interval (of the first seed), its n
  and the number of shared questions left out.

``--probe`` chooses what the probe learns on the train task: ``correctness`` (wrong vs right answers, the
default), ``entropy`` (high vs low semantic entropy, no gold label: the train run needs
``sampling_scores.parquet``, from ``--also samples`` or ``truthmap resample``; the threshold is the best
split on the train part, as in entropy.py) or ``both``. Every probe is tested on detecting wrong answers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfolder as rf
from ..errors import TruthmapError
from ..metrics import auc_score, group_bootstrap
from ..positions import check_cell

COLUMNS = ["train", "test", "seed", "auc", "auc_lo", "auc_hi", "n_train", "n_test", "probe", "n_test_groups",
           "n_shared"]
PROBES = ("correctness", "entropy")


def resolve_run(name: str, model: str | None = None) -> Path:
    """A run folder given as a path, or the default run folder of task ``name`` for ``model``."""
    from ..config import Config

    path = Path(name)
    if not (path / rf.ANSWERS).exists():
        candidate = Config(model=model, dataset=name).run_dir() if model else Config(dataset=name).run_dir()
        if not (candidate / rf.ANSWERS).exists():
            raise TruthmapError(f"'{name}': neither a run folder nor a task with a run at {candidate}; "
                                f"run 'truthmap run --dataset {name}' first, or give the run folder")
        path = candidate
    if not (path / rf.ACTIVATIONS_INDEX).exists():
        raise TruthmapError(f"{path}: no activations; run 'truthmap extract --out {path}' first")
    return path


def task_name(run: rf.Run) -> str:
    """The task an open run studied: its dataset's name (the folder name when the dataset is a path)."""
    dataset = run.read_json_object(rf.CONFIG, default={}).get("dataset") or run.root.name
    dataset = dataset if isinstance(dataset, str) else run.root.name
    return Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset


def check_same_model(runs: dict[Path, rf.Run]) -> str:
    """The model all the open ``runs`` (folder as given -> Run) studied; an error naming each if they differ."""
    models = {str(r): run.read_json_object(rf.CONFIG, default={}).get("model") for r, run in runs.items()}
    if len(set(models.values())) > 1:
        listing = ", ".join(f"{r}: {m}" for r, m in models.items())
        raise TruthmapError(f"transfer needs runs of one model; these differ ({listing})")
    return next(iter(models.values()))


def entropy_targets(run: rf.Run, ids, train_ids) -> np.ndarray:
    """1 = high semantic entropy, 0 = low, -1 = no samples, for ``ids`` of an open run, the threshold the
    best split of its ``train_ids`` (entropy.best_split_threshold)."""
    from .entropy import SAMPLING_SCORES, high_entropy_labels

    if not run.path(SAMPLING_SCORES).exists():
        raise TruthmapError(f"{run.root}: no {SAMPLING_SCORES} for an entropy-trained probe; run "
                            f"'truthmap run --also samples --out {run.root}' or 'truthmap resample {run.root}'")
    entropy = run.read_parquet(SAMPLING_SCORES).set_index("id")["semantic_entropy"].reindex(list(ids)).to_numpy(dtype=float)
    labels, _ = high_entropy_labels(entropy, np.isin(ids, list(train_ids))[None, :])
    return labels[0]


def question_keys(answers: pd.DataFrame) -> list[set]:
    """The keys that tie each answer's question to another run's: its normalised text and, where its task
    declares one, ``(task, group key)`` (the same rules as splits.split_groups)."""
    from .. import textmatch
    from ..tasks import REGISTRY

    tasks = answers["task"] if "task" in answers.columns else pd.Series("generic", index=answers.index)
    keys = []
    for answer_id, question, task in zip(answers["id"], answers["question"], tasks):
        own = {("question", textmatch.normalize(str(question)) or str(question))}
        declared = getattr(REGISTRY.get(task), "group", None)
        key = declared(str(answer_id), str(question)) if declared is not None else ""
        if key:
            own.add(("group", str(task), key))
        keys.append(own)
    return keys


def shared_with(test_answers: pd.DataFrame, train_answers: pd.DataFrame) -> np.ndarray:
    """``[len(test_answers)]`` bool: the test answer's question is also one of the train run's (any part)."""
    train_keys = set().union(*question_keys(train_answers)) if len(train_answers) else set()
    return np.array([bool(keys & train_keys) for keys in question_keys(test_answers)], dtype=bool)


def transfer_table(train_runs: list[Path], test_runs: list[Path], *, site: str, layer: int, position: str,
                   C: float = 1.0, n_boot: int = 1000, probes: tuple[str, ...] = ("correctness",)) -> pd.DataFrame:
    """One row per (probe kind, train task, test task, shared seed); see the module docstring.

    Every run is open for reading at once (a shared lock on each; one this process holds already is
    used as it is), and each file read is checked against its own run's manifest."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        held = {r: stack.enter_context(rf.Run.reading(r)) for r in dict.fromkeys(list(train_runs) + list(test_runs))}
        return _transfer_table(held, train_runs, site=site, layer=layer, position=position, C=C, n_boot=n_boot,
                               probes=probes)


def _transfer_table(held: dict[Path, rf.Run], train_runs: list[Path], *, site: str, layer: int, position: str,
                    C: float, n_boot: int, probes: tuple[str, ...]) -> pd.DataFrame:
    from .detector import Detector, cell_data
    from ..splits import split_groups

    runs = list(held)
    check_same_model(held)
    names = {r: task_name(held[r]) for r in runs}
    if len(set(names.values())) < len(runs):  # two runs of one task: tell them apart by folder
        names = {r: f"{names[r]} ({r.name})" for r in runs}
    data = {r: cell_data(r, site, layer, position) for r in runs}
    splits = {r: held[r].read_splits(rf.SPLITS)["seeds"] for r in runs}
    answers = {r: held[r].read_parquet(rf.ANSWERS).reset_index(drop=True) for r in runs}
    # a group number per answer of each run, over its whole answers table (the probe stage's groups)
    group_of = {r: dict(zip(answers[r]["id"], split_groups(answers[r]))) for r in runs}
    rows = []
    for kind, train_run in ((k, r) for k in probes for r in train_runs):
        ids, X, y_error = data[train_run]
        for test_run in runs:
            seeds = sorted(set(splits[train_run]) & set(splits[test_run]), key=int)
            if not seeds:
                raise TruthmapError(f"{train_run} and {test_run} share no split seed; rerun one with --seeds")
            test_ids_all, X_test_all, y_test_all = data[test_run]
            shared = np.zeros(len(test_ids_all), dtype=bool)
            if test_run != train_run:  # the probe may have trained on these questions
                table = answers[test_run].set_index("id").loc[list(test_ids_all)].reset_index()
                shared = shared_with(table, answers[train_run])
            for seed in seeds:
                train = np.isin(ids, splits[train_run][seed]["train"])
                y = y_error
                if kind == "entropy":  # no gold label in training: high vs low semantic entropy
                    y = entropy_targets(held[train_run], ids, splits[train_run][seed]["train"])
                    train &= y >= 0
                in_test = np.isin(test_ids_all, splits[test_run][seed]["test"])
                test = in_test & ~shared
                X_test, y_test = X_test_all[test], y_test_all[test]
                groups = pd.factorize(pd.Series([group_of[test_run][i] for i in np.asarray(test_ids_all)[test]],
                                                dtype="int64"))[0]
                counts = [int(train.sum()), int(test.sum()), kind, int(groups.max(initial=-1) + 1),
                          int((in_test & shared).sum())]
                if len(set(y[train].tolist())) < 2 or len(set(y_test.tolist())) < 2:
                    rows.append([names[train_run], names[test_run], int(seed), np.nan, np.nan, np.nan, *counts])
                    continue
                score = Detector(C=C).fit(X[train], y[train]).predict_proba(X_test)[:, 1]
                auc = float(auc_score(score, y_test))
                lo, hi = np.nanpercentile(auc_score(score, y_test, group_bootstrap(groups, n_boot, int(seed))),
                                          [2.5, 97.5])
                rows.append([names[train_run], names[test_run], int(seed), auc, float(lo), float(hi), *counts])
    return pd.DataFrame(rows, columns=COLUMNS)


def matrix(table: pd.DataFrame) -> pd.DataFrame:
    """Mean AUC over seeds: rows = train task, columns = test task, in the order they first appear."""
    if "probe" in table.columns and table["probe"].nunique() > 1:
        table = table.assign(train=table["train"] + " [" + table["probe"] + "]")
    out = table.groupby(["train", "test"], sort=False)["auc"].mean().unstack("test")
    return out.reindex(index=list(dict.fromkeys(table["train"])), columns=list(dict.fromkeys(table["test"])))


def plot_matrix(grid: pd.DataFrame, table: pd.DataFrame, path: Path, title: str) -> None:
    """The matrix as a heatmap; each cell shows its mean AUC over seeds, the first seed's 95%
    cluster-bootstrap interval, the test answers kept (n) and the shared questions left out."""
    from ..figures import draw_grid, new_figure, save

    values = grid.to_numpy(dtype=float)
    if "probe" in table.columns and table["probe"].nunique() > 1:
        table = table.assign(train=table["train"] + " [" + table["probe"] + "]")
    first = table[table["seed"] == table["seed"].min()].set_index(["train", "test"])
    fig, ax = new_figure(figsize=(2.2 + 1.6 * values.shape[1], 1.6 + 0.95 * values.shape[0]))
    image = draw_grid(ax, values, cmap="Blues", vmin=0.5, vmax=1.0, columns=grid.columns, column_rotation=30,
                      rows=grid.index, xlabel="test task", ylabel="train task", title=title)
    for (r, c), v in np.ndenumerate(values):
        key = (grid.index[r], grid.columns[c])
        cell = first.loc[key] if key in first.index else None
        lines = [f"{v:.2f}" if np.isfinite(v) else "n/a"]
        if cell is not None:
            if np.isfinite(cell["auc_lo"]):
                lines.append(f"{cell['auc_lo']:.2f}–{cell['auc_hi']:.2f}")
            lines.append(f"n {int(cell['n_test'])}" + (f"; {int(cell['n_shared'])} shared left out" if cell["n_shared"] else ""))
        ax.text(c, r, "\n".join(lines), ha="center", va="center", fontsize=7,
                color="white" if np.isfinite(v) and v > 0.8 else "black")
    seed = int(table["seed"].min()) if len(table) else 0
    ax.set_title(f"{title}\nmean AUC over seeds; 95% cluster-bootstrap interval and n of seed {seed}; "
                 f"questions the train run holds left out", fontsize=8)
    fig.colorbar(image, ax=ax, label="AUC predicting an error")
    save(fig, path)


def run_transfer(train: list[str], test: list[str], *, site: str, layer: int, position: str, out: str | None = None,
                 model: str | None = None, C: float = 1.0, n_boot: int = 1000,
                 probe: str = "correctness") -> tuple[Path, pd.DataFrame]:
    """Resolve the runs, compute the table and matrix, write them; return (out folder, matrix), the table of
    ``transfer.csv`` in the matrix's ``attrs["table"]``."""
    check_cell(site, layer, position, "--site/--layer/--position")
    if probe not in PROBES + ("both",):
        raise TruthmapError(f"--probe '{probe}': use correctness, entropy or both")
    train_runs = [resolve_run(t, model) for t in train]
    test_runs = [resolve_run(t, model) for t in test]
    out_dir = Path(out) if out else train_runs[0] / rf.TRANSFER
    for name in OUTPUTS:  # before any work: no link on the way, no file of someone else replaced
        rf.guard(out_dir / name, anchor=Path(os.path.abspath(out)).parent if out else None)  # --out: no link
    # each run read under its shared lock, every file checked against its own manifest (transfer_table)
    table = transfer_table(train_runs, test_runs, site=site, layer=layer, position=position, C=C, n_boot=n_boot,
                           probes=PROBES if probe == "both" else (probe,))
    grid = matrix(table)
    rf.write_csv(out_dir / OUTPUTS[0], table)
    rf.write_csv(out_dir / OUTPUTS[1], grid.reset_index().rename(columns={"train": "train \\ test"}))
    plot_matrix(grid, table, out_dir / OUTPUTS[2], f"transfer · {site} layer {layer} · {position}")
    grid.attrs["table"] = table
    return out_dir, grid


OUTPUTS = rf.TRANSFER_FILES
