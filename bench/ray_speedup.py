"""The speed-up of 2 local Ray workers over 1 on the generation stage, on the CPU.

    python bench/ray_speedup.py [--n 64] [--batch-size 4]

For 1 and for 2 workers (1 CPU and 1 torch thread each): starts a one-machine Ray cluster on the
loopback address (``--ray local``) and the workers, waits until every one has loaded the model, and times
``generate_answers`` on the same ``n`` built-in questions (chunks of ``CHUNK_BATCHES`` batches, handed out
to idle workers). Model loading and Ray start-up are not timed; they are printed. The answers of the two
runs must be identical. Prints one Markdown row per setting and the ratio.

The ideal is 2×. It needs two idle cores: the driver and Ray's own processes share them with the workers,
and the chunks are sorted by prompt length, so the last one is the shortest and a worker may wait at the
end. On a shared 2-core machine expect well under 2×.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind Ray to the loopback address

from truthmap.config import Config  # noqa: E402
from truthmap.data import load_questions  # noqa: E402
from truthmap.backends.ray import import_ray, start_workers  # noqa: E402
from truthmap.stages.generate import encode_prompt, generate_answers, task_prompts  # noqa: E402


def timed_generation(n_workers: int, questions, batch_size: int, max_new_tokens: int) -> dict:
    ray = import_ray()
    started = time.perf_counter()
    lm = start_workers(Config(ray="local", ray_workers=n_workers, ray_cpus_per_worker=1, progress=False))
    workers = lm.workers
    try:
        ray.get([actor.auto_batch_size.remote(1) for actor in workers.actors])  # every worker has loaded
        loaded = time.perf_counter() - started
        prompt_ids = [encode_prompt(lm.tokenizer, p) for p in task_prompts(lm.tokenizer, questions)]
        start = time.perf_counter()
        answers = generate_answers(lm, prompt_ids, max_new_tokens, batch_size, progress=False)
        seconds = time.perf_counter() - start
    finally:
        workers.close()  # and stops the Ray instance it started: the next setting starts its own
    return {"workers": len(workers.actors), "seconds": seconds, "startup": loaded, "answers": answers}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="questions (default 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size (default 4: chunks of 16 questions)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    questions, _ = load_questions("facts", args.n, 0)
    results = [timed_generation(n, questions, args.batch_size, args.max_new_tokens) for n in (1, 2)]
    one, two = results
    print(f"\nRay generation speed-up — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, {args.n} questions, batch size {args.batch_size}")
    print("| workers | generation s | questions/s | start-up s (not timed) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['seconds']:.1f} | {args.n / r['seconds']:.2f} | {r['startup']:.0f} |")
    same = sum(a == b for a, b in zip(one["answers"], two["answers"]))
    print(f"\nspeed-up of 2 workers over 1: {one['seconds'] / two['seconds']:.2f}× (ideal 2×); "
          f"{same}/{args.n} answers identical")


if __name__ == "__main__":
    main()
