"""Stage 2 — grade each answer, locate its exact answer, and index the token positions.

Reads the questions table, ``vocabularies.json`` and ``generations.parquet``; writes
``answers.parquet`` (one row per question, columns in docs/run-folder.md). The position vocabulary and
where each position falls are truthmap/positions.py; who is outside the study's population and the split
design, truthmap/splits.py; :func:`has_labels` says whether a study's answers are graded at all.

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

import time

import numpy as np
import pandas as pd

from .. import grading, textmatch
from .. import runfolder as rf
from ..constants import EXACT_ANSWER_MODES, GRADERS
from ..errors import TruthmapError
from ..positions import char_span_to_tokens, position_indices, token_char_spans
from ..preflight import check_population
from ..splits import make_splits, population, population_summary
from .base import Stage, StageRun, fields, register


def check_exact_answer_mode(mode: str) -> str:
    if mode not in EXACT_ANSWER_MODES:
        raise TruthmapError(f"exact_answer '{mode}': use one of {', '.join(EXACT_ANSWER_MODES)}")
    return mode


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


JUDGE_REPLY = "Response:"  # a model without a chat template continues the question after this
JUDGE_WORDS = ("yes", "no")


def judge_prompt(tokenizer, question: str, gold: list[str], answer: str) -> str:
    """The lenient grader's question (``grading.lenient_question``) as a user message, and the place
    where the judge's reply begins."""
    text = grading.lenient_question(question, gold, answer)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + "\n" + JUDGE_REPLY


def judge_answers(lm, questions: list[str], golds: list[list[str]], answers: list[str],
                  batch_size: int = 16) -> tuple[np.ndarray, int]:
    """The lenient grader: for each (question, gold aliases, answer), log P(yes) − log P(no) of the
    judge ``lm``'s next token after :func:`judge_prompt` (each word's mass summed over its spellings,
    " yes", "Yes", …), float ``[N]`` (an answer is right by it where this is above 0; no sampling), and
    the tokens the judge ran through."""
    prompts = [judge_prompt(lm.tokenizer, q, g, a) for q, g, a in zip(questions, golds, answers)]
    groups = word_token_ids(lm.tokenizer, JUDGE_WORDS)
    logp, tokens = next_token_logprobs(lm, prompts, groups, batch_size)
    return logp[:, 0] - logp[:, 1], tokens


def word_token_ids(tokenizer, words) -> list[list[int]]:
    """For each word, every token that reads as it, whatever its case and leading space (" yes", "Yes")."""
    texts = [t.strip().casefold() for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])]
    out = [[i for i, t in enumerate(texts) if t == word.casefold()] for word in words]
    if not all(out):
        raise TruthmapError(f"the judge's tokenizer has no token for {', '.join(w for w, ids in zip(words, out) if not ids)}")
    return out


def next_token_logprobs(lm, prompts: list[str], groups: list[list[int]], batch_size: int = 16
                        ) -> tuple[np.ndarray, int]:
    """log of the probability mass the model gives each group of token ids at the token after each prompt,
    float ``[N, G]``, and the prompts' tokens in all: one forward pass per prompt, batched by length, right-padded (a real token never
    attends to the padding after it), the LM head on the last prompt token only (the backend's
    ``next_token_logprobs``)."""
    from .generate import encode_prompt

    encoded = [encode_prompt(lm.tokenizer, p) for p in prompts]
    out = lm.next_token_logprobs(encoded, groups, batch_size) if encoded else np.full((0, len(groups)), np.nan)
    return out, sum(len(e) for e in encoded)


def label_answers(
    questions: pd.DataFrame,
    generations: pd.DataFrame,
    vocabularies: dict[str, list[str]],
    tokenizer,
    positions: list[str],
    *,
    extractor=None,
    judge=None,
    batch_size: int | None = None,
    progress: bool = True,
    exact_answer: str = EXACT_ANSWER_MODES[0],
    grader: str = GRADERS[0],
    protocol: str = "brief",
) -> pd.DataFrame:
    """The answers table: correctness, exact answer, its validity and reason, and position indices.

    ``extractor`` is a model backend asked for the exact answer where the rules find none (None: skip).
    ``exact_answer``: ``blind`` (default) puts every answer's exact answer where :func:`locate_exact_answer`
    finds it without the gold; ``gold`` keeps the reference study's choice, a right answer's exact answer
    at its gold span (the matched alias). Either way ``exact_answer_route`` is the label-blind route and
    ``gold_span_differs`` (right answers; None for the others) says whether the label-blind span differs
    from the gold span.

    ``correct_alias`` is the task rule's label (a gold alias occurs in the answer, for alias-graded
    tasks), ``correct_strict`` that of ``grading.strict_correct`` (with the extractor's span where the
    extractor found one), and with a ``judge`` (a loaded model) ``correct_lenient``, the judge's verdict
    (:func:`judge_answers`; an empty answer is wrong without asking; the column is absent without a judge),
    beside its log-odds ``lenient_log_odds``.
    ``grader`` (``alias``, ``strict`` or ``lenient``) says which is ``correct``. All are None for a question
    without a gold answer.

    ``protocol``: under ``reference`` the ``alias`` rule grades by substring (:func:`grade`).
    """
    from ..tasks import check_protocol, get_task

    substring = check_protocol(protocol) == "reference"

    check_exact_answer_mode(exact_answer)
    if grader not in GRADERS:
        raise TruthmapError(f"grader '{grader}': use one of {', '.join(GRADERS)}")
    if grader == "lenient" and judge is None:
        raise TruthmapError("grader 'lenient' needs the judge model (the extractor model, or the studied model)")
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
    lenient, judge_cost = [None] * len(table), {"calls": 0, "forward_tokens": 0}
    log_odds = np.full(len(table), np.nan)
    if judge is not None:  # every graded answer that says something; an empty one is wrong without asking
        asked = [i for i, row in enumerate(table.itertuples()) if len(row.gold) and str(row.answer).strip()]
        lenient = [False if len(row.gold) else None for row in table.itertuples()]
        if asked:
            started = time.perf_counter()
            odds, tokens = judge_answers(judge, [table.question.iloc[i] for i in asked],
                                         [[str(g) for g in table.gold.iloc[i]] for i in asked],
                                         [table.answer.iloc[i] for i in asked], batch_size or 16)
            judge_cost = {"calls": len(asked), "forward_tokens": int(tokens),
                          "seconds": round(time.perf_counter() - started, 2)}
            for i, value in zip(asked, odds):
                lenient[i], log_odds[i] = bool(value > 0), float(value)

    rows = []
    for row, ok, found, gold_span, alias, rule, judged, odds in zip(table.itertuples(), correct, located, gold_spans,
                                                                    by_alias, rules, lenient, log_odds):
        text, start, end, reason = found
        graded = len(row.gold) > 0
        strict = grading.strict_correct(rule, bool(ok), text, list(row.gold)) if graded else None
        labels = {"alias": bool(ok) if graded else None, "strict": strict, "lenient": judged}
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
                # the judge's log P(yes) − log P(no) (NaN: not asked), so a user can read it at another threshold
                **({"correct_lenient": judged, "lenient_log_odds": odds} if judge is not None else {}),
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
    out = pd.DataFrame(rows)
    if judge is not None:
        out.attrs["judge"] = judge_cost  # the lenient grader's cost (summary.json: grader_judge)
    return out


def exact_answer_summary(answers: pd.DataFrame, mode: str) -> dict:
    """summary.json's ``exact_answer``: the mode, the right answers, and how many of them the label-blind
    locator puts elsewhere than the gold span (or finds no span in)."""
    right = answers[answers["correct"].fillna(False).astype(bool)] if "correct" in answers else answers.iloc[:0]
    differs = right["gold_span_differs"].fillna(False).astype(bool) if "gold_span_differs" in right else right["correct"] & False
    return {"mode": mode, "right_answers": int(len(right)), "span_differs_from_gold": int(differs.sum()),
            "right_answers_without_blind_span": int((differs & ~right["exact_answer_route"].isin(grading.LOCATED_ROUTES)).sum())
            if "exact_answer_route" in right else 0}


def has_labels(answers: pd.DataFrame) -> bool:
    """Whether the study's answers are graded (False for a label-free study: no gold answers)."""
    return bool(answers["correct"].notna().all()) if "correct" in answers.columns else False


def check_labels(answers: pd.DataFrame, source: str) -> None:
    """Refuse a study whose answers are all right or all wrong: no probe can be trained on one class."""
    n_correct = int(answers["correct"].sum())
    if n_correct == 0 or n_correct == len(answers):
        kind = "right" if n_correct else "wrong"
        raise TruthmapError(
            f"{source}: every one of the {len(answers)} answers is {kind}; a probe needs both right and "
            f"wrong answers (use harder/easier questions or more of them)"
        )


# ---------------------------------------------------------------- the stage

LABEL_FREE_NOTE = ("the questions have no gold answers: no answer is graded and no correctness AUC exists; "
                   "heatmap_entropy shows how well semantic-entropy probes agree with semantic entropy")


def answer_summary(answers: pd.DataFrame) -> dict:
    """Model accuracy and valid-exact-answer rates, overall and per family."""
    wrong = answers[~answers["correct"]]
    per_family = {}
    for family, group in answers.groupby("family", sort=True):
        wrong_group = group[~group["correct"]]
        per_family[family] = {
            "n": int(len(group)),
            "accuracy": round(float(group["correct"].mean()), 4),
            "valid_exact_answer_rate": round(float(group["exact_answer_valid"].mean()), 4),
            "valid_exact_answer_rate_wrong": round(float(wrong_group["exact_answer_valid"].mean()), 4)
            if len(wrong_group) else None,
        }
    return {
        "n": int(len(answers)),
        "accuracy": round(float(answers["correct"].mean()), 4),
        "valid_exact_answer_rate": round(float(answers["exact_answer_valid"].mean()), 4),
        "valid_exact_answer_rate_wrong": round(float(wrong["exact_answer_valid"].mean()), 4) if len(wrong) else None,
        "invalid_exact_answer_reasons": answers.loc[~answers["exact_answer_valid"], "exact_answer_reason"]
        .value_counts().to_dict(),
        "families": per_family,
    }


def judge_model(c, models):
    """The lenient grader's judge (``--judge-grader``, or ``--grader lenient``): the extractor model, else the
    studied model; None when not asked (one forward pass per answer). Under ``--ray`` the studied model
    judges on the workers; an ``--extractor-model`` judges in this process."""
    if not (c.judge_grader or c.grader == "lenient"):
        return None
    return models.extractor or models.lm


def _label(s: StageRun) -> None:
    c, run = s.config, s.run
    questions = run.read_parquet(rf.QUESTIONS)
    generations = run.read_parquet(rf.GENERATIONS)
    vocabularies = run.read_json(rf.VOCABULARIES)
    answers = label_answers(questions, generations, vocabularies, s.models.lm.tokenizer, c.positions,
                            extractor=s.models.extractor, judge=judge_model(c, s.models), batch_size=c.batch_size,
                            progress=c.progress, exact_answer=c.exact_answer, grader=c.grader, protocol=c.protocol)
    judged = answers.attrs.get("judge")  # the lenient grader's calls and forward tokens; None: not asked
    judged = {**judged, "model": c.extractor_model or c.model} if judged else None
    labelled = has_labels(answers)
    # a label-free study is split by its groups alone (there are no classes to stratify)
    left_out = population(answers, c.positions) if c.population == "common" else None
    splits = make_splits(answers if labelled else answers.assign(correct=True), c.seeds, c.test_fraction,
                         c.validation_fraction, left_out, c.population)
    answers["split"] = ""  # "": outside the study's population
    for part, members in splits["seeds"][str(c.seeds[0])].items():
        answers.loc[answers["id"].isin(set(members)), "split"] = part
    run.write_parquet(rf.ANSWERS, answers)
    run.write_json(rf.SPLITS, splits)
    if labelled:
        check_population(splits, len(answers))  # said before the extraction and the probes
    if not labelled:
        run.update_summary(n=int(len(answers)), labels="none", no_correctness_auc=LABEL_FREE_NOTE,
                           population=population_summary(splits, len(answers)))
        return
    run.update_summary(**answer_summary(answers), population=population_summary(splits, len(answers)),
                       labels="gold", exact_answer=exact_answer_summary(answers, c.exact_answer), grader_judge=judged)
    check_labels(answers, str(run.path(rf.ANSWERS)))


register(Stage(
    "label", "2", "Grade answers, locate exact answers and positions (answers.parquet, splits.json).", _label,
    inputs=(rf.QUESTIONS, rf.VOCABULARIES, rf.GENERATIONS), outputs=(rf.ANSWERS, rf.SPLITS),
    settings=fields("positions", "extractor_model", "seeds", "test_fraction", "validation_fraction",
                    "population", "exact_answer", "grader", "judge_grader", "protocol"),
    model="workers"))
