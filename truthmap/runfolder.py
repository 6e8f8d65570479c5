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
import errno
import math
import signal
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import TruthmapError

# Every file of a run folder is named here, and written by exactly one stage or command
# (docs/run-folder.md; each stage's declaration, stages/base.py, lists its inputs and outputs).
QUESTIONS = "questions.parquet"  # generate
VOCABULARIES = "vocabularies.json"  # generate
GENERATIONS = "generations.parquet"  # generate
GENERATION_CHUNKS = "generations"  # generate: chunk-00000.parquet, … : finished pieces of the stage
CHUNK_PLAN = "plan.json"  # generate: inside GENERATION_CHUNKS, what the chunks were computed from
ANSWERS = "answers.parquet"  # label
SPLITS = "splits.json"  # label
ACTIVATIONS = "activations"  # extract
ACTIVATIONS_INDEX = f"{ACTIVATIONS}/index.json"  # extract: read with read_activations_index
ACTIVATIONS_VALID = f"{ACTIVATIONS}/valid.npy"  # extract
ACTIVATIONS_FINGERPRINT = f"{ACTIVATIONS}/fingerprint"  # extract: the inputs its finished shards came from
RESAMPLES = "resamples.parquet"  # samples (run --also samples) or the resample command
SAMPLING_SCORES = "sampling_scores.parquet"  # samples or the resample command
PROBE_RESULTS = "probe_results.csv"  # probe: the probes' rows only
PROBE_SCORES = "probe_scores.parquet"  # probe
WHOLEMAP_RESULTS = "wholemap_results.csv"  # wholemap: the columns of PROBE_RESULTS, site = whole_map
WHOLEMAP_SCORES = "wholemap_scores.parquet"  # wholemap
CELL_NULL = "cell_null.csv"  # wholemap: each cell's p under the permutation null
COST = "cost.csv"  # cost: every method's test AUC and extra cost beyond answering
COST_FIGURE = "cost.png"  # cost
BASELINE_SCORES = "baseline_scores.parquet"  # baselines
BASELINE_RESULTS = "baseline_results.csv"  # baselines: the columns of PROBE_RESULTS, site = baseline
FAMILY_RESULTS = "family_results.csv"  # baselines
BASELINES_FIGURE = "baselines.png"  # baselines
ENTROPY_RESULTS = "entropy_probe_results.csv"  # entropy
ENTROPY_SCORES = "entropy_probe_scores.parquet"  # entropy
ENTROPY_FIGURE = "heatmap_entropy"  # entropy: .png and .svg
ATTENTION = "attention.csv"  # attention
ATTENTION_FIGURE = "attention"  # attention: .png and .svg
HEATMAP, HEATMAP_WITHIN = "heatmap", "heatmap_within"  # plot: .png and .svg of each
HEATMAPS = (HEATMAP, HEATMAP_WITHIN)
FIGURE_SUFFIXES = (".png", ".svg")
REPORT = "report.html"  # report
ERROR_TYPES = "error_types.parquet"  # the resample command
ERROR_TYPE_RESULTS = "error_type_results.csv"  # the resample command
ERROR_TYPES_FIGURE = "error_types.png"  # the resample command
CHOICE = "choice.csv"  # the choose command
CHOICE_ANSWERS = "choice_answers.parquet"  # the choose command
CHOICE_FIGURE = "choice.png"  # the choose command
DETECTORS = "detectors"  # the export command: detectors/<site>-L<layer>-<position>/
TRANSFER = "transfer"  # the transfer command's default folder, holding TRANSFER_FILES
TRANSFER_FILES = ("transfer.csv", "transfer_matrix.csv", "transfer.png")
SUMMARY = "summary.json"  # every stage
CONFIG = "config.json"  # every command
STAGES = "stages.json"  # every stage
MANIFEST = "manifest.json"  # every write
LOCK = "lock"  # every command
_UMASK = os.umask(0)
os.umask(_UMASK)
_RUN_FILES = {SUMMARY, STAGES, CONFIG}  # written by every stage or by none
_TMP_SUFFIX = ".truthmap.tmp"
# atomic_path's temporary files, .<name>.<random>.truthmap.tmp: only these are ever deleted as leftovers
# (a user's .draft.tmp or .idea.v2.tmp is not truthmap's)
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.truthmap\.tmp$")


def figures(stem: str) -> list[str]:
    """The file names of a figure saved as PNG and SVG."""
    return [stem + suffix for suffix in FIGURE_SUFFIXES]


# what truthmap writes at the top of a run folder (docs/run-folder.md): a folder holding anything else and
# no manifest is not a run folder, and is refused untouched
OWN_NAMES = frozenset({
    QUESTIONS, VOCABULARIES, GENERATIONS, GENERATION_CHUNKS, ANSWERS, SPLITS, ACTIVATIONS, PROBE_RESULTS,
    PROBE_SCORES, SUMMARY, CONFIG, STAGES, MANIFEST, LOCK, *(f for stem in HEATMAPS for f in figures(stem)),
    BASELINE_SCORES, BASELINE_RESULTS, FAMILY_RESULTS, BASELINES_FIGURE, ATTENTION, *figures(ATTENTION_FIGURE),
    RESAMPLES, SAMPLING_SCORES, ENTROPY_RESULTS, ENTROPY_SCORES, *figures(ENTROPY_FIGURE), ERROR_TYPES,
    ERROR_TYPE_RESULTS, ERROR_TYPES_FIGURE, CHOICE, CHOICE_ANSWERS, CHOICE_FIGURE, DETECTORS, TRANSFER, REPORT,
    WHOLEMAP_RESULTS, WHOLEMAP_SCORES, CELL_NULL, COST, COST_FIGURE,
})
_OWN_FOLDERS = (GENERATION_CHUNKS, ACTIVATIONS, *(f"{ACTIVATIONS}/{site}" for site in ("residual", "mlp", "attention")))
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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

    Every file truthmap writes goes through here, so :func:`guard` (no symbolic link on the way, no
    file of someone else replaced) checks every write. Inside an open run the file is listed in the
    manifest: its new checksum is recorded as pending before the rename and committed after it, so that
    a crash between the two leaves a state that :func:`open_run` resolves (old file and old checksum, or
    new file and new checksum). Outside a run folder the file is recorded in its folder's
    ``.truthmap-outputs.json`` (:data:`OUTPUTS_LIST`), so that a later command knows truthmap wrote it.
    """
    path = Path(os.path.abspath(path))
    if _open is not None and _key(path) is not None:
        _check_inside(_open.root, path)
    guard(path, make_folders=True)
    if _open is not None and _open.forget is not None:
        name, _open.forget = _open.forget, None
        forget_stage(_open.root, name)
    tmp = _temporary(path)
    try:
        try:
            yield tmp
            _fsync(tmp)
        except OSError as err:
            _disk_error(err, path)
            raise
        guard(path)  # again just before the rename: nothing swapped for a link meanwhile
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
        else:
            _record_output(path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- the guard of every write

OUTPUTS_LIST = ".truthmap-outputs.json"  # beside outputs written outside a run folder: name -> size, sha256
_overwrite = False  # set by overwriting(): replace a file truthmap did not write (never a link)


@contextmanager
def overwriting(allowed: bool = True):
    """Within the block, :func:`guard` lets a write replace a regular file truthmap did not write
    (the commands' ``--overwrite``). A symbolic link is still never written through."""
    global _overwrite
    before, _overwrite = _overwrite, bool(allowed)
    try:
        yield
    finally:
        _overwrite = before


def guard(path: Path, make_folders: bool = False, anchor: Path | None = None) -> Path:
    """The one check before any write of ``path`` (a file): raise TruthmapError, touching nothing, if
    the write would follow a symbolic link or replace a file truthmap did not write.

    * No link on the way: every component from the anchor down to the file itself, where it exists,
      must be a real folder (the file: a regular file). The anchor is the run folder holding ``path``
      (the nearest folder above it with a ``manifest.json``), else the folder the caller named
      (``path``'s parent; ``anchor`` when the caller names it, as a command writing a folder of outputs
      names that folder's parent, so the folder itself is never a link): folders you name are yours,
      everything truthmap adds below them is checked.
      With ``make_folders`` the missing folders are made here, one at a time, never through a link.
    * No one else's file replaced: an existing file may be replaced when it is listed in the manifest
      of the run being written, lies in the run folder under a name truthmap writes there, is listed
      unchanged (same size and checksum) in its folder's :data:`OUTPUTS_LIST`, or inside
      :func:`overwriting`.
    """
    path = Path(os.path.abspath(path))
    anchor = Path(os.path.abspath(anchor)) if anchor is not None else _anchor(path)
    if make_folders and not os.path.lexists(anchor):
        try:
            os.makedirs(anchor, exist_ok=True)  # the folder named by the caller (--out a/b/x.csv)
        except OSError as err:
            raise TruthmapError(f"{anchor}: cannot make the folder ({err.strerror})") from None
    if os.path.lexists(anchor) and not os.path.isdir(anchor):
        raise TruthmapError(f"{anchor}: not a folder; give another path")
    folder = anchor
    for part in path.relative_to(anchor).parts[:-1]:
        folder = folder / part
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            if not make_folders:
                break
            try:
                os.mkdir(folder)
            except FileExistsError:
                pass  # made meanwhile: checked below like any other
            except OSError as err:
                raise TruthmapError(f"{folder}: cannot make the folder ({err.strerror})") from None
            info = os.lstat(folder)
        except OSError as err:
            raise TruthmapError(f"{folder}: cannot be checked ({err.strerror})") from None
        if stat.S_ISLNK(info.st_mode):
            raise TruthmapError(f"{folder}: a symbolic link; truthmap writes through none (it would write to "
                                f"{sanitise(os.path.realpath(folder), 120)}); nothing written")
        if not stat.S_ISDIR(info.st_mode):
            raise TruthmapError(f"{folder}: a file truthmap did not write is where it needs a folder; move it, "
                                f"nothing touched")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as err:
        raise TruthmapError(f"{path}: cannot be checked ({err.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise TruthmapError(f"{path}: a symbolic link; truthmap writes through none (it would replace "
                            f"{sanitise(os.path.realpath(path), 120)}); nothing written")
    if not stat.S_ISREG(info.st_mode):
        raise TruthmapError(f"{path}: not a regular file; truthmap replaces no folder or device; give another path")
    if not _overwrite and not _ours(path, anchor):
        raise TruthmapError(f"{path}: exists and truthmap did not write it; not replaced (give another path, "
                            f"or --overwrite to replace it)")
    return path


def free_name(path: Path) -> Path:
    """``path`` if a write there replaces nothing of someone else's, else the first free
    ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, …: a default name never clobbers."""
    path = Path(path)
    candidate = path
    for n in range(2, 1000):
        try:
            return guard(candidate)
        except TruthmapError:
            if not os.path.lexists(candidate):
                raise  # a link on the way: every other name would be refused too
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return guard(candidate)


def _anchor(path: Path) -> Path:
    """The run folder holding ``path`` (the nearest folder above it with a manifest), else its parent."""
    if _open is not None and _key(path) is not None:
        return _open.root
    run, _ = _reader_of(path)
    if run is not None:
        return run.root
    for folder in path.parents:
        if folder == path.parent:
            continue  # a file beside a manifest: its parent is the anchor anyway
        if os.path.isfile(folder / MANIFEST) and not os.path.islink(folder / MANIFEST):
            return folder
    return path.parent


def _ours(path: Path, anchor: Path) -> bool:
    """Whether the existing regular file ``path`` is truthmap's to replace (see :func:`guard`)."""
    key = _key(path)
    if key is not None:
        # the open run: listed, or a name truthmap writes at its top or in its own folders
        return key in _open.files or (("/" not in key and key in OWN_NAMES) or key.startswith(
            (f"{GENERATION_CHUNKS}/", f"{ACTIVATIONS}/", f"{DETECTORS}/", f"{TRANSFER}/")))
    entry = _outputs_list(path.parent).get(path.name)
    if not isinstance(entry, dict):
        return False
    try:
        actual = _describe_nofollow(path)
    except OSError:
        return False
    return actual == {"size": entry.get("size"), "sha256": entry.get("sha256")}


def _outputs_list(folder: Path) -> dict:
    """The ``files`` of ``folder``'s :data:`OUTPUTS_LIST` ({} if missing, a link, too big or damaged)."""
    try:
        fd = os.open(folder / OUTPUTS_LIST, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return {}
        data = f.read(MAX_OUTPUTS_LIST_BYTES + 1)
    if len(data) > MAX_OUTPUTS_LIST_BYTES:
        return {}
    try:
        listed = parse_json(data)
    except ValueError:
        return {}
    files = listed.get("files") if isinstance(listed, dict) else None
    return files if isinstance(files, dict) else {}


MAX_OUTPUTS_LIST_BYTES = 1 << 20


def _record_output(path: Path) -> None:
    """List ``path`` (just written, outside a run's manifest) in its folder's :data:`OUTPUTS_LIST`."""
    folder = path.parent
    files = {k: v for k, v in _outputs_list(folder).items() if (folder / k).is_file()}  # forget what is gone
    files[path.name] = _describe_nofollow(path)
    listing = folder / OUTPUTS_LIST
    if os.path.lexists(listing) and not (os.path.isfile(listing) and not os.path.islink(listing)):
        return  # something else is there: leave it, the file is then simply not known as truthmap's
    tmp = _temporary(listing)
    try:
        tmp.write_text(json.dumps({"version": 1, "written_by": "truthmap", "files": files}, indent=1,
                                  sort_keys=True) + "\n")
        os.replace(tmp, listing)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _describe_nofollow(path: Path) -> dict:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _temporary(path: Path) -> Path:
    """A new empty file beside ``path`` named as truthmap's temporary files are
    (``.<name>.<random>.truthmap.tmp``: :data:`_TEMPORARY`), made without following any link."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    if os.path.realpath(tmp) != os.path.join(os.path.realpath(path.parent), os.path.basename(tmp)):
        os.unlink(tmp)  # pragma: no cover - a folder swapped for a link between the check and here
        raise TruthmapError(f"{path.parent}: changed into a link while truthmap wrote; nothing written")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; run files are ordinary files
    return Path(tmp)


def _disk_error(err: OSError, path: Path) -> None:
    """A full disk or quota is the machine's state, not a bug of truthmap: one line saying where."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        raise TruthmapError(f"{path}: {what} while writing it (in {path.parent}); free some space and run the "
                            f"same command again (finished work is kept)") from None


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


def _check_inside(root: Path, path: Path) -> None:
    """Refuse ``path`` unless it lies inside ``root`` once every symbolic link is followed, and is not a
    link itself: truthmap writes no links, so one is something it did not write."""
    path = Path(os.path.abspath(path))
    if os.path.islink(path):
        raise TruthmapError(f"{path}: a symbolic link, which truthmap never writes nor follows; "
                            f"remove it or give another --out")
    real_root = Path(os.path.realpath(root))
    try:
        Path(os.path.realpath(path)).relative_to(real_root)
    except ValueError:
        raise TruthmapError(f"{path}: leads outside the run folder {root}; truthmap reads and writes only "
                            f"inside it") from None


def safe_key(key) -> bool:
    """Whether ``key`` (from a manifest, an index, a card…) is a relative path that stays in its folder."""
    if not isinstance(key, str) or not key or "\\" in key or "\x00" in key or key.startswith("/"):
        return False
    parts = key.split("/")
    try:  # a name longer than any file system holds (ENAMETOOLONG on every check) is no file of a run
        if len(key.encode("utf-8")) > 1024 or any(len(part.encode("utf-8")) > 255 for part in parts):
            return False
    except UnicodeEncodeError:
        return False
    return all(part not in ("", ".", "..") for part in parts)


def child(root: Path, name: str, what: str = "path") -> Path:
    """``root / name`` for a ``name`` read from a file: refused unless it stays inside ``root``."""
    if not safe_key(name):
        raise TruthmapError(f"{root}: {what} {sanitise(repr(name))} is not a plain relative path inside the folder")
    path = Path(root) / name
    if path.exists() or os.path.islink(path):
        _check_inside(root, path)
    return path


def sanitise(text, limit: int = 300) -> str:
    """Text from a file or a model, safe to print on a terminal: control characters (escape sequences,
    carriage returns, lone surrogates) shown escaped, and at most ``limit`` characters."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    out = []
    for ch in text:
        code = ord(ch)
        if code < 32 or 127 <= code < 160 or 0xD800 <= code < 0xE000 or code in (0x2028, 0x2029, 0x202E, 0x2066,
                                                                                  0x2067, 0x2068, 0x2069):
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if code < 0xD800 or code >= 0xE000 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _save_manifest() -> None:
    path = _open.root / MANIFEST
    try:
        _write_manifest(path)
    except OSError as err:
        _disk_error(err, path)
        raise


def _write_manifest(path: Path) -> None:
    tmp = _temporary(path)
    try:
        with open(tmp, "w") as f:
            json.dump({"version": 1, "files": _open.files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def trusted(path: Path) -> bool:
    """Whether ``path`` may be read: listed in the open run's manifest (so checked when the run opened,
    or written since). Outside an open run, whether it exists."""
    key = _key(Path(path))
    if key is None:
        run, key = _reader_of(Path(path))
        if run is None:
            return Path(path).exists()
        entry = run.files.get(key)
        return entry is not None and "previous" not in entry and Path(path).exists()
    if not safe_key(key) or os.path.islink(path):
        return False
    entry = _open.files.get(key)
    return entry is not None and "previous" not in entry and Path(path).exists()


def remove(path: Path) -> None:
    """Delete a file or folder of the open run: the files its manifest lists (a folder: those under it,
    truthmap's temporary files, then the folders left empty) and their entries. Nothing else is ever
    deleted: a file truthmap did not write stays, whatever its name, and so does the folder holding it.
    Outside an open run nothing is deleted."""
    path = Path(os.path.abspath(path))
    key = _key(path)
    if key is None:
        return
    if os.path.lexists(path):
        _check_inside(_open.root, path)
    if os.path.isdir(path):
        _remove_listed(path, key)
    elif key in _open.files and os.path.isfile(path):
        path.unlink()
    gone = [k for k in _open.files if k == key or k.startswith(key + "/")]
    for k in gone:
        del _open.files[k]
    if gone:
        _save_manifest()


def _remove_listed(folder: Path, key: str) -> None:
    """Delete the files of ``folder`` that the manifest lists, truthmap's temporary files, and then the
    folders left empty: a file truthmap did not write stays (and so does the folder holding it)."""
    for k in [k for k in _open.files if k.startswith(key + "/")]:
        path = _open.root / k
        if path.is_file() and not os.path.islink(path):
            path.unlink()
    for where, folders, names in os.walk(folder, topdown=False):
        for name in names:
            full = os.path.join(where, name)
            if _TEMPORARY.match(name) and not os.path.islink(full):
                os.unlink(full)
        try:
            os.rmdir(where)
        except OSError:
            pass  # holds something truthmap did not write


# ---------------------------------------------------------------- readers and writers

def write_json(path: Path, obj) -> None:
    """JSON that any parser reads: NaN and infinities are written as null."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(obj) + "\n")


def dumps(obj, indent: int | None = 2) -> str:
    """``json.dumps`` with numpy values, and NaN or infinite numbers as null (strict JSON has neither)."""
    return json.dumps(finite(json.loads(json.dumps(obj, default=_json_default))), indent=indent, allow_nan=False)


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


MAX_JSON_DEPTH = 100  # deeper nesting is refused before the parser could run out of stack


def parse_json(data: bytes | str, object_pairs_hook=None):
    """Strict JSON: ValueError (with the reason) for non-UTF-8 bytes, lone surrogates, NaN or infinities,
    nesting deeper than MAX_JSON_DEPTH, or anything json refuses."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 text (byte {err.start})") from None
    _check_depth(data)
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float,
                           object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg} (line {err.lineno})") from None
    except RecursionError:  # pragma: no cover - _check_depth refuses such nesting first
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_text(value)
    return value


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH (brackets inside strings are not counted)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: no JSON number is infinite, and a NaN check would let it pass
        raise ValueError(f"{text[:40]} is beyond the range of a number")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_text(value) -> None:
    """Refuse strings holding lone surrogates (``"\\ud800"``): they are not text, and no file can hold them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"a string holds a lone surrogate (\\u{ord(item[err.start]):04x}), which is not text") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path, default=None):
    """A JSON file of a run (``default`` if it is missing); verified first (:func:`verify`); strict
    (:func:`parse_json`) and at most MAX_JSON_BYTES."""
    path = Path(path)
    if not path.exists():
        if default is not None:
            return default
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    verify(path)
    cap = MAX_JSON_BYTES_OF.get(path.name, MAX_JSON_BYTES)
    try:
        return parse_json(read_capped(path, cap))
    except ValueError as err:
        raise TruthmapError(f"{path}: {err}; delete it to recompute") from None


MAX_JSON_BYTES = 256 << 20  # splits.json and index.json list every id: a few MB per million questions
MAX_JSON_BYTES_OF = {CONFIG: 1 << 20, SUMMARY: 16 << 20, STAGES: 16 << 20, CHUNK_PLAN: 1 << 20}
MAX_MANIFEST_BYTES = 64 << 20  # about 200 bytes a file: 300,000 files


def read_capped(path: Path, cap: int) -> bytes:
    """The bytes of ``path``, never more than ``cap`` read: ValueError (with the size) for a larger file,
    so that a huge or sparse JSON document is refused before it is parsed (parsing takes several times
    its size in memory)."""
    with open(path, "rb") as f:
        data = f.read(cap + 1)
        if len(data) > cap:
            size = os.fstat(f.fileno()).st_size
            raise ValueError(f"{size} bytes, more than the {cap} this file may hold")
    return data


def read_activations_index(run_dir: str | Path, default: dict | None = None) -> dict:
    """``activations/index.json`` (``default`` if it is missing), checked: every shard a plain file name
    inside ``activations/``, every list of the type the store writes (a one-line error for anything else)."""
    path = Path(run_dir) / ACTIVATIONS_INDEX
    if default is not None and not path.exists():
        return default
    meta = read_json(path)
    try:
        _check_index(meta)
    except (TypeError, KeyError, ValueError) as err:
        raise TruthmapError(f"{path}: not an index of the activations store ({err}); rerun 'truthmap extract'") from None
    return meta


def _check_index(meta) -> None:
    def texts(value, name):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"'{name}' is not a list of strings")

    if not isinstance(meta, dict):
        raise TypeError("not an object")
    texts(meta.get("ids"), "ids")
    texts(meta.get("positions"), "positions")
    if not isinstance(meta.get("sites"), dict):
        raise ValueError("'sites' is not an object")
    for site, entry in meta["sites"].items():
        if site not in ("residual", "mlp", "attention") or not isinstance(entry, dict):
            raise ValueError(f"unknown site {site!r}")
        layers, shards = entry.get("layers"), entry.get("shards")
        if not isinstance(layers, list) or not layers or not all(type(v) is int for v in layers):
            raise ValueError(f"site {site}: 'layers' is not a list of whole numbers")
        if not isinstance(shards, list):
            raise ValueError(f"site {site}: 'shards' is not a list")
        for shard in shards:
            if not isinstance(shard, dict) or not safe_key(shard.get("file")) or not shard["file"].startswith(site + "/"):
                raise ValueError(f"site {site}: a shard file is not a file of activations/{site}/")
            if not all(type(shard.get(k)) is int for k in ("start", "stop")):
                raise ValueError(f"site {site}: a shard's start or stop is not a whole number")


def read_splits(path: Path) -> dict:
    """splits.json, checked: ``{"seeds": {"<int>": {"train": [ids], "test": [ids]}}}``."""
    splits = read_json_object(path)
    seeds = splits.get("seeds")
    ok = isinstance(seeds, dict) and seeds and all(
        isinstance(seed, str) and seed.lstrip("-").isdigit() and isinstance(split, dict)
        and all(isinstance(split.get(part), list) and all(isinstance(i, str) for i in split[part])
                for part in ("train", "test"))
        for seed, split in seeds.items())
    if not ok:
        raise TruthmapError(f"{path}: not the splits the label stage writes ({{\"seeds\": {{\"0\": {{\"train\": [ids], "
                            f"\"test\": [ids]}}}}}}); delete it to recompute")
    return splits


def read_json_object(path: Path, default=None) -> dict:
    """:func:`read_json` of a file that must hold an object (a mapping)."""
    value = read_json(path, default)
    if not isinstance(value, dict):
        raise TruthmapError(f"{path}: holds {type(value).__name__}, not an object; delete it to recompute")
    return value


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    verify(path)
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise TruthmapError(f"{path}: unreadable ({str(err).splitlines()[0]}); delete it to recompute") from None


def read_csv(path: Path, **options) -> pd.DataFrame:
    """A CSV table of a run, verified first; one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    verify(path)
    try:
        return pd.read_csv(path, encoding="utf-8", **options)
    except UnicodeDecodeError as err:
        raise TruthmapError(f"{path}: not UTF-8 text (byte {err.start}); delete it to recompute") from None
    except Exception as err:  # pandas raises several types for a damaged file
        raise TruthmapError(f"{path}: unreadable ({sanitise(str(err).splitlines()[0] if str(err) else type(err).__name__)}); "
                            f"delete it to recompute") from None


def read_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """An array of a run (never a pickle), verified first."""
    path = Path(path)
    if not path.exists():
        raise TruthmapError(f"{path}: missing; run the stage that writes it first")
    verify(path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise TruthmapError(f"{path}: unreadable ({sanitise(str(err).splitlines()[0] if str(err) else type(err).__name__)}); "
                            f"delete it to recompute") from None


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """A CSV table, its text cells made safe to open in a spreadsheet (:func:`spreadsheet_safe`)."""
    with atomic_path(path) as tmp:
        spreadsheet_safe(frame).to_csv(tmp, index=False)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell (and column name) that a spreadsheet would run as a formula —
    one starting with ``= + - @``, a tab or a carriage return — prefixed with ``'`` (the OWASP advice
    on CSV injection). A plain number written as text (``-1``, ``+0.5``) is left as it is: a
    spreadsheet reads it as a number, never a formula."""
    def safe(value):
        if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(value):
            return "'" + value
        return value

    text = [c for c in frame.columns if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c])]
    columns = [safe(c) for c in frame.columns]
    if not text and columns == list(frame.columns):
        return frame
    frame = frame.copy()
    for c in text:
        frame[c] = frame[c].map(safe)
    frame.columns = columns
    return frame


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
    TruthmapError, touching nothing, when the folder is not a run folder (:func:`check_run_folder`),
    when its manifest names a path outside it or a symbolic link, and when another live process holds it.
    """
    global _open
    run_dir = Path(os.path.abspath(run_dir))
    if _open is not None:
        raise TruthmapError(f"{run_dir}: this process already holds the run folder {_open.root}")
    if run_dir in _readers:
        raise TruthmapError(f"{run_dir}: this process is reading the run folder; it cannot also write it")
    check_run_folder(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TruthmapError(f"{run_dir}: cannot write the run folder here ({err.strerror}); give another --out") from None
    lock_fd, notices = _lock(run_dir, exclusive=True)
    try:
        _open = _OpenRun(run_dir, {})
        notices += _check(run_dir)
        yield notices
    finally:
        _open = None
        if lock_fd is not None:
            os.close(lock_fd)  # closing the descriptor releases the lock; the file stays (see _lock)


def check_run_folder(run_dir: Path) -> None:
    """Refuse (TruthmapError, nothing touched) a folder that is not a run folder.

    A run folder is missing, empty, holds truthmap's ``manifest.json``, or is a run of an older truthmap
    (only truthmap's own names, and a ``config.json`` naming a model and a dataset). A folder holding only
    a ``lock`` is one whose first run stopped before writing anything.
    """
    run_dir = Path(run_dir)
    if not os.path.lexists(run_dir):
        return
    if not run_dir.is_dir():
        raise TruthmapError(f"{run_dir}: not a folder; give a new or empty folder, or a run folder, as --out")
    names = sorted(os.listdir(run_dir))
    if not names:
        return
    foreign = [n for n in names if n not in OWN_NAMES and not _TEMPORARY.match(n)]
    manifest = run_dir / MANIFEST
    if os.path.islink(manifest) or (manifest.exists() and not manifest.is_file()):
        raise TruthmapError(f"{manifest}: not a regular file; this is not a run folder truthmap wrote")
    if manifest.is_file():
        try:
            _parse_manifest(read_capped(manifest, MAX_MANIFEST_BYTES))
            return
        except ValueError:
            if not foreign:
                return  # a damaged manifest of a folder holding only truthmap's files: nothing is trusted
            raise TruthmapError(f"{run_dir}: its manifest.json is damaged and it holds files truthmap does not "
                                f"write ({_names(foreign)}); refused, nothing touched; give another --out") from None
    if not foreign and (set(names) <= {LOCK} | {n for n in names if _TEMPORARY.match(n)} or _older_run(run_dir)):
        return
    raise TruthmapError(f"{run_dir}: not a run folder (it holds {_names(names)} and no manifest.json); "
                        f"nothing touched; give a new or empty folder as --out")


def _names(names: list[str]) -> str:
    shown = ", ".join(sanitise(n, 60) for n in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _older_run(run_dir: Path) -> bool:
    """A run of a truthmap that kept no manifest: its config.json names a model and a dataset."""
    path = run_dir / CONFIG
    if os.path.islink(path) or not path.is_file() or path.stat().st_size > 1_000_000:
        return False
    try:
        config = parse_json(path.read_bytes())
    except ValueError:
        return False
    return isinstance(config, dict) and isinstance(config.get("model"), str) and isinstance(config.get("dataset"), str)


def _parse_manifest(data: bytes) -> dict:
    """The ``files`` of a manifest truthmap wrote; ValueError (with the reason) for anything else."""
    manifest = parse_json(data)
    if not isinstance(manifest, dict) or manifest.get("version") != 1 or not isinstance(manifest.get("files"), dict):
        raise ValueError("not a manifest of this truthmap")
    for key, entry in manifest["files"].items():
        if not safe_key(key) or key == MANIFEST or key == LOCK:
            raise ValueError(f"entry {sanitise(repr(key), 80)} is not a path inside the folder")
        if not isinstance(entry, dict) or not _describes(entry) or not isinstance(entry.get("stage"), (str, type(None))):
            raise ValueError(f"entry {sanitise(repr(key), 80)} is not a file description")
        previous = entry.get("previous")
        if "previous" in entry and previous is not None and not (isinstance(previous, dict) and _describes(previous)):
            raise ValueError(f"entry {sanitise(repr(key), 80)} has a damaged pending write")
    return manifest["files"]


def _describes(entry: dict) -> bool:
    size, digest = entry.get("size"), entry.get("sha256")
    return (isinstance(size, int) and not isinstance(size, bool) and size >= 0
            and isinstance(digest, str) and bool(_SHA256.match(digest)))


def _lock(run_dir: Path, exclusive: bool) -> tuple[int | None, list[str]]:
    """Take the folder's lock (flock: released by the kernel when the holder dies, so never stale):
    exclusive for a writer, shared for a reader.

    The lock file is never deleted: deleting it would let two processes lock two different files. It is
    opened without following a symbolic link, and refused unless it is a regular file with no other name
    (so the pid written into it can land nowhere else).
    """
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666 & ~_UMASK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TruthmapError(f"{path}: a symbolic link, not truthmap's lock; refused, nothing touched") from None
        if exclusive or err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise TruthmapError(f"{path}: cannot open the lock ({err.strerror}); give another --out") from None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a read-only folder: a reader still locks
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = "a regular file with other names (hard links)" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise TruthmapError(f"{path}: {kind}, not truthmap's lock; refused, nothing touched")
    try:
        import fcntl

        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        holder = sanitise(os.pread(fd, 200, 0).decode("utf-8", "replace"), 200).split()
        os.close(fd)
        pid = holder[0] if holder else "?"
        host = f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname() else ""
        since = f" since {holder[2]}" if len(holder) > 2 else ""
        if exclusive and not host and not _alive(pid):  # the last writer is gone: a reader holds it
            raise TruthmapError(f"{run_dir}: being read (export, report, transfer or load_features); wait for "
                                f"it to finish, or give another --out") from None
        what = "in use by" if exclusive else "being written by"
        raise TruthmapError(
            f"{run_dir}: {what} pid {pid}{host}{since}; wait for that run to finish, or give another --out"
        ) from None
    except (ImportError, OSError) as err:  # no fcntl (Windows) or a file system without locks
        os.close(fd)
        reason = getattr(err, "strerror", None) or type(err).__name__
        return None, [f"{path}: could not lock the folder ({reason}); a second run on it would not be refused"]
    if exclusive:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode(), 0)
    return fd, []


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (as read from the lock) exists on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _check(run_dir: Path) -> list[str]:
    """Resolve interrupted writes, delete damaged files, and mark their stages unfinished.

    Nothing is touched before the whole manifest is known good: a manifest naming a path outside the
    folder, or a listed file that is a symbolic link, trusts nothing and deletes nothing.
    """
    notices = []
    manifest_path = run_dir / MANIFEST
    files = {}
    if manifest_path.exists():
        try:
            files = _parse_manifest(read_capped(manifest_path, MAX_MANIFEST_BYTES))
            for key in files:
                _check_inside(run_dir, run_dir / key)
        except (ValueError, TruthmapError) as err:
            reason = str(err).replace(str(run_dir / "") , "") if isinstance(err, TruthmapError) else str(err)
            notices.append(f"{manifest_path}: damaged ({sanitise(reason, 160)}); no file of this run is trusted "
                           f"and none is deleted; every stage runs again")
            files = {}
    elif any(p != LOCK and not _TEMPORARY.match(p) for p in os.listdir(run_dir)):
        notices.append(f"{manifest_path}: missing (a run of an older truthmap, or deleted); every stage runs again")
    _remove_temporaries(run_dir, files)
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
        redo = f"; the {sanitise(stage, 40)} stage will run again" if stage else "; it will be rewritten"
        if actual is None:
            notices.append(f"{path}: missing{redo}")
        else:
            path.unlink()  # listed in the manifest and inside the folder (checked above): truthmap wrote it
            if actual["size"] != entry.get("size"):
                what = f"truncated or resized ({actual['size']} bytes, {entry.get('size')} expected)"
            else:
                what = "damaged (its checksum differs from the manifest's)"
            notices.append(f"{path}: {what}; deleted{redo}")
        if stage:
            stale_stages.add(stage)
    if changed:
        _save_manifest()
    done = _stages_json(run_dir)
    if stale_stages & set(done):
        for stage in stale_stages:
            done.pop(stage, None)
        write_json(run_dir / STAGES, done)
    if done and not trusted(run_dir / SUMMARY):
        write_json(run_dir / SUMMARY, _summary_from_stages(done))
        notices.append(f"{run_dir / SUMMARY}: rebuilt from {STAGES}")
    return notices


def _stages_json(run_dir: Path) -> dict:
    """stages.json if trusted and well formed (stage -> {fingerprint, seconds, summary}), else {}."""
    path = Path(run_dir) / STAGES
    if not trusted(path):
        return {}
    try:
        done = read_json(path)
    except TruthmapError:
        return {}
    if not isinstance(done, dict):
        return {}
    return {k: v for k, v in done.items() if isinstance(v, dict)}


def _remove_temporaries(run_dir: Path, files: dict) -> None:
    """Delete the leftover temporary files of killed writes: only names of truthmap's own pattern
    (``.<name>.<random>.tmp``), only regular files, only in folders truthmap owns (the run folder, its
    own sub-folders, and the folders of files in the manifest)."""
    folders = {""} | set(_OWN_FOLDERS) | {key.rpartition("/")[0] for key in files}
    for folder in sorted(folders):
        where = run_dir / folder
        if folder and (os.path.islink(where) or not where.is_dir()):
            continue
        try:
            _check_inside(run_dir, where)
            entries = list(os.scandir(where))
        except (OSError, TruthmapError):
            continue
        for entry in entries:
            if _TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)  # the unfinished write of a killed run


# ---------------------------------------------------------------- readers: a shared lock and verified reads

@dataclass
class _ReadRun:
    """A run folder this process reads: its manifest, and the files verified against it so far."""

    root: Path
    files: dict
    verified: set = field(default_factory=set)


_readers: dict = {}  # root -> _ReadRun


@contextmanager
def reading(run_dir: Path):
    """Read ``run_dir`` under a shared lock (no writer can change it meanwhile), every file checked
    against the manifest as it is read (:func:`verify`). Re-entrant: nothing more to do when this
    process already holds the folder, for writing or reading.

    Refuses (TruthmapError) a folder that is not a run folder, one without a valid manifest (nothing in
    it can be verified), and one a writer holds.
    """
    run_dir = Path(os.path.abspath(run_dir))
    if (_open is not None and _open.root == run_dir) or run_dir in _readers:
        yield
        return
    if not run_dir.is_dir():
        raise TruthmapError(f"{run_dir}: no such run folder")
    check_run_folder(run_dir)
    manifest = run_dir / MANIFEST
    try:
        files = _parse_manifest(read_capped(manifest, MAX_MANIFEST_BYTES))
    except (OSError, ValueError) as err:
        reason = "missing" if isinstance(err, OSError) else f"damaged ({sanitise(err, 120)})"
        raise TruthmapError(f"{manifest}: {reason}, so nothing in {run_dir} can be verified; run "
                            f"'truthmap run --out {run_dir}' to repair it") from None
    fd, notices = _lock(run_dir, exclusive=False)
    _readers[run_dir] = _ReadRun(run_dir, files)
    try:
        yield
    finally:
        del _readers[run_dir]
        if fd is not None:
            os.close(fd)


def _reader_of(path: Path) -> tuple[_ReadRun | None, str | None]:
    path = Path(os.path.abspath(path))
    for root, run in _readers.items():
        try:
            return run, path.relative_to(root).as_posix()
        except ValueError:
            continue
    return None, None


def verify(path: Path) -> None:
    """Before reading ``path``: inside a folder this process writes, it must stay inside it and be
    :func:`trusted` (listed in the manifest, so checked when the run opened or written since); inside a
    folder it reads, it must be listed in the manifest with the size and checksum it has now."""
    path = Path(path)
    if _open is not None and _key(path) is not None:
        _check_inside(_open.root, path)
        if not trusted(path):  # checked when the run opened, or written since: anything else is not read
            raise TruthmapError(f"{path}: not in the run's manifest (written by hand, or found damaged and "
                                f"deleted), so not read; run 'truthmap run --out {_open.root}' to recompute it")
        return
    run, key = _reader_of(path)
    if run is None or key in run.verified:
        return
    _check_inside(run.root, path)
    entry = run.files.get(key)
    if entry is None or "previous" in entry:
        raise TruthmapError(f"{path}: not in the run's manifest, so not read; run 'truthmap run --out {run.root}' "
                            f"to finish the run")
    actual = _describe(path) if path.is_file() else None
    if actual is None:
        raise TruthmapError(f"{path}: missing; run 'truthmap run --out {run.root}' to recompute it")
    if actual["size"] != entry["size"] or actual["sha256"] != entry["sha256"]:
        raise TruthmapError(f"{path}: damaged (its checksum differs from the manifest's); run "
                            f"'truthmap run --out {run.root}' to recompute it")
    run.verified.add(key)


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


def stage_is_current(run_dir: Path, stage: str, fingerprint: str, outputs: list[Path]) -> bool:
    done = _stages_json(run_dir)
    return done.get(stage, {}).get("fingerprint") == fingerprint and all(trusted(p) for p in outputs)


def forget_stage(run_dir: Path, stage: str) -> None:
    """Mark ``stage`` unfinished before it rewrites its outputs (so a crash midway is never 'finished')."""
    path = Path(run_dir) / STAGES
    done = _stages_json(run_dir)
    if stage in done:
        del done[stage]
        write_json(path, done)


def mark_stage_done(run_dir: Path, stage: str, fingerprint: str, seconds: float) -> None:
    path = Path(run_dir) / STAGES
    done = _stages_json(run_dir)
    entry = {"fingerprint": fingerprint, "seconds": round(seconds, 3)}
    if _open is not None and stage in _open.stage_fields:
        entry["summary"] = _open.stage_fields[stage]  # to rebuild summary.json should it be lost
    done[stage] = entry
    write_json(path, done)


def update_summary(run_dir: Path, **fields) -> dict:
    path = Path(run_dir) / SUMMARY
    try:
        summary = read_json(path, default={}) if trusted(path) else {}
    except TruthmapError:
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    _merge(summary, fields)
    if _open is not None and _open.stage is not None:
        _merge(_open.stage_fields.setdefault(_open.stage, {}), json.loads(dumps(fields)))
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
        if isinstance(entry.get("summary"), dict):
            _merge(summary, entry["summary"])
    summary["stage_seconds"] = {name: round(entry["seconds"], 2) if isinstance(entry.get("seconds"), (int, float)) else None
                                for name, entry in done.items()}
    return summary


class ChunkStore:
    """Finished chunks of a long stage, kept on disk so that a killed run resumes where it stopped.

    ``<folder>/plan.json`` holds the ``key`` the chunks were computed from and the settings the first
    run fixed (:meth:`setting`); chunks of another key are stale, and the folder is cleared.
    """

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        plan_path = self.folder / CHUNK_PLAN
        try:
            plan = read_json(plan_path) if trusted(plan_path) else None
        except TruthmapError:
            plan = None
        if not isinstance(plan, dict) or plan.get("key") != key:
            remove(self.folder)
            plan = {"key": key}
            write_json(plan_path, plan)
        self.plan = plan

    def setting(self, name: str, value):
        """The value of ``name`` fixed by the first run of this plan (``value``, saved, if none was)."""
        if name not in self.plan:
            self.plan[name] = value
            write_json(self.folder / CHUNK_PLAN, self.plan)
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

