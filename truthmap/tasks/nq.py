"""nq_context — Natural Questions with the passage that holds the answer as context.

Reads the reference study's CSV (``Question, Answer, Context``) or the hub schema of
``natural_questions`` (``question.text``, ``document.tokens``, ``annotations`` with ``long_answer`` and
``short_answers``). From the hub schema the context is the first annotated long answer (its non-HTML
tokens) and the gold answers are the annotators' short answers; an example without a short answer
(about two in three, among them the yes/no ones) is left out and counted in summary.json.
"""

from .base import BadRow, LeftOut, Task, get, gold, register, text
from ..textmatch import unique


def _records(value) -> list[dict]:
    """A sequence of objects, whether stored as a list of dicts or (the hub's way) a dict of lists."""
    if isinstance(value, dict):
        keys = list(value)
        n = len(value[keys[0]]) if keys else 0
        return [{k: value[k][i] for k in keys} for i in range(n)]
    return list(value or [])


def _from_hub(record: dict) -> dict:
    question = text(record, "question.text", "question")
    annotations = _records(get(record, "annotations"))
    answers = unique([str(s.get("text") or "").strip() for a in annotations for s in _records(a.get("short_answers"))])
    if not answers:
        raise LeftOut("no short answer")
    long = next((a["long_answer"] for a in annotations if (a.get("long_answer") or {}).get("start_token", -1) >= 0), None)
    if long is None:
        raise LeftOut("no long answer")
    tokens = _records(get(record, "document.tokens"))
    passage = [t["token"] for t in tokens[long["start_token"] : long["end_token"]] if not t.get("is_html")]
    if not passage:
        raise BadRow("document.tokens", "the long answer holds no text")
    return {
        "id": str(record["id"]) if "id" in record else None,
        "question": question if question.endswith("?") else question + "?",
        "gold": answers,
        "context": " ".join(passage),
    }


def convert(record: dict, options) -> dict:
    if "Question" not in record and "question" in record:
        row = _from_hub(record)
    else:
        row = {"question": text(record, "Question", "question"), "gold": gold(record, "Answer"),
               "context": text(record, "Context", "context")}
    return {**row, "family": "nq"}


register(Task(
    name="nq_context",
    description="Natural Questions with the answer's passage as context (CSV Question, Answer, Context; or hub schema); alias match.",
    convert=convert,
    chat_prompt="Context: {context}\n\nQuestion: {question} Answer briefly.",
    base_prompt="Context: {context}\n\nQ: {question}\nA:",
    files={"train": "nq_wc_dataset.csv"},
    hub=("natural_questions", None, "validation"),
    reference_chat_prompt="{context}\n{question}",
    reference_base_prompt="Context:{context}\nQ: {question}\nA:",
))
