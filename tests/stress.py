"""`make stress`: many kill/resume trials of `truthmap run`, and many fuzzed question files.

Kill/resume: one uninterrupted reference run lists every write event; each trial then runs the same
study in a fresh folder, SIGKILLing it 1-3 times — at a random write event (TRUTHMAP_FAILPOINT) or after
a random time — and resuming each time until a run finishes. A trial survives when the finished run
equals the reference: every answer, the features (within float16 rounding) and every AUC. Rows lost
counts reference questions whose row is missing or different at the end (must be 0).

Damaged files: a copy of the finished reference run has one of its files (any file of the manifest)
truncated, altered by one byte or deleted; a rerun must name it and end with the reference's results.

Fuzzing: valid CSV / JSONL / JSON / Parquet question files, damaged at random (bytes flipped, inserted,
cut, truncated, NUL bytes, Latin-1 text, megabyte fields, duplicated columns and ids, empty files), are
loaded: each must give a well-formed table or a clear error (TruthmapError), never another exception.
A few of the refused files are then given to `truthmap run` on a copy of the finished reference run:
the command must answer in one line, and the run must stay intact.

Hostile folders: commands (stage commands, export, report, transfer; detector loading) on crafted
folders: random non-run folders, manifests naming paths outside the folder or damaged entries, locks
that are links, hard links, folders or FIFOs, shards and shard folders that are links out, configs that
name a model with its own code, switch on trust_remote_code or point Ray at a remote address, crafted
summaries, indexes, splits and detector cards (also through `score` and `ask`); the user's files planted
where runs write; several files of a run damaged at once; typed-setting attacks through a saved
config.json, a --config YAML and the command line. The whole area around each trial is snapshotted
before and after. Counted: commands, refusals, files truthmap did not write that changed (the user's
files inside the folder or anything outside it), files created outside the run folder and the outputs
the command names, tracebacks, and code run from a folder: the last four 0.

    python tests/stress.py [--trials 5] [--damage 5] [--fuzz 300] [--hostile 45] [--limit 64] [--seed 0] [--work DIR]

Exit status 0 only if every trial survived, no row was lost, no fuzzed file crashed the loader, and no
hostile folder touched a file, crashed, or ran code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("TRUTHMAP_FAILPOINT", None)


def run_study(out: Path, config: Path, failpoint: str | None = None, kill_after: float | None = None,
              log: Path | None = None) -> tuple[int, str]:
    """(exit status, stderr) of one `truthmap run`; -9 when it was killed."""
    env = dict(ENV)
    if failpoint:
        env["TRUTHMAP_FAILPOINT"] = failpoint
    if log:
        env["TRUTHMAP_FAILPOINT_LOG"] = str(log)
    command = [sys.executable, "-m", "truthmap.cli", "run", "--config", str(config), "--out", str(out), "--quiet"]
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        err.seek(0)
        return process.returncode, err.read()


def compare(run: Path, reference: Path) -> tuple[int, list[str]]:
    """(rows lost, differences) between a finished run and the reference."""
    problems, lost = [], 0
    try:
        ref = pd.read_parquet(reference / "answers.parquet").set_index("id")
        got = pd.read_parquet(run / "answers.parquet").set_index("id")
    except Exception as err:  # a run that did not finish has no table at all
        return len(pd.read_parquet(reference / "answers.parquet")), [f"answers.parquet unreadable: {err}"]
    for qid in ref.index:
        if qid not in got.index or not ref.loc[qid].astype(str).equals(got.loc[qid].astype(str)):
            lost += 1
    if lost:
        problems.append(f"{lost} answer rows missing or different")
    for name in ("generations.parquet",):
        if not pd.read_parquet(run / name).equals(pd.read_parquet(reference / name)):
            problems.append(f"{name} differs")
    index = json.loads((reference / "activations/index.json").read_text())
    for site in index["sites"].values():
        for shard in site["shards"]:
            a = np.load(run / "activations" / shard["file"], allow_pickle=False).astype(np.float32)
            b = np.load(reference / "activations" / shard["file"], allow_pickle=False).astype(np.float32)
            rounding = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
            if a.shape != b.shape or not np.all(np.abs(a - b) <= rounding):
                problems.append(f"{shard['file']}: features differ beyond float16 rounding")
            elif not np.array_equal(a, b):
                print(f"  note: {shard['file']} differs within float16 rounding", flush=True)
    ours, theirs = pd.read_csv(run / "probe_results.csv"), pd.read_csv(reference / "probe_results.csv")
    if not ours.equals(theirs):
        problems.append("probe_results.csv differs (AUCs)")
    for name in ("heatmap.png", "summary.json"):
        if not (run / name).is_file():
            problems.append(f"{name} missing")
    return lost, problems


def kill_resume_trials(n_trials: int, config: Path, work: Path, rng: random.Random) -> dict:
    reference = work / "reference"
    log = work / "reference-events.tsv"
    started = time.perf_counter()
    status, err = run_study(reference, config, log=log)
    duration = time.perf_counter() - started
    if status != 0:
        sys.exit(f"the reference run failed:\n{err[-3000:]}")
    events = [line.split("\t") for line in log.read_text().splitlines()]
    print(f"reference run: {duration:.0f} s, {len(events)} write events", flush=True)
    tally = {"trials": 0, "survived": 0, "rows_lost": 0, "kills_at_events": 0, "kills_at_times": 0, "failures": []}
    for trial in range(n_trials):
        out = work / f"trial-{trial}"
        kills = rng.randint(1, 3)
        plan = []
        for _ in range(kills):
            if rng.random() < 0.5:
                stage, number = rng.choice(events)[:2]
                plan.append(("event", f"{stage}:{number}"))
            else:
                plan.append(("time", rng.uniform(5.0, duration)))
        notes = []
        for kind, where in plan:
            status, err = run_study(out, config, failpoint=where if kind == "event" else None,
                                    kill_after=where if kind == "time" else None)
            if status == -signal.SIGKILL:
                tally["kills_at_events" if kind == "event" else "kills_at_times"] += 1
                notes.append(f"killed at {where if kind == 'event' else f'{where:.0f} s'}")
            else:
                notes.append(f"{where if kind == 'event' else f'{where:.0f} s'}: not reached (exit {status})")
        status, err = run_study(out, config)
        tally["trials"] += 1
        if status != 0:
            lost, problems = compare(out, reference) if (out / "answers.parquet").exists() else (0, [])
            problems = [f"final run failed (exit {status}): {err.strip().splitlines()[-1] if err.strip() else ''}"] + problems
        else:
            lost, problems = compare(out, reference)
        tally["rows_lost"] += lost
        if problems:
            tally["failures"].append(f"trial {trial} ({'; '.join(notes)}): {'; '.join(problems)}")
        else:
            tally["survived"] += 1
            shutil.rmtree(out)
        print(f"trial {trial}: {'survived' if not problems else 'FAILED'} ({'; '.join(notes)})", flush=True)
    tally["reference"] = reference
    return tally


def damage_trials(n_trials: int, config: Path, work: Path, reference: Path, rng: random.Random) -> dict:
    files = sorted(json.loads((reference / "manifest.json").read_text())["files"])
    tally = {"trials": 0, "survived": 0, "named": 0, "rows_lost": 0, "failures": []}
    for trial in range(n_trials):
        out = (work / f"damage-{trial}").resolve()
        shutil.copytree(reference, out)
        name, how = rng.choice(files), rng.choice(["truncated", "one byte changed", "deleted"])
        path = out / name
        data = bytearray(path.read_bytes())
        if how == "deleted":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(bytes(data[: rng.randrange(len(data))]))
        else:
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
        status, err = run_study(out, config)
        tally["trials"] += 1
        lost, problems = compare(out, reference) if status == 0 else (0, [f"rerun failed (exit {status})"])
        named = f"truthmap: {path}:" in err
        tally["named"] += named
        tally["rows_lost"] += lost
        if not named:
            problems.append("the damaged file was not named")
        if problems:
            tally["failures"].append(f"{name} {how}: {'; '.join(problems)}")
        else:
            tally["survived"] += 1
            shutil.rmtree(out)
        print(f"damage {trial}: {name} {how}: {'survived' if not problems else 'FAILED'}", flush=True)
    return tally


# ---------------------------------------------------------------- fuzzed question files

def seed_files() -> dict[str, bytes]:
    rows = [{"id": f"q{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(30)]
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    return {
        ".csv": pd.DataFrame(rows).to_csv(index=False).encode(),
        ".jsonl": "\n".join(json.dumps(r) for r in rows).encode(),
        ".json": json.dumps(rows).encode(),
        ".parquet": buffer.getvalue(),
    }


def mutate(data: bytes, suffix: str, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "insert", "cut", "truncate", "nul", "latin1", "huge", "dup_column", "dup_id",
                         "drop_column", "empty", "header_only"])
        at = rng.randrange(max(len(data), 1))
        if op == "flip" and data:
            data[at] ^= 1 << rng.randrange(8)
        elif op == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == "cut":
            del data[at : at + rng.randint(1, 32)]
        elif op == "truncate":
            data = data[:at]
        elif op == "nul":
            data[at:at] = b"\x00" * rng.randint(1, 4)
        elif op == "latin1":
            data[at:at] = "Zürich café".encode("latin-1")
        elif op == "huge":
            data[at:at] = b"x" * rng.randint(10**5, 3 * 10**6)
        elif op == "dup_column" and suffix == ".csv":
            data = data.replace(b"id,question,answer", b"id,question,question,answer", 1)
        elif op == "dup_id":
            data = data.replace(b"q1", b"q2", 1)
        elif op == "drop_column":
            data = data.replace(b"question", b"query")
        elif op == "empty":
            data = bytearray()
        elif op == "header_only" and suffix == ".csv":
            data = bytearray(data.split(b"\n")[0] + b"\n")
    return bytes(data)


def fuzz_files(n_files: int, work: Path, rng: random.Random, reference: Path | None, cli_checks: int = 5) -> dict:
    from truthmap.cli import app
    from truthmap.data import load_questions
    from truthmap.errors import TruthmapError

    seeds = seed_files()
    tally = {"files": 0, "loaded": 0, "clear_errors": 0, "crashes": [], "cli_refused": 0, "cli_failures": []}
    refused = []
    folder = work / "fuzz"
    folder.mkdir(exist_ok=True)
    for k in range(n_files):
        suffix = rng.choice(list(seeds))
        path = folder / f"file-{k:04d}{suffix}"
        path.write_bytes(mutate(seeds[suffix], suffix, rng))
        tally["files"] += 1
        try:
            table, _ = load_questions(str(path))
            assert table["id"].is_unique and len(table) > 0
            tally["loaded"] += 1
            path.unlink()
        except TruthmapError as err:
            tally["clear_errors"] += 1
            refused.append((path, str(err)))
        except Exception as err:  # the failure this test exists to find
            tally["crashes"].append(f"{path}: {type(err).__name__}: {str(err)[:200]}")
    if reference is not None:
        run = work / "bad-input-run"
        shutil.copytree(reference, run)
        before = {name: (run / name).read_bytes() for name in ("answers.parquet", "probe_results.csv")}
        for path, _ in rng.sample(refused, min(cli_checks, len(refused))):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    app(["run", "--dataset", str(path), "--out", str(run), "--quiet"])
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code
                except Exception as error:  # noqa: BLE001 - reported, not raised
                    code = f"{type(error).__name__}: {error}"
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            if code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
                tally["cli_refused"] += 1
            else:
                tally["cli_failures"].append(f"{path}: exit {code}, stderr {lines[-3:]}")
        from truthmap import runfolder as rf

        with rf.open_run(run) as notices:
            if notices:
                tally["cli_failures"].append(f"the run folder was damaged: {notices}")
        for name, data in before.items():
            if (run / name).read_bytes() != data:
                tally["cli_failures"].append(f"{name} changed after refused inputs")
    return tally


# ---------------------------------------------------------------- hostile folders

def _snapshot(paths) -> dict:
    """Each file under ``paths`` (links not followed) -> its content, or the link's target."""
    out = {}
    for root in paths:
        root = Path(root)
        items = [root] if not root.is_dir() or root.is_symlink() else [root, *root.rglob("*")]
        for path in items:
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                out[str(path)] = ("file", path.read_bytes())
    return out


def _custom_code_model(folder: Path, marker: Path) -> None:
    """A local model folder whose configuration code, if ever imported, writes ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "evil",
                                                    "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def _craft(kind: str, target: Path, sandbox: Path, rng: random.Random) -> list[Path]:
    """Make ``target`` a hostile folder of ``kind``; return the files in it that truthmap did not write."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from _synthetic import make_run, seal

    canary = sandbox / "outside" / "thesis.txt"
    if kind == "foreign":  # a folder of someone's files, some of them with truthmap's names
        target.mkdir()
        names = rng.sample(["summary.json", "config.json", "lock", "report.html", "notes.txt", "activations",
                            ".draft.abc.tmp", "data.csv", "generations", "photo.png"], rng.randint(1, 6))
        for name in names:
            if name in ("activations", "generations"):
                (target / name).mkdir()
                (target / name / "x.npy").write_bytes(os.urandom(64))
                (target / name / ".half.k2.tmp").write_bytes(b"mine")
            else:
                (target / name).write_bytes(os.urandom(rng.randint(0, 256)))
        if not any(n not in ("summary.json", "config.json", "lock", "report.html", ".draft.abc.tmp",
                             "activations", "generations") for n in names):
            (target / "mine.txt").write_text("mine")
        return [p for p in target.rglob("*") if p.is_file()]
    make_run(target, n=40)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    planted = []
    if kind == "manifest":
        key = rng.choice(["../outside/thesis.txt", str(canary), "activations/../../outside/thesis.txt",
                          "a/../../outside/thesis.txt"])
        entry = rng.choice([{"size": 1, "sha256": "0" * 64, "stage": "probe"}, None, [], 7, {"size": "x"},
                            {"size": 1, "sha256": "0" * 64, "previous": {"size": 2, "sha256": "1" * 64}}])
        if rng.random() < 0.5:
            manifest["files"][key] = entry
        else:
            manifest["files"]["answers.parquet"] = entry
        text = json.dumps(manifest)
        text = rng.choice([text, text.replace('"version": 1', '"version": NaN'), "[" * 5000 + "]" * 5000, text])
        manifest_path.write_text(text)
    elif kind == "lock":
        (target / "lock").unlink(missing_ok=True)
        how = rng.choice(["symlink", "hardlink", "folder", "fifo"])
        if how == "symlink":
            (target / "lock").symlink_to(canary)
        elif how == "hardlink":
            os.link(canary, target / "lock")
        elif how == "folder":
            (target / "lock").mkdir()
            (target / "lock" / "inside.txt").write_text("mine")
            planted.append(target / "lock" / "inside.txt")
        else:
            os.mkfifo(target / "lock")
    elif kind == "shard":
        shard = target / "activations" / "residual" / "shard-00000.npy"
        if rng.random() < 0.5:
            shard.unlink()
            shard.symlink_to(sandbox / "outside" / "array.npy")
        else:
            shutil.rmtree(target / "activations" / "residual")
            (target / "activations" / "residual").symlink_to(sandbox / "outside")
        if rng.random() < 0.5:
            seal(target)  # a manifest that vouches for what the link points to
    elif kind == "config":
        model = sandbox / "evil_model"
        _custom_code_model(model, sandbox / "marker")
        config = rng.choice([
            {"model": str(model), "dataset": "toy", "trust_remote_code": True},
            {"model": str(model), "dataset": "toy", "ray": "ray://203.0.113.7:10001", "device_map": "auto"},
            {"model": str(model), "dataset": "toy", "seeds": "all", "positions": {"x": 1}},
            [], "not json {", {"model": str(model), "dataset": "toy", "limit": float("nan")}])
        text = config if isinstance(config, str) else json.dumps(config)
        (target / "config.json").write_text(text)
        if rng.random() < 0.7:
            seal(target)
    elif kind == "summary":
        summary = rng.choice([
            {"best_cell": {"site": "residual", "layer": 1, "position": "../../../outside/x"}},
            {"best_cell": {"site": "../../outside", "layer": 1, "position": "-1"}},
            {"best_cell": {"site": "residual", "layer": "1; rm", "position": "-1"}},
            {"best_cell": [], "top_cells": "x"},
            {"accuracy": float("nan"), "top_cells": [{"auc": None, "auc_lo": "x"}]}])
        (target / "summary.json").write_text(json.dumps(summary))
        seal(target)
    elif kind == "index":
        index = json.loads((target / "activations" / "index.json").read_text())
        choice = rng.randrange(5)
        if choice == 0:
            index["sites"]["residual"]["shards"][0]["file"] = "../../outside/array.npy"
        elif choice == 1:
            index["sites"]["residual"]["shards"][0]["file"] = str(sandbox / "outside" / "array.npy")
        elif choice == 2:
            index["ids"] = None
        elif choice == 3:
            index["sites"]["residual"]["layers"] = ["1"]
        else:
            index = [index]
        (target / "activations" / "index.json").write_text(json.dumps(index))
        seal(target)
    elif kind == "planted":  # a user's files exactly where runs and commands write
        choice = rng.randrange(4)
        if choice == 0:
            shutil.rmtree(target / "activations", ignore_errors=True)
            (target / "activations" / "notes").mkdir(parents=True)
            (target / "activations" / "notes" / ".idea.v2.tmp").write_text("an idea")
            planted.append(target / "activations" / "notes" / ".idea.v2.tmp")
        elif choice == 1:
            (target / "detectors").symlink_to(sandbox / "outside", target_is_directory=True)
        elif choice == 2:
            (target / "transfer").mkdir()
            (target / "transfer" / "transfer.csv").write_text("my own table")
            planted.append(target / "transfer" / "transfer.csv")
        else:
            (target / "generations").write_text("a file of mine named generations")
            planted.append(target / "generations")
        (sandbox / "r.html").write_text("<!doctype html><p>my own page</p>")  # where report --out writes
        (sandbox / "t").symlink_to(sandbox / "outside", target_is_directory=True)  # transfer --out: a link
        planted.append(sandbox / "r.html")
    elif kind == "multi":  # several files damaged at once, of several kinds
        files = sorted(k for k in manifest["files"])
        for key in rng.sample(files, min(len(files), rng.randint(2, 4))):
            path = target / key
            how = rng.choice(["truncate", "flip", "delete", "unlisted"])
            if how == "truncate":
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            elif how == "flip":
                data = bytearray(path.read_bytes())
                data[rng.randrange(len(data))] ^= 0xFF if data else 0
                path.write_bytes(bytes(data))
            elif how == "delete":
                path.unlink()
            else:  # dropped from the manifest and edited: never to be read
                manifest["files"].pop(key)
                path.write_bytes(path.read_bytes() + b" ")
        manifest_path.write_text(json.dumps(manifest))
    elif kind == "settings":  # typed-setting attacks through the saved config.json (sealed) and --config
        model = sandbox / "evil_model"
        _custom_code_model(model, sandbox / "marker")
        value = rng.choice([{"trust_remote_code": "false"}, {"trust_remote_code": "no"}, {"positions": [1]},
                            {"positions": ["-\u00b2"]}, {"bootstrap": -5}, {"C": "x"}, {"limit": "5"},
                            {"dataset": str(canary)}, {"seeds": [1e400]}, {"min_per_class": True}])
        config = {"model": str(model), "dataset": "toy", **value}
        (target / "config.json").write_text(json.dumps(config).replace("1e+400", "1e400"))
        seal(target)
        (sandbox / "c.yaml").write_text(yaml.safe_dump({"model": str(model), **value}))
    elif kind == "splits":
        splits = rng.choice([{"seeds": {"0": {"train": None}}}, {"seeds": []}, {"seeds": {"x": {"train": [], "test": []}}},
                             {"seeds": {"0": {"train": ["nope"], "test": ["nope"]}}}, "[]"])
        (target / "splits.json").write_text(json.dumps(splits))
        seal(target)
    # every run-folder kind also holds a file of the user's, which must stay as it is
    (target / "notes").mkdir(exist_ok=True)
    (target / "notes" / ".draft.x1.tmp").write_text("the user's draft")
    planted.append(target / "notes" / ".draft.x1.tmp")
    return planted


def _card(folder: Path, rng: random.Random) -> None:
    """A crafted detector folder."""
    from safetensors.numpy import save_file

    folder.mkdir()
    d = 4
    tensors = {"mean": np.zeros(d, np.float32), "scale": np.ones(d, np.float32), "coef": np.ones(d, np.float32),
               "intercept": np.zeros(1)}
    drop = rng.choice([None, "scale", "coef", "intercept"])
    if drop:
        del tensors[drop]
    if rng.random() < 0.3:
        tensors["scale"] = np.zeros(d + 1, np.float32)
    if rng.random() < 0.3:  # weights of a dtype export never writes (numpy has no bfloat16: float16 stands in)
        tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
    save_file(tensors, str(folder / "detector.safetensors"))
    card = rng.choice([[], "x", {"model": 3}, {"model": "m", "site": "../x", "layer": 1, "position": "-1"},
                       {"model": "m", "site": "residual", "layer": None, "position": "-1"},
                       {"model": "m", "threshold": "high"}, {"model": "m", "prompt_prefix": 5},
                       {"model": "m", "site": "residual", "layer": 999, "position": "-1", "threshold": 0.5},
                       {"model": "m", "layer": 1, "position": "-1", "threshold": 0.5},
                       {"model": "m", "site": "residual", "layer": 1, "position": "-1", "threshold": "1e400"},
                       {"model": "m", "site": "residual", "layer": 1, "position": "-1\u202e", "threshold": 0.5}])
    text = json.dumps(card).replace('"1e400"', "1e400") if rng.random() < 0.9 else "[" * 100_000
    (folder / "card.json").write_text(text)


HOSTILE_KINDS = ("foreign", "manifest", "lock", "shard", "config", "summary", "index", "splits", "card", "planted",
                 "multi", "settings")
SETTING_FLAGS = (["--bootstrap", "-5"], ["--positions", "-\u00b2"], ["--limit", "x"], ["--trust-remote-code", "false"],
                 ["--seeds", "1e400"], ["--min-per-class", "1"])


def hostile_folders(n_trials: int, work: Path, rng: random.Random) -> dict:
    """Commands on crafted folders, in process: count files truthmap did not write that changed (must be
    0), tracebacks (must be 0), and code run from a folder (must be 0)."""
    from truthmap import runfolder as rf
    from truthmap.cli import app
    from truthmap.analyses.detector import Detector
    from truthmap.errors import TruthmapError

    tally = {"trials": 0, "commands": 0, "refused": 0, "ran": 0, "touched": [], "created": [], "tracebacks": [],
             "code_ran": 0,
             "kinds": {k: 0 for k in HOSTILE_KINDS}}
    for k in range(n_trials):
        kind = HOSTILE_KINDS[k % len(HOSTILE_KINDS)] if k < len(HOSTILE_KINDS) else rng.choice(HOSTILE_KINDS)
        sandbox = work / "hostile" / f"trial-{k:03d}"
        (sandbox / "outside").mkdir(parents=True)
        (sandbox / "outside" / "thesis.txt").write_text("years of work")
        np.save(sandbox / "outside" / "array.npy", np.ones((1, 2, 40, 8), np.float16), allow_pickle=False)
        target = sandbox / "target"
        tally["trials"] += 1
        tally["kinds"][kind] += 1
        if kind == "card":
            _card(target, rng)
            watched = _snapshot([sandbox])
            try:
                Detector.load(target)
                outcome = "ran"
            except TruthmapError:
                outcome = "refused"
            except Exception as err:  # noqa: BLE001 - what this family exists to find
                outcome = f"{type(err).__name__}: {str(err)[:200]}"
            (sandbox / "pairs.csv").write_text("question,answer\n=HYPERLINK(1),+cmd|x\n")
            commands = [["score", "--detector", str(target), "--question", "Q?", "--answer", "a"],
                        ["ask", "Q?", "--detector", str(target)],
                        ["score", "--detector", str(target), "--file", str(sandbox / "pairs.csv")]]
            allowed = []
        else:
            planted = _craft(kind, target, sandbox, rng)
            watched = _snapshot([sandbox / "outside", *planted])
            commands = rng.sample([
                ["plot", "--out", str(target), "--quiet"], ["probe", "--out", str(target), "--quiet"],
                ["export", str(target)], ["report", str(target), "--out", str(sandbox / "r.html")],
                ["transfer", "--train", str(target), "--layer", "1", "--position", "-1", "--out", str(sandbox / "t")],
                ["generate", "--out", str(target), "--limit", "2", "--quiet"] if kind in ("foreign", "config") else
                ["plot", "--out", str(target), "--quiet"]], 2)
            if kind == "planted":
                commands = [["export", str(target), "--layer", "1", "--position", "-1"],
                            ["report", str(target), "--out", str(sandbox / "r.html")],
                            ["transfer", "--train", str(target), "--layer", "1", "--position", "-1"],
                            ["transfer", "--train", str(target), "--layer", "1", "--position", "-1", "--out",
                             str(sandbox / "t")], ["probe", "--out", str(target), "--quiet"]]
            elif kind == "settings":
                commands = [["probe", "--out", str(target), "--quiet"],
                            ["generate", "--out", str(sandbox / "fresh"), "--config", str(sandbox / "c.yaml"),
                             "--quiet"],
                            ["probe", "--out", str(target), "--quiet", *rng.choice(SETTING_FLAGS)]]
            outcome = None
            # where truthmap may write: the run folder (not a folder of someone else's files) and the
            # outputs the commands name; anything else new or changed is counted
            allowed = [sandbox / "r.html", sandbox / "r-2.html", sandbox / "t", sandbox / "fresh",
                       sandbox / ".truthmap-outputs.json"] + ([target] if kind != "foreign" else [])
        everything = _snapshot([sandbox])
        for argv in commands:
            tally["commands"] += 1
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    app(argv)
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code
                except Exception as error:  # noqa: BLE001 - what this family exists to find
                    code = f"{type(error).__name__}: {str(error)[:200]}"
            if rf.open_runs():  # an escaped exception left a run folder held: its lock was never released
                tally["tracebacks"].append(f"{kind}: {' '.join(argv[:1])}: left open {rf.open_runs()}")
                for held in rf.open_runs():
                    held.close()
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            if code == 0:
                tally["ran"] += 1
            elif code == 2 and lines and lines[-1].startswith(("error: ", "Error: ")) and "Traceback" not in err.getvalue():
                # "Error: …" is click's one line for a value or option the command refuses
                tally["refused"] += 1
            else:
                tally["tracebacks"].append(f"{kind}: {' '.join(argv[:1])}: exit {code}, stderr {lines[-2:]}")
        if outcome is not None:
            if outcome in ("ran", "refused"):
                tally[outcome] += 1
            else:
                tally["tracebacks"].append(f"card: {outcome}")
        after = _snapshot([sandbox])
        for path, before in watched.items():  # the user's files, inside the folder or out: unchanged
            if after.get(path) != before:
                tally["touched"].append(f"{kind}: {path}")
        for path, now in after.items():  # the whole area around the run, new files included
            inside = any(Path(path) == a or Path(path).is_relative_to(a) for a in allowed)
            if not inside and everything.get(path) != now and path not in watched:
                tally["created" if path not in everything else "touched"].append(f"{kind}: {path}")
        if (sandbox / "marker").exists():
            tally["code_ran"] += 1
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="kill/resume trials (each 1-3 kills)")
    parser.add_argument("--damage", type=int, default=5, help="finished runs with one file damaged")
    parser.add_argument("--fuzz", type=int, default=300, help="fuzzed question files")
    parser.add_argument("--limit", type=int, default=64, help="questions per study")
    parser.add_argument("--hostile", type=int, default=45, help="commands on crafted, hostile folders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="truthmap-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "study.yaml"
    config.write_text(yaml.safe_dump({"limit": args.limit, "seeds": [0], "test_fraction": 0.3, "validation_fraction": 0.2,
                                      "min_per_class": 4, "bootstrap": 50,
                                      "max_new_tokens": 16, "batch_size": 8}))
    started = time.perf_counter()
    kills = kill_resume_trials(args.trials, config, work, rng) if args.trials else None
    damage = damage_trials(args.damage, config, work, kills["reference"], rng) if kills else None
    fuzz = fuzz_files(args.fuzz, work, rng, kills["reference"] if kills else None)
    hostile = hostile_folders(args.hostile, work, rng) if args.hostile else None
    print()
    ok = True
    if hostile:
        print(f"hostile folders: {hostile['trials']} ({', '.join(f'{k} {v}' for k, v in hostile['kinds'].items())}); "
              f"{hostile['commands']} commands: {hostile['refused']} refused in one line, {hostile['ran']} ran; "
              f"files of someone else changed: {len(hostile['touched'])}; files created outside: "
              f"{len(hostile['created'])}; tracebacks: {len(hostile['tracebacks'])}; "
              f"code run from a folder: {hostile['code_ran']}")
        for failure in (hostile["touched"] + hostile["created"] + hostile["tracebacks"])[:20]:
            print(f"  FAILED {failure}")
        ok &= not hostile["touched"] and not hostile["created"] and not hostile["tracebacks"] and not hostile["code_ran"]
    if kills:
        print(f"kill/resume: {kills['survived']} of {kills['trials']} trials survived "
              f"({kills['kills_at_events']} kills at write events, {kills['kills_at_times']} at random times); "
              f"rows lost: {kills['rows_lost']}")
        for failure in kills["failures"]:
            print(f"  FAILED {failure}")
        ok &= kills["survived"] == kills["trials"] and kills["rows_lost"] == 0
    if damage:
        print(f"damaged files: {damage['survived']} of {damage['trials']} runs repaired to the reference's results, "
              f"{damage['named']} damaged files named; rows lost: {damage['rows_lost']}")
        for failure in damage["failures"]:
            print(f"  FAILED {failure}")
        ok &= damage["survived"] == damage["trials"] and damage["rows_lost"] == 0
    print(f"fuzzed files: {fuzz['files']}: {fuzz['clear_errors']} clear errors, {fuzz['loaded']} loaded, "
          f"{len(fuzz['crashes'])} crashes")
    for crash in fuzz["crashes"][:20]:
        print(f"  CRASH {crash}")
    if kills:
        print(f"refused files given to `truthmap run` on a finished run: {fuzz['cli_refused']} refused in one "
              f"line, {len(fuzz['cli_failures'])} problems")
        for failure in fuzz["cli_failures"]:
            print(f"  FAILED {failure}")
    ok &= not fuzz["crashes"] and not fuzz["cli_failures"]
    print(f"{'PASS' if ok else 'FAIL'} in {time.perf_counter() - started:.0f} s")
    if ok and not args.work:
        shutil.rmtree(work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
