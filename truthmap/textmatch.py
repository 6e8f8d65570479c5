"""Normalised, whole-word matching of answers against gold aliases and candidate vocabularies.

Text is split into words, each kept with its character span in the original text, so that a match on
normalised words maps back to the exact characters of the answer (the exact-answer span). Normalisation:
Unicode compatibility form with accents removed (a combining accent is part of its letter's word), case
folded, punctuation dropped, an abbreviation with dots one word ("U.S.A." = "USA"), the articles "a",
"an", "the" dropped; numbers are one word each and compare as numbers ("9.0" = "9", "1,000" = "1000"),
so "9" never matches inside "19".

This is the one normalisation of the package: grading, the built-in facts (an alias in its own
question, names that are the same, everyday words) and the tasks' de-duplication of gold answers all
use ``normalize``, ``unique``, ``contains`` and the word search below.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

ARTICLES = frozenset({"a", "an", "the"})
# a number (with thousands separators or a decimal part) or a run of letters/digits
_SIGN = r"(?:(?<!\w)[-−])?"  # a minus sign only where it cannot be a hyphen ("2-3" is two numbers)
# a combining mark (the macron below "H̱olon", which has no precomposed letter) belongs to its letter's word
_MARK = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
# an abbreviation with dots ("U.S.A.", "D.C.", "a.m."): single letters joined by dots, one word without them
# (its span ends at its last letter, as a word's does: the final dot may end the sentence)
_ABBREVIATION = rf"(?<![^\W_])[^\W\d_][{_MARK}]*(?:\.[^\W\d_][{_MARK}]*)+(?![^\W_]|[{_MARK}])"
_WORD = re.compile(_ABBREVIATION + "|" + _SIGN + r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d|,\d)|"
                   + _SIGN + r"\d+(?:\.\d+)?|" rf"[^\W_](?:[^\W_]|[{_MARK}])*")
_NUMBER = re.compile(r"[-−]?[\d,]*\d(?:\.\d+)?")


@dataclass(frozen=True)
class Word:
    norm: str  # normalised form used for comparison
    start: int  # character span in the original text
    end: int


def canonical_number(token: str) -> str | None:
    """'1,000' -> '1000', '9.0' -> '9', '-3.50' -> '-3.5'; None when the token is not a number."""
    if not _NUMBER.fullmatch(token):
        return None
    token = token.replace(",", "").replace("−", "-")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    sign = "-" if token.startswith("-") else ""
    digits = token.lstrip("-").lstrip("0")
    if digits.startswith(".") or digits == "":
        digits = "0" + digits
    return "0" if digits == "0" else sign + digits


@functools.lru_cache(maxsize=1 << 16)  # called per word: most words of answers and vocabularies repeat
def fold(text: str) -> str:
    """Unicode compatibility form, accents removed, case folded: "São Tomé" -> "sao tome"."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def words(text: str, drop_articles: bool = True) -> list[Word]:
    """Split ``text`` into normalised words with their character spans."""
    out = []
    for m in _WORD.finditer(text):
        raw = m.group(0)
        number = canonical_number(raw) if raw[-1].isdigit() else None
        norm = number if number is not None else fold(raw.replace(".", ""))
        if drop_articles and norm in ARTICLES and "." not in raw:  # "a.n." is no article
            continue
        out.append(Word(norm, m.start(), m.end()))
    return out


def normalize(text: str) -> str:
    """The normalised form of a whole string: its normalised words joined by single spaces."""
    return " ".join(w.norm for w in words(text))


def phrase_spans(answer_words: list[Word], phrase: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word occurrence of ``phrase`` in the answer, in order."""
    target = [w.norm for w in words(phrase)]
    n = len(target)
    if n == 0:
        return []
    return [
        (answer_words[i].start, answer_words[i + n - 1].end)
        for i in range(len(answer_words) - n + 1)
        if all(answer_words[i + k].norm == target[k] for k in range(n))
    ]


def unique(texts) -> list[str]:
    """Non-empty texts in order, one per normalised form ("Bogotá", "bogota" and "Bogota." are one); a text
    with no words (only punctuation) is compared as it is written."""
    seen, out = set(), []
    for text in texts:
        key = normalize(text) or text
        if text and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def contains(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole normalised words (the test grading applies to answers)."""
    return bool(phrase_spans(words(text), phrase))


def find_phrase(answer_words: list[Word], phrase: str) -> tuple[int, int] | None:
    """Character span of the first whole-word occurrence of ``phrase`` in the answer, or None."""
    spans = phrase_spans(answer_words, phrase)
    return spans[0] if spans else None


def first_match(
    text: str, phrases: list[str], inside: list[tuple[int, int]] = ()
) -> tuple[str, int, int] | None:
    """The phrase that occurs earliest in ``text`` (the longest one at a tie), with its span.

    An occurrence that lies within a longer span of ``inside`` does not count: "Sudan" inside
    "South Sudan" names another country (``inside`` holds the spans of such longer candidates).
    """
    answer_words = words(text)
    best = None
    for phrase in phrases:
        for span in phrase_spans(answer_words, phrase):
            if any(s <= span[0] and span[1] <= e and e - s > span[1] - span[0] for s, e in inside):
                continue
            if best is None or (span[0], -(span[1] - span[0])) < (best[1], -(best[2] - best[1])):
                best = (phrase, *span)
            break
    return best


class Vocabulary:
    """Fast whole-word search for any of many candidate phrases (e.g. 30k city names) in a text."""

    def __init__(self, candidates: list[str]):
        self._by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for candidate in candidates:
            key = tuple(w.norm for w in words(candidate))
            if key:
                self._by_first.setdefault(key[0], []).append((key, candidate))
        for entries in self._by_first.values():
            entries.sort(key=lambda e: -len(e[0]))  # longest first: "South Africa" before "South"

    def __len__(self):
        return sum(len(v) for v in self._by_first.values())

    def all_in(self, text: str) -> list[tuple[str, int, int]]:
        """Every candidate occurrence in ``text`` (overlapping ones included), with its span."""
        answer_words = words(text)
        norms = [w.norm for w in answer_words]
        found = []
        for i, first in enumerate(norms):
            for key, candidate in self._by_first.get(first, ()):
                if tuple(norms[i : i + len(key)]) == key:
                    found.append((candidate, answer_words[i].start, answer_words[i + len(key) - 1].end))
        return found

    def first_in(self, text: str, exclude: str = "",
                 short_codes_capitalised: bool = False) -> tuple[str, int, int] | None:
        """The earliest (then longest) candidate in ``text`` that does not also occur in ``exclude``.

        ``exclude`` is the question: a candidate the answer merely repeats from the question
        ("The capital of *Georgia* is ...") is not the answer. With ``short_codes_capitalised``, a
        candidate of two letters or fewer counts only where the text writes it with a capital.
        """
        answer_words = words(text)
        excluded = {w.norm for w in words(exclude)} if exclude else set()
        excluded_phrases = " " + " ".join(w.norm for w in words(exclude)) + " "
        norms = [w.norm for w in answer_words]
        for i, first in enumerate(norms):
            for key, candidate in self._by_first.get(first, ()):
                n = len(key)
                if tuple(norms[i : i + n]) != key:
                    continue
                if excluded and (" " + " ".join(key) + " ") in excluded_phrases:
                    continue
                if n == 1 and first in excluded:
                    continue
                written = text[answer_words[i].start : answer_words[i].end]
                if short_codes_capitalised and len(candidate) <= 2 and written.islower():
                    continue  # "to", "is" in running text are words, not the codes "TO", "IS"

                return candidate, answer_words[i].start, answer_words[i + n - 1].end
        return None


# a number right after these words, or right before the second set, is an operand of a working ("multiply
# 655 by 72", "81 divided by 9"), not a result; so is a number beside an arithmetic sign ("571 + 480")
_OPERAND_BEFORE = frozenset({"by", "of", "and", "multiply", "add", "plus", "times", "minus", "from", "divide",
                             "over", "x", "subtract", "into"})
_OPERAND_AFTER = frozenset({"plus", "minus", "times", "divided", "multiplied", "over", "x", "and"})
_OPERATOR = re.compile(r"[+*/×÷\-−]")


def _operand_sides(text: str, text_words: list[Word]) -> list[int]:
    """For each word: -1 when it is a number that is an operand by what comes before it ("by 9", "/ 9"), +1
    by what comes after it ("81 divided", "571 +"), 0 otherwise (see :func:`operands`)."""
    sides = []
    for i, w in enumerate(text_words):
        before = text_words[i - 1] if i > 0 else None
        after = text_words[i + 1] if i + 1 < len(text_words) else None
        if canonical_number(w.norm) is None:
            sides.append(0)
        elif before is not None and (before.norm in _OPERAND_BEFORE or _OPERATOR.search(text[before.end : w.start])):
            sides.append(-1)
        elif after is not None and (after.norm in _OPERAND_AFTER or _OPERATOR.search(text[w.end : after.start])):
            sides.append(1)
        else:
            sides.append(0)
    return sides


def operands(text: str) -> list[tuple[str, int, int]]:
    """(number, start, end) of each number of ``text`` that is an operand of a working: right after "by",
    "of", "plus", …, right before "plus", "divided", …, or beside an arithmetic sign (+ - * / × ÷; not
    "="). The span reaches to the word that makes it one ("by 9", "81 divided"), so it is longer than the
    number alone (as ``first_match``'s ``inside`` wants)."""
    text_words = words(text, drop_articles=False)
    out = []
    for i, (w, side) in enumerate(zip(text_words, _operand_sides(text, text_words))):
        if side:
            neighbour = text_words[i + side]
            out.append((w.norm, min(w.start, neighbour.start), max(w.end, neighbour.end)))
    return out


def first_number(text: str, exclude: str = "") -> tuple[str, int, int] | None:
    """The first number in ``text`` that is not an operand of a working (:func:`operands`: "… multiply 655
    by 72", "81 / 9") nor a number of ``exclude`` (the question); failing that, the first number of the
    question that the text states as no operand ("9." answers "What is 81 divided by 9?"; "… division by
    9." states nothing)."""
    excluded = {w.norm for w in words(exclude) if canonical_number(w.norm) is not None}
    text_words = words(text, drop_articles=False)
    stated = [w for w, side in zip(text_words, _operand_sides(text, text_words))
              if canonical_number(w.norm) is not None and not side]
    w = next((w for w in stated if w.norm not in excluded), stated[0] if stated else None)
    return (w.norm, w.start, w.end) if w else None


# "The capital of X is Y." — the commonest shape of a short answer: what follows the verb is the answer;
# "is also known as Y", "is located in the Y", "was written by Y" state Y, so those words belong to the verb,
# not to the answer
_COPULA = re.compile(r"\b(?:is|are|was|were|would be|will be)\s+(?:also\s+)?"
                     r"(?:(?:called|known as|named|located in|situated in|found in|(?-i:[a-z]+) by)"
                     r"\s+)?(?:(?:the|an?)\s+)?",
                     re.IGNORECASE)
# what an answer says when it gives no answer: "… is not known yet", "I don't know", "unknown"
REFUSAL = re.compile(
    r"\b(?:not (?:yet )?(?:known|sure|certain|available|specified|clear|determined|defined)|unknown|"
    r"i (?:do not|don't|cannot|can't|could not|couldn't) (?:know|say|tell|answer|find|provide|determine)|"
    r"(?:no|not enough) (?:information|data|record|answer)|unable to|i(?: am|'m) sorry|there is no)\b",
    re.IGNORECASE)


def is_refusal(text: str, question: str = "") -> bool:
    """Whether the first sentence of an answer declines to answer ("… is not known yet", "I don't know");
    words copied from the question (the film "I Don't Know How She Does It") are not a refusal."""
    first_sentence = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    asked = normalize(question)
    return any(normalize(m.group(0)) not in asked for m in REFUSAL.finditer(first_sentence))


# the phrase ends at punctuation or a new clause; the full stop of an initial ("John C. Reilly") does not end it
_STOP = re.compile(r"(?<!\b[A-Z])\.|[,;:!?()\[\]\n]|\s(?:which|and|or|with|because|that|but)\s|\s[-–—]\s",
                   re.IGNORECASE)


# a phrase after the verb that starts with one of these describes ("one of the …", "a member of …",
# "not …") rather than names the answer
_NOT_A_NAME = frozenset({"not", "no", "one", "member", "part", "type", "kind", "form", "unit", "symbol", "used",
                         "home", "also", "still", "very", "currently", "usually", "often", "commonly", "in", "on",
                         "at", "of", "from", "to", "by", "with", "for",
                         # a kind of thing, not its name: "Denmark is a country in Northern Europe"
                         "country", "city", "town", "capital", "state", "region", "area", "place", "continent",
                         "island", "nation", "territory", "language", "currency", "element", "metal", "word"})


def names_something(phrase: str, question: str = "") -> bool:
    """Whether a phrase can be a stated answer: it holds a capital letter or a digit (a name or a number,
    not "a pivotal role", "young and brilliant") and is not just words of the question ("Karen" when
    asked who played Karen)."""
    if not any(c.isupper() or c.isdigit() for c in phrase):
        return False
    norm = normalize(phrase)
    return bool(norm) and f" {norm} " not in f" {normalize(question)} "


def stated_answer(text: str, max_words: int = 6, question: str = "") -> tuple[str, int, int] | None:
    """The phrase after the first 'is/are/was …' of the first sentence, up to punctuation or a clause.

    ("The capital of Haiti is Port-Íloula." -> "Port-Íloula"); None when there is no such short phrase,
    or when it describes rather than names (see ``names_something``; ``question`` is the question asked).
    Leading articles are not part of the span.
    """
    first_sentence = re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0]
    m = _COPULA.search(first_sentence)
    if m is None:
        return None
    rest = text[m.end() :]
    stop = _STOP.search(rest)
    phrase = rest[: stop.start()] if stop else rest
    span = words(phrase)
    if not span or len(span) > max_words or REFUSAL.match(phrase) or span[0].norm in _NOT_A_NAME:
        return None
    start, end = m.end() + span[0].start, m.end() + span[-1].end
    if not names_something(text[start:end], question):
        return None
    return text[start:end], start, end
