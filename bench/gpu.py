"""truthmap's GPU check: one command, no network, at most 8 minutes on one H100 or H200.

    python bench/gpu.py [--examples 2000] [--batch 64] [--models llama,mistral,qwen]
    python bench/gpu.py --tiny      # the same code path on the CPU, tiny shapes (tests/arch/test_gpu_bench.py)

For each of three real shapes — Llama-3-8B, Mistral-7B (v0.1: sliding window 4096), Qwen2.5-7B (attention
biases) — it builds a randomly initialised model in bfloat16 from a config written here (weights do not
matter for speed or for the checks), with the architecture matrix's byte-level tokenizer and chat template
(tests/arch/archcheck.py), and:

1. runs the matrix's equality checks (batched greedy answers = one at a time; captured and extracted
   features = ``output_hidden_states`` and the sub-module outputs of a plain forward; token statistics and
   p(True) = the model's own logits), in bfloat16 on the device;
2. generates ``--examples`` answers (prompts of 64–128 tokens, 24 new tokens) alone and with the one-pass
   capture of every residual row: answer tokens/s, the capture's overhead, the share of the matmul peak
   (2 × parameters × tokens processed / time, against a bf16 matmul rate measured here), peak GPU memory;
3. extracts the same examples with the separate pass (extract.py) beside a bare forward with
   ``output_hidden_states``: tokens/s and share of the matmul peak;
4. fits the probes of every residual row × 4 positions on the captured features (N = ``--examples``,
   synthetic labels, 3 seeds' train parts) with truthmap's batched solver, and one cell with scikit-learn
   (the AUCs must agree within 0.01).

It prints one line per figure and, last, ``all checks passed`` or the checks that failed (exit status 1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "arch"))

from archcheck import Mismatch, byte_tokenizer, check_model  # noqa: E402

from truthmap.backends.hf import LoadedModel  # noqa: E402

SHAPES = {  # name -> (config class, the published shape)
    "llama": ("Llama-3-8B", "LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False)),
    "mistral": ("Mistral-7B-v0.1", "MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0,
        sliding_window=4096, tie_word_embeddings=False)),
    "qwen": ("Qwen2.5-7B", "Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=False)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)  # --tiny: each shape cut to this
POSITIONS = 4  # probed per row: the prompt's last token, the first, second and last answer tokens
MAX_NEW_TOKENS = 24


def timed(fn, device: str):
    """(seconds, result) of ``fn()``, the device's queue drained before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def matmul_tflops(device: str) -> float:
    """The bf16 matmul rate measured here (TFLOP/s): the peak the model's rates are shares of."""
    size = 8192 if device == "cuda" else 512
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    timed(lambda: a @ b, device)
    seconds, _ = timed(lambda: [a @ b for _ in range(10)], device)
    return 2 * size**3 * 10 / seconds / 1e12


def build(name: str, device: str, tiny: bool) -> LoadedModel:
    """A random model of the shape ``name`` in bfloat16 on ``device``, as truthmap's in-process backend."""
    import transformers

    title, config_class, shape = SHAPES[name]
    shape = {**shape, **(TINY if tiny else {})}
    config = getattr(transformers, config_class)(bos_token_id=1, eos_token_id=5, pad_token_id=0, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = 5
    return LoadedModel(model=model, tokenizer=byte_tokenizer(chat=True), model_id=f"random {title} shape",
                       source="", gguf_file=None, revision="random", n_layers=config.num_hidden_layers,
                       hidden_size=config.hidden_size, blocks=model.model.layers,
                       embeddings=model.model.embed_tokens)


def generation(lm, prompts, batch, device, peak, params) -> tuple[list, Path, float]:
    """Generation alone and with the capture of every residual row; returns (answers, capture folder,
    the capture's overhead)."""
    from truthmap.runfolder import GENERATION_CHUNKS, ChunkStore
    from truthmap.stages.capture import ChunkCapture
    from truthmap.stages.generate import generate_answers

    generate_answers(lm, prompts[:batch], MAX_NEW_TOKENS, batch, progress=False)  # warm-up
    t_plain, plain = timed(lambda: generate_answers(lm, prompts, MAX_NEW_TOKENS, batch, progress=False), device)
    folder = Path(tempfile.mkdtemp(prefix="truthmap-gpu-"))
    chunks = ChunkStore(folder / GENERATION_CHUNKS, "bench")
    capture = ChunkCapture(lm, chunks, ["residual"])
    t_capture, captured = timed(lambda: generate_answers(lm, prompts, MAX_NEW_TOKENS, batch, progress=False,
                                                         chunks=chunks, capture=capture), device)
    answer_tokens = sum(len(a) for a, _ in plain)
    processed = answer_tokens + sum(len(p) for p in prompts)
    same = sum(a == b for a, b in zip(plain, captured))
    plan = capture.plan
    print(f"  generation alone                  {answer_tokens / t_plain:>10,.0f} answer tokens/s   "
          f"{2 * params * processed / t_plain / (peak * 1e12):6.1%} of matmul peak   ({len(prompts)} prompts, "
          f"batch {batch}, {t_plain:.1f} s)")
    print(f"  generation with one-pass capture  {answer_tokens / t_capture:>10,.0f} answer tokens/s   "
          f"overhead {t_capture / t_plain - 1:+.1%}   (plan: {plan.head}+{plan.tail} answer tokens held; "
          f"{same}/{len(prompts)} answers identical to generation alone)")
    return captured, folder, t_capture / t_plain - 1


def extraction(lm, sequences, index, batch, device, peak, params) -> None:
    """The separate pass (extract.py) beside a bare batched forward with ``output_hidden_states``."""
    from truthmap.backends.hf import extract_shard

    names = [str(p) for p in range(index.shape[1])]
    order = np.argsort([len(s) for s in sequences])
    tokens = sum(len(s) for s in sequences)

    @torch.inference_mode()
    def bare():
        for b in range(0, len(order), batch):
            rows = order[b : b + batch]
            width = max(len(sequences[i]) for i in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
            lm.model(input_ids=ids.to(device), output_hidden_states=True)

    t_bare, _ = timed(bare, device)
    t_ours, _ = timed(lambda: extract_shard(lm, sequences, index, [str(i) for i in range(len(sequences))], names,
                                            ["residual"], batch), device)
    for label, seconds in (("bare forward, output_hidden_states", t_bare), ("separate extraction pass", t_ours)):
        print(f"  {label:<34}{tokens / seconds:>10,.0f} tokens/s          "
              f"{2 * params * tokens / seconds / (peak * 1e12):6.1%} of matmul peak")


def probes(lm, answers, prompts, folder, device, sklearn_cell: bool) -> list[str]:
    """Probes of every residual row × ``POSITIONS`` on the captured features; returns failed checks."""
    import pandas as pd

    from truthmap.stages.capture import CaptureReader
    from truthmap.metrics import auc_score
    from truthmap.logistic import BatchedLogisticRegression

    n = len(prompts)
    n_prompt, n_answer = np.array([len(p) for p in prompts]), np.array([len(a) for a, _ in answers])
    index = np.stack([n_prompt - 1, n_prompt, np.where(n_answer > 1, n_prompt + 1, -1), n_prompt + n_answer - 1], 1)
    index[n_answer == 0, 1:] = -1
    ids = [f"q{i}" for i in range(n)]
    frame = pd.DataFrame({"id": ids, "prompt_ids": prompts, "answer_ids": [a for a, _ in answers]})
    rows = lm.n_layers + 1
    store = {"residual": np.zeros((rows, POSITIONS, n, lm.hidden_size), np.float16)}
    missing = CaptureReader(folder, frame).fill(store, ["residual"], ids, n_prompt, n_answer, index)
    failed = [f"probes: {len(missing)} answers missing from the capture"] if missing else []
    rng = np.random.default_rng(0)
    features = store["residual"]
    # labels that a probe can find: a random direction of a middle row's first-answer-token state, plus noise
    signal = features[rows // 2, 1].astype(np.float32) @ rng.standard_normal(lm.hidden_size)
    y_np = (signal + signal.std() * rng.standard_normal(n) > np.median(signal)).astype(np.int64)
    train_np = np.stack([rng.permutation(n) < int(0.7 * n) for _ in range(3)])  # 3 seeds' train parts
    y = torch.tensor(y_np, device=device)
    train = torch.tensor(train_np, device=device)[None].expand(POSITIONS, 3, n)
    total, aucs = 0.0, []
    for row in range(rows):
        X = torch.tensor(features[row], dtype=torch.float32, device=device)  # [P, N, d]
        seconds, model = timed(lambda: BatchedLogisticRegression().fit(X, y, train), device)
        total += seconds
        if row == rows // 2:
            scores = model.predict_proba(X).cpu().numpy()  # [P, S, N]
            aucs = [float(auc_score(scores[1, 0, ~train_np[0]], y_np[~train_np[0]]))]
            X_mid = features[row, 1].astype(np.float32)
    print(f"  truthmap probes: {rows * POSITIONS} cells × 3 seeds, N = {n}, d = {lm.hidden_size}: {total:.1f} s; "
          f"test AUC of the signal cell {aucs[0]:.3f}")
    if sklearn_cell:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        tr = train_np[0]
        start = time.perf_counter()
        scaler = StandardScaler().fit(X_mid[tr])
        clf = LogisticRegression(max_iter=1000).fit(scaler.transform(X_mid[tr]), y_np[tr])
        reference = float(auc_score(clf.predict_proba(scaler.transform(X_mid[~tr]))[:, 1], y_np[~tr]))
        print(f"  scikit-learn, the same cell: {time.perf_counter() - start:.1f} s, test AUC {reference:.3f}, "
              f"|difference| {abs(reference - aucs[0]):.4f}")
        if abs(reference - aucs[0]) > 0.01:
            failed.append(f"probes: AUC {aucs[0]:.4f} vs scikit-learn {reference:.4f}")
    return failed


def run_shape(name: str, args, device: str, peak: float) -> list[str]:
    """Every step for one shape; returns the checks that failed."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    lm = build(name, device, args.tiny)
    params = sum(p.numel() for p in lm.model.parameters())
    print(f"{SHAPES[name][0]} shape: {params / 1e9:.2f} B parameters, bfloat16, built in "
          f"{time.perf_counter() - started:.0f} s")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = check_model(lm, Path(tmp), "bfloat16")
            print("  equality checks passed: " + ", ".join(f"{k} {v:.2g}" for k, v in report.items()))
        except Mismatch as err:
            print(f"  equality check FAILED: {err}")
            failed.append(str(err))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(6, 262, size=k).tolist() for k in rng.integers(64, 129, size=args.examples)]
    answers, folder, _ = generation(lm, prompts, args.batch, device, peak, params)
    sequences = [p + a for p, (a, _) in zip(prompts, answers)]
    index = np.stack([np.sort(rng.integers(0, len(s), size=15)) for s in sequences])
    extraction(lm, sequences, index, args.batch, device, peak, params)
    try:
        failed += probes(lm, answers, prompts, folder, device, sklearn_cell=name == args.models[0])
    finally:
        shutil.rmtree(folder)  # the capture files: gigabytes at real shapes
    if device == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"  {time.perf_counter() - started:.0f} s for this shape")
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()
    return [f"{SHAPES[name][0]}: {f}" for f in failed]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="answers generated and probed (N)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(SHAPES),
                        help=f"comma-separated, of {','.join(SHAPES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the code path, not the figures")
    args = parser.parse_args(argv)
    if args.tiny:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("no CUDA GPU: use --tiny to run the code path on the CPU")
    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; use {','.join(SHAPES)}")
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (--tiny)"
    print(f"truthmap GPU check — {card} — torch {torch.__version__}")
    peak = matmul_tflops(device)
    print(f"measured bf16 matmul rate: {peak:.1f} TFLOP/s")
    failed = []
    for name in args.models:
        failed += run_shape(name, args, device, peak)
    print("all checks passed" if not failed else "FAILED:\n  " + "\n  ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
