"""Demand reaches the origin (issue 10): a Range read through the mirror on a cold blob is answered
before the seed has back-sourced the blob, because the child asks the seed for the piece it waits
for and the seed fetches that piece from the origin first.

Real processes (scheduler, seed, one dfdaemon as registry mirror without prefetch), a real
registry behind a byte-counting relay that paces the origin link, so the seed's whole-blob
back-sourcing takes seconds and the order it fetches pieces in shows in the relay's count.
"""

from __future__ import annotations

import hashlib
import http.client
from concurrent.futures import ThreadPoolExecutor

import pytest

from common.launcher import LocalCluster, Node
from common.pieces import LAZY_PIECE_LENGTH
from tests.support.cluster import start_network
from tests.support.registry import Registry, push_random_blob
from tests.support.relay import ByteCountingRelay

pytestmark = pytest.mark.integration

MIB = 1 << 20
SIZE = 128 * MIB  # 32 pieces of 4 MiB
ORIGIN_RATE = 48 * MIB  # bytes per second: the whole blob takes the seed about 2.7 s
BACK_TO_SOURCE = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'


def read_range(node: Node, path: str, start: int, end: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=60)
    try:
        connection.request("GET", path, headers={"Range": f"bytes={start}-{end}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_range_read_on_a_cold_blob_returns_before_the_seed_has_the_blob(
        cluster: LocalCluster, registry: Registry) -> None:
    digest, path = push_random_blob(registry, "lazy/demand", SIZE, seed=10)
    blob = path.read_bytes()
    with ByteCountingRelay("127.0.0.1", registry.port, rate=ORIGIN_RATE) as relay:
        seed, (node,) = start_network(cluster, ["node"], "--registry-mirror", relay.url, "--no-prefetch")
        target = f"/v2/lazy/demand/blobs/{digest}"
        relay.reset()
        # nydusd's first reads: the blob meta at the tail, and a chunk in the middle, at once.
        reads = [(SIZE - 64 * 1024, SIZE - 1), (77 * MIB + 12345, 77 * MIB + 12345 + 4095)]
        with ThreadPoolExecutor(len(reads)) as pool:
            answers = list(pool.map(lambda r: read_range(node, target, *r), reads))
        origin_bytes = relay.bytes_from_target
        seed_bytes = seed.metrics().get(BACK_TO_SOURCE, 0)

    for (start, end), (status, body) in zip(reads, answers, strict=True):
        assert status == 206
        assert body == blob[start:end + 1], f"bytes {start}-{end} differ from the blob"
    # Front to back, the tail piece would come last: the whole blob through the origin link first.
    assert origin_bytes < SIZE / 2, f"{origin_bytes / MIB:.0f} MiB came from the origin before the reads returned"
    assert seed_bytes < SIZE, "the seed had back-sourced the whole blob already"


def read_whole(node: Node, path: str) -> tuple[int, str]:
    """A plain GET through the mirror: the status and the body's sha256, streamed."""
    connection = http.client.HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=120)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        digest = hashlib.sha256()
        while chunk := response.read(MIB):
            digest.update(chunk)
        return response.status, "sha256:" + digest.hexdigest()
    finally:
        connection.close()


def test_a_lazily_read_blob_is_back_sourced_as_read_until_a_whole_download_wants_it_all(
        cluster: LocalCluster, registry: Registry) -> None:
    """Without prefetch the seed fetches the pieces readers wait for, not the blob: origin traffic
    is what is read (in LAZY_PIECE_LENGTH pieces). A plain GET later makes the seed fetch the rest, once."""
    digest, path = push_random_blob(registry, "lazy/only", SIZE, seed=11)
    blob = path.read_bytes()
    with ByteCountingRelay("127.0.0.1", registry.port, rate=ORIGIN_RATE) as relay:
        seed, (first, second) = start_network(cluster, ["first", "second"], "--registry-mirror", relay.url,
                                              "--no-prefetch")
        target = f"/v2/lazy/only/blobs/{digest}"
        relay.reset()
        reads = [(SIZE - 64 * 1024, SIZE - 1), (77 * MIB + 12345, 77 * MIB + 12345 + 4095),
                 (5 * MIB - 100, 5 * MIB + 99)]  # the last one spans two pieces
        for node in (first, second):  # the second reader gets them from the swarm
            for start, end in reads:
                status, body = read_range(node, target, start, end)
                assert status == 206 and body == blob[start:end + 1], f"bytes {start}-{end} differ from the blob"
        lazily = relay.bytes_from_target
        seed_lazily = seed.metrics().get(BACK_TO_SOURCE, 0)

        status, whole = read_whole(second, target)
        total = relay.bytes_from_target

    # 4 pieces of a lazily read blob cover the reads; with larger pieces or a whole-blob fetch it
    # would be more.
    pieces = 4 * LAZY_PIECE_LENGTH
    assert seed_lazily == pieces, f"the seed back-sourced {seed_lazily / MIB:.1f} MiB for 4 pieces' worth of reads"
    assert lazily < 1.05 * pieces, f"{lazily / MIB:.1f} MiB came from the origin for reads of 4 pieces"
    assert status == 200 and whole == digest
    assert total < 1.03 * SIZE, f"{total / MIB:.0f} MiB came from the origin for a {SIZE // MIB} MiB blob"
