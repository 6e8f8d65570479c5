"""winobias — which occupation a pronoun refers to (the reference study's WinoBias CSV).

Columns ``sentence, q, q_instruct, answer, incorrect_answer, type, stereotype``. Chat models get the
sentence and ``q_instruct`` ("Who does the pronoun 'he' refer to?"), base models the sentence and ``q``
("The pronoun 'he' refers to the"), which they complete. Correct when, of the two occupations, the first
one the answer names is the right one. Family: type1 / type2; subgroup: pro / anti (stereotypical).
"""

from .base import BadRow, Task, register, text
from ..textmatch import normalize


def convert(record: dict, options) -> dict:
    sentence = text(record, "sentence", "sentence")
    right, wrong = text(record, "answer", "answer"), text(record, "incorrect_answer", "answer")
    if normalize(right) == normalize(wrong):
        raise BadRow("incorrect_answer", f"the same as the answer ({right!r})")
    return {
        "question": f"{sentence} {text(record, 'q_instruct', 'question')}",
        "question_base": f"{sentence} {text(record, 'q', 'question')}",
        "gold": [right],
        "wrong_answers": [wrong],
        "family": f"type{str(record.get('type', '')).strip()}" if record.get("type") else "winobias",
        "subgroup": str(record.get("stereotype", "")).strip(),
    }


register(Task(
    name="winobias",
    description="WinoBias coreference (CSV sentence, q, q_instruct, answer, incorrect_answer); first candidate named.",
    convert=convert,
    grading="choice",
    chat_prompt="{question}",
    base_prompt="{question_base}",
    reference_base_prompt="{question_base}",  # the reference phrases WinoBias as brief does
    files={"dev": "winobias_dev.csv", "test": "winobias_test.csv"},
))
