"""Peak memory (RSS) of loading a question file, by file size: what bounds memory on input.

    python bench/input_memory.py [--sizes 1024 64] [--limit 100] [--whole 64] [--work DIR]

For each size (MiB) writes a CSV of realistic rows (a ~150-character question, a short answer), then
loads it with ``truthmap.data.load_questions(path, limit)`` in a fresh process and reads that process's
peak RSS (``getrusage``). With ``--limit`` the file is streamed twice (count, then keep the sample), so
memory holds one chunk, the ids seen (to refuse a duplicate) and the sample; the ``--whole`` sizes are
loaded without a limit, every question kept. A file over ``data.MAX_FILE_BYTES`` is refused before it is
read. Prints one Markdown row per load: file size, --limit, outcome, peak RSS, peak RSS over file size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from truthmap.data import load_questions
from truthmap.errors import TruthmapError
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    table, _ = load_questions(sys.argv[1], limit=int(sys.argv[2]) or None)
    outcome = f"loaded, {{len(table)}} questions kept"
except TruthmapError as err:
    outcome = "refused: " + str(err).split(": ", 1)[1][:60]
print(json.dumps({{"outcome": outcome, "base_kib": base,
                   "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def write_csv(path: Path, mib: int) -> int:
    """A question CSV of about ``mib`` MiB; returns its size in bytes."""
    target = mib * 2**20
    filler = "of the long and carefully worded list that a benchmark of input memory reads " * 2
    with open(path, "w") as f:
        f.write("id,question,answer\n")
        i, written = 0, 0
        block = []
        while written < target:
            row = f"q{i},What is item {i} {filler}?,answer {i}\n"
            block.append(row)
            written += len(row)
            i += 1
            if len(block) == 10_000:
                f.write("".join(block))
                block = []
        f.write("".join(block))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 64], help="file sizes (MiB) loaded with --limit")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--whole", type=int, nargs="*", default=[64], help="file sizes (MiB) loaded with no limit")
    parser.add_argument("--work", help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from truthmap.data import MAX_FILE_BYTES

    work = Path(args.work or tempfile.mkdtemp(prefix="truthmap-input-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cap: data.MAX_FILE_BYTES = {MAX_FILE_BYTES // 2**20} MiB; --limit {args.limit}")
    print("| file | --limit | outcome | peak RSS | peak RSS / file size |\n|---|---|---|---|---|")
    for mib, limit in [(m, args.limit) for m in args.sizes] + [(m, 0) for m in args.whole]:
        path = work / f"questions-{mib}MiB.csv"
        size = write_csv(path, mib)
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(path), str(limit)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        peak = result["peak_kib"] * 1024
        print(f"| {size / 2**20:.0f} MiB | {limit or 'none'} | {result['outcome']} | {peak / 2**20:.0f} MiB | "
              f"{peak / size:.2f} |", flush=True)
        path.unlink()


if __name__ == "__main__":
    main()
