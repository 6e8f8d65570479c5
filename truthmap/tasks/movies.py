"""movies — "Who acted as X in the movie Y?" (the reference study's movie_qa CSV: Question, Answer)."""

from .base import LoadOptions, Task, gold, register, text


def convert(record: dict, options: LoadOptions) -> dict:
    return {"question": text(record, "Question", "question"), "gold": gold(record, "Answer"), "family": "movies"}


register(Task(
    name="movies",
    description="Who played a character in a film (CSV Question, Answer: movie_qa_*.csv); alias match.",
    convert=convert,
    files={"train": "movie_qa_train.csv", "test": "movie_qa_test.csv"},
))
