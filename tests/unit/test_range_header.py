"""The Range header as the registry mirror answers it (common/http.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import InvalidRange, RangeNotSatisfiable
from common.http import ByteRange, RangeSpec, parse_range, select_range, unsatisfied_content_range

TOTAL = 1000

SATISFIABLE = [
    # header, (start, end)
    ("bytes=0-0", (0, 0)),
    ("bytes=0-999", (0, 999)),
    ("bytes=10-19", (10, 19)),
    ("bytes=990-5000", (990, 999)),  # last position past the end: clamped
    ("bytes=500-", (500, 999)),  # open-ended
    ("bytes=-1", (999, 999)),  # suffix
    ("bytes=-100", (900, 999)),
    ("bytes=-5000", (0, 999)),  # suffix longer than the content: all of it
    ("BYTES=1-2", (1, 2)),  # the unit is case-insensitive
    ("bytes= 3-4 ", (3, 4)),  # optional whitespace
    ("bytes=3-4,", (3, 4)),  # empty list elements are allowed
    ("bytes=999-999", (999, 999)),
]

UNSATISFIABLE = ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=5000-6000,2000-"]

MALFORMED = [
    "bytes=5-1",  # ends before it starts
    "bytes=",
    "bytes=,",
    "bytes=-",
    "bytes=abc",
    "bytes=1-2-3",
    "bytes=+1-2",
    "bytes=0x10-20",
    "items=0-1",
    "0-1",
    "bytes=1 -2",
    "bytes=" + "9" * 40 + "-",  # a position no content can have
]


@pytest.mark.parametrize(("header", "expected"), SATISFIABLE)
def test_single_satisfiable_ranges(header: str, expected: tuple[int, int]) -> None:
    chosen = select_range(header, TOTAL)
    assert chosen == ByteRange(*expected, TOTAL)
    assert chosen.content_range == f"bytes {expected[0]}-{expected[1]}/{TOTAL}"
    assert chosen.length == expected[1] - expected[0] + 1


@pytest.mark.parametrize("header", UNSATISFIABLE)
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as caught:
        select_range(header, TOTAL)
    assert caught.value.content_length == TOTAL
    assert unsatisfied_content_range(TOTAL) == "bytes */1000"


@pytest.mark.parametrize("header", MALFORMED)
def test_malformed_ranges(header: str) -> None:
    with pytest.raises(InvalidRange):
        select_range(header, TOTAL)


def test_no_header_and_multi_range_mean_the_whole_content() -> None:
    assert select_range(None, TOTAL) is None
    assert select_range("bytes=0-9,20-29", TOTAL) is None
    assert select_range("bytes=0-9,5000-", TOTAL) is None  # one of them is satisfiable


def test_empty_content_has_no_satisfiable_range() -> None:
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        with pytest.raises(RangeNotSatisfiable):
            select_range(header, 0)
    assert select_range(None, 0) is None


def test_parse_keeps_the_specs() -> None:
    assert parse_range("bytes=1-2, 7-, -3") == [RangeSpec(1, 2), RangeSpec(7, None), RangeSpec(None, 3)]


@st.composite
def spec_and_total(draw: st.DrawFn) -> tuple[str, int, slice]:
    """A valid single-range header, a content length, and the Python slice it must select."""
    total = draw(st.integers(min_value=0, max_value=10_000))
    kind = draw(st.sampled_from(["closed", "open", "suffix"]))
    if kind == "suffix":
        n = draw(st.integers(min_value=0, max_value=20_000))
        return f"bytes=-{n}", total, slice(max(0, total - n), total) if n else slice(0, 0)
    first = draw(st.integers(min_value=0, max_value=20_000))
    if kind == "open":
        return f"bytes={first}-", total, slice(first, total)
    last = draw(st.integers(min_value=first, max_value=30_000))
    return f"bytes={first}-{last}", total, slice(first, last + 1)


@given(spec_and_total())
def test_selection_matches_slicing(case: tuple[str, int, slice]) -> None:
    header, total, expected = case
    content = range(total)
    wanted = content[expected]
    if not wanted:
        with pytest.raises(RangeNotSatisfiable):
            select_range(header, total)
        return
    chosen = select_range(header, total)
    assert chosen is not None
    assert 0 <= chosen.start <= chosen.end < total
    assert content[chosen.start:chosen.end + 1] == wanted


@given(st.text(max_size=40))
def test_arbitrary_text_is_parsed_or_refused_never_crashes(header: str) -> None:
    try:
        chosen = select_range(header, TOTAL)
    except (InvalidRange, RangeNotSatisfiable):
        return
    assert chosen is None or 0 <= chosen.start <= chosen.end < TOTAL
