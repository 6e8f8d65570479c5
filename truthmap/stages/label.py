"""Stage 2 — grade each answer, locate its exact answer, and index the token positions.

Reads the questions table, ``vocabularies.json`` and ``generations.parquet``; writes
``answers.parquet`` (one row per question, columns in docs/run-folder.md); :func:`population` says who
is outside the study's population (the split design itself: truthmap/splits.py).

Each row is graded by the rule its task names (``GRADING_RULES``; tasks in truthmap/tasks/), and its exact
answer is located by one function that never sees the gold (:func:`locate_exact_answer`, also used for
sampled answers and by a detector scoring new answers): the gold only grades.

* alias (facts, QA tasks): correct when a gold alias occurs in the answer (normalised, whole-word; see
  textmatch), not as part of a longer candidate of the question's vocabulary ("Sudan" inside "South
  Sudan"), nor as an operand of a working when it is a number of the question ("… division by 9."
  answers "What is 81 divided by 9?" with nothing). Exact answer: the first candidate of the question's
  answer type (the first number that is no operand, for a question asking for a number); else what the
  verb states; failing that, the extractor model is asked, and its output counts only if it occurs in
  the answer.
* number (math): the number the answer states (``stated_number``) must equal a gold number; 9 ≠ 19,
  9.0 = 9. Exact answer: that number.
* choice (winobias, winogrande, nli, imdb): of the gold and the wrong options, the one the answer names
  first decides (not counting a stretch that merely repeats the question, nor a list of the options).
  Exact answer: that option.

``exact_answer="gold"`` (``--exact-answer gold``) keeps the reference study's choice instead: a right
answer graded by alias has its exact answer at the matched alias. ``exact_answer_route`` always records
the label-blind route and ``gold_span_differs`` whether, for a right answer, the two spans differ.

Under ``--protocol reference`` the alias rule grades as the reference study does: right when a gold
alias is a substring of the answer, case-insensitive (:func:`substring_match`).

Two graders' labels are kept side by side (``correct_alias``, ``correct_strict``; :func:`strict_correct`),
and ``grader`` (``--grader alias|strict``) says which becomes ``correct``.

No rule falls back to another token when it finds no exact answer: the row is marked invalid with its
reason. positions: indices into prompt_ids + answer_ids (the sequence the extract stage reads), -1 where
the position does not exist (e.g. ``second_answer`` of a one-token answer, or no valid exact answer).
"""

from __future__ import annotations

import re

import pandas as pd

from .. import runfolder as rf
from .. import textmatch
from ..constants import (DEFAULT_POSITIONS, EXACT_ANSWER_MODES, EXACT_POSITIONS, GRADERS, MIN_PER_CLASS,  # noqa: F401
                         NAMED_POSITIONS, POPULATIONS, SITES)
from ..errors import TruthmapError


def check_positions(positions: list[str]) -> list[str]:
    for p in positions:
        if p not in NAMED_POSITIONS and not (p.startswith("-") and p[1:].isascii() and p[1:].isdigit() and int(p) < 0):
            raise TruthmapError(f"position '{p}': use one of {', '.join(NAMED_POSITIONS)} or -1, -2, … (from the end)")
    if len(set(positions)) != len(positions):
        raise TruthmapError(f"positions {positions}: each position may appear once")
    return list(positions)


def check_cell(site, layer, position, source="the cell") -> dict:
    """A probe cell {site, layer, position} whose values can name files: a known site, a whole layer
    number, a position of check_positions; a one-line error (naming ``source``) otherwise."""
    if site not in SITES:
        raise TruthmapError(f"{source}: site {rf.sanitise(repr(site), 60)} is not one of {', '.join(SITES)}")
    if (isinstance(layer, bool) or not isinstance(layer, (int, float)) or not 0 <= layer < 100_000
            or layer != int(layer)):  # the range first: int() of an infinity (JSON 1e400) raises
        raise TruthmapError(f"{source}: layer {rf.sanitise(repr(layer), 60)} is not a layer number")
    if not isinstance(position, str):
        raise TruthmapError(f"{source}: position {rf.sanitise(repr(position), 60)} is not a position name")
    try:
        check_positions([position])
    except TruthmapError:
        raise TruthmapError(f"{source}: position {rf.sanitise(repr(position), 60)} is not a position name") from None
    return {"site": site, "layer": int(layer), "position": position}


def judge(
    answer: str, gold: list[str], vocabulary: textmatch.Vocabulary | None = None, question: str = ""
) -> tuple[bool, tuple[str, int, int] | None]:
    """(correct, (alias, start, end) of the earliest gold alias in the answer, or None).

    With the ``vocabulary`` of the question's answer type, an alias that is only part of a longer
    candidate ("Republic of the Congo" in "Democratic Republic of the Congo", "Guinea" in
    "Guinea-Bissau") does not count there: the answer names the other candidate. A gold number that is
    also a number of the ``question`` does not count where the answer uses it as an operand ("What is 81
    divided by 9?" → "… division by 9." is not right; "81 / 9 = 9" is).
    """
    longer = []
    if vocabulary is not None:
        gold_forms = {textmatch.normalize(g) for g in gold}
        longer = [(s, e) for c, s, e in vocabulary.all_in(answer) if textmatch.normalize(c) not in gold_forms]
    if question:
        asked = {w.norm for w in textmatch.words(question) if textmatch.canonical_number(w.norm) is not None}
        longer += [(s, e) for number, s, e in textmatch.operands(answer) if number in asked]
    match = textmatch.first_match(answer, list(gold), inside=longer)
    return match is not None, match


# a question that asks for a count, an amount or a year: its answer is a number (a rule of the question, not
# of its gold answer, so right and wrong answers are located alike)
_ASKS_FOR_NUMBER = re.compile(r"^\W*(?:how (?:many|much)|(?:in )?(?:what|which) year)\b", re.IGNORECASE)
LOCATED_ROUTES = ("number", "vocabulary", "stated_after_verb", "first_choice", "extractor")  # routes that found a span


def check_exact_answer_mode(mode: str) -> str:
    if mode not in EXACT_ANSWER_MODES:
        raise TruthmapError(f"exact_answer '{mode}': use one of {', '.join(EXACT_ANSWER_MODES)}")
    return mode


def locate_exact_answer(answer: str, question: str, answer_type: str = "", vocabularies: dict | None = None, *,
                        rule: str = "alias", options=()) -> tuple[str | None, int, int, str]:
    """(exact answer text, start, end, route) of an answer, found without its gold answer; text is None
    (and start, end -1) when the rules find none, with the reason as the route.

    The one locator of the package: the label stage, sampled answers (analyses/resample.py) and a
    detector scoring new answers (analyses/detector.py) all call it. It sees the question, the task's
    grading ``rule``, the question's ``answer_type`` and the candidate ``vocabularies``, and for a choice
    the ``options`` (gold and wrong ones together, in an order that does not say which is gold), never
    which answer is right:

    * ``number`` rule: the number the answer states (:func:`stated_number`);
    * ``choice`` rule (or any question with options): the first option the answer names (:func:`first_option`);
    * ``alias`` rule: nothing for an empty answer or a refusal; for a question asking for a number (answer
      type ``number``, or "how many / how much / what year …") the first number that is not an operand
      of the question; else the first candidate of the answer type's vocabulary not in the question; else
      what the verb states ("The capital of X is Y."); else ``no_candidate_in_answer`` (the extractor
      model may then be asked: :func:`place_extracted`).
    """
    vocabularies = vocabularies or {}
    if not answer.strip():
        return None, -1, -1, "empty_answer"
    if rule == "number":
        stated = stated_number(answer, question)
        if stated is None:
            return None, -1, -1, "no_candidate_in_answer"
        return answer[stated[1] : stated[2]], stated[1], stated[2], "number"
    if rule == "choice" or options:
        return first_option(answer, question, sorted(options))
    if textmatch.is_refusal(answer, question):  # "… is not known yet" names nothing: no candidate, no extractor
        return None, -1, -1, "refusal"
    found, route = None, ""
    if answer_type == "number" or (not answer_type and _ASKS_FOR_NUMBER.match(question)):
        found, route = textmatch.first_number(answer, exclude=question), "number"
    elif answer_type in vocabularies:
        vocabulary = vocabularies[answer_type]
        found, route = vocabulary.first_in(answer, exclude=question, short_codes_capitalised=True), "vocabulary"
    if found is None and route != "number":
        # wrong answers often name something in no vocabulary ("… is Port-Íloula."): take what the verb states
        found, route = textmatch.stated_answer(answer, question=question), "stated_after_verb"
    if found is None:
        return None, -1, -1, "no_candidate_in_answer"
    return answer[found[1] : found[2]], found[1], found[2], route


def find_exact_answer(
    answer: str, question: str, gold: list[str], answer_type: str, vocabularies: dict
) -> tuple[str | None, int, int, str]:
    """The reference study's choice, without the extractor: a right answer's matched gold alias
    (route ``gold_alias``), any other answer located by :func:`locate_exact_answer`."""
    if answer.strip():
        correct, match = judge(answer, gold, vocabularies.get(answer_type), question)
        if correct:
            return answer[match[1] : match[2]], match[1], match[2], "gold_alias"
    return locate_exact_answer(answer, question, answer_type, vocabularies)


# where a calculation ends: the answer stated after "=", "so", "the answer is", …
_CONCLUSION = re.compile(r"=|answer:|\b(?:so|thus|therefore|hence|answer is|total of|total is)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def stated_number(answer: str, question: str = "") -> tuple[str, int, int] | None:
    """The number an answer states, as (canonical number, start, end), or None when it has none.

    It is read from the last sentence that holds a result (a worked answer ends with it): the first
    number after that sentence's last "=" or concluding word ("so", "the answer is"), otherwise its
    first number that is not a number of the question ("There will be 1600 ants after 5 hours" states
    1600). A sentence with only the question's numbers restates it; the unfinished last sentence of an
    answer cut off mid-working ("… = 2") is not read.
    """
    sentences, start = [], 0
    for m in list(_SENTENCE_END.finditer(answer)) + [None]:
        end = m.start() if m else len(answer)
        sentences.append((start, end))
        start = m.end() if m else len(answer)
    if len(sentences) > 1 and not answer.rstrip().endswith((".", "!", "?")):
        # a working cut off mid-sentence ("… is 360 * 60 = 2") has not stated its result there yet
        sentences = sentences[:-1]
    question_numbers = {w.norm for w in textmatch.words(question) if textmatch.canonical_number(w.norm)}
    for s, e in reversed(sentences):
        numbers = [w for w in textmatch.words(answer[s:e]) if textmatch.canonical_number(w.norm) is not None]
        conclusions = list(_CONCLUSION.finditer(answer, s, e))
        after = [w for w in numbers if conclusions and w.start >= conclusions[-1].end() - s]
        new = [w for w in numbers if w.norm not in question_numbers]
        if not (after or new):  # only the question's own numbers: a restatement, not a result
            continue
        w = (after or new)[0]
        return w.norm, s + w.start, s + w.end
    return None


ECHO_MIN_WORDS = 5  # this many words copied in a row from the question are an echo, not an answer


def echoed_spans(answer: str, question: str, min_words: int = ECHO_MIN_WORDS) -> list[tuple[int, int]]:
    """Character spans of the answer that repeat at least ``min_words`` consecutive words of the question."""
    answer_words = textmatch.words(answer)
    question_norms = [w.norm for w in textmatch.words(question)]
    runs = {tuple(question_norms[i : i + min_words]) for i in range(len(question_norms) - min_words + 1)}
    covered = [False] * len(answer_words)
    for i in range(len(answer_words) - min_words + 1):
        if tuple(w.norm for w in answer_words[i : i + min_words]) in runs:
            covered[i : i + min_words] = [True] * min_words
    spans, i = [], 0
    while i < len(answer_words):
        if not covered[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(answer_words) and covered[j + 1]:
            j += 1
        spans.append((answer_words[i].start, answer_words[j].end))
        i = j + 1
    return spans


_QUOTES = "'\"\u2018\u2019\u201c\u201d"
_LIST_GLUE = re.compile(rf"[\s,;/{_QUOTES}]*(?:\b(?:or|and|nor)\b)?[\s,;/{_QUOTES}]*(?:\b(?:the|a|an)\s+)?[{_QUOTES}]?",
                        re.IGNORECASE)


def listed_spans(answer: str, options: list[str]) -> list[tuple[int, int]]:
    """Spans where the answer lists options ("entailment, contradiction, or neutrality", "positive or
    negative"): two or more options joined only by commas, "or", "and"."""
    answer_words = textmatch.words(answer)
    found = sorted({span for option in options for span in textmatch.phrase_spans(answer_words, option)})
    spans, chain = [], found[:1]
    for span in found[1:]:
        if span[0] >= chain[-1][1] and _LIST_GLUE.fullmatch(answer[chain[-1][1] : span[0]]):
            chain.append(span)
            continue
        if span[0] >= chain[-1][1]:
            spans += [(chain[0][0], chain[-1][1])] if len(chain) > 1 else []
            chain = [span]
    if len(chain) > 1:
        spans.append((chain[0][0], chain[-1][1]))
    return spans


# "… refers to the designer", "The blank refers to Emily", "The teacher is referring to the mover"
_REFERS_TO = re.compile(r"\b(?:refers|referring|refer)\s+to\b", re.IGNORECASE)
# a clause ends at a sentence end or a new clause, but "…, which is the secretary" still names the referent
_CLAUSE_END = re.compile(r"[.;!?\n]|\s(?:who|which|that|where|when|because|as)\s(?!(?:is|are|was)\b)", re.IGNORECASE)


# "does not necessarily represent a contradiction": an option the answer denies is not its choice
_NEGATION = re.compile(r"\b(?:not|never|neither|nor)\b(?:\W+\w+){1,4}", re.IGNORECASE)


def negated_spans(answer: str) -> list[tuple[int, int]]:
    """Spans of a negation and the (up to four) words after it."""
    return [m.span() for m in _NEGATION.finditer(answer)]


def referent_clauses(answer: str) -> list[tuple[int, int]]:
    """Spans of what follows each "refers to" up to the end of its clause: the referent the answer names."""
    out = []
    for m in _REFERS_TO.finditer(answer):
        stop = _CLAUSE_END.search(answer, m.end())
        out.append((m.end(), stop.start() if stop else len(answer)))
    return out


def first_option(answer: str, question: str, options: list[str]) -> tuple[str | None, int, int, str]:
    """(text, start, end, route ``first_choice``) of the first option the answer names, or (None, -1, -1, reason).

    Options inside a stretch that repeats the question ("The cook prepared a dish for the teacher
    because …"), inside a list of options ("entailment, contradiction, or neutrality") or right after a
    negation ("does not necessarily represent a contradiction") are not chosen by the answer and do not
    count. When the answer says what the pronoun or blank "refers to", only the options in those
    clauses count ("The baker is referring to the laborer" chooses the laborer).
    """
    echoed = echoed_spans(answer, question)
    ignored = echoed + listed_spans(answer, options) + negated_spans(answer)
    clauses = [(s, e) for s, e in referent_clauses(answer) if not any(a <= s < b for a, b in echoed)]
    if clauses:  # "The baker is referring to the laborer": only what the answer says it refers to counts
        matches = (textmatch.first_match(answer[s:e], options, inside=[(a - s, b - s) for a, b in ignored])
                   for s, e in clauses)
        match = next(((p, s + a, s + b) for (s, _), m in zip(clauses, matches) if m for p, a, b in [m]), None)
        reason = "referent_names_no_option"
    else:
        match, reason = textmatch.first_match(answer, options, inside=ignored), "no_candidate_in_answer"
    if match is None:
        return None, -1, -1, reason
    _, start, end = match
    return answer[start:end], start, end, "first_choice"


def substring_match(answer: str, gold: list[str]) -> tuple[str, int, int] | None:
    """(alias, start, end) of the earliest gold alias that is a substring of the answer, case-insensitive,
    or None: the reference study's grading (no word boundaries, no normalisation)."""
    found = [(m.start(), m.end(), alias) for alias in gold if alias.strip()
             for m in [re.search(re.escape(alias), answer, re.IGNORECASE)] if m]
    if not found:
        return None
    start, end, alias = min(found, key=lambda f: (f[0], -f[1]))
    return alias, start, end


def grade(rule: str, answer: str, question: str, gold: list[str], wrong_answers: list[str], answer_type: str,
          vocabularies: dict, *, substring: bool = False
          ) -> tuple[bool, tuple[str | None, int, int, str], tuple[int, int] | None]:
    """(correct, exact answer located without the gold, gold span) of one answer under a task's ``rule``.

    The exact answer (text, start, end, route) comes from :func:`locate_exact_answer`, which never sees
    the gold; the gold only grades:

    * ``alias`` (facts, QA tasks): correct when a gold alias occurs in the answer (:func:`judge`); a
      question with named competing answers (HotpotQA's yes/no questions) is graded as a ``choice``;
    * ``number`` (math): the stated number equals a gold number (compared as numbers: 9 ≠ 19, 9.0 = 9);
    * ``choice`` (winobias, winogrande, nli, imdb): the first option the answer names is a gold one.

    The gold span is where the reference study puts a right answer's exact answer (``--exact-answer
    gold``): the matched alias under ``alias``, the located span under the other rules; None for a wrong
    answer.

    ``substring`` (``--protocol reference``): the ``alias`` rule grades as the reference study does, right
    when a gold alias is a substring of the answer, case-insensitive (:func:`substring_match`), without
    :func:`judge`'s word boundaries, normalisation and longer-candidate and operand checks.
    """
    rule = "choice" if rule == "alias" and len(wrong_answers) else rule
    options = list(gold) + list(wrong_answers) if rule == "choice" else ()
    located = locate_exact_answer(answer, question, answer_type, vocabularies, rule=rule, options=options)
    if rule == "alias":
        if substring:
            match = substring_match(answer, gold)
            correct = match is not None
        else:
            correct, match = judge(answer, gold, vocabularies.get(answer_type), question)
        return correct, located, (match[1], match[2]) if correct else None
    text = located[0]
    if text is None:
        return False, located, None
    if rule == "number":
        correct = textmatch.canonical_number(text.replace("−", "-")) in {textmatch.canonical_number(g.strip()) for g in gold}
    else:
        correct = textmatch.normalize(text) in {textmatch.normalize(g) for g in gold}
    return correct, located, (located[1], located[2]) if correct else None


def strict_correct(rule: str, correct: bool, located_text: str | None, gold: list[str]) -> bool:
    """The strict grader: right only when the exact answer located without the gold (``located_text``),
    normalised as textmatch does, equals a gold alias; an answer with no located span is wrong (it states
    no gold alias as its answer). Under the ``number`` and ``choice`` rules the rule's own label
    (``correct``) is already this comparison of the located answer with the gold, and is returned."""
    if rule != "alias":
        return correct
    if located_text is None:
        return False
    return textmatch.normalize(located_text) in {textmatch.normalize(g) for g in gold}


def _rule(name: str):
    def graded(answer, question, gold, wrong_answers, answer_type, vocabularies):
        correct, located, _ = grade(name, answer, question, gold, wrong_answers, answer_type, vocabularies)
        return correct, located

    graded.__name__ = f"grade_{name}"
    graded.__doc__ = f"(correct, exact answer located without the gold) under the ``{name}`` rule (see ``grade``)."
    return graded


grade_alias, grade_number, grade_choice = _rule("alias"), _rule("number"), _rule("choice")
# rule name -> (grade function, whether the extractor model may find an exact answer the rule missed)
GRADING_RULES = {
    "alias": (grade_alias, True),
    "number": (grade_number, False),
    "choice": (grade_choice, False),
}


def token_char_spans(tokenizer, answer_ids: list[int], answer: str) -> list[tuple[int, int]]:
    """Character span of each answer token in ``answer`` (the decoded text); special tokens get (n, n).

    Uses the tokenizer's offset mapping on the decoded text when re-tokenising it gives back the
    generated ids (the usual case); otherwise the spans come from decoding growing prefixes.
    """
    special = set(tokenizer.all_special_ids)
    content = [t for t in answer_ids if t not in special]
    n_special_tail = len(answer_ids) - len(content)
    if content == answer_ids[: len(content)]:
        enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == content:
            return [tuple(o) for o in enc["offset_mapping"]] + [(len(answer), len(answer))] * n_special_tail
    spans, previous = [], 0
    for k in range(1, len(answer_ids) + 1):
        end = min(len(tokenizer.decode(answer_ids[:k], skip_special_tokens=True)), len(answer))
        end = max(end, previous)
        spans.append((previous, end))
        previous = end
    return spans


def char_span_to_tokens(spans: list[tuple[int, int]], start: int, end: int, text: str) -> tuple[int, int] | None:
    """First and last token index whose characters overlap [start, end) at a non-space character."""
    hits = [
        k
        for k, (s, e) in enumerate(spans)
        if s < end and e > start and text[max(s, start) : min(e, end)].strip()
    ]
    return (hits[0], hits[-1]) if hits else None


def position_indices(
    n_prompt: int, n_answer: int, exact_tokens: tuple[int, int] | None, positions: list[str]
) -> dict[str, int]:
    """Index of each position in prompt_ids + answer_ids; -1 where the position does not exist."""
    total = n_prompt + n_answer
    out = {}
    for p in positions:
        if p == "last_q":
            index = n_prompt - 1
        elif p == "first_answer":
            index = n_prompt if n_answer >= 1 else -1
        elif p == "second_answer":
            index = n_prompt + 1 if n_answer >= 2 else -1
        elif p in EXACT_POSITIONS:
            if exact_tokens is None:
                index = -1
            else:
                first, last = exact_tokens
                index = n_prompt + {
                    "exact_answer_before_first": first - 1,
                    "exact_answer_first": first,
                    "exact_answer_last": last,
                    "exact_answer_after_last": last + 1,
                }[p]
                if index >= total:
                    index = -1
        else:  # "-k": k-th token from the end of the whole sequence, prompt included (as the reference
            index = total + int(p)  # study counts), so it exists for every answer of a usual length
            if index < 0:
                index = -1
        out[p] = index
    return out


EXTRACTOR_INSTRUCTION = (
    "Copy, word for word, the short part of the response that states its answer to the question. "
    "Write only those words.\n\n"
    "Question: Which river flows through Cairo?\nResponse: The river that flows through Cairo is the Nile.\n"
    "Exact answer: Nile\n\n"
    "Question: {question}\nResponse: {answer}\nExact answer:"
)


def extract_with_model(lm, questions: list[str], answers: list[str], progress: bool = True) -> list[str]:
    """Ask ``lm`` for the exact answer of each (question, answer): the phrase of its reply."""
    return [extractor_phrase(reply) for reply in extractor_replies(lm, questions, answers, progress)]


def extractor_replies(lm, questions: list[str], answers: list[str], progress: bool = True) -> list[str]:
    """The extractor's raw reply (decoded text) to each (question, answer)."""
    from .generate import build_prompt, decode_answer, encode_prompt, generate_answers

    prompts = [
        encode_prompt(lm.tokenizer, build_prompt(lm.tokenizer, EXTRACTOR_INSTRUCTION.format(question=q, answer=a), "{question}"))
        for q, a in zip(questions, answers)
    ]
    replies = generate_answers(lm, prompts, max_new_tokens=16, progress=progress)
    return [decode_answer(lm.tokenizer, ids) for ids, _ in replies]


def extractor_phrase(reply: str) -> str:
    """The phrase an extractor's reply proposes: its first line, trimmed; "" when it has none."""
    lines = reply.strip().splitlines()
    line = lines[0].strip().strip(".,;:!\"'") if lines else ""
    stated = textmatch.stated_answer(line)  # a small extractor often copies the sentence: keep its answer
    return stated[0] if stated else line


EXTRACTED_MAX_WORDS = 6  # a longer reply is a copied sentence ("the main character, Dash, played a …")


def place_extracted(answer: str, phrase: str, question: str = "") -> tuple[str | None, int, int, str]:
    """The exact answer the extractor proposed, where it occurs in the answer (whole words), else none.

    A phrase of more than ``EXTRACTED_MAX_WORDS`` words, or one that names nothing or only repeats the
    question (``textmatch.names_something``), is not an exact answer."""
    too_long = len(textmatch.words(phrase)) > EXTRACTED_MAX_WORDS
    if phrase and (too_long or not textmatch.names_something(phrase, question)):
        return None, -1, -1, "extractor_output_not_an_answer"
    span = textmatch.find_phrase(textmatch.words(answer), phrase) if phrase else None
    if span is None:
        return None, -1, -1, "extractor_output_not_in_answer"
    return answer[span[0] : span[1]], span[0], span[1], "extractor"


def label_answers(
    questions: pd.DataFrame,
    generations: pd.DataFrame,
    vocabularies: dict[str, list[str]],
    tokenizer,
    positions: list[str],
    *,
    extractor=None,
    progress: bool = True,
    exact_answer: str = EXACT_ANSWER_MODES[0],
    grader: str = GRADERS[0],
    protocol: str = "brief",
) -> pd.DataFrame:
    """The answers table: correctness, exact answer, its validity and reason, and position indices.

    ``extractor`` is a LoadedModel asked for the exact answer where the rules find none (None: skip).
    ``exact_answer``: ``blind`` (default) puts every answer's exact answer where :func:`locate_exact_answer`
    finds it without the gold; ``gold`` keeps the reference study's choice, a right answer's exact answer
    at its gold span (the matched alias). Either way ``exact_answer_route`` is the label-blind route and
    ``gold_span_differs`` (right answers; None for the others) says whether the label-blind span differs
    from the gold span.

    ``correct_alias`` is the task rule's label (a gold alias occurs in the answer, for alias-graded
    tasks), ``correct_strict`` that of :func:`strict_correct` (with the extractor's span where the
    extractor found one); ``grader`` (``alias`` or ``strict``) says which of the two is ``correct``. All
    three are None for a question without a gold answer.

    ``protocol``: under ``reference`` the ``alias`` rule grades by substring (:func:`grade`).
    """
    from ..tasks import check_protocol, get_task

    substring = check_protocol(protocol) == "reference"

    check_exact_answer_mode(exact_answer)
    if grader not in GRADERS:
        raise TruthmapError(f"grader '{grader}': use one of {', '.join(GRADERS)}")
    table = questions.merge(generations, on="id", how="inner", validate="one_to_one")
    if "task" not in table.columns:  # a questions table from before tasks: graded as the generic task
        table["task"] = "generic"
    if "wrong_answers" not in table.columns:
        table["wrong_answers"] = [[] for _ in range(len(table))]
    vocab = {name: textmatch.Vocabulary(list(words)) for name, words in vocabularies.items()}
    correct, located, gold_spans, may_extract, by_alias, rules = [], [], [], [], [], []
    for row in table.itertuples():
        rule = get_task(row.task).grading
        ok, found, gold_span = grade(rule, row.answer, row.question, list(row.gold), list(row.wrong_answers),
                                     row.answer_type, vocab, substring=substring)
        correct.append(ok)
        located.append(found)
        gold_spans.append(gold_span)
        may_extract.append(GRADING_RULES[rule][1])
        by_alias.append(rule == "alias" and not len(row.wrong_answers))
        rules.append("choice" if rule == "alias" and len(row.wrong_answers) else rule)  # as grade() does
    # right and wrong answers alike: the extractor is asked wherever the rules find no candidate
    missing = [i for i, e in enumerate(located) if e[3] == "no_candidate_in_answer" and may_extract[i]]
    if extractor is not None and missing:
        replies = extract_with_model(
            extractor, [table.question.iloc[i] for i in missing], [table.answer.iloc[i] for i in missing], progress
        )
        for i, phrase in zip(missing, replies):
            located[i] = place_extracted(table.answer.iloc[i], phrase, table.question.iloc[i])

    rows = []
    for row, ok, found, gold_span, alias, rule in zip(table.itertuples(), correct, located, gold_spans, by_alias,
                                                      rules):
        text, start, end, reason = found
        graded = len(row.gold) > 0
        strict = strict_correct(rule, bool(ok), text, list(row.gold)) if graded else None
        labels = {"alias": bool(ok) if graded else None, "strict": strict}
        differs, gold_text = None, ""
        if graded and ok:
            differs = text is None or (start, end) != gold_span
            if gold_span is not None and gold_span[0] is not None and gold_span[0] < gold_span[1]:
                gold_text = row.answer[gold_span[0]:gold_span[1]]
            if exact_answer == "gold" and alias:  # the reference's choice: a right answer at its matched alias
                start, end = gold_span
                text, reason = row.answer[start:end], "gold_alias"
        answer_ids = list(row.answer_ids)
        tokens = None
        if text is not None:
            spans = token_char_spans(tokenizer, answer_ids, row.answer)
            tokens = char_span_to_tokens(spans, start, end, row.answer)
            if tokens is None:
                text, reason = None, "span_not_on_tokens"
        index = position_indices(len(row.prompt_ids), len(answer_ids), tokens, positions)
        rows.append(
            {
                "id": row.id,
                "task": row.task,
                "question": row.question,
                "gold": list(row.gold),
                "family": row.family,
                "subgroup": row.subgroup,
                "prompt": row.prompt,
                "answer": row.answer,
                "correct": labels[grader],  # None: no gold answer (a label-free study)
                "correct_alias": labels["alias"],
                "correct_strict": labels["strict"],
                "exact_answer": text or "",
                "exact_answer_valid": text is not None,
                "exact_answer_reason": reason,
                # how the span is found without the gold: the same route for right and wrong answers
                "exact_answer_route": found[3],
                "gold_span_differs": differs,
                "exact_answer_gold": gold_text,  # a right answer's span at its matched gold (shown, never probed)
                "exact_answer_start": start if text is not None else -1,
                "exact_answer_end": end if text is not None else -1,
                "n_prompt_tokens": len(row.prompt_ids),
                "n_answer_tokens": len(answer_ids),
                **{f"pos_{p}": i for p, i in index.items()},
            }
        )
    return pd.DataFrame(rows)


def exact_answer_summary(answers: pd.DataFrame, mode: str) -> dict:
    """summary.json's ``exact_answer``: the mode, the right answers, and how many of them the label-blind
    locator puts elsewhere than the gold span (or finds no span in)."""
    right = answers[answers["correct"].fillna(False).astype(bool)] if "correct" in answers else answers.iloc[:0]
    differs = right["gold_span_differs"].fillna(False).astype(bool) if "gold_span_differs" in right else right["correct"] & False
    return {"mode": mode, "right_answers": int(len(right)), "span_differs_from_gold": int(differs.sum()),
            "right_answers_without_blind_span": int((differs & ~right["exact_answer_route"].isin(LOCATED_ROUTES)).sum())
            if "exact_answer_route" in right else 0}


def population(answers: pd.DataFrame, positions: list[str]) -> pd.Series:
    """Why each answer is left out of a common-population study ("" = kept), indexed like ``answers``.

    An answer is kept when every requested position exists for it; with any exact-answer position
    requested, an answer without a valid exact answer leaves every column (as in the reference study),
    under the reason of its exact answer (``no_candidate_in_answer``, …)."""
    reasons = pd.Series("", index=answers.index, dtype=object)
    if EXACT_POSITIONS & set(positions):
        invalid = ~answers["exact_answer_valid"].astype(bool)
        reasons[invalid] = "no_exact_answer:" + answers.loc[invalid, "exact_answer_reason"].astype(str)
    for p in positions:
        column = f"pos_{p}"
        if column in answers.columns:
            missing = (answers[column] < 0) & (reasons == "")
            reasons[missing] = f"no_position:{p}"
    return reasons


def check_labels(answers: pd.DataFrame, source: str) -> None:
    """Refuse a study whose answers are all right or all wrong: no probe can be trained on one class."""
    n_correct = int(answers["correct"].sum())
    if n_correct == 0 or n_correct == len(answers):
        kind = "right" if n_correct else "wrong"
        raise TruthmapError(
            f"{source}: every one of the {len(answers)} answers is {kind}; a probe needs both right and "
            f"wrong answers (use harder/easier questions or more of them)"
        )
