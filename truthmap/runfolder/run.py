"""An open run folder: :class:`Run`, the handle every stage reads and writes a run through.

``Run.open(run_dir)`` takes the folder's lock (one writer; ``write=False``: a reader, under a shared
lock), checks every file against ``manifest.json`` and keeps the manifest in memory; the run is a context
manager and releases the lock when closed. What was module state of the run folder lives on the
instance: the manifest, the stage now writing, the summary fields each stage wrote, the files verified
so far, the failpoint counts. Several runs can be open in one process at once (a transfer reads two);
each file is recorded in the manifest of the run whose folder holds it.

    with Run.open(run_dir) as run:                  # run.notices: the files found damaged and deleted
        stamp = run.fingerprint(settings, [ANSWERS, SPLITS])
        if not run.is_current("probe", stamp, [PROBE_RESULTS]):
            with run.stage("probe", fingerprint=stamp):   # marked done (and timed) when the block returns
                answers = run.read_parquet(ANSWERS)       # checked against the manifest
                run.write_csv(PROBE_RESULTS, table)
                run.update_summary(best_cell=...)

Names are a run folder's relative paths (names.py: ``ANSWERS``, ``f"{ACTIVATIONS}/valid.npy"``, …); a
path inside the folder is taken too. The module-level functions of ``truthmap.runfolder`` take a path
and find the open run holding it (:func:`run_of`): callers that pass paths keep working.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import TruthmapError
from . import files
from .atomic import atomic_path, guard
from .disk import check_inside, describe
from .lock import lock
from .manifest import check_run_folder, read_manifest, remove_temporaries, resolve, save_manifest
from .names import CHUNK_PLAN, LOCK, MANIFEST, STAGES, SUMMARY, TEMPORARY
from .text import dumps, json_default, safe_key, sanitise

# The runs this process holds open, innermost (last opened) last: the module-level functions find the run
# of a path here (run_of). Only Run.open adds to it and only Run.close removes from it.
_held: list[Run] = []


def run_of(path: Path) -> Run | None:
    """The open run whose folder holds ``path`` (the deepest, should one run folder lie in another), else None."""
    path = Path(os.path.abspath(path))
    inside = [run for run in _held if run.key(path) is not None]
    return max(inside, key=lambda run: len(run.root.parts)) if inside else None


def open_runs() -> tuple[Run, ...]:
    """The runs this process holds open, in the order they were opened."""
    return tuple(_held)


def innermost() -> Run | None:
    """The run opened last of those this process writes, else None."""
    writers = [run for run in _held if run.writable]
    return writers[-1] if writers else None


class Run:
    """A run folder held open by this process: for writing (one writer, exclusive lock) or reading
    (shared lock). Made by :meth:`open`; closed by :meth:`close` or at the end of a ``with`` block.

    Attributes: ``root`` (absolute path), ``writable``, ``files`` (the manifest: relative posix path ->
    ``{"size", "sha256", "stage"}``, and ``"previous"`` while a write is pending), ``notices`` (one line
    per file found missing or damaged when the run opened), ``stage_name`` (the stage now writing; its
    files are attributed to it).
    """

    def __init__(self, root: Path, writable: bool, listed: dict):
        self.root = root
        self.writable = writable
        self.files = listed  # the manifest: relative posix path -> entry
        self.notices: list[str] = []
        self.stage_name: str | None = None
        self.events: dict[str, int] = {}  # stage -> failpoint events so far
        self._forget: str | None = None  # a stage to mark unfinished before its first write (see stage())
        self._stage_fields: dict[str, dict] = {}  # stage -> the summary fields it wrote
        self._verified: set[str] = set()  # a reader's files checked against the manifest so far
        self._lock_fd: int | None = None
        self.closed = False

    # ---------------------------------------------------------------- opening and closing

    @classmethod
    def open(cls, run_dir: str | Path, *, write: bool = True) -> Run:
        """Open ``run_dir``; use as ``with Run.open(run_dir) as run:`` (or call :meth:`close`).

        Writing: take the folder's lock (refused, touching nothing, when another live process holds it),
        check every listed file (one found missing, truncated or altered is named in ``notices``,
        deleted, and the stage that wrote it will run again), and make the folder if it is new. Refused
        (TruthmapError, nothing touched) for a folder that is not a run folder
        (:func:`~.manifest.check_run_folder`), one whose manifest names a path outside it or a
        symbolic link, and one this process already holds.

        Reading (``write=False``): a shared lock (no writer changes the folder meanwhile); each file is
        checked against the manifest as it is read. Refused for a folder that is not a run folder, one
        without a valid manifest (nothing in it can be verified) and one a writer holds.
        """
        run_dir = Path(os.path.abspath(run_dir))
        for other in _held:
            if other.root == run_dir:
                what = "writes" if other.writable else "reads"
                raise TruthmapError(f"{run_dir}: this process already {what} the run folder; it cannot open it again")
        if not write and not run_dir.is_dir():
            raise TruthmapError(f"{run_dir}: no such run folder")
        check_run_folder(run_dir)
        if write:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise TruthmapError(f"{run_dir}: cannot write the run folder here ({err.strerror}); "
                                    f"give another --out") from None
            run = cls(run_dir, True, {})
            run._lock_fd, run.notices = lock(run_dir, exclusive=True)
            _held.append(run)
            try:
                run.notices += run._check()
            except BaseException:
                run.close()
                raise
            return run
        manifest = run_dir / MANIFEST
        try:
            listed = read_manifest(run_dir)
        except (OSError, ValueError) as err:
            reason = "missing" if isinstance(err, OSError) else f"damaged ({sanitise(err, 120)})"
            raise TruthmapError(f"{manifest}: {reason}, so nothing in {run_dir} can be verified; run "
                                f"'truthmap run --out {run_dir}' to repair it") from None
        run = cls(run_dir, False, listed)
        run._lock_fd, run.notices = lock(run_dir, exclusive=False)
        _held.append(run)
        return run

    @classmethod
    @contextmanager
    def reading(cls, run_dir: str | Path | Run):
        """``run_dir`` for reading during the block: the Run this process already holds for that folder
        (for writing or reading), else one opened with ``write=False`` and closed when the block ends.
        Given an open Run, that Run: a function taking "a run folder" takes either (or a ``Folder``, its root)."""
        if isinstance(run_dir, Run):
            run_dir._live()
            yield run_dir
            return
        root = Path(os.path.abspath(run_dir if isinstance(run_dir, (str, os.PathLike)) else run_dir.root))
        held = next((run for run in _held if run.root == root), None)
        if held is not None:
            yield held
            return
        with cls.open(root, write=False) as run:
            yield run

    def close(self) -> None:
        """Release the lock (the lock file stays: see lock.py); the run can no longer be read or written."""
        if self.closed:
            return
        self.closed = True
        if self in _held:
            _held.remove(self)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("writing" if self.writable else "reading")
        return f"Run({str(self.root)!r}, {state})"

    def _check(self) -> list[str]:
        """Resolve interrupted writes, delete damaged files, and mark their stages unfinished.

        Nothing is touched before the whole manifest is known good: a manifest naming a path outside the
        folder, or a listed file that is a symbolic link, trusts nothing and deletes nothing.
        """
        notices = []
        manifest = self.root / MANIFEST
        listed = {}
        if manifest.exists():
            try:
                listed = read_manifest(self.root)
                for key in listed:
                    check_inside(self.root, self.root / key)
            except (ValueError, TruthmapError) as err:
                reason = str(err).replace(str(self.root / ""), "") if isinstance(err, TruthmapError) else str(err)
                notices.append(f"{manifest}: damaged ({sanitise(reason, 160)}); no file of this run is trusted "
                               f"and none is deleted; every stage runs again")
                listed = {}
        elif any(p != LOCK and not TEMPORARY.match(p) for p in os.listdir(self.root)):
            notices.append(f"{manifest}: missing (a run of an older truthmap, or deleted); every stage runs again")
        remove_temporaries(self.root, listed)
        self.files = listed
        found, stale_stages, changed = resolve(self.root, self.files)
        notices += found
        if changed:
            self.save_manifest()
        done = self.stages()
        if stale_stages & set(done):
            for name in stale_stages:
                done.pop(name, None)
            self.write_json(STAGES, done)
        if done and not self.trusted(SUMMARY):
            self.write_json(SUMMARY, _summary_from_stages(done))
            notices.append(f"{self.root / SUMMARY}: rebuilt from {STAGES}")
        return notices

    # ---------------------------------------------------------------- names, trust and verification

    def key(self, path: str | Path) -> str | None:
        """The manifest key of ``path`` (posix path relative to the run folder), or None outside it."""
        try:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return None

    def path(self, name: str | Path) -> Path:
        """The path of the file ``name`` (a relative name, or a path inside the folder)."""
        if isinstance(name, Path) and name.is_absolute():
            path = Path(os.path.abspath(name))
            if self.key(path) is None:
                raise TruthmapError(f"{name}: not inside the run folder {self.root}")
            return path
        key = Path(name).as_posix()
        if not safe_key(key):
            raise TruthmapError(f"{self.root}: {sanitise(repr(str(name)))} is not a plain relative path inside the folder")
        return self.root / key

    def _live(self) -> None:
        if self.closed:
            raise TruthmapError(f"{self.root}: the run was closed; open it again to read or write it")

    def trusted(self, name: str | Path) -> bool:
        """Whether the file may be read: listed in the manifest (so checked when the run opened, or
        written since) and present."""
        path = self.path(name)
        key = self.key(path)
        if self.writable and (not safe_key(key) or os.path.islink(path)):
            return False
        entry = self.files.get(key)
        return entry is not None and "previous" not in entry and path.exists()

    def verify(self, name: str | Path) -> None:
        """Before reading a file: it must stay inside the folder and be listed in the manifest; in a run
        read (not written) here, with the size and checksum it has now (checked once per file)."""
        self._live()
        path = self.path(name)
        key = self.key(path)
        if self.writable:
            check_inside(self.root, path)
            if not self.trusted(path):  # checked when the run opened, or written since: anything else is not read
                raise TruthmapError(f"{path}: not in the run's manifest (written by hand, or found damaged and "
                                    f"deleted), so not read; run 'truthmap run --out {self.root}' to recompute it")
            return
        if key in self._verified:
            return
        check_inside(self.root, path)
        entry = self.files.get(key)
        if entry is None or "previous" in entry:
            raise TruthmapError(f"{path}: not in the run's manifest, so not read; run 'truthmap run --out "
                                f"{self.root}' to finish the run")
        actual = describe(path) if path.is_file() else None
        if actual is None:
            raise TruthmapError(f"{path}: missing; run 'truthmap run --out {self.root}' to recompute it")
        if actual["size"] != entry["size"] or actual["sha256"] != entry["sha256"]:
            raise TruthmapError(f"{path}: damaged (its checksum differs from the manifest's); run "
                                f"'truthmap run --out {self.root}' to recompute it")
        self._verified.add(key)

    # ---------------------------------------------------------------- reading

    def read_json(self, name, default=None):
        return files.read_json(self.path(name), default, run=self)

    def read_json_object(self, name, default=None) -> dict:
        return files.read_json_object(self.path(name), default, run=self)

    def read_parquet(self, name) -> pd.DataFrame:
        return files.read_parquet(self.path(name), run=self)

    def read_csv(self, name, **options) -> pd.DataFrame:
        return files.read_csv(self.path(name), run=self, **options)

    def read_npy(self, name, mmap_mode: str | None = None) -> np.ndarray:
        return files.read_npy(self.path(name), mmap_mode, run=self)

    def read_splits(self, name="splits.json") -> dict:
        return files.read_splits(self.path(name), run=self)

    def read_activations_index(self, default: dict | None = None) -> dict:
        return files.read_activations_index(self.root, default, run=self)

    def stages(self) -> dict:
        """stages.json if trusted and well formed (stage -> {fingerprint, seconds, summary}), else {}."""
        if not self.trusted(STAGES):
            return {}
        try:
            done = self.read_json(STAGES)
        except TruthmapError:
            return {}
        if not isinstance(done, dict):
            return {}
        return {k: v for k, v in done.items() if isinstance(v, dict)}

    # ---------------------------------------------------------------- writing

    def _writing(self) -> None:
        self._live()
        if not self.writable:
            raise TruthmapError(f"{self.root}: opened for reading; it is not written")

    def atomic_path(self, name):
        """:func:`~.atomic.atomic_path` of a file of this run (recorded in its manifest)."""
        self._writing()
        return atomic_path(self.path(name), self)

    def write_json(self, name, obj) -> None:
        self._writing()
        files.write_json(self.path(name), obj, run=self)

    def write_text(self, name, text: str) -> None:
        self._writing()
        files.write_text(self.path(name), text, run=self)

    def write_parquet(self, name, frame: pd.DataFrame) -> None:
        self._writing()
        files.write_parquet(self.path(name), frame, run=self)

    def write_csv(self, name, frame: pd.DataFrame) -> None:
        self._writing()
        files.write_csv(self.path(name), frame, run=self)

    def write_npy(self, name, array: np.ndarray) -> None:
        self._writing()
        files.write_npy(self.path(name), array, run=self)

    def guard(self, name, make_folders: bool = False) -> Path:
        return guard(self.path(name), make_folders, run=self)

    def save_manifest(self) -> None:
        save_manifest(self.root, self.files)

    def before_write(self) -> None:
        """Called by atomic_path before a file of this run is replaced: a stage rerun (stage(rerun=True))
        is marked unfinished just before its first write."""
        if self._forget is not None:
            name, self._forget = self._forget, None
            self.forget(name)

    def remove(self, name) -> None:
        """Delete a file or folder of this run: the files its manifest lists (a folder: those under it,
        truthmap's temporary files, then the folders left empty) and their entries. Nothing else is ever
        deleted: a file truthmap did not write stays, whatever its name, and so does the folder holding it."""
        self._writing()
        path = Path(os.path.abspath(self.path(name)))
        key = self.key(path)
        if os.path.lexists(path):
            check_inside(self.root, path)
        if os.path.isdir(path):
            self._remove_listed(path, key)
        elif key in self.files and os.path.isfile(path):
            path.unlink()
        gone = [k for k in self.files if k == key or k.startswith(key + "/")]
        for k in gone:
            del self.files[k]
        if gone:
            self.save_manifest()

    def _remove_listed(self, folder: Path, key: str) -> None:
        for k in [k for k in self.files if k.startswith(key + "/")]:
            path = self.root / k
            if path.is_file() and not os.path.islink(path):
                path.unlink()
        for where, _folders, names in os.walk(folder, topdown=False):
            for name in names:
                full = os.path.join(where, name)
                if TEMPORARY.match(name) and not os.path.islink(full):
                    os.unlink(full)
            try:
                os.rmdir(where)
            except OSError:
                pass  # holds something truthmap did not write

    # ---------------------------------------------------------------- stages

    @contextmanager
    def stage(self, name: str, rerun: bool = False, fingerprint: str | None = None):
        """Attribute the files written inside the block to stage ``name`` (and count its failpoints).

        ``rerun``: the block recomputes the stage, so the stage is marked unfinished in ``stages.json``
        just before its first write: a crash midway never leaves old and new outputs marked finished,
        and a stage that fails before writing anything (say, on a bad input file) stays finished.
        ``fingerprint`` (implies ``rerun``): when the block returns, the stage is marked done with it and
        its seconds (``stages.json``, and ``summary.json``'s ``stage_seconds``).
        """
        self._writing()
        previous, self.stage_name = self.stage_name, name
        if rerun or fingerprint is not None:
            self._forget = name
            self._stage_fields.pop(name, None)  # its summary fields are written anew
        started = time.perf_counter()
        try:
            yield self
            if fingerprint is not None:
                seconds = round(time.perf_counter() - started, 3)  # as stages.json keeps it
                self.mark_done(name, fingerprint, seconds)
                # rounded from the kept value, as a summary rebuilt from stages.json is (no double-rounding drift)
                self.update_summary(stage_seconds={name: round(seconds, 2)})
        finally:
            self.stage_name = previous
            self._forget = None

    def fingerprint(self, settings: dict, inputs: list) -> str:
        """Hash of a stage's settings and the content of its inputs: names of this run's files or folders,
        or paths (:func:`fingerprint`)."""
        paths = [Path(os.path.abspath(item)) if isinstance(item, Path) else self.path(item) for item in inputs]
        return fingerprint(settings, paths, lambda path: self if self.key(path) is not None else None)

    def is_current(self, stage: str, fingerprint: str, outputs: list) -> bool:
        """Whether ``stage`` finished with this fingerprint and all its outputs are trusted."""
        return (self.stages().get(stage, {}).get("fingerprint") == fingerprint
                and all(self.trusted(name) for name in outputs))

    def forget(self, stage: str) -> None:
        """Mark ``stage`` unfinished before it rewrites its outputs (so a crash midway is never 'finished')."""
        done = self.stages()
        if stage in done:
            del done[stage]
            self.write_json(STAGES, done)

    def mark_done(self, stage: str, fingerprint: str, seconds: float) -> None:
        done = self.stages()
        entry = {"fingerprint": fingerprint, "seconds": round(seconds, 3)}
        if stage in self._stage_fields:
            entry["summary"] = self._stage_fields[stage]  # to rebuild summary.json should it be lost
        done[stage] = entry
        self.write_json(STAGES, done)

    def update_summary(self, **fields) -> dict:
        """Merge ``fields`` into summary.json (a dict value updates the dict already there) and return it;
        the fields are also kept as the current stage's, to rebuild summary.json should it be lost."""
        try:
            summary = self.read_json(SUMMARY, default={}) if self.trusted(SUMMARY) else {}
        except TruthmapError:
            summary = {}
        if not isinstance(summary, dict):
            summary = {}
        _merge(summary, fields)
        if self.stage_name is not None:
            _merge(self._stage_fields.setdefault(self.stage_name, {}), json.loads(dumps(fields)))
        self.write_json(SUMMARY, summary)
        return summary

    def chunks(self, folder: str, key: str) -> ChunkStore:
        """The :class:`ChunkStore` of ``folder`` in this run."""
        return ChunkStore(self.path(folder), key, run=self)


def fingerprint(settings: dict, inputs: list[Path], run_for) -> str:
    """Hash of a stage's settings and the content of its input files (files or folders).

    For an input inside an open run (``run_for(path)``, else None) the checksums come from that run's
    manifest (each file was read once, when the run opened); a file outside, such as the user's dataset,
    is read.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=json_default).encode())
    for path in inputs:
        path = Path(os.path.abspath(path))
        run = run_for(path)
        if run is not None:
            key = run.key(path)
            for k in sorted(k for k in run.files if k == key or k.startswith(key + "/")):
                if "previous" not in run.files[k]:
                    h.update(f"{k} {run.files[k]['sha256']}\n".encode())
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in found:
            h.update(f.name.encode())
            if f.exists():
                with open(f, "rb") as handle:
                    h.update(hashlib.file_digest(handle, "sha256").digest())
    return h.hexdigest()


def _merge(summary: dict, fields: dict) -> None:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(summary.get(key), dict):
            summary[key].update(value)
        else:
            summary[key] = value


def _summary_from_stages(done: dict) -> dict:
    summary = {}
    for name, entry in done.items():
        if isinstance(entry.get("summary"), dict):
            _merge(summary, entry["summary"])
    summary["stage_seconds"] = {name: round(entry["seconds"], 2) if isinstance(entry.get("seconds"), (int, float)) else None
                                for name, entry in done.items()}
    return summary


class ChunkStore:
    """Finished chunks of a long stage, kept on disk so that a killed run resumes where it stopped.

    ``<folder>/plan.json`` holds the ``key`` the chunks were computed from and the settings the first
    run fixed (:meth:`setting`); chunks of another key are stale, and the folder is cleared. ``run``: the
    open run holding ``folder`` (outside any, chunks are written but never kept from an earlier run).
    """

    def __init__(self, folder: Path, key: str, run: Run | None = None):
        self.folder = Path(folder)
        self.run = run
        plan_path = self.folder / CHUNK_PLAN
        try:
            plan = files.read_json(plan_path, run=run) if self._trusted(plan_path) else None
        except TruthmapError:
            plan = None
        if not isinstance(plan, dict) or plan.get("key") != key:
            if run is not None:
                run.remove(self.folder)
            plan = {"key": key}
            files.write_json(plan_path, plan, run=run)
        self.plan = plan

    def _trusted(self, path: Path) -> bool:
        return self.run.trusted(path) if self.run is not None else path.exists()

    def setting(self, name: str, value):
        """The value of ``name`` fixed by the first run of this plan (``value``, saved, if none was)."""
        if name not in self.plan:
            self.plan[name] = value
            files.write_json(self.folder / CHUNK_PLAN, self.plan, run=self.run)
        return self.plan[name]

    def path(self, k: int) -> Path:
        return self.folder / f"chunk-{k:05d}.parquet"

    def get(self, k: int) -> pd.DataFrame | None:
        """Chunk ``k`` if a run finished it (and it is intact), else None."""
        return files.read_parquet(self.path(k), run=self.run) if self._trusted(self.path(k)) else None

    def put(self, k: int, frame: pd.DataFrame) -> None:
        files.write_parquet(self.path(k), frame, run=self.run)
