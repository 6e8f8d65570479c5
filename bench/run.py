"""truthmap's CPU benchmark: side-by-side ratios measured in one run on the same data.

    python bench/run.py [--quick] [--only-runs --run-n N --rss-run-n SMALL BIG]

Absolute seconds vary on shared machines; the ratios are what this prints and what bench/RESULTS.md
records. Each figure times our code and a baseline on the same inputs, one after the other:

1. extraction / a bare batched ``model(..., output_hidden_states=True)`` over the same tokens
2. the reference approach (one example at a time, every token of every layer kept) / our extraction
3. a scikit-learn ``LogisticRegression`` per cell / our batched probes (all cells × 3 seeds, N = 2000)
4. batch-1 generation / our batched generation
5. a whole ``truthmap run`` on built-in questions / generation alone, with and without the p(True)
   baselines, for the run as it was (``--extract separate --p-true both``, before) and the default run
   (one pass, p(True) of the exact answer; after), with both p(True) variants added to the latter, and
   p(True) seconds / generation seconds of each; generation with capture / without; max |ΔAUC|
6. peak RSS of extract + probe at 4× the examples / at 1×; of a whole run at 4× the questions / at 1×

The machine's load average is printed at the start, around the whole runs and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from truthmap.data import load_questions  # noqa: E402
from truthmap.stages.extract import run_extract  # noqa: E402
from truthmap.stages.generate import build_prompt, encode_prompt, generate_answers  # noqa: E402
from truthmap.positions import DEFAULT_POSITIONS  # noqa: E402
from truthmap.backends.hf import load_model  # noqa: E402
from truthmap.metrics import auc_score  # noqa: E402
from truthmap.logistic import BatchedLogisticRegression


def synthetic_study(lm, n: int, seed: int = 0):
    """``n`` built-in prompts, each followed by a short fixed-form answer: the tables extract reads."""
    questions, _ = load_questions("facts")
    rng = np.random.default_rng(seed)
    rows = questions.iloc[rng.integers(0, len(questions), size=n)].reset_index(drop=True)
    prompt_ids = [encode_prompt(lm.tokenizer, build_prompt(lm.tokenizer, q)) for q in rows.question]
    answer_ids = [lm.tokenizer(f"The answer is {g[0]}.", add_special_tokens=False)["input_ids"]
                  + [lm.tokenizer.eos_token_id] for g in rows.gold]
    index = {}
    for k, p in enumerate(DEFAULT_POSITIONS):
        if p.startswith("-"):  # counted from the end, as the label stage does
            index[f"pos_{p}"] = [len(a) + len(b) + int(p) for a, b in zip(prompt_ids, answer_ids)]
        else:  # any token of the answer: the cost does not depend on which
            index[f"pos_{p}"] = [len(a) + min(k // 2, len(b) - 1) for a, b in zip(prompt_ids, answer_ids)]
    ids = [f"q{i}" for i in range(n)]
    answers = pd.DataFrame({"id": ids, **index})
    generations = pd.DataFrame({"id": ids, "prompt_ids": prompt_ids, "answer_ids": answer_ids})
    return answers, generations


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_extraction(lm, n: int, batch: int = 16) -> dict:
    answers, generations = synthetic_study(lm, n)
    sequences = [list(p) + list(a) for p, a in zip(generations.prompt_ids, generations.answer_ids)]
    order = sorted(range(n), key=lambda i: len(sequences[i]))

    @torch.inference_mode()
    def bare():
        for b in range(0, n, batch):
            chunk = [sequences[i] for i in order[b : b + batch]]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), lm.tokenizer.pad_token_id)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s)
            lm.model(input_ids=ids, output_hidden_states=True)

    @torch.inference_mode()
    def reference():  # one example at a time, all layers × all tokens kept, positions picked afterwards
        kept = []
        for s in sequences:
            out = lm.model(input_ids=torch.tensor([s]), output_hidden_states=True)
            kept.append(torch.stack(out.hidden_states)[:, 0].numpy())
        return kept

    with tempfile.TemporaryDirectory() as tmp:
        ours = lambda: run_extract(lm, answers, generations, DEFAULT_POSITIONS, ["residual"], Path(tmp) / "run",
                                   batch_size=batch, progress=False)
        bare()  # warm-up
        t_bare, _ = timed(bare)
        t_ours, _ = timed(ours)
        t_ref, _ = timed(reference)
    tokens = sum(len(s) for s in sequences)
    return {"n": n, "tokens": tokens, "bare_s": t_bare, "ours_s": t_ours, "reference_s": t_ref}


def bench_probes(n: int = 2000, d: int = 576, layers: int = 31, positions: int = 15, seeds: int = 3,
                 sklearn_sample: int = 24) -> dict:
    """Synthetic features of the default model's shape with a planted, noisy error signal."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, 16)).astype(np.float32)
    y = (latent[:, 0] + rng.normal(size=n) > 0.4).astype(np.int64)
    train = np.zeros((seeds, n), bool)
    for s in range(seeds):
        train[s, np.random.default_rng(s).permutation(n)[: int(0.7 * n)]] = True
    t_ours, probs, cells = 0.0, {}, []
    for layer in range(layers):
        strength = 0.2 + 0.8 * np.sin(np.pi * layer / layers)  # signal peaks mid-depth, as in real runs
        X = np.stack([latent @ rng.normal(size=(16, d)).astype(np.float32) * strength
                      + rng.normal(size=(n, d)).astype(np.float32) * 3 + 20 for _ in range(positions)])
        mask = torch.as_tensor(np.broadcast_to(train, (positions, seeds, n)).copy())
        dt, model = timed(lambda: BatchedLogisticRegression().fit(torch.as_tensor(X), torch.as_tensor(y), mask))
        t_ours += dt
        p = model.predict_proba(torch.as_tensor(X)).numpy()
        for c in range(positions):
            for s in range(seeds):
                cells.append((layer, c, s))
                probs[(layer, c, s)] = (X[c], p[c, s])
    pick = np.random.default_rng(1).choice(len(cells), size=sklearn_sample, replace=False)
    t_sk, diffs = 0.0, []
    for k in pick:
        layer, c, s = cells[k]
        X, p = probs[(layer, c, s)]
        tr, te = train[s], ~train[s]

        def fit():
            scaler = StandardScaler().fit(X[tr])
            clf = LogisticRegression(max_iter=1000).fit(scaler.transform(X[tr]), y[tr])
            return clf.predict_proba(scaler.transform(X[te]))[:, 1]

        dt, ref = timed(fit)
        t_sk += dt
        diffs.append(abs(auc_score(ref, y[te]) - auc_score(p[te], y[te])))
    per_fit = t_sk / sklearn_sample
    return {"problems": len(cells), "ours_s": t_ours, "sklearn_per_fit_s": per_fit,
            "sklearn_all_s": per_fit * len(cells), "sklearn_sampled": sklearn_sample, "max_auc_diff": max(diffs)}


def bench_generation(lm, n: int) -> dict:
    questions, _ = load_questions("facts", limit=n, seed=3)
    prompts = [encode_prompt(lm.tokenizer, build_prompt(lm.tokenizer, q)) for q in questions.question]
    t_ours, batched = timed(lambda: generate_answers(lm, prompts, 24, None, progress=False))
    t_one, single = timed(lambda: generate_answers(lm, prompts, 24, 1, progress=False))
    same = sum(a == b for a, b in zip(batched, single))
    return {"n": n, "ours_s": t_ours, "batch1_s": t_one, "identical_answers": same}


def bench_one_pass_parts(lm, n: int) -> dict:
    """Generation alone, generation with the one-pass capture (every residual row, token scores), and
    the two p(True) variants a pass each (before) and in one pass with the question's prefix shared
    (after), on the same ``n`` questions: wall and CPU seconds of this process (CPU seconds are less
    sensitive to other work on a shared machine)."""
    from truthmap.stages.baselines import p_true, p_true_variants
    from truthmap.stages.capture import ChunkCapture
    from truthmap.runfolder import ChunkStore

    questions, _ = load_questions("facts", limit=n, seed=3)
    prompts = [encode_prompt(lm.tokenizer, build_prompt(lm.tokenizer, q)) for q in questions.question]

    def both_clocks(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, result

    # the batch size a run would choose (None: auto_batch_size), so the figure is of the default run
    plain = both_clocks(lambda: generate_answers(lm, prompts, 24, None, progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        chunks = ChunkStore(Path(tmp) / "generations", "bench")
        captured = both_clocks(lambda: generate_answers(lm, prompts, 24, None, progress=False, chunks=chunks,
                                                        capture=ChunkCapture(lm, chunks, ["residual"])))
    answers = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in plain[2]]
    exact = [a.strip().rstrip(".").split(" ")[-1] or None for a in answers]  # a short span of each answer
    whole = [a if a.strip() else None for a in answers]
    qs = questions.question.tolist()
    before = both_clocks(lambda: (p_true(lm, qs, exact), p_true(lm, qs, whole)))
    after = both_clocks(lambda: p_true_variants(lm, qs, [exact, whole]))
    same = np.nanmax(np.abs(np.stack(before[2]) - after[2]))
    return {"n": n, "plain": plain[:2], "capture": captured[:2], "p_true_before": before[:2],
            "p_true_after": after[:2], "p_true_max_diff": float(same),
            "identical_answers": sum(a == b for a, b in zip(plain[2], captured[2]))}


def one_pass_rows(rows, lm, n: int) -> None:
    r = bench_one_pass_parts(lm, n)
    (gw, gc), (cw, cc) = r["plain"], r["capture"]
    rows.append(("generation with capture / generation alone (CPU s)", cc / gc, "≤ 1.1",
                 f"{n} questions: CPU {cc:.1f} s vs {gc:.1f} s, wall {cw:.1f} s vs {gw:.1f} s; "
                 f"{r['identical_answers']}/{n} answers identical"))
    (bw, bc), (aw, ac) = r["p_true_before"], r["p_true_after"]
    rows.append(("p(True) seconds / generation seconds, a pass per variant (before, CPU s)", bc / gc, "",
                 f"CPU {bc:.1f} s, wall {bw:.1f} s"))
    rows.append(("p(True) seconds / generation seconds, one pass, prefix shared (after, CPU s)", ac / gc, "",
                 f"CPU {ac:.1f} s, wall {aw:.1f} s; max |difference| {r['p_true_max_diff']:.1e}"))


def bench_whole_run(n: int, extract: str = "onepass", p_true: str = "exact", also_both: bool = False) -> dict:
    """A whole ``truthmap run`` of ``n`` built-in questions in a fresh process: stage seconds, p(True)
    seconds, the process's peak RSS and the AUC table (to compare the two extraction paths).
    ``also_both``: afterwards the baselines stage again with both p(True) variants, for the seconds they
    would have taken in the same run."""
    from truthmap.cli import app

    def p_true_seconds(summary):
        return (summary.get("baseline_seconds") or {}).get("p_true", float("nan"))

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        rss = peak_rss_run(n, run, extract=extract, p_true=p_true)
        summary = json.loads((run / "summary.json").read_text())
        results = pd.concat([pd.read_csv(run / name) for name in ("probe_results.csv", "baseline_results.csv")])
        both_s = None
        if also_both:
            app(["baselines", "--out", str(run), "--p-true", "both", "--quiet"])
            both_s = p_true_seconds(json.loads((run / "summary.json").read_text()))
    return {"n": n, "stages": summary["stage_seconds"], "p_true_s": p_true_seconds(summary), "rss": rss,
            "p_true_both_s": both_s, "results": results, "extract": summary.get("extract")}


def whole_run_rows(rows, n: int) -> dict:
    """The run as it was (``--extract separate --p-true both``: passes of their own, both p(True)
    variants) and as it is by default (one pass, p(True) of the exact answer), one after the other, each
    over the generation alone (the first run's generate stage, which reads nothing extra) and over its
    own generate stage (the load of a shared machine can change between the two runs); the default
    run's baselines again with both p(True) variants, for what they add."""
    before = bench_whole_run(n, "separate", "both")
    after = bench_whole_run(n, "onepass", "exact", also_both=True)
    generate = before["stages"]["generate"]
    detail = lambda r: f"{r['n']} questions: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["stages"].items())
    for name, r in (("two-pass, both p(True) (before)", before), ("one pass, default (after)", after)):
        total = sum(r["stages"].values())
        own = r["stages"]["generate"]
        rows.append((f"{name}: whole run / generation alone", total / generate, "≤ 1.6",
                     f"over its own generate stage {total / own:.3g}; " + detail(r)))
        rows.append((f"{name}: whole run without p(True) / generation alone", (total - r["p_true_s"]) / generate,
                     "≤ 1.3", f"over its own generate stage {(total - r['p_true_s']) / own:.3g}; "
                              f"p(True) {r['p_true_s']:.1f} s"))
        rows.append((f"{name}: p(True) seconds / generation seconds", r["p_true_s"] / generate, "",
                     "both variants, a pass each" if r is before else "the exact answer's, shared beginnings"))
    total = sum(after["stages"].values()) - after["p_true_s"] + after["p_true_both_s"]
    rows.append(("one pass with --p-true both: whole run / generation alone", total / generate, "≤ 1.6",
                 f"over its own generate stage {total / after['stages']['generate']:.3g}; both variants in one "
                 f"pass, shared beginnings: p(True) {after['p_true_both_s']:.1f} s"))
    rows.append(("one pass: generation with capture / generation alone", after["stages"]["generate"] / generate,
                 "≤ 1.1", f"{after['stages']['generate']:.1f} s vs {generate:.1f} s; read again by extract: "
                          f"{(after['extract'] or {}).get('read_again')} of {n}"))
    key = ["site", "layer", "position", "seed"]
    both = before["results"].merge(after["results"], on=key, suffixes=("_before", "_after"))
    diff = (both["auc_before"] - both["auc_after"]).abs()
    rows.append(("max |AUC one pass − AUC two-pass| over all cells", float(diff.max()), "≤ 0.005",
                 f"mean {diff.mean():.4f} over {diff.notna().sum()} cells and seeds"))
    return after


def _child_peak_rss(code: str) -> float:
    """Run ``code`` in a fresh Python process; the peak RSS (MiB) it prints last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:  # say why the child failed instead of a bare exit status
        raise SystemExit(f"peak-RSS child failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def peak_rss_run(n: int, out: Path | None = None, **settings) -> float:
    """Peak RSS (MiB) of a fresh process running a whole ``truthmap run`` of ``n`` questions (default
    settings but ``settings``) into ``out`` (a temporary folder if None)."""
    if n < 400:  # a small study (--quick) holds too few wrong answers per part for the default minimum
        settings = {"min_per_class": 2, **settings}
    code = (
        "import sys, resource, tempfile; sys.path.insert(0, %r)\n"
        "import truthmap\n"
        "truthmap.run(limit=%d, out=%r or tempfile.mkdtemp() + '/run', progress=False, **%r)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    ) % (str(ROOT), n, str(out) if out else "", settings)
    return _child_peak_rss(code)


def load_line() -> str:
    """The machine's load averages (other work on a shared machine slows every figure)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def peak_rss_child(n: int) -> float:
    """Peak RSS (MiB) of a fresh process that extracts and probes ``n`` examples."""
    code = (
        "import sys, resource, tempfile; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "from bench.run import synthetic_study\n"
        "from truthmap.backends.hf import load_model\n"
        "from truthmap.stages.extract import run_extract\n"
        "from truthmap.positions import DEFAULT_POSITIONS\n"
        "from truthmap.splits import make_splits\n"
        "from truthmap.stages.probe import run_probe\n"
        "from truthmap import runfolder as rf\n"
        "lm = load_model()\n"
        "answers, generations = synthetic_study(lm, %d)\n"
        "answers['correct'] = [i %% 3 == 0 for i in range(len(answers))]\n"
        # the columns of a labelled study that splitting and probing read: each answer its own group
        "answers['question'], answers['family'] = answers['id'], 'synthetic'\n"
        "run = Path(tempfile.mkdtemp())\n"
        "with rf.open_run(run):\n"  # the run folder's files are written and read through its manifest
        "    rf.write_parquet(run / rf.ANSWERS, answers)\n"
        "    rf.write_json(run / rf.SPLITS, make_splits(answers, [0, 1, 2]))\n"
        "    run_extract(lm, answers, generations, DEFAULT_POSITIONS, ['residual'], run, progress=False)\n"
        "    run_probe(run, ['residual'], n_boot=200, progress=False, min_per_class=2)\n"  # any n: memory only
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    ) % (str(ROOT), n)
    return _child_peak_rss(code)


class _Rows(list):
    """The table's rows, each printed as soon as it is measured."""

    def append(self, row):
        name, value, goal, detail = row
        print(f"| {name} | {value:.3g} | {goal} | {detail} |", flush=True)
        super().append(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the benchmark)")
    parser.add_argument("--extract-n", type=int, default=256, help="examples for the extraction figures")
    parser.add_argument("--probe-n", type=int, default=2000, help="examples for the probe figures")
    parser.add_argument("--probe-layers", type=int, default=31, help="layers of 15 positions × 3 seeds of probes")
    parser.add_argument("--generate-n", type=int, default=256, help="questions for the generation figure")
    parser.add_argument("--run-n", type=int, default=1000, help="questions for the whole-run figure")
    parser.add_argument("--run-from", help="take the whole-run figure from this finished run folder instead")
    parser.add_argument("--rss-n", type=int, nargs=2, default=[1000, 4000], metavar=("SMALL", "BIG"))
    parser.add_argument("--rss-run-n", type=int, nargs=2, metavar=("SMALL", "BIG"),
                        help="questions of the two whole runs whose peak RSS is compared (default: a quarter of "
                             "--run-n, and the default whole run of --run-n itself)")
    parser.add_argument("--only-runs", action="store_true", help="only the one-pass, whole-run and RSS figures")
    parser.add_argument("--parts-n", type=int, default=128, help="questions for the one-pass parts figure")
    parser.add_argument("--only-parts", action="store_true", help="only the one-pass parts figure")
    args = parser.parse_args()
    if args.quick:
        args.extract_n, args.probe_n, args.generate_n, args.run_n, args.rss_n = 64, 500, 32, 100, [250, 1000]
        args.parts_n = 32
    lm = load_model()
    print(f"truthmap benchmark — {time.strftime('%Y-%m-%d')} — {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(f"start: {load_line()}", flush=True)
    print("| figure | ratio | goal | detail |\n|---|---|---|---|", flush=True)
    rows = _Rows()
    if not (args.only_runs or args.only_parts):
        component_rows(rows, lm, args)
    if args.only_parts:
        one_pass_rows(rows, lm, args.parts_n)
    else:
        run_rows(rows, lm, args)


def component_rows(rows, lm, args) -> None:
    """Extraction, probes and generation, each beside its baseline."""
    ex = bench_extraction(lm, args.extract_n)
    rows.append(("extraction / bare batched forward (output_hidden_states)", ex["ours_s"] / ex["bare_s"], "≤ 1.15",
                 f"{ex['n']} examples, {ex['tokens']} tokens: {ex['ours_s']:.1f} s vs {ex['bare_s']:.1f} s"))
    rows.append(("reference per-example loop / our extraction", ex["reference_s"] / ex["ours_s"], "≥ 5",
                 f"{ex['reference_s']:.1f} s vs {ex['ours_s']:.1f} s"))
    pr = bench_probes(n=args.probe_n, layers=4 if args.quick else args.probe_layers)
    rows.append(("scikit-learn per-cell loop / our probes", pr["sklearn_all_s"] / pr["ours_s"], "≥ 20",
                 f"{pr['problems']} probes, N={args.probe_n}: ours {pr['ours_s']:.1f} s; sklearn "
                 f"{pr['sklearn_per_fit_s']:.2f} s/fit (timed on {pr['sklearn_sampled']}) → {pr['sklearn_all_s']:.0f} s"))
    rows.append(("max |AUC difference| vs scikit-learn", pr["max_auc_diff"], "≤ 0.01",
                 f"over the {pr['sklearn_sampled']} probes fitted by both"))
    ge = bench_generation(lm, args.generate_n)
    rows.append(("batch-1 generation / our generation", ge["batch1_s"] / ge["ours_s"], "≥ 3",
                 f"{ge['n']} questions: {ge['batch1_s']:.1f} s vs {ge['ours_s']:.1f} s; "
                 f"{ge['identical_answers']}/{ge['n']} answers identical"))


def run_rows(rows, lm, args) -> None:
    one_pass_rows(rows, lm, args.parts_n)
    after = None
    if args.run_from:
        summary = json.loads((Path(args.run_from) / "summary.json").read_text())
        wr = {"n": summary["n"], "stages": summary["stage_seconds"]}
        wr["run_s"] = sum(wr["stages"].values())
        rows.append(("whole truthmap run / generation alone", wr["run_s"] / wr["stages"]["generate"], "≤ 1.3",
                     f"{wr['n']} questions: " + ", ".join(f"{k} {v:.0f} s" for k, v in wr["stages"].items())))
    else:
        print(f"whole runs: {load_line()}", flush=True)
        after = whole_run_rows(rows, args.run_n)
        print(f"after the whole runs: {load_line()}", flush=True)
    small, big = args.rss_n
    rss_small, rss_big = peak_rss_child(small), peak_rss_child(big)
    rows.append((f"peak RSS at {big} / at {small} examples (extract + probe)", rss_big / rss_small,
                 "≤ 1.3", f"{rss_big:.0f} MiB vs {rss_small:.0f} MiB"))
    small, big = args.rss_run_n or (max(args.run_n // 4, 1), args.run_n)
    rss_big = after["rss"] if after and big == args.run_n else peak_rss_run(big)  # the default run's own
    rss_small = peak_rss_run(small)
    rows.append((f"peak RSS of a whole run at {big} / at {small} questions", rss_big / rss_small,
                 "≤ 1.3", f"{rss_big:.0f} MiB vs {rss_small:.0f} MiB"))
    print(f"end: {load_line()}", flush=True)


if __name__ == "__main__":
    main()
