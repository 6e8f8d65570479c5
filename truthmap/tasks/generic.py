"""generic — any table of questions and answers: a CSV / JSONL / JSON / Parquet file or a hub dataset id.

The question and answer columns are named with --question-column / --answer-column (default: question,
and whichever of answers, answer, gold the source has). An answer cell is one text, or a list of
accepted aliases (a list, or a JSON list in a CSV cell). Optional columns: id, family.

A source with no answer column at all (and no --answer-column) is a label-free study: its questions
have no gold answer, and ``truthmap run`` studies them with semantic-entropy probes (truthmap/analyses/entropy.py).
"""

from .base import LoadOptions, Task, gold, register, text

ANSWER_COLUMNS = ("answers", "answer", "gold")
HINT = "name the right one with --question-column / --answer-column"


def convert(record: dict, options: LoadOptions) -> dict:
    answer_column = options.answer_column or next((c for c in ANSWER_COLUMNS if c in record), None)
    return {
        "id": str(record["id"]) if "id" in record else None,
        "question": text(record, options.question_column, "question", HINT),
        "gold": gold(record, answer_column, HINT) if answer_column else [],  # []: no gold (label-free)
        "family": str(record.get("family", "all")),
    }


register(Task(
    name="generic",
    description="Your own table (CSV/JSONL/JSON/Parquet path or hub id) with a column mapping; alias match.",
    convert=convert,
))
