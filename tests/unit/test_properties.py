"""Properties of the pure parsers that take outside input: task ids and URLs, and the config loader.

(The Range parser's properties are in test_range_header.py.) The bugs these properties found
have regression tests at the end.
"""

from __future__ import annotations

import dataclasses
import re
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import yaml
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from common import ids
from common.config import DfdaemonConfig, SchedulerConfig, load_config, to_yaml_dict
from common.errors import ConfigError, InvalidRequest

HEX64 = re.compile(r"^[0-9a-f]{64}$")
STRICT_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
COMPONENT = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"

_alnum_runs = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=6)
components = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    _alnum_runs, st.lists(st.tuples(st.sampled_from("._-"), _alnum_runs), max_size=2),
)
repositories = st.lists(components, min_size=1, max_size=4).map("/".join)
hosts = st.lists(st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10), min_size=1,
                 max_size=3).map(".".join)
registries = st.builds(
    lambda scheme, host, port: f"{scheme}://{host}" + (f":{port}" if port else ""),
    st.sampled_from(["http", "https"]), hosts, st.none() | st.integers(1, 65535),
)
sha256_digests = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
param_names = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=8)
param_values = st.text(max_size=12)


# ---- task ids and URLs ------------------------------------------------------------------------


@given(registries, registries, repositories, repositories, sha256_digests)
def test_same_blob_under_two_repositories_is_one_task(
    registry_a: str, registry_b: str, repo_a: str, repo_b: str, digest: str
) -> None:
    first = ids.task_id(f"{registry_a}/v2/{repo_a}/blobs/{digest}")
    second = ids.task_id(f"{registry_a.upper()}/v2/{repo_b}/blobs/{digest}?X-Amz-Signature=x")
    assert first == second
    # Another registry's blob is another task (security: issue 12 item 1).
    assert (ids.task_id(f"{registry_b}/v2/{repo_a}/blobs/{digest}") == first) == (
        ids._registry_key(registry_a) == ids._registry_key(registry_b))
    assert HEX64.match(first)
    # tag and application still make their own tasks
    assert ids.task_id(f"{registry_a}/v2/{repo_a}/blobs/{digest}", tag="t") != first


@given(registries, repositories, sha256_digests, sha256_digests)
def test_different_blobs_are_different_tasks(registry: str, repo: str, digest_a: str, digest_b: str) -> None:
    assume(digest_a != digest_b)
    first = ids.task_id(f"{registry}/v2/{repo}/blobs/{digest_a}")
    assert first != ids.task_id(f"{registry}/v2/{repo}/blobs/{digest_b}")


@given(
    registries,
    st.lists(st.tuples(param_names, param_values), max_size=4),
    st.dictionaries(param_names, st.tuples(param_values, param_values), min_size=1, max_size=3),
    st.randoms(use_true_random=False),
)
def test_filtered_query_params_change_nothing_wherever_and_in_whatever_order(
    registry: str, kept: list[tuple[str, str]], filtered: dict[str, tuple[str, str]], rng: Any
) -> None:
    """Signatures differ per request and may come anywhere in the query: one task all the same."""
    kept = [(k, v) for k, v in kept if k not in filtered]
    first = kept + [(name, values[0]) for name, values in filtered.items()]
    second = kept + [(name, values[1]) for name, values in filtered.items()]
    # the filtered ones move around; the kept ones keep their order (it is part of the URL)
    for name, value in [p for p in second if p[0] in filtered]:
        second.remove((name, value))
        second.insert(rng.randint(0, len(second)), (name, value))
    names = list(filtered)
    shuffled = rng.sample(names, len(names))
    url_a = f"{registry}/files/data?{urlencode(first)}"
    url_b = f"{registry}/files/data?{urlencode(second)}"
    id_a = ids.task_id(url_a, filtered_query_params=names)
    assert id_a == ids.task_id(url_b, filtered_query_params=shuffled + names[:1])
    assert HEX64.match(id_a)


url_texts = st.one_of(
    st.text(max_size=60),
    st.builds(lambda scheme, rest: scheme + rest,
              st.sampled_from(["http://", "https://", "ftp://", "http:", "//", "file:///", "HTTP://", ""]),
              st.text(max_size=40)),
)


@given(url_texts)
@example("http://")
@example("http:///path")
@example("https://:80/x")
@example("javascript:alert(1)")
@example("http://user@/x")
def test_any_text_is_a_task_id_or_invalid_request(url: str) -> None:
    try:
        task = ids.task_id(url, filtered_query_params=("sig",))
    except InvalidRequest:
        with pytest.raises(InvalidRequest):
            ids.validate_url(url)
        return
    assert HEX64.match(task)
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.hostname


path_segments = st.one_of(
    components,
    st.sampled_from(["..", ".", "", "%2e%2e", "%2E%2E", "..%2f", "%252e%252e", "..\\..", "\\", "\x00",
                     "blobs", "v2", "a..b", "a/../b", ".hidden", "-x", "UPPER"]),
    st.text(max_size=6),
)
digest_texts = st.one_of(
    sha256_digests,
    st.sampled_from(["sha256:", "sha256:../../etc/passwd", "sha512:" + "0" * 64, "SHA256:" + "a" * 64,
                     "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256:" + "a" * 65, "md5:" + "a" * 32]),
    st.text(max_size=80),
)


@given(registries, st.lists(path_segments, min_size=1, max_size=5), digest_texts, st.sampled_from(["", "/", "/.."]))
def test_blob_urls_never_carry_traversal_or_a_bad_digest(
    registry: str, segments: list[str], digest: str, suffix: str
) -> None:
    url = f"{registry}/v2/{'/'.join(segments)}/blobs/{digest}{suffix}"
    blob = ids.parse_oci_blob_url(url)
    if blob is None:
        return
    assert STRICT_DIGEST.match(blob.digest)
    for component in blob.repository.split("/"):
        assert re.fullmatch(COMPONENT, component), component  # no "..", ".", "%", "\\", NUL
    assert urlsplit(url).path == f"/v2/{blob.repository}/blobs/{blob.digest}"
    assert ids.task_id(url) == ids.task_id(f"{blob.registry}/v2/library/x/blobs/{blob.digest}")


# ---- the config loader --------------------------------------------------------------------------

CLASSES = [DfdaemonConfig, SchedulerConfig]
FIELD_NAMES = sorted({f.name for cls in CLASSES for f in dataclasses.fields(cls)})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False), st.text(max_size=20),
    st.sampled_from(["30s", "500ms", "5m", "24h", "1.5h", "-1s", "512MiB", "10GiB", "1G", "64k", "0", "-3",
                     "127.0.0.1:4000", "[::1]:80", "host:99999", ":80", "info", "DEBUG", "json", "true", "off",
                     "blobs/sha256.*", "(", "1e5", "inf", "nan", " 7 "]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=6)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.sampled_from(FIELD_NAMES).map(lambda k: k.replace("_", "-")),
                 st.text(max_size=12))
documents = st.dictionaries(keys, values, max_size=6)


def _assert_loads_or_names_the_key(cls: type[Any], keys_given: set[str], **kwargs: Any) -> None:
    try:
        config = load_config(cls, **kwargs)
    except ConfigError as exc:
        # the key given, or the field a cross-field check needs (tls_cert for tls_ca_cert)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert exc.key in keys_given | fields | {"--config"}, exc
        assert exc.key in str(exc)
        return
    assert isinstance(config, cls)
    # a loaded config is a valid config: written back out, it loads as the same config
    assert load_config(cls, overrides=to_yaml_dict(config)) == config


@settings(max_examples=300)
@given(st.sampled_from(CLASSES), documents)
def test_random_yaml_documents_load_or_fail_with_the_key(
    tmp_path_factory: pytest.TempPathFactory, cls: type[Any], document: dict[str, Any]
) -> None:
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    _assert_loads_or_names_the_key(cls, set(document), path=path)


@settings(max_examples=300)
@given(st.sampled_from(CLASSES), st.dictionaries(keys, values, max_size=4))
def test_random_overrides_load_or_fail_with_the_key(cls: type[Any], overrides: dict[str, Any]) -> None:
    _assert_loads_or_names_the_key(cls, set(overrides), overrides=overrides)


@given(st.sampled_from(CLASSES), st.text(max_size=200))
@example(DfdaemonConfig, "[1, 2")
@example(DfdaemonConfig, "- a\n- b")
@example(DfdaemonConfig, "just a string")
@example(DfdaemonConfig, "!!python/object:os.system {}")
@example(DfdaemonConfig, "a: &x [*x]")
def test_any_text_file_loads_or_fails_with_config_error(
    tmp_path_factory: pytest.TempPathFactory, cls: type[Any], text: str
) -> None:
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(text)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        document = None
    # A key the loader rejects is named as text: YAML's "?" alone is the document {None: None}.
    keys_given = {str(key) for key in document} if isinstance(document, dict) else set()
    _assert_loads_or_names_the_key(cls, keys_given, path=path)


# ---- regressions of what the properties found ------------------------------------------------


@pytest.mark.parametrize("url", ["http://[::1/x", "http://ex\uff03ample/x", "http://[zz]/x", "http://h:99999/x"])
def test_unparseable_urls_are_invalid_requests(url: str) -> None:
    with pytest.raises(InvalidRequest):
        ids.task_id(url)
    assert ids.parse_oci_blob_url(url + "/v2/a/blobs/sha256:" + "0" * 64) is None


@pytest.mark.parametrize("text", ["?", "? \n", "~: 1\n"])
def test_a_null_key_is_named_as_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="keys must be strings") as caught:
        load_config(DfdaemonConfig, path=path)
    assert caught.value.key == "None"


def test_config_keys_must_be_strings(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="keys must be strings"):
        load_config(DfdaemonConfig, path=path)


@pytest.mark.parametrize("size", ["9" * 400, "1e400", "inf"])
def test_config_huge_sizes_are_refused(size: str) -> None:
    with pytest.raises(ConfigError, match="cache_quota"):
        load_config(DfdaemonConfig, overrides={"cache_quota": size})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "inf", "nan"])
def test_config_durations_and_numbers_must_be_finite(value: object) -> None:
    with pytest.raises(ConfigError, match="piece_timeout"):
        load_config(DfdaemonConfig, overrides={"piece_timeout": value})
    with pytest.raises(ConfigError, match="gc_low_watermark"):
        load_config(DfdaemonConfig, overrides={"gc_low_watermark": value})
