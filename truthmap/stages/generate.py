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

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import runfolder as rf
from ..backend import Models
from ..config import LONG_PROMPTS, Config
from ..data import load_questions
from ..errors import TruthmapError
from ..models import LoadedModel
from ..preflight import check_questions

if TYPE_CHECKING:
    from ..backend import ModelBackend

from ..tasks import DEFAULT_BASE_PROMPT, PROTOCOLS, answer_length, get_task, resolve
from ..tasks import DEFAULT_CHAT_PROMPT as DEFAULT_TEMPLATE
from .base import Stage, StageRun, fields, register

CHUNK_BATCHES = 4  # batches per saved chunk: what a killed run can lose


def build_prompt(
    tokenizer, question: str, template: str = DEFAULT_TEMPLATE, base_template: str = DEFAULT_BASE_PROMPT, **fields
) -> str:
    """The prompt text for one question: ``template`` as the user message of the tokenizer's chat
    template when it has one, else ``base_template`` as raw text for a base model to continue.

    Both are filled with ``question`` and ``fields`` (a task's ``context``, ``question_base``).
    """
    values = {"question": question, "question_base": question, **fields}
    chat = bool(getattr(tokenizer, "chat_template", None))
    try:
        text = (template if chat else base_template).format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise TruthmapError(
            f"prompt template {(template if chat else base_template)!r}: cannot be filled ({err!r}); "
            f"use the fields {{question}} and, for tasks with a passage, {{context}}"
        ) from None
    if chat:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text


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


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt. A chat template already holds its special tokens; a raw prompt gets BOS."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def end_of_turn_ids(lm: LoadedModel) -> list[int]:
    """Token ids that end an answer: the generation config's EOS id(s) and the tokenizer's, and for a
    model without a chat template every token that holds a line break (its answer is one line)."""
    ids = lm.model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if lm.tokenizer.eos_token_id is not None:
        ids.append(lm.tokenizer.eos_token_id)
    if answers_one_line(lm.tokenizer):
        ids += line_break_ids(lm.tokenizer)
    return sorted(set(ids))


def answers_one_line(tokenizer) -> bool:
    """True for a model without a chat template: its answer ends at its first line break."""
    return not getattr(tokenizer, "chat_template", None)


def line_break_ids(tokenizer) -> list[int]:
    """Ids of every token whose text holds a line break ("\\n", "\\n\\n", ".\\n", …), found once per tokenizer.

    A single "\\n" id would miss the merged tokens that many vocabularies have."""
    cached = getattr(tokenizer, "_truthmap_line_break_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = [i for i, text in enumerate(texts) if "\n" in text]
        tokenizer._truthmap_line_break_ids = cached
    return cached


CPU_BATCH = 64  # the CPU's first batch size, when memory allows: see auto_batch_size


def auto_batch_size(lm: LoadedModel, longest: int) -> int:
    """A first batch size: what the KV cache of ``longest`` tokens leaves room for in half the GPU's free
    memory (at most 256), or on the CPU in a quarter of the available memory (at most ``CPU_BATCH``: each
    decoding step reads every weight once for the whole batch, so on 2 CPU cores the default model
    answers 192 questions 1.75× as fast at batch 64 as at 16 (96: 1.9×), with the
    same answers)."""
    if lm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.device)
        return int(max(1, min(256, 0.5 * free // _bytes_per_sequence(lm, longest))))
    if getattr(lm.model, "config", None) is None:  # not a transformers model (a scripted test model)
        return CPU_BATCH
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # a system without these counters
        return CPU_BATCH
    return int(max(1, min(CPU_BATCH, 0.25 * available // _bytes_per_sequence(lm, longest))))


def _bytes_per_sequence(lm: LoadedModel, longest: int) -> int:
    """Memory one sequence of ``longest`` tokens needs while generating: its KV cache plus a generous
    allowance for activations and logits of the same size."""
    config = lm.model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * lm.n_layers * heads * head_dim * lm.model.dtype.itemsize
    return max(1, longest * (3 * bytes_per_token + 4 * config.vocab_size // max(longest, 1)))


def context_length(lm: LoadedModel) -> int | None:
    """The longest sequence the model takes (prompt + answer), or None when it states no limit."""
    config = lm.model.config.get_text_config()
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "n_ctx")]
    limits.append(getattr(lm.tokenizer, "model_max_length", None))
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**8]  # tokenizers say 1e30 for 'none'
    return min(limits) if limits else None


def fit_prompt(prompt_ids: list[int], room: int) -> list[int]:
    """``prompt_ids`` cut to ``room`` tokens by removing tokens from the middle (start and end stay)."""
    if len(prompt_ids) <= room:
        return prompt_ids
    head = room // 2
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (room - head) :]


def prompt_room(lm: LoadedModel, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit in the context beside ``max_new_tokens`` answer tokens (None: no limit)."""
    context = context_length(lm)
    if context is None:
        return None
    if context - max_new_tokens < 8:
        raise TruthmapError(
            f"max_new_tokens {max_new_tokens}: leaves no room for a prompt in the model's context of "
            f"{context} tokens; use a smaller --max-new-tokens"
        )
    return context - max_new_tokens


# ------------------------------------------------------------ a beginning prompts share, computed once

def common_prefix(rows: list[list[int]]) -> int:
    """Tokens all ``rows`` begin with, leaving each at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows[1:]):
            return k
    return max(n, 0)


def plain_cache(cache) -> bool:
    """A cache whose rows can be repeated for several continuations (every layer a plain dynamic layer)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_argument(lm) -> str:
    """The name the model's forward gives its KV cache (``past_key_values``, or ``cache`` in newer transformers)."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.model.base_model.forward).parameters else "past_key_values"


def select_rows(lm, cache, rows: torch.Tensor):
    """A new cache holding the batch rows ``rows`` of ``cache`` (a plain dynamic cache), in that order."""
    from transformers.cache_utils import DynamicCache

    chosen = DynamicCache(config=lm.model.config)
    for index, layer in enumerate(cache.layers):
        chosen.update(layer.keys[rows], layer.values[rows], index)
    return chosen


@torch.inference_mode()
def shared_head(lm, head: list[int]):
    """The KV cache of ``head``, a beginning several prompts share (the chat template's system turn, an
    instruction …), computed once; None where the model's cache cannot be shared (sliding windows,
    linear attention …) or the model is not a transformers model."""
    from transformers import PreTrainedModel
    from transformers.cache_utils import DynamicCache

    if not head or not isinstance(lm.model, PreTrainedModel):
        return None
    cache = DynamicCache(config=lm.model.config)
    lm.model.base_model(input_ids=torch.tensor([head], device=lm.device), **{cache_argument(lm): cache},
                        use_cache=True)
    return cache if plain_cache(cache) else None


class Draws:
    """How sampled answers are drawn: at ``temperature``, from the ``top_k`` likeliest tokens (0: the whole
    vocabulary), each prompt from a random stream of its own (``seeds``, one per prompt).

    A prompt's seed comes from the run's seed, a digest of the prompt's tokens and how many times the same
    prompt came before it in the list (the n samples of a question are n different streams). Its tokens are
    drawn by the Gumbel-max trick — the likeliest token after adding independent Gumbel noise to the
    tempered logits, which is a draw from their softmax — with the noise read from its own stream, so an
    answer does not depend on the batch size, on which prompts share its batch or on free memory. (The
    logits of a row can still differ in their last bits between batchings; a draw can only change where two
    noisy scores tie to within that.)
    """

    def __init__(self, temperature: float, top_k: int, seeds: list[int]):
        self.temperature, self.top_k, self.seeds = float(temperature), int(top_k), list(seeds)

    @classmethod
    def of(cls, prompt_ids: list[list[int]], temperature: float, seed: int, top_k: int = 0) -> "Draws":
        import hashlib

        import numpy as np

        seen: dict[bytes, int] = {}
        seeds = []
        for ids in prompt_ids:
            digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()
            repeat = seen[digest] = seen.get(digest, -1) + 1
            entropy = [int(seed), int.from_bytes(digest[:16], "little"), repeat]
            seeds.append(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]))
        return cls(temperature, top_k, seeds)

    def rows(self, rows) -> "Draws":
        """The draws of the prompts at positions ``rows``, in that order."""
        return Draws(self.temperature, self.top_k, [self.seeds[i] for i in rows])

    def processor(self, device):
        """A logits processor for a greedy ``generate`` of these prompts (one batch): it adds each row's
        Gumbel noise to the tempered (top-k) logits, so the greedy step picks a drawn token."""
        from transformers import LogitsProcessor

        generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        temperature, top_k = self.temperature, self.top_k

        class _Draw(LogitsProcessor):
            def __call__(self, input_ids, scores):
                scores = scores.float() / temperature
                if 0 < top_k < scores.shape[-1]:  # as transformers' top-k: ties with the k-th stay in
                    kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                                       for g in generators])
                # Gumbel(0, 1) noise; a uniform of exactly 0 gives -inf (that token is never picked)
                return scores - torch.log(-torch.log(uniform))

        return _Draw()


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


@torch.inference_mode()
def _generate_batch(lm, batch, max_new_tokens, stop_ids, sample=None, capture=None):
    device = lm.device
    # what every prompt of the batch begins with (the chat template's system turn, an instruction …) runs
    # once and its KV cache serves every row; each prompt's own end is left-padded after it
    head = common_prefix(batch) if len(batch) > 1 else 0
    cache = shared_head(lm, batch[0][:head]) if head else None
    head = head if cache is not None else 0
    own_ids, own_mask = _left_pad([ids[head:] for ids in batch], lm.tokenizer.pad_token_id)
    input_ids = torch.cat([torch.tensor([batch[0][:head]], dtype=torch.long).expand(len(batch), head), own_ids], 1)
    mask = torch.cat([torch.ones((len(batch), head), dtype=torch.long), own_mask], 1)
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sample is not None:  # drawn: each row from its own random stream (Draws), picked by the greedy step
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([sample.processor(device)])
    kwargs.update(max_new_tokens=max_new_tokens, eos_token_id=stop_ids)
    # with a capture (capture.py), hooks read the states and token scores as the model answers
    hooks = capture.batch(len(batch), max_new_tokens, stop_ids) if capture is not None else None
    if hooks is not None and input_ids.shape[1] + max_new_tokens + 1 > (context_length(lm) or float("inf")):
        hooks = None  # no room for the step past the answer: this batch is read by the extract stage
    if hooks is not None:
        kwargs.update(hooks.generate_kwargs(input_ids.shape[1], stop_ids))
    if cache is not None:  # the head's cache, one copy per row (generate extends it)
        kwargs[cache_argument(lm)] = select_rows(lm, cache, torch.zeros(len(batch), dtype=torch.long, device=device))
    with hooks if hooks is not None else contextlib.nullcontext():
        out = lm.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                pad_token_id=lm.tokenizer.pad_token_id, **kwargs)
    results, stop_ids = [], set(stop_ids)
    for row in out[:, input_ids.shape[1] :].tolist():
        row = row[:max_new_tokens]  # a capturing generation runs one token further
        stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row if stop is None else row[: stop + 1], stop is not None))
    if hooks is not None:
        capture.add(hooks.results([len(ids) for ids, _ in results]))
    return results


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

    ``lm`` is a model backend (truthmap/backend.py): the chunks to answer go to its
    ``answer_chunks`` — here, batch after batch, or on Ray workers (:class:`truthmap.distributed.RemoteModel`),
    several at once, with the function used here (:func:`answer_prompts`); they are saved, and the
    answers returned, in the same order, so the result is the same.

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


def answer_prompts(lm: LoadedModel, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                   stop_ids: list[int], sample=None, bar=None, capture=None) -> tuple[list[tuple[list[int], bool]], int]:
    """(answer ids, stopped) of each prompt, in consecutive batches of ``batch_size``, and the batch size
    left after halving it on CUDA out-of-memory errors (finished batches are kept)."""
    results, start = [], 0
    while start < len(prompt_ids):
        batch = prompt_ids[start : start + batch_size]
        try:
            draws = sample.rows(range(start, start + len(batch))) if sample is not None else None
            results += _generate_batch(lm, batch, max_new_tokens, stop_ids, draws, capture)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            continue
        start += len(batch)
        if bar is not None:
            bar.update(len(batch))
    return results, batch_size


def decode_answer(tokenizer, answer_ids: list[int]) -> str:
    """The answer's text without special tokens; for a model without a chat template, its first line."""
    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
    return text.split("\n", 1)[0] if answers_one_line(tokenizer) else text


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
    c, run_dir = s.config, s.run_dir
    s.models.check()  # an unknown model fails before the questions are read (a hub dataset may be large)
    questions, vocabularies = _PRELOADED.pop(_question_settings(c), None) or _checked_questions(c)
    max_new_tokens = answer_length(questions["task"], c.max_new_tokens, c.protocol)
    rf.write_parquet(run_dir / rf.QUESTIONS, questions)
    rf.write_json(run_dir / rf.VOCABULARIES, vocabularies)
    lm = s.models.lm
    # finished chunks of an interrupted generation with the same settings and model are kept
    if s.force:  # --force: answer anew, not from saved chunks
        rf.remove(run_dir / rf.GENERATION_CHUNKS)
    chunks = rf.ChunkStore(run_dir / rf.GENERATION_CHUNKS, f"{s.stamp} {lm.revision}")
    # one pass: the states of every site and the token scores are read while the model answers
    capture_sites = c.sites if c.extract == "onepass" else None
    table = run_generate(lm, questions, template=c.prompt_template, max_new_tokens=max_new_tokens,
                         batch_size=c.batch_size, progress=c.progress, chunks=chunks,
                         long_prompts=c.long_prompts, protocol=c.protocol, capture_sites=capture_sites)
    rf.write_parquet(run_dir / rf.GENERATIONS, table)
    rf.update_summary(run_dir, model=c.model, model_revision=lm.revision, dataset=c.dataset,
                      tasks=sorted(set(questions["task"])), source_rows=questions.attrs["source_rows"],
                      n_layers=lm.n_layers, hidden_size=lm.hidden_size,
                      generation={"protocol": c.protocol, "max_new_tokens": max_new_tokens,
                                  "answers_end_at_line_break": answers_one_line(lm.tokenizer)},
                      long_prompts={"mode": c.long_prompts, "context_tokens": context_length(lm),
                                    "truncated": int((table["prompt_cut"] > 0).sum()),
                                    "skipped": len(questions) - len(table)})


register(Stage(
    "generate", "1", "The model answers every question (generations.parquet).", _generate,
    inputs=(), outputs=(rf.QUESTIONS, rf.VOCABULARIES, rf.GENERATIONS),
    settings=fields("model", "dataset", "limit", "protocol", "prompt_template", "max_new_tokens", "dtype",
                    "question_column", "answer_column", "long_prompts", "data_dir", "on_bad_row"),
    model="workers", sources=_dataset_file))
