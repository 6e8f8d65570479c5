"""math — grade-school word problems with a numeric answer (the reference study's AnswerableMath CSV).

Columns ``question, answer`` where the answer is a number or a list like "[9.0]"; optional ``id``,
``source`` (the family: GSM8K, SVAMP, …) and ``answerable`` (rows marked False are left out).
Correct when the number the answer states equals the gold number (see grading.grade_number).
"""

from .base import LeftOut, Task, number, register, text


def convert(record: dict, options) -> dict:
    if str(record.get("answerable", "True")).strip().lower() in ("false", "0"):
        raise LeftOut("marked unanswerable")
    return {
        "id": str(record["id"]) if "id" in record else None,
        "question": text(record, "question", "question"),
        "gold": number(record, "answer"),
        "family": str(record.get("source") or "math"),
        "answer_type": "number",
    }


register(Task(
    name="math",
    description="Grade-school word problems (CSV question, answer like [9.0]); the stated number must equal the gold one.",
    convert=convert,
    grading="number",
    chat_prompt="{question} Answer shortly.",
    files={"train": "AnswerableMath.csv", "test": "AnswerableMath_test.csv"},
    max_new_tokens=64,
    reference_chat_prompt="{question} Answer shortly.",  # the reference asks math this way too
    reference_max_new_tokens=200,
))
