"""Model-backed: `truthmap run` SIGKILLed once in each core stage, resumed, equals an uninterrupted run.

A chain of processes works on one folder: the first is killed inside the generate stage, the next
resumes and is killed inside the label stage, and so on through extract, probe and plot, each at an
exact write event (TRUTHMAP_FAILPOINT=stage:event:file; the process SIGKILLs itself). The last one
finishes. Its folder must hold the same answers, features (within float16 rounding) and AUCs as an
uninterrupted reference run, made meanwhile by a process of its own on the other core, which also
shows that the same settings give the same results in separate processes. A further run repairs
damaged files. The processes study the default model saved as a folder (tests/conftest.py
``model_folder``: the same weights and answers, loaded in about a second instead of the GGUF file's
half minute); the chain is kept to one kill per core stage; `make stress` kills runs of the embedded
model in every stage (baselines and report too), at random events and random times.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.model

# small: 40 built-in questions, 2 generation chunks (4 batches of 8, then 1 batch), one split; the
# parts of so small a study hold a few right answers, so 2 of each class are enough. The baselines
# stage runs (between probe and plot) without asking the model p(True), which nothing here compares.
SETTINGS = {"limit": 40, "seeds": [0], "test_fraction": 0.3, "validation_fraction": 0.2, "min_per_class": 2,
            "bootstrap": 50, "max_new_tokens": 16, "p_true": "none",
            "batch_size": 8}
# where each stage is killed: (event, file) — the three events of a write are each exercised
KILL_AT = {
    # one chunk done; the next one's captured states written, the chunk itself not (killed mid-capture)
    "generate": ("after-commit", "generations/capture-00001-residual.npy"),
    "label": ("after-rename", "answers.parquet"),  # new file in place, manifest entry still pending
    "extract": ("before-rename", "activations/residual/shard-00000.npy"),  # shard written, not renamed
    "probe": ("before-rename", "stages.json"),  # all outputs written, the stage not yet marked done
    "plot": ("after-rename", "heatmap.png"),
}


def command(out: Path, config: Path, failpoint: str | None = None, log: Path | None = None) -> dict:
    """Arguments of a subprocess running `truthmap run`, single-threaded, with a failpoint and event log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRUTHMAP_FAILPOINT", None)
    if failpoint:
        env["TRUTHMAP_FAILPOINT"] = failpoint
    if log:
        env["TRUTHMAP_FAILPOINT_LOG"] = str(log)
    args = [sys.executable, "-m", "truthmap.cli", "run", "--config", str(config), "--out", str(out), "--quiet"]
    return {"args": args, "env": env}


def truthmap_run(out: Path, config: Path, failpoint: str | None = None, log: Path | None = None,
                 timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(**command(out, config, failpoint, log), capture_output=True, text=True, timeout=timeout)


def read_events(log: Path) -> list[tuple[str, int, str, str]]:
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    return [(stage, int(n), event, path) for stage, n, event, path in rows]


@pytest.fixture(scope="module")
def config(tmp_path_factory, model_folder):
    path = tmp_path_factory.mktemp("config") / "study.yaml"
    path.write_text(yaml.safe_dump({**SETTINGS, "model": str(model_folder)}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, config):
    """(reference folder, (chain folder, event logs, stderr of the last run)): the uninterrupted run
    goes on in the background while the chain kills a run once in each core stage, resuming each time."""
    reference = tmp_path_factory.mktemp("reference") / "run"
    with open(reference.parent / "stderr.txt", "w") as err:
        background = subprocess.Popen(**command(reference, config), stdout=subprocess.DEVNULL, stderr=err)
    try:
        out = tmp_path_factory.mktemp("chain") / "run"
        logs = {}
        for stage, (event, file) in KILL_AT.items():
            logs[stage] = out.parent / f"events-{stage}.tsv"
            killed = truthmap_run(out, config, f"{stage}:{event}:{file}", logs[stage])
            assert killed.returncode == -signal.SIGKILL, (
                f"{stage}: not killed at {event} {file} (exit {killed.returncode}): {killed.stderr[-3000:]}")
        logs["final"] = out.parent / "events-final.tsv"
        final = truthmap_run(out, config, log=logs["final"])
        assert final.returncode == 0, final.stderr[-3000:]
        assert background.wait(timeout=1800) == 0, (reference.parent / "stderr.txt").read_text()[-3000:]
    finally:
        if background.poll() is None:
            background.kill()
            background.wait()
    return reference, (out, logs, final.stderr)


@pytest.fixture(scope="module")
def reference(runs):
    return runs[0]


@pytest.fixture(scope="module")
def chain(runs):
    return runs[1]


def assert_same_results(run: Path, reference: Path) -> None:
    for name in ("generations.parquet", "answers.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(run / name), pd.read_parquet(reference / name))
    assert json.loads((run / "splits.json").read_text()) == json.loads((reference / "splits.json").read_text())
    index = json.loads((run / "activations/index.json").read_text())
    assert index == json.loads((reference / "activations/index.json").read_text())
    for site in index["sites"].values():
        for shard in site["shards"]:
            a = np.load(run / "activations" / shard["file"], allow_pickle=False).astype(np.float32)
            b = np.load(reference / "activations" / shard["file"], allow_pickle=False).astype(np.float32)
            rounding = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
            assert np.all(np.abs(a - b) <= rounding), shard["file"]
    ours, theirs = pd.read_csv(run / "probe_results.csv"), pd.read_csv(reference / "probe_results.csv")
    pd.testing.assert_frame_equal(ours, theirs)  # AUCs identical, not merely close
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    for key in ("n", "accuracy", "valid_exact_answer_rate", "best_cell", "top_cells", "best_on_test", "population", "model_revision"):
        assert summary[key] == expected[key], key
    assert (run / "heatmap.png").is_file() and (run / "heatmap.svg").is_file()


def test_killed_in_each_core_stage_then_resumed_equals_an_uninterrupted_run(chain, reference):
    out, logs, stderr = chain
    ref = reference
    assert "damaged" not in stderr and "truncated" not in stderr  # an interrupted write is not damage
    assert_same_results(out, ref)
    assert not list(out.rglob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert {"python", "torch", "transformers", "truthmap", "numpy"} <= set(summary["versions"])
    assert summary["model_revision"] == "local"  # a folder's (the embedded model's: tests/integration/test_end_to_end.py)


def test_a_kill_during_generation_loses_one_chunk_at_most(chain):
    _, logs, _ = chain
    after_kill = read_events(logs["label"])  # the process that resumed the killed generation
    rewritten = {e[3] for e in after_kill if e[0] == "generate" and e[3].startswith("generations/chunk-")}
    assert rewritten == {"generations/chunk-00001.parquet"}  # chunk 0 was finished: it was read back


def test_damaged_files_are_named_recomputed_and_never_read(tmp_path, reference, config):
    """A finished run with a flipped byte, a truncated figure and a broken summary: a rerun names them,
    redoes the probe and plot stages in a fresh process (no model needed) and gets identical AUCs.
    (A damaged shard or chunk, which needs the model, is covered by tests/unit/test_runfolder.py and
    by `make stress`.)"""
    ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    scores = out / "probe_scores.parquet"
    data = bytearray(scores.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped, same size
    scores.write_bytes(bytes(data))
    heatmap = out / "heatmap.png"
    heatmap.write_bytes(heatmap.read_bytes()[:100])
    (out / "summary.json").write_text("{")
    done = truthmap_run(out, config)
    assert done.returncode == 0, done.stderr[-3000:]
    notices = [line for line in done.stderr.splitlines() if line.startswith("truthmap: ")]
    assert any(str(scores) in n and "damaged" in n and "probe stage will run again" in n for n in notices)
    assert any(str(heatmap) in n and "truncated" in n and "plot stage will run again" in n for n in notices)
    assert any("summary.json" in n for n in notices) and len(notices) == 4  # the three, and the rebuilt summary
    assert_same_results(out, ref)
