"""truthmap's GPU benchmark: one command, no network, a few minutes on one H200.

    python bench/gpu.py [--examples 2048] [--batch 64]

Builds a randomly initialised model with the shape of Llama-3-8B in bfloat16 (weights do not matter
for speed), extracts every hidden-state row (33) at 15 positions for 2048 examples of ~128 tokens with
truthmap's extraction, and fits all 495 probes on N = 10000 × 4096 synthetic features with truthmap's
batched solver; generates 24 tokens for 512 prompts with and without the one-pass capture of
every residual row. It prints extraction tokens/s, one-pass capture overhead, model FLOP utilisation (2 × parameters × tokens / time,
against the card's bf16 matmul rate, measured here), probe-training seconds, and the same work done
the reference way (one example at a time with every token kept; one scikit-learn fit per cell).
Needs torch, transformers, numpy, scikit-learn (and pandas/tqdm, which truthmap imports).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from truthmap.stages.extract import extract_batch  # noqa: E402
from truthmap.models import LoadedModel  # noqa: E402
from truthmap.stages.probe import BatchedLogisticRegression, auc_score  # noqa: E402


def cuda_time(fn, repeat=1):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat, out


def matmul_tflops(size=8192) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    cuda_time(lambda: a @ b, 3)
    seconds, _ = cuda_time(lambda: a @ b, 20)
    return 2 * size**3 / seconds / 1e12


def llama3_8b_shape() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        with torch.device("cuda"):  # its inverse frequencies are computed, not loaded: rebuild them
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    return LoadedModel(model=model, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=None), model_id="random-llama-3-8b-shape",
                       source="", gguf_file=None, revision="random", n_layers=32, hidden_size=4096,
                       blocks=model.model.layers, embeddings=model.model.embed_tokens)


def bench_extraction(lm: LoadedModel, n: int, batch: int, n_reference: int, peak: float) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(96, 161, size=n)
    sequences = [rng.integers(1, 128000, size=k).tolist() for k in lengths]
    index = np.stack([np.sort(rng.integers(0, k, size=15)) for k in lengths])
    order = np.argsort(lengths)
    batches = [order[b : b + batch] for b in range(0, n, batch)]
    tokens = int(lengths.sum())
    params = sum(p.numel() for p in lm.model.parameters())

    @torch.inference_mode()
    def bare():
        for rows in batches:
            width = int(lengths[rows].max())
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : lengths[i]] = torch.tensor(sequences[i])
            lm.model(input_ids=ids.cuda(), output_hidden_states=True)

    def ours():
        out = []
        for rows in batches:
            features = extract_batch(lm, [sequences[i] for i in rows], index[rows], ["residual"])
            out.append(features["residual"].to(torch.float16))  # what the store keeps
        return out

    @torch.inference_mode()
    def reference():  # one example at a time, every layer × every token copied out, positions picked later
        kept = []
        for i in range(n_reference):
            hidden = lm.model(input_ids=torch.tensor([sequences[i]], device="cuda"), output_hidden_states=True)
            kept.append(torch.stack(hidden.hidden_states)[:, 0].float().cpu())
        return kept

    cuda_time(lambda: extract_batch(lm, [sequences[i] for i in batches[0]], index[batches[0]], ["residual"]))
    t_bare, _ = cuda_time(bare)
    t_ours, _ = cuda_time(ours)
    t_ref, _ = cuda_time(reference)
    ref_tokens = int(lengths[:n_reference].sum())
    for name, seconds, count in (("bare forward, output_hidden_states", t_bare, tokens),
                                 ("truthmap extraction", t_ours, tokens),
                                 (f"reference per-example loop ({n_reference} examples)", t_ref, ref_tokens)):
        rate = count / seconds
        mfu = 2 * params * rate / (peak * 1e12)
        print(f"  {name:<48} {rate:>10,.0f} tokens/s   MFU {mfu:6.1%}")
    ours_rate, ref_rate = tokens / t_ours, ref_tokens / t_ref
    print(f"  extraction / bare forward (time ratio)           {t_ours / t_bare:.3f}   goal ≤ 1.15")
    print(f"  reference / extraction (per-token time ratio)    {ours_rate / ref_rate:.1f}   goal ≥ 5")
    print(f"  extraction MFU {2 * params * ours_rate / (peak * 1e12):.1%} of measured matmul rate   goal ≥ 40%")


def bench_onepass(lm: LoadedModel, n: int, batch: int, max_new_tokens: int = 24) -> None:
    """Greedy generation with the one-pass capture (every residual row of the prompt's last token and of
    every answer token, and the token scores; written to disk per chunk) beside the same generation alone."""
    import tempfile

    from truthmap.stages.capture import ChunkCapture
    from truthmap.stages.generate import generate_answers
    from truthmap.runfolder import ChunkStore

    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 128000, size=k).tolist() for k in rng.integers(64, 129, size=n)]
    generate_answers(lm, prompts[:batch], max_new_tokens, batch, progress=False)  # warm-up
    t_plain, plain = cuda_time(lambda: generate_answers(lm, prompts, max_new_tokens, batch, progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        chunks = ChunkStore(Path(tmp) / "generations", "bench")
        capture = ChunkCapture(lm, chunks, ["residual"])
        t_capture, captured = cuda_time(lambda: generate_answers(lm, prompts, max_new_tokens, batch, progress=False,
                                                                 chunks=chunks, capture=capture))
    tokens = sum(len(a) for a, _ in plain)
    same = sum(a == b for a, b in zip(plain, captured))
    print(f"  generation alone                                 {tokens / t_plain:>10,.0f} tokens/s")
    print(f"  generation with one-pass capture (plan {capture.plan.head}+{capture.plan.tail} answer tokens held)"
          f" {tokens / t_capture:>10,.0f} tokens/s")
    print(f"  capture overhead {t_capture / t_plain - 1:.1%} of generation   goal ≤ 10%; "
          f"{same}/{n} answers identical")


def bench_probes(n=10000, d=4096, layers=33, positions=15, sklearn_cells=3) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    gen = torch.Generator(device="cuda").manual_seed(0)
    latent = torch.randn(n, 16, device="cuda", generator=gen)
    y = ((latent[:, 0] + torch.randn(n, device="cuda", generator=gen)) > 0.4).long()
    train = torch.zeros(1, n, dtype=torch.bool, device="cuda")
    train[0, torch.randperm(n, device="cuda", generator=gen)[: int(0.7 * n)]] = True
    total, kept = 0.0, None
    for layer in range(layers):
        X = (latent @ torch.randn(positions, 16, d, device="cuda", generator=gen)
             + 3 * torch.randn(positions, n, d, device="cuda", generator=gen) + 20)
        seconds, model = cuda_time(lambda: BatchedLogisticRegression().fit(X, y, train.expand(positions, 1, n)))
        total += seconds
        if layer == layers // 2:
            kept = (X[:sklearn_cells].cpu().numpy(), model.predict_proba(X[:sklearn_cells]).cpu().numpy())
        X = None  # the layer's features leave the GPU before the next layer's are made
    print(f"  truthmap probes: {layers * positions} cells, N={n}, d={d}: {total:.1f} s   goal ≤ 10 s")
    X_np, p = kept
    y_np, tr = y.cpu().numpy(), train[0].cpu().numpy()
    start, diffs = time.perf_counter(), []
    for c in range(sklearn_cells):
        scaler = StandardScaler().fit(X_np[c][tr])
        clf = LogisticRegression(max_iter=1000).fit(scaler.transform(X_np[c][tr]), y_np[tr])
        ref = clf.predict_proba(scaler.transform(X_np[c][~tr]))[:, 1]
        diffs.append(abs(auc_score(ref, y_np[~tr]) - auc_score(p[c, 0, ~tr], y_np[~tr])))
    per_cell = (time.perf_counter() - start) / sklearn_cells
    print(f"  scikit-learn: {per_cell:.2f} s per cell → {per_cell * layers * positions:.0f} s for all; "
          f"ratio {per_cell * layers * positions / total:.0f}×; max |AUC diff| {max(diffs):.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reference-examples", type=int, default=256)
    parser.add_argument("--generate-examples", type=int, default=512, help="prompts of the one-pass figure")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    print(f"truthmap GPU benchmark — {torch.cuda.get_device_name()} — torch {torch.__version__}")
    peak = matmul_tflops()
    print(f"  measured bf16 matmul rate: {peak:.0f} TFLOP/s")
    lm = llama3_8b_shape()
    print(f"  model: Llama-3-8B shape, {sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f} B parameters, bf16")
    bench_extraction(lm, args.examples, args.batch, args.reference_examples, peak)
    bench_onepass(lm, args.generate_examples, args.batch)
    del lm
    torch.cuda.empty_cache()
    bench_probes()


if __name__ == "__main__":
    main()
