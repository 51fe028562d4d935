"""OCI / Docker image references, manifests and indexes, as pure data: what to preheat.

No I/O here: callers fetch documents (:mod:`common.preheat`) and hand the bytes in. What this
module decides:

- :func:`parse_reference`: ``[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`` as Docker and containerd read
  it (a first component with a dot, a colon or ``localhost`` is a registry; Docker Hub names get
  ``library/``).
- :func:`parse_document`: an image index / Docker manifest list, or an image manifest, in OCI or
  Docker schema-2 media types (schema 1 is refused: nothing current writes it).
- :func:`select_manifests`: the entries of an index for the requested platforms. Attestation
  manifests (``unknown/unknown``) are never chosen. Without a platform filter every platform is.
- :func:`blobs_to_preheat`: the blobs a pull of those manifests reads, config first then layers
  in order, each once even when platforms share it. Nydus images are plain manifests whose
  layers are the data blobs plus a bootstrap layer (annotation
  :data:`NYDUS_BOOTSTRAP_ANNOTATION`): every layer is kept, whatever its media type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidRequest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# What a client sends as Accept when fetching a manifest by tag: any of the four, index first.
ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

NYDUS_BOOTSTRAP_ANNOTATION = "containerd.io/snapshot/nydus-bootstrap"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
# Docker buildx stores provenance / SBOM manifests in the index with this annotation.
REFERENCE_TYPE_ANNOTATION = "vnd.docker.reference.type"

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's registry API answers
DEFAULT_TAG = "latest"
# distribution refuses manifests above 4 MiB; so do we, before parsing anything bigger.
MAX_DOCUMENT_BYTES = 4 << 20

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")
_REGISTRY = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class ImageReference:
    """A parsed image name: ``registry/repository`` and a tag and/or a digest."""

    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The host the registry API answers on (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def base_url(self, plain_http: bool) -> str:
        return f"{'http' if plain_http else 'https'}://{self.api_host}"

    def manifest_url(self, plain_http: bool, reference: str | None = None) -> str:
        return f"{self.base_url(plain_http)}/v2/{self.repository}/manifests/{reference or self.reference}"

    def blob_url(self, plain_http: bool, digest: str) -> str:
        return f"{self.base_url(plain_http)}/v2/{self.repository}/blobs/{digest}"

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}"
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name


def parse_reference(text: str) -> ImageReference:
    """``IMAGE[:TAG|@DIGEST]`` as Docker reads it; raises InvalidRequest naming what is wrong."""
    name, _, digest = text.strip().partition("@")
    if digest and not _DIGEST.match(digest):
        raise InvalidRequest(f"image {text!r}: {digest!r} is not a sha256:<64 hex> or sha512:<128 hex> digest")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a colon after the last slash is a tag, not a registry port
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidRequest(f"image {text!r}: tag {tag!r} is not valid (letters, digits, _ . -, up to 128)")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
        if not _REGISTRY.match(registry):
            raise InvalidRequest(f"image {text!r}: registry {registry!r} is not a host[:port]")
    else:
        registry, repository = DOCKER_HUB, name
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise InvalidRequest(f"image {text!r}: repository {repository!r} is not valid "
                             "(lowercase letters, digits and separators . _ - /)")
    if not tag and not digest:
        tag = DEFAULT_TAG
    return ImageReference(registry, repository, tag, digest)


@dataclass(frozen=True, order=True)
class Platform:
    """``os/architecture[/variant]``, e.g. ``linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def matches(self, wanted: Platform) -> bool:
        """Whether this (an index entry's platform) satisfies `wanted` (a filter).

        A filter without a variant takes every variant; arm64's variant defaults to v8 on both
        sides, as containerd normalises it.
        """
        if (self.os, self.architecture) != (wanted.os, wanted.architecture):
            return False
        if not wanted.variant:
            return True
        return _variant(self) == _variant(wanted)


def _variant(platform: Platform) -> str:
    if platform.architecture == "arm64" and not platform.variant:
        return "v8"
    return platform.variant


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]``; raises InvalidRequest."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidRequest(f"platform {text!r} is not os/arch or os/arch/variant (e.g. linux/amd64)")
    return Platform(*parts)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest or an index says about a blob or a manifest."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_nydus_bootstrap(self) -> bool:
        return self.annotations.get(NYDUS_BOOTSTRAP_ANNOTATION, "").lower() == "true"

    @property
    def is_attestation(self) -> bool:
        return (self.annotations.get(REFERENCE_TYPE_ANNOTATION) == "attestation-manifest"
                or (self.platform is not None and self.platform.os == "unknown"))


@dataclass(frozen=True)
class Index:
    """An OCI image index or a Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config blob and its layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Blob:
    """One blob to preheat."""

    digest: str
    size: int
    media_type: str
    kind: str  # "config", "layer", "nydus-bootstrap" or "nydus-blob"
    platforms: tuple[str, ...]  # the platforms whose pull reads it ("" when the image has no index)


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} is not a descriptor object")
    digest, size, media_type = value.get("digest"), value.get("size"), value.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidRequest(f"{where} has no valid digest ({digest!r})")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequest(f"{where} ({digest}) has no valid size ({size!r})")
    if not isinstance(media_type, str):
        raise InvalidRequest(f"{where} ({digest}) has a mediaType that is not a string")
    platform = None
    raw_platform = value.get("platform")
    if isinstance(raw_platform, dict):
        platform = Platform(str(raw_platform.get("os", "")).lower(), str(raw_platform.get("architecture", "")).lower(),
                            str(raw_platform.get("variant", "")).lower())
    raw_annotations = value.get("annotations") or {}
    annotations = ({str(k): str(v) for k, v in raw_annotations.items()} if isinstance(raw_annotations, dict) else {})
    return Descriptor(media_type, digest, size, platform, annotations)


def parse_document(body: bytes, content_type: str = "") -> Index | Manifest:
    """Parse a manifest or an index. The document's own ``mediaType`` wins over `content_type`
    (the registry's ``Content-Type``); with neither, the shape decides (``manifests`` vs
    ``layers``). Raises InvalidRequest naming what is wrong."""
    if len(body) > MAX_DOCUMENT_BYTES:
        raise InvalidRequest(f"manifest is {len(body)} bytes, more than the {MAX_DOCUMENT_BYTES} a registry accepts")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"manifest is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("manifest is not a JSON object")
    declared = document.get("mediaType") or content_type.split(";")[0].strip()
    if declared in DOCKER_SCHEMA1 or document.get("schemaVersion") == 1:
        raise InvalidRequest("Docker schema 1 manifests are not supported; push the image again with a current client")
    if declared in INDEX_TYPES or (declared not in MANIFEST_TYPES and "manifests" in document):
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise InvalidRequest("image index has no 'manifests' list")
        return Index(declared or OCI_INDEX,
                     tuple(_descriptor(e, f"index entry {i}") for i, e in enumerate(entries)))
    if declared in MANIFEST_TYPES or "layers" in document:
        layers = document.get("layers")
        if not isinstance(layers, list):
            raise InvalidRequest("image manifest has no 'layers' list")
        return Manifest(declared or OCI_MANIFEST, _descriptor(document.get("config"), "config"),
                        tuple(_descriptor(layer, f"layer {i}") for i, layer in enumerate(layers)))
    raise InvalidRequest(f"not an image manifest or index (mediaType {declared!r})")


def check_digest(body: bytes, expected: str) -> None:
    """Raise InvalidRequest unless `body` has the `expected` digest (a manifest fetched by digest)."""
    algorithm, _, _ = expected.partition(":")
    if algorithm not in ("sha256", "sha512"):
        raise InvalidRequest(f"unsupported digest algorithm in {expected!r}")
    actual = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
    if actual != expected:
        raise InvalidRequest(f"manifest content has digest {actual}, not the {expected} it was fetched by")


def select_manifests(index: Index, platforms: Sequence[Platform]) -> list[Descriptor]:
    """The index entries to pull: those matching any of `platforms` (all when empty).

    Attestations are skipped. Raises InvalidRequest when a requested platform has no entry,
    naming the platforms the index offers.
    """
    images = [entry for entry in index.manifests if not entry.is_attestation]
    if not platforms:
        return images
    chosen = [entry for entry in images if entry.platform is not None
              and any(entry.platform.matches(wanted) for wanted in platforms)]
    missing = [str(wanted) for wanted in platforms
               if not any(entry.platform is not None and entry.platform.matches(wanted) for entry in images)]
    if missing:
        offered = sorted({str(entry.platform) for entry in images if entry.platform is not None})
        raise InvalidRequest(f"the image has no {', '.join(missing)} manifest; "
                             f"it offers {', '.join(offered) or 'none'}")
    return chosen


def _kind(descriptor: Descriptor) -> str:
    if descriptor.is_nydus_bootstrap:
        return "nydus-bootstrap"
    if descriptor.media_type == NYDUS_BLOB:
        return "nydus-blob"
    return "layer"


def blobs_to_preheat(manifests: Iterable[tuple[str, Manifest]]) -> list[Blob]:
    """The blobs of `manifests` (each with the platform it was chosen for), config then layers
    in manifest order, each digest once with every platform that reads it."""
    order: list[str] = []
    found: dict[str, tuple[Descriptor, str, list[str]]] = {}
    for platform, manifest in manifests:
        entries = [(manifest.config, "config"), *((layer, _kind(layer)) for layer in manifest.layers)]
        for descriptor, kind in entries:
            known = found.get(descriptor.digest)
            if known is None:
                order.append(descriptor.digest)
                found[descriptor.digest] = (descriptor, kind, [platform])
            elif platform not in known[2]:
                known[2].append(platform)
    return [Blob(digest, found[digest][0].size, found[digest][0].media_type, found[digest][1],
                 tuple(found[digest][2])) for digest in order]


_MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")


def parse_manifest_url(url: str) -> tuple[ImageReference, bool]:
    """``http(s)://HOST/v2/NAME/manifests/REF`` (how Dragonfly's ``PreheatImage`` names an image)
    as a reference and whether it is plain HTTP. Raises InvalidRequest."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    match = _MANIFEST_PATH.match(slash + path)
    if scheme not in ("http", "https") or not host or not match:
        raise InvalidRequest(f"image URL {url!r} is not http(s)://HOST/v2/NAME/manifests/TAG-OR-DIGEST")
    if not _REGISTRY.match(host):
        raise InvalidRequest(f"image URL {url!r}: {host!r} is not a host[:port]")
    reference = match["reference"]
    separator = "@" if ":" in reference else ":"
    # The host is the registry whatever it looks like, so it is set after parsing the rest.
    parsed = parse_reference(f"registry.invalid/{match['name']}{separator}{reference}")
    return dataclasses.replace(parsed, registry=host), scheme == "http"
