"""The grading rules: whether an answer is right by its gold answer, and where its exact answer is.

Text only (no model, no run folder): the label stage (stages/label.py) applies these rules to the
greedy answers, sampled answers go through the same stage (analyses/resample.py, the samples of
analyses/entropy.py), and a detector scoring new answers (analyses/detector.py) locates their exact
answers with the same locator. Matching and normalisation are textmatch's.

**The three graders** (answers.parquet keeps each one's label; ``--grader`` says which is ``correct``):

* alias (:func:`grade` with the task's rule; the default) —
  * ``alias`` rule (facts, QA tasks): a gold alias occurs in the answer (:func:`alias_match`: normalised,
    whole-word, not inside a longer candidate of the question's vocabulary, not an operand of a working);
    under ``--protocol reference`` a gold alias is a substring of the answer, case-insensitive
    (:func:`substring_match`), as the reference study graded;
  * ``number`` rule (math): the number the answer states (:func:`stated_number`) equals a gold number;
  * ``choice`` rule (winobias, winogrande, nli, imdb): the first option the answer names (:func:`first_option`)
    is a gold one;
* strict (:func:`strict_correct`) — the exact answer located without the gold equals a gold alias;
* lenient — a judge model asked whether the answer means the same as the gold (the semantic-entropy
  papers' check): :func:`lenient_question` is its question; the label stage reads the judge's reply
  (``label.judge_answers``: " yes" against " no" at the next token, one forward pass per answer).

**The exact answer** is located by one function that never sees the gold (:func:`locate_exact_answer`);
the extractor model's reply, where it is asked, is placed by :func:`place_extracted`. The gold only grades.
"""

from __future__ import annotations

import re

from . import textmatch


def alias_match(
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
        correct, match = alias_match(answer, gold, vocabularies.get(answer_type), question)
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

    * ``alias`` (facts, QA tasks): correct when a gold alias occurs in the answer (:func:`alias_match`); a
      question with named competing answers (HotpotQA's yes/no questions) is graded as a ``choice``;
    * ``number`` (math): the stated number equals a gold number (compared as numbers: 9 ≠ 19, 9.0 = 9);
    * ``choice`` (winobias, winogrande, nli, imdb): the first option the answer names is a gold one.

    The gold span is where the reference study puts a right answer's exact answer (``--exact-answer
    gold``): the matched alias under ``alias``, the located span under the other rules; None for a wrong
    answer.

    ``substring`` (``--protocol reference``): the ``alias`` rule grades as the reference study does, right
    when a gold alias is a substring of the answer, case-insensitive (:func:`substring_match`), without
    :func:`alias_match`'s word boundaries, normalisation and longer-candidate and operand checks.
    """
    rule = "choice" if rule == "alias" and len(wrong_answers) else rule
    options = list(gold) + list(wrong_answers) if rule == "choice" else ()
    located = locate_exact_answer(answer, question, answer_type, vocabularies, rule=rule, options=options)
    if rule == "alias":
        if substring:
            match = substring_match(answer, gold)
            correct = match is not None
        else:
            correct, match = alias_match(answer, gold, vocabularies.get(answer_type), question)
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


# ---------------------------------------------------------------------- the lenient (judge) grader

LENIENT_GOLD_SHOWN = 8  # at most this many gold aliases go into the judge's question (some tasks list dozens)
# the semantic-entropy papers' equivalence question (Farquhar et al., Nature 2024, and its code), one gold
# answer or several
LENIENT_QUESTION = ("We are assessing the quality of answers to the following question: {question}\n{gold_line}\n"
                    "The proposed answer is: {answer}\n"
                    "Within the context of the question, does the proposed answer mean the same as the expected "
                    "answer? Respond only with yes or no.")


def lenient_question(question: str, gold: list[str], answer: str) -> str:
    """The judge's question for one answer (its reply, yes or no, is read by the label stage): the
    question, the gold answer(s) and the proposed answer, as the semantic-entropy papers ask it."""
    shown = [str(g).strip() for g in gold if str(g).strip()][:LENIENT_GOLD_SHOWN]
    gold_line = (f"The expected answer is: {shown[0]}." if len(shown) == 1
                 else "The following are expected answers to this question: " + "; ".join(shown) + ".")
    return LENIENT_QUESTION.format(question=question.strip(), gold_line=gold_line, answer=answer.strip())
