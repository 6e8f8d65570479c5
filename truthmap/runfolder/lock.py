"""The run folder's lock: one writer at a time, or any number of readers.

``lock(run_dir, exclusive)`` takes ``<run>/lock`` with flock, which the kernel drops when its holder
dies, however it dies (a killed run never leaves a stale lock). A writer writes its pid, host and start
time into the file, so that a refused second writer can say who holds the folder.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from pathlib import Path

from ..errors import TruthmapError
from .disk import UMASK
from .names import LOCK
from .text import sanitise


def lock(run_dir: Path, exclusive: bool) -> tuple[int | None, list[str]]:
    """Take the folder's lock (flock: released by the kernel when the holder dies, so never stale):
    exclusive for a writer, shared for a reader.

    The lock file is never deleted: deleting it would let two processes lock two different files. It is
    opened without following a symbolic link, and refused unless it is a regular file with no other name
    (so the pid written into it can land nowhere else).
    """
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666 & ~UMASK)
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

