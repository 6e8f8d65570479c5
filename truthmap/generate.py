"""Stage 1 — the model answers every question greedily.

Reads the questions table; writes ``generations.parquet``: one row per question with
``id, prompt (str), prompt_ids (list[int]), answer_ids (list[int], the end-of-turn token included when
the model emitted one), answer (str, decoded without special tokens), stopped (bool, an end-of-turn
token was emitted before max_new_tokens)``.

Prompts use the tokenizer's chat template with ``add_generation_prompt=True`` when it has one, and a
raw ``Q: … A:`` prompt otherwise. Batches are left-padded and sorted by length (fewer pad tokens);
on a CUDA out-of-memory error the batch is halved and retried, finished batches are kept.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from .models import LoadedModel

DEFAULT_TEMPLATE = "{question} Answer briefly."


def build_prompt(tokenizer, question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt text for one question: chat template if the tokenizer has one, else 'Q: … A:'."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": template.format(question=question)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"Q: {question}\nA:"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt. A chat template already holds its special tokens; a raw prompt gets BOS."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def end_of_turn_ids(lm: LoadedModel) -> list[int]:
    """Token ids that end an answer: the generation config's EOS id(s) and the tokenizer's."""
    ids = lm.model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if lm.tokenizer.eos_token_id is not None:
        ids.append(lm.tokenizer.eos_token_id)
    return sorted(set(ids))


def auto_batch_size(lm: LoadedModel, longest: int) -> int:
    """A first batch size: 16 on the CPU; on a GPU, what the KV cache of ``longest`` tokens leaves room for."""
    if lm.device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(lm.device)
    config = lm.model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * lm.n_layers * heads * head_dim * lm.model.dtype.itemsize
    # the cache plus a generous allowance for activations and logits of the same size
    per_sequence = longest * (3 * bytes_per_token + 4 * config.vocab_size // max(longest, 1))
    return int(max(1, min(256, 0.5 * free // max(per_sequence, 1))))


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


@torch.inference_mode()
def _generate_batch(lm, batch, max_new_tokens, stop_ids, sample=None):
    input_ids, mask = _left_pad(batch, lm.tokenizer.pad_token_id)
    device = lm.device
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sample is not None:  # (temperature, torch.Generator seed) for resampling
        kwargs = dict(do_sample=True, temperature=sample[0], top_p=1.0, top_k=0)
    out = lm.model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=stop_ids,
        **kwargs,
    )
    results = []
    for row in out[:, input_ids.shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row if stop is None else row[: stop + 1], stop is not None))
    return results


def generate_answers(
    lm: LoadedModel,
    prompt_ids: list[list[int]],
    max_new_tokens: int = 24,
    batch_size: int | None = None,
    progress: bool = True,
    sample: tuple[float, int] | None = None,
) -> list[tuple[list[int], bool]]:
    """Answer ids and stopped-flag for each prompt, in the order given."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    stop_ids = end_of_turn_ids(lm)
    if sample is not None:
        torch.manual_seed(sample[1])
    if batch_size is None:
        batch_size = auto_batch_size(lm, max((len(p) for p in prompt_ids), default=1) + max_new_tokens)
    results: list = [None] * len(prompt_ids)
    bar = tqdm(total=len(order), desc="generate", unit="q", disable=not progress)
    start = 0
    while start < len(order):
        chunk = order[start : start + batch_size]
        try:
            answers = _generate_batch(lm, [prompt_ids[i] for i in chunk], max_new_tokens, stop_ids, sample)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            continue
        for i, answer in zip(chunk, answers):
            results[i] = answer
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return results


def decode_answer(tokenizer, answer_ids: list[int]) -> str:
    return tokenizer.decode(answer_ids, skip_special_tokens=True)


def run_generate(
    lm: LoadedModel,
    questions: pd.DataFrame,
    template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 24,
    batch_size: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The generations table for ``questions`` (see the module docstring for its columns)."""
    prompts = [build_prompt(lm.tokenizer, q, template) for q in questions["question"]]
    prompt_ids = [encode_prompt(lm.tokenizer, p) for p in prompts]
    answers = generate_answers(lm, prompt_ids, max_new_tokens, batch_size, progress)
    return pd.DataFrame(
        {
            "id": questions["id"].tolist(),
            "prompt": prompts,
            "prompt_ids": prompt_ids,
            "answer_ids": [a for a, _ in answers],
            "answer": [decode_answer(lm.tokenizer, a) for a, _ in answers],
            "stopped": [s for _, s in answers],
        }
    )
