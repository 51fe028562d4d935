"""The dfdaemon's side of a dfget's output file (:mod:`peer.dfget_output` tells who does what):
filling the client's temporary file, and removing it when its dfget died before moving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import stat
import threading
import time
from pathlib import Path

from common.errors import DownloadFailed, InvalidRequest
from peer.dfget_output import NEW_FILE_MODE, is_temp_name, remove_if_unlocked, same_file

# After the daemon filled a dfget's temporary file it checks this often whether that dfget still
# holds it (and gives up after ABANDONED_WATCH: a dfget alive that long moves it itself).
ABANDONED_POLL = 0.2
ABANDONED_WATCH = 3600.0
# The daemon copies in steps of this size so that a client that goes away stops it soon.
COPY_STEP = 8 << 20


async def remove_when_abandoned(path: Path, info: os.stat_result, *, interval: float = ABANDONED_POLL,
                                limit: float = ABANDONED_WATCH) -> bool:
    """Watch dfget's temporary file `path` (the file `info` describes) after the daemon filled it:
    the dfget that holds its lock moves it onto FILE, or dies before it could (SIGKILL right after
    the copy); then this removes it. True when it removed it."""
    def the_filled_file(current: os.stat_result) -> bool:
        return (current.st_dev, current.st_ino) == (info.st_dev, info.st_ino)

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        outcome = remove_if_unlocked(str(path), the_filled_file)
        if outcome is not False:  # removed, or gone (placed by dfget) or another file by now
            return outcome is True
        if not same_file(str(path), info):
            return False
        await asyncio.sleep(interval)
    return False


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
        if same_file(str(path), info):
            os.unlink(path)
