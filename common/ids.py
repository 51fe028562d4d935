"""Identifiers of tasks, peers and hosts.

A task is one content. For an OCI blob URL (``/v2/<name>/blobs/<digest>``) the task id comes from
the registry (scheme, host, port) and the blob digest, so the same blob pulled from two
repositories of one registry is one task, and a blob cached from one registry is never served as
another registry's (whose answer to "may this client read it?" says nothing about the first). For
any other URL it is the sha256 of the URL without its filtered query parameters, plus tag,
application and (when the caller fixed it) the piece length.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from common.errors import InvalidRequest
from common.hosts import SEED_HOST_ID_SUFFIX

# <name> is one or more path components of [a-z0-9._-]; the digest is algorithm:hex.
_OCI_BLOB_PATH = re.compile(
    r"^/v2/(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"/blobs/(?P<digest>sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$"
)


@dataclass(frozen=True, slots=True)
class OciBlobRef:
    """A blob in an OCI registry, parsed from its URL."""

    registry: str  # scheme://host[:port]
    repository: str
    digest: str


def _split(url: str) -> SplitResult:
    """urlsplit, with its ValueError (bad IPv6 brackets, invalid characters) as InvalidRequest."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - evaluated for its check of the port
    except ValueError as exc:
        raise InvalidRequest(f"URL {url!r} cannot be parsed: {exc}") from None
    return parts


def parse_oci_blob_url(url: str) -> OciBlobRef | None:
    """The registry, repository and digest of an OCI blob URL, or None for other URLs."""
    try:
        parts = _split(url)
    except InvalidRequest:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    match = _OCI_BLOB_PATH.match(parts.path)
    if not match:
        return None
    return OciBlobRef(f"{parts.scheme}://{parts.netloc}", match["name"], match["digest"])


def validate_url(url: str) -> None:
    """Raise InvalidRequest unless `url` is an absolute http(s) URL."""
    parts = _split(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"URL {url!r} is not an absolute http:// or https:// URL")


def filter_query(url: str, filtered_query_params: Iterable[str]) -> str:
    """`url` without the named query parameters (signatures, expiry times)."""
    filtered = set(filtered_query_params)
    if not filtered:
        return url
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in filtered]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))


def task_id(
    url: str,
    *,
    tag: str = "",
    application: str = "",
    filtered_query_params: Iterable[str] = (),
    piece_length: int | None = None,
) -> str:
    """The task id of a download request (64 hex digits)."""
    return _task_id(url, tag, application, tuple(filtered_query_params), piece_length)


# The registry mirror asks for the same few blob URLs once per Range read (nydusd: thousands per
# container start); parsing and hashing them each time was a tenth of a read's CPU.
@functools.lru_cache(maxsize=4096)
def _task_id(url: str, tag: str, application: str, filtered_query_params: tuple[str, ...],
             piece_length: int | None) -> str:
    validate_url(url)
    blob = parse_oci_blob_url(url)
    if blob is not None:
        parts = ["oci-blob", _registry_key(blob.registry), blob.digest, tag, application]
    else:
        parts = ["url", filter_query(url, filtered_query_params), tag, application, str(piece_length or "")]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _registry_key(registry: str) -> str:
    """scheme://host:port of a registry URL, lower case, with the scheme's default port spelled out."""
    parts = urlsplit(registry)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def host_id(ip: str, hostname: str, *, seed: bool = False) -> str:
    """Stable id of a node: the same daemon on the same node keeps its id across restarts."""
    return f"{ip}-{hostname}" + (SEED_HOST_ID_SUFFIX if seed else "")


def peer_id(ip: str, hostname: str) -> str:
    """A new id for one download of one task on one node."""
    return f"{ip}-{hostname}-{uuid.uuid4()}"
