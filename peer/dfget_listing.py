"""``dfget -r``: the files under an HTTP directory listing.

A directory URL ends in ``/`` and answers with an HTML index (Python's ``http.server``, nginx
``autoindex``, Apache ``mod_autoindex``): every ``<a href>`` that points below the page is an
entry, a trailing ``/`` marks a subdirectory. Parsing and the mapping to local paths are pure;
the page fetcher is passed in (:func:`http_fetcher` in production, a dict in unit tests).

Everything a listing says is untrusted: a name that decodes to ``..``, contains a ``/`` or a NUL,
or leaves the root URL is refused, so a listing cannot make dfget write outside the output
directory. Listings are bounded in size, pages and depth; ``--max-files`` bounds the files.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

if TYPE_CHECKING:
    import aiohttp

from common.errors import DownloadFailed, InvalidRequest

DEFAULT_MAX_FILES = 100  # Dragonfly's default
MAX_LISTING_BYTES = 8 << 20  # one index page
MAX_LISTING_PAGES = 10_000
MAX_DEPTH = 64
LISTING_TIMEOUT = 60.0  # seconds per index page

Fetcher = Callable[[str], Awaitable[str]]


@dataclass(frozen=True)
class Entry:
    """One file to download: its URL and its path below the output directory."""

    url: str
    parts: tuple[str, ...]

    @property
    def relative(self) -> str:
        """The path below the root, with ``/`` separators (what --include-files matches)."""
        return "/".join(self.parts)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def links_in(html: str) -> list[str]:
    """The ``href`` of every ``<a>`` in a page, in order."""
    parser = _Links()
    parser.feed(html)
    parser.close()
    return parser.hrefs


def directory_url(url: str) -> str:
    """`url` with a trailing ``/`` on its path (what ``-r`` lists)."""
    parts = urlsplit(url)
    if parts.path.endswith("/"):
        return url
    return parts._replace(path=parts.path + "/").geturl()


def children(page_url: str, hrefs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(files, subdirectories) that the links of `page_url` point to, below it, without repeats.

    Links elsewhere (parent, other hosts, sort links with a query such as Apache's ``?C=N;O=D``)
    are dropped.
    """
    page = urlsplit(page_url)
    files: dict[str, None] = {}
    dirs: dict[str, None] = {}
    for href in hrefs:
        url, _ = urldefrag(urljoin(page_url, href.strip()))
        target = urlsplit(url)
        if target.query or (target.scheme, target.netloc) != (page.scheme, page.netloc):
            continue
        path = posixpath.normpath(target.path)
        if target.path.endswith("/") and not path.endswith("/"):
            path += "/"
        if not path.startswith(page.path) or path == page.path:
            continue
        url = target._replace(path=path).geturl()
        (dirs if path.endswith("/") else files)[url] = None
    return list(files), list(dirs)


def relative_parts(root_url: str, url: str) -> tuple[str, ...]:
    """The decoded path segments of `url` below `root_url`; InvalidRequest for unsafe names."""
    root, target = urlsplit(root_url).path, urlsplit(url).path
    if not target.startswith(root):
        raise InvalidRequest(f"{url} is not below {root_url}")
    parts = tuple(unquote(segment) for segment in target[len(root):].rstrip("/").split("/"))
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\x00" in part or len(part.encode()) > 255:
            raise InvalidRequest(f"the listing of {root_url} names an unusable file name {part!r} ({url})")
    return parts


def check_include_pattern(pattern: str) -> str:
    """A --include-files pattern, validated: a relative path without ``.``/``..`` segments."""
    if not pattern or pattern.startswith("/"):
        raise InvalidRequest(f"--include-files {pattern!r} must be a path relative to the URL")
    if any(part in (".", "..") for part in pattern.rstrip("/").split("/")):
        raise InvalidRequest(f"--include-files {pattern!r} must not contain '.' or '..'")
    return pattern


def included(relative: str, patterns: Sequence[str]) -> bool:
    """Whether a file passes --include-files: no patterns, a glob match of its relative path,
    or a pattern ending in ``/`` that names one of its directories."""
    if not patterns:
        return True
    for pattern in patterns:
        if pattern.endswith("/"):
            if relative.startswith(pattern) or fnmatch.fnmatchcase(relative, pattern + "*"):
                return True
        elif fnmatch.fnmatchcase(relative, pattern):
            return True
    return False


async def list_files(root_url: str, fetch: Fetcher, *, include: Sequence[str] = (),
                     max_files: int = DEFAULT_MAX_FILES) -> list[Entry]:
    """Every file below the directory `root_url`, filtered by `include`, sorted by path.

    Raises DownloadFailed when more than `max_files` files match, or the tree is too deep or has
    too many pages, and InvalidRequest for an unsafe name.
    """
    root_url = directory_url(root_url)
    pending = [(root_url, 0)]
    seen_dirs = {root_url}
    entries: dict[str, Entry] = {}
    pages = 0
    while pending:
        page_url, depth = pending.pop()
        pages += 1
        if pages > MAX_LISTING_PAGES:
            raise DownloadFailed(f"{root_url} has more than {MAX_LISTING_PAGES} directories")
        files, dirs = children(page_url, links_in(await fetch(page_url)))
        for url in files:
            entry = Entry(url, relative_parts(root_url, url))
            if url in entries or not included(entry.relative, include):
                continue
            entries[url] = entry
            if len(entries) > max_files:
                raise DownloadFailed(f"{root_url} has more than {max_files} files to download; "
                                     "raise --max-files or narrow it with --include-files")
        for url in dirs:
            if url in seen_dirs:
                continue
            relative_parts(root_url, url)  # refuse unsafe directory names too
            if depth + 1 > MAX_DEPTH:
                raise DownloadFailed(f"{root_url} is nested deeper than {MAX_DEPTH} directories")
            seen_dirs.add(url)
            pending.append((url, depth + 1))
    return sorted(entries.values(), key=lambda entry: entry.parts)


def http_fetcher(session: aiohttp.ClientSession, headers: Mapping[str, str]) -> Fetcher:
    """Fetch index pages straight from the origin with the request headers (-H), size-bounded."""
    import aiohttp  # here, not at the top: dfget of one file never loads it (a third of its start-up CPU)

    async def fetch(url: str) -> str:
        timeout = aiohttp.ClientTimeout(total=LISTING_TIMEOUT)
        try:
            async with session.get(url, headers=dict(headers), timeout=timeout) as response:
                if response.status != 200:
                    raise DownloadFailed(f"listing {url} answered HTTP {response.status}")
                body = await response.content.read(MAX_LISTING_BYTES + 1)
                if len(body) > MAX_LISTING_BYTES:
                    raise DownloadFailed(f"listing {url} is larger than {MAX_LISTING_BYTES} bytes")
                return body.decode(response.get_encoding() if response.charset else "utf-8", errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadFailed(f"cannot list {url}: {exc or type(exc).__name__}") from None

    return fetch
