"""The run folder: the contract between stages, and with anyone who reads a run.

Every stage reads what the stages before it wrote here and nothing else. Files are written atomically
(a temporary file in the same folder, then a rename), so a killed run leaves whole files or none.
``stages.json`` records, for each finished stage, a fingerprint of its settings and inputs; a rerun
skips a stage whose fingerprint is unchanged and whose outputs are all present. The file list and
columns are documented in docs/run-folder.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import TruthmapError

QUESTIONS = "questions.parquet"
VOCABULARIES = "vocabularies.json"
GENERATIONS = "generations.parquet"
ANSWERS = "answers.parquet"
SPLITS = "splits.json"
ACTIVATIONS = "activations"
PROBE_RESULTS = "probe_results.csv"
PROBE_SCORES = "probe_scores.parquet"
SUMMARY = "summary.json"
CONFIG = "config.json"
STAGES = "stages.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; run files are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.exists():
        if default is not None:
            return default
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TruthmapError(f"{path}: not valid JSON (line {err.lineno}); delete it to recompute") from None


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise TruthmapError(f"{path}: unreadable ({str(err).splitlines()[0]}); delete it to recompute") from None


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fingerprint(settings: dict, inputs: list[Path]) -> str:
    """Hash of a stage's settings and the content of its input files."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=_json_default).encode())
    for path in inputs:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            if f.exists():
                with open(f, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        h.update(chunk)
    return h.hexdigest()


def stage_is_current(run_dir: Path, stage: str, print_: str, outputs: list[Path]) -> bool:
    done = read_json(Path(run_dir) / STAGES, default={})
    return done.get(stage, {}).get("fingerprint") == print_ and all(Path(p).exists() for p in outputs)


def mark_stage_done(run_dir: Path, stage: str, print_: str, seconds: float) -> None:
    path = Path(run_dir) / STAGES
    done = read_json(path, default={})
    done[stage] = {"fingerprint": print_, "seconds": round(seconds, 3)}
    write_json(path, done)


def update_summary(run_dir: Path, **fields) -> dict:
    path = Path(run_dir) / SUMMARY
    summary = read_json(path, default={})
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(summary.get(key), dict):
            summary[key].update(value)
        else:
            summary[key] = value
    write_json(path, summary)
    return summary
