"""Stage 1 — the model answers every question greedily.

Reads the questions table; writes ``generations.parquet``: one row per question with
``id, prompt (str), prompt_ids (list[int]), answer_ids (list[int], the end-of-turn token included when
the model emitted one), answer (str, decoded without special tokens), stopped (bool, an end-of-turn
token was emitted before max_new_tokens)``.

Prompts use the tokenizer's chat template with ``add_generation_prompt=True`` when it has one, and a
raw ``Q: … A:`` prompt otherwise, phrased as the task says under the run's protocol (``brief`` or
``reference``, truthmap/tasks/). A model without a chat template has no end-of-turn token of its own and
goes on to make up the next "Q: … A: …": its answer ends at the first token that holds a line break
(that token is its end of turn, kept in ``answer_ids``), and ``answer`` is the text before the line
break, the line that is graded. Batches are left-padded and sorted by length (fewer pad tokens);
on a CUDA out-of-memory error the batch is halved and retried, finished batches are kept.

A prompt longer than the model's context (less ``max_new_tokens``) loses tokens from its middle, so the
chat template's start and its generation prompt stay whole (``long_prompts="truncate"``, counted in
``prompt_cut``), or its question is left out (``"skip"``). Answers are saved in resumable chunks of
``CHUNK_BATCHES`` batches (``generations/chunk-00000.parquet``, …): a killed run loses one chunk at most.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .. import runfolder as rf
from ..backends import Models
# prompt building lives with the backends (every backend carries the model's tokenizer); the stages and
# analyses import these names from here
from ..backends.base import (Draws, ModelBackend, answers_one_line, build_prompt, decode_answer,  # noqa: F401
                             encode_prompt)
from ..config import LONG_PROMPTS, Config
from ..data import load_questions
from ..errors import TruthmapError
from ..preflight import check_questions
from ..tasks import PROTOCOLS, answer_length, get_task, resolve
from .base import Stage, StageRun, fields, register

CHUNK_BATCHES = 4  # batches per saved chunk: what a killed run can lose


def task_prompts(tokenizer, questions: pd.DataFrame, template: str | None = None,
                 protocol: str = PROTOCOLS[0]) -> list[str]:
    """The prompt of every question, phrased as its task says under ``protocol`` (``template`` replaces
    the chat prompt)."""
    prompts = []
    for row in questions.itertuples():
        chat, base = get_task(getattr(row, "task", "generic") or "generic").prompts(protocol)
        fields = {"context": getattr(row, "context", "") or "", "question_base": getattr(row, "question_base", "") or row.question}
        prompts.append(build_prompt(tokenizer, row.question, template or chat, base, **fields))
    return prompts


def fit_prompt(prompt_ids: list[int], room: int) -> list[int]:
    """``prompt_ids`` cut to ``room`` tokens by removing tokens from the middle (start and end stay)."""
    if len(prompt_ids) <= room:
        return prompt_ids
    head = room // 2
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (room - head) :]


def prompt_room(lm: ModelBackend, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit in the context beside ``max_new_tokens`` answer tokens (None: no limit)."""
    context = lm.context_length()
    if context is None:
        return None
    if context - max_new_tokens < 8:
        raise TruthmapError(
            f"max_new_tokens {max_new_tokens}: leaves no room for a prompt in the model's context of "
            f"{context} tokens; use a smaller --max-new-tokens"
        )
    return context - max_new_tokens


def generate_answers(
    lm: ModelBackend,
    prompt_ids: list[list[int]],
    max_new_tokens: int = 24,
    batch_size: int | None = None,
    progress: bool = True,
    sample: tuple | None = None,
    chunks=None,
    capture=None,
) -> list[tuple[list[int], bool]]:
    """Answer ids and stopped-flag for each prompt, in the order given: greedy, or drawn when ``sample``
    is (temperature, seed) or (temperature, seed, top_k) — see :class:`Draws`: a prompt's draws depend on
    the seed, the prompt and how many times the same prompt came before it in the list, not on the batch
    size, the batches or the other prompts.

    Prompts too long for the context are cut in the middle (see :func:`fit_prompt`). With ``chunks``
    (a :class:`truthmap.runfolder.ChunkStore`) every ``CHUNK_BATCHES`` batches are saved as they finish
    and chunks finished by an earlier, interrupted run are read back instead of generated. A chunk is a
    run of whole batches of the length order and the batch size is the one the first run chose, so the
    batches, and the greedy answers, are the same whether or not a run was interrupted.

    ``lm`` is a model backend (truthmap/backends/base.py): the chunks to answer go to its
    ``answer_chunks`` — in this process batch after batch (:func:`truthmap.backends.hf.answer_prompts`), or
    on Ray workers several at once with that same function; they are saved, and the answers returned, in
    the same order, so the result is the same.

    ``capture`` (a :class:`truthmap.stages.capture.ChunkCapture`, with ``chunks``) reads the hidden states and
    token scores of each answer while it is generated; only with the model in this process, and not for
    sampled answers.
    """
    room = prompt_room(lm, max_new_tokens)
    if room is not None:
        prompt_ids = [fit_prompt(p, room) for p in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    if sample is not None:
        if chunks is not None:
            raise ValueError("sampled answers are not saved in chunks")
        if not lm.in_process:
            raise TruthmapError("sampled answers are drawn in this process: run without --ray")
        sample = Draws.of(prompt_ids, *sample)
    if batch_size is None:
        batch_size = lm.auto_batch_size(max((len(p) for p in prompt_ids), default=1) + max_new_tokens)
    if chunks is not None:
        batch_size = chunks.setting("batch_size", batch_size)
    if capture is not None and (chunks is None or not lm.in_process or sample is not None):
        capture = None  # Ray workers and sampled answers are read by the separate pass
    if capture is not None:
        capture.start(batch_size, max_new_tokens)
    # workers split even an unsaved generation into chunks: whole batches, so the same batches
    whole = chunks is None and lm.in_process
    chunk_rows = max(len(order), 1) if whole else CHUNK_BATCHES * batch_size
    plan = [order[first : first + chunk_rows] for first in range(0, len(order), chunk_rows)]
    results: list = [None] * len(prompt_ids)
    bar = tqdm(total=len(order), desc="generate", unit="q", disable=not progress)
    todo = []
    for k, rows in enumerate(plan):
        saved = chunks.get(k) if chunks is not None else None
        if saved is not None and saved["row"].tolist() == rows:
            for i, ids, stopped in zip(rows, saved["answer_ids"], saved["stopped"]):
                results[i] = (list(ids), bool(stopped))
            if capture is not None:
                capture.read_chunk(saved)
            bar.update(len(rows))
        else:
            todo.append(k)
    # (k, answers) in the order the backend finishes them
    finished = lm.answer_chunks({k: [prompt_ids[i] for i in plan[k]] for k in todo}, max_new_tokens, batch_size,
                                bar, None if sample is None else {k: sample.rows(plan[k]) for k in todo}, capture)
    for k, answers in finished:
        for i, answer in zip(plan[k], answers):
            results[i] = answer
        if chunks is not None:
            frame = pd.DataFrame({"row": plan[k], "answer_ids": [results[i][0] for i in plan[k]],
                                  "stopped": [results[i][1] for i in plan[k]]})
            chunks.put(k, capture.finish_chunk(k, frame) if capture is not None else frame)
    bar.close()
    return results


def run_generate(
    lm: ModelBackend,
    questions: pd.DataFrame,
    *,
    template: str | None = None,
    max_new_tokens: int = 24,
    batch_size: int | None = None,
    progress: bool = True,
    chunks=None,
    long_prompts: str = "truncate",
    protocol: str = PROTOCOLS[0],
    capture_sites: list[str] | None = None,
) -> pd.DataFrame:
    """The generations table for ``questions`` (see the module docstring for its columns).

    ``chunks``: a ChunkStore that makes the generation resumable; ``long_prompts``: what to do with a
    prompt too long for the context, ``truncate`` (cut its middle) or ``skip`` (leave the question out);
    ``protocol``: how the tasks phrase their prompts (brief or reference).
    ``capture_sites``: read these sites' states and the token scores while answering (capture.py; with
    ``chunks`` only), which adds the columns ``token_prob`` and ``token_entropy``.
    """
    if long_prompts not in LONG_PROMPTS:
        raise TruthmapError(f"long_prompts '{long_prompts}': use one of {', '.join(LONG_PROMPTS)}")
    prompts = task_prompts(lm.tokenizer, questions, template, protocol)
    prompt_ids = [encode_prompt(lm.tokenizer, p) for p in prompts]
    ids = questions["id"].tolist()
    room = prompt_room(lm, max_new_tokens)
    cut = [0] * len(prompt_ids)
    if room is not None:
        if long_prompts == "skip":
            keep = [i for i, p in enumerate(prompt_ids) if len(p) <= room]
            ids, prompts, prompt_ids = [ids[i] for i in keep], [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
            cut = [0] * len(keep)
            if not keep:
                raise TruthmapError(f"every prompt is longer than the model's room of {room} prompt tokens; "
                                    f"use --long-prompts truncate")
        for i, p in enumerate(prompt_ids):
            if len(p) > room:
                cut[i] = len(p) - room
                prompt_ids[i] = fit_prompt(p, room)
                prompts[i] = lm.tokenizer.decode(prompt_ids[i], skip_special_tokens=False)
    capture = None
    if capture_sites and chunks is not None:
        from .capture import ChunkCapture

        capture = ChunkCapture(lm, chunks, capture_sites)
    answers = generate_answers(lm, prompt_ids, max_new_tokens, batch_size, progress, chunks=chunks, capture=capture)
    scores = capture.columns(len(answers)) if capture is not None and capture.plan is not None else {}
    return pd.DataFrame(
        {
            "id": ids,
            "prompt": prompts,
            "prompt_ids": prompt_ids,
            "prompt_cut": cut,
            "answer_ids": [a for a, _ in answers],
            "answer": [decode_answer(lm.tokenizer, a) for a, _ in answers],
            "stopped": [s for _, s in answers],
            **scores,
        }
    )


# ---------------------------------------------------------------- the stage

def _dataset_file(c: Config) -> list[Path]:
    """A local dataset file is an input: editing it makes the answers stale (TASK:PATH and --data-dir too)."""
    _, source = resolve(c.dataset, c.data_dir)
    return [source.path] if source.kind == "file" else []


def _question_settings(c: Config) -> tuple:
    """The settings that decide the questions and their checks (the key of what preflight read)."""
    return tuple(getattr(c, name) for name in ("dataset", "limit", "question_column", "answer_column", "data_dir",
                                               "on_bad_row", "protocol", "test_fraction", "validation_fraction",
                                               "min_per_class", "samples"))


def _checked_questions(c: Config) -> tuple[pd.DataFrame, dict]:
    """(questions, vocabularies) of the study, its modes announced and its size checked (preflight.py)."""
    questions, vocabularies = load_questions(c.dataset, c.limit, 0, c.question_column, c.answer_column,
                                             c.data_dir, c.on_bad_row, c.protocol)
    check_questions(questions, c)
    return questions, vocabularies


# the questions read and checked before a new run folder was made, used once by generate (same settings)
_PRELOADED: dict[tuple, tuple[pd.DataFrame, dict]] = {}


def preflight(config: Config) -> None:
    """Before a new run folder is made: the model is found, the questions read, modes announced and the
    size checked — a refused input leaves no folder behind (the generate stage uses what was read)."""
    Models(config, on_workers=True).check()
    _PRELOADED[_question_settings(config)] = _checked_questions(config)


def forget_preflight() -> None:
    """Drop what :func:`preflight` read and generate did not use (a run that stopped before it)."""
    _PRELOADED.clear()


def _generate(s: StageRun) -> None:
    c, run = s.config, s.run
    s.models.check()  # an unknown model fails before the questions are read (a hub dataset may be large)
    questions, vocabularies = _PRELOADED.pop(_question_settings(c), None) or _checked_questions(c)
    max_new_tokens = answer_length(questions["task"], c.max_new_tokens, c.protocol)
    run.write_parquet(rf.QUESTIONS, questions)
    run.write_json(rf.VOCABULARIES, vocabularies)
    lm = s.models.lm
    # finished chunks of an interrupted generation with the same settings and model are kept
    if s.force:  # --force: answer anew, not from saved chunks
        run.remove(rf.GENERATION_CHUNKS)
    chunks = run.chunks(rf.GENERATION_CHUNKS, f"{s.stamp} {lm.revision}")
    # one pass: the states of every site and the token scores are read while the model answers
    capture_sites = c.sites if c.extract == "onepass" else None
    table = run_generate(lm, questions, template=c.prompt_template, max_new_tokens=max_new_tokens,
                         batch_size=c.batch_size, progress=c.progress, chunks=chunks,
                         long_prompts=c.long_prompts, protocol=c.protocol, capture_sites=capture_sites)
    run.write_parquet(rf.GENERATIONS, table)
    run.update_summary(model=c.model, model_revision=lm.revision, dataset=c.dataset,
                       tasks=sorted(set(questions["task"])), source_rows=questions.attrs["source_rows"],
                       n_layers=lm.n_layers, hidden_size=lm.hidden_size,
                       generation={"protocol": c.protocol, "max_new_tokens": max_new_tokens,
                                   "answers_end_at_line_break": answers_one_line(lm.tokenizer)},
                       long_prompts={"mode": c.long_prompts, "context_tokens": lm.context_length(),
                                     "truncated": int((table["prompt_cut"] > 0).sum()),
                                     "skipped": len(questions) - len(table)})


register(Stage(
    "generate", "1", "The model answers every question (generations.parquet).", _generate,
    inputs=(), outputs=(rf.QUESTIONS, rf.VOCABULARIES, rf.GENERATIONS),
    settings=fields("model", "dataset", "limit", "protocol", "prompt_template", "max_new_tokens", "dtype",
                    "question_column", "answer_column", "long_prompts", "data_dir", "on_bad_row"),
    model="workers", sources=_dataset_file))
