"""winogrande — what the blank in a sentence refers to (the reference study's WinoGrande CSV).

Columns ``Question, Answer, Wrong_Answer``. Base models get one worked example first (written for
truthmap) so that they answer with a name rather than continue the sentence. Correct when, of the two
options, the first one the answer names is the right one.

Under ``--protocol reference`` a base model gets the reference study's form: the sentence without its
question, then "The blank refers to:" (``question_base``), after the same worked example in that form
(the reference took its example from the first row of its data).
"""

import re

from .base import BadRow, Task, register, text
from ..textmatch import normalize

EXAMPLE = "Mia lent her umbrella to Zoe because _ was going out in the rain."
ONE_SHOT = f"Question: {EXAMPLE} Who does the blank refer to in the sentence?\nAnswer: Zoe\n\n"
REFERENCE_ONE_SHOT = f"{EXAMPLE} The blank refers to: Zoe\n"
ASKED = re.compile(r"\s*(Who|What) does the blank refer to in the sentence\?\s*$", re.IGNORECASE)


def convert(record: dict, options) -> dict:
    right, wrong = text(record, "Answer", "answer"), text(record, "Wrong_Answer", "answer")
    if normalize(right) == normalize(wrong):
        raise BadRow("Wrong_Answer", f"the same as the answer ({right!r})")
    question = text(record, "Question", "question")
    return {"question": question, "question_base": ASKED.sub("", question), "gold": [right],
            "wrong_answers": [wrong], "family": "winogrande"}


register(Task(
    name="winogrande",
    description="WinoGrande fill-in-the-blank (CSV Question, Answer, Wrong_Answer); first option named.",
    convert=convert,
    grading="choice",
    chat_prompt="{question}",
    base_prompt=ONE_SHOT + "Question: {question}\nAnswer:",
    reference_base_prompt=REFERENCE_ONE_SHOT + "{question_base} The blank refers to:",
    files={"train": "winogrande_train.csv", "test": "winogrande_test.csv"},
))
