"""``damselfly preheat IMAGE``: put an image's blobs on the seed peers before nodes pull it.

The command resolves the image itself (:mod:`common.preheat`: manifest or index, the
``--platform`` filter, config and every layer, Nydus bootstrap included), then asks, for each
blob, the scheduler that owns the blob's task (rendezvous hash of the task id over
``--scheduler``, the way every dfdaemon picks it) to preheat it with Dragonfly's
``Scheduler.PreheatFile``. That scheduler has the seed that owns the task download it
(:mod:`scheduler.preheat`); a blob a seed already holds is not fetched again. One line is printed
per blob as it completes, then a summary.

Credentials (``--creds`` or a Docker ``config.json`` given with ``--auth-file``) are used to read
the manifests here and travel to the scheduler, then to the seed, as the ``Authorization``
header of each blob's download: the registry's token service is asked by whoever reads.

Exit codes: 0 every blob is on a seed, 1 something failed (the line names the blob), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

from common import hashring, ids, oci
from common.config import parse_address
from common.errors import ConfigError, DamselflyError, InvalidRequest, OriginError, OriginStatusError, one_line
from common.origin import OriginClient, basic_authorization
from common.preheat import RESULT_KEY, SEED_KEY, ResolvedImage, resolve_image
from common.tls import TlsCredentials, open_channel
from common.units import format_size

DEFAULT_SCHEDULER = "127.0.0.1:8002"
# Blobs preheated at once: the seeds download them in parallel, pieces in parallel within each.
CONCURRENT_BLOBS = 4
# How long one blob may take (a multi-GB layer from a slow registry).
BLOB_TIMEOUT = 2 * 3600.0
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Options:
    """One ``damselfly preheat``, validated."""

    image: oci.ImageReference
    platforms: tuple[oci.Platform, ...]
    schedulers: tuple[str, ...]
    authorization: str | None  # an Authorization: Basic value, or None for anonymous
    plain_http: bool
    tls: TlsCredentials | None = None  # to the schedulers; None: plaintext


@dataclasses.dataclass(frozen=True)
class BlobResult:
    blob: oci.Blob
    outcome: str  # "fetched", "cached" or "failed"
    detail: str  # the seed, or the error
    seconds: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="damselfly preheat",
        description="Have the seed peers download an image's blobs, so that nodes pulling it get them over P2P.",
    )
    parser.add_argument("image", metavar="IMAGE[:TAG|@DIGEST]",
                        help="image reference, e.g. registry.example.com/team/app:v1 (Docker Hub names work too)")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", action="append", default=[],
                        help="preheat only this platform of a multi-platform image (repeatable, or comma-separated; "
                             "default: every platform)")
    parser.add_argument("--scheduler", metavar="HOST:PORT,...", action="append", default=[],
                        help=f"scheduler gRPC addresses, the same list the dfdaemons use (default {DEFAULT_SCHEDULER})")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials")
    auth.add_argument("--auth-file", metavar="FILE",
                      help="Docker config.json holding the registry's credentials (as written by docker login)")
    parser.add_argument("--plain-http", action="store_true",
                        help="talk to the registry over plain HTTP (a registry without TLS), as ctr and oras do")
    tls = parser.add_argument_group("TLS to the schedulers (when the cluster runs with tls_* set)")
    tls.add_argument("--tls-ca-cert", metavar="PEM", default="", help="CA the schedulers' certificates chain to")
    tls.add_argument("--tls-cert", metavar="PEM", default="", help="client certificate (mutual TLS)")
    tls.add_argument("--tls-key", metavar="PEM", default="", help="key of --tls-cert")
    tls.add_argument("--tls-server-name", metavar="NAME", default="",
                     help="check the schedulers' certificates for this name instead of the address dialed")
    return parser


def _split(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def credentials_from_auth_file(path: str, registry: str) -> str | None:
    """The ``Authorization: Basic`` value for `registry` in a Docker ``config.json``, or None."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("--auth-file", f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("--auth-file", f"{path} is not JSON: {exc}") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise ConfigError("--auth-file", f"{path} has no 'auths' object (a Docker config.json does)")
    names = [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]
    if registry == oci.DOCKER_HUB:
        names += ["https://index.docker.io/v1/", "index.docker.io", oci.DOCKER_HUB_API]
    entry = next((auths[name] for name in names if isinstance(auths.get(name), dict)), None)
    if entry is None:
        return None
    if entry.get("username") and entry.get("password"):
        return basic_authorization(str(entry["username"]), str(entry["password"]))
    encoded = entry.get("auth")
    if not isinstance(encoded, str) or not encoded:
        raise ConfigError("--auth-file", f"the entry for {registry} in {path} has no 'auth' nor username/password "
                                         "(credential helpers are not read: use --creds)")
    try:
        user, separator, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigError("--auth-file", f"the 'auth' of {registry} in {path} is not base64 of user:password") from None
    if not separator:
        raise ConfigError("--auth-file", f"the 'auth' of {registry} in {path} is not base64 of user:password")
    return basic_authorization(user, password)


def parse_options(argv: Sequence[str]) -> Options:
    """Options from the command line; bad usage exits with status 2 (argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        image = oci.parse_reference(args.image)
        platforms = tuple(oci.parse_platform(text) for text in _split(args.platform))
        schedulers = tuple(dict.fromkeys(parse_address(text) for text in _split(args.scheduler) or [DEFAULT_SCHEDULER]))
        authorization: str | None = None
        if args.creds is not None:
            user, separator, password = args.creds.partition(":")
            if not separator or not user:
                raise ConfigError("--creds", "must be USER:PASSWORD")
            authorization = basic_authorization(user, password)
        elif args.auth_file is not None:
            authorization = credentials_from_auth_file(args.auth_file, image.registry)
        tls = None
        if args.tls_cert or args.tls_key or args.tls_ca_cert:
            tls = TlsCredentials.load(ca_cert=args.tls_ca_cert, cert=args.tls_cert, key=args.tls_key,
                                      client_auth=bool(args.tls_ca_cert), server_name=args.tls_server_name)
    except (DamselflyError, ValueError) as exc:
        parser.error(str(exc))
    return Options(image, platforms, schedulers, authorization, args.plain_http, tls)


def describe(blob: oci.Blob) -> str:
    """``layer sha256:… (3.0 MiB, linux/amd64)``: how a line names a blob."""
    where = ", ".join(p for p in blob.platforms if p)
    return f"{blob.kind} {blob.digest} ({format_size(blob.size)}{', ' + where if where else ''})"


def format_result(number: int, total: int, result: BlobResult) -> str:
    """The line printed when a blob is done."""
    prefix = f"[{number}/{total}] {describe(result.blob)}"
    if result.outcome == "failed":
        return f"{prefix}: FAILED: {result.detail}"
    what = "already on seed" if result.outcome == "cached" else "fetched by seed"
    return f"{prefix}: {what} {result.detail} in {result.seconds:.1f}s"


def format_summary(image: oci.ImageReference, results: Sequence[BlobResult], elapsed: float) -> str:
    counts = {outcome: sum(1 for r in results if r.outcome == outcome) for outcome in ("fetched", "cached", "failed")}
    size = sum(r.blob.size for r in results if r.outcome != "failed")
    verdict = "preheated" if not counts["failed"] else "preheat FAILED for"
    return (f"{verdict} {image}: {len(results) - counts['failed']}/{len(results)} blobs ({format_size(size)}) "
            f"on seeds in {elapsed:.1f}s: {counts['fetched']} fetched, {counts['cached']} already there, "
            f"{counts['failed']} failed")


def _rpc_reason(error: Any, scheduler: str) -> str:
    code = error.code()
    details = one_line(error.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"scheduler {scheduler} unavailable ({details or 'no answer'}); is it running, is --scheduler right?"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"scheduler {scheduler} does not serve PreheatFile (a Damselfly scheduler does): {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"not done after {BLOB_TIMEOUT / 3600:.0f}h"
    return details or code.name


async def resolve(options: Options) -> ResolvedImage:
    """The image's blobs for the chosen platforms; errors say what to do (the registry's as OriginError)."""
    headers = {"Authorization": options.authorization} if options.authorization else {}
    try:
        async with OriginClient() as origin:
            return await resolve_image(origin, options.image, options.platforms,
                                       plain_http=options.plain_http, headers=headers)
    except OriginStatusError as exc:
        hint = ""
        if exc.status == 401:
            hint = " (credentials missing or refused: pass --creds USER:PASSWORD or --auth-file)"
        elif exc.status == 404:
            hint = " (no such image or tag)"
        raise OriginError(f"cannot read {options.image}: {one_line(str(exc))}{hint}") from None
    except OriginError as exc:
        hint = "" if options.plain_http else " (a registry without TLS needs --plain-http)"
        raise OriginError(f"cannot reach the registry of {options.image}: {one_line(str(exc))}{hint}") from None
    except InvalidRequest as exc:
        raise InvalidRequest(f"{options.image}: {one_line(str(exc))}") from None


async def preheat_blobs(options: Options, image: ResolvedImage, out: TextIO) -> list[BlobResult]:
    """Ask the owning scheduler to preheat each blob; print a line per blob as it completes."""
    headers = {"Authorization": options.authorization} if options.authorization else {}
    channels = {address: open_channel(address, options.tls) for address in options.schedulers}
    limit = asyncio.Semaphore(CONCURRENT_BLOBS)
    results: list[BlobResult] = []
    total = len(image.blobs)

    async def one(blob: oci.Blob) -> None:
        url = options.image.blob_url(options.plain_http, blob.digest)
        scheduler = hashring.choose(options.schedulers, ids.task_id(url))
        assert scheduler is not None  # parse_options gives at least one
        stub = scheduler_pb2_grpc.SchedulerStub(channels[scheduler])
        async with limit:
            started = time.monotonic()
            try:
                call = stub.PreheatFile(scheduler_pb2.PreheatFileRequest(url=url, header=headers),
                                        timeout=BLOB_TIMEOUT)
                await call
                metadata = dict(await call.trailing_metadata() or ())
                result = BlobResult(blob, str(metadata.get(RESULT_KEY, "fetched")), str(metadata.get(SEED_KEY, "?")),
                                    time.monotonic() - started)
            except grpc.aio.AioRpcError as exc:
                result = BlobResult(blob, "failed", _rpc_reason(exc, scheduler), time.monotonic() - started)
        results.append(result)
        print(format_result(len(results), total, result), file=out, flush=True)

    try:
        async with asyncio.TaskGroup() as group:
            for blob in image.blobs:
                group.create_task(one(blob))
    finally:
        for channel in channels.values():
            await channel.close()
    return results


async def run(options: Options, out: TextIO) -> int:
    started = time.monotonic()
    image = await resolve(options)
    size = sum(blob.size for blob in image.blobs)
    platforms = ", ".join(p for p, _ in image.manifests if p) or "a single-platform image"
    print(f"preheating {options.image}: {len(image.blobs)} blobs ({format_size(size)}) of {platforms}, "
          f"via {', '.join(options.schedulers)}", file=out, flush=True)
    results = await preheat_blobs(options, image, out)
    print(format_summary(options.image, results, time.monotonic() - started), file=out, flush=True)
    return EXIT_FAILURE if any(r.outcome == "failed" for r in results) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``damselfly preheat``."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return asyncio.run(run(options, sys.stdout))
    except DamselflyError as exc:
        print(f"damselfly preheat: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("damselfly preheat: error: interrupted", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
