"""common.oci: image references, manifests and indexes, the platform filter, the blobs to preheat."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from common import oci
from common.errors import InvalidRequest

D1, D2, D3, D4, D5 = (f"sha256:{str(n) * 64}" for n in range(1, 6))
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), [
    ("nginx", "docker.io", "library/nginx", "latest", ""),
    ("nginx:1.25", "docker.io", "library/nginx", "1.25", ""),
    ("team/app:v1", "docker.io", "team/app", "v1", ""),
    ("127.0.0.1:5000/team/app", "127.0.0.1:5000", "team/app", "latest", ""),
    ("localhost/app:dev", "localhost", "app", "dev", ""),
    ("registry.example.com/a/b/c:v2", "registry.example.com", "a/b/c", "v2", ""),
    (f"registry.example.com/app@{D1}", "registry.example.com", "app", "", D1),
    (f"registry.example.com:443/app:v1@{D2}", "registry.example.com:443", "app", "v1", D2),
])
def test_references_are_read_as_docker_reads_them(text: str, registry: str, repository: str, tag: str,
                                                   digest: str) -> None:
    reference = oci.parse_reference(text)
    assert (reference.registry, reference.repository, reference.tag, reference.digest) == (
        registry, repository, tag, digest)
    assert reference.reference == (digest or tag)


def test_urls_of_a_reference() -> None:
    reference = oci.parse_reference(f"127.0.0.1:5000/team/app@{D1}")
    assert reference.manifest_url(plain_http=True) == f"http://127.0.0.1:5000/v2/team/app/manifests/{D1}"
    assert reference.blob_url(False, D2) == f"https://127.0.0.1:5000/v2/team/app/blobs/{D2}"
    hub = oci.parse_reference("nginx")
    assert hub.manifest_url(False) == "https://registry-1.docker.io/v2/library/nginx/manifests/latest"


@pytest.mark.parametrize(("text", "names"), [
    ("Team/App", "repository"),
    ("app:", "tag"),
    ("app:-bad", "tag"),
    ("app@sha256:abc", "digest"),
    ("reg.example.com/app//x", "repository"),
    ("", "repository"),
])
def test_bad_references_name_the_part(text: str, names: str) -> None:
    with pytest.raises(InvalidRequest, match=names):
        oci.parse_reference(text)


def test_manifest_urls_as_preheat_image_names_them() -> None:
    reference, plain = oci.parse_manifest_url("http://registry:5000/v2/team/app/manifests/v1")
    assert (reference.registry, reference.repository, reference.tag, plain) == ("registry:5000", "team/app", "v1", True)
    reference, plain = oci.parse_manifest_url(f"https://r.example.com/v2/app/manifests/{D3}")
    assert (reference.digest, reference.tag, plain) == (D3, "", False)
    for bad in ("ftp://r/v2/app/manifests/v1", "https://r/v2/app/blobs/v1", "https:///v2/app/manifests/v1"):
        with pytest.raises(InvalidRequest):
            oci.parse_manifest_url(bad)


@pytest.mark.parametrize(("entry", "wanted", "matches"), [
    (oci.Platform("linux", "amd64"), "linux/amd64", True),
    (oci.Platform("linux", "amd64"), "linux/arm64", False),
    (oci.Platform("windows", "amd64"), "linux/amd64", False),
    (oci.Platform("linux", "arm", "v7"), "linux/arm", True),
    (oci.Platform("linux", "arm", "v6"), "linux/arm/v7", False),
    (oci.Platform("linux", "arm64"), "linux/arm64/v8", True),
    (oci.Platform("linux", "arm64", "v8"), "linux/arm64", True),
])
def test_platform_filter(entry: oci.Platform, wanted: str, matches: bool) -> None:
    assert entry.matches(oci.parse_platform(wanted)) is matches


@pytest.mark.parametrize("bad", ["linux", "linux/", "/amd64", "linux/arm/v7/x"])
def test_bad_platforms(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="os/arch"):
        oci.parse_platform(bad)


def _descriptor(digest: str, media_type: str = LAYER, size: int = 10, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _manifest(media_type: str | None, config: str, *layers: dict[str, Any]) -> bytes:
    document: dict[str, Any] = {"schemaVersion": 2, "config": _descriptor(config, CONFIG), "layers": list(layers)}
    if media_type:
        document["mediaType"] = media_type
    return json.dumps(document).encode()


def _index(media_type: str | None, *entries: tuple[str, str | None, dict[str, str]]) -> bytes:
    manifests = []
    for digest, platform, notes in entries:
        entry = _descriptor(digest, oci.OCI_MANIFEST, 500, annotations=notes)
        if platform:
            os_name, arch, *variant = platform.split("/")
            entry["platform"] = {"os": os_name, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        manifests.append(entry)
    document: dict[str, Any] = {"schemaVersion": 2, "manifests": manifests}
    if media_type:
        document["mediaType"] = media_type
    return json.dumps(document).encode()


@pytest.mark.parametrize("media_type", [oci.OCI_MANIFEST, oci.DOCKER_MANIFEST])
def test_manifests_of_both_media_types(media_type: str) -> None:
    parsed = oci.parse_document(_manifest(media_type, D1, _descriptor(D2, DOCKER_LAYER, 7), _descriptor(D3)))
    assert isinstance(parsed, oci.Manifest)
    assert parsed.media_type == media_type
    assert parsed.config.digest == D1
    assert [(layer.digest, layer.size) for layer in parsed.layers] == [(D2, 7), (D3, 10)]


@pytest.mark.parametrize("media_type", [oci.OCI_INDEX, oci.DOCKER_MANIFEST_LIST])
def test_indexes_of_both_media_types(media_type: str) -> None:
    parsed = oci.parse_document(_index(media_type, (D1, "linux/amd64", {}), (D2, "linux/arm/v7", {})))
    assert isinstance(parsed, oci.Index)
    assert [(entry.digest, str(entry.platform)) for entry in parsed.manifests] == [
        (D1, "linux/amd64"), (D2, "linux/arm/v7")]


def test_without_a_media_type_field_the_content_type_then_the_shape_decides() -> None:
    index = _index(None, (D1, "linux/amd64", {}))
    assert isinstance(oci.parse_document(index, f"{oci.OCI_INDEX}; charset=utf-8"), oci.Index)
    assert isinstance(oci.parse_document(index), oci.Index)
    manifest = _manifest(None, D1, _descriptor(D2))
    assert isinstance(oci.parse_document(manifest, oci.DOCKER_MANIFEST), oci.Manifest)
    assert isinstance(oci.parse_document(manifest, "application/octet-stream"), oci.Manifest)


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "schema 1"),
    (json.dumps({"mediaType": oci.OCI_INDEX}).encode(), "no 'manifests' list"),
    (json.dumps({"mediaType": oci.OCI_MANIFEST, "config": _descriptor(D1)}).encode(), "no 'layers' list"),
    (json.dumps({"mediaType": oci.OCI_MANIFEST, "config": _descriptor(D1),
                 "layers": [{"digest": "sha256:xyz", "size": 1}]}).encode(), "layer 0 has no valid digest"),
    (json.dumps({"mediaType": oci.OCI_MANIFEST, "config": _descriptor(D1),
                 "layers": [{"digest": D2, "size": -1}]}).encode(), "no valid size"),
    (json.dumps({"mediaType": oci.OCI_MANIFEST, "layers": []}).encode(), "config is not a descriptor"),
    (json.dumps({"hello": "world"}).encode(), "not an image manifest or index"),
    (b" " * (oci.MAX_DOCUMENT_BYTES + 1), "more than"),
])
def test_bad_documents_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        oci.parse_document(body)


def test_check_digest() -> None:
    body = b'{"schemaVersion": 2}'
    oci.check_digest(body, f"sha256:{hashlib.sha256(body).hexdigest()}")
    oci.check_digest(body, f"sha512:{hashlib.sha512(body).hexdigest()}")
    with pytest.raises(InvalidRequest, match="not the"):
        oci.check_digest(body, D1)


ATTESTATION = {"vnd.docker.reference.type": "attestation-manifest"}


def _parsed_index(*entries: tuple[str, str | None, dict[str, str]]) -> oci.Index:
    parsed = oci.parse_document(_index(oci.OCI_INDEX, *entries))
    assert isinstance(parsed, oci.Index)
    return parsed


def test_select_manifests_by_platform_and_never_attestations() -> None:
    index = _parsed_index((D1, "linux/amd64", {}), (D2, "linux/arm64", {}), (D3, "unknown/unknown", ATTESTATION),
                          (D4, "linux/arm/v7", {}))
    assert [e.digest for e in oci.select_manifests(index, [])] == [D1, D2, D4]
    assert [e.digest for e in oci.select_manifests(index, [oci.parse_platform("linux/arm64")])] == [D2]
    both = [oci.parse_platform("linux/amd64"), oci.parse_platform("linux/arm/v7")]
    assert [e.digest for e in oci.select_manifests(index, both)] == [D1, D4]


def test_a_platform_the_index_lacks_is_an_error_listing_what_it_offers() -> None:
    index = _parsed_index((D1, "linux/amd64", {}), (D2, "linux/arm64", {}))
    with pytest.raises(InvalidRequest, match=r"no linux/s390x manifest; it offers linux/amd64, linux/arm64"):
        oci.select_manifests(index, [oci.parse_platform("linux/amd64"), oci.parse_platform("linux/s390x")])


def test_blobs_config_then_layers_each_once_with_every_platform() -> None:
    amd64 = oci.Manifest(oci.OCI_MANIFEST, oci.Descriptor(CONFIG, D1, 1),
                         (oci.Descriptor(LAYER, D3, 30), oci.Descriptor(LAYER, D4, 40)))
    arm64 = oci.Manifest(oci.OCI_MANIFEST, oci.Descriptor(CONFIG, D2, 2),
                         (oci.Descriptor(LAYER, D3, 30), oci.Descriptor(LAYER, D5, 50)))
    blobs = oci.blobs_to_preheat([("linux/amd64", amd64), ("linux/arm64", arm64)])
    assert [(b.digest, b.kind, b.platforms) for b in blobs] == [
        (D1, "config", ("linux/amd64",)),
        (D3, "layer", ("linux/amd64", "linux/arm64")),
        (D4, "layer", ("linux/amd64",)),
        (D2, "config", ("linux/arm64",)),
        (D5, "layer", ("linux/arm64",)),
    ]
    assert sum(b.size for b in blobs) == 1 + 30 + 40 + 2 + 50


def test_nydus_blobs_and_bootstrap_are_preheated() -> None:
    document = _manifest(
        oci.OCI_MANIFEST, D1,
        _descriptor(D2, oci.NYDUS_BLOB, 100, annotations={"containerd.io/snapshot/nydus-blob": "true"}),
        _descriptor(D3, LAYER, 5, annotations={oci.NYDUS_BOOTSTRAP_ANNOTATION: "true"}),
    )
    manifest = oci.parse_document(document)
    assert isinstance(manifest, oci.Manifest)
    blobs = oci.blobs_to_preheat([("", manifest)])
    assert [(b.digest, b.kind, b.media_type) for b in blobs] == [
        (D1, "config", CONFIG), (D2, "nydus-blob", oci.NYDUS_BLOB), (D3, "nydus-bootstrap", LAYER)]


def test_a_nydus_index_entry_beside_the_oci_one_is_chosen_for_the_platform_too() -> None:
    # nydusify writes the Nydus manifest as a second linux/amd64 entry (os.features nydus.remoteimage.v1).
    index = _parsed_index((D1, "linux/amd64", {}), (D2, "linux/amd64", {}), (D3, "linux/arm64", {}))
    assert [e.digest for e in oci.select_manifests(index, [oci.parse_platform("linux/amd64")])] == [D1, D2]
