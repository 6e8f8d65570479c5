"""The file-system steps under every write and check of a run folder: truthmap's temporary files, fsync,
checksums, and the test that a path stays inside its folder (no symbolic link followed out of it).

Nothing here knows of a manifest or a run; atomic.py builds the atomic write from these steps.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import TruthmapError
from .names import TMP_SUFFIX
from .text import safe_key, sanitise

UMASK = os.umask(0)  # read once (umask can only be read by setting it): new files get the usual permissions
os.umask(UMASK)


def temporary(path: Path) -> Path:
    """A new empty file beside ``path`` named as truthmap's temporary files are
    (``.<name>.<random>.truthmap.tmp``: :data:`names.TEMPORARY`), made without following any link."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    if os.path.realpath(tmp) != os.path.join(os.path.realpath(path.parent), os.path.basename(tmp)):
        os.unlink(tmp)  # pragma: no cover - a folder swapped for a link between the check and here
        raise TruthmapError(f"{path.parent}: changed into a link while truthmap wrote; nothing written")
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes owner-only files; run files are ordinary files
    return Path(tmp)


def disk_error(err: OSError, path: Path) -> None:
    """A full disk or quota is the machine's state, not a bug of truthmap: one line saying where."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        raise TruthmapError(f"{path}: {what} while writing it (in {path.parent}); free some space and run the "
                            f"same command again (finished work is kept)") from None


def fsync(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
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


def describe(path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


def describe_nofollow(path: Path) -> dict:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def check_inside(root: Path, path: Path) -> None:
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


def child(root: Path, name: str, what: str = "path") -> Path:
    """``root / name`` for a ``name`` read from a file: refused unless it stays inside ``root``."""
    if not safe_key(name):
        raise TruthmapError(f"{root}: {what} {sanitise(repr(name))} is not a plain relative path inside the folder")
    path = Path(root) / name
    if path.exists() or os.path.islink(path):
        check_inside(root, path)
    return path
