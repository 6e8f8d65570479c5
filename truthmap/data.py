"""Questions in, one table out: any task of the registry (truthmap/tasks/), or the user's own table.

Every source becomes the same questions table (a DataFrame, one row per question):

    id (str, unique) · question (str) · gold (list[str], the accepted answers; empty in every row of a
    label-free study, whose source has no answer column)
    family (str) · subgroup (str) · answer_type (str, key into the vocabularies or "")
    task (str, the registry name that prompts and grades it) · context (str, a passage shown before
    the question, or "") · question_base (str, the question as a base model completes it, or "" for
    the same as ``question``) · wrong_answers (list[str], the competing options of a choice task)

plus a dict of vocabularies (answer_type -> candidate answers) used to find the exact answer of a wrong
answer. A bad row (empty question, missing gold, unparsable number, unknown label, duplicate id) raises
a TruthmapError naming the file, row and field, or with ``on_bad_row="skip"`` is left out and counted:
``table.attrs["source_rows"]`` says how many rows were read, used, skipped (and why) and left out by
the task's design, and the pipeline copies it into summary.json.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pandas as pd

from . import tasks
from .errors import TruthmapError, where

BUILTIN = "facts"
QUESTION_COLUMNS = ["id", "question", "gold", "family", "subgroup", "answer_type"]
TASK_COLUMNS = ["task", "context", "question_base", "wrong_answers"]
BAD_ROW_CHOICES = ("error", "skip")
MAX_EXAMPLES = 5  # bad rows quoted in summary.json


def load_questions(
    dataset: str = BUILTIN,
    limit: int | None = None,
    seed: int = 0,
    question_column: str = "question",
    answer_column: str | None = None,
    data_dir: str | None = None,
    on_bad_row: str = "error",
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Load ``dataset`` (a task name, ``TASK:SPLIT``, ``TASK:PATH``, a path or a hub id) as
    (questions table, vocabularies).

    ``limit`` keeps a deterministic sample of that many questions (shuffled with ``seed``, then the
    first ``limit`` taken, in source order). ``data_dir`` is where task files are looked up by name.
    """
    if on_bad_row not in BAD_ROW_CHOICES:
        raise TruthmapError(f"--on-bad-row '{on_bad_row}': use one of {', '.join(BAD_ROW_CHOICES)}")
    task, source = tasks.resolve(dataset, data_dir)
    if source.kind == "builtin":
        rows, vocabularies = task.builtin()
        report = {"source": str(source), "read": len(rows), "used": len(rows)}
    else:
        records, first_row = read_records(source)
        options = tasks.LoadOptions(question_column, answer_column)
        rows, report = convert_records(task, records, first_row, str(source), options, on_bad_row)
        vocabularies = {}
    table = pd.DataFrame([_complete(row, task.name) for row in rows], columns=QUESTION_COLUMNS + TASK_COLUMNS)
    if limit is not None:
        if limit < 1:
            raise TruthmapError(f"--limit {limit}: must be a positive number of questions")
        table = table.sample(frac=1.0, random_state=seed).head(limit).sort_index()
    table = table.reset_index(drop=True)
    if table.empty:
        raise TruthmapError(f"{source}: no questions to study")
    unlabelled = table["gold"].map(len) == 0
    if unlabelled.any() and not unlabelled.all():  # a study is graded throughout or not at all
        first = table.loc[unlabelled.idxmax(), "id"]
        raise TruthmapError(f"{source}: question id '{first}' has no answer while others have one; give every "
                            f"row an answer, or none (a label-free study)")
    table.attrs["source_rows"] = report
    return table, vocabularies


def _complete(row: dict, task: str) -> dict:
    """A question row with every column, defaults filled in."""
    defaults = {"family": task, "subgroup": "", "answer_type": "", "task": task, "context": "",
                "question_base": "", "wrong_answers": []}
    return {**defaults, **{k: v for k, v in row.items() if v is not None}}


def convert_records(task, records: list[dict], first_row: int, source: str, options, on_bad_row: str = "error"):
    """(question rows, report): each record through ``task.convert``, bad rows raised or skipped.

    Rows are numbered as a user sees them (``first_row`` is the number of the first record: 2 for a
    CSV, whose header is row 1). Ids missing from the source are the record's 0-based position.
    """
    rows, seen = [], {}
    bad, examples, left_out = Counter(), [], Counter()
    for i, record in enumerate(records):
        row_number = i + first_row
        try:
            row = task.convert(record, options)
            row["id"] = row.get("id") or str(i)
            if row["id"] in seen:
                raise tasks.BadRow("id", f"duplicate id '{row['id']}' (first at row {seen[row['id']]})")
        except tasks.MissingField as err:
            if i == 0:
                columns = list(record) if isinstance(record, dict) else type(record).__name__
                raise TruthmapError(
                    f"{source}: missing column '{err.field}' (columns: {columns})"
                    + (f"; {err.hint}" if err.hint else f"; is this a file of the '{task.name}' task?")
                ) from None
            bad_row = (err.field, f"missing field '{err.field}'")
        except tasks.BadRow as err:
            bad_row = (err.field, err.message)
        except tasks.LeftOut as err:
            left_out[err.reason] += 1
            continue
        else:
            seen[row["id"]] = row_number
            rows.append(row)
            continue
        message = f"{where(source, row_number, bad_row[0])}: {bad_row[1]}"
        if on_bad_row == "error":
            raise TruthmapError(
                f"{message}; fix the row, or pass --on-bad-row skip to leave such rows out (counted in summary.json)"
            )
        bad[bad_row[1] if bad_row[0] is None else f"{bad_row[0]}: {bad_row[1]}"] += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)
    report = {"source": source, "read": len(records), "used": len(rows), "skipped_bad": sum(bad.values())}
    if bad:
        report["skipped_reasons"] = dict(bad.most_common())
        report["skipped_examples"] = examples
    if left_out:
        report["left_out"] = dict(left_out.most_common())
    return rows, report


def read_records(source: tasks.Source) -> tuple[list[dict], int]:
    """(records as plain dicts, number of the first record as a user counts rows) of a file or hub dataset.

    The records are a list, or for a hub dataset a sequence with ``len`` that reads them as they are used."""
    if source.kind == "hub":
        return _load_hf(source), 1
    path = source.path
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
            _check_csv_header(path)
            return frame.to_dict("records"), 2
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path), 1
        if suffix == ".json":
            return _read_json(path), 1
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), 1
    except UnicodeDecodeError as err:
        raise TruthmapError(f"{path}: not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise TruthmapError(f"{path}: the file is empty") from None
    except (ValueError, pd.errors.ParserError, OSError) as err:
        raise TruthmapError(f"{path}: could not be read as {suffix[1:]} ({str(err).splitlines()[0]})") from None
    raise TruthmapError(f"{path}: unknown file type '{suffix}'; use .csv, .jsonl, .json or .parquet")


def _check_csv_header(path: Path) -> None:
    """Refuse a header that names a column twice (pandas would silently rename one 'name.1')."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
    except csv.Error:  # a header pandas could read and csv cannot (say, over csv's field size limit)
        return
    seen, dupes = set(), []
    for name in header:
        if name in seen and name not in dupes:
            dupes.append(name)
        seen.add(name)
    if dupes:
        raise TruthmapError(f"{path}: duplicate column(s) {dupes} in the header; rename or remove one of each")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict, refusing one that holds a key twice (json would keep the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_unique_keys)
            except _DuplicateKey as err:
                raise TruthmapError(f"{path}, line {number}: key '{err}' twice in one record; keep one") from None
            except json.JSONDecodeError as err:
                raise TruthmapError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise TruthmapError(f"{path}, line {number}: {_kind(record)}, not a record ({{\"question\": …}})")
            records.append(record)
    if not records:
        raise TruthmapError(f"{path}: the file is empty")
    return records


def _read_json(path: Path) -> list[dict]:
    """A JSON list of records, or an object holding one under "Data" (TriviaQA) or "data"."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise TruthmapError(f"{path}: key '{err}' twice in one record; keep one") from None
    except json.JSONDecodeError as err:
        raise TruthmapError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(content, dict):
        content = next((content[k] for k in ("Data", "data") if isinstance(content.get(k), list)), content)
    if not isinstance(content, list):
        raise TruthmapError(f"{path}: expected a list of records (or an object with a 'Data' list)")
    for number, record in enumerate(content, start=1):
        if not isinstance(record, dict):
            raise TruthmapError(f"{path}, record {number}: {_kind(record)}, not a record ({{\"question\": …}})")
    return content


def _kind(value) -> str:
    names = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _load_hf(source: tasks.Source):
    """A Hugging Face dataset split: a sized sequence of records, read one at a time (a split of Natural
    Questions holds gigabytes of HTML). Needs network or a cache; honours HF_DATASETS_OFFLINE."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise TruthmapError("loading a hub dataset needs the 'datasets' package") from None
    try:
        return datasets.load_dataset(source.hub_id, source.config, split=source.split)
    except Exception as err:  # datasets raises many types; the user needs one line
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise TruthmapError(
            f"dataset '{source}': not a local file and could not be loaded from the hub "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            + ("; offline mode is set" if offline else "")
            + "; pass a local copy with --dataset TASK:PATH (or a path)"
        ) from None
