"""The output file of a dfget download, from the temporary file to FILE (dfget's side here, the
daemon's in :mod:`peer.output_fill`; this module loads no asyncio: dfget starts with it).

Who does what:

- dfget creates the temporary file ``.FILE.dfget-<12 hex>`` next to FILE itself, so it belongs
  to the user who ran dfget, and holds an exclusive ``flock`` on it for as long as it lives. The
  lock dies with the process, however it dies (SIGKILL included), so the next dfget knows a
  temporary file nobody holds is stale and removes it (:func:`sweep_stale`).
- the dfdaemon fills that file piece by piece while the download runs
  (:class:`peer.output_fill.OutputFill`; ``copy_into`` copies a whole file the same way): it
  opens it without following symlinks (nor a directory symlink a user planted), writes an
  existing file only when it has a dfget temporary name, refuses anything but a regular file
  with one link, creates a new file as root only in a directory of another owner (and gives it
  to that owner), and when the client goes away or the download fails it stops and removes what
  it wrote, so a killed dfget leaves no copy behind.
- dfget checks the content and moves the file onto FILE (:func:`place`): without ``--overwrite``
  an existing FILE is never replaced, not even one that appeared during the download.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import DownloadFailed

TEMP_INFIX = ".dfget-"
# ".<name>.dfget-<12 hex>": the names dfget gives its temporary files.
_TEMP_NAME = re.compile(r"^\..+\.dfget-[0-9a-f]{12}$")
# A temporary file being created (before it is locked) carries this suffix; a sweep removes such a
# file only once it is unlocked and older than CREATING_GRACE seconds (its dfget died mid-create).
CREATING_SUFFIX = ".new"
_CREATING_NAME = re.compile(r"^\..+\.dfget-[0-9a-f]{12}\.new$")
CREATING_GRACE = 60.0
# New files get 0666 minus the umask, like any file a shell command creates.
NEW_FILE_MODE = 0o666


def temp_name_for(output: str) -> str:
    """A fresh temporary path next to `output` (same file system: the final rename is atomic)."""
    parent, name = os.path.split(output)
    return os.path.join(parent, f".{name}{TEMP_INFIX}{secrets.token_hex(6)}")


def is_temp_name(name: str) -> bool:
    """Whether `name` (a file name, no directory) is one of dfget's temporary files."""
    return bool(_TEMP_NAME.match(name))


@dataclass
class TempFile:
    """dfget's temporary file, locked while this process lives; close() releases it."""

    path: str
    fd: int

    def remove(self) -> None:
        """Unlink the file if it is still ours, and release the lock."""
        with contextlib.suppress(OSError):
            if same_file(self.path, os.fstat(self.fd)):
                os.unlink(self.path)
        self.close()

    def close(self) -> None:
        """Release the lock (the file stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create_temp(output: str) -> TempFile:
    """Create and lock a fresh temporary file for `output`.

    The file is created unnamed (``O_TMPFILE``), locked, then linked under its name, so no other
    dfget can ever see it unlocked and take it for stale. Where that cannot be done, it is created
    (``O_EXCL``) under a name sweeps skip, locked, then renamed: the same guarantee.
    """
    parent = os.path.dirname(output)
    flags = os.O_WRONLY | os.O_CLOEXEC
    try:
        fd = os.open(parent, flags | os.O_TMPFILE, NEW_FILE_MODE)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            while True:
                path = temp_name_for(output)
                try:
                    os.link(f"/proc/self/fd/{fd}", path)
                    return TempFile(path, fd)
                except FileExistsError:
                    continue
        except OSError:
            os.close(fd)  # no /proc, say: fall back to a named create
    # Without O_TMPFILE (or when linking it fails, as with EXDEV in some sandboxes) the file is
    # created under a name sweepers skip, locked, and only then renamed to its temporary name: a
    # concurrent dfget's sweep must never find it unlocked and remove it.
    while True:
        path = temp_name_for(output)
        creating = path + CREATING_SUFFIX
        try:
            fd = os.open(creating, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, NEW_FILE_MODE)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(creating, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(creating)
            raise
        return TempFile(path, fd)


def sweep_stale(directory: str) -> list[str]:
    """Remove dfget temporary files in `directory` that no living dfget holds; their names.

    A file is stale when its lock can be taken: the dfget that made it is gone (killed, crashed,
    machine rebooted). Errors are ignored: the sweep is a courtesy, never a reason to fail.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        creating = bool(_CREATING_NAME.match(entry.name))
        if not (creating or is_temp_name(entry.name)):
            continue
        if remove_if_unlocked(entry.path, _older_than(CREATING_GRACE if creating else 0.0, now)) is True:
            removed.append(entry.name)
    return removed


def _older_than(seconds: float, now: float) -> Callable[[os.stat_result], bool]:
    def old_enough(info: os.stat_result) -> bool:
        return now - info.st_mtime >= seconds
    return old_enough


def remove_if_unlocked(path: str, eligible: Callable[[os.stat_result], bool]) -> bool | None:
    """Remove the regular file at `path` if `eligible(its stat)` and no dfget holds its lock.

    True: removed; False: it stays (locked, or not eligible); None: nothing (a regular file) there.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        if not eligible(info):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running dfget holds it
        if same_file(path, info):
            os.unlink(path)
            return True
        return None
    except OSError:
        return False
    finally:
        os.close(fd)


def place(temp: TempFile, output: str, *, overwrite: bool) -> None:
    """Move the finished temporary file onto `output`.

    Without `overwrite` the move is a hard link that fails when `output` exists (then the
    temporary name goes), so a file that appeared meanwhile is never clobbered.
    """
    if overwrite:
        os.replace(temp.path, output)
        return
    try:
        os.link(temp.path, output, follow_symlinks=False)
    except FileExistsError:
        raise DownloadFailed(f"{output} exists (it appeared during the download); "
                             "pass --overwrite to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A file system without hard links: check, then rename (a small window, but no other way).
        if os.path.lexists(output):
            raise DownloadFailed(f"{output} exists; pass --overwrite to replace it") from None
        os.rename(temp.path, output)
        return
    os.unlink(temp.path)


def same_file(path: str, info: os.stat_result) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)
