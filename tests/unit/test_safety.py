"""Safe by construction (no model): a folder is a run folder or it is refused untouched; nothing outside
the run folder is read, written or deleted; values read from a folder never widen what runs; every bad
input is one line; readers verify what they read. Each test is a reproduction that failed before."""

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from truthmap import data
from truthmap import runfolder as rf
from truthmap.cli import app
from truthmap.errors import TruthmapError


def snapshot(root: Path) -> dict:
    """Every path under ``root`` (links not followed) -> its kind and content hash."""
    out = {}
    for where, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(where) / name
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                out[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[str(path)] = ("dir",)
    return out


def make_run(run_dir: Path) -> None:
    """A run folder with a finished 'label' stage and the files the readers need."""
    with rf.open_run(run_dir):
        with rf.stage("label"):
            rf.write_json(run_dir / rf.CONFIG, {"model": "embedded:smollm2-135m-instruct", "dataset": "facts"})
            rf.write_parquet(run_dir / rf.ANSWERS, pd.DataFrame({"id": ["a", "b"], "correct": [True, False]}))
            rf.write_json(run_dir / rf.SPLITS, {"seeds": {"0": {"train": ["a"], "test": ["b"]}}})
            rf.update_summary(run_dir, accuracy=0.5)
            rf.mark_stage_done(run_dir, "label", "print-1", 1.0)


def exit_line(argv, capsys) -> str:
    """Run the CLI, expect exit status 2; return its one stderr line."""
    with pytest.raises(SystemExit) as exit_:
        app(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # notices (truthmap: …) may come first
    assert "Traceback" not in "\n".join(lines) and lines and all(line.startswith("truthmap: ") for line in lines[:-1])
    assert lines[-1].startswith("error: ")
    return lines[-1]


# ---------------------------------------------------------------- 1. a run folder, or refused untouched

def test_out_at_a_folder_that_is_not_a_run_folder_is_refused_untouched(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "activations").mkdir(parents=True)
    (folder / "activations" / "x.npy").write_bytes(b"my array")
    (folder / "summary.json").write_text('{"mine": true}')
    (folder / "deep").mkdir()
    (folder / "deep" / ".draft.k2j3.tmp").write_text("my draft")
    (folder / "lock").write_text("my lock notes")
    (folder / "report.html").write_text("my page")
    before = snapshot(tmp_path)
    for command in ("extract", "generate", "plot", "run"):
        err = exit_line([command, "--out", str(folder), "--quiet"], capsys)
        assert "not a run folder" in err and "nothing touched" in err
    for command in (["export", str(folder)], ["resample", str(folder)], ["choose", str(folder)]):
        assert "not a run folder" in exit_line(command, capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("contents", [
    {"notes.txt": "x"},
    {"config.json": "not json"},
    {"config.json": '{"model": "x"}', "thesis.tex": "x"},
])
def test_any_folder_without_a_manifest_but_truthmaps_names_is_refused(tmp_path, contents):
    for name, text in contents.items():
        (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    with pytest.raises(TruthmapError, match="not a run folder"):
        with rf.open_run(tmp_path):
            pass
    assert snapshot(tmp_path) == before


def test_missing_empty_older_and_lock_only_folders_are_run_folders(tmp_path):
    older = tmp_path / "older"
    older.mkdir()
    (older / rf.CONFIG).write_text('{"model": "m", "dataset": "facts"}')
    (older / rf.SUMMARY).write_text("{}")
    lock_only = tmp_path / "lock_only"
    lock_only.mkdir()
    (lock_only / rf.LOCK).write_text("")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new", tmp_path / "empty", older, lock_only):
        with rf.open_run(folder):
            pass


# ---------------------------------------------------------------- 2. nothing outside the run folder

@pytest.mark.parametrize("key", ["../thesis.txt", "ABSOLUTE", "sub/../../thesis.txt"])
def test_a_manifest_key_outside_the_folder_is_never_read_nor_deleted(tmp_path, key, capsys):
    run, thesis = tmp_path / "run", tmp_path / "thesis.txt"
    make_run(run)
    thesis.write_text("years of work")
    key = str(thesis) if key == "ABSOLUTE" else key
    manifest = json.loads((run / rf.MANIFEST).read_text())
    manifest["files"][key] = {"size": 1, "sha256": "0" * 64, "stage": "probe"}
    (run / rf.MANIFEST).write_text(json.dumps(manifest))
    with rf.open_run(run) as notices:
        assert any("manifest.json: damaged" in n and "none is deleted" in n for n in notices)
        assert not rf.trusted(run / rf.ANSWERS)
    assert thesis.read_text() == "years of work"
    capsys.readouterr()
    err = exit_line(["plot", "--out", str(run), "--quiet"], capsys)  # the reproduction: plot on a shared run
    assert "not in the run's manifest" in err and "not read" in err  # a file no manifest vouches for: never read
    assert thesis.read_text() == "years of work"


def test_a_manifest_entry_that_is_a_symbolic_link_out_is_not_followed(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside.parquet"
    make_run(run)
    outside.write_bytes(b"user data")
    (run / rf.ANSWERS).unlink()
    (run / rf.ANSWERS).symlink_to(outside)
    with rf.open_run(run) as notices:
        assert any("manifest.json: damaged" in n and "symbolic link" in n for n in notices)
    assert outside.read_bytes() == b"user data" and (run / rf.ANSWERS).is_symlink()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "folder"])
def test_a_lock_that_is_not_a_regular_file_of_its_own_is_refused(tmp_path, kind):
    run, target = tmp_path / "run", tmp_path / "precious.txt"
    make_run(run)
    target.write_text("do not overwrite")
    (run / rf.LOCK).unlink()
    if kind == "symlink":
        (run / rf.LOCK).symlink_to(target)
    elif kind == "hardlink":
        os.link(target, run / rf.LOCK)
    else:
        (run / rf.LOCK).mkdir()
    with pytest.raises(TruthmapError, match="lock"):
        with rf.open_run(run):
            pass
    assert target.read_text() == "do not overwrite"


def test_only_truthmaps_own_temporary_files_are_deleted(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    ours = run / ".answers.parquet.k2j3h4ab.truthmap.tmp"
    ours.write_bytes(b"half")
    (run / "notes").mkdir()
    theirs = run / "notes" / ".draft.abc.tmp"
    theirs.write_text("mine")
    (run / "generations").mkdir()
    linked = run / "generations" / ".plan.json.x1234567.truthmap.tmp"
    linked.symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("mine too")
    user_tmp = [run / ".draft.tmp", run / "generations" / ".idea.v2.tmp", run / "generations" / ".a.b.tmp"]
    for path in user_tmp:  # temporary-looking names of someone else: not truthmap's pattern
        path.write_text("mine")
    with rf.open_run(run):
        rf.remove(run / rf.GENERATION_CHUNKS)
    assert not ours.exists()
    assert theirs.read_text() == "mine" and (tmp_path / "elsewhere.txt").read_text() == "mine too"
    assert all(path.read_text() == "mine" for path in user_tmp)


def test_removing_a_stage_folder_keeps_files_truthmap_did_not_write(tmp_path):
    run = tmp_path / "run"
    with rf.open_run(run):
        rf.write_text(run / rf.ACTIVATIONS / "fingerprint", "x")
        rf.write_npy(run / rf.ACTIVATIONS / "residual" / "shard-00000.npy", np.zeros(3))
        (run / rf.ACTIVATIONS / "my_notes.txt").write_text("mine")
        rf.remove(run / rf.ACTIVATIONS)
        assert not (run / rf.ACTIVATIONS / "residual").exists()
        assert (run / rf.ACTIVATIONS / "my_notes.txt").read_text() == "mine"
        assert not any(k.startswith("activations/") for k in rf.innermost().files)


def test_a_write_through_a_symlinked_folder_is_refused(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    with rf.open_run(run):
        (run / rf.ACTIVATIONS).symlink_to(outside)
        with pytest.raises(TruthmapError, match="symbolic link|outside the run folder"):
            rf.write_npy(run / rf.ACTIVATIONS / "valid.npy", np.zeros(2))
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------- 3. read values never widen trust

def _custom_code_model(folder: Path, marker: Path) -> None:
    """A local model folder whose configuration code, if ever imported, writes ``marker``."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")


def test_a_run_folders_config_never_chooses_the_model_nor_turns_on_remote_code(tmp_path, capsys):
    marker, model = tmp_path / "marker", tmp_path / "evil_model"
    _custom_code_model(model, marker)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / rf.CONFIG).write_text(json.dumps({"model": str(model), "trust_remote_code": True}))
    assert "not a run folder" in exit_line(["generate", "--out", str(only_config), "--limit", "5", "--quiet"], capsys)
    run = tmp_path / "run"  # a run folder whose manifest vouches for such a config
    with rf.open_run(run):
        rf.write_json(run / rf.CONFIG, {"model": str(model), "dataset": "facts", "trust_remote_code": True,
                                        "ray": "ray://203.0.113.7:10001", "device_map": "auto"})
    err = exit_line(["generate", "--out", str(run), "--limit", "5", "--quiet"], capsys)
    assert "give --model" in err and "never taken from a run folder" in err
    assert not marker.exists()


def test_continued_settings_leave_out_trust_and_say_what_differs(tmp_path, capsys):
    from truthmap.config import Config
    from truthmap.pipeline import continue_config

    run = tmp_path / "run"
    with rf.open_run(run):
        rf.write_json(run / rf.CONFIG, {**Config().to_dict(), "trust_remote_code": True, "seeds": [7],
                                        "ray": "ray://203.0.113.7:10001", "device_map": "auto", "limit": 9})
        config = continue_config(Config(out=str(run)), run, frozenset({"out"}), ("probe",))
    assert (config.trust_remote_code, config.ray, config.device_map) == (False, None, None)
    assert (config.seeds, config.limit) == ([7], 9)  # settings that choose no code are continued
    err = capsys.readouterr().err
    assert "trust_remote_code = True" in err and "device_map" in err
    assert "ray://203.0.113.7" not in err  # the probe stage runs nothing on Ray workers: nothing to say
    with rf.open_run(run):
        continue_config(Config(out=str(run)), run, frozenset({"out"}), ("generate", "probe"))
    assert "ray://203.0.113.7" in capsys.readouterr().err


def test_trust_remote_code_can_be_said_no(tmp_path, monkeypatch):
    from truthmap import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_stages", lambda config, **kw: seen.update(config=config, **kw) or tmp_path)
    monkeypatch.setattr("truthmap.cli._report", lambda run_dir: None)
    app(["run", "--out", str(tmp_path / "r"), "--no-trust-remote-code", "--quiet"])
    assert seen["config"].trust_remote_code is False and "trust_remote_code" in seen["given"]
    app(["run", "--out", str(tmp_path / "r"), "--trust-remote-code", "--quiet"])
    assert seen["config"].trust_remote_code is True


# ---------------------------------------------------------------- 4. every bad input is one line

DEEP = "[" * 200_000 + "]" * 200_000


def test_deeply_nested_json_in_a_jsonl_field_is_one_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a"})[:-1] + ', "x": ' + DEEP + "}\n")
    with pytest.raises(TruthmapError, match=r"q.jsonl, line 1: nested deeper"):
        data.load_questions(str(path))


def test_deeply_nested_gold_cell_in_a_csv_is_a_bad_row(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text(f"question,answer\nWhat?,{DEEP}\nAnd?,b\n")
    with pytest.raises(TruthmapError, match=r"q.csv, row 2, field 'answer'.*nested too deep"):
        data.load_questions(str(path))
    table, _ = data.load_questions(str(path), on_bad_row="skip")
    assert list(table["question"]) == ["And?"] and table.attrs["source_rows"]["skipped_bad"] == 1


def test_a_lone_surrogate_is_one_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "q\\ud800?", "answer": "a"}\n')
    with pytest.raises(TruthmapError, match=r"q.jsonl, line 1: .*lone surrogate"):
        data.load_questions(str(path))


def test_nan_and_infinity_in_a_runs_json_are_refused_on_read(tmp_path):
    run = tmp_path / "run"
    with rf.open_run(run):
        rf.write_text(run / rf.SPLITS, '{"seeds": NaN}')
        with pytest.raises(TruthmapError, match="NaN is not a JSON number"):
            rf.read_json(run / rf.SPLITS)
        rf.write_text(run / rf.SPLITS, "[" * 500 + "]" * 500)
        with pytest.raises(TruthmapError, match="nested deeper"):
            rf.read_json(run / rf.SPLITS)


def test_json_the_project_writes_holds_null_never_nan(tmp_path, capsys):
    from truthmap.cli import _report

    run = tmp_path / "run"
    cell = {"site": "residual", "layer": 1, "position": "-1", "auc": 0.7, "auc_std": float("nan"),
            "auc_lo": np.float64("nan"), "auc_hi": math.inf, "n_test": 4}
    with rf.open_run(run):
        rf.update_summary(run, top_cells=[cell], best_cell=cell, accuracy=float("nan"))
    text = (run / rf.SUMMARY).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["top_cells"][0]["auc_lo"] is None
    _report(run)  # the terminal summary of a cell whose interval is unknown
    assert "n/a" in capsys.readouterr().out


def test_score_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_bytes("question,answer\nQuelle capitale?,Bogotá\n".encode("latin-1"))
    err = exit_line(["score", "--detector", str(tmp_path), "--file", str(path)], capsys)
    assert "not UTF-8" in err


@pytest.mark.parametrize("data,message", [
    ("limit: 5\nmodel: café\n".encode("latin-1"), "not UTF-8"),
    (b"x: " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply|could not read"),
])
def test_a_config_file_that_is_not_utf8_or_too_deep_is_one_line(tmp_path, capsys, data, message):
    import re

    path = tmp_path / "study.yaml"
    path.write_bytes(data)
    assert re.search(message, exit_line(["run", "--config", str(path), "--out", str(tmp_path / "r")], capsys))


def _detector_folder(folder: Path, card, tensors=None) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir()
    d = 3
    tensors = tensors if tensors is not None else {"mean": np.zeros(d, np.float32), "scale": np.ones(d, np.float32),
                                                   "coef": np.ones(d, np.float32), "intercept": np.zeros(1)}
    save_file(tensors, str(folder / "detector.safetensors"))
    (folder / "card.json").write_text(json.dumps(card))
    return folder


GOOD_CARD = {"model": "m", "site": "residual", "layer": 3, "position": "-1", "threshold": 0.5, "C": 1.0}


@pytest.mark.parametrize("card,tensors,message", [
    ([], None, "not a card"),
    ({**GOOD_CARD, "threshold": "high"}, None, "field 'threshold'"),
    ({**GOOD_CARD, "position": "../../x"}, None, "not a position"),
    ({**GOOD_CARD, "layer": None}, None, "not a layer"),
    (GOOD_CARD, {"mean": np.zeros(3, np.float32), "coef": np.ones(3, np.float32), "intercept": np.zeros(1)},
     "no tensor scale"),
    (GOOD_CARD, {"mean": np.zeros(3, np.float32), "scale": np.ones(2, np.float32), "coef": np.ones(3, np.float32),
                 "intercept": np.zeros(1)}, "'scale' is not"),
])
def test_a_crafted_detector_is_one_line(tmp_path, capsys, card, tensors, message):
    from truthmap.analyses.detector import Detector

    folder = _detector_folder(tmp_path / "det", card, tensors)
    with pytest.raises(TruthmapError, match=message):
        Detector.load(folder)
    assert message in exit_line(["score", "--detector", str(folder), "--question", "q?", "--answer", "a"], capsys)


def test_plot_before_the_probe_stage_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    err = exit_line(["plot", "--out", str(run), "--quiet"], capsys)
    assert "probe_results.csv: missing" in err


@pytest.mark.parametrize("entry", [None, [], {"size": "1", "sha256": "0" * 64}, {"size": 1, "sha256": "zz"}, 7])
def test_a_damaged_manifest_entry_trusts_nothing_and_deletes_nothing(tmp_path, entry):
    run = tmp_path / "run"
    make_run(run)
    manifest = json.loads((run / rf.MANIFEST).read_text())
    manifest["files"][rf.ANSWERS] = entry
    (run / rf.MANIFEST).write_text(json.dumps(manifest))
    before = snapshot(run)
    with rf.open_run(run) as notices:
        assert any("manifest.json: damaged" in n for n in notices)
        assert not rf.trusted(run / rf.SPLITS)
    assert all(snapshot(run).get(p) == v for p, v in before.items() if not p.endswith(("lock", "json")))


# ---------------------------------------------------------------- 5. bounded input

def test_a_field_longer_than_the_cap_is_an_error_or_a_counted_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_FIELD_CHARS", 100)
    path = tmp_path / "q.csv"
    path.write_text("question,answer\n" + "Why" * 50 + "?,a\nAnd?,b\n")
    with pytest.raises(TruthmapError, match=r"row 2, field 'question': 151 characters, more than the 100"):
        data.load_questions(str(path))
    table, _ = data.load_questions(str(path), on_bad_row="skip")
    assert list(table["question"]) == ["And?"]


def test_a_jsonl_line_longer_than_the_cap_is_never_held(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 64)
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "x" * 500, "answer": "a"}) + "\n" + '{"question": "q?", "answer": "b"}\n')
    with pytest.raises(TruthmapError, match=r"q.jsonl, row 1: a line of more than 64 bytes"):
        data.load_questions(str(path))
    table, _ = data.load_questions(str(path), on_bad_row="skip")
    assert list(table["question"]) == ["q?"]


def test_a_question_file_over_the_size_cap_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 10_000)
    monkeypatch.setattr(data, "MAX_WHOLE_FILE_BYTES", 1000)
    path = tmp_path / "q.csv"
    path.write_text("question,answer\n" + "".join(f"What {i}?,a\n" for i in range(200)))
    with pytest.raises(TruthmapError, match="studied whole.*give --limit N"):
        data.load_questions(str(path))
    assert len(data.load_questions(str(path), limit=5)[0]) == 5  # streamed: under MAX_FILE_BYTES
    path.write_text("question,answer\n" + "".join(f"What {i}?,a\n" for i in range(2000)))
    with pytest.raises(TruthmapError, match="a question file may hold"):
        data.load_questions(str(path), limit=5)


def test_a_limited_sample_is_the_same_as_the_whole_files(tmp_path, monkeypatch):
    path = tmp_path / "q.csv"
    path.write_text("question,answer\n" + "".join(f"What {i}?,a{i}\n" for i in range(300)))
    whole, _ = data.load_questions(str(path))
    monkeypatch.setattr(data, "CHUNK_BYTES", 70)  # several chunks (about 5 rows each), read twice
    sample, _ = data.load_questions(str(path), limit=20, seed=3)
    expected = whole.sample(frac=1.0, random_state=3).head(20).sort_index().reset_index(drop=True)
    assert sample.equals(expected) and sample.attrs["source_rows"]["read"] == 300


# ---------------------------------------------------------------- 6. readers verify

def _store(run: Path) -> None:
    """A finished extract stage: two examples, one site, one layer, one position."""
    with rf.open_run(run), rf.stage("extract"):
        rf.write_npy(run / rf.ACTIVATIONS / "valid.npy", np.ones((2, 1), bool))
        rf.write_npy(run / rf.ACTIVATIONS / "residual" / "shard-00000.npy", np.ones((1, 1, 2, 4), np.float16))
        rf.write_json(run / rf.ACTIVATIONS / "index.json", {
            "ids": ["a", "b"], "positions": ["-1"], "hidden_size": 4, "dtype": "float16",
            "sites": {"residual": {"layers": [0], "shards": [{"file": "residual/shard-00000.npy", "start": 0, "stop": 2}]}}})


def test_load_features_checks_the_manifest(tmp_path):
    from truthmap.stages.extract import load_features

    run = tmp_path / "run"
    make_run(run)
    _store(run)
    ids, X = load_features(run, "residual", 0, "-1")
    assert ids == ["a", "b"] and X.shape == (2, 4)
    shard = run / rf.ACTIVATIONS / "residual" / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x7c")  # one feature silently corrupted (to inf)
    with pytest.raises(TruthmapError, match="shard-00000.npy: damaged"):
        load_features(run, "residual", 0, "-1")


def test_a_shard_name_in_the_index_cannot_leave_the_folder(tmp_path):
    from truthmap.stages.extract import load_features

    run = tmp_path / "run"
    make_run(run)
    _store(run)
    with rf.open_run(run):
        meta = rf.read_json(run / rf.ACTIVATIONS / "index.json")
        meta["sites"]["residual"]["shards"][0]["file"] = "../../../outside.npy"
        rf.write_json(run / rf.ACTIVATIONS / "index.json", meta)
    with pytest.raises(TruthmapError, match="not an index of the activations store"):
        load_features(run, "residual", 0, "-1")


def test_a_reader_waits_for_no_writer_and_refuses_while_one_writes(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom truthmap import runfolder as rf\n"
        "with rf.open_run(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"), str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TruthmapError, match=f"being written by pid {holder.pid}"):
            with rf.reading(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    with rf.reading(run):
        assert rf.read_json(run / rf.SPLITS)["seeds"]["0"]["test"] == ["b"]
        reader = subprocess.run([sys.executable, "-c", (  # a writer cannot start while the folder is read
            "import sys\nfrom truthmap import runfolder as rf\nfrom truthmap.errors import TruthmapError\n"
            "try:\n    with rf.open_run(sys.argv[1]):\n        print('wrote')\n"
            "except TruthmapError as err:\n    print(err)\n"), str(run)], capture_output=True, text=True)
        assert "being read" in reader.stdout


def test_export_refuses_a_crafted_best_cell_and_writes_nothing_outside(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    with rf.open_run(run):
        rf.update_summary(run, best_cell={"site": "residual", "layer": 1, "position": "../../../../escape"})
    before = snapshot(tmp_path)
    assert "not a position name" in exit_line(["export", str(run)], capsys)
    assert snapshot(tmp_path) == before


def test_export_into_a_folder_of_someone_elses_files_is_refused(tmp_path):
    from truthmap.analyses.detector import export_detector

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "card.json").write_text("my card collection")
    (mine / "photo.png").write_bytes(b"png")
    with pytest.raises(TruthmapError, match="did not write"):
        export_detector(tmp_path / "run", site="residual", layer=1, position="-1", out=mine)
    assert (mine / "card.json").read_text() == "my card collection"


# ---------------------------------------------------------------- 7. terminal output is sanitised

def test_terminal_text_from_files_and_models_is_escaped(tmp_path, capsys):
    assert rf.sanitise("ok\x1b[2J\rback\n\ud800") == "ok\\x1b[2J\\rback\\n\\ud800"
    path = tmp_path / "q.csv"
    path.write_text("query\x1b[31m,answer\nWhy?,a\n")
    err = exit_line(["run", "--dataset", str(path), "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert "\x1b" not in err and "\\x1b[31m" in err


# ---------------------------------------------------------------- every output guarded (runfolder.guard)

def test_no_write_follows_a_link_anywhere_below_the_folder_named(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.csv").write_text("mine")
    run = tmp_path / "run"
    make_run(run)
    # a folder truthmap would make inside a run, a link to elsewhere (the path does not exist yet below it)
    (run / rf.DETECTORS).symlink_to(outside, target_is_directory=True)
    before = snapshot(tmp_path)
    assert "symbolic link" in exit_line(["export", str(run), "--layer", "1", "--position", "-1"], capsys)
    assert snapshot(tmp_path) == before
    with pytest.raises(TruthmapError, match="symbolic link"):
        rf.write_text(run / rf.DETECTORS / "x" / "card.json", "{}")
    # the file itself a link (score --out, report --out): refused, --overwrite or not
    link = tmp_path / "o.csv"
    link.symlink_to(outside / "precious.csv")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("question,answer\nq,a\n")
    for extra in ([], ["--overwrite"]):
        line = exit_line(["score", "--detector", str(tmp_path / "none"), "--file", str(pairs), "--out", str(link),
                          *extra], capsys)
        assert "symbolic link" in line
    assert (outside / "precious.csv").read_text() == "mine" and os.path.islink(link)
    assert list(outside.iterdir()) == [outside / "precious.csv"]


def test_a_file_truthmap_did_not_write_is_replaced_only_with_overwrite(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><p>my own page</p>")  # looks like any HTML page, truthmap's too
    with pytest.raises(TruthmapError, match="did not write it"):
        rf.write_text(page, "<!doctype html>report")
    assert page.read_text() == "<!doctype html><p>my own page</p>"
    with rf.overwriting():
        rf.write_text(page, "<!doctype html>report 1")
    rf.write_text(page, "<!doctype html>report 2")  # now truthmap's: listed, unchanged, so replaced
    assert page.read_text() == "<!doctype html>report 2"
    page.write_text("<!doctype html>report 2, edited by hand")  # edited since: the user's again
    with pytest.raises(TruthmapError, match="did not write it"):
        rf.write_text(page, "<!doctype html>report 3")
    assert "edited by hand" in page.read_text()
    # a listing cannot be used to replace another name's file of the same content
    other = tmp_path / "notes.html"
    other.write_text("<!doctype html>report 2, edited by hand")
    with pytest.raises(TruthmapError, match="did not write it"):
        rf.write_text(other, "x")


def test_default_output_names_never_clobber(tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("question,answer\nq,a\n")
    theirs = tmp_path / "pairs.scored.csv"
    theirs.write_text("someone's scores")
    chosen = rf.free_name(theirs)
    assert chosen == tmp_path / "pairs.scored-2.csv"
    rf.write_csv(chosen, pd.DataFrame({"p_error": [0.5]}))
    assert rf.free_name(theirs) == chosen  # truthmap's own earlier output is replaced
    assert theirs.read_text() == "someone's scores"
    # an explicit --out naming someone's file is refused before any model is loaded
    line = exit_line(["score", "--detector", str(tmp_path / "none"), "--file", str(pairs), "--out", str(theirs)], capsys)
    assert "did not write it" in line and "--overwrite" in line
    assert theirs.read_text() == "someone's scores"


def test_transfer_and_report_refuse_a_file_of_someone_else(tmp_path, capsys, monkeypatch):
    from truthmap.analyses import transfer

    run = tmp_path / "run"
    make_run(run)
    monkeypatch.setattr(transfer, "resolve_run", lambda t, model: Path(t))  # a run without features is enough
    out = tmp_path / "t"
    out.mkdir()
    (out / "transfer.csv").write_text("my table")
    line = exit_line(["transfer", "--train", str(run), "--layer", "1", "--position", "-1", "--out", str(out)], capsys)
    assert "did not write it" in line
    assert (out / "transfer.csv").read_text() == "my table"
    page = tmp_path / "mine.html"
    page.write_text("<html>my page</html>")
    assert "did not write it" in exit_line(["report", str(run), "--out", str(page)], capsys)
    assert page.read_text() == "<html>my page</html>"


def test_a_run_never_deletes_a_file_it_did_not_list(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    (run / rf.GENERATION_CHUNKS).write_text("a file of mine named generations")
    (run / rf.ACTIVATIONS / "notes").mkdir(parents=True)
    (run / rf.ACTIVATIONS / "notes" / ".idea.v2.tmp").write_text("an idea")
    with rf.open_run(run):
        rf.remove(run / rf.GENERATION_CHUNKS)
        rf.remove(run / rf.ACTIVATIONS)
        with pytest.raises(TruthmapError, match="where it needs a folder"):
            rf.write_json(run / rf.GENERATION_CHUNKS / rf.CHUNK_PLAN, {"key": "k"})
    assert (run / rf.GENERATION_CHUNKS).read_text() == "a file of mine named generations"
    assert (run / rf.ACTIVATIONS / "notes" / ".idea.v2.tmp").read_text() == "an idea"
    # a folder holding only dotfiles or temporary-looking files of someone else is not empty: refused
    drafts = tmp_path / "drafts"
    drafts.mkdir()
    (drafts / ".draft.tmp").write_text("my draft")
    before = snapshot(drafts)
    assert "not a run folder" in exit_line(["run", "--dataset", "facts", "--out", str(drafts), "--quiet"], capsys)
    assert snapshot(drafts) == before


def test_csv_outputs_neutralise_spreadsheet_formulas(tmp_path):
    frame = pd.DataFrame({"family": ["=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "@SUM(A1)", "-2+3",
                                     "\tx", "plain", "-1", "+0.5"], "n": range(8)})
    rf.write_csv(tmp_path / "t.csv", frame)
    back = pd.read_csv(tmp_path / "t.csv", dtype=str)
    assert back["family"].tolist()[:6] == ["'=HYPERLINK(\"http://x\",\"y\")", "'+cmd|' /C calc'!A0", "'@SUM(A1)",
                                           "'-2+3", "'\tx", "plain"]
    assert back["family"].tolist()[6:] == ["-1", "+0.5"]  # plain numbers are numbers, never formulas
    assert frame["family"][0].startswith("=")  # the caller's table is not changed


def test_a_file_dropped_from_the_manifest_and_edited_is_never_read(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    manifest = json.loads((run / rf.MANIFEST).read_text())
    del manifest["files"][rf.SPLITS]
    (run / rf.MANIFEST).write_text(json.dumps(manifest))
    (run / rf.SPLITS).write_text(json.dumps({"seeds": {"0": {"train": ["b"], "test": ["a"]}}}))  # swapped by hand
    with rf.open_run(run):
        with pytest.raises(TruthmapError, match="not in the run's manifest"):
            rf.read_splits(run / rf.SPLITS)
        assert rf.read_parquet(run / rf.ANSWERS)["id"].tolist() == ["a", "b"]  # a listed file still reads


# ---------------------------------------------------------------- memory bounded by bytes

def test_csv_chunks_are_bounded_by_bytes_not_rows(tmp_path, monkeypatch):
    path = tmp_path / "wide.csv"
    filler = ",".join(f"c{i}" for i in range(500))
    path.write_text("question,answer," + filler + "\n" + "".join(f"Q{i}?,a{i}," + filler + "\n" for i in range(60)))
    seen = []
    read_csv = pd.read_csv

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunksize"))
        return read_csv(*args, **kwargs)

    monkeypatch.setattr(data.pd, "read_csv", spy)
    monkeypatch.setattr(data, "CHUNK_BYTES", 20_000)  # a row is ~3.4 kB: about 5 rows a chunk, not 20,000
    table, _ = data.load_questions(str(path), limit=3)
    row_bytes = path.stat().st_size / 61
    assert len(table) == 3 and seen and all(1 <= c and c * row_bytes <= 20_000 for c in seen)


def test_parquet_chunks_by_bytes_and_a_column_named_twice_is_refused(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "q.parquet"
    pq.write_table(pa.table([pa.array(["Q?"]), pa.array(["a"]), pa.array(["b"])],
                            names=["question", "answer", "answer"]), path)
    with pytest.raises(TruthmapError, match=r"duplicate column\(s\) \['answer'\]"):
        data.load_questions(str(path))
    pq.write_table(pa.table({"question": [f"Q{i}?" * 50 for i in range(40)], "answer": ["a"] * 40}), path)
    batches = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, batch_size, **kwargs):
        batches.append(batch_size)
        return iter_batches(self, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(data, "CHUNK_BYTES", 2_000)
    assert len(data.load_questions(str(path))[0]) == 40
    assert batches and all(b < 40 for b in batches)


def test_a_json_question_file_is_streamed_and_checked_as_strictly(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"Version": 1, "Data": [{"question": "Q1?", "answer": "a", "meta": {"x": [1, {"y": 2}]}},
                                                       {"question": "Q2?", "answer": "b"}]}))
    assert data.load_questions(str(path))[0]["question"].tolist() == ["Q1?", "Q2?"]
    for text, says in (('[{"question": "Q?", "question": "R?", "answer": "a"}]', "twice"),
                       ('[{"question": "Q?", "answer": NaN}]', "not valid JSON"),
                       ('[{"question": ' + "[" * 150 + "]" * 150 + ', "answer": "a"}]', "nested deeper"),
                       ('[3]', "a number, not a record"), ('{"other": []}', "expected a list")):
        path.write_text(text)
        with pytest.raises(TruthmapError, match=says):
            data.load_questions(str(path))


# ---------------------------------------------------------------- no tracebacks on hostile input

def test_a_full_disk_and_an_overlong_manifest_key_are_one_line(tmp_path, monkeypatch, capsys):
    import errno

    run = tmp_path / "run"
    make_run(run)
    manifest = json.loads((run / rf.MANIFEST).read_text())
    manifest["files"]["x" * 300] = {"size": 1, "sha256": "0" * 64, "stage": "probe"}  # ENAMETOOLONG on every check
    (run / rf.MANIFEST).write_text(json.dumps(manifest))
    with rf.open_run(run) as notices:
        assert any("manifest.json: damaged" in n for n in notices)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(TruthmapError, match=r"notes\.txt: no space left on device while writing it \(in "):
        rf.write_text(tmp_path / "notes.txt", "x")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_json_document_over_its_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_run(run)
    monkeypatch.setattr(rf.manifest, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(TruthmapError, match=r"manifest.json: damaged \(\d+ bytes, more than the 100"):
        with rf.reading(run):
            pass
    monkeypatch.setattr(rf.manifest, "MAX_MANIFEST_BYTES", 64 << 20)
    monkeypatch.setitem(rf.MAX_JSON_BYTES_OF, rf.SUMMARY, 5)
    with rf.reading(run), pytest.raises(TruthmapError, match=r"summary.json: \d+ bytes, more than the 5"):
        rf.read_json(run / rf.SUMMARY)


def test_bidi_controls_are_visible_in_the_report_and_infinite_json_is_refused(tmp_path):
    from truthmap.stages.report import render

    page = render([{"name": "run\u202eevil", "rows": ["gnp.exe\u202Ecod.txt", {"k\u2066": 1}]}])
    assert "\u202e" not in page and "\u2066" not in page and "⟨U+202E⟩" in page and "⟨U+2066⟩" in page
    with pytest.raises(ValueError, match="beyond the range"):
        rf.parse_json('{"layer": 1e400}')
    path = tmp_path / "card.json"
    path.write_text('{"test_auc": -1e999}')
    with pytest.raises(TruthmapError, match="beyond the range"):
        rf.read_json(path)


def test_an_output_folder_that_is_a_link_is_refused(tmp_path, monkeypatch, capsys):
    from truthmap.analyses import transfer

    run, outside = tmp_path / "run", tmp_path / "outside"
    make_run(run)
    outside.mkdir()
    (tmp_path / "t").symlink_to(outside, target_is_directory=True)
    monkeypatch.setattr(transfer, "resolve_run", lambda t, model: Path(t))
    for argv in (["transfer", "--train", str(run), "--layer", "1", "--position", "-1", "--out", str(tmp_path / "t")],
                 ["export", str(run), "--layer", "1", "--position", "-1", "--out", str(tmp_path / "t")]):
        assert "symbolic link" in exit_line(argv, capsys)
    assert list(outside.iterdir()) == []
