"""Preheat, the parts the CLI and the scheduler share: resolving an image to the blobs a pull
reads (the network half of :mod:`common.oci`), and what ``PreheatFile`` answers.

:func:`resolve_image` fetches the manifest (or index, then the chosen platforms' manifests, by
digest and digest-checked) through an :class:`~common.origin.OriginClient`, so Bearer token
auth, Basic auth and redirects work as they do for every back-to-source. Documents are read
up to :data:`common.oci.MAX_DOCUMENT_BYTES`; everything else is decided by :mod:`common.oci`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import oci
from common.errors import InvalidRequest
from common.origin import OriginClient

# Trailing metadata of a successful Scheduler.PreheatFile (Dragonfly's answer is Empty):
RESULT_KEY = "damselfly-preheat-result"  # "fetched" by the seed, or "cached": the seed had it
SEED_KEY = "damselfly-preheat-seed"  # the gRPC address of the seed that holds the blob


@dataclass(frozen=True)
class ResolvedImage:
    """An image and the blobs to preheat for the chosen platforms."""

    reference: oci.ImageReference
    manifests: tuple[tuple[str, str], ...]  # (platform or "", manifest digest) pulled
    blobs: tuple[oci.Blob, ...]


async def fetch_document(origin: OriginClient, url: str, headers: Mapping[str, str]) -> tuple[bytes, str]:
    """GET a manifest or index; its bytes and ``Content-Type``. Raises the origin's errors."""
    async with origin.get(url, {**headers, "Accept": oci.ACCEPT}) as body:
        if body.content_length is not None and body.content_length > oci.MAX_DOCUMENT_BYTES:
            raise InvalidRequest(f"{url}: manifest of {body.content_length} bytes is larger than a registry accepts")
        data = bytearray()
        async for chunk in body.chunks():
            data += chunk
            if len(data) > oci.MAX_DOCUMENT_BYTES:
                raise InvalidRequest(f"{url}: manifest is larger than the {oci.MAX_DOCUMENT_BYTES} bytes "
                                     "a registry accepts")
        content_type = next((v for k, v in body.headers.items() if k.lower() == "content-type"), "")
        return bytes(data), content_type


async def resolve_image(
    origin: OriginClient, reference: oci.ImageReference, platforms: Sequence[oci.Platform], *,
    plain_http: bool = False, headers: Mapping[str, str] | None = None,
) -> ResolvedImage:
    """The blobs a pull of `reference` reads for `platforms` (all platforms when empty).

    `headers` go with every request (an ``Authorization: Basic`` for a private registry: the
    origin client trades it for a Bearer token when the registry asks). Raises InvalidRequest
    for a document that is not a usable image, and the origin's errors as they are.
    """
    sent = dict(headers or {})
    url = reference.manifest_url(plain_http)
    body, content_type = await fetch_document(origin, url, sent)
    if reference.digest:
        oci.check_digest(body, reference.digest)
    document = _parse(body, content_type, url)
    chosen: list[tuple[str, oci.Manifest]] = []
    pulled: list[tuple[str, str]] = []
    if isinstance(document, oci.Manifest):
        # A single-platform image names its platform only in its config blob: it is preheated
        # whatever --platform says (a pull on any node reads exactly these blobs).
        chosen.append(("", document))
        pulled.append(("", reference.digest or reference.reference))
    else:
        for entry in oci.select_manifests(document, platforms):
            child_url = reference.manifest_url(plain_http, entry.digest)
            child_body, child_type = await fetch_document(origin, child_url, sent)
            oci.check_digest(child_body, entry.digest)
            child = _parse(child_body, child_type or entry.media_type, child_url)
            if not isinstance(child, oci.Manifest):
                raise InvalidRequest(f"{child_url}: an index inside an index is not supported")
            platform = str(entry.platform) if entry.platform is not None else ""
            chosen.append((platform, child))
            pulled.append((platform, entry.digest))
    return ResolvedImage(reference, tuple(pulled), tuple(oci.blobs_to_preheat(chosen)))


def _parse(body: bytes, content_type: str, url: str) -> oci.Index | oci.Manifest:
    try:
        return oci.parse_document(body, content_type)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{url}: {exc}") from None
