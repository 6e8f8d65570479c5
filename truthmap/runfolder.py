"""The run folder: the contract between stages, and with anyone who reads a run.

Every stage reads what the stages before it wrote here and nothing else. The file list and columns
are documented in docs/run-folder.md; what survives a crash is in docs/guarantees.md.

Crash safety rests on three rules, all enforced here:

* every file is written atomically (a temporary file in the same folder, flushed, then renamed), so a
  killed run leaves whole files or none;
* every file is listed in ``manifest.json`` with its size, SHA-256 and the stage that wrote it. A run
  opens its folder with :func:`open_run`, which checks every listed file: one that is missing,
  truncated or altered is named, deleted, and its stage is marked unfinished so that it is recomputed.
  A file that is not listed is never trusted (:func:`trusted`);
* ``stages.json`` records, for each finished stage, a fingerprint of its settings and of its inputs'
  checksums; a rerun skips a stage whose fingerprint is unchanged and whose outputs are all trusted.

:func:`open_run` also takes the folder's ``lock`` (one writer at a time; the kernel drops the lock
when its holder dies, however it dies).

``TRUTHMAP_FAILPOINT=<stage>:<n>`` makes the process SIGKILL itself at the n-th write event of that
stage (events: ``before-rename``, ``after-rename``, ``after-commit`` of every file), and
``TRUTHMAP_FAILPOINT=<stage>:<event>:<file>`` at that event of that file (a path relative to the run
folder); ``TRUTHMAP_FAILPOINT_LOG=<file>`` lists every event. The crash tests use them to kill a run
at exact points.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import TruthmapError

QUESTIONS = "questions.parquet"
VOCABULARIES = "vocabularies.json"
GENERATIONS = "generations.parquet"
GENERATION_CHUNKS = "generations"  # chunk-00000.parquet, … : finished pieces of the generate stage
ANSWERS = "answers.parquet"
SPLITS = "splits.json"
ACTIVATIONS = "activations"
PROBE_RESULTS = "probe_results.csv"
PROBE_SCORES = "probe_scores.parquet"
SUMMARY = "summary.json"
CONFIG = "config.json"
STAGES = "stages.json"
MANIFEST = "manifest.json"
LOCK = "lock"
_UMASK = os.umask(0)
os.umask(_UMASK)
_RUN_FILES = {SUMMARY, STAGES, CONFIG}  # written by every stage or by none
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # atomic_path's temporary files: .<name>.<random>.tmp


@dataclass
class _OpenRun:
    """The run folder this process holds the lock of, and its manifest (kept in memory, saved on change)."""

    root: Path
    files: dict  # relative posix path -> {"size", "sha256", "stage", and "previous" while a write is pending}
    stage: str | None = None  # the stage now running; files written are attributed to it
    forget: str | None = None  # a stage to mark unfinished before its first write (see stage())
    stage_fields: dict = field(default_factory=dict)  # stage -> summary fields it wrote
    events: dict = field(default_factory=dict)  # stage -> failpoint events so far


_open: _OpenRun | None = None


# ---------------------------------------------------------------- atomic writes and the manifest

@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Inside an open run the file is listed in the manifest: its new checksum is recorded as pending
    before the rename and committed after it, so that a crash between the two leaves a state that
    :func:`open_run` resolves (old file and old checksum, or new file and new checksum).
    """
    path = Path(path)
    if _open is not None and _open.forget is not None:
        name, _open.forget = _open.forget, None
        forget_stage(_open.root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; run files are ordinary files
    try:
        yield Path(tmp)
        _fsync(tmp)
        key = _key(path)
        old = _open.files.get(key) if key is not None else None
        if key is not None:
            # what is on disk now: the old entry's file, or, if its own write never finished, the one before
            on_disk = old.get("previous") if old and "previous" in old else old
            previous = {k: on_disk[k] for k in ("size", "sha256")} if on_disk else None
            stage = None if key in _RUN_FILES else _open.stage  # a damaged run file does not redo a stage
            _open.files[key] = {**_describe(tmp), "stage": stage, "previous": previous}
            _save_manifest()
        try:
            _failpoint("before-rename", path)
            os.replace(tmp, path)
        except BaseException:
            if key is not None:  # the file was not replaced: its entry stays what it was
                _open.files[key] = old
                if old is None:
                    del _open.files[key]
                _save_manifest()
            raise
        _fsync_dir(path.parent)
        _failpoint("after-rename", path)
        if key is not None:
            _open.files[key].pop("previous", None)
            _save_manifest()
            _failpoint("after-commit", path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _describe(path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


def _key(path: Path) -> str | None:
    """The manifest key of ``path`` (posix path relative to the open run), or None outside it."""
    if _open is None:
        return None
    try:
        return Path(os.path.abspath(path)).relative_to(_open.root).as_posix()
    except ValueError:
        return None


def _save_manifest() -> None:
    path = _open.root / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=_open.root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "files": _open.files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def trusted(path: Path) -> bool:
    """Whether ``path`` may be read: listed in the open run's manifest (so checked when the run opened,
    or written since). Outside an open run, whether it exists."""
    key = _key(Path(path))
    if key is None:
        return Path(path).exists()
    entry = _open.files.get(key)
    return entry is not None and "previous" not in entry and Path(path).exists()


def remove(path: Path) -> None:
    """Delete a file or folder of the run and its manifest entries."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    key = _key(path)
    if key is not None:
        gone = [k for k in _open.files if k == key or k.startswith(key + "/")]
        for k in gone:
            del _open.files[k]
        if gone:
            _save_manifest()


# ---------------------------------------------------------------- readers and writers

def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.exists():
        if default is not None:
            return default
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        line = f" (line {err.lineno})" if isinstance(err, json.JSONDecodeError) else ""
        raise TruthmapError(f"{path}: not valid JSON{line}; delete it to recompute") from None


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise TruthmapError(f"{path}: unreadable ({str(err).splitlines()[0]}); delete it to recompute") from None


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- opening a run: lock and checks

@contextmanager
def open_run(run_dir: Path):
    """Hold ``run_dir`` for one writer, check it against its manifest, and yield the notices.

    The notices (a list of one-line strings) name each file found missing, truncated or altered (it
    is deleted and the stage that wrote it will run again) and anything else repaired. Raises
    TruthmapError when another live process holds the folder.
    """
    global _open
    run_dir = Path(os.path.abspath(run_dir))
    if _open is not None:
        raise TruthmapError(f"{run_dir}: this process already holds the run folder {_open.root}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_fd, notices = _lock(run_dir)
    except OSError as err:
        raise TruthmapError(f"{run_dir}: cannot write the run folder here ({err.strerror}); give another --out") from None
    try:
        _open = _OpenRun(run_dir, {})
        notices += _check(run_dir)
        yield notices
    finally:
        _open = None
        if lock_fd is not None:
            os.close(lock_fd)  # closing the descriptor releases the lock; the file stays (see _lock)


def _lock(run_dir: Path) -> tuple[int | None, list[str]]:
    """Take the folder's lock (flock: released by the kernel when the holder dies, so never stale).

    The lock file is never deleted: deleting it would let two processes lock two different files.
    """
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        os.close(fd)
        pid = holder[0] if holder else "?"
        host = f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname() else ""
        since = f" since {holder[2]}" if len(holder) > 2 else ""
        raise TruthmapError(
            f"{run_dir}: in use by pid {pid}{host}{since}; wait for that run to finish, or give another --out"
        ) from None
    except (ImportError, OSError) as err:  # no fcntl (Windows) or a file system without locks
        os.close(fd)
        reason = getattr(err, "strerror", None) or type(err).__name__
        return None, [f"{path}: could not lock the folder ({reason}); a second run on it would not be refused"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode(), 0)
    return fd, []


def _check(run_dir: Path) -> list[str]:
    """Resolve interrupted writes, delete damaged files, and mark their stages unfinished."""
    notices = []
    for tmp in run_dir.rglob(".*.tmp"):
        if tmp.is_file() and _TEMPORARY.match(tmp.name):
            tmp.unlink()  # the unfinished write of a killed run
    manifest_path = run_dir / MANIFEST
    files = {}
    if manifest_path.exists():
        try:
            files = json.loads(manifest_path.read_text())["files"]
            if not isinstance(files, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            notices.append(f"{manifest_path}: damaged; no file of this run is trusted, every stage runs again")
            files = {}
    elif any(p.name != LOCK for p in run_dir.iterdir()):
        notices.append(f"{manifest_path}: missing (a run of an older truthmap, or deleted); every stage runs again")
    _open.files = files
    stale_stages, changed = set(), False
    for key, entry in sorted(files.items()):
        path = run_dir / key
        actual = _describe(path) if path.is_file() else None
        pending = "previous" in entry
        same = actual is not None and actual["size"] == entry.get("size") and actual["sha256"] == entry.get("sha256")
        if same:
            if pending:  # killed between the rename and the commit: the new file is whole
                del entry["previous"]
                changed = True
            continue
        previous = entry.get("previous")
        if pending and actual is not None and previous and actual == previous:
            del entry["previous"]  # killed before the rename: the old file is still in place
            entry.update(previous)
            changed = True
            continue
        del files[key]
        changed = True
        if pending and actual is None and not previous:
            continue  # killed before the rename of a new file: nothing was there
        stage = entry.get("stage")
        redo = f"; the {stage} stage will run again" if stage else "; it will be rewritten"
        if actual is None:
            notices.append(f"{path}: missing{redo}")
        else:
            path.unlink()
            if actual["size"] != entry.get("size"):
                what = f"truncated or resized ({actual['size']} bytes, {entry.get('size')} expected)"
            else:
                what = "damaged (its checksum differs from the manifest's)"
            notices.append(f"{path}: {what}; deleted{redo}")
        if stage:
            stale_stages.add(stage)
    if changed:
        _save_manifest()
    done = read_json(run_dir / STAGES, default={}) if trusted(run_dir / STAGES) else {}
    if stale_stages & set(done):
        for stage in stale_stages:
            done.pop(stage, None)
        write_json(run_dir / STAGES, done)
    if done and not trusted(run_dir / SUMMARY):
        write_json(run_dir / SUMMARY, _summary_from_stages(done))
        notices.append(f"{run_dir / SUMMARY}: rebuilt from {STAGES}")
    return notices


# ---------------------------------------------------------------- stages

@contextmanager
def stage(name: str, rerun: bool = False):
    """Attribute the files written inside the block to stage ``name`` (and count its failpoints).

    ``rerun``: the block recomputes the stage, so the stage is marked unfinished in ``stages.json``
    just before its first write: a crash midway never leaves old and new outputs marked finished,
    and a stage that fails before writing anything (say, on a bad input file) stays finished.
    """
    if _open is None:
        yield
        return
    previous, _open.stage = _open.stage, name
    if rerun:
        _open.forget = name
        _open.stage_fields.pop(name, None)  # its summary fields are written anew
    try:
        yield
    finally:
        _open.stage = previous
        _open.forget = None


def fingerprint(settings: dict, inputs: list[Path]) -> str:
    """Hash of a stage's settings and the content of its input files (files or folders).

    Inside an open run the checksums come from the manifest (each file was read once, when the run
    opened); a file outside the run folder, such as the user's dataset, is read.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=_json_default).encode())
    for path in inputs:
        path = Path(path)
        key = _key(path)
        if key is not None:
            for k in sorted(k for k in _open.files if k == key or k.startswith(key + "/")):
                if "previous" not in _open.files[k]:
                    h.update(f"{k} {_open.files[k]['sha256']}\n".encode())
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            if f.exists():
                with open(f, "rb") as handle:
                    h.update(hashlib.file_digest(handle, "sha256").digest())
    return h.hexdigest()


def stage_is_current(run_dir: Path, stage: str, print_: str, outputs: list[Path]) -> bool:
    path = Path(run_dir) / STAGES
    done = read_json(path, default={}) if trusted(path) else {}
    return done.get(stage, {}).get("fingerprint") == print_ and all(trusted(p) for p in outputs)


def forget_stage(run_dir: Path, stage: str) -> None:
    """Mark ``stage`` unfinished before it rewrites its outputs (so a crash midway is never 'finished')."""
    path = Path(run_dir) / STAGES
    done = read_json(path, default={}) if trusted(path) else {}
    if stage in done:
        del done[stage]
        write_json(path, done)


def mark_stage_done(run_dir: Path, stage: str, print_: str, seconds: float) -> None:
    path = Path(run_dir) / STAGES
    done = read_json(path, default={}) if trusted(path) else {}
    entry = {"fingerprint": print_, "seconds": round(seconds, 3)}
    if _open is not None and stage in _open.stage_fields:
        entry["summary"] = _open.stage_fields[stage]  # to rebuild summary.json should it be lost
    done[stage] = entry
    write_json(path, done)


def update_summary(run_dir: Path, **fields) -> dict:
    path = Path(run_dir) / SUMMARY
    summary = read_json(path, default={}) if trusted(path) else {}
    _merge(summary, fields)
    if _open is not None and _open.stage is not None:
        _merge(_open.stage_fields.setdefault(_open.stage, {}), json.loads(json.dumps(fields, default=_json_default)))
    write_json(path, summary)
    return summary


def _merge(summary: dict, fields: dict) -> None:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(summary.get(key), dict):
            summary[key].update(value)
        else:
            summary[key] = value


def _summary_from_stages(done: dict) -> dict:
    summary = {}
    for name, entry in done.items():
        _merge(summary, entry.get("summary", {}))
    summary["stage_seconds"] = {name: round(entry.get("seconds", 0.0), 2) for name, entry in done.items()}
    return summary


class ChunkStore:
    """Finished chunks of a long stage, kept on disk so that a killed run resumes where it stopped.

    ``<folder>/plan.json`` holds the ``key`` the chunks were computed from and the settings the first
    run fixed (:meth:`setting`); chunks of another key are stale, and the folder is cleared.
    """

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        plan_path = self.folder / "plan.json"
        plan = read_json(plan_path) if trusted(plan_path) else None
        if not isinstance(plan, dict) or plan.get("key") != key:
            remove(self.folder)
            plan = {"key": key}
            write_json(plan_path, plan)
        self.plan = plan

    def setting(self, name: str, value):
        """The value of ``name`` fixed by the first run of this plan (``value``, saved, if none was)."""
        if name not in self.plan:
            self.plan[name] = value
            write_json(self.folder / "plan.json", self.plan)
        return self.plan[name]

    def path(self, k: int) -> Path:
        return self.folder / f"chunk-{k:05d}.parquet"

    def get(self, k: int) -> pd.DataFrame | None:
        """Chunk ``k`` if a run finished it (and it is intact), else None."""
        return read_parquet(self.path(k)) if trusted(self.path(k)) else None

    def put(self, k: int, frame: pd.DataFrame) -> None:
        write_parquet(self.path(k), frame)


# ---------------------------------------------------------------- fault injection for the crash tests

def _failpoint(event: str, path: Path) -> None:
    if _open is None or not (os.environ.get("TRUTHMAP_FAILPOINT") or os.environ.get("TRUTHMAP_FAILPOINT_LOG")):
        return
    name = _open.stage or "setup"
    count = _open.events[name] = _open.events.get(name, 0) + 1
    key = _key(Path(path))
    log = os.environ.get("TRUTHMAP_FAILPOINT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{name}\t{count}\t{event}\t{key}\n")
    if os.environ.get("TRUTHMAP_FAILPOINT") in (f"{name}:{count}", f"{name}:{event}:{key}"):
        os.kill(os.getpid(), signal.SIGKILL)

