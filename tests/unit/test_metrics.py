"""Metric families: names promtool accepts, bounded labels, zeros from the start, and no drift
between the code and what the dashboards and alert rules query.

The real-process counterpart (a real Prometheus scraping a running network) is
tests/integration/test_monitoring.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.clock import ManualClock
from common.config import SchedulerConfig
from peer import metrics as peer_metrics
from peer.metrics import DaemonMetrics, status_class
from scheduler.core import SchedulerCore
from scheduler.service import DECISION_KINDS, EXPECTED_GRPC_ERRORS, SchedulerMetrics

PROMTOOL = "/usr/bin/promtool"
CHART = Path(__file__).resolve().parents[2] / "charts" / "damselfly"

# Every label of every family, and the values it may take (None: checked elsewhere).
DAEMON_LABELS: dict[str, tuple[str, ...]] = {
    "type": peer_metrics.TRAFFIC_TYPES,
    "result": peer_metrics.TASK_RESULTS + peer_metrics.UPLOAD_RESULTS,
    "reason": peer_metrics.PIECE_FAILURE_REASONS + peer_metrics.GC_REASONS,
    "route": peer_metrics.PROXY_ROUTES,
    "status": peer_metrics.STATUS_CLASSES,
    "kind": peer_metrics.BACK_SOURCE_ERROR_KINDS,
    "limit": peer_metrics.ADMISSION_LIMITS,
}


def exercised_daemon_metrics() -> DaemonMetrics:
    """A DaemonMetrics where every family has been updated at least once."""
    m = DaemonMetrics()
    for traffic in peer_metrics.TRAFFIC_TYPES:
        m.download_traffic.labels(traffic).inc(4 << 20)
        m.piece_duration.labels(traffic).observe(0.02)
    m.upload_traffic.inc(4 << 20)
    m.upload_pieces.labels("succeeded").inc()
    m.tasks.labels("started").inc()
    m.tasks.labels("succeeded").inc()
    m.task_duration.observe(1.5)
    m.concurrent_downloads.inc()
    m.concurrent_uploads.inc()
    m.piece_failures.labels("digest").inc()
    m.count_proxy_request("p2p", 206, has_range=True)
    m.count_proxy_request("mirror", 404)
    m.cache_hits.inc()
    m.cache_used.set(1 << 30)
    m.cache_quota.set(10 << 30)
    m.count_gc_eviction("quota")
    m.back_source_duration.observe(0.3)
    m.back_source_errors.labels("status").inc()
    return m


def exercised_scheduler_metrics() -> SchedulerMetrics:
    m = SchedulerMetrics(SchedulerCore(SchedulerConfig(), ManualClock()))
    m.peers_registered.labels("level0", "normal").inc()
    m.peers_registered.labels("level0", "seed").inc()
    for kind in DECISION_KINDS:
        m.decisions.labels(kind).inc()
    m.schedule_duration.observe(0.0004)
    m.piece_reports.labels("remote_peer").inc()
    m.piece_bytes.labels("remote_peer").inc(4 << 20)
    m.grpc_errors.labels("StatTask", "NOT_FOUND").inc()
    return m


def promtool_check(exposition: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, timeout=30)


@pytest.mark.parametrize("make", [DaemonMetrics, exercised_daemon_metrics,
                                  lambda: SchedulerMetrics(SchedulerCore(SchedulerConfig(), ManualClock())),
                                  exercised_scheduler_metrics])
def test_promtool_accepts_the_exposition(make: object) -> None:
    exposition = generate_latest(make().registry)  # type: ignore[operator]
    check = promtool_check(exposition)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    # Sanity of the check itself: promtool does reject a bad name.
    assert promtool_check(b"# TYPE bad_counter counter\nbad_counter 1\n").returncode != 0


def test_every_daemon_family_has_samples_before_any_event() -> None:
    """Known label values start at zero, so rates and dashboard panels exist from the first scrape."""
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(DaemonMetrics().registry).decode())}
    for name, family in families.items():
        assert family.samples, f"{name} has no sample before the first event"
    proxy = families["damselfly_dfdaemon_proxy_requests"]
    assert len([s for s in proxy.samples if s.name.endswith("_total")]) == (
        len(peer_metrics.PROXY_ROUTES) * len(peer_metrics.STATUS_CLASSES))
    pieces = families["damselfly_dfdaemon_piece_download_duration_seconds"]
    assert {s.labels["type"] for s in pieces.samples} == set(peer_metrics.TRAFFIC_TYPES)


def test_labels_stay_within_their_vocabularies() -> None:
    exposition = generate_latest(exercised_daemon_metrics().registry).decode()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                assert label in DAEMON_LABELS, f"{family.name}: unexpected label {label}"
                assert value in DAEMON_LABELS[label], f"{family.name}: {label}={value!r}"


@pytest.mark.parametrize(("status", "label"), [
    (200, "2xx"), (206, "2xx"), (304, "3xx"), (307, "3xx"), (400, "4xx"), (416, "4xx"), (502, "5xx"),
    (599, "5xx"), (101, "5xx"), (0, "5xx"), (700, "5xx"),
])
def test_status_class(status: int, label: str) -> None:
    assert status_class(status) == label


def test_proxy_and_gc_helpers_count_and_refuse_unknown_values() -> None:
    m = DaemonMetrics()
    m.count_proxy_request("p2p", 206, has_range=True)
    m.count_proxy_request("p2p", 200)
    assert m.proxy_requests.labels("p2p", "2xx")._value.get() == 2
    assert m.range_requests._value.get() == 1
    with pytest.raises(ValueError, match="unknown proxy route"):
        m.count_proxy_request("https://registry.example/v2/x", 200)
    m.count_gc_eviction("ttl")
    assert m.gc_evictions.labels("ttl")._value.get() == 1
    with pytest.raises(ValueError, match="unknown GC reason"):
        m.count_gc_eviction("because")


def test_scheduler_grpc_errors_known_pairs_start_at_zero() -> None:
    m = SchedulerMetrics(SchedulerCore(SchedulerConfig(), ManualClock()))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    pairs = {(s.labels["method"], s.labels["code"]) for s in families["damselfly_scheduler_grpc_errors"].samples
             if s.name.endswith("_total")}
    assert pairs == set(EXPECTED_GRPC_ERRORS)
    assert ("AnnouncePeer", "RESOURCE_EXHAUSTED") in pairs


def _exposed_names() -> set[str]:
    names: set[str] = set()
    for registry in (exercised_daemon_metrics().registry, exercised_scheduler_metrics().registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names.update(s.name for s in family.samples)
    return names


def _queried_names(text: str) -> set[str]:
    return set(re.findall(r"\bdamselfly_[a-z_]+\b", text))


@pytest.mark.parametrize("dashboard", sorted(p.name for p in (CHART / "dashboards").glob("*.json")))
def test_dashboards_query_only_exposed_series(dashboard: str) -> None:
    board = json.loads((CHART / "dashboards" / dashboard).read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    assert exprs
    unknown = set().union(*(_queried_names(e) for e in exprs)) - _exposed_names()
    assert not unknown, f"{dashboard} queries series no component exposes: {sorted(unknown)}"


def test_dashboards_shape() -> None:
    """Grafana conventions the chart relies on: a ${datasource} variable, a $job selector, unique ids."""
    for path in sorted((CHART / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert 36 <= board["schemaVersion"] <= 41
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["description"], panel["title"]
            for target in panel["targets"]:
                assert 'job=~"$job"' in target["expr"], (path.name, panel["title"])


def test_alert_rules_query_only_exposed_series() -> None:
    rules = (CHART / "templates" / "prometheusrule.yaml").read_text()
    queried = _queried_names(rules)
    assert queried
    assert not queried - _exposed_names(), sorted(queried - _exposed_names())
