"""The architecture matrix's models and checks: tiny random-weight models of many families, saved as
Hugging Face folders, run through truthmap's model paths and compared with slow references.

Used by tests/arch/test_matrix.py (tiny configs, CPU) and bench/gpu.py (real shapes, GPU). Every check
compares what truthmap computes with what a plain, unbatched, uncached forward pass of the same model
gives at the same token positions:

* greedy answers of a batch (left-padded, a shared beginning computed once) equal the answers of each
  prompt alone;
* the states captured while generating (capture.py) and those of the separate pass (extract.py) equal
  ``output_hidden_states`` of a plain forward (residual rows 0..L-1; row L is the last block's output,
  before the final norm, read by a hook on that block) and the outputs of the attention and MLP
  sub-modules in that forward (hooks on the modules truthmap names); for families whose blocks simply
  add those outputs to the residual stream, residual row l - row l-1 equals attention + MLP of block l;
* the token probabilities and entropies (captured, and the backend's token_statistics) equal the softmax of
  the model's own logits (``model(ids).logits``: soft-capping included) of one unpadded forward;
* p(True) (both paths of baselines.py) equals P(B) / (P(A) + P(B)) of the next token of each prompt
  alone, from the model's own logits.

Tolerances: ``TOLERANCE[dtype]`` times the largest magnitude of the compared vector (float32: the float16
store's rounding; bfloat16: the model's own arithmetic differs between a cached step and a full pass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TOLERANCE = {"float32": 2e-3, "bfloat16": 6e-2}
PROB_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}

# ---------------------------------------------------------------------- the tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer(chat: bool):
    """A byte-level tokenizer without merges (256 byte tokens + 6 specials): every text encodes, the option
    letters and the line break are tokens of their own. ``chat``: with a chat template and ``<|end|>`` as
    its end of turn (else a base model: ``<bos>`` begins a prompt, ``<eos>`` ends text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<|end|>" if chat else "<eos>",
                                        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


VOCAB = 262  # byte_tokenizer's size


# ---------------------------------------------------------------------- the families

@dataclass(frozen=True)
class Family:
    """One architecture: its transformers config class and the tiny shape the matrix builds.

    ``additive``: the block adds its attention and MLP outputs to the residual stream unchanged (no
    norm after them), so residual row l - row l-1 = attention + MLP of block l."""

    name: str
    config: str  # class name in transformers
    shape: dict = field(default_factory=dict)
    additive: bool = True
    why: str = ""  # what the family brings to the matrix


_ROTARY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = [
    Family("llama", "LlamaConfig", _ROTARY, why="the reference family"),
    Family("mistral", "MistralConfig", {**_ROTARY, "sliding_window": 24}, why="sliding-window attention"),
    Family("mixtral", "MixtralConfig", {**_ROTARY, "num_local_experts": 4, "num_experts_per_tok": 2,
                                        "sliding_window": None}, why="mixture of experts"),
    Family("qwen2", "Qwen2Config", _ROTARY, why="attention biases"),
    Family("qwen3", "Qwen3Config", {**_ROTARY, "head_dim": 8}, why="query/key norms"),
    Family("gemma2", "Gemma2Config", {**_ROTARY, "head_dim": 8, "sliding_window": 24,
                                      "final_logit_softcapping": 5.0, "attn_logit_softcapping": 20.0},
           additive=False, why="soft-capped logits, hybrid cache, scaled embeddings, post-norms"),
    Family("gemma3", "Gemma3TextConfig", {**_ROTARY, "head_dim": 8, "sliding_window": 24,
                                          "final_logit_softcapping": 5.0, "layer_types": ["sliding_attention",
                                                                                       "full_attention"]},
           additive=False, why="hybrid cache, scaled embeddings, post-norms"),
    Family("phi3", "Phi3Config", _ROTARY, why="fused projections"),
    Family("gpt2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
           why="absolute positions, Conv1D"),
    Family("gpt_neox", "GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=256),
           why="parallel residual, partial rotary"),
    Family("opt", "OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=256, word_embed_proj_dim=32),
           why="learned positions offset by 2, MLP without a module of its own"),
    Family("falcon", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          new_decoder_architecture=True, num_kv_heads=2,
                                          max_position_embeddings=256), why="parallel attention"),
    Family("olmo2", "Olmo2Config", _ROTARY, additive=False, why="post-norms, query/key norms"),
]
FAMILY = {f.name: f for f in FAMILIES}


def save_tiny_model(family: Family, chat: bool, folder: Path, seed: int = 0) -> Path:
    """A random-weight model of ``family`` with :func:`byte_tokenizer`, saved (float32) in ``folder``."""
    import transformers

    eos = 5 if chat else 2
    config = getattr(transformers, family.config)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=eos,
                                                  pad_token_id=0, **family.shape)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights larger than the usual init: peaked next-token distributions, few near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    byte_tokenizer(chat).save_pretrained(folder)
    return Path(folder)


# ---------------------------------------------------------------------- the checks

SITES = ["residual", "mlp", "attention"]
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "What is 7 times 6?",
    "Which planet is the largest in the solar system?",
    "Which metal is liquid at room temperature?",
    "In which year did the Berlin Wall fall, and who was the chancellor then?",
]
PROPOSED = ["Paris", "Marlowe", "42", "Saturn", "Mercury", "1989"]


class Mismatch(AssertionError):
    """A check of the matrix failed: the message names the family, the check and the worst difference."""


def prompt_ids(lm, questions=QUESTIONS) -> list[list[int]]:
    """The study's prompts (generate.build_prompt / encode_prompt) of ``questions``, as token ids."""
    from truthmap.backends.base import build_prompt, encode_prompt

    return [encode_prompt(lm.tokenizer, build_prompt(lm.tokenizer, q)) for q in questions]


@torch.inference_mode()
def plain_forward(lm, ids: list[int]) -> dict:
    """One sequence alone, no padding, no cache: site -> float32 ``[R, T, d]`` and ``logp`` ``[T, V]``.

    Residual rows 0..L-1 are ``output_hidden_states``; row L is the last block's output (transformers
    gives it after the final norm); mlp and attention rows 1..L are the outputs of the sub-modules that
    truthmap reads (``LoadedModel.site_modules``) in this same forward."""
    found, handles = {"mlp": [], "attention": [], "last": []}, []

    def keep(name):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden if hidden.dim() == 2 else hidden[0]  # OPT's fc2 gives [B * T, d], here [T, d]
            found[name].append(hidden.float().clone())  # a copy: Falcon adds to its MLP's output in place
        return hook

    for site in ("mlp", "attention"):
        handles += [m.register_forward_hook(keep(site)) for m in lm.site_modules(site)]
    handles.append(lm.blocks[-1].register_forward_hook(keep("last")))
    try:
        out = lm.model(input_ids=torch.tensor([ids], device=lm.device), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hidden = [h[0].float() for h in out.hidden_states]
    if len(hidden) != lm.n_layers + 1:
        raise Mismatch(f"{lm.model_id}: {len(hidden)} hidden states for {lm.n_layers} blocks")
    residual = torch.stack(hidden[:-1] + found["last"])
    return {"residual": residual.cpu().numpy(), "mlp": torch.stack(found["mlp"]).cpu().numpy(),
            "attention": torch.stack(found["attention"]).cpu().numpy(),
            "logp": torch.log_softmax(out.logits[0].float(), dim=-1).cpu().numpy()}


def every_position(n_prompt: list[int], n_answer: list[int]) -> np.ndarray:
    """Index ``[n, 1 + longest answer]``: the prompt's last token, then every answer token (-1 past the end)."""
    index = np.full((len(n_prompt), 1 + max(n_answer)), -1)
    for i, (p, a) in enumerate(zip(n_prompt, n_answer)):
        index[i, 0] = p - 1
        index[i, 1 : 1 + a] = np.arange(p, p + a)
    return index


def close(name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> float:
    """The worst difference of ``got`` and ``want`` (``[..., d]``) relative to the largest magnitude of
    each vector of ``want``; raises :class:`Mismatch` beyond ``tolerance``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"{name}: shape {got.shape}, expected {want.shape}")
    if np.count_nonzero(want) < 0.5 * want.size:
        raise Mismatch(f"{name}: most reference values are 0, the check would check little")
    scale = np.abs(want).max(axis=-1, keepdims=True) + 1e-6
    worst = float((np.abs(got - want) / scale).max()) if got.size else 0.0
    if not worst <= tolerance:
        raise Mismatch(f"{name}: differs by {worst:.2e} of the vector's largest value (tolerance {tolerance:.0e})")
    return worst


def same_answers(name: str, got: list, want: list, references: list[dict], n_prompt: list[int], dtype: str) -> int:
    """Greedy answers equal, except that in bfloat16 two answers may part where the reference's two
    likeliest tokens are within its own rounding (a tie the arithmetic of a batch may break either way);
    returns how many answers parted so. float32 answers must be equal."""
    parted = 0
    for i, ((a, _), (b, _)) in enumerate(zip(got, want)):
        if a == b:
            continue
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        logp = references[i]["logp"][n_prompt[i] - 1 + k] if references else None
        if dtype == "bfloat16" and logp is not None:
            top = np.sort(logp)[-2:]
            if top[1] - top[0] <= 0.05:
                parted += 1
                continue
        raise Mismatch(f"{name}: answer {i} differs at token {k}: {a} vs {b}")
    return parted


def check_additive(name: str, reference: dict, tolerance: float = 1e-4) -> float:
    """Residual row l - row l-1 = attention + MLP output of block l (blocks that add both to the stream):
    the sub-modules truthmap reads are the ones whose outputs make the residual stream."""
    residual = reference["residual"]
    return close(f"{name}: residual step vs attention + mlp", residual[1:] - residual[:-1],
                 reference["attention"] + reference["mlp"], tolerance)


def check_model(lm, folder: Path, dtype: str, max_new_tokens: int = 8, additive: bool = False) -> dict:
    """Run every check on the loaded model ``lm`` (``additive``: also :func:`check_additive`, float32 only);
    returns the worst difference of each check (raises :class:`Mismatch` beyond its tolerance)."""
    import pandas as pd

    from truthmap import runfolder as rf
    from truthmap.positions import site_rows
    from truthmap.backends.hf import extract_shard
    from truthmap.stages.baselines import p_true, p_true_variants
    from truthmap.stages.capture import CaptureReader, ChunkCapture
    from truthmap.stages.generate import generate_answers

    tol, ptol, name = TOLERANCE[dtype], PROB_TOLERANCE[dtype], f"{lm.model_id} {dtype}"
    prompts = prompt_ids(lm)
    report = {}
    # generate with capture, all prompts in one left-padded batch; then each prompt alone
    chunks = rf.ChunkStore(Path(folder) / rf.GENERATION_CHUNKS, "arch")
    capture = ChunkCapture(lm, chunks, SITES)
    batched = generate_answers(lm, prompts, max_new_tokens, len(prompts), progress=False, chunks=chunks,
                               capture=capture)
    alone = generate_answers(lm, prompts, max_new_tokens, 1, progress=False)
    plain = generate_answers(lm, prompts, max_new_tokens, len(prompts), progress=False)
    sequences = [p + a for p, (a, _) in zip(prompts, batched)]
    n_prompt, n_answer = [len(p) for p in prompts], [len(a) for a, _ in batched]
    references = [plain_forward(lm, s) for s in sequences]
    report["answers parted at near-ties"] = (same_answers(f"{name}: batched vs alone", batched, alone, references,
                                                          n_prompt, dtype)
                                             + same_answers(f"{name}: capturing vs plain", batched, plain,
                                                            references, n_prompt, dtype))
    if not any(n_answer):
        raise Mismatch(f"{name}: every answer is empty, nothing was checked")
    if additive and dtype == "float32":
        report["residual step = attention + mlp"] = max(check_additive(name, r) for r in references)

    # features: captured, and the separate pass, against the plain forward
    index = every_position(n_prompt, n_answer)
    ids = [f"q{i}" for i in range(len(prompts))]
    frame = pd.DataFrame({"id": ids, "prompt_ids": prompts, "answer_ids": [a for a, _ in batched]})
    reader = CaptureReader(Path(folder), frame)
    store = {s: np.zeros((len(site_rows(lm, s)), index.shape[1], len(ids), lm.hidden_size), np.float16)
             for s in SITES}
    missing = reader.fill(store, SITES, ids, np.array(n_prompt), np.array(n_answer), index)
    if missing:
        raise Mismatch(f"{name}: the capture lacks examples {missing}")
    separate = extract_shard(lm, sequences, index, ids, [str(p) for p in range(index.shape[1])], SITES, batch_size=4)
    for site in SITES:
        want = np.zeros_like(separate[site], dtype=np.float32)  # [R, P, n, d]
        for n, ref in enumerate(references):
            valid = index[n] >= 0
            want[:, valid, n] = ref[site][:, index[n][valid]]
        report[f"{site} captured"] = close(f"{name}: {site} captured", store[site], want, tol)
        report[f"{site} separate"] = close(f"{name}: {site} separate pass", separate[site], want, tol)

    # token statistics: captured and the slow path, against the plain forward's own logits
    scores = capture.columns(len(prompts))
    slow = lm.token_statistics(sequences, n_prompt)
    worst = 0.0
    for i, ref in enumerate(references):
        steps = np.arange(n_prompt[i] - 1, len(sequences[i]) - 1)
        prob = np.exp(ref["logp"][steps, sequences[i][n_prompt[i]:]])
        entropy = -(np.exp(ref["logp"][steps]) * ref["logp"][steps]).sum(-1)
        for label, (p, e) in (("captured", (scores["token_prob"][i], scores["token_entropy"][i])), ("slow", slow[i])):
            if p is None:
                raise Mismatch(f"{name}: answer {i} has no captured token scores")
            diff = max(np.abs(np.log(np.asarray(p, np.float64)) - np.log(prob)).max(initial=0),
                       np.abs(np.asarray(e) - entropy).max(initial=0))
            if not diff <= ptol:
                raise Mismatch(f"{name}: token statistics ({label}) of answer {i} differ by {diff:.2e}")
            worst = max(worst, float(diff))
    report["token statistics"] = worst

    # p(True): both paths of baselines.py against each prompt alone
    from truthmap.stages.baselines import letter_token_ids, p_true_prompt
    from truthmap.backends.base import encode_prompt

    a_ids, b_ids = letter_token_ids(lm.tokenizer)
    proposals = [PROPOSED, [f"{p}, I think" for p in PROPOSED]]
    want = np.zeros((2, len(QUESTIONS)))
    for v, proposed in enumerate(proposals):
        for i, (q, p) in enumerate(zip(QUESTIONS, proposed)):
            logp = plain_forward(lm, encode_prompt(lm.tokenizer, p_true_prompt(lm.tokenizer, q, p)))["logp"][-1]
            mass_a, mass_b = np.exp(logp[a_ids]).sum(), np.exp(logp[b_ids]).sum()
            want[v, i] = mass_b / (mass_a + mass_b)
    got = {"one variant": p_true(lm, QUESTIONS, PROPOSED)[None],
           "shared prefix": p_true_variants(lm, QUESTIONS, proposals)}
    for label, value in got.items():
        diff = float(np.abs(value - want[: len(value)]).max())
        if not diff <= ptol:
            raise Mismatch(f"{name}: p(True) ({label}) differs by {diff:.2e}")
        report[f"p(True) {label}"] = diff
    return report
