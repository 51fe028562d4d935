"""Pure helpers of common.origin: challenge and Content-Range parsing, Range building."""

from __future__ import annotations

import pytest

from common.errors import InvalidRequest
from common.origin import Challenge, basic_authorization, parse_challenges, parse_content_range, range_header


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/busybox:pull"',
            [Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                  "scope": "repository:library/busybox:pull"})],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        (
            'Bearer realm="http://a/t",scope="repository:x:pull,push",error="insufficient_scope"',
            [Challenge("bearer", {"realm": "http://a/t", "scope": "repository:x:pull,push",
                                  "error": "insufficient_scope"})],
        ),
        (
            'Basic realm="x", Bearer realm="http://a/t", service=reg',
            [
                Challenge("basic", {"realm": "x"}),
                Challenge("bearer", {"realm": "http://a/t", "service": "reg"}),
            ],
        ),
        ('Bearer realm="quote \\" inside"', [Challenge("bearer", {"realm": 'quote " inside'})]),
        ("", []),
    ],
    ids=["docker-hub", "basic", "comma-in-quoted-scope", "two-challenges", "escaped-quote", "empty"],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_challenge_scopes_split_on_spaces() -> None:
    (challenge,) = parse_challenges('Bearer realm="r",scope="repository:a:pull repository:b:pull"')
    assert challenge.scopes == ["repository:a:pull", "repository:b:pull"]
    assert challenge.realm == "r"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-0/100", (0, 0, 100)),
        ("bytes 10-19/*", (10, 19, None)),
        ("bytes */4096", (None, None, 4096)),
        ("Bytes  5-5/6 ", (5, 5, 6)),
    ],
)
def test_parse_content_range(value: str, expected: tuple[int | None, int | None, int | None]) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize("value", ["", "bytes 5-4/10", "items 0-1/2", "bytes 0-/10", "bytes=0-1/2"])
def test_parse_content_range_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_content_range(value)


@pytest.mark.parametrize(
    ("start", "length", "expected"),
    [
        (0, None, None),
        (0, 1, "bytes=0-0"),
        (100, None, "bytes=100-"),
        (4 << 20, 4 << 20, "bytes=4194304-8388607"),
    ],
)
def test_range_header(start: int, length: int | None, expected: str | None) -> None:
    assert range_header(start, length) == expected


@pytest.mark.parametrize(("start", "length"), [(-1, None), (0, 0), (5, -3)])
def test_range_header_rejects(start: int, length: int | None) -> None:
    with pytest.raises(InvalidRequest):
        range_header(start, length)


def test_basic_authorization() -> None:
    assert basic_authorization("aladdin", "opensesame") == "Basic YWxhZGRpbjpvcGVuc2VzYW1l"
