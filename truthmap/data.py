"""Questions in, one table out: any task of the registry (truthmap/tasks/), or the user's own table.

Every source becomes the same questions table (a DataFrame, one row per question):

    id (str, unique) · question (str) · gold (list[str], the accepted answers; empty in every row of a
    label-free study, whose source has no answer column)
    family (str) · subgroup (str) · answer_type (str, key into the vocabularies or "")
    task (str, the registry name that prompts and grades it) · context (str, a passage shown before
    the question, or "") · question_base (str, the question as a base model completes it, e.g.
    WinoBias's "The pronoun 'he' refers to the", or "" for the same as ``question``) · wrong_answers
    (list[str], the competing options of a choice task)

plus a dict of vocabularies (answer_type -> candidate answers) used to find the exact answer of a wrong
answer. A bad row (empty question, missing gold, unparsable number, unknown label, duplicate id) raises
a TruthmapError naming the file, row and field, or with ``on_bad_row="skip"`` is left out and counted:
``table.attrs["source_rows"]`` says how many rows were read, used, skipped (and why) and left out by
the task's design, and the pipeline copies it into summary.json.
"""

from __future__ import annotations

import csv
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
    protocol: str = tasks.PROTOCOLS[0],
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Load ``dataset`` (a task name, ``TASK:SPLIT``, ``TASK:PATH``, a path or a hub id) as
    (questions table, vocabularies).

    ``limit`` keeps a deterministic sample of that many questions (shuffled with ``seed``, then the
    first ``limit`` taken, in source order). ``data_dir`` is where task files are looked up by name.
    ``protocol`` (brief or reference) decides the context a task shows where the two differ (HotpotQA).
    """
    if on_bad_row not in BAD_ROW_CHOICES:
        raise TruthmapError(f"--on-bad-row '{on_bad_row}': use one of {', '.join(BAD_ROW_CHOICES)}")
    tasks.check_protocol(protocol)
    task, source = tasks.resolve(dataset, data_dir)
    if source.kind == "builtin":
        rows, vocabularies = task.builtin()
        report = {"source": str(source), "read": len(rows), "used": len(rows)}
    elif limit is not None and limit < 1:
        raise TruthmapError(f"--limit {limit}: must be a positive number of questions")
    else:
        _check_whole_size(source, limit)
        options = tasks.LoadOptions(question_column, answer_column, protocol)
        keep = None
        records, first_row = read_records(source)
        if limit is not None:  # a first pass counts the rows and keeps none: memory holds only the sample
            _, counted = convert_records(task, records, first_row, str(source), options, on_bad_row, keep=set())
            keep = set(sample_positions(counted["used"], limit, seed))
            if source.kind != "hub":  # a file is read again; a hub dataset is a sequence, read as it is used
                records, first_row = read_records(source)
        rows, report = convert_records(task, records, first_row, str(source), options, on_bad_row, keep=keep)
        vocabularies = {}
    table = pd.DataFrame([_complete(row, task.name) for row in rows], columns=QUESTION_COLUMNS + TASK_COLUMNS)
    if limit is not None:
        if limit < 1:
            raise TruthmapError(f"--limit {limit}: must be a positive number of questions")
        if source.kind == "builtin":
            table = table.iloc[sorted(sample_positions(len(table), limit, seed))]
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


def sample_positions(n: int, limit: int, seed: int) -> list[int]:
    """Positions (0..n-1) of the deterministic sample of ``limit`` rows out of ``n``: those of a seeded
    shuffle (pandas' ``sample(frac=1, random_state=seed)``), the first ``limit`` taken."""
    return pd.RangeIndex(n).to_series().sample(frac=1.0, random_state=seed).head(limit).tolist()


def _check_whole_size(source, limit: int | None) -> None:
    """Without --limit every question is kept in memory (about 10 bytes per byte of CSV): refuse a file
    over MAX_WHOLE_FILE_BYTES before reading it; with --limit the file is streamed (MAX_FILE_BYTES)."""
    if limit is not None or source.kind != "file":
        return
    try:
        size = source.path.stat().st_size
    except OSError:
        return  # read_records names the problem
    if size > MAX_WHOLE_FILE_BYTES:
        raise TruthmapError(f"{source.path}: {size / 2**20:.0f} MiB, more than the {MAX_WHOLE_FILE_BYTES // 2**20} MiB "
                            f"studied whole (docs/guarantees.md); give --limit N to study a sample (the file is then "
                            f"streamed), or split it")


MAX_WHOLE_FILE_BYTES = 256 * 2**20  # without --limit every question is held: about 10x the file in memory
MAX_FIELD_CHARS = 10_000_000  # a longer field is a bad row: no prompt could hold it
MAX_FILE_BYTES = 2 * 2**30  # a larger question file is refused before it is read (docs/guarantees.md)
MAX_LINE_BYTES = 4 * MAX_FIELD_CHARS  # a JSONL line is read in pieces of at most this many bytes


def _long_field(record, path: str = "") -> tuple[str, int] | None:
    """(field, length) of the first text in ``record`` longer than MAX_FIELD_CHARS, else None."""
    if isinstance(record, str):
        return (path or "value", len(record)) if len(record) > MAX_FIELD_CHARS else None
    items = record.items() if isinstance(record, dict) else enumerate(record) if isinstance(record, list) else ()
    for key, value in items:
        found = _long_field(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _complete(row: dict, task: str) -> dict:
    """A question row with every column, defaults filled in."""
    defaults = {"family": task, "subgroup": "", "answer_type": "", "task": task, "context": "",
                "question_base": "", "wrong_answers": []}
    return {**defaults, **{k: v for k, v in row.items() if v is not None}}


def convert_records(task, records, first_row: int, source: str, options, on_bad_row: str = "error",
                    keep: set | None = None):
    """(question rows, report): each record (of any iterable) through ``task.convert``, bad rows raised or
    skipped. ``keep``: the positions among the good rows to keep (None: all), so that a sample never holds
    the rest.

    Rows are numbered as a user sees them (``first_row`` is the number of the first record: 2 for a
    CSV, whose header is row 1). Ids missing from the source are the record's 0-based position.
    """
    rows, seen, used = [], {}, 0
    bad, examples, left_out = Counter(), [], Counter()
    matched = {}  # the source's column names -> the names the task asks for (see match_columns)
    i = -1
    for i, record in enumerate(records):
        row_number = i + first_row
        if task.name == "generic" and isinstance(record, dict):
            names = tuple(record)
            if names not in matched:
                matched[names] = match_columns(names, options, source)
            if matched[names]:
                record = {matched[names].get(k, k): v for k, v in record.items()}
        try:
            if isinstance(record, _TooLong):
                raise tasks.BadRow(None, f"a line of more than {MAX_LINE_BYTES} bytes, longer than any question")
            long = _long_field(record)
            if long:
                raise tasks.BadRow(long[0], f"{long[1]} characters, more than the {MAX_FIELD_CHARS} a field may hold")
            row = task.convert(record, options)
            _check_row_text(row)
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
        except (RecursionError, MemoryError):
            bad_row = (None, "nested too deeply to read")
        except tasks.LeftOut as err:
            left_out[err.reason] += 1
            continue
        else:
            seen[row["id"]] = row_number
            if keep is None or used in keep:
                rows.append(row)
            used += 1
            continue
        message = f"{where(source, row_number, bad_row[0])}: {bad_row[1]}"
        if on_bad_row == "error":
            raise TruthmapError(
                f"{message}; fix the row, or pass --on-bad-row skip to leave such rows out (counted in summary.json)"
            )
        bad[bad_row[1] if bad_row[0] is None else f"{bad_row[0]}: {bad_row[1]}"] += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)
    report = {"source": source, "read": i + 1, "used": used, "skipped_bad": sum(bad.values())}
    if bad:
        report["skipped_reasons"] = dict(bad.most_common())
        report["skipped_examples"] = examples
    if left_out:
        report["left_out"] = dict(left_out.most_common())
    return rows, report


def match_columns(columns: tuple, options, source: str) -> dict[str, str]:
    """{column of the source: the name it stands for} for the columns of a table of questions (the generic
    task) that match ignoring case: ``question,Answer`` is read as question and answer. A name matched by
    two columns (``Answer`` and ``answer``) is refused in one line; an exact name needs no renaming.

    The names asked for: ``question_column``, ``answer_column`` (default: answers, answer, gold), id, family."""
    from .tasks.generic import ANSWER_COLUMNS

    wanted = [options.question_column, *([options.answer_column] if options.answer_column else ANSWER_COLUMNS),
              "id", "family"]
    by_fold = {}
    for column in columns:
        if isinstance(column, str):
            by_fold.setdefault(column.casefold(), []).append(column)
    renamed = {}
    for name in wanted:
        if "." in name:  # a nested field (a.b) is named exactly
            continue
        found = by_fold.get(name.casefold(), [])
        if len(found) > 1:
            flag = "--answer-column" if name != options.question_column else "--question-column"
            raise TruthmapError(f"{source}: columns {', '.join(repr(c) for c in found)} all match '{name}' "
                                f"(names are matched ignoring case); rename all but one, or name another with {flag}")
        if found and found[0] != name and name not in columns:
            renamed[found[0]] = name
    return renamed


def _check_row_text(row: dict) -> None:
    """Every text of a question row must be writable as UTF-8: a lone surrogate ("\\ud800") is not text."""
    for name, value in row.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise tasks.BadRow(name, f"holds a lone surrogate (\\u{ord(item[err.start]):04x}), which is not text") from None


class _TooLong(dict):
    """Stands for a JSONL line longer than MAX_LINE_BYTES (a bad row: an error, or skipped and counted)."""


def read_records(source: tasks.Source) -> tuple[list[dict], int]:
    """(records as plain dicts, number of the first record as a user counts rows) of a file or hub dataset.

    The records are a list, or for a hub dataset a sequence with ``len`` that reads them as they are used."""
    if source.kind == "hub":
        return _load_hf(source), 1
    path = source.path
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
    except OSError as err:
        raise TruthmapError(f"{path}: cannot be read ({err.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise TruthmapError(f"{path}: {size / 2**20:.0f} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB a question "
                            f"file may hold (docs/guarantees.md); split it, or sample it down first")
    readers = {".csv": (_read_csv, 2), ".jsonl": (_read_jsonl, 1), ".ndjson": (_read_jsonl, 1),
               ".json": (_read_json, 1), ".parquet": (_read_parquet, 1)}
    if suffix not in readers:
        raise TruthmapError(f"{path}: unknown file type '{suffix}'; use .csv, .jsonl, .json or .parquet")
    reader, first_row = readers[suffix]
    records = _plain_errors(path, reader)
    first = next(records, _END)  # the file's first problems (empty, not UTF-8, no header) are raised here
    return _chain(first, records), first_row


_END = object()


def _chain(first, rest):
    if first is not _END:
        yield first
    yield from rest


CHUNK_BYTES = 4 * 2**20  # bytes of a CSV or Parquet file read at a time, however wide its rows


def _rows_per_chunk(bytes_per_row: float) -> int:
    return max(1, int(CHUNK_BYTES // max(bytes_per_row, 1.0)))


def _read_csv(path: Path):
    """The records of a CSV file (every cell text), about CHUNK_BYTES of the file at a time: the rows of
    a chunk are counted from the mean length of the first megabyte's lines (a wide file, fewer rows)."""
    with open(path, "rb") as f:
        head = f.read(2**20)
    lines = head.count(b"\n")
    per_row = len(head) / lines if lines else max(len(head), 1)  # one line longer than 1 MiB: one row a chunk
    with pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8",
                     chunksize=_rows_per_chunk(per_row)) as chunks:
        for k, chunk in enumerate(chunks):
            if k == 0:
                _check_csv_header(path)
            yield from chunk.to_dict("records")


def _read_parquet(path: Path):
    """The records of a Parquet file, about CHUNK_BYTES (uncompressed) at a time; a column named twice
    is refused (pyarrow would keep both under one name)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TruthmapError(f"{path}: duplicate column(s) {dupes}; rename or remove one of each")
    meta = parquet.metadata
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    per_row = size / meta.num_rows if meta.num_rows else 1.0
    for batch in parquet.iter_batches(batch_size=_rows_per_chunk(per_row)):
        yield from batch.to_pylist()


def _plain_errors(path: Path, reader):
    """The records of ``reader(path)``, with what it raises while reading turned into one-line errors."""
    suffix = path.suffix.lower()
    try:
        yield from reader(path)
    except UnicodeDecodeError as err:
        raise TruthmapError(f"{path}: not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise TruthmapError(f"{path}: the file is empty") from None
    except (ValueError, pd.errors.ParserError, OSError) as err:
        raise TruthmapError(f"{path}: could not be read as {suffix[1:]} ({str(err).splitlines()[0]})") from None
    except Exception as err:  # pyarrow raises several types for a damaged file
        if isinstance(err, TruthmapError):
            raise
        raise TruthmapError(f"{path}: could not be read as {suffix[1:]} ({type(err).__name__})") from None


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


def _lines(f):
    """The lines of a binary file, each read in pieces of at most MAX_LINE_BYTES: a longer line is
    given as None (its bytes are skipped, never held)."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            yield None
            continue
        yield line


def _read_jsonl(path: Path):
    """The records of a JSONL file, one line at a time."""
    from .runfolder import parse_json

    records = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(_lines(f), start=1):
            if raw is None:
                records += 1
                yield _TooLong()
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TruthmapError(f"{path}, line {number}: not UTF-8 text (byte {err.start} of the line); "
                                    f"re-save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = parse_json(line, object_pairs_hook=_unique_keys)
            except _DuplicateKey as err:
                raise TruthmapError(f"{path}, line {number}: key '{err}' twice in one record; keep one") from None
            except ValueError as err:
                raise TruthmapError(f"{path}, line {number}: {err}") from None
            if not isinstance(record, dict):
                raise TruthmapError(f"{path}, line {number}: {_kind(record)}, not a record ({{\"question\": …}})")
            records += 1
            yield record
    if not records:
        raise TruthmapError(f"{path}: the file is empty")


def _read_json(path: Path):
    """The records of a JSON list, or of an object holding one under "Data" (TriviaQA) or "data", read as
    a stream (ijson): memory holds one record at a time, never the whole document. Checked as strict as
    :func:`truthmap.runfolder.parse_json`: no key twice in a record, no NaN, no lone surrogate, nesting
    at most MAX_JSON_DEPTH."""
    import ijson

    from .runfolder import MAX_JSON_DEPTH

    with open(path, "rb") as f:
        first = f.read(4096).lstrip()[:1]
        if first not in (b"[", b"{"):
            if not first:
                raise TruthmapError(f"{path}: the file is empty")
            raise TruthmapError(f"{path}: expected a list of records (or an object with a 'Data' list)")
        f.seek(0)
        wanted = ("item",) if first == b"[" else ("Data.item", "data.item")
        chosen, number, stack = None, 0, []  # stack: [container being built, key its next value goes under]
        try:
            for prefix, event, value in ijson.parse(f, use_float=True):
                if not stack:
                    if prefix not in wanted or (chosen is not None and prefix != chosen) or event == "end_array":
                        continue
                    chosen = prefix
                    number += 1
                    if event != "start_map":
                        kind = {"start_array": "a list", "string": "a string", "boolean": "true or false",
                                "null": "null"}.get(event, "a number")
                        raise TruthmapError(f"{path}, record {number}: {kind}, not a record ({{\"question\": …}})")
                    stack.append([{}, None])
                    continue
                top = stack[-1]
                if event == "map_key":
                    if value in top[0]:
                        raise TruthmapError(f"{path}, record {number}: key '{value}' twice in one record; keep one")
                    top[1] = value
                    continue
                if event in ("start_map", "start_array"):
                    if len(stack) >= MAX_JSON_DEPTH:
                        raise TruthmapError(f"{path}, record {number}: nested deeper than {MAX_JSON_DEPTH} levels")
                    stack.append([{} if event == "start_map" else [], None])
                    continue
                if event in ("end_map", "end_array"):
                    value = stack.pop()[0]
                    if not stack:
                        yield value
                        continue
                elif isinstance(value, str):
                    _check_string(path, number, value)
                parent = stack[-1]
                if isinstance(parent[0], list):
                    parent[0].append(value)
                else:
                    parent[0][parent[1]] = value
        except ijson.JSONError as err:
            raise TruthmapError(f"{path}: not valid JSON ({sanitise_reason(err)})") from None
    if chosen is None and first == b"{":
        raise TruthmapError(f"{path}: expected a list of records (or an object with a 'Data' list)")


def _check_string(path: Path, number: int, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TruthmapError(f"{path}, record {number}: a string holds a lone surrogate "
                            f"(\\u{ord(value[err.start]):04x}), which is not text") from None


def sanitise_reason(err) -> str:
    from .runfolder import sanitise

    return sanitise(str(err).splitlines()[0] if str(err) else type(err).__name__, 160)


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
