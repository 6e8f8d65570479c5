"""Questions in, one table out: the built-in facts set, or the user's CSV / JSONL / Parquet / HF dataset.

Every source becomes the same questions table (a DataFrame, one row per question):

    id (str, unique) · question (str) · gold (list[str], the accepted answers, non-empty)
    family (str) · subgroup (str) · answer_type (str, key into the vocabularies or "")

plus a dict of vocabularies (answer_type -> candidate answers) used to find the exact answer of a wrong
answer. Bad rows raise a TruthmapError naming the file, row and field.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from .errors import TruthmapError, where

BUILTIN = "facts"
QUESTION_COLUMNS = ["id", "question", "gold", "family", "subgroup", "answer_type"]


def load_questions(
    dataset: str = BUILTIN,
    limit: int | None = None,
    seed: int = 0,
    question_column: str = "question",
    answer_column: str | None = None,
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Load ``dataset`` as (questions table, vocabularies).

    ``limit`` keeps a deterministic sample of that many questions, spread over families (shuffled with
    ``seed``, then the first ``limit`` taken), so ``--limit 50`` still sees every family.
    """
    if dataset == BUILTIN:
        from .facts import build_facts

        rows, vocabularies = build_facts(seed=0)
        table = pd.DataFrame(rows, columns=QUESTION_COLUMNS)
        source = "built-in facts"
    else:
        table, vocabularies = _load_table(dataset, question_column, answer_column), {}
        source = dataset
    if limit is not None:
        if limit < 1:
            raise TruthmapError(f"--limit {limit}: must be a positive number of questions")
        table = table.sample(frac=1.0, random_state=seed).head(limit).sort_index()
    table = table.reset_index(drop=True)
    if table.empty:
        raise TruthmapError(f"{source}: no questions to study")
    return table, vocabularies


def _read_any(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            return pd.read_json(path, dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise TruthmapError(f"{path}: not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise TruthmapError(f"{path}: the file is empty") from None
    except (ValueError, pd.errors.ParserError, OSError) as err:
        raise TruthmapError(f"{path}: could not be read as {suffix[1:]} ({str(err).splitlines()[0]})") from None
    raise TruthmapError(f"{path}: unknown file type '{suffix}'; use .csv, .jsonl, .json or .parquet")


def _load_hf(dataset_id: str) -> pd.DataFrame:
    """A Hugging Face dataset id, optionally 'id:split' or 'id:config:split' (needs network or a cache)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise TruthmapError("loading a hub dataset needs the 'datasets' package") from None
    parts = dataset_id.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1] if len(parts) > 1 else "train"
    try:
        return datasets.load_dataset(name, config, split=split).to_pandas()
    except Exception as err:  # datasets raises many types; the user needs one line
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise TruthmapError(
            f"dataset '{dataset_id}': not a local file and could not be loaded from the hub "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            + ("; offline mode is set" if offline else "")
        ) from None


def _as_gold(value, path, row, field) -> list[str]:
    """A gold cell as a non-empty list of strings: a list, a JSON list in a string, or one string."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        value = [str(value)]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise TruthmapError(f"{where(path, row, field)}: expected text or a list of texts, got {type(value).__name__}")
    gold = [str(v).strip() for v in value if str(v).strip()]
    if not gold:
        raise TruthmapError(f"{where(path, row, field)}: empty gold answer")
    return gold


def _load_table(dataset: str, question_column: str, answer_column: str | None) -> pd.DataFrame:
    path = Path(dataset).expanduser()
    frame = _read_any(path) if path.exists() else _load_hf(dataset)
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise TruthmapError(f"{dataset}: duplicate column(s) {dupes}")
    if answer_column is None:
        answer_column = next((c for c in ("answers", "answer", "gold") if c in frame.columns), "answer")
    for column in (question_column, answer_column):
        if column not in frame.columns:
            raise TruthmapError(
                f"{dataset}: missing column '{column}' (columns: {list(frame.columns)}); "
                f"name the right one with --question-column / --answer-column"
            )
    rows = []
    ids = frame["id"].astype(str).tolist() if "id" in frame.columns else [str(i) for i in range(len(frame))]
    seen = {}
    # rows are numbered as a user sees them: CSV rows count the header as row 1
    first_row = 2 if path.suffix.lower() == ".csv" else 1
    for i, (question, gold) in enumerate(zip(frame[question_column], frame[answer_column])):
        row = i + first_row
        if not isinstance(question, str):
            raise TruthmapError(f"{where(dataset, row, question_column)}: expected text, got {type(question).__name__}")
        if not question.strip():
            raise TruthmapError(f"{where(dataset, row, question_column)}: empty question")
        if ids[i] in seen:
            raise TruthmapError(f"{where(dataset, row, 'id')}: duplicate id '{ids[i]}' (first at row {seen[ids[i]]})")
        seen[ids[i]] = row
        family = str(frame["family"].iloc[i]) if "family" in frame.columns else "all"
        rows.append([ids[i], question.strip(), _as_gold(gold, dataset, row, answer_column), family, "", ""])
    return pd.DataFrame(rows, columns=QUESTION_COLUMNS)
