"""Small helpers every component shares, each written once: header handling (common/http.py),
booleans and sizes as people write them (common/config.py)."""

from __future__ import annotations

import pytest

from common.http import HOP_BY_HOP, credential_key, get_header
from common.units import format_size, parse_bool


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("Yes", True), (" 1 ", True), ("ON", True), (True, True),
    ("false", False), ("no", False), ("0", False), ("Off", False), (False, False),
])
def test_parse_bool(text: object, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "maybe", "2", "truthy", None])
def test_parse_bool_refuses_anything_else(text: object) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)


@pytest.mark.parametrize(("nbytes", "text"), [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (100 * 2**20, "100.0 MiB"),
    (3 * 2**30, "3.0 GiB"),
    (2 * 2**40, "2.0 TiB"),
    (-4096, "-4.0 KiB"),  # a shortfall keeps its unit
])
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text


def test_hop_by_hop_headers_are_lower_case_and_include_the_rfc_ones() -> None:
    assert all(name == name.lower() for name in HOP_BY_HOP)
    assert {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
            "proxy-authorization", "proxy-authenticate"} <= HOP_BY_HOP


def test_get_header_ignores_case() -> None:
    headers = {"Content-Range": "bytes 0-1/2", "www-authenticate": "Bearer"}
    assert get_header(headers, "content-range") == "bytes 0-1/2"
    assert get_header(headers, "WWW-Authenticate") == "Bearer"
    assert get_header(headers, "ETag") is None


def test_credential_key_keeps_no_secret() -> None:
    secret = "Basic YWxpY2U6c2VjcmV0"
    key = credential_key(secret)
    assert secret not in key and len(key) == 64
    assert credential_key(secret) == key != credential_key("Basic Ym9iOnNlY3JldA==")
    assert credential_key(None) == credential_key("") == ""
