"""Stage 2 — grade each answer, locate its exact answer, and index the token positions.

Reads the questions table, ``vocabularies.json`` and ``generations.parquet``; writes
``answers.parquet`` (one row per question, columns in docs/run-folder.md); :func:`population` says who
is outside the study's population (the split design itself: truthmap/splits.py).

The rules are truthmap/grading.py's: each row is graded by the rule its task names
(``grading.GRADING_RULES``; tasks in truthmap/tasks/), and its exact answer located without the gold
(``grading.locate_exact_answer``); where the rules find none, the extractor model is asked
(:func:`extract_with_model`) and its reply counts only where it occurs in the answer.

``exact_answer="gold"`` (``--exact-answer gold``) keeps the reference study's choice instead: a right
answer graded by alias has its exact answer at the matched alias. ``exact_answer_route`` always records
the label-blind route and ``gold_span_differs`` whether, for a right answer, the two spans differ.

Under ``--protocol reference`` the alias rule grades as the reference study does: right when a gold
alias is a substring of the answer, case-insensitive (``grading.substring_match``).

Three graders' labels are kept side by side: ``correct_alias`` (the task's rule), ``correct_strict``
(``grading.strict_correct``) and, when a judge model is given, ``correct_lenient`` (:func:`judge_answers`:
the judge asked whether the answer means the same as the gold, one forward pass per answer);
``grader`` (``--grader alias|strict|lenient``) says which becomes ``correct``.

No rule falls back to another token when it finds no exact answer: the row is marked invalid with its
reason. positions: indices into prompt_ids + answer_ids (the sequence the extract stage reads), -1 where
the position does not exist (e.g. ``second_answer`` of a one-token answer, or no valid exact answer).
"""

from __future__ import annotations

import pandas as pd

from .. import runfolder as rf
from .. import grading, textmatch
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


def check_exact_answer_mode(mode: str) -> str:
    if mode not in EXACT_ANSWER_MODES:
        raise TruthmapError(f"exact_answer '{mode}': use one of {', '.join(EXACT_ANSWER_MODES)}")
    return mode


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
    return [grading.extractor_phrase(reply) for reply in extractor_replies(lm, questions, answers, progress)]


def extractor_replies(lm, questions: list[str], answers: list[str], progress: bool = True) -> list[str]:
    """The extractor's raw reply (decoded text) to each (question, answer)."""
    from .generate import build_prompt, decode_answer, encode_prompt, generate_answers

    prompts = [
        encode_prompt(lm.tokenizer, build_prompt(lm.tokenizer, EXTRACTOR_INSTRUCTION.format(question=q, answer=a), "{question}"))
        for q, a in zip(questions, answers)
    ]
    replies = generate_answers(lm, prompts, max_new_tokens=16, progress=progress)
    return [decode_answer(lm.tokenizer, ids) for ids, _ in replies]


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
        ok, found, gold_span = grading.grade(rule, row.answer, row.question, list(row.gold), list(row.wrong_answers),
                                     row.answer_type, vocab, substring=substring)
        correct.append(ok)
        located.append(found)
        gold_spans.append(gold_span)
        may_extract.append(grading.GRADING_RULES[rule][1])
        by_alias.append(rule == "alias" and not len(row.wrong_answers))
        rules.append("choice" if rule == "alias" and len(row.wrong_answers) else rule)  # as grade() does
    # right and wrong answers alike: the extractor is asked wherever the rules find no candidate
    missing = [i for i, e in enumerate(located) if e[3] == "no_candidate_in_answer" and may_extract[i]]
    if extractor is not None and missing:
        replies = extract_with_model(
            extractor, [table.question.iloc[i] for i in missing], [table.answer.iloc[i] for i in missing], progress
        )
        for i, phrase in zip(missing, replies):
            located[i] = grading.place_extracted(table.answer.iloc[i], phrase, table.question.iloc[i])

    rows = []
    for row, ok, found, gold_span, alias, rule in zip(table.itertuples(), correct, located, gold_spans, by_alias,
                                                      rules):
        text, start, end, reason = found
        graded = len(row.gold) > 0
        strict = grading.strict_correct(rule, bool(ok), text, list(row.gold)) if graded else None
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
            "right_answers_without_blind_span": int((differs & ~right["exact_answer_route"].isin(grading.LOCATED_ROUTES)).sum())
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
