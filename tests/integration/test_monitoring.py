"""Monitoring end to end: a real Prometheus scrapes a running Damselfly network.

A scheduler, one seed and two dfdaemons run as processes on loopback; Prometheus (the Debian
``prometheus`` binary) scrapes them every second under the job names the dashboards select on
(``damselfly-scheduler``, ``damselfly-seed``, ``damselfly-dfdaemon``). After real downloads (one
blob through both dfdaemons, a cache hit, a 404, an unknown task asked of the scheduler), the
test waits until Prometheus has scraped every target after the last of them, then asks
Prometheus, not the components, for

- every metric family of the issue, with plausible values (the seed read the blob from the
  origin once, the dfdaemons got it from peers, tasks succeeded and failed, ...);
- every expression of every Grafana dashboard in the chart, with the dashboard's own template
  variables resolved the way Grafana does (``label_values`` + the variable's regex), each
  returning data;

and pipes each component's ``/metrics`` through ``promtool check metrics``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

from common.launcher import LocalCluster, Node, free_port, http_get, sha256_file, tail, wait_until
from peer.metrics import PROXY_ROUTES
from tests.support.cluster import run_dfget, start_dfget
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "damselfly" / "dashboards"
MIB = 1 << 20
BLOB_SIZE = 32 * MIB  # 8 pieces of 4 MiB
SMALL_SIZE = 16 * MIB  # a second blob: peer2's quota cannot hold both, so its GC evicts the first
PEER2_QUOTA = 48 * MIB
SCRAPE_INTERVAL = 1.0
TO_ORIGIN = 'type="back_to_source"'
FROM_PEERS = 'type="remote_peer"'
SUCCEEDED = 'result="succeeded"'

# Scrape jobs, named as the dashboards expect: seeds are the jobs with "seed" in their name.
JOBS = {"scheduler": "damselfly-scheduler", "seed": "damselfly-seed", "dfdaemon": "damselfly-dfdaemon"}
# Which scheduler job each dashboard's $job variable must resolve to.
DASHBOARD_JOBS = {"scheduler.json": {JOBS["scheduler"]}, "seed.json": {JOBS["seed"]},
                  "dfdaemon.json": {JOBS["dfdaemon"]}}
# Grafana's interval variables, as Grafana would fill them for a short time range.
INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

DFDAEMON_FAMILIES = {
    # family: Prometheus type
    "damselfly_dfdaemon_download_traffic_bytes_total": "counter",
    "damselfly_dfdaemon_upload_traffic_bytes_total": "counter",
    "damselfly_dfdaemon_upload_pieces_total": "counter",
    "damselfly_dfdaemon_tasks_total": "counter",
    "damselfly_dfdaemon_task_duration_seconds_bucket": "histogram",
    "damselfly_dfdaemon_concurrent_downloads": "gauge",
    "damselfly_dfdaemon_concurrent_uploads": "gauge",
    "damselfly_dfdaemon_piece_download_duration_seconds_bucket": "histogram",
    "damselfly_dfdaemon_piece_failures_total": "counter",
    "damselfly_dfdaemon_proxy_requests_total": "counter",
    "damselfly_dfdaemon_proxy_range_requests_total": "counter",
    "damselfly_dfdaemon_cache_hits_total": "counter",
    "damselfly_dfdaemon_cache_used_bytes": "gauge",
    "damselfly_dfdaemon_cache_quota_bytes": "gauge",
    "damselfly_dfdaemon_gc_evicted_tasks_total": "counter",
    "damselfly_dfdaemon_back_to_source_duration_seconds_bucket": "histogram",
    "damselfly_dfdaemon_back_to_source_errors_total": "counter",
}
SCHEDULER_FAMILIES = {
    "damselfly_scheduler_peers_registered_total": "counter",
    "damselfly_scheduler_schedule_decisions_total": "counter",
    "damselfly_scheduler_schedule_duration_seconds_bucket": "histogram",
    "damselfly_scheduler_piece_reports_total": "counter",
    "damselfly_scheduler_piece_bytes_total": "counter",
    "damselfly_scheduler_hosts": "gauge",
    "damselfly_scheduler_peers": "gauge",
    "damselfly_scheduler_tasks": "gauge",
    "damselfly_scheduler_waiting_peers": "gauge",
    "damselfly_scheduler_grpc_errors_total": "counter",
}


@dataclass
class Prometheus:
    """A Prometheus server on loopback and a tiny client of its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10)
        assert status == 200, f"Prometheus {path} {params}: HTTP {status}: {body[:500]!r}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector (a scalar result comes back as a one-element vector)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The single value of an expression that must give exactly one series."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr} gave {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def series_labels(self, selector: str) -> list[dict[str, str]]:
        return list(self.api("series", **{"match[]": selector}))


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(targets: dict[str, list[Node]]) -> Prometheus:
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s", "scrape_timeout": f"{SCRAPE_INTERVAL:g}s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{n.ports['metrics']}" for n in nodes]}]}
                for job, nodes in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
        started.append(server)

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{tail(log_path)}")
            return http_get(f"{server.url}/-/ready")[0] == 200

        wait_until(ready, 30, "Prometheus to be ready", interval=0.1)
        return server

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def start_network(cluster: LocalCluster) -> tuple[Node, Node, list[Node]]:
    seed = cluster.plan_dfdaemon("seed", seed=True)
    scheduler = cluster.start_scheduler(seeds=[seed])
    cluster.start_dfdaemon("seed", node=seed)
    daemons = [cluster.start_dfdaemon("peer1"), cluster.start_dfdaemon("peer2", "--cache-quota", str(PEER2_QUOTA))]
    cluster.wait_ready(scheduler, seed, *daemons)
    return scheduler, seed, daemons


def proxy_get(node: Node, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Status and body of a GET through a dfdaemon's proxy (registry mirror form)."""
    request = urllib.request.Request(node.url("proxy", path), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def scraped_after(prometheus: Prometheus, moment: float, targets: int) -> bool:
    """True once every target has been scraped successfully twice since `moment`.

    Two scrapes (the latest began a scrape interval after `moment`), so that every series born
    before `moment` has two samples after it: enough for rate() over it.
    """
    result = prometheus.query(f"timestamp(up == 1) > {moment + SCRAPE_INTERVAL:.3f}")
    return len(result) == targets


def resolve_variables(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable's "All" value, computed as Grafana does: label values, then the regex."""
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
        assert match, f"{variable['name']}: unsupported variable query {definition!r}"
        selector = substitute(match.group(1), values)
        label = match.group(2)
        found = sorted({s[label] for s in prometheus.series_labels(selector) if label in s})
        if variable.get("regex"):
            pattern = re.compile(variable["regex"].strip("/"))
            found = [v for v in found if pattern.search(v)]
        assert found, f"variable ${variable['name']} ({definition}, regex {variable.get('regex')!r}) is empty"
        values[variable["name"]] = "|".join(found)  # Grafana's All: an alternation of every value
    return values


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in INTERVALS.items():
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def test_prometheus_scrapes_every_family_and_every_dashboard_query_returns_data(
    cluster: LocalCluster, registry: Registry, prometheus_factory: Any, tmp_path: Path
) -> None:
    digest, blob = push_random_blob(registry, "monitoring/blob", BLOB_SIZE, seed=44)
    url = registry.blob_url("monitoring/blob", digest)
    scheduler, seed, (peer1, peer2) = start_network(cluster)
    prometheus = prometheus_factory({JOBS["scheduler"]: [scheduler], JOBS["seed"]: [seed],
                                     JOBS["dfdaemon"]: [peer1, peer2]})
    started = time.time()
    wait_until(lambda: scraped_after(prometheus, started, 4), 30, "Prometheus to scrape every target")

    # Traffic: the blob through both dfdaemons at once, then again on peer1 (a cache hit),
    # requests through peer2's registry mirror, a second blob on peer2 (over its quota: the GC
    # evicts the first), a blob the registry does not have (a failed task; last, as the seed's
    # failed trigger makes the scheduler skip it for a while), a task the scheduler does not know.
    downloads = [start_dfget(node, url, tmp_path / f"{node.name}.blob") for node in (peer1, peer2)]
    for node, process in zip((peer1, peer2), downloads, strict=True):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"{node.name}: {stderr}"
        assert sha256_file(tmp_path / f"{node.name}.blob") == digest
    again = run_dfget(peer1, url, tmp_path / "again.blob", timeout=60)
    assert again.returncode == 0, again.stderr
    # Through peer2's registry mirror: a Range read of the blob (P2P) and the /v2/ ping (straight).
    blob_path = f"/v2/monitoring/blob/blobs/{digest}"
    status, body = proxy_get(peer2, blob_path, {"X-Dragonfly-Registry": registry.url, "Range": "bytes=0-9"})
    assert (status, body) == (206, blob.read_bytes()[:10])
    assert proxy_get(peer2, "/v2/", {"X-Dragonfly-Registry": registry.url})[0] == 200
    small_digest, _ = push_random_blob(registry, "monitoring/small", SMALL_SIZE, seed=45)
    small = run_dfget(peer2, registry.blob_url("monitoring/small", small_digest), tmp_path / "small.blob", timeout=60)
    assert small.returncode == 0, small.stderr
    missing = run_dfget(peer1, registry.blob_url("monitoring/missing", "sha256:" + "0" * 64),
                        tmp_path / "missing.blob", timeout=60)
    assert missing.returncode != 0
    with grpc.insecure_channel(f"127.0.0.1:{scheduler.ports['grpc']}") as channel:
        with pytest.raises(grpc.RpcError) as unknown:
            scheduler_pb2_grpc.SchedulerStub(channel).StatTask(
                scheduler_pb2.StatTaskRequest(task_id="f" * 64), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # Wait until no download is in flight anywhere, then until Prometheus scraped after that.
    wait_until(lambda: all(n.metrics().get("damselfly_dfdaemon_concurrent_downloads") == 0
                           for n in (seed, peer1, peer2)), 30, "every download to end")
    done = time.time()
    wait_until(lambda: scraped_after(prometheus, done, 4), 30, "Prometheus to scrape after the downloads")

    # Every family, from every target of the right kind, with the type Prometheus learned.
    metadata = prometheus.api("metadata")
    for families, jobs in ((DFDAEMON_FAMILIES, {JOBS["seed"], JOBS["dfdaemon"]}),
                           (SCHEDULER_FAMILIES, {JOBS["scheduler"]})):
        for family, kind in families.items():
            instances = {(s["job"], s["instance"]) for s in prometheus.series_labels(family)}
            expected = {(job, f"127.0.0.1:{n.ports['metrics']}") for job, n in
                        [(JOBS["scheduler"], scheduler), (JOBS["seed"], seed), (JOBS["dfdaemon"], peer1),
                         (JOBS["dfdaemon"], peer2)] if job in jobs}
            assert instances == expected, f"{family}: scraped from {instances}, expected {expected}"
            entry = metadata.get(family) or metadata[family.removesuffix("_bucket")]
            assert entry[0]["type"] == kind, (family, entry)

    values = plausible_values(prometheus, peer1, peer2)
    print("\nvalues Prometheus scraped:\n" + "\n".join(f"  {k} = {v:g}" for k, v in values.items()))

    # Every dashboard expression returns data.
    empty: list[str] = []
    nan_only: list[str] = []
    checked = 0
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        variables = resolve_variables(prometheus, dashboard)
        assert set(variables["job"].split("|")) == DASHBOARD_JOBS[path.name], (path.name, variables["job"])
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = substitute(target["expr"], variables)
                result = prometheus.query(expr)
                checked += 1
                if not result:
                    empty.append(f"{path.name} / {panel['title']}: {expr}")
                elif all(math.isnan(float(r["value"][1])) for r in result):
                    nan_only.append(f"{path.name} / {panel['title']}")
    print(f"{checked} dashboard queries; NaN only (no event in the window, e.g. no origin read by a "
          f"dfdaemon): {nan_only}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # The panels that matter for "P2P works" have real numbers, not NaN.
    assert not [p for p in nan_only if "Download duration" in p or "Piece download duration" in p], nan_only

    # promtool accepts what each component exposes (after traffic, so every label set exists).
    for node in (scheduler, seed, peer1, peer2):
        status, body = http_get(node.url("metrics", "/metrics"))
        assert status == 200
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0, f"{node.name}: {check.stdout.decode()}{check.stderr.decode()}"


def series(metric: str, *matchers: str) -> str:
    """``metric{m1, m2}``: a selector, without f-string brace escaping at every call."""
    return metric + "{" + ", ".join(matchers) + "}" if matchers else metric


def plausible_values(prometheus: Prometheus, peer1: Node, peer2: Node) -> dict[str, float]:
    """Assert the values Prometheus holds make sense for the traffic above; return them."""
    seed, daemons, scheduler = (f'job="{JOBS[k]}"' for k in ("seed", "dfdaemon", "scheduler"))
    on_peer1, on_peer2 = (f'instance="127.0.0.1:{n.ports["metrics"]}"' for n in (peer1, peer2))
    d = "damselfly_dfdaemon"
    s = "damselfly_scheduler"
    v: dict[str, float] = {}

    def one(name: str, expr: str) -> float:
        v[name] = prometheus.value(expr)
        return v[name]

    def per_daemon(name: str, expr: str) -> dict[str, float]:
        found = {r["metric"]["instance"]: float(r["value"][1]) for r in prometheus.query(expr)}
        v.update({f"{name} {instance}": value for instance, value in found.items()})
        assert len(found) == 2, (expr, found)
        return found

    # The seed read each blob from the origin once; the dfdaemons got them from peers.
    origin = one("seed back_to_source bytes", f'sum({series(f"{d}_download_traffic_bytes_total", seed, TO_ORIGIN)})')
    assert BLOB_SIZE + SMALL_SIZE <= origin <= 1.05 * (BLOB_SIZE + SMALL_SIZE)
    remote = per_daemon("remote_peer bytes", series(f"{d}_download_traffic_bytes_total", daemons, FROM_PEERS))
    assert all(b > 0 for b in remote.values()), remote
    received = per_daemon("bytes received",
                          f"sum by (instance) ({series(f'{d}_download_traffic_bytes_total', daemons)})")
    assert all(b >= BLOB_SIZE for b in received.values()), received
    assert one("seed upload bytes", f"sum({series(f'{d}_upload_traffic_bytes_total', seed)})") > 0
    assert one("upload pieces succeeded (all)", f'sum({series(f"{d}_upload_pieces_total", SUCCEEDED)})') >= 8
    # Tasks: both dfdaemons succeeded; peer1 also had a cache hit and a failure.
    succeeded = per_daemon("tasks succeeded", series(f"{d}_tasks_total", daemons, SUCCEEDED))
    assert all(n >= 1 for n in succeeded.values()), succeeded
    assert one("peer1 tasks succeeded", series(f"{d}_tasks_total", on_peer1, SUCCEEDED)) >= 2
    assert one("peer1 tasks failed", series(f"{d}_tasks_total", on_peer1, 'result="failed"')) >= 1
    assert one("peer1 cache hits", series(f"{d}_cache_hits_total", on_peer1)) >= 1
    assert one("seed tasks succeeded", series(f"{d}_tasks_total", seed, SUCCEEDED)) >= 1
    assert one("dfdaemon task duration count", f"sum({series(f'{d}_task_duration_seconds_count', daemons)})") >= 3
    assert one("dfdaemon task duration sum", f"sum({series(f'{d}_task_duration_seconds_sum', daemons)})") > 0
    pieces = f"{d}_piece_download_duration_seconds_count"
    assert one("remote piece duration count", f"sum({series(pieces, daemons, FROM_PEERS)})") >= 8
    assert one("seed origin piece duration count", f"sum({series(pieces, seed, TO_ORIGIN)})") >= 8
    assert one("seed origin request count", f"sum({series(f'{d}_back_to_source_duration_seconds_count', seed)})") >= 8
    assert one("piece failures", f"sum({d}_piece_failures_total)") >= 0
    assert one("origin errors", f"sum({d}_back_to_source_errors_total)") >= 0
    assert one("concurrent downloads", f"sum({d}_concurrent_downloads)") == 0
    assert one("concurrent uploads", f"sum({d}_concurrent_uploads)") == 0
    # peer1 and the seed have no quota and keep everything; peer2's GC made room for the second blob.
    assert one("peer1 cache used", series(f"{d}_cache_used_bytes", on_peer1)) == BLOB_SIZE
    assert one("seed cache used", series(f"{d}_cache_used_bytes", seed)) == BLOB_SIZE + SMALL_SIZE
    assert one("peer2 cache used", series(f"{d}_cache_used_bytes", on_peer2)) == SMALL_SIZE
    assert one("peer2 cache quota", series(f"{d}_cache_quota_bytes", on_peer2)) == PEER2_QUOTA
    assert one("cache quota of the others (0: none)", f"sum({d}_cache_quota_bytes) - {PEER2_QUOTA}") == 0
    assert one("peer2 GC evictions (quota)", series(f"{d}_gc_evicted_tasks_total", on_peer2, 'reason="quota"')) == 1
    # Every route x status class exists on every node; peer2 answered the two mirror requests.
    assert one("proxy request series", f"count({d}_proxy_requests_total)") == 3 * len(PROXY_ROUTES) * 4
    proxied = f"{d}_proxy_requests_total"
    assert one("peer2 proxy p2p 2xx", series(proxied, on_peer2, 'route="p2p"', 'status="2xx"')) >= 1
    assert one("peer2 proxy mirror 2xx", series(proxied, on_peer2, 'route="mirror"', 'status="2xx"')) >= 1
    assert one("peer2 range requests", series(f"{d}_proxy_range_requests_total", on_peer2)) >= 1
    assert one("gc eviction series", f"count({d}_gc_evicted_tasks_total)") == 3 * 2  # nodes x reasons
    # The scheduler saw three hosts, every registration and both kinds of traffic.
    assert one("scheduler hosts", series(f"{s}_hosts", scheduler)) == 3
    assert one("scheduler peers", f"{s}_peers") >= 3
    assert one("scheduler tasks", f"{s}_tasks") >= 1
    assert one("scheduler waiting peers", f"{s}_waiting_peers") >= 0
    assert one("peers registered", f"sum({s}_peers_registered_total)") >= 3
    seed_hosts = series(f"{s}_peers_registered_total", 'host_type="seed"')
    assert one("seed peers registered", f"sum({seed_hosts})") >= 1
    assert one("normal decisions", series(f"{s}_schedule_decisions_total", 'kind="normal"')) >= 2
    assert one("seed triggers", series(f"{s}_schedule_decisions_total", 'kind="seed_trigger"')) >= 1
    assert one("schedule duration count", f"{s}_schedule_duration_seconds_count") >= 3
    reported_origin = one("reported back_to_source bytes", series(f"{s}_piece_bytes_total", TO_ORIGIN))
    assert reported_origin == origin
    assert one("reported remote_peer bytes", series(f"{s}_piece_bytes_total", FROM_PEERS)) > 0
    assert one("reported back_to_source pieces", series(f"{s}_piece_reports_total", TO_ORIGIN)) >= 8
    assert one("StatTask NOT_FOUND", series(f"{s}_grpc_errors_total", 'method="StatTask"', 'code="NOT_FOUND"')) >= 1
    return v

