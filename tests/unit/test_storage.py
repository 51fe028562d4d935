"""PieceStore / LocalTask: pieces on disk, digests, restart, waiting, deletion."""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.digest import piece_digest
from common.errors import (
    DiskFull,
    DownloadFailed,
    InvalidRequest,
    OriginError,
    ParentError,
    PieceDigestMismatch,
    StorageError,
    TaskNotFound,
)
from common.pieces import piece_span
from peer.metrics import DaemonMetrics
from peer.storage.store import LocalTask, PieceStore, _DropBehind
from tests.support.page_cache import drops_cached_pages, resident_pages

TASK = "ab" + "c" * 62
OTHER = "0" * 64
PIECE = 64 * 1024
DEADLINE = 5.0


def content_bytes(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating test content."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def chunks_of(data: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def piece_bytes(data: bytes, number: int, piece_length: int = PIECE) -> bytes:
    span = piece_span(number, len(data), piece_length)
    return data[span.offset : span.end]


def new_task(store: PieceStore, data: bytes, piece_length: int = PIECE, task_id: str = TASK) -> LocalTask:
    task = store.create(task_id, url="http://origin.test/blob", tag="t", application="app")
    task.set_content_info(len(data), piece_length, {"Content-Type": "application/octet-stream"})
    return task


async def write_all(task: LocalTask, data: bytes, piece_length: int = PIECE) -> None:
    for number in range(task.piece_count):
        piece = piece_bytes(data, number, piece_length)
        await task.write_piece(number, chunks_of(piece), expected_digest=piece_digest(piece))


@pytest.fixture
def store(tmp_path: Path) -> PieceStore:
    s = PieceStore(tmp_path, metrics=DaemonMetrics())
    s.load()
    return s


async def test_write_pieces_and_read_back(store: PieceStore) -> None:
    data = content_bytes(5 * PIECE + 123)
    task = new_task(store, data)
    assert task.piece_count == 6
    assert task.content_path.stat().st_size == len(data)  # sized up front
    # out of order, last (short) piece first
    for number in (5, 2, 0, 4, 1, 3):
        piece = piece_bytes(data, number)
        digest = await task.write_piece(number, chunks_of(piece, 10_000))
        assert digest == piece_digest(piece)
        assert task.piece_digest(number) == digest
    assert task.is_complete()
    assert task.finished_pieces() == [0, 1, 2, 3, 4, 5]
    assert hashlib.sha256(task.content_path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert store.used_bytes() == len(data) == task.used_bytes
    assert store.metrics is not None
    assert store.metrics.cache_used._value.get() == len(data)


async def test_big_chunks_go_through_threads(store: PieceStore) -> None:
    piece_length = 1024 * 1024
    data = content_bytes(2 * piece_length + 5)
    task = new_task(store, data, piece_length)
    for number in range(task.piece_count):
        piece = piece_bytes(data, number, piece_length)
        await task.write_piece(number, chunks_of(piece, 512 * 1024))
    assert task.content_path.read_bytes() == data


async def test_digest_mismatch_leaves_piece_incomplete(store: PieceStore) -> None:
    data = content_bytes(2 * PIECE)
    task = new_task(store, data)
    piece = piece_bytes(data, 0)
    wrong = piece_digest(b"something else")
    with pytest.raises(PieceDigestMismatch) as info:
        await task.write_piece(0, chunks_of(piece), expected_digest=wrong, parent_id="parent-1")
    assert info.value.parent_id == "parent-1"
    assert info.value.expected == wrong
    assert not task.has_piece(0)
    assert task.piece_digest(0) is None
    assert store.used_bytes() == 0
    # a later good write succeeds
    good = await task.write_piece(0, chunks_of(piece), expected_digest=piece_digest(piece))
    assert good == piece_digest(piece)
    assert task.has_piece(0)


async def test_wrong_length_is_rejected_without_touching_neighbours(store: PieceStore) -> None:
    data = content_bytes(3 * PIECE)
    task = new_task(store, data)
    await task.write_piece(1, chunks_of(piece_bytes(data, 1)))
    too_long = piece_bytes(data, 0) + b"X" * 100
    with pytest.raises(ParentError, match="more than"):
        await task.write_piece(0, chunks_of(too_long), parent_id="p")
    with pytest.raises(OriginError, match="bytes instead of"):
        await task.write_piece(0, chunks_of(piece_bytes(data, 0)[:-1]))
    assert not task.has_piece(0)
    assert task.content_path.read_bytes()[PIECE : 2 * PIECE] == piece_bytes(data, 1)


async def test_already_complete_piece_is_not_rewritten(store: PieceStore) -> None:
    data = content_bytes(PIECE)
    task = new_task(store, data)
    first = await task.write_piece(0, chunks_of(data))

    async def must_not_be_read() -> AsyncIterator[bytes]:
        raise AssertionError("chunks consumed for a complete piece")
        yield b""  # pragma: no cover

    assert await task.write_piece(0, must_not_be_read()) == first


async def test_concurrent_writes_of_one_piece(store: PieceStore) -> None:
    data = content_bytes(2 * PIECE)
    task = new_task(store, data)
    piece = piece_bytes(data, 0)
    first_started = asyncio.Event()
    release_first = asyncio.Event()
    second_read = False

    async def gated() -> AsyncIterator[bytes]:
        yield piece[:1000]
        first_started.set()
        await release_first.wait()
        yield piece[1000:]

    async def second_chunks() -> AsyncIterator[bytes]:
        nonlocal second_read
        second_read = True
        yield piece

    first = asyncio.create_task(task.write_piece(0, gated()))
    await asyncio.wait_for(first_started.wait(), DEADLINE)
    second = asyncio.create_task(task.write_piece(0, second_chunks()))
    await asyncio.sleep(0)  # let the second writer reach the piece lock
    assert not second.done()
    release_first.set()
    digests = await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)
    assert list(digests) == [piece_digest(piece)] * 2
    assert not second_read  # it waited and found the piece complete
    assert store.used_bytes() == PIECE


async def test_second_writer_retries_after_first_fails(store: PieceStore) -> None:
    data = content_bytes(PIECE)
    task = new_task(store, data)
    results = await asyncio.gather(
        task.write_piece(0, chunks_of(data), expected_digest=piece_digest(b"bad")),
        task.write_piece(0, chunks_of(data), expected_digest=piece_digest(data)),
        return_exceptions=True,
    )
    assert isinstance(results[0], PieceDigestMismatch)
    assert results[1] == piece_digest(data)
    assert task.has_piece(0)


async def test_restart_keeps_complete_pieces_and_forgets_interrupted_ones(tmp_path: Path) -> None:
    data = content_bytes(4 * PIECE)
    store = PieceStore(tmp_path)
    store.load()
    task = new_task(store, data)
    await task.write_piece(0, chunks_of(piece_bytes(data, 0)))
    await task.write_piece(2, chunks_of(piece_bytes(data, 2)))

    # an interrupted transfer: half the bytes hit the file, then the connection broke
    class Broken(Exception):
        pass

    async def breaks_midway() -> AsyncIterator[bytes]:
        yield piece_bytes(data, 1)[: PIECE // 2]
        raise Broken

    with pytest.raises(Broken):
        await task.write_piece(1, breaks_midway())
    # a crash after the data of piece 3 was written but before its metadata was updated
    fd = os.open(task.content_path, os.O_WRONLY)
    os.pwrite(fd, piece_bytes(data, 3), 3 * PIECE)
    os.close(fd)

    again = PieceStore(tmp_path, metrics=DaemonMetrics())
    again.load()
    reloaded = again.require(TASK)
    assert reloaded.url == "http://origin.test/blob"
    assert (reloaded.tag, reloaded.application) == ("t", "app")
    assert reloaded.content_length == len(data) and reloaded.piece_length == PIECE
    assert reloaded.response_headers == {"Content-Type": "application/octet-stream"}
    assert reloaded.finished_pieces() == [0, 2]
    assert reloaded.piece_digest(2) == piece_digest(piece_bytes(data, 2))
    assert reloaded.state == "pending"  # it was running; nobody runs it after a restart
    assert again.used_bytes() == 2 * PIECE
    # the download resumes with the missing pieces
    await reloaded.write_piece(1, chunks_of(piece_bytes(data, 1)))
    await reloaded.write_piece(3, chunks_of(piece_bytes(data, 3)))
    reloaded.mark_succeeded()
    assert reloaded.content_path.read_bytes() == data

    third = PieceStore(tmp_path)
    third.load()
    assert third.require(TASK).state == "succeeded"
    assert third.require(TASK).is_complete()


async def test_restart_skips_unreadable_metadata(tmp_path: Path) -> None:
    store = PieceStore(tmp_path)
    store.load()
    data = content_bytes(PIECE)
    await write_all(new_task(store, data), data)
    broken = new_task(store, data, task_id=OTHER)
    broken.metadata_path.write_bytes(b"\xc1 not msgpack")

    again = PieceStore(tmp_path)
    again.load()  # does not raise
    assert again.get(OTHER) is None
    assert again.require(TASK).is_complete()


async def test_failed_state_and_reason_survive_restart(tmp_path: Path) -> None:
    store = PieceStore(tmp_path)
    store.load()
    task = store.create(TASK, url="http://origin.test/x", digest="sha256:" + "1" * 64)
    task.mark_failed("origin said 500")
    again = PieceStore(tmp_path)
    again.load()
    reloaded = again.require(TASK)
    assert reloaded.state == "failed" and reloaded.failure_reason == "origin said 500"
    assert reloaded.digest == "sha256:" + "1" * 64
    assert reloaded.content_length is None


async def test_create_returns_existing_and_validates_ids(store: PieceStore, tmp_path: Path) -> None:
    task = store.create(TASK, url="http://a/")
    assert store.create(TASK, url="http://other/") is task
    assert store.tasks() == [task]
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63, "", "a" * 63 + "/"):
        with pytest.raises(InvalidRequest):
            store.create(bad, url="http://a/")
    assert store.get("nope") is None
    with pytest.raises(TaskNotFound):
        store.require(OTHER)
    assert task.directory == tmp_path / "tasks" / TASK[:3] / TASK


async def test_content_info_is_idempotent_and_conflicts_raise(store: PieceStore) -> None:
    task = store.create(TASK, url="http://a/")
    with pytest.raises(StorageError):
        _ = task.piece_count
    task.set_content_info(1000, PIECE, {})
    task.set_content_info(1000, PIECE, {"X": "y"})
    with pytest.raises(StorageError, match="conflict"):
        task.set_content_info(1001, PIECE, {})
    with pytest.raises(InvalidRequest):
        task.span(1)
    assert task.span(0).length == 1000


async def test_subscribe_yields_existing_then_new_and_ends(store: PieceStore) -> None:
    data = content_bytes(4 * PIECE)
    task = new_task(store, data)
    await task.write_piece(3, chunks_of(piece_bytes(data, 3)))
    await task.write_piece(1, chunks_of(piece_bytes(data, 1)))
    seen: list[int] = []
    got_two = asyncio.Event()

    async def consume() -> None:
        async for number in task.subscribe():
            seen.append(number)
            if len(seen) == 2:
                got_two.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(got_two.wait(), DEADLINE)
    assert seen == [1, 3]
    await task.write_piece(2, chunks_of(piece_bytes(data, 2)))
    await task.write_piece(0, chunks_of(piece_bytes(data, 0)))
    await asyncio.wait_for(consumer, DEADLINE)  # ends by itself once all pieces are there
    assert seen == [1, 3, 2, 0]


async def test_subscribe_and_waiters_fail_with_the_task(store: PieceStore) -> None:
    data = content_bytes(2 * PIECE)
    task = new_task(store, data)
    await task.write_piece(0, chunks_of(piece_bytes(data, 0)))
    seen: list[int] = []

    async def consume() -> None:
        async for number in task.subscribe():
            seen.append(number)

    consumer = asyncio.create_task(consume())
    waiter = asyncio.create_task(task.wait_for_piece(1))
    await asyncio.sleep(0)
    task.mark_failed("no parent")
    with pytest.raises(DownloadFailed, match="no parent"):
        await asyncio.wait_for(consumer, DEADLINE)
    with pytest.raises(DownloadFailed):
        await asyncio.wait_for(waiter, DEADLINE)
    assert seen == [0]
    await task.wait_for_piece(0)  # a complete piece is still fine
    task.mark_running()  # a retry
    await task.write_piece(1, chunks_of(piece_bytes(data, 1)))
    task.mark_succeeded()
    with pytest.raises(StorageError, match="illegal"):
        task.mark_failed("too late")


async def test_delete_wakes_waiters_and_removes_files(store: PieceStore) -> None:
    data = content_bytes(2 * PIECE)
    task = new_task(store, data)
    await task.write_piece(0, chunks_of(piece_bytes(data, 0)))
    waiter = asyncio.create_task(task.wait_for_piece(1))
    subscriber_done = asyncio.Event()
    subscriber_error: list[BaseException] = []

    async def consume() -> None:
        try:
            async for _ in task.subscribe():
                pass
        except TaskNotFound as exc:
            subscriber_error.append(exc)
        subscriber_done.set()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await store.delete(TASK)
    with pytest.raises(TaskNotFound):
        await asyncio.wait_for(waiter, DEADLINE)
    await asyncio.wait_for(subscriber_done.wait(), DEADLINE)
    await consumer
    assert subscriber_error
    assert not task.directory.exists()
    assert store.get(TASK) is None
    assert store.used_bytes() == 0
    with pytest.raises(TaskNotFound):
        await task.write_piece(1, chunks_of(piece_bytes(data, 1)))
    # the id can be used again
    fresh = new_task(store, data)
    assert fresh is not task and fresh.finished_pieces() == []


async def test_delete_during_write_does_not_resurrect_files(store: PieceStore) -> None:
    data = content_bytes(PIECE)
    task = new_task(store, data)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield data[:100]
        started.set()
        await release.wait()
        yield data[100:]

    writer = asyncio.create_task(task.write_piece(0, slow()))
    await asyncio.wait_for(started.wait(), DEADLINE)
    await store.delete(TASK)
    release.set()
    with pytest.raises(TaskNotFound):
        await asyncio.wait_for(writer, DEADLINE)
    assert not task.directory.exists()


async def test_wait_for_piece(store: PieceStore) -> None:
    data = content_bytes(2 * PIECE)
    task = new_task(store, data)
    waiter = asyncio.create_task(task.wait_for_piece(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    await task.write_piece(1, chunks_of(piece_bytes(data, 1)))
    await asyncio.wait_for(waiter, DEADLINE)
    with pytest.raises(TimeoutError):
        await task.wait_for_piece(0, timeout=0.01)
    with pytest.raises(InvalidRequest):
        await task.wait_for_piece(7)


async def test_empty_content(store: PieceStore) -> None:
    task = new_task(store, b"")
    assert task.piece_count == 0 and task.is_complete()
    assert [n async for n in task.subscribe()] == []
    task.mark_succeeded()


async def test_mark_succeeded_requires_all_pieces(store: PieceStore) -> None:
    data = content_bytes(2 * PIECE)
    task = new_task(store, data)
    await task.write_piece(0, chunks_of(piece_bytes(data, 0)))
    with pytest.raises(StorageError, match="1 of 2"):
        task.mark_succeeded()


async def test_reader_and_touch(tmp_path: Path) -> None:
    from common.clock import ManualClock

    clock = ManualClock()
    store = PieceStore(tmp_path, clock=clock)
    store.load()
    task = store.create(TASK, url="http://a/")
    clock.advance(10)
    task.touch()
    assert task.last_access == clock.time()
    with task.reader():
        with task.reader():
            assert task.readers == 2
        assert task.readers == 1
    assert task.readers == 0


async def test_disk_full_is_translated(store: PieceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    data = content_bytes(PIECE)
    task = new_task(store, data)

    def no_space(fd: int, data: object, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", no_space)
    with pytest.raises(DiskFull, match="no space left"):
        await task.write_piece(0, chunks_of(data))
    assert not task.has_piece(0)


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of a file in place."""
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


async def test_scrub_drops_pieces_changed_on_disk(tmp_path: Path) -> None:
    data = content_bytes(4 * PIECE)
    store = PieceStore(tmp_path)
    task = new_task(store, data)
    await write_all(task, data)
    task.mark_succeeded()
    flip_byte(task.content_path, 2 * PIECE + 17)  # behind the store's back; then restart and scrub
    restarted = PieceStore(tmp_path)
    restarted.load()
    again = restarted.require(TASK)
    assert again.has_piece(2)  # not known yet: only the scrub reads the bytes
    assert await restarted.verify_all() == 1
    assert not again.has_piece(2)
    assert again.finished_pieces() == [0, 1, 3]
    assert again.state == "pending"
    assert restarted.used_bytes() == 3 * PIECE
    # the verdict is persisted: a second restart does not bring the corrupt piece back
    third = PieceStore(tmp_path)
    third.load()
    assert third.require(TASK).finished_pieces() == [0, 1, 3]
    assert await third.verify_all() == 0


# ---- the page cache: a task's latest pieces only ----------------------------------------------


def test_drop_behind_keeps_the_latest_window_of_pieces() -> None:
    window = _DropBehind(30)
    for offset in (0, 10, 20):
        assert window.completed(offset, 10) == []
    assert window.completed(30, 10) == [(0, 10)]
    assert window.completed(40, 10) == [(10, 10)]  # oldest first, once each
    assert window.completed(50, 5) == [(20, 10)]  # 25 bytes left in the window
    assert window.is_old(0) and not window.is_old(40)


def test_drop_behind_with_no_window_keeps_everything() -> None:
    window = _DropBehind(0)
    for offset in range(0, 100, 10):
        assert window.completed(offset, 10) == []
    assert not window.is_old(0)


@pytest.mark.parametrize("window_pieces", [2, 0])
async def test_old_pieces_leave_the_page_cache_and_stay_on_disk(tmp_path: Path, window_pieces: int) -> None:
    if not drops_cached_pages(tmp_path):
        pytest.skip("this file system keeps clean pages in memory whatever it is advised")
    store = PieceStore(tmp_path, metrics=DaemonMetrics(), page_cache_window=window_pieces * PIECE)
    store.load()
    data = content_bytes(8 * PIECE)
    task = new_task(store, data)
    await write_all(task, data)
    pages_per_piece = PIECE // mmap.PAGESIZE
    resident = resident_pages(task.content_path)
    if window_pieces:
        assert resident <= window_pieces * pages_per_piece  # 8 pieces written, the last 2 kept
    else:
        assert resident == 8 * pages_per_piece
    assert hashlib.sha256(task.content_path.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_an_old_piece_sent_to_a_child_leaves_the_page_cache_again(tmp_path: Path) -> None:
    if not drops_cached_pages(tmp_path):
        pytest.skip("this file system keeps clean pages in memory whatever it is advised")
    store = PieceStore(tmp_path, metrics=DaemonMetrics(), page_cache_window=2 * PIECE)
    store.load()
    data = content_bytes(4 * PIECE)
    task = new_task(store, data)
    await write_all(task, data)
    with open(task.content_path, "rb") as file:  # noqa: ASYNC230 - a test's small read
        assert os.pread(file.fileno(), PIECE, 0) == piece_bytes(data, 0)  # read back from disk
        before = resident_pages(task.content_path)
        task.after_upload(file.fileno(), task.span(0))  # old: dropped again
        after_old = resident_pages(task.content_path)
        task.after_upload(file.fileno(), task.span(3))  # among the latest: kept
        after_recent = resident_pages(task.content_path)
    pages_per_piece = PIECE // mmap.PAGESIZE
    assert before - after_old == pages_per_piece
    assert after_recent == after_old


async def test_the_content_digest_leaves_old_pieces_out_of_the_page_cache(tmp_path: Path) -> None:
    if not drops_cached_pages(tmp_path):
        pytest.skip("this file system keeps clean pages in memory whatever it is advised")
    store = PieceStore(tmp_path, metrics=DaemonMetrics(), page_cache_window=2 * PIECE)
    store.load()
    data = content_bytes(8 * PIECE + 1000)  # a short last piece
    task = new_task(store, data)
    await write_all(task, data)
    assert await asyncio.to_thread(task.content_digest, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    # what the check read of the 7 older pieces went out again; the 2 latest stay
    assert resident_pages(task.content_path) <= 2 * (PIECE // mmap.PAGESIZE) + 1
