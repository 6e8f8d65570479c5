"""The ground floor of the task package: the ``Task`` entry, the registry (``register``, ``get_task``,
``REGISTRY``), how ``--dataset`` resolves to a task and a source, and the field readers a task's
``convert`` uses (``get``, ``text``, ``gold``, ``number``, ``label``; ``BadRow``, ``MissingField``,
``LeftOut``).

Every task module imports this module and ends in ``register(Task(...))``; the package's
``__init__`` imports the task modules (so they register) and re-exports these names. No task module
imports the package itself, so the package and its modules never import each other in a circle.
"""

from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import TruthmapError
from ..textmatch import canonical_number, normalize, unique

DEFAULT_CHAT_PROMPT = "{question} Answer briefly."
DEFAULT_BASE_PROMPT = "Q: {question}\nA:"
PROTOCOLS = ("brief", "reference")  # the first is the default
REFERENCE_MAX_NEW_TOKENS = 100
READABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json", ".parquet")
DATA_DIR_ENV = "TRUTHMAP_DATA_DIR"


@dataclass(frozen=True)
class LoadOptions:
    """What the user said about reading a source (the generic task's column mapping)."""

    question_column: str = "question"
    answer_column: str | None = None  # None: answers, answer or gold, whichever the source has
    protocol: str = PROTOCOLS[0]  # a task whose shown context differs by protocol reads it (hotpotqa_context)


@dataclass(frozen=True)
class Task:
    name: str
    description: str  # one line, shown by `truthmap tasks`
    convert: Callable[[dict, LoadOptions], dict] | None = None  # one source record -> one question row
    grading: str = "alias"  # a key of grading.GRADING_RULES
    chat_prompt: str = DEFAULT_CHAT_PROMPT  # user message for chat models
    base_prompt: str = DEFAULT_BASE_PROMPT  # raw text for models without a chat template
    files: dict[str, str] = field(default_factory=dict)  # split -> file name in the data folder; first = default
    hub: tuple[str, str | None, str] | None = None  # (hub dataset id, config, default split)
    max_new_tokens: int = 24
    builtin: Callable[[], tuple[list[dict], dict]] | None = None  # builds (rows, vocabularies) itself
    # (id, question) -> the key of questions that must share a split part ("" = none): questions about one
    # entity; questions whose texts normalise alike always share a part (splits.split_groups)
    group: Callable[[str, str], str] | None = None
    # the reference study's phrasing (--protocol reference)
    reference_chat_prompt: str = "{question}"
    reference_base_prompt: str = DEFAULT_BASE_PROMPT
    reference_max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS

    def prompts(self, protocol: str = PROTOCOLS[0]) -> tuple[str, str]:
        """(chat prompt, base prompt) of ``protocol``."""
        check_protocol(protocol)
        if protocol == "reference":
            return self.reference_chat_prompt, self.reference_base_prompt
        return self.chat_prompt, self.base_prompt

    def answer_tokens(self, protocol: str = PROTOCOLS[0]) -> int:
        """The answer length (max_new_tokens) of ``protocol``."""
        check_protocol(protocol)
        return self.reference_max_new_tokens if protocol == "reference" else self.max_new_tokens


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise TruthmapError(f"protocol '{protocol}': use one of {', '.join(PROTOCOLS)}")
    return protocol


@dataclass(frozen=True)
class Source:
    """Where to read a task's records: the built-in set, a local file, or a hub dataset."""

    kind: str  # "builtin" | "file" | "hub"
    path: Path | None = None
    hub_id: str | None = None
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        if self.kind == "file":
            return str(self.path)
        if self.kind == "hub":
            return f"{self.hub_id}" + (f" ({self.config})" if self.config else "") + f" [{self.split}]"
        return "built-in facts"


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in REGISTRY:
        raise ValueError(f"task '{task.name}' is registered twice")
    REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return REGISTRY[name]
    except KeyError:
        raise TruthmapError(f"task '{name}': unknown; known tasks: {', '.join(REGISTRY)} (see `truthmap tasks`)") from None


def answer_length(task_names, configured: int | None = None, protocol: str = PROTOCOLS[0]) -> int:
    """The answer length (max_new_tokens) of a run: the one configured, else the longest its tasks allow
    under ``protocol``.

    ``task_names``: the ``task`` column of its questions table (empty for a table without one)."""
    if configured:
        return int(configured)
    return max((get_task(name).answer_tokens(protocol) for name in set(task_names)),
               default=Task("", "").answer_tokens(protocol))


def _looks_like_path(text: str) -> bool:
    """A file name rather than a split or a hub id ("org/name" is a hub id; "org/name.csv" a file)."""
    return (Path(text).suffix.lower() in READABLE_SUFFIXES or text.startswith(("/", "./", "../", "~", "\\"))
            or Path(text).exists())


def data_dir(configured: str | None = None) -> Path:
    """The folder that holds task files under their reference names: --data-dir, $TRUTHMAP_DATA_DIR, ./data."""
    return Path(configured or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


def resolve(dataset: str, data_folder: str | None = None) -> tuple[Task, Source]:
    """The task and source that ``--dataset`` names (see the module docstring for the forms)."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return REGISTRY["generic"], Source("file", path=path)
    name, _, rest = dataset.partition(":")
    if name not in REGISTRY:
        if _looks_like_path(dataset):
            raise TruthmapError(f"dataset '{dataset}': no such file")
        return REGISTRY["generic"], _hub_source(dataset)
    task = REGISTRY[name]
    if task.builtin:
        if rest:
            raise TruthmapError(f"dataset '{dataset}': the task '{name}' is built in and has no splits or files")
        return task, Source("builtin")
    if rest and _looks_like_path(rest):
        file = Path(rest).expanduser()
        if not file.is_file():
            raise TruthmapError(f"dataset '{dataset}': no such file '{rest}'")
        return task, Source("file", path=file)
    if task.name == "generic":
        if not rest:
            raise TruthmapError("dataset 'generic': name a file or hub id, e.g. generic:questions.csv")
        return task, _hub_source(rest)
    splits = list(task.files) or ([task.hub[2]] if task.hub else [])
    split = rest or splits[0]
    if task.files and split in task.files:
        folder = data_dir(data_folder)
        file = folder / task.files[split]
        if file.is_file():
            return task, Source("file", path=file, split=split)
        if not task.hub:
            raise TruthmapError(
                f"task '{name}' (split {split}) reads {task.files[split]}, which is not in {folder}; "
                f"set --data-dir (or ${DATA_DIR_ENV}) to the folder that holds it, or pass --dataset {name}:PATH"
            )
    elif task.files and not task.hub:
        raise TruthmapError(f"task '{name}': unknown split '{split}'; use one of {', '.join(task.files)} or a path")
    hub_id, config, _ = task.hub
    return task, Source("hub", hub_id=hub_id, config=config, split=split)


def _hub_source(spec: str) -> Source:
    """'id', 'id:split' or 'id:config:split' (split defaults to train)."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise TruthmapError(f"dataset '{spec}': use a hub id as 'id', 'id:split' or 'id:config:split'")
    config = parts[1] if len(parts) == 3 else None
    return Source("hub", hub_id=parts[0], config=config, split=parts[-1] if len(parts) > 1 else "train")


# --- reading fields of one record: converters raise these, the loader names file, row and field ----------


class BadRow(Exception):
    """A record that cannot become a question (empty question, missing gold, unparsable number, …)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class MissingField(BadRow):
    """A field the task needs is absent; on the first record this means the wrong file or column name."""

    def __init__(self, field: str, hint: str = ""):
        super().__init__(field, "missing")
        self.hint = hint


class LeftOut(Exception):
    """A record the task leaves out by design (e.g. a Natural Questions example without a short answer)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def get(record: dict, dotted: str, hint: str = ""):
    """``record['a']['b']`` for ``'a.b'``; MissingField when a key is absent."""
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise MissingField(dotted, hint)
        value = value[key]
    return value


def text(record: dict, dotted: str, what: str = "text", hint: str = "") -> str:
    """A non-empty text field, stripped."""
    value = get(record, dotted, hint)
    if not isinstance(value, str):
        raise BadRow(dotted, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(dotted, f"empty {what}")
    return value.strip()


def _as_list(value):
    """A list from a list, an array, or a string holding a JSON / Python list literal; else the value."""
    if isinstance(value, str) and value.strip().startswith("["):
        from ..runfolder import parse_json

        if value.count("[") > 100 and value.strip().startswith("[" * 101):
            raise RecursionError  # deeper than any answer list; refused before a parser recurses
        try:
            return parse_json(value)
        except ValueError:
            try:
                return ast.literal_eval(value.strip())  # "['a', 'b']" as written by Python; literals only
            except (ValueError, SyntaxError):
                return value
    if hasattr(value, "tolist") and not isinstance(value, str):
        return value.tolist()
    return value


def gold(record: dict, dotted: str, hint: str = "") -> list[str]:
    """A gold cell as a non-empty list of strings: a list, a JSON list in a string, or one string."""
    try:
        value = _as_list(get(record, dotted, hint))
    except (RecursionError, MemoryError):  # a list literal nested too deep for the parser
        raise BadRow(dotted, "a list nested too deeply to read") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (isinstance(value, float) and math.isnan(value)):
        value = [str(value)]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise BadRow(dotted, f"expected text or a list of texts, got {type(value).__name__}")
    answers = unique([str(v).strip() for v in value])  # one per normalised form, as grading compares them
    if not answers:
        raise BadRow(dotted, "empty gold answer")
    return answers


def number(record: dict, dotted: str) -> list[str]:
    """A numeric gold answer ("9", "[9.0]", 9.0, "1,000") as canonical number strings ("9", "1000")."""
    raw = get(record, dotted)
    value = _as_list(raw)
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, float):
            v = repr(v) if math.isfinite(v) else ""
        canonical = canonical_number(str(v).strip()) if isinstance(v, (str, int)) and not isinstance(v, bool) else None
        if canonical is None:
            raise BadRow(dotted, f"unparsable number {str(raw)!r}; expected a number like 9, 9.5 or [9.0]")
        out.append(canonical)
    if not out:
        raise BadRow(dotted, "empty gold answer")
    return unique(out)


def label(record: dict, dotted: str, labels: dict) -> str:
    """A class label, mapped through ``labels`` (accepted spelling, normalised, -> label); BadRow for any other."""
    value = get(record, dotted)
    key = normalize(value) if isinstance(value, str) else value
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if key not in labels:
        names = sorted({str(k) for k in labels})
        raise BadRow(dotted, f"unknown label {value!r}; expected one of {', '.join(names)}")
    return labels[key]
