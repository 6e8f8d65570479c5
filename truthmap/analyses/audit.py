"""Audit of the exact-answer locator against hand-checked spans.

Reads a hand-checked CSV (``tests/fixtures/exact_answer_audit.csv``: one answer of the default model per
row, with the exact answer span a reader wrote down after reading the answer, or ``none`` when the answer
states no answer), runs the locator of ``truthmap.stages.label`` on every row again, and prints precision
and recall per route and per class (right / wrong). Writes nothing.

    python -m truthmap.analyses.audit [CSV]

Columns of the CSV: ``task``, ``id``, ``question``, ``gold`` and ``wrong_answers`` (JSON lists),
``answer_type``, ``answer``, ``correct`` (the grader's label when the row was made), ``extractor_reply``
(the extractor model's raw reply for that answer, recorded once for every row of an alias-graded task,
so the audit replays the extractor without loading a model), ``exact_answer`` (the hand span: a
substring of the answer, or ``none``) and ``note``.

Agreement (precision's numerator): the located span and the hand span are equal once normalised
(``textmatch.normalize``: case, accents, punctuation and articles ignored), or the located words are the
end of the hand span, its head ("Yen" for "Uzbekistani Yen", "Africa" for "East Africa"); a located span
longer than the hand span ("also known as irridium" for "irridium") disagrees. A span located where the
hand says ``none`` counts against precision. Recall: of the rows with a hand span, the share where the
locator finds an agreeing span. The looser "overlap" figure counts a located span that shares characters
with an occurrence of the hand span (a located "Port" for "Port Louis").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from .. import textmatch
from ..errors import TruthmapError

DEFAULT_AUDIT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "exact_answer_audit.csv"
NONE = "none"  # the hand span of an answer that states no answer
COLUMNS = ["task", "id", "question", "gold", "wrong_answers", "answer_type", "answer", "correct",
           "extractor_reply", "exact_answer", "note"]


def read_audit(path: str | Path = DEFAULT_AUDIT) -> pd.DataFrame:
    """The audit table, each row checked: lists parsed, the hand span a substring of the answer."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as err:
        raise TruthmapError(f"{path}: cannot read the audit table ({err})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise TruthmapError(f"{path}: missing column(s) {', '.join(missing)}")
    for field in ("gold", "wrong_answers"):
        table[field] = [_json_list(text, path, i, field) for i, text in enumerate(table[field])]
    for i, row in table.iterrows():
        span = row["exact_answer"]
        if span != NONE and (not span or span not in row["answer"]):
            raise TruthmapError(f"{path}, row {i + 2}, field 'exact_answer': '{span}' is not in the answer "
                                f"(write the span as it appears, or '{NONE}')")
    table["correct"] = table["correct"].str.lower().isin(["true", "1"])
    return table


def _json_list(text: str, path: Path, i: int, field: str) -> list[str]:
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        raise TruthmapError(f"{path}, row {i + 2}, field '{field}': not a JSON list of strings")
    return [str(v) for v in value]


def vocabularies_for(tasks) -> dict:
    """The candidate vocabularies the label stage would have: the built-in facts' when facts is audited."""
    if "facts" not in set(tasks):
        return {}
    from ..tasks import get_task

    _, vocabularies = get_task("facts").builtin()
    return {name: textmatch.Vocabulary(list(words)) for name, words in vocabularies.items()}


def locate(row, vocabularies: dict) -> tuple[str | None, str, bool]:
    """(located span or None, route or reason, graded correct) for one audit row, as the label stage
    finds it; the extractor's recorded reply stands in for the extractor model."""
    from ..grading import GRADING_RULES, extractor_phrase, place_extracted
    from ..tasks import get_task

    grade, extractable = GRADING_RULES[get_task(row.task).grading]
    correct, (text, _, _, reason) = grade(row.answer, row.question, list(row.gold), list(row.wrong_answers),
                                          row.answer_type, vocabularies)
    if text is None and reason == "no_candidate_in_answer" and extractable:
        text, _, _, reason = place_extracted(row.answer, extractor_phrase(row.extractor_reply), row.question)
    return text, reason, bool(correct)


def agrees(located: str, hand: str) -> bool:
    """Normalised equality, or the located words end the hand span (its head: "Yen" of "Uzbekistani Yen")."""
    got, want = textmatch.normalize(located).split(), textmatch.normalize(hand).split()
    return bool(got) and want[len(want) - len(got):] == got


def _overlaps(answer: str, located: str, hand: str) -> bool:
    """Whether some occurrence of the located text shares characters with some occurrence of the hand span."""
    def spans(text):
        out, start = [], answer.find(text)
        while start >= 0:
            out.append((start, start + len(text)))
            start = answer.find(text, start + 1)
        return out

    return any(s1 < e2 and s2 < e1 for s1, e1 in spans(located) for s2, e2 in spans(hand))


def score_rows(table: pd.DataFrame, vocabularies: dict | None = None) -> pd.DataFrame:
    """One row per audited answer: route, located span, and whether it agrees with the hand span."""
    vocabularies = vocabularies_for(table.task) if vocabularies is None else vocabularies
    rows = []
    for row in table.itertuples():
        located, route, graded = locate(row, vocabularies)
        hand = None if row.exact_answer == NONE else row.exact_answer
        agree = located is not None and hand is not None and agrees(located, hand)
        rows.append({
            "task": row.task, "id": row.id, "class": "right" if graded else "wrong", "route": route,
            "located": located, "hand": hand, "agree": agree,
            "overlap": agree or (located is not None and hand is not None and _overlaps(row.answer, located, hand)),
        })
    return pd.DataFrame(rows)


def _summary(group: pd.DataFrame) -> dict:
    located = group.located.notna()
    hand = group.hand.notna()
    n_located, n_hand, n_hand_none = int(located.sum()), int(hand.sum()), int((~hand).sum())
    ratio = lambda a, b: round(a / b, 3) if b else float("nan")  # noqa: E731
    return {
        "rows": len(group),
        "located": n_located,
        "precision": ratio(int(group.agree.sum()), n_located),
        "precision_overlap": ratio(int(group.overlap.sum()), n_located),
        "hand_span": n_hand,
        "recall": ratio(int((group.agree & hand).sum()), n_hand),
        "hand_none": n_hand_none,
        "none_agree": ratio(int((~located & ~hand).sum()), n_hand_none),
        "span_on_none": int((located & ~hand).sum()),
    }


def summarise(scored: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Precision, recall and agreement on "none" per group of ``by`` (e.g. ["route", "class"]), and overall."""
    parts = [{**dict(zip(by, keys if isinstance(keys, tuple) else (keys,))), **_summary(g)}
             for keys, g in scored.groupby(by, sort=True)]
    parts.append({**{b: "all" for b in by}, **_summary(scored)})
    return pd.DataFrame(parts)


def wrong_precision(scored: pd.DataFrame) -> float:
    """Precision of the located spans of wrong answers: the figure the docs publish and a test guards."""
    return _summary(scored[scored["class"] == "wrong"])["precision"]


def markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join("—" if isinstance(v, float) and v != v else str(v) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    table = read_audit(argv[0] if argv else DEFAULT_AUDIT)
    scored = score_rows(table)
    print(f"{len(table)} answers, {table.task.nunique()} tasks, "
          f"{int((scored['class'] == 'wrong').sum())} graded wrong\n")
    for by in (["class"], ["route", "class"], ["task"]):
        print(markdown(summarise(scored, by)) + "\n")
    print(f"precision on wrong answers: {wrong_precision(scored):.3f}")


if __name__ == "__main__":
    main()
