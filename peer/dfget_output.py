"""The output file of a dfget download, from the temporary file to FILE.

Who does what:

- dfget creates the temporary file ``.FILE.dfget-<12 hex>`` next to FILE itself, so it belongs
  to the user who ran dfget, and holds an exclusive ``flock`` on it for as long as it lives. The
  lock dies with the process, however it dies (SIGKILL included), so the next dfget knows a
  temporary file nobody holds is stale and removes it (:func:`sweep_stale`).
- the dfdaemon fills that file piece by piece while the download runs (:class:`OutputFill`;
  :func:`copy_into` copies a whole file the same way): it opens it without following symlinks
  (nor a directory symlink a user planted), writes an existing file only when it has a dfget
  temporary name, refuses anything but a regular file with one link, creates a new file as root
  only in a directory of another owner (and gives it to that owner), and when the client goes
  away or the download fails it stops and removes what it wrote, so a killed dfget leaves no
  copy behind.
- dfget checks the content and moves the file onto FILE (:func:`place`): without ``--overwrite``
  an existing FILE is never replaced, not even one that appeared during the download.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import DownloadFailed, InvalidRequest

TEMP_INFIX = ".dfget-"
# ".<name>.dfget-<12 hex>": the names dfget gives its temporary files.
_TEMP_NAME = re.compile(r"^\..+\.dfget-[0-9a-f]{12}$")
# A temporary file being created (before it is locked) carries this suffix; a sweep removes such a
# file only once it is unlocked and older than CREATING_GRACE seconds (its dfget died mid-create).
CREATING_SUFFIX = ".new"
_CREATING_NAME = re.compile(r"^\..+\.dfget-[0-9a-f]{12}\.new$")
CREATING_GRACE = 60.0
# After the daemon filled a dfget's temporary file it checks this often whether that dfget still
# holds it (and gives up after ABANDONED_WATCH: a dfget alive that long moves it itself).
ABANDONED_POLL = 0.2
ABANDONED_WATCH = 3600.0
# The daemon copies in steps of this size so that a client that goes away stops it soon.
COPY_STEP = 8 << 20
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
            if _same_file(self.path, os.fstat(self.fd)):
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
        if _remove_if_unlocked(entry.path, _older_than(CREATING_GRACE if creating else 0.0, now)) is True:
            removed.append(entry.name)
    return removed


def _older_than(seconds: float, now: float) -> Callable[[os.stat_result], bool]:
    def old_enough(info: os.stat_result) -> bool:
        return now - info.st_mtime >= seconds
    return old_enough


def _remove_if_unlocked(path: str, eligible: Callable[[os.stat_result], bool]) -> bool | None:
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
        if _same_file(path, info):
            os.unlink(path)
            return True
        return None
    except OSError:
        return False
    finally:
        os.close(fd)


async def remove_when_abandoned(path: Path, info: os.stat_result, *, interval: float = ABANDONED_POLL,
                                limit: float = ABANDONED_WATCH) -> bool:
    """Watch dfget's temporary file `path` (the file `info` describes) after the daemon filled it:
    the dfget that holds its lock moves it onto FILE, or dies before it could (SIGKILL right after
    the copy); then this removes it. True when it removed it."""
    def the_filled_file(current: os.stat_result) -> bool:
        return (current.st_dev, current.st_ino) == (info.st_dev, info.st_ino)

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        outcome = _remove_if_unlocked(str(path), the_filled_file)
        if outcome is not False:  # removed, or gone (placed by dfget) or another file by now
            return outcome is True
        if not _same_file(str(path), info):
            return False
        await asyncio.sleep(interval)
    return False


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


# --- the daemon side --------------------------------------------------------------------------


def copy_into(source: Path, output: Path, stop: threading.Event) -> os.stat_result:
    """Copy `source` into the client's file `output` (runs in a thread of the daemon).

    The file is opened as :func:`open_client_file` says. When `stop` is set, or the copy fails,
    what was written is removed and the exception raised: no partial copy is left. Returns the
    file's identity (to remove it should the client be gone by then).
    """
    fd, info = open_client_file(output)
    try:
        with open(source, "rb") as src:
            copier = _RegionCopier(src.fileno(), fd, stop)
            try:
                copier.copy(0, os.fstat(src.fileno()).st_size)
            finally:
                copier.close()
    except BaseException:
        _remove_if_same(output, info)
        raise
    finally:
        os.close(fd)
    return info


def open_client_file(output: Path) -> tuple[int, os.stat_result]:
    """Open the client's file `output` for the daemon to write, emptied; its descriptor and identity.

    The file is opened without following a symlink and without blocking on a FIFO; it must be a
    regular file with a single link (writing through a hard link could change another file).
    It is created when missing (clients that name FILE itself).
    """
    base = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    _check_directory_path(output.parent)
    try:
        try:
            fd = os.open(output, base)
        except FileNotFoundError:
            new_file_owner = _new_file_owner(output)
            fd = os.open(output, base | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
            if new_file_owner is not None:
                os.fchown(fd, *new_file_owner)
        else:
            if not is_temp_name(output.name):
                os.close(fd)
                raise InvalidRequest(f"output path {output} exists and is not a dfget temporary file: the daemon "
                                     "writes only into a file dfget created for it, or a new file")
    except PermissionError:
        raise InvalidRequest(f"the dfdaemon (uid {os.geteuid()}) may not write {output}: run dfget as "
                             "the daemon's user, or the daemon as root") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidRequest(f"output path {output} is a symbolic link; give the real path") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"output path {output} is not a regular file")
        if info.st_nlink != 1:
            raise InvalidRequest(f"output path {output} has {info.st_nlink} hard links; remove the others")
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _check_directory_path(directory: Path) -> None:
    """Refuse a directory path through a symlink that a user (not root) could have planted."""
    current = Path(directory.anchor)
    for part in directory.parts[1:]:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise InvalidRequest(f"output directory {directory} does not exist") from None
        if stat.S_ISLNK(info.st_mode) and info.st_uid != 0:
            raise InvalidRequest(f"output directory {directory} goes through {current}, a symbolic link of uid "
                                 f"{info.st_uid}; give the real path")


def _new_file_owner(output: Path) -> tuple[int, int] | None:
    """Who a new output file created by a root daemon belongs to: the owner of its directory.

    A root daemon does not create files in a root-owned directory for a client it cannot identify
    (``/etc/cron.d/x`` would be root's file with the client's bytes): there the client creates
    the file itself, as dfget does. None when the daemon is not root (the file is then its own).
    """
    if os.geteuid() != 0:
        return None
    info = os.stat(output.parent)
    if info.st_uid == 0:
        raise InvalidRequest(f"output directory {output.parent} belongs to root: the dfdaemon runs as root and "
                             "creates no new file there; create the file first (dfget does) or use another "
                             "directory")
    return info.st_uid, info.st_gid


def _check_stop(stop: threading.Event, offset: int, size: int) -> None:
    if stop.is_set():
        raise DownloadFailed(f"the client went away after {offset} of {size} bytes were copied")


# O_DIRECT transfers are whole multiples of this (any block device's logical block divides it).
DIRECT_ALIGN = 4096


def _copy_range_direct(src_fd: int, direct_fd: int, start: int, end: int, buffer: mmap.mmap,
                       stop: threading.Event) -> int:
    """Copy [start, end) (both block-aligned) into `direct_fd`, opened ``O_DIRECT``, through the
    page-aligned `buffer`; where it got to (short of `end` when the source is shorter or the file
    system refuses direct writes after all: the caller copies the rest another way)."""
    offset = start
    while offset < end:
        _check_stop(stop, offset, end)
        read = os.preadv(src_fd, [memoryview(buffer)[:min(len(buffer), end - offset)]], offset)
        whole = read - read % DIRECT_ALIGN  # a short read (the file shrank) stops direct there
        if whole == 0:
            break
        try:
            written = os.pwritev(direct_fd, [memoryview(buffer)[:whole]], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or offset != start:
                raise
            break  # accepted at open but not at write (some FUSE and overlay set-ups)
        offset += written
        if written < whole:
            break
    return offset


def _copy_range(src_fd: int, fd: int, start: int, end: int, stop: threading.Event) -> None:
    """Copy [start, end) of the source into `fd` in the kernel (``copy_file_range``, else
    ``sendfile``)."""
    offset = start
    while offset < end:
        _check_stop(stop, offset, end)
        step = min(COPY_STEP, end - offset)
        try:
            copied = os.copy_file_range(src_fd, fd, step, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = os.sendfile(fd, src_fd, offset, step)
        if copied == 0:
            raise DownloadFailed(f"the cached content ends at {offset}, before {end}")
        offset += copied


class _RegionCopier:
    """Copies regions of the cache's content file into the client's file (in a worker thread).

    The node's cache already holds these bytes in memory; a second cached copy would double the
    memory a download takes (a 5 GB image: 10 GB of page cache), and on a VM that returns free
    memory to its host new page cache is the dearest part of a copy (docs/benchmarks.md: 0.7
    CPU-s per 256 MiB through the page cache, 0.05 around it). So block-aligned parts are written
    around the page cache (``O_DIRECT``, through a page-aligned buffer), and the rest in the
    kernel (``copy_file_range``), as is everything where the file system takes no direct writes.
    """

    def __init__(self, source_fd: int, fd: int, stop: threading.Event) -> None:
        self._source_fd = source_fd
        self._fd = fd
        self._stop = stop
        try:  # a second open file description: O_DIRECT on it leaves `fd` as it is
            self._direct_fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            self._direct_fd = -1  # no /proc, or no direct writes here
        self._buffer: mmap.mmap | None = None

    def copy(self, start: int, end: int) -> None:
        """Copy [start, end) of the content."""
        offset = start
        if self._direct_fd >= 0 and start % DIRECT_ALIGN == 0 and end - start >= DIRECT_ALIGN:
            if self._buffer is None:
                self._buffer = mmap.mmap(-1, COPY_STEP)
            offset = _copy_range_direct(self._source_fd, self._direct_fd, start, end - (end - start) % DIRECT_ALIGN,
                                        self._buffer, self._stop)
            if offset == start:
                os.close(self._direct_fd)  # refused: in the kernel from now on
                self._direct_fd = -1
        _copy_range(self._source_fd, self._fd, offset, end, self._stop)

    def close(self) -> None:
        """Close what the copier opened (not the two files it was given)."""
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


class OutputFill:
    """The client's file, filled piece by piece while the download runs (the daemon's side).

    A piece is copied in as soon as the cache has it, so the end of a download waits for the last
    pieces only, not for a copy of the whole content (sixteen nodes finishing a 256 MiB download
    at once on the swarm bench spent 2.7 s on it). The file is opened as :func:`open_client_file`
    says, before the download's bytes; regions are copied by :class:`_RegionCopier`. One thread
    copies at a time. :meth:`finish` returns the file's identity;
    :meth:`discard` stops and removes what was written (the client went away, the download
    failed).
    """

    def __init__(self, output: Path, source: Path | None = None) -> None:
        self.output = output
        self.source = source  # the cache's content file: set before the first add()
        self.info: os.stat_result | None = None
        self._fd = -1
        self._source_fd = -1
        self._copier: _RegionCopier | None = None  # made with the first copy
        self._pending: list[tuple[int, int]] = []
        self._copying: asyncio.Future[None] | None = None
        self._stop = threading.Event()

    async def open(self) -> None:
        """Open (or create) the client's file, with every check; raises InvalidRequest."""
        self._fd, self.info = await asyncio.to_thread(open_client_file, self.output)

    def add(self, offset: int, length: int) -> None:
        """Copy this region of the content in, soon (in the background)."""
        self._pending.append((offset, length))
        if self._copying is None or self._copying.done():
            self._copying = asyncio.ensure_future(self._drain())

    async def finish(self, size: int) -> os.stat_result:
        """Wait for the copies, set the file's length to `size`, close it; its identity."""
        while self._copying is not None and not self._copying.done():
            await asyncio.shield(self._copying)
        if self._copying is not None:
            self._copying.result()  # a failed copy fails the download
        await asyncio.to_thread(os.ftruncate, self._fd, size)
        assert self.info is not None
        self._close()
        return self.info

    async def discard(self) -> None:
        """Stop copying, remove what was written and close the file (once no thread uses it)."""
        self._stop.set()
        self._pending.clear()
        copying = self._copying
        if copying is not None and not copying.done():
            with contextlib.suppress(BaseException):  # cancelled again: the callback closes
                await asyncio.shield(copying)
        if self.info is not None:
            _remove_if_same(self.output, self.info)
        if copying is not None and not copying.done():
            copying.add_done_callback(self._close_after)
        else:
            if copying is not None and not copying.cancelled():
                copying.exception()  # retrieved: the failure is the download's, reported already
            self._close()

    def _close_after(self, copying: asyncio.Future[None]) -> None:
        if not copying.cancelled():
            copying.exception()
        self._close()

    async def _drain(self) -> None:
        while self._pending:
            regions, self._pending = self._pending, []
            await asyncio.to_thread(self._copy_regions, regions)

    def _copy_regions(self, regions: list[tuple[int, int]]) -> None:
        if self._copier is None:
            assert self.source is not None, "add() before the source is known"
            self._source_fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
            self._copier = _RegionCopier(self._source_fd, self._fd, self._stop)
        for start, length in regions:
            self._copier.copy(start, start + length)

    def _close(self) -> None:
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        for fd in (self._fd, self._source_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._source_fd = -1


def _remove_if_same(path: Path, info: os.stat_result) -> None:
    with contextlib.suppress(OSError):
        if _same_file(str(path), info):
            os.unlink(path)


def _same_file(path: str, info: os.stat_result) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)
