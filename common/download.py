"""What a client asked for, in the one form every entry point shares (dfget, the proxy, a seed
trigger the scheduler sends), and its one mapping to and from Dragonfly's `common.v2.Download`.

It lives in `common` because both sides speak it: a dfdaemon reads it from dfget and from the
scheduler's seed triggers and sends it when it registers; the scheduler builds one to trigger a
seed (and reads a registration into its own `DownloadSpec`, the one conversion it needs).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import cast

from dragonfly_api import common_pb2
from google.protobuf import duration_pb2

from common import ids
from common.digest import parse_digest
from common.errors import InvalidRequest
from common.pieces import DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH, piece_count, pieces_covering

# Priorities are Dragonfly's LEVEL0 .. LEVEL6 (`common.v2.Priority`).
MAX_PRIORITY = 6


class Priority(IntEnum):
    """Dragonfly's ``common.v2.Priority``: what the scheduler may do for a task no peer has yet."""

    LEVEL0 = 0  # unset: like LEVEL6
    LEVEL1 = 1  # forbidden: the download is refused
    LEVEL2 = 2  # peers only: refused rather than fetched from the origin
    LEVEL3 = 3  # this peer fetches the task from the origin itself
    LEVEL4 = 4  # a seed fetches it (weak seed in Dragonfly); without a seed, this peer
    LEVEL5 = 5  # the same (strong seed)
    LEVEL6 = 6  # the same (super seed); dfget's default


@dataclass(frozen=True)
class DownloadRequest:
    """What a client asked for, in the form every entry point (dfget, proxy, seed trigger) shares."""

    url: str
    digest: str = ""
    tag: str = ""
    application: str = ""
    priority: int = 0
    filtered_query_params: tuple[str, ...] = ()
    request_header: Mapping[str, str] = field(default_factory=dict)
    piece_length: int | None = None
    disable_back_to_source: bool = False
    need_back_to_source: bool = False
    timeout: float | None = None
    # A Range read: (start, length), length None for "to the end"; a negative start -N means
    # the last N bytes. With prefetch off only the pieces covering it are fetched.
    byte_range: tuple[int, int | None] | None = None
    prefetch: bool = True

    def __post_init__(self) -> None:
        ids.validate_url(self.url)
        if self.digest:
            parse_digest(self.digest)
        # A client's piece length shapes the task for everyone: keep it within what storage expects.
        if self.piece_length is not None and not DEFAULT_MIN_PIECE_LENGTH <= self.piece_length <= MAX_PIECE_LENGTH:
            raise InvalidRequest(f"piece length {self.piece_length} is outside "
                                 f"{DEFAULT_MIN_PIECE_LENGTH} .. {MAX_PIECE_LENGTH} bytes (4 MiB .. 64 MiB)")

    @property
    def task_id(self) -> str:
        """The task id (OCI blobs: from the blob digest)."""
        return ids.task_id(self.url, tag=self.tag, application=self.application,
                           filtered_query_params=self.filtered_query_params, piece_length=self.piece_length)

    @property
    def content_digest(self) -> str | None:
        """The digest that defines the content: an OCI blob's own, else the requested one.

        A blob URL names its digest, so a wrong ``--digest`` from one client cannot make the
        node discard a good blob; that client's request fails alone (Engine.check_digest).
        """
        blob = ids.parse_oci_blob_url(self.url)
        if blob is not None:
            return blob.digest
        return self.digest.lower() or None

    def covering_pieces(self, content_length: int, piece_length: int) -> range:
        """Piece numbers that hold the requested range (all of them without a range)."""
        if self.byte_range is None:
            return range(piece_count(content_length, piece_length))
        start, length = self.byte_range
        if start < 0:
            start, length = max(0, content_length + start), None
        end = content_length if length is None else min(content_length, start + length)
        return pieces_covering(start, end - start, content_length, piece_length)

    def to_proto(self) -> common_pb2.Download:
        """As the Dragonfly `common.v2.Download` message."""
        download = common_pb2.Download(
            url=self.url, digest=self.digest, tag=self.tag, application=self.application,
            priority=cast(common_pb2.Priority, self.priority), filtered_query_params=list(self.filtered_query_params),
            request_header=dict(self.request_header), disable_back_to_source=self.disable_back_to_source,
            need_back_to_source=self.need_back_to_source,
        )
        if self.piece_length:
            download.piece_length = self.piece_length
        if self.byte_range is not None:
            # A closed range as it is; a suffix or open one only as "a Range read" (0, 0): the
            # scheduler needs to know the read is lazy, not where it lies.
            start, length = self.byte_range
            if start < 0 or length is None:
                start, length = 0, 0
            download.range.CopyFrom(common_pb2.Range(start=start, length=length))
            download.prefetch = self.prefetch
        if self.timeout:
            download.timeout.CopyFrom(duration(self.timeout))
        return download

    @classmethod
    def from_proto(cls, download: common_pb2.Download) -> DownloadRequest:
        """From a `common.v2.Download` (raises InvalidRequest on a bad URL or digest)."""
        timeout = seconds(download.timeout) if download.HasField("timeout") else None
        byte_range = (download.range.start, download.range.length) if download.HasField("range") else None
        return cls(
            url=download.url, digest=download.digest, tag=download.tag, application=download.application,
            priority=int(download.priority), filtered_query_params=tuple(download.filtered_query_params),
            request_header=dict(download.request_header),
            piece_length=download.piece_length if download.HasField("piece_length") else None,
            disable_back_to_source=download.disable_back_to_source,
            need_back_to_source=download.need_back_to_source, timeout=timeout or None,
            byte_range=byte_range, prefetch=download.prefetch if byte_range is not None else True,
        )


def duration(seconds: float) -> duration_pb2.Duration:
    """Seconds as a protobuf Duration."""
    message = duration_pb2.Duration()
    message.FromTimedelta(datetime.timedelta(seconds=seconds))
    return message


def seconds(message: duration_pb2.Duration) -> float:
    """A protobuf Duration in seconds."""
    return float(message.seconds) + message.nanos / 1e9
