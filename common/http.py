"""HTTP helpers every component shares (pure: no I/O): headers and the ``Range`` header.

Headers: :data:`HOP_BY_HOP` (never forwarded), :func:`get_header` (case-insensitive lookup in a
plain mapping), :func:`credential_key` (what caches keep instead of an ``Authorization`` value),
:func:`redact_urls` (messages for other clients without the query signatures and user info of
the URLs they mention).

The ``Range`` header (RFC 9110 §14), as the registry mirror answers it:
:func:`parse_range` turns a header into range specs (syntax only); :func:`select_range` resolves
them against a content length into what the proxy sends:

- no header → ``None`` (the whole content, ``200``);
- one satisfiable range → a :class:`ByteRange` (``206`` with ``Content-Range``), with
  ``bytes=N-`` and a last position past the end clamped to the end, and ``bytes=-N`` the last N
  bytes (the whole content when N is larger);
- several ranges, at least one satisfiable → ``None``: the whole content with ``200``, which
  RFC 9110 allows a server to send instead of ``multipart/byteranges``;
- nothing satisfiable → :class:`~common.errors.RangeNotSatisfiable` (``416``,
  ``Content-Range: bytes */total``);
- malformed → :class:`~common.errors.InvalidRange` (the proxy answers it with ``416`` too:
  a client that asked for part of a blob must not get all of it by surprise).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import InvalidRange, RangeNotSatisfiable

# Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), lower case; and Host, which
# each hop sets for itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
    "trailer", "transfer-encoding", "upgrade", "host",
})


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header `name` in a plain mapping, whatever the case of its key."""
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def credential_key(authorization: str | None) -> str:
    """A hash of an ``Authorization`` value ("" for none): caches keyed by credential never hold
    the secret itself."""
    return hashlib.sha256(authorization.encode()).hexdigest() if authorization else ""


_URL_IN_TEXT = re.compile(r"(?P<scheme>https?://)(?:[^\s/?#@'\"]*@)?(?P<rest>[^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def redact_urls(text: str) -> str:
    """`text` with every http(s) URL in it cut to scheme, host and path: a task is shared by
    clients whose URLs differ in filtered query parameters (presigned signatures), so a message
    about the task must not hand one client's signature or credentials to another."""
    return _URL_IN_TEXT.sub(lambda match: f"{match['scheme']}{match['rest']}", text)


# A position longer than this cannot be inside any content (and keeps int() cheap).
_MAX_DIGITS = 19
_SPEC = re.compile(r"^(?P<first>[0-9]*)-(?P<last>[0-9]*)$")


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """One ``first-last`` of a Range header: ``first=None`` is a suffix (the last `last` bytes)."""

    first: int | None
    last: int | None


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A satisfiable range: bytes ``start`` to ``end`` inclusive, of a ``total``-byte content."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        """Bytes in the range."""
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        """The ``Content-Range`` value of a ``206`` answer."""
        return f"bytes {self.start}-{self.end}/{self.total}"


def unsatisfied_content_range(total: int) -> str:
    """The ``Content-Range`` value of a ``416`` answer."""
    return f"bytes */{total}"


def _position(text: str, header: str) -> int:
    if len(text) > _MAX_DIGITS:
        raise InvalidRange(f"range {header!r}: position {text[:24]}... is too large")
    return int(text)


def parse_range(header: str) -> list[RangeSpec]:
    """The specs of a ``bytes=`` Range header; InvalidRange when it is not one."""
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise InvalidRange(f"range {header!r} is not a bytes range")
    parsed: list[RangeSpec] = []
    for raw in specs.split(","):
        part = raw.strip(" \t")
        if not part:
            continue  # RFC 9110 allows empty list elements
        match = _SPEC.match(part)
        if match is None or (not match["first"] and not match["last"]):
            raise InvalidRange(f"range {header!r}: {part!r} is not first-last, first- or -suffix")
        first = _position(match["first"], header) if match["first"] else None
        last = _position(match["last"], header) if match["last"] else None
        if first is not None and last is not None and last < first:
            raise InvalidRange(f"range {header!r}: {part!r} ends before it starts")
        parsed.append(RangeSpec(first, last))
    if not parsed:
        raise InvalidRange(f"range {header!r} names no range")
    return parsed


def resolve(spec: RangeSpec, total: int) -> ByteRange | None:
    """The bytes `spec` selects in a `total`-byte content; None when it selects none."""
    if spec.first is None:
        assert spec.last is not None
        if spec.last == 0 or total == 0:
            return None
        return ByteRange(max(0, total - spec.last), total - 1, total)
    if spec.first >= total:
        return None
    end = total - 1 if spec.last is None else min(spec.last, total - 1)
    return ByteRange(spec.first, end, total)


def select_range(header: str | None, total: int) -> ByteRange | None:
    """What to send for `header` on a `total`-byte content: one range, or None for all of it.

    Raises InvalidRange (malformed) or RangeNotSatisfiable (nothing inside the content).
    """
    if header is None:
        return None
    specs = parse_range(header)
    resolved = [r for r in (resolve(spec, total) for spec in specs) if r is not None]
    if not resolved:
        raise RangeNotSatisfiable(header, total)
    if len(specs) > 1:
        return None
    return resolved[0]
