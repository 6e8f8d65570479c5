"""The run folder's crash safety without a model: manifest checks, interrupted writes, the lock, chunks."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
from _synthetic import fake_model, prompts

from truthmap.stages import generate
from truthmap import runfolder as rf
from truthmap.cli import app
from truthmap.errors import TruthmapError


def make_run(run_dir):
    """A run folder with a finished 'label' stage: answers.parquet, splits.json, stages.json, summary."""
    with rf.open_run(run_dir) as notices:
        assert notices == []
        with rf.stage("label"):
            rf.write_parquet(run_dir / rf.ANSWERS, pd.DataFrame({"id": ["a", "b"], "correct": [True, False]}))
            rf.write_json(run_dir / rf.SPLITS, {"seeds": {"0": {"train": ["a"], "test": ["b"]}}})
            rf.update_summary(run_dir, accuracy=0.5, families={"x": {"n": 2}})
            rf.mark_stage_done(run_dir, "label", "print-1", 1.0)


def manifest(run_dir):
    return json.loads((run_dir / rf.MANIFEST).read_text())["files"]


def test_every_write_is_listed_with_size_checksum_and_stage(tmp_path):
    make_run(tmp_path)
    files = manifest(tmp_path)
    assert set(files) == {"answers.parquet", "splits.json", "summary.json", "stages.json"}
    entry = files["answers.parquet"]
    assert entry["size"] == (tmp_path / "answers.parquet").stat().st_size and len(entry["sha256"]) == 64
    assert entry["stage"] == "label" and "previous" not in entry
    with rf.open_run(tmp_path) as notices:
        assert notices == []
        assert rf.trusted(tmp_path / rf.ANSWERS)
        assert rf.stage_is_current(tmp_path, "label", "print-1", [tmp_path / rf.ANSWERS, tmp_path / rf.SPLITS])


@pytest.mark.parametrize("damage,word", [
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:20] + bytes([p.read_bytes()[20] ^ 1]) + p.read_bytes()[21:]), "damaged"),
    (lambda p: p.unlink(), "missing"),
])
def test_a_damaged_file_is_named_deleted_and_its_stage_reruns(tmp_path, damage, word):
    make_run(tmp_path)
    damage(tmp_path / rf.ANSWERS)
    with rf.open_run(tmp_path) as notices:
        assert len(notices) == 1 and str(tmp_path / rf.ANSWERS) in notices[0] and word in notices[0]
        assert "the label stage will run again" in notices[0]
        assert not (tmp_path / rf.ANSWERS).exists() and not rf.trusted(tmp_path / rf.ANSWERS)
        assert "label" not in rf.read_json(tmp_path / rf.STAGES)
        assert rf.trusted(tmp_path / rf.SPLITS)  # the intact files of the stage stay
    with rf.open_run(tmp_path) as notices:
        assert notices == []  # said once


def test_a_file_not_in_the_manifest_is_never_trusted(tmp_path):
    make_run(tmp_path)
    (tmp_path / rf.PROBE_RESULTS).write_text("site,layer\nresidual,1\n")  # written behind the run's back
    with rf.open_run(tmp_path):
        assert not rf.trusted(tmp_path / rf.PROBE_RESULTS)
        assert not rf.stage_is_current(tmp_path, "label", "print-1", [tmp_path / rf.PROBE_RESULTS])


def test_damaged_summary_is_rebuilt_from_the_stages(tmp_path):
    make_run(tmp_path)
    (tmp_path / rf.SUMMARY).write_text('{"accuracy": 0.')
    with rf.open_run(tmp_path) as notices:
        assert any("summary.json: damaged" in n or "summary.json: truncated" in n for n in notices)
        summary = rf.read_json(tmp_path / rf.SUMMARY)
    assert summary["accuracy"] == 0.5 and summary["families"] == {"x": {"n": 2}}
    assert summary["stage_seconds"] == {"label": 1.0}


def test_damaged_manifest_trusts_nothing(tmp_path):
    make_run(tmp_path)
    (tmp_path / rf.MANIFEST).write_text("{not json")
    with rf.open_run(tmp_path) as notices:
        assert any("manifest.json: damaged" in n for n in notices)
        assert not rf.trusted(tmp_path / rf.ANSWERS)
        assert not rf.stage_is_current(tmp_path, "label", "print-1", [])


def test_leftover_temporary_files_are_removed(tmp_path):
    make_run(tmp_path)
    leftover = tmp_path / ".answers.parquet.k2j3h4ab.truthmap.tmp"
    leftover.write_bytes(b"half a parq")
    with rf.open_run(tmp_path):
        assert not leftover.exists()


def test_fingerprint_follows_the_checksums_of_the_inputs(tmp_path):
    make_run(tmp_path)
    with rf.open_run(tmp_path):
        before = rf.fingerprint({"a": 1}, [tmp_path / rf.ANSWERS])
        assert rf.fingerprint({"a": 1}, [tmp_path / rf.ANSWERS]) == before
        assert rf.fingerprint({"a": 2}, [tmp_path / rf.ANSWERS]) != before
        rf.write_parquet(tmp_path / rf.ANSWERS, pd.DataFrame({"id": ["a", "b"], "correct": [True, True]}))
        assert rf.fingerprint({"a": 1}, [tmp_path / rf.ANSWERS]) != before


def test_a_stage_being_rerun_is_not_current_from_its_first_write_until_it_finishes(tmp_path):
    make_run(tmp_path)
    with rf.open_run(tmp_path):
        with pytest.raises(TruthmapError):
            with rf.stage("label", rerun=True):
                raise TruthmapError("bad input file")  # failed before writing: the old results stand
        assert rf.stage_is_current(tmp_path, "label", "print-1", [])
        with rf.stage("label", rerun=True):
            rf.update_summary(tmp_path, accuracy=0.75)
            assert not rf.stage_is_current(tmp_path, "label", "print-1", [])
            rf.mark_stage_done(tmp_path, "label", "print-2", 2.0)
        assert rf.stage_is_current(tmp_path, "label", "print-2", [])
        assert rf.read_json(tmp_path / rf.STAGES)["label"]["summary"] == {"accuracy": 0.75}


def test_a_stage_is_current_only_for_the_fingerprint_it_was_marked_done_with(tmp_path):
    make_run(tmp_path)
    with rf.open_run(tmp_path):
        with rf.stage("label", rerun=True):
            rf.mark_stage_done(tmp_path, "label", fingerprint="settings-and-inputs-A", seconds=3.0)
        assert rf.read_json(tmp_path / rf.STAGES)["label"]["fingerprint"] == "settings-and-inputs-A"
        assert rf.stage_is_current(tmp_path, "label", fingerprint="settings-and-inputs-A", outputs=[])
        assert not rf.stage_is_current(tmp_path, "label", fingerprint="settings-and-inputs-B", outputs=[])
        assert not rf.stage_is_current(tmp_path, "probe", fingerprint="settings-and-inputs-A", outputs=[])


SCRIPT = textwrap.dedent("""
    import sys, pandas as pd
    from pathlib import Path
    from truthmap import runfolder as rf
    run = Path(sys.argv[1])
    with rf.open_run(run):
        with rf.stage("probe"):
            rf.write_csv(run / "probe_results.csv", pd.DataFrame({"auc": [float(sys.argv[2])]}))
""")


@pytest.mark.parametrize("event", [1, 2, 3])
@pytest.mark.parametrize("overwrite", [False, True])
def test_sigkill_at_every_write_event_leaves_a_consistent_folder(tmp_path, event, overwrite):
    """Killed before the rename, after it, or after the commit: the file read back is whole and listed."""
    if overwrite:
        subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "0.5"], check=True)
    env = {**os.environ, "TRUTHMAP_FAILPOINT": f"probe:{event}"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "0.75"], env=env)
    assert done.returncode == -signal.SIGKILL
    with rf.open_run(tmp_path) as notices:
        assert notices == []  # an interrupted write is not damage
        path = tmp_path / "probe_results.csv"
        if event == 1 and not overwrite:
            assert not path.exists() and not rf.trusted(path)
        else:
            assert rf.trusted(path)
            expected = 0.5 if event == 1 else 0.75
            assert pd.read_csv(path).auc.item() == expected
        assert not list(tmp_path.glob(".*.tmp"))
    assert "previous" not in json.dumps(manifest(tmp_path))


def test_a_failpoint_can_name_the_event_and_the_file(tmp_path):
    env = {**os.environ, "TRUTHMAP_FAILPOINT": "probe:after-rename:probe_results.csv"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "0.25"], env=env)
    assert done.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / rf.MANIFEST).read_text())["files"]["probe_results.csv"]["previous"] is None
    with rf.open_run(tmp_path):
        assert pd.read_csv(tmp_path / "probe_results.csv").auc.item() == 0.25


HOLDER = textwrap.dedent("""
    import sys, time
    from truthmap import runfolder as rf
    with rf.open_run(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def test_second_writer_is_refused_with_the_pid_and_a_dead_holder_blocks_nothing(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TruthmapError, match=rf"in use by pid {holder.pid}\b"):
            with rf.open_run(tmp_path):
                pass
        with pytest.raises(SystemExit) as exit_:
            app(["run", "--out", str(tmp_path), "--quiet"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path}: in use by pid {holder.pid}") and "Traceback" not in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its lock file is still there, and it blocks nothing
    assert (tmp_path / rf.LOCK).read_text().split()[0] == str(holder.pid)
    with rf.open_run(tmp_path) as notices:
        assert notices == []
        assert (tmp_path / rf.LOCK).read_text().split()[0] == str(os.getpid())


def test_chunk_store_keeps_chunks_of_the_same_key_only(tmp_path):
    with rf.open_run(tmp_path):
        store = rf.ChunkStore(tmp_path / "generations", "key-1")
        assert store.setting("batch_size", 8) == 8
        store.put(0, pd.DataFrame({"row": [0, 1]}))
        again = rf.ChunkStore(tmp_path / "generations", "key-1")
        assert again.setting("batch_size", 16) == 8  # the first run's choice holds
        assert again.get(0).row.tolist() == [0, 1] and again.get(1) is None
        other = rf.ChunkStore(tmp_path / "generations", "key-2")
        assert other.get(0) is None and other.setting("batch_size", 16) == 16
        assert not any(k.startswith("generations/chunk") for k in rf.innermost().files)


def test_chunks_do_not_change_the_batches_or_the_answers(tmp_path, fake_generation):
    plain = generate.generate_answers(fake_model(), prompts(), 8, batch_size=3, progress=False)
    plain_batches = list(fake_generation)
    fake_generation.clear()
    with rf.open_run(tmp_path):
        store = rf.ChunkStore(tmp_path / "generations", "k")
        chunked = generate.generate_answers(fake_model(), prompts(), 8, batch_size=3, progress=False, chunks=store)
    assert chunked == plain and fake_generation == plain_batches
    assert len(list((tmp_path / "generations").glob("chunk-*.parquet"))) == 4  # 37 rows / (4 batches of 3)


def test_a_resumed_generation_redoes_only_unfinished_chunks(tmp_path, fake_generation):
    with rf.open_run(tmp_path):
        store = rf.ChunkStore(tmp_path / "generations", "k")
        full = generate.generate_answers(fake_model(), prompts(), 8, batch_size=3, progress=False, chunks=store)
    rf_path = tmp_path / "generations" / "chunk-00002.parquet"
    rf_path.write_bytes(rf_path.read_bytes()[:-5])  # a damaged chunk is recomputed, never read
    fake_generation.clear()
    with rf.open_run(tmp_path) as notices:
        assert any("chunk-00002.parquet: truncated" in n for n in notices)
        store = rf.ChunkStore(tmp_path / "generations", "k")
        # a different batch size asked for on resume: the plan's holds, so the answers stay the same
        again = generate.generate_answers(fake_model(), prompts(), 8, batch_size=5, progress=False, chunks=store)
    assert again == full
    assert sum(len(b) for b in fake_generation) == 12 and all(len(b) == 3 for b in fake_generation)


def test_prompts_too_long_for_the_context_lose_their_middle():
    ids = list(range(20))
    assert generate.fit_prompt(ids, 30) == ids
    cut = generate.fit_prompt(ids, 7)
    assert cut == [0, 1, 2, 16, 17, 18, 19] and len(cut) == 7


def test_lock_file_survives_a_clean_exit_and_is_reused(tmp_path):
    with rf.open_run(tmp_path):
        pass
    started = time.time()
    with rf.open_run(tmp_path):
        pass
    assert time.time() - started < 5 and (tmp_path / rf.LOCK).exists()


def test_two_runs_open_at_once_each_record_their_own_files(tmp_path):
    """Two runs open in one process, written and read interleaved (explicitly and by path): each file is
    in its own run's manifest under its own stage, and closing one leaves the other working."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    make_run(b_dir)  # b has a finished run already: its files are checked when it opens
    with rf.Run.open(a_dir) as a, rf.Run.open(b_dir) as b:
        assert a.notices == [] and b.notices == []
        with a.stage("generate"), b.stage("probe"):
            a.write_parquet(rf.QUESTIONS, pd.DataFrame({"id": ["q1"]}))
            b.write_csv(rf.PROBE_RESULTS, pd.DataFrame({"auc": [0.7]}))
            rf.write_json(a_dir / rf.VOCABULARIES, {"colour": ["red"]})  # by path: the run holding it
            rf.update_summary(b_dir, best=1)
            a.update_summary(model="m")
        assert a.read_parquet(rf.QUESTIONS).id.tolist() == ["q1"]
        assert rf.read_csv(b_dir / rf.PROBE_RESULTS).auc.tolist() == [0.7]
        assert b.read_parquet(rf.ANSWERS).id.tolist() == ["a", "b"]
        assert {k: v["stage"] for k, v in a.files.items()} == {
            rf.QUESTIONS: "generate", rf.VOCABULARIES: "generate", rf.SUMMARY: None}
        assert b.files[rf.PROBE_RESULTS]["stage"] == "probe" and rf.QUESTIONS not in b.files
        assert a.read_json(rf.SUMMARY) == {"model": "m"} and b.read_json(rf.SUMMARY)["best"] == 1
        with pytest.raises(TruthmapError, match="already writes the run folder"):
            rf.Run.open(a_dir)
        assert not a.trusted(rf.ANSWERS) and b.trusted(rf.ANSWERS)  # b's file, never written in a

        a.close()
        with pytest.raises(TruthmapError, match="was closed"):
            a.read_parquet(rf.QUESTIONS)
        with b.stage("plot"):
            b.write_text(rf.REPORT, "<html>")
        assert b.read_csv(rf.PROBE_RESULTS).auc.tolist() == [0.7] and rf.trusted(b_dir / rf.REPORT)
        with rf.Run.open(a_dir, write=False) as again:  # a's lock was released; b still holds its own
            assert again.read_parquet(rf.QUESTIONS).id.tolist() == ["q1"]
    assert set(manifest(a_dir)) == {rf.QUESTIONS, rf.VOCABULARIES, rf.SUMMARY}
    assert set(manifest(b_dir)) == {rf.ANSWERS, rf.SPLITS, rf.SUMMARY, rf.STAGES, rf.PROBE_RESULTS, rf.REPORT}
    assert not rf.open_runs()
    for run_dir in (a_dir, b_dir):
        with rf.open_run(run_dir) as notices:  # both folders whole
            assert notices == []


def test_a_run_read_beside_one_written_is_verified_on_its_own_manifest(tmp_path):
    """A reader and a writer open at once: the reader refuses its own damaged file; the writer is unaffected."""
    read_dir, write_dir = tmp_path / "read", tmp_path / "write"
    make_run(read_dir)
    answers = read_dir / rf.ANSWERS
    answers.write_bytes(answers.read_bytes()[:-1] + b"\0")
    with rf.Run.open(read_dir, write=False) as reader, rf.Run.open(write_dir) as writer:
        writer.write_parquet(rf.ANSWERS, pd.DataFrame({"id": ["x"]}))
        with pytest.raises(TruthmapError, match="damaged"):
            reader.read_parquet(rf.ANSWERS)
        with pytest.raises(TruthmapError, match="damaged"):
            rf.read_parquet(answers)  # by path: the reader's check too
        assert reader.read_splits()["seeds"]["0"]["test"] == ["b"]
        assert writer.read_parquet(rf.ANSWERS).id.tolist() == ["x"]
        with pytest.raises(TruthmapError, match="opened for reading"):
            reader.write_json(rf.SPLITS, {})
    assert answers.read_bytes()[-1:] == b"\0"  # a reader deletes nothing


def test_a_stage_block_with_a_fingerprint_is_marked_done_only_when_it_returns(tmp_path, monkeypatch):
    """run.stage(name, fingerprint=…): done (fingerprint, seconds, its summary fields) after the block;
    a block that fails after writing leaves the stage unfinished, its earlier entry gone. The block
    takes 4.96 ms: rounded to 3 places and then 2 that is 0.01 s, straight to 2 places 0.0 — summary.json
    says what stages.json says."""
    clock = iter([100.0, 100.00496] + [200.0] * 10)
    monkeypatch.setattr(rf.run.time, "perf_counter", lambda: next(clock))
    with rf.Run.open(tmp_path) as run:
        stamp = run.fingerprint({"C": 1.0}, [])
        assert not run.is_current("probe", stamp, [rf.PROBE_RESULTS])
        with run.stage("probe", fingerprint=stamp):
            run.write_csv(rf.PROBE_RESULTS, pd.DataFrame({"auc": [0.7]}))
            run.update_summary(best_cell={"auc": 0.7})
            assert "probe" not in run.stages()  # marked unfinished before its first write, not yet done
        entry = run.stages()["probe"]
        assert entry["fingerprint"] == stamp and entry["summary"]["best_cell"] == {"auc": 0.7}
        assert entry["seconds"] == 0.005
        assert run.read_json(rf.SUMMARY)["stage_seconds"]["probe"] == round(entry["seconds"], 2) == 0.01
        assert run.is_current("probe", stamp, [rf.PROBE_RESULTS])
        assert not run.is_current("probe", run.fingerprint({"C": 2.0}, []), [rf.PROBE_RESULTS])
        with pytest.raises(RuntimeError, match="midway"):
            with run.stage("probe", fingerprint=stamp):
                run.write_csv(rf.PROBE_RESULTS, pd.DataFrame({"auc": [0.1]}))
                raise RuntimeError("midway")
        assert "probe" not in run.stages() and not run.is_current("probe", stamp, [rf.PROBE_RESULTS])
        assert run.stage_name is None


def test_a_folder_not_held_open_names_no_path_outside_it(tmp_path):
    """runfolder.at(dir) on a folder no run holds gives a Folder; like Run.path, its path() takes a name
    or a path inside the folder and refuses any other, so nothing it reads or writes lies elsewhere."""
    folder = rf.at(tmp_path / "run")
    assert isinstance(folder, rf.Folder)
    assert folder.path("answers.parquet") == tmp_path / "run" / "answers.parquet"
    assert folder.path(tmp_path / "run" / "a" / "b.csv") == tmp_path / "run" / "a" / "b.csv"
    for outside in (tmp_path / "elsewhere.csv", tmp_path / "run-2" / "x.csv", tmp_path / "run" / ".." / "x.csv"):
        with pytest.raises(TruthmapError, match="not inside the run folder"):
            folder.path(outside)
    with pytest.raises(TruthmapError):
        folder.path("../x.csv")
    with pytest.raises(TruthmapError, match="not inside the run folder"):
        folder.write_csv(tmp_path / "elsewhere.csv", pd.DataFrame({"a": [1]}))
    assert not (tmp_path / "elsewhere.csv").exists()
