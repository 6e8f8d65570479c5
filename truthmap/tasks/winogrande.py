"""winogrande — what the blank in a sentence refers to (the reference study's WinoGrande CSV).

Columns ``Question, Answer, Wrong_Answer``. Base models get one worked example first (written for
truthmap) so that they answer with a name rather than continue the sentence. Correct when, of the two
options, the first one the answer names is the right one.
"""

from . import BadRow, Task, register, text
from ..textmatch import normalize

ONE_SHOT = (
    "Question: Mia lent her umbrella to Zoe because _ was going out in the rain. "
    "Who does the blank refer to in the sentence?\nAnswer: Zoe\n\n"
)


def convert(record: dict, options) -> dict:
    right, wrong = text(record, "Answer", "answer"), text(record, "Wrong_Answer", "answer")
    if normalize(right) == normalize(wrong):
        raise BadRow("Wrong_Answer", f"the same as the answer ({right!r})")
    return {"question": text(record, "Question", "question"), "gold": [right], "wrong_answers": [wrong],
            "family": "winogrande"}


register(Task(
    name="winogrande",
    description="WinoGrande fill-in-the-blank (CSV Question, Answer, Wrong_Answer); first option named.",
    convert=convert,
    grading="choice",
    chat_prompt="{question}",
    base_prompt=ONE_SHOT + "Question: {question}\nAnswer:",
    files={"train": "winogrande_train.csv", "test": "winogrande_test.csv"},
))
