"""Helpers for model-free tests of the analyses: a synthetic run folder and a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

POSITIONS = ["last_q", "-1"]


def make_run(folder: Path, n: int = 120, d: int = 8, layers: int = 3, seed: int = 0, direction: float = 1.0,
             model: str = "tiny-model", dataset: str = "toy", families=("a", "b"), first_question: int = 0,
             repeat: int = 1) -> Path:
    """A run folder with answers, splits (seeds 0 and 1), config, summary and residual activations.

    Error depends on feature 0 of layer 1 at position -1 (sign ``direction``); everything else is noise.
    Answer i asks "question {first_question + i // repeat} of {dataset}?": runs of one dataset share
    the questions their numbers share; ``repeat`` consecutive answers ask one question and are copies
    (same label, same features).
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "activations" / "residual").mkdir(parents=True, exist_ok=True)
    ids = [f"{dataset}-{first_question + i}" for i in range(n)]
    source = np.arange(n) // repeat  # the answer each one copies
    error = (rng.random(n) < 0.5)[source]
    X = rng.normal(size=(layers, len(POSITIONS), n, d)).astype(np.float32)[:, :, source]
    X[1, 1, :, 0] += direction * np.where(error, 1.5, -1.5)
    valid = np.ones((n, len(POSITIONS)), bool)
    valid[:5, 1] = False  # a few answers without the position
    X[:, 1, :5] = 0
    family = [families[i % len(families)] for i in range(n)]
    questions = [f"question {first_question + k} of {dataset}?" for k in source]
    answers = pd.DataFrame({"id": ids, "question": questions, "gold": [["x"]] * n,
                            "family": family, "subgroup": "", "prompt": [f"<u>{q}</u>" for q in questions],
                            "answer": "x", "correct": ~error, "exact_answer": "x", "exact_answer_valid": True,
                            "exact_answer_reason": "gold_alias", "exact_answer_start": 0, "exact_answer_end": 1})
    answers["n_prompt_tokens"] = 6
    answers["n_answer_tokens"] = 3 + np.arange(n) % 5
    answers.to_parquet(folder / "answers.parquet", index=False)
    pd.DataFrame({"id": ids, "prompt": answers["prompt"], "prompt_ids": [[5] * 6] * n,
                  "answer_ids": [[7] * int(k) for k in answers["n_answer_tokens"]], "answer": "x",
                  "stopped": np.arange(n) % 3 > 0}).to_parquet(folder / "generations.parquet", index=False)
    splits = {"test_fraction": 0.35, "validation_fraction": 0.25, "population": "common", "n": n, "left_out": {},
              "groups": {"n": n, "largest": 1}, "seeds": {}}
    n_test, n_val = int(0.35 * n), int(0.25 * n)
    test = np.random.default_rng(100).permutation(n)[:n_test]  # one test part, as truthmap/splits.py draws
    rest = np.setdiff1d(np.arange(n), test)
    for s in (0, 1):
        part = np.full(n, "test", dtype=object)
        part[np.random.default_rng(100 + s).permutation(rest)] = ["validation"] * n_val + ["train"] * (len(rest) - n_val)
        splits["seeds"][str(s)] = {name: [i for i, p in zip(ids, part) if p == name] for name in ("train", "validation", "test")}
    splits["test"] = splits["seeds"]["0"]["test"]
    (folder / "splits.json").write_text(json.dumps(splits))
    (folder / "config.json").write_text(json.dumps({"model": model, "dataset": dataset, "max_new_tokens": 8}))
    (folder / "summary.json").write_text(json.dumps({"model_revision": "rev1", "dataset": dataset,
                                                     "best_cell": {"site": "residual", "layer": 1, "position": "-1"}}))
    np.save(folder / "activations" / "valid.npy", valid)
    np.save(folder / "activations" / "residual" / "shard-00000.npy", X.astype(np.float16))
    index = {"ids": ids, "positions": POSITIONS, "hidden_size": d, "dtype": "float16",
             "sites": {"residual": {"layers": list(range(layers)),
                                    "shards": [{"file": "residual/shard-00000.npy", "start": 0, "stop": n}]}}}
    (folder / "activations" / "index.json").write_text(json.dumps(index))
    return seal(folder)


def seal(folder: Path, stage: str = "label") -> Path:
    """List every file of ``folder`` in its manifest, as truthmap does when it writes them: a synthetic run
    folder that readers accept (they verify each file read against the manifest)."""
    import hashlib

    files = {}
    for path in sorted(Path(folder).rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_file() and key not in ("manifest.json", "lock"):
            files[key] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                          "stage": stage}
    (Path(folder) / "manifest.json").write_text(json.dumps({"version": 1, "files": files}))
    return folder


def tiny_model(layers: int = 2, vocab: int = 40, seed: int = 0):
    """A random 2-layer Llama wrapped as a LoadedModel (no download), with a stand-in tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from truthmap.backends.hf import LoadedModel

    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    tokenizer = SimpleNamespace(pad_token_id=0, all_special_ids=[0])
    return LoadedModel(model=model, tokenizer=tokenizer, model_id="tiny", source="tiny", gguf_file=None,
                       revision="r", n_layers=layers, hidden_size=16, blocks=model.model.layers,
                       embeddings=model.model.embed_tokens)


def prompts(n: int = 37) -> list[list[int]]:
    """Token-id prompts of varied lengths (1 to 11 tokens), for generation without a model."""
    return [[2 + i] * (1 + (i * 7) % 11) for i in range(n)]


def fake_model(**fields):
    """An in-process model backend (truthmap.backends.hf.LoadedModel) without weights, for tests that replace
    the functions that would run it (``fake_generation``)."""
    from truthmap.backends.hf import LoadedModel

    values = dict(model=None, tokenizer=SimpleNamespace(pad_token_id=0), model_id="fake", source="fake",
                  gguf_file=None, revision="fake", n_layers=2, hidden_size=4, blocks=None, embeddings=None)
    return LoadedModel(**{**values, **fields})


def fake_remote(workers, **fields):
    """The model backend of a Ray pool (truthmap.backends.ray.RemoteModel) whose ``workers`` is a stand-in."""
    from truthmap.backends.ray import RemoteModel

    values = dict(model=None, tokenizer=SimpleNamespace(pad_token_id=0), model_id="fake", source="fake",
                  gguf_file=None, revision="fake", n_layers=2, hidden_size=4)
    return RemoteModel(**{**values, **fields}, workers=workers)
