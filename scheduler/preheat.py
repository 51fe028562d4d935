"""Preheat on the scheduler: Dragonfly's ``PreheatFile`` and ``PreheatImage`` RPCs.

A preheat of one blob goes the way every seed trigger goes: the seed that owns the task
(rendezvous hash of the task id over the available seeds, as :mod:`scheduler.core` picks it)
gets ``DfdaemonUpload.DownloadTask`` over the service's channel to it, and the call returns when
that seed holds the whole content. The seed's dfdaemon registers the download with the scheduler
that owns the task like any peer: a blob another peer holds comes over P2P, one nobody holds is
back-sourced, and one the seed already holds is answered from its cache without a byte from the
origin (the trailing metadata :data:`RESULT_KEY` says ``cached``). A seed that is down
(``UNAVAILABLE``) is cooled down as for a trigger and the next seed in rank order is asked; any
other error of the seed ends the call with its code and a message naming the blob.

- ``PreheatFile``: one URL (``damselfly preheat`` sends one per blob, to the scheduler that owns
  the blob's task, and prints a line per blob as each returns).
- ``PreheatImage``: an image by its manifest URL (``http(s)://HOST/v2/NAME/manifests/REF``); the
  scheduler resolves it (:mod:`common.preheat`: index, platform filter, Nydus bootstrap) and
  preheats every blob, at most ``concurrent_task_count`` at once. It returns when all are on
  seeds, or fails naming the first blob that could not be preheated.

Preheat needs the ``admin`` role (a certificate with CN ``admin.damselfly``; in plaintext, a caller on
loopback): it makes seeds fetch from origins with the credentials in the request.

Only the ``single_seed_peer`` scope exists here (Dragonfly's default). Credentials travel in the
request (``header`` ``Authorization``, or ``username``/``password``) over the scheduler's gRPC
channel, TLS when the cluster has it, and reach the seed in the download's request header, as
a peer's own credentials do on a trigger; they are never logged nor kept once the call ends.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2
from google.protobuf import empty_pb2

from common import hashring, oci, rpc
from common.download import DownloadRequest, seconds
from common.errors import DamselflyError, DownloadFailed, IntegrityError, InvalidRequest, LocalError
from common.origin import OriginClient, basic_authorization
from common.preheat import RESULT_KEY, SEED_KEY, resolve_image
from common.tls import open_channel
from scheduler.service import SEED_DOWN_CODES, SEED_TRIGGER_TIMEOUT, SchedulerService, caller_of

log = logging.getLogger(__name__)

SUPPORTED_SCOPES = ("", "single_seed_peer")
DEFAULT_IMAGE_CONCURRENCY = 8  # blobs of one PreheatImage preheated at once


class PreheatingSchedulerService(SchedulerService):
    """:class:`SchedulerService` that also serves ``PreheatFile`` and ``PreheatImage``."""

    _origin: OriginClient | None = None

    async def close(self) -> None:
        await super().close()
        if self._origin is not None:
            await self._origin.close()
            self._origin = None

    async def PreheatFile(
        self, request: scheduler_pb2.PreheatFileRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        try:
            self.core.require_admin(caller_of(context), "PreheatFile")
            _check_scope(request.scope)
            download = DownloadRequest(
                url=request.url, tag=request.tag, application=request.application,
                filtered_query_params=tuple(request.filtered_query_params), request_header=dict(request.header),
                piece_length=request.piece_length if request.HasField("piece_length") else None,
                priority=int(request.priority),
            )
            timeout = _timeout(request)
            seed, cached = await self.preheat(download, timeout)
        except DamselflyError as exc:
            await self._abort_with(context, "PreheatFile", exc)
            raise AssertionError("unreachable") from None
        context.set_trailing_metadata(((RESULT_KEY, "cached" if cached else "fetched"), (SEED_KEY, seed)))
        return empty_pb2.Empty()

    async def PreheatImage(
        self, request: scheduler_pb2.PreheatImageRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        try:
            self.core.require_admin(caller_of(context), "PreheatImage")
            await self.preheat_image(request)
        except DamselflyError as exc:
            await self._abort_with(context, "PreheatImage", exc)
        return empty_pb2.Empty()

    async def preheat_image(self, request: scheduler_pb2.PreheatImageRequest) -> None:
        """Resolve the image and preheat each of its blobs; raise naming the first that failed."""
        _check_scope(request.scope)
        reference, plain_http = oci.parse_manifest_url(request.url)
        platforms = [oci.parse_platform(p) for p in request.platform.split(",") if p.strip()]
        headers = dict(request.header)
        if request.username or request.password:
            headers["Authorization"] = basic_authorization(request.username, request.password)
        if self._origin is None:
            self._origin = OriginClient()
        image = await resolve_image(self._origin, reference, platforms, plain_http=plain_http, headers=headers)
        timeout = _timeout(request)
        limit = asyncio.Semaphore(request.concurrent_task_count or DEFAULT_IMAGE_CONCURRENCY)

        async def one(blob: oci.Blob) -> None:
            download = DownloadRequest(url=reference.blob_url(plain_http, blob.digest), tag=request.tag,
                                       application=request.application, request_header=headers,
                                       priority=int(request.priority))
            async with limit:
                try:
                    await self.preheat(download, timeout)
                except DamselflyError as exc:
                    raise type(exc)(f"{blob.kind} {blob.digest} of {reference}: {exc}") from None

        try:
            async with asyncio.TaskGroup() as group:
                for blob in image.blobs:
                    group.create_task(one(blob))
        except BaseExceptionGroup as failures:
            ours = [e for e in failures.exceptions if isinstance(e, DamselflyError)]
            if ours:
                raise ours[0] from None
            raise
        log.info("preheated %s (%d blobs)", reference, len(image.blobs))

    async def preheat(self, download: DownloadRequest, time_limit: float) -> tuple[str, bool]:
        """Have the seed that owns `download`'s task hold it; ``(seed address, already cached)``."""
        task_id = download.task_id
        seeds = hashring.rank(self.core.available_seeds(), task_id)
        if not seeds:
            raise DownloadFailed(f"no seed peer is available to preheat {download.url}: start one and name it "
                                 "with the scheduler's --seed-peer, or wait for it to announce itself")
        for address in seeds:
            try:
                return address, await self._download_on_seed(address, download, time_limit)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in SEED_DOWN_CODES or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # The seed's refusal of the request keeps its kind; any other failure is this
                    # preheat's (FAILED_PRECONDITION), never UNAVAILABLE, which would say the scheduler is down.
                    kind = type(rpc.error_from_rpc(exc, unreachable=DownloadFailed))
                    if not issubclass(kind, LocalError | IntegrityError):
                        kind = DownloadFailed
                    raise kind(f"seed {address}: {' '.join((exc.details() or exc.code().name).split())}") from None
                log.warning("preheat of task %s: seed %s is down (%s)", task_id, address, exc.code().name)
                self.metrics.grpc_errors.labels("SeedTrigger", exc.code().name).inc()
                stale = self._channels.pop(address, None)
                if stale is not None:
                    await stale.close()
                self._dispatch(self.core.seed_trigger_failed(address, task_id))
        raise DownloadFailed(f"every seed peer is down ({', '.join(seeds)}); {download.url} was not preheated")

    async def _download_on_seed(self, address: str, download: DownloadRequest, time_limit: float) -> bool:
        """The seed trigger's call, awaited: True when the seed already had the whole content."""
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, self._tls)
            self._channels[address] = channel
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        call = stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download.to_proto()), timeout=time_limit)
        cached = False
        async for response in call:
            if response.WhichOneof("response") == "download_task_started_response":
                cached = response.download_task_started_response.is_finished
        log.info("preheat of task %s on seed %s: %s", download.task_id, address, "cached" if cached else "fetched")
        return cached


def _check_scope(scope: str) -> None:
    if scope not in SUPPORTED_SCOPES:
        raise InvalidRequest(f"preheat scope {scope!r} is not supported; Damselfly preheats on one seed peer "
                             "per blob (single_seed_peer)")


def _timeout(request: scheduler_pb2.PreheatFileRequest | scheduler_pb2.PreheatImageRequest) -> float:
    if request.HasField("timeout"):
        value = seconds(request.timeout)
        if value > 0:
            return value
    return SEED_TRIGGER_TIMEOUT

