"""Prometheus metrics of a dfdaemon (and of a seed, which is a dfdaemon with ``--seed``).

Names follow what Dragonfly's dfdaemon exposes, with our own prefix. Every daemon owns its
registry (explicit wiring, no globals), so several daemons can live in one test process.

Labels carry only bounded values, and each label's vocabulary is a tuple below. Every known
label value is created at start-up with a zero, so a rate or a ratio over it exists (and a
dashboard panel shows 0, not "no data") before the first event.

Seeds and dfdaemons expose the same families; the scrape configuration tells them apart by the
``job`` label: the Grafana dashboards (charts/damselfly/dashboards) take the jobs whose name
contains ``seed`` as seeds and the other jobs exposing these families as dfdaemons.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "damselfly_dfdaemon"
TRAFFIC_TYPES = ("back_to_source", "remote_peer", "local_peer")
TASK_RESULTS = ("started", "succeeded", "failed")
# Outcomes of one piece request to the piece server (peer/upload/piece_server.py).
UPLOAD_RESULTS = ("succeeded", "failed", "busy", "refused_busy", "not_found", "bad_request")
# Why a piece from a parent was rejected: bad digest, or the transfer failed.
PIECE_FAILURE_REASONS = ("digest", "parent", "geometry")  # geometry: a parent announced a geometry not the swarm's
# Proxy / registry mirror (peer/proxy/server.py): p2p (a blob through the P2P network); passed straight
# to the upstream as a registry mirror request (mirror) or a forward-proxy request (forward);
# an HTTPS tunnel (connect); anything else (other: refused).
PROXY_ROUTES = ("p2p", "mirror", "forward", "connect", "other")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
# Origin errors: an HTTP status from the origin, or no answer at all.
BACK_SOURCE_ERROR_KINDS = ("status", "network")
# Why the cache GC evicted a task: unread for task_ttl, or the cache went over its quota.
GC_REASONS = ("ttl", "quota")
# Which limit refused a P2P proxy request with 429 (proxy_p2p_concurrency, proxy_p2p_rate).
ADMISSION_LIMITS = ("concurrency", "rate")

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_PIECE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def status_class(status: int) -> str:
    """The bounded label of an HTTP status: ``"2xx"`` .. ``"5xx"`` (anything else counts as 5xx)."""
    family = f"{status // 100}xx"
    return family if family in STATUS_CLASSES else "5xx"


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
        self.proxy_rate_limited = Counter(f"{PREFIX}_proxy_rate_limited",
                                          "P2P proxy requests refused with 429, by limit", ["limit"], registry=r)
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
            self.piece_duration.labels(traffic)
        for result in TASK_RESULTS:
            self.tasks.labels(result)
        for result in UPLOAD_RESULTS:
            self.upload_pieces.labels(result)
        for reason in PIECE_FAILURE_REASONS:
            self.piece_failures.labels(reason)
        for route in PROXY_ROUTES:
            for status in STATUS_CLASSES:
                self.proxy_requests.labels(route, status)
        for kind in BACK_SOURCE_ERROR_KINDS:
            self.back_source_errors.labels(kind)
        for reason in GC_REASONS:
            self.gc_evictions.labels(reason)
        for limit in ADMISSION_LIMITS:
            self.proxy_rate_limited.labels(limit)

    def count_proxy_request(self, route: str, status: int, *, has_range: bool = False) -> None:
        """Count one answered proxy request: `route` is one of PROXY_ROUTES, `status` the HTTP status."""
        if route not in PROXY_ROUTES:
            raise ValueError(f"unknown proxy route {route!r}; known: {', '.join(PROXY_ROUTES)}")
        self.proxy_requests.labels(route, status_class(status)).inc()
        if has_range:
            self.range_requests.inc()

    def count_cache_hit(self, served: int) -> None:
        """A request answered entirely from this node's cache: `served` bytes count as local_peer
        traffic, as a dfget cache hit's do (dashboards add the three traffic types up)."""
        self.cache_hits.inc()
        self.download_traffic.labels("local_peer").inc(served)

    def count_gc_eviction(self, reason: str) -> None:
        """Count one task evicted by the cache GC; `reason` is one of GC_REASONS."""
        if reason not in GC_REASONS:
            raise ValueError(f"unknown GC reason {reason!r}; known: {', '.join(GC_REASONS)}")
        self.gc_evictions.labels(reason).inc()
