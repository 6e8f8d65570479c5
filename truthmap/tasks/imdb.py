"""imdb — the sentiment of a movie review (hub ``imdb`` or a local CSV/JSONL/Parquet ``text, label``).

Labels: 1 / 0, or positive / negative (pos / neg). The review's "<br />" line breaks become newlines.
Correct when the first sentiment word of the answer ("positive" or "negative") is the gold one.
Under ``--protocol reference`` the prompt is the reference study's instruction for chat models
("Classify … Start with either 'positive' or 'negative' first, then elaborate. Review: … Label:"); a
base model gets the same instruction without the worked example the reference took from its data.
"""

from .base import Task, label, register, text

CLASSIFY = 'Classify the following movie reviews as either "positive" or "negative".'
LABELS = {1: "positive", 0: "negative", "1": "positive", "0": "negative", "positive": "positive",
          "negative": "negative", "pos": "positive", "neg": "negative"}


def convert(record: dict, options) -> dict:
    sentiment = label(record, "label", LABELS)
    return {
        "question": text(record, "text", "review").replace("<br />", "\n"),
        "gold": [sentiment],
        "wrong_answers": ["negative" if sentiment == "positive" else "positive"],
        "family": "imdb",
        "subgroup": sentiment,
    }


register(Task(
    name="imdb",
    description="IMDB review sentiment (hub imdb or a local CSV text, label); first sentiment word.",
    convert=convert,
    grading="choice",
    chat_prompt="{question}\n\nIs the sentiment of this review positive or negative? "
                "Start with either 'positive' or 'negative'.",
    base_prompt="Review: {question}\nSentiment (positive or negative):",
    hub=("imdb", None, "test"),
    reference_chat_prompt=CLASSIFY + " Start with either 'positive' or 'negative' first, then elaborate.\n"
                          "Review: {question}\nLabel:",
    reference_base_prompt=CLASSIFY + "\nReview: {question}\nLabel:",
))
