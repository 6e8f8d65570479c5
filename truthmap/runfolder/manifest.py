"""What truthmap wrote: a run folder's ``manifest.json``, and ``.truthmap-outputs.json`` beside outputs
written outside a run folder.

``manifest.json`` is ``{"version": 1, "files": {key: {"size", "sha256", "stage", and "previous" while a
write is pending}}}``, a key being a file's posix path relative to the run folder. A file it does not
list is never trusted; :func:`resolve` checks every listed file against it when a run opens.
:data:`OUTPUTS_LIST` lists ``name -> {size, sha256}`` of the files truthmap wrote into a folder that is not
a run folder, so that a later command may replace them (and nothing else) there.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from ..errors import TruthmapError
from .disk import check_inside, describe, describe_nofollow, disk_error, temporary
from .names import CONFIG, LOCK, MANIFEST, OWN_FOLDERS, OWN_NAMES, TEMPORARY
from .text import parse_json, read_capped, safe_key, sanitise

MAX_MANIFEST_BYTES = 64 << 20  # about 200 bytes a file: 300,000 files
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(run_dir: Path) -> dict:
    """The ``files`` of ``run_dir``'s manifest; OSError if it cannot be read, ValueError (with the
    reason) if it is not a manifest truthmap wrote or is over MAX_MANIFEST_BYTES."""
    return parse_manifest(read_capped(Path(run_dir) / MANIFEST, MAX_MANIFEST_BYTES))


def parse_manifest(data: bytes) -> dict:
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


def save_manifest(run_dir: Path, files: dict) -> None:
    """Write ``run_dir``'s manifest listing ``files`` (atomically, flushed before the rename)."""
    path = Path(run_dir) / MANIFEST
    tmp = temporary(path)
    try:
        try:
            with open(tmp, "w") as f:
                json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            disk_error(err, path)
            raise
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def resolve(run_dir: Path, files: dict) -> tuple[list[str], set, bool]:
    """Check every file ``files`` (a manifest's) lists against the disk, in place: finish or undo the
    writes a crash interrupted, delete a file found truncated or altered and drop its entry.

    Returns the notices (one line per file found missing or damaged), the stages whose files went (to
    be marked unfinished) and whether ``files`` changed (to be saved). Call only once every key is known
    to lie inside ``run_dir`` (:func:`~.disk.check_inside` of each).
    """
    notices, stale_stages, changed = [], set(), False
    for key, entry in sorted(files.items()):
        path = run_dir / key
        actual = describe(path) if path.is_file() else None
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
    return notices, stale_stages, changed


def remove_temporaries(run_dir: Path, files: dict) -> None:
    """Delete the leftover temporary files of killed writes: only names of truthmap's own pattern
    (``.<name>.<random>.tmp``), only regular files, only in folders truthmap owns (the run folder, its
    own sub-folders, and the folders of files in the manifest)."""
    folders = {""} | set(OWN_FOLDERS) | {key.rpartition("/")[0] for key in files}
    for folder in sorted(folders):
        where = run_dir / folder
        if folder and (os.path.islink(where) or not where.is_dir()):
            continue
        try:
            check_inside(run_dir, where)
            entries = list(os.scandir(where))
        except (OSError, TruthmapError):
            continue
        for entry in entries:
            if TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)  # the unfinished write of a killed run


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
    foreign = [n for n in names if n not in OWN_NAMES and not TEMPORARY.match(n)]
    manifest = run_dir / MANIFEST
    if os.path.islink(manifest) or (manifest.exists() and not manifest.is_file()):
        raise TruthmapError(f"{manifest}: not a regular file; this is not a run folder truthmap wrote")
    if manifest.is_file():
        try:
            read_manifest(run_dir)
            return
        except ValueError:
            if not foreign:
                return  # a damaged manifest of a folder holding only truthmap's files: nothing is trusted
            raise TruthmapError(f"{run_dir}: its manifest.json is damaged and it holds files truthmap does not "
                                f"write ({_names(foreign)}); refused, nothing touched; give another --out") from None
    if not foreign and (set(names) <= {LOCK} | {n for n in names if TEMPORARY.match(n)} or _older_run(run_dir)):
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


# ---------------------------------------------------------------- outputs outside a run folder

OUTPUTS_LIST = ".truthmap-outputs.json"  # beside outputs written outside a run folder: name -> size, sha256
MAX_OUTPUTS_LIST_BYTES = 1 << 20


def outputs_list(folder: Path) -> dict:
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


def record_output(path: Path) -> None:
    """List ``path`` (just written, outside a run's manifest) in its folder's :data:`OUTPUTS_LIST`."""
    folder = path.parent
    files = {k: v for k, v in outputs_list(folder).items() if (folder / k).is_file()}  # forget what is gone
    files[path.name] = describe_nofollow(path)
    listing = folder / OUTPUTS_LIST
    if os.path.lexists(listing) and not (os.path.isfile(listing) and not os.path.islink(listing)):
        return  # something else is there: leave it, the file is then simply not known as truthmap's
    tmp = temporary(listing)
    try:
        tmp.write_text(json.dumps({"version": 1, "written_by": "truthmap", "files": files}, indent=1,
                                  sort_keys=True) + "\n")
        os.replace(tmp, listing)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
