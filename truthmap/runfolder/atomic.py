"""Atomic writes, and the guard of every write.

:func:`atomic_path` yields a temporary file beside the target and renames it onto the target only if the
block succeeds, so a killed process leaves a file whole or absent. Given the open :class:`~.run.Run`
holding the file (``run``), it records the new checksum in that run's manifest as pending before the
rename and commits it after, and counts the write's failpoint events. Outside a run folder the file is
listed in its folder's ``.truthmap-outputs.json`` instead.

:func:`guard` is the one check before any write: no symbolic link on the way, no file of someone else
replaced (unless :func:`overwriting`). The readers and writers of each format are in files.py.

``TRUTHMAP_FAILPOINT=<stage>:<n>`` makes the process SIGKILL itself at the n-th write event of that stage
in a run (events: ``before-rename``, ``after-rename``, ``after-commit`` of every file), and
``TRUTHMAP_FAILPOINT=<stage>:<event>:<file>`` at that event of that file (a path relative to the run
folder); ``TRUTHMAP_FAILPOINT_LOG=<file>`` lists every event. The crash tests use them to kill a run at
exact points.
"""

from __future__ import annotations

import os
import signal
import stat
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import TruthmapError
from .disk import check_inside, describe, describe_nofollow, disk_error, fsync, fsync_dir, temporary
from .manifest import outputs_list, record_output
from .names import MANIFEST, RUN_FILES, own_key
from .text import sanitise

# ``run`` below is the open run.Run holding the path (or None): its root, writable, files (the manifest),
# stage and key(); not imported, since run.py builds on this module.


@contextmanager
def atomic_path(path: Path, run=None):
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Every file truthmap writes goes through here, so :func:`guard` checks every write. When ``run`` (an
    open, writable Run) holds ``path``, the file is listed in its manifest: its new checksum is recorded
    as pending before the rename and committed after it, so that a crash between the two leaves a state
    that opening the run resolves (old file and old checksum, or new file and new checksum). Otherwise the
    file is recorded in its folder's ``.truthmap-outputs.json``, so that a later command knows truthmap
    wrote it.
    """
    path = Path(os.path.abspath(path))
    key = run.key(path) if run is not None and run.writable else None
    if key is not None:
        check_inside(run.root, path)
    guard(path, make_folders=True, run=run)
    if key is not None:
        run.before_write()
    tmp = temporary(path)
    try:
        try:
            yield tmp
            fsync(tmp)
        except OSError as err:
            disk_error(err, path)
            raise
        guard(path, run=run)  # again just before the rename: nothing swapped for a link meanwhile
        old = run.files.get(key) if key is not None else None
        if key is not None:
            # what is on disk now: the old entry's file, or, if its own write never finished, the one before
            on_disk = old.get("previous") if old and "previous" in old else old
            previous = {k: on_disk[k] for k in ("size", "sha256")} if on_disk else None
            stage = None if key in RUN_FILES else run.stage_name  # a damaged run file does not redo a stage
            run.files[key] = {**describe(tmp), "stage": stage, "previous": previous}
            run.save_manifest()
        try:
            failpoint(run, "before-rename", key)
            os.replace(tmp, path)
        except BaseException:
            if key is not None:  # the file was not replaced: its entry stays what it was
                run.files[key] = old
                if old is None:
                    del run.files[key]
                run.save_manifest()
            raise
        fsync_dir(path.parent)
        failpoint(run, "after-rename", key)
        if key is not None:
            run.files[key].pop("previous", None)
            run.save_manifest()
            failpoint(run, "after-commit", key)
        else:
            record_output(path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- the guard of every write

# set by overwriting() (the commands' --overwrite): replace a file truthmap did not write (never a link);
# a context variable, so that it holds for the block that set it only
_overwrite: ContextVar[bool] = ContextVar("truthmap_overwrite", default=False)


@contextmanager
def overwriting(allowed: bool = True):
    """Within the block, :func:`guard` lets a write replace a regular file truthmap did not write
    (the commands' ``--overwrite``). A symbolic link is still never written through."""
    token = _overwrite.set(bool(allowed))
    try:
        yield
    finally:
        _overwrite.reset(token)


def guard(path: Path, make_folders: bool = False, anchor: Path | None = None, run=None) -> Path:
    """The one check before any write of ``path`` (a file): raise TruthmapError, touching nothing, if
    the write would follow a symbolic link or replace a file truthmap did not write.

    * No link on the way: every component from the anchor down to the file itself, where it exists,
      must be a real folder (the file: a regular file). The anchor is the run folder holding ``path``
      (``run``'s root, else the nearest folder above it with a ``manifest.json``), else the folder the
      caller named
      (``path``'s parent; ``anchor`` when the caller names it, as a command writing a folder of outputs
      names that folder's parent, so the folder itself is never a link): folders you name are yours,
      everything truthmap adds below them is checked.
      With ``make_folders`` the missing folders are made here, one at a time, never through a link.
    * No one else's file replaced: an existing file may be replaced when it is listed in the manifest
      of ``run`` (the open run writing it), lies in that run folder under a name truthmap writes there, is
      listed unchanged (same size and checksum) in its folder's :data:`manifest.OUTPUTS_LIST`, or inside
      :func:`overwriting`.
    """
    path = Path(os.path.abspath(path))
    anchor = Path(os.path.abspath(anchor)) if anchor is not None else _anchor(path, run)
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
    if not _overwrite.get() and not _ours(path, run):
        raise TruthmapError(f"{path}: exists and truthmap did not write it; not replaced (give another path, "
                            f"or --overwrite to replace it)")
    return path


def free_name(path: Path, run=None) -> Path:
    """``path`` if a write there replaces nothing of someone else's, else the first free
    ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, …: a default name never clobbers."""
    path = Path(path)
    candidate = path
    for n in range(2, 1000):
        try:
            return guard(candidate, run=run)
        except TruthmapError:
            if not os.path.lexists(candidate):
                raise  # a link on the way: every other name would be refused too
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return guard(candidate, run=run)


def _anchor(path: Path, run) -> Path:
    """The run folder holding ``path`` (``run``'s root, else the nearest folder above it with a
    manifest), else its parent."""
    if run is not None and run.key(path) is not None:
        return run.root
    for folder in path.parents:
        if folder == path.parent:
            continue  # a file beside a manifest: its parent is the anchor anyway
        if os.path.isfile(folder / MANIFEST) and not os.path.islink(folder / MANIFEST):
            return folder
    return path.parent


def _ours(path: Path, run) -> bool:
    """Whether the existing regular file ``path`` is truthmap's to replace (see :func:`guard`)."""
    key = run.key(path) if run is not None and run.writable else None
    if key is not None:
        # the open run: listed, or a name truthmap writes at its top or in its own folders
        return key in run.files or own_key(key)
    entry = outputs_list(path.parent).get(path.name)
    if not isinstance(entry, dict):
        return False
    try:
        actual = describe_nofollow(path)
    except OSError:
        return False
    return actual == {"size": entry.get("size"), "sha256": entry.get("sha256")}


# ---------------------------------------------------------------- fault injection for the crash tests

def failpoint(run, event: str, key: str | None) -> None:
    """Count a write event of ``run``'s current stage; log it, or SIGKILL this process, as the
    environment asks (see the module docstring)."""
    if run is None or not run.writable or not (os.environ.get("TRUTHMAP_FAILPOINT")
                                               or os.environ.get("TRUTHMAP_FAILPOINT_LOG")):
        return
    name = run.stage_name or "setup"
    count = run.events[name] = run.events.get(name, 0) + 1
    log = os.environ.get("TRUTHMAP_FAILPOINT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{name}\t{count}\t{event}\t{key}\n")
    if os.environ.get("TRUTHMAP_FAILPOINT") in (f"{name}:{count}", f"{name}:{event}:{key}"):
        os.kill(os.getpid(), signal.SIGKILL)
