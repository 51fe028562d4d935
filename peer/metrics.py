"""Prometheus metrics of a dfdaemon (and of a seed, which is a dfdaemon with ``--seed``).

Names follow what Dragonfly's dfdaemon exposes, with our own prefix. Every daemon owns its
registry (explicit wiring, no globals), so several daemons can live in one test process.
Labels carry only bounded values: traffic types, result names, status classes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "damselfly_dfdaemon"
TRAFFIC_TYPES = ("back_to_source", "remote_peer", "local_peer")
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_PIECE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DaemonMetrics:
    """All metric families of one dfdaemon."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.download_traffic = Counter(
            f"{PREFIX}_download_traffic_bytes", "Bytes downloaded, by where they came from", ["type"], registry=r
        )
        self.upload_traffic = Counter(f"{PREFIX}_upload_traffic_bytes", "Piece bytes served to other peers",
                                      registry=r)
        self.upload_pieces = Counter(f"{PREFIX}_upload_pieces", "Pieces served to other peers, by result",
                                     ["result"], registry=r)
        self.tasks = Counter(f"{PREFIX}_tasks", "Download tasks by result (started, succeeded, failed)",
                             ["result"], registry=r)
        self.task_duration = Histogram(f"{PREFIX}_task_duration_seconds", "Duration of finished downloads",
                                       buckets=_DURATION_BUCKETS, registry=r)
        self.concurrent_downloads = Gauge(f"{PREFIX}_concurrent_downloads", "Downloads in progress", registry=r)
        self.concurrent_uploads = Gauge(f"{PREFIX}_concurrent_uploads", "Piece uploads in progress", registry=r)
        self.piece_duration = Histogram(f"{PREFIX}_piece_download_duration_seconds",
                                        "Time to fetch and verify one piece, by source", ["type"],
                                        buckets=_PIECE_BUCKETS, registry=r)
        self.piece_failures = Counter(f"{PREFIX}_piece_failures", "Pieces that failed, by reason", ["reason"],
                                      registry=r)
        self.proxy_requests = Counter(f"{PREFIX}_proxy_requests", "Proxy requests by route and status class",
                                      ["route", "status"], registry=r)
        self.range_requests = Counter(f"{PREFIX}_proxy_range_requests", "Proxy requests that carried a Range",
                                      registry=r)
        self.cache_hits = Counter(f"{PREFIX}_cache_hits", "Requests answered entirely from the local cache",
                                  registry=r)
        self.cache_used = Gauge(f"{PREFIX}_cache_used_bytes", "Bytes of content in the piece cache", registry=r)
        self.cache_quota = Gauge(f"{PREFIX}_cache_quota_bytes", "Cache quota (0: no quota)", registry=r)
        self.gc_evictions = Counter(f"{PREFIX}_gc_evicted_tasks", "Tasks evicted by the cache GC, by reason",
                                    ["reason"], registry=r)
        self.back_source_duration = Histogram(f"{PREFIX}_back_to_source_duration_seconds",
                                              "Duration of one ranged GET to the origin", buckets=_PIECE_BUCKETS,
                                              registry=r)
        self.back_source_errors = Counter(f"{PREFIX}_back_to_source_errors", "Origin errors, by kind", ["kind"],
                                          registry=r)
        for traffic in TRAFFIC_TYPES:
            self.download_traffic.labels(traffic)
        for result in ("started", "succeeded", "failed"):
            self.tasks.labels(result)
