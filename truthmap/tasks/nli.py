"""nli — natural language inference phrased as a question (the reference study's MNLI CSV).

Columns ``Question`` ("For the statement "…", does the hypothesis "…" represent entailment,
contradiction, or neutrality?") and ``Answer`` (entailment, neutral or contradiction). Correct when the
first label word of the answer, synonyms included, is the gold label's.
"""

from .base import Task, label, register, text

SYNONYMS = {
    "entailment": ["entailment", "entails", "entail", "entailed"],
    "neutral": ["neutral", "neutrality"],
    "contradiction": ["contradiction", "contradicts", "contradict", "contradictory", "contradicted"],
}
LABELS = {word: name for name, words in SYNONYMS.items() for word in words}


def convert(record: dict, options) -> dict:
    gold = label(record, "Answer", LABELS)
    return {
        "question": text(record, "Question", "question"),
        "gold": SYNONYMS[gold],
        "wrong_answers": [w for name, words in SYNONYMS.items() if name != gold for w in words],
        "family": "nli",
        "subgroup": gold,
    }


register(Task(
    name="nli",
    description="MNLI premise/hypothesis as a question (CSV Question, Answer); first label word, with synonyms.",
    convert=convert,
    grading="choice",
    chat_prompt="{question}",
    files={"train": "mnli_train.csv", "validation": "mnli_validation.csv"},
))
