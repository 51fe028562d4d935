"""DownloadRequest: what every entry point (dfget, proxy, seed trigger) hands the engine."""

from __future__ import annotations

import pytest

from common.download import DownloadRequest
from common.errors import InvalidRequest
from common.pieces import MIB

BLOB = "sha256:" + "ab" * 32
URL = f"http://registry.test/v2/library/python/blobs/{BLOB}"
SIZE = 10 * MIB + 5
PIECE = 4 * MIB  # 3 pieces: [0, 4), [4, 8), [8, 10 MiB + 5)


@pytest.mark.parametrize(("byte_range", "pieces"), [
    (None, [0, 1, 2]),
    ((0, 1), [0]),
    ((PIECE - 1, 2), [0, 1]),  # straddles a piece boundary
    ((PIECE, PIECE), [1]),
    ((5 * MIB, None), [1, 2]),  # open-ended
    ((-1, None), [2]),  # the last byte
    ((-SIZE * 2, None), [0, 1, 2]),  # a suffix longer than the content is all of it
    ((SIZE - 1, 100), [2]),  # clamped at the end
    ((SIZE, 10), []),  # nothing past the end
])
def test_covering_pieces(byte_range: tuple[int, int | None] | None, pieces: list[int]) -> None:
    request = DownloadRequest(url=URL, byte_range=byte_range)
    assert list(request.covering_pieces(SIZE, PIECE)) == pieces


def test_blob_digest_defines_the_content_not_a_clients_wrong_digest() -> None:
    wrong = "sha256:" + "cd" * 32
    assert DownloadRequest(url=URL, digest=wrong).content_digest == BLOB
    plain = "http://files.test/data.bin"
    assert DownloadRequest(url=plain, digest=wrong).content_digest == wrong
    assert DownloadRequest(url=plain).content_digest is None


def test_same_blob_in_two_repositories_is_one_task() -> None:
    other = f"http://registry.test/v2/team/python/blobs/{BLOB}"
    assert DownloadRequest(url=URL).task_id == DownloadRequest(url=other).task_id
    # Another registry's copy is another task (a cached blob is served only for its own registry).
    mirror = f"https://mirror.test/v2/team/python/blobs/{BLOB}"
    assert DownloadRequest(url=URL).task_id != DownloadRequest(url=mirror).task_id
    assert DownloadRequest(url=URL).task_id != DownloadRequest(url=URL, tag="t").task_id


def test_round_trip_through_the_dragonfly_message() -> None:
    request = DownloadRequest(
        url=URL, digest=BLOB, tag="t", application="app", priority=3, filtered_query_params=("sig",),
        request_header={"Authorization": "Basic eA=="}, piece_length=8 * MIB, disable_back_to_source=True,
        need_back_to_source=True, timeout=90.0,
    )
    again = DownloadRequest.from_proto(request.to_proto())
    assert again == request


@pytest.mark.parametrize(("url", "digest"), [
    ("ftp://x/y", ""),
    ("not a url", ""),
    ("http://[::1/x", ""),
    (URL, "sha256:short"),
    (URL, "md5:" + "a" * 32),
])
def test_bad_urls_and_digests_are_refused_up_front(url: str, digest: str) -> None:
    with pytest.raises(InvalidRequest):
        DownloadRequest(url=url, digest=digest)
