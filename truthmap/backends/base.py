"""The backend contract: everything the stages ask of a model, wherever and however it runs.

This is the ground floor of the backends wing (``truthmap/backends/``). A backend is one object that
implements :class:`ModelBackend`; the stages and analyses call its methods and never touch a model
object, a hook or an inference library themselves. The implementations:

* :class:`truthmap.backends.hf.LoadedModel` — a Hugging Face causal LM in this process (``in_process``
  true): every method works, including sampling and reading the states while generating;
* :class:`truthmap.backends.ray.RemoteModel` — the same model held by Ray workers (``in_process``
  false): the driver has the tokenizer and the model's config, no weights; answers, feature shards
  and next-token scores are computed on the workers. The methods that need the weights here say so in
  one line.

:class:`truthmap.backends.factory.Models` gives a command its backends. Adding an engine (vLLM, a
remote service) is one new module beside these and one line in the factory (docs/extending.md).

Besides the protocol this module holds what every backend shares and needs no inference library:
the capture plan of a generation (:class:`CapturePlan`), the seeds of sampled answers
(:class:`Draws`), the torch device a setting names (:func:`resolve_device`) and prompt building with
the model's tokenizer (every backend carries a Hugging Face tokenizer: :func:`build_prompt`, :func:`encode_prompt`,
:func:`decode_answer`).

Shapes, as they cross this contract: token ids are ``list[int]``; positions ``index`` are int64
``[B, P]`` (-1 where a position does not exist); a site's hidden states are float32 ``[R, B, P, d]`` for
a batch and float16 ``[R, P, n, d]`` for a stored shard, R the site's layer rows
(:func:`truthmap.positions.site_rows`), d the hidden size.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

from ..errors import TruthmapError
from ..tasks import DEFAULT_BASE_PROMPT, DEFAULT_CHAT_PROMPT


@runtime_checkable
class ModelBackend(Protocol):
    """What the stages need of the studied model. Every method is batched; the backend chooses how it
    runs (one process, workers, a service) but the answers and numbers it returns are the same."""

    tokenizer: object  # a Hugging Face tokenizer: prompt building and decoding happen with it, here
    model_id: str  # what the user asked for
    revision: str  # commit hash, sha256 prefix of a GGUF file, or "local"
    n_layers: int  # decoder blocks; residual layer rows are 0..n_layers
    hidden_size: int
    in_process: bool  # the weights are here: sampling and reading states while generating are possible

    # ------------------------------------------------------------ facts
    def describe(self) -> str:
        """One line for messages: the model and where it runs."""

    def context_length(self) -> int | None:
        """The longest sequence the model takes (prompt + answer), or None when it states no limit."""

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end an answer (the model's EOS ids and, for a model without a chat template,
        every token holding a line break: its answer is one line)."""

    def bytes_per_value(self) -> int:
        """Bytes of one hidden-state value in the model's dtype (what a capture buffer holds)."""

    def auto_batch_size(self, longest: int) -> int:
        """A first batch size for sequences of ``longest`` tokens."""

    # ------------------------------------------------------------ generate, with capture
    def answer_chunks(self, jobs: dict, max_new_tokens: int, batch_size: int, bar=None, sample=None,
                      capture=None) -> Iterator[tuple[int, list]]:
        """Answer the prompts of each chunk: ``jobs`` maps k -> prompt ids (``list[list[int]]``); yields
        (k, [(answer ids, stopped), …]) in any order, each chunk answered in consecutive batches of
        ``batch_size`` (left-padded). Answers are greedy, or drawn when ``sample`` maps k -> the
        chunk's :class:`Draws`. An answer's ids end with its end-of-turn token when it emitted one
        (``stopped``), else after ``max_new_tokens``.

        ``capture`` (with ``in_process``): an object with ``plan`` (a :class:`CapturePlan`, or None: no
        capture) and ``add(batch results)``: the backend reads each batch's states at the plan's slots
        and its token scores while generating, and hands ``add`` per batch a dict of float16 ``states``
        (site -> ``[B, slots, R, d]``), ``captured`` (answer tokens read per row) and ``token_prob`` /
        ``token_entropy`` (float32 ``[n answer tokens]`` per row)."""

    # ------------------------------------------------------------ hidden states at named positions
    def hidden_states(self, sequences: list[list[int]], index: np.ndarray, sites: list[str]) -> dict:
        """Hidden states of one batch: site -> float32 ``[R, B, P, d]`` at the positions ``index``
        ``[B, P]`` of each sequence (prompt + answer ids; cells of index -1 read token 0 and are the
        caller's to mask). Row 0 of residual is the embeddings' output, row l the output of block l;
        mlp and attention rows are the sub-module's output in blocks 1..L."""

    def feature_shards(self, jobs: dict, positions: list[str], sites: list[str], batch_size: int,
                       bar=None) -> Iterator[tuple[int, dict]]:
        """The stored features of each shard: ``jobs`` maps k -> (sequences, index ``[n, P]``, ids);
        yields (k, site -> float16 ``[R, P, n, d]``) in any order, cells of index -1 holding 0. A value
        beyond float16, or NaN, is a one-line error naming the example, site, layer row and position."""

    # ------------------------------------------------------------ token statistics and continuation scores
    def token_statistics(self, sequences: list[list[int]], n_prompt: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(probability of each answer token, entropy in nats of the distribution it was drawn from),
        float32 ``[n answer tokens]`` each, per sequence (prompt + answer; the answer starts at
        ``n_prompt[i]``). Teacher-forced: one pass, no sampling."""

    def next_token_logprobs(self, prompts: list[list[int]], token_sets: list[list[int]], batch_size: int = 16,
                            shared: list[tuple[list[int], list[int]]] | None = None) -> np.ndarray:
        """Float ``[N, S]``: the log of the probability mass the model gives each set of token ids
        ``token_sets[s]`` (a word's spellings: "A", " A" …) as the token after each prompt — the scores of
        one-token continuations: p(True) (the option letters A/B), the judge of semantic clusters and the
        lenient grader (yes/no). One forward pass per prompt, no sampling.

        ``shared`` (optional): (indices into ``prompts``, a marker prompt) per group of prompts that
        share a beginning — the same question with several proposed answers; the marker is that
        beginning with a placeholder proposal and says where the shared part ends. A backend may then
        compute each shared part once (groups are scored in their order, ``batch_size`` groups at a
        time); without it, prompts run in batches of ``batch_size`` by length."""

    def attention_weights(self, sequences: list[list[int]], index: np.ndarray) -> np.ndarray:
        """Float32 ``[L, B, P]``: the attention weight each sequence's last token pays to the positions
        ``index`` ``[B, P]`` in block l's attention, mean over heads (index -1 reads position 0)."""

    def close(self) -> None:
        """Release what the backend started (workers, a connection); the model is not used afterwards."""


# ------------------------------------------------------------------ what a capture holds per answer

@dataclass(frozen=True)
class CapturePlan:
    """Which states a generation holds per answer: slot 0 = the prompt's last token, slots 1..head =
    answer tokens 0..head-1, the next ``tail`` slots = a ring of the answer's last ``tail`` tokens."""

    sites: tuple[str, ...]
    head: int
    tail: int

    @property
    def slots(self) -> int:
        return 1 + self.head + self.tail

    def slot(self, token: int, n_answer: int) -> int | None:
        """The slot that holds answer token ``token`` of an answer of ``n_answer`` tokens (None: not held)."""
        if token < self.head:
            return 1 + token
        if self.tail and token >= n_answer - self.tail:
            return 1 + self.head + (token - self.head) % self.tail
        return None

    def write_slot(self, token: int) -> int | None:
        """The slot answer token ``token`` is written to as it is read (the ring overwrites older tokens)."""
        if token < self.head:
            return 1 + token
        return 1 + self.head + (token - self.head) % self.tail if self.tail else None

    def to_dict(self) -> dict:
        return {**asdict(self), "sites": list(self.sites)}


# ------------------------------------------------------------------ sampled answers

class Draws:
    """How sampled answers are drawn: at ``temperature``, from the ``top_k`` likeliest tokens (0: the whole
    vocabulary), each prompt from a random stream of its own (``seeds``, one per prompt).

    A prompt's seed comes from the run's seed, a digest of the prompt's tokens and how many times the same
    prompt came before it in the list (the n samples of a question are n different streams). A backend
    draws a token by the Gumbel-max trick — the likeliest token after adding independent Gumbel noise to
    the tempered logits, which is a draw from their softmax — with the noise read from the row's own
    stream, so an answer does not depend on the batch size, on which prompts share its batch or on free
    memory. (The logits of a row can still differ in their last bits between batchings; a draw can only
    change where two noisy scores tie to within that.)
    """

    def __init__(self, temperature: float, top_k: int, seeds: list[int]):
        self.temperature, self.top_k, self.seeds = float(temperature), int(top_k), list(seeds)

    @classmethod
    def of(cls, prompt_ids: list[list[int]], temperature: float, seed: int, top_k: int = 0) -> "Draws":
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


def resolve_device(device: str) -> str:
    """The torch device ``device`` names: "auto" is a CUDA device when there is one, else the CPU; a one-line
    error for a CUDA device that is not there. (The probes, plain tensor maths, run on it too.)"""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TruthmapError(f"--device '{device}': no CUDA device is available; use --device cpu")
    return device


# ------------------------------------------------------------------ facts every backend reads from a config

def end_of_turn_ids_of(eos_token_id, tokenizer) -> list[int]:
    """Token ids that end an answer: the generation config's EOS id(s) ``eos_token_id`` and the
    tokenizer's, and for a model without a chat template every token that holds a line break."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if answers_one_line(tokenizer):
        ids += line_break_ids(tokenizer)
    return sorted(set(ids))


def context_limit(config, tokenizer) -> int | None:
    """The longest sequence a model of (text) ``config`` takes with ``tokenizer``; None when neither states one."""
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "n_ctx")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**8]  # tokenizers say 1e30 for 'none'
    return min(limits) if limits else None


class ConfigFacts:
    """What a backend reads from the model's config and tokenizer, wherever its weights are: for a class
    whose ``model`` has ``config``, ``generation_config`` and ``dtype`` and that has a ``tokenizer``
    (the Hugging Face backend's model; the Ray backend's config-only copy on the driver)."""

    def context_length(self) -> int | None:
        return context_limit(self.model.config.get_text_config(), self.tokenizer)

    def end_of_turn_ids(self) -> list[int]:
        return end_of_turn_ids_of(self.model.generation_config.eos_token_id, self.tokenizer)

    def bytes_per_value(self) -> int:
        return self.model.dtype.itemsize


# ------------------------------------------------------------------ prompt building with the model's tokenizer

def build_prompt(tokenizer, question: str, template: str = DEFAULT_CHAT_PROMPT, base_template: str = DEFAULT_BASE_PROMPT,
                 **fields) -> str:
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
        return chat_prompt(tokenizer, text)
    return text


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as the user message of the tokenizer's chat template, the assistant's turn opened."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt. A chat template already holds its special tokens; a raw prompt gets BOS."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


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


def decode_answer(tokenizer, answer_ids: list[int]) -> str:
    """The answer's text without special tokens; for a model without a chat template, its first line."""
    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
    return text.split("\n", 1)[0] if answers_one_line(tokenizer) else text
