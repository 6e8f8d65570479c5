"""Reading and writing a run folder's files, one pair of functions per format (JSON, text, Parquet, CSV,
NumPy arrays), and the checked readers of the structured files (splits.json, activations/index.json).

Every writer goes through :func:`~.atomic.atomic_path`; every reader of a file inside an open run
checks it first (``run.verify``: listed in the manifest, with the checksum it has now), gives a one-line
TruthmapError for a missing, damaged or unreadable file, and never unpickles anything. ``run`` is the
open :class:`~.run.Run` holding the path, or None outside any (then nothing is verified).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import TruthmapError
from .atomic import atomic_path
from .names import ACTIVATIONS_INDEX
from .text import MAX_JSON_BYTES, MAX_JSON_BYTES_OF, dumps, parse_json, read_capped, safe_key, sanitise


def _verify(path: Path, run) -> None:
    if run is not None:
        run.verify(path)


# ---------------------------------------------------------------- writers

def write_json(path: Path, obj, run=None) -> None:
    """JSON that any parser reads: NaN and infinities are written as null."""
    with atomic_path(path, run) as tmp:
        tmp.write_text(dumps(obj) + "\n")


def write_text(path: Path, text: str, run=None) -> None:
    with atomic_path(path, run) as tmp:
        tmp.write_text(text)


def write_parquet(path: Path, frame: pd.DataFrame, run=None) -> None:
    with atomic_path(path, run) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(path: Path, frame: pd.DataFrame, run=None) -> None:
    """A CSV table, its text cells made safe to open in a spreadsheet (:func:`spreadsheet_safe`)."""
    with atomic_path(path, run) as tmp:
        spreadsheet_safe(frame).to_csv(tmp, index=False)


def write_npy(path: Path, array: np.ndarray, run=None) -> None:
    with atomic_path(path, run) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell (and column name) that a spreadsheet would run as a formula —
    one starting with ``= + - @``, a tab or a carriage return — prefixed with ``'`` (the OWASP advice
    on CSV injection). A plain number written as text (``-1``, ``+0.5``) is left as it is: a
    spreadsheet reads it as a number, never a formula."""
    def safe(value):
        if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(value):
            return "'" + value
        return value

    text = [c for c in frame.columns if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c])]
    columns = [safe(c) for c in frame.columns]
    if not text and columns == list(frame.columns):
        return frame
    frame = frame.copy()
    for c in text:
        frame[c] = frame[c].map(safe)
    frame.columns = columns
    return frame

# ---------------------------------------------------------------- readers

def read_json(path: Path, default=None, run=None):
    """A JSON file of a run (``default`` if it is missing); verified first (``run.verify``); strict
    (:func:`parse_json`) and at most MAX_JSON_BYTES."""
    path = Path(path)
    if not path.exists():
        if default is not None:
            return default
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    _verify(path, run)
    cap = MAX_JSON_BYTES_OF.get(path.name, MAX_JSON_BYTES)
    try:
        return parse_json(read_capped(path, cap))
    except ValueError as err:
        raise TruthmapError(f"{path}: {err}; delete it to recompute") from None

def read_json_object(path: Path, default=None, run=None) -> dict:
    """:func:`read_json` of a file that must hold an object (a mapping)."""
    value = read_json(path, default, run)
    if not isinstance(value, dict):
        raise TruthmapError(f"{path}: holds {type(value).__name__}, not an object; delete it to recompute")
    return value


def read_parquet(path: Path, run=None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    _verify(path, run)
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise TruthmapError(f"{path}: unreadable ({str(err).splitlines()[0]}); delete it to recompute") from None


def read_csv(path: Path, run=None, **options) -> pd.DataFrame:
    """A CSV table of a run, verified first; one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    _verify(path, run)
    try:
        return pd.read_csv(path, encoding="utf-8", **options)
    except UnicodeDecodeError as err:
        raise TruthmapError(f"{path}: not UTF-8 text (byte {err.start}); delete it to recompute") from None
    except Exception as err:  # pandas raises several types for a damaged file
        raise TruthmapError(f"{path}: unreadable ({sanitise(str(err).splitlines()[0] if str(err) else type(err).__name__)}); "
                            f"delete it to recompute") from None


def read_npy(path: Path, mmap_mode: str | None = None, run=None) -> np.ndarray:
    """An array of a run (never a pickle), verified first."""
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    _verify(path, run)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise TruthmapError(f"{path}: unreadable ({sanitise(str(err).splitlines()[0] if str(err) else type(err).__name__)}); "
                            f"delete it to recompute") from None


def read_splits(path: Path, run=None) -> dict:
    """splits.json, checked: ``{"seeds": {"<int>": {"train": [ids], "test": [ids]}}}``."""
    splits = read_json_object(path, run=run)
    seeds = splits.get("seeds")
    ok = isinstance(seeds, dict) and seeds and all(
        isinstance(seed, str) and seed.lstrip("-").isdigit() and isinstance(split, dict)
        and all(isinstance(split.get(part), list) and all(isinstance(i, str) for i in split[part])
                for part in ("train", "test"))
        for seed, split in seeds.items())
    if not ok:
        raise TruthmapError(f"{path}: not the splits the label stage writes ({{\"seeds\": {{\"0\": {{\"train\": [ids], "
                            f"\"test\": [ids]}}}}}}); delete it to recompute")
    return splits


def read_activations_index(run_dir: str | Path, default: dict | None = None, run=None) -> dict:
    """``activations/index.json`` (``default`` if it is missing), checked: every shard a plain file name
    inside ``activations/``, every list of the type the store writes (a one-line error for anything else)."""
    path = Path(run_dir) / ACTIVATIONS_INDEX
    if default is not None and not path.exists():
        return default
    meta = read_json(path, run=run)
    try:
        _check_index(meta)
    except (TypeError, KeyError, ValueError) as err:
        raise TruthmapError(f"{path}: not an index of the activations store ({err}); rerun 'truthmap extract'") from None
    return meta


def _check_index(meta) -> None:
    def texts(value, name):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"'{name}' is not a list of strings")

    if not isinstance(meta, dict):
        raise TypeError("not an object")
    texts(meta.get("ids"), "ids")
    texts(meta.get("positions"), "positions")
    if not isinstance(meta.get("sites"), dict):
        raise ValueError("'sites' is not an object")
    for site, entry in meta["sites"].items():
        if site not in ("residual", "mlp", "attention") or not isinstance(entry, dict):
            raise ValueError(f"unknown site {site!r}")
        layers, shards = entry.get("layers"), entry.get("shards")
        if not isinstance(layers, list) or not layers or not all(type(v) is int for v in layers):
            raise ValueError(f"site {site}: 'layers' is not a list of whole numbers")
        if not isinstance(shards, list):
            raise ValueError(f"site {site}: 'shards' is not a list")
        for shard in shards:
            if not isinstance(shard, dict) or not safe_key(shard.get("file")) or not shard["file"].startswith(site + "/"):
                raise ValueError(f"site {site}: a shard file is not a file of activations/{site}/")
            if not all(type(shard.get(k)) is int for k in ("start", "stop")):
                raise ValueError(f"site {site}: a shard's start or stop is not a whole number")
