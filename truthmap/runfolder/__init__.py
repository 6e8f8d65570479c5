"""The run folder: the contract between stages, and with anyone who reads a run.

Every stage reads what the stages before it wrote here and nothing else. The file list and columns are
documented in docs/run-folder.md; what survives a crash is in docs/guarantees.md. The package, by job:

* ``names``    — the file-name catalogue (``ANSWERS``, ``figures()``, what truthmap writes at the top);
* ``text``     — strict JSON (``parse_json``, ``dumps``), the size caps of JSON files, ``sanitise``;
* ``disk``     — temporary files, fsync, checksums, the inside-the-folder check;
* ``lock``     — the folder's lock (one writer, or shared readers; the kernel drops it when its holder dies);
* ``manifest`` — ``manifest.json`` (every file with size, SHA-256 and stage; checked when a run opens),
  and the outputs list kept beside files written outside a run folder;
* ``atomic``   — the atomic write (temporary file, then rename) and the guard of every write (no link
  followed, no file of someone else replaced);
* ``files``    — the readers and writers of each format, each read verified against the manifest;
* ``run``      — :class:`Run`, an open run folder: ``Run.open(run_dir)``, ``run.read_parquet(ANSWERS)``,
  ``with run.stage(name, fingerprint=…)``, ``run.fingerprint(…)``, ``run.update_summary(…)``.

Crash safety rests on three rules: every file is written atomically; every file is listed in
``manifest.json``, and a file that is not listed is never trusted; ``stages.json`` records each finished
stage's fingerprint (settings and inputs' checksums), so a rerun skips a stage that is current.

The module-level functions below are the same operations for callers that hold a path rather than a
Run: each finds the open run whose folder holds the path (:func:`run_of`) and acts through it (outside
any open run a file is written with the guard and the outputs list, and read unverified).
``open_run``/``reading`` open a Run for a ``with`` block.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import TruthmapError
from . import atomic, files
from .atomic import overwriting
from .disk import child
from .manifest import MAX_MANIFEST_BYTES, MAX_OUTPUTS_LIST_BYTES, OUTPUTS_LIST, check_run_folder
from .names import (ACTIVATIONS, ACTIVATIONS_FINGERPRINT, ACTIVATIONS_INDEX, ACTIVATIONS_VALID, ANSWERS,
                    ATTENTION, ATTENTION_FIGURE, BASELINE_RESULTS, BASELINE_SCORES, BASELINES_FIGURE, CELL_NULL,
                    CHOICE, CHOICE_ANSWERS, CHOICE_FIGURE, CHUNK_PLAN, CONFIG, COST, COST_FIGURE, DETECTORS,
                    ENTROPY_FIGURE, ENTROPY_RESULTS, ENTROPY_SCORES, ERROR_TYPE_RESULTS, ERROR_TYPES,
                    ERROR_TYPES_FIGURE, FAMILY_RESULTS, FIGURE_SUFFIXES, GENERATION_CHUNKS, GENERATIONS, HEATMAP,
                    HEATMAP_WITHIN, HEATMAPS, LOCK, MANIFEST, OWN_NAMES, PROBE_RESULTS, PROBE_SCORES, QUESTIONS,
                    REPORT, RESAMPLES, SAMPLING_SCORES, SPLITS, STAGES, SUMMARY, TRANSFER, TRANSFER_FILES,
                    VOCABULARIES, WHOLEMAP_RESULTS, WHOLEMAP_SCORES, figures)
from .run import Run, _merge, innermost, open_runs, run_of
from .run import fingerprint as _fingerprint
from .run import ChunkStore as _ChunkStore
from .text import (MAX_JSON_BYTES, MAX_JSON_BYTES_OF, MAX_JSON_DEPTH, dumps, finite, parse_json, read_capped,
                   safe_key, sanitise)
from .files import spreadsheet_safe

# ---------------------------------------------------------------- opening a run for a block


@contextmanager
def open_run(run_dir: Path):
    """``Run.open(run_dir)`` for the block; yields the notices (one line per file found missing or
    damaged, deleted and to be recomputed)."""
    with Run.open(run_dir) as run:
        yield run.notices


@contextmanager
def reading(run_dir: Path):
    """Read ``run_dir`` under a shared lock for the block (``Run.open(run_dir, write=False)``), every file
    checked against the manifest as it is read. Nothing more to do when this process already holds the
    folder, for writing or reading."""
    with Run.reading(run_dir):
        yield


def at(run_dir: str | Path | Run) -> Run | Folder:
    """What a function given "a run folder" reads and writes through: an open Run as it is; for a path,
    the Run this process holds for that folder, else a :class:`Folder` (the same methods, acting as the
    module-level functions do outside an open run). So a public function taking ``run_dir`` (``run_probe``,
    ``finish_baselines``, …) takes a Run too, and its body is written once, against Run's methods."""
    if isinstance(run_dir, (Run, Folder)):
        return run_dir
    root = Path(os.path.abspath(run_dir))
    return next((run for run in open_runs() if run.root == root), None) or Folder(root)


class Folder:
    """A run folder this process does not hold open, with the reading and writing methods of :class:`Run`:
    each acts as the module-level function of the same name (a file inside another open run goes through
    that run; elsewhere written with the guard and the outputs list, and read unverified)."""

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))

    def __repr__(self) -> str:
        return f"Folder({str(self.root)!r})"

    def path(self, name: str | Path) -> Path:
        """As :meth:`Run.path`: a relative name, or a path inside the folder (no other is followed)."""
        if Path(name).is_absolute():
            path = Path(os.path.abspath(name))
            if path != self.root and self.root not in path.parents:
                raise TruthmapError(f"{name}: not inside the run folder {self.root}")
            return path
        return child(self.root, Path(name).as_posix(), "file")

    def trusted(self, name) -> bool:
        return trusted(self.path(name))

    def read_json(self, name, default=None):
        return read_json(self.path(name), default)

    def read_json_object(self, name, default=None) -> dict:
        return read_json_object(self.path(name), default)

    def read_parquet(self, name) -> pd.DataFrame:
        return read_parquet(self.path(name))

    def read_csv(self, name, **options) -> pd.DataFrame:
        return read_csv(self.path(name), **options)

    def read_npy(self, name, mmap_mode: str | None = None) -> np.ndarray:
        return read_npy(self.path(name), mmap_mode)

    def read_splits(self, name=SPLITS) -> dict:
        return read_splits(self.path(name))

    def read_activations_index(self, default: dict | None = None) -> dict:
        return read_activations_index(self.root, default)

    def atomic_path(self, name):
        return atomic_path(self.path(name))

    def write_json(self, name, obj) -> None:
        write_json(self.path(name), obj)

    def write_text(self, name, text: str) -> None:
        write_text(self.path(name), text)

    def write_parquet(self, name, frame: pd.DataFrame) -> None:
        write_parquet(self.path(name), frame)

    def write_csv(self, name, frame: pd.DataFrame) -> None:
        write_csv(self.path(name), frame)

    def write_npy(self, name, array: np.ndarray) -> None:
        write_npy(self.path(name), array)

    def remove(self, name) -> None:
        remove(self.path(name))

    def update_summary(self, **fields) -> dict:
        return update_summary(self.root, **fields)


# ---------------------------------------------------------------- the same operations, given a path

def atomic_path(path: Path):
    return atomic.atomic_path(path, run_of(path))


def guard(path: Path, make_folders: bool = False, anchor: Path | None = None) -> Path:
    return atomic.guard(path, make_folders, anchor, run=run_of(path))


def free_name(path: Path) -> Path:
    return atomic.free_name(path, run=run_of(path))


def write_json(path: Path, obj) -> None:
    files.write_json(path, obj, run=run_of(path))


def write_text(path: Path, text: str) -> None:
    files.write_text(path, text, run=run_of(path))


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    files.write_parquet(path, frame, run=run_of(path))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    files.write_csv(path, frame, run=run_of(path))


def write_npy(path: Path, array: np.ndarray) -> None:
    files.write_npy(path, array, run=run_of(path))


def read_json(path: Path, default=None):
    return files.read_json(path, default, run=run_of(path))


def read_json_object(path: Path, default=None) -> dict:
    return files.read_json_object(path, default, run=run_of(path))


def read_parquet(path: Path) -> pd.DataFrame:
    return files.read_parquet(path, run=run_of(path))


def read_csv(path: Path, **options) -> pd.DataFrame:
    return files.read_csv(path, run=run_of(path), **options)


def read_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    return files.read_npy(path, mmap_mode, run=run_of(path))


def read_splits(path: Path) -> dict:
    return files.read_splits(path, run=run_of(path))


def read_activations_index(run_dir: str | Path, default: dict | None = None) -> dict:
    return files.read_activations_index(run_dir, default, run=run_of(Path(run_dir) / ACTIVATIONS_INDEX))


def trusted(path: Path) -> bool:
    """Whether ``path`` may be read: listed in the manifest of the open run holding it. Outside an open
    run, whether it exists."""
    run = run_of(path)
    return run.trusted(Path(os.path.abspath(path))) if run is not None else Path(path).exists()


def verify(path: Path) -> None:
    """Before reading ``path``: checked against the manifest of the open run holding it (:meth:`Run.verify`)."""
    run = run_of(path)
    if run is not None:
        run.verify(Path(os.path.abspath(path)))


def remove(path: Path) -> None:
    """:meth:`Run.remove` in the open run holding ``path``; outside an open run nothing is deleted."""
    run = run_of(path)
    if run is not None and run.writable:
        run.remove(Path(os.path.abspath(path)))


@contextmanager
def stage(name: str, rerun: bool = False):
    """:meth:`Run.stage` of the run this process opened last for writing (nothing outside one)."""
    run = innermost()
    if run is None:
        yield
        return
    with run.stage(name, rerun):
        yield


def fingerprint(settings: dict, inputs: list[Path]) -> str:
    """A stage's fingerprint (:func:`run.fingerprint`): each input's checksums from the manifest of the
    open run holding it, a file outside every open run read."""
    return _fingerprint(settings, inputs, run_of)


def _writer(run_dir: Path) -> Run | None:
    run = run_of(Path(run_dir) / SUMMARY)
    return run if run is not None and run.writable else None


def stage_is_current(run_dir: Path, stage: str, fingerprint: str, outputs: list[Path]) -> bool:
    run = _writer(run_dir)
    if run is None:
        return False  # outside an open run nothing is vouched for
    return run.is_current(stage, fingerprint, [Path(os.path.abspath(p)) for p in outputs])


def forget_stage(run_dir: Path, stage: str) -> None:
    _open_writer(run_dir).forget(stage)


def mark_stage_done(run_dir: Path, stage: str, fingerprint: str, seconds: float) -> None:
    _open_writer(run_dir).mark_done(stage, fingerprint, seconds)


def update_summary(run_dir: Path, **fields) -> dict:
    """:meth:`Run.update_summary` of the open run ``run_dir``; outside one, summary.json merged and
    written as a plain file."""
    run = _writer(run_dir)
    if run is not None:
        return run.update_summary(**fields)
    path = Path(run_dir) / SUMMARY
    try:
        summary = files.read_json(path, default={})
    except TruthmapError:
        summary = {}
    summary = summary if isinstance(summary, dict) else {}
    _merge(summary, fields)
    files.write_json(path, summary)
    return summary


def _open_writer(run_dir: Path) -> Run:
    run = _writer(run_dir)
    if run is None:
        raise TruthmapError(f"{run_dir}: not open for writing in this process; stages.json is written only "
                            f"inside a run (Run.open)")
    return run


class ChunkStore(_ChunkStore):
    """:class:`run.ChunkStore` of the open run holding ``folder``."""

    def __init__(self, folder: Path, key: str):
        super().__init__(folder, key, run=run_of(folder))
