"""triviaqa — TriviaQA questions, graded by the answer's aliases.

Reads the official JSON (``{"Data": [{"Question", "QuestionId", "Answer": {"Value", "Aliases",
"NormalizedAliases", "Type"}}]}``) or the hub schema of ``trivia_qa`` (``question``, ``question_id``,
``answer: {value, aliases, normalized_aliases, type}``), as a file (by default the unfiltered web files
in the data folder) or, when the data folder lacks them, from the hub (rc.nocontext).
"""

from .base import BadRow, LoadOptions, Task, get, register, text
from ..textmatch import unique


def convert(record: dict, options: LoadOptions) -> dict:
    official = "Question" in record or "Answer" in record
    q, qid, a = ("Question", "QuestionId", "Answer") if official else ("question", "question_id", "answer")
    keys = ("Value", "Aliases", "NormalizedAliases", "Type") if official else ("value", "aliases", "normalized_aliases", "type")
    answer = get(record, a)
    if not isinstance(answer, dict):
        raise BadRow(a, f"expected an answer object, got {type(answer).__name__}")
    aliases = [answer.get(keys[0]) or ""] + list(answer.get(keys[1]) or []) + list(answer.get(keys[2]) or [])
    aliases = unique([str(alias).strip() for alias in aliases])
    if not aliases:
        raise BadRow(f"{a}.{keys[1]}", "missing gold (no answer value or aliases)")
    return {
        "id": str(record[qid]) if qid in record else None,
        "question": text(record, q, "question"),
        "gold": aliases,
        "family": "triviaqa",
        "subgroup": str(answer.get(keys[3]) or ""),
    }


register(Task(
    name="triviaqa",
    description="TriviaQA trivia questions (official JSON path or hub trivia_qa rc.nocontext); alias match.",
    convert=convert,
    # the unfiltered web files of the official download, under these names in the data folder
    files={"validation": "triviaqa-unfiltered/unfiltered-web-dev.json",
           "train": "triviaqa-unfiltered/unfiltered-web-train.json"},
    hub=("trivia_qa", "rc.nocontext", "validation"),
))
