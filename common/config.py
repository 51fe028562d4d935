"""Typed, validated configuration of every component.

Each component's settings are one frozen dataclass. Every field is both a command-line flag
(``--grpc-listen``) and a key of the YAML file given by ``--config`` (``grpc_listen``); flags win
over the file, the file wins over the defaults. Values are checked once, at start-up: a bad
value fails with the key and the reason (:class:`common.errors.ConfigError`), never later.

Durations accept seconds (``30``) or a suffix (``500ms``, ``30s``, ``5m``, ``24h``); sizes accept
bytes or a suffix (``512MiB``, ``10GiB``, ``1G``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError
from common.hosts import default_upload_slots
from common.tls_settings import check_settings, tls_enabled
from common.units import parse_bool, parse_duration, parse_size
from common.upstreams import UpstreamEntry

DEFAULT_SCHEDULER_PORT = 8002
DEFAULT_SCHEDULER_METRICS_PORT = 8000
DEFAULT_DFDAEMON_GRPC_PORT = 4000
DEFAULT_PROXY_PORT = 4001
DEFAULT_DFDAEMON_METRICS_PORT = 4002
DEFAULT_HEALTH_PORT = 4003
DEFAULT_UPLOAD_PORT = 4005
DEFAULT_CONCURRENT_PIECES = 16
# Signatures and expiry times of presigned object-storage URLs (S3, OSS, GCS): they differ per
# request for the same content, so proxied URLs leave them out of the task id by default.
DEFAULT_FILTERED_QUERY_PARAMS = (
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
    "X-Amz-Signature", "X-Amz-Security-Token", "AWSAccessKeyId", "OSSAccessKeyId", "Signature", "Expires",
    "X-Goog-Algorithm", "X-Goog-Credential", "X-Goog-Date", "X-Goog-Expires", "X-Goog-SignedHeaders",
    "X-Goog-Signature",
)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_TLS_CA_HELP = "PEM CA certificate that signs every node of the cluster (TLS off when tls_* are empty)"
_TLS_CERT_HELP = "PEM certificate of this node (IP SAN of its address; docs/security.md)"
_TLS_KEY_HELP = "PEM private key of tls_cert (unencrypted)"
_TLS_CLIENT_AUTH_HELP = "mutual TLS: servers require a client certificate signed by tls_ca_cert"
_TLS_SERVER_NAME_HELP = ("check every server's certificate for this DNS name instead of the address dialed "
                         "(when nodes' certificates cannot carry their IPs)")

def parse_address(value: object) -> str:
    """Validate ``HOST:PORT`` (IPv6 hosts in brackets) and return it unchanged."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return text


def split_address(address: str) -> tuple[str, int]:
    """``("host", port)`` of a validated ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _parse_list(item: Callable[[object], Any]) -> Callable[[object], tuple[Any, ...]]:
    def parse(value: object) -> tuple[Any, ...]:
        if isinstance(value, str):
            values: Sequence[object] = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            values = [v for raw in value for v in (str(raw).split(",") if isinstance(raw, str) else [raw])]
        else:
            raise ValueError(f"{value!r} is not a list")
        return tuple(item(v.strip() if isinstance(v, str) else v) for v in values)

    return parse


def _parse_choice(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _parse_int(value: object) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not an integer")
    return int(str(value).strip()) if not isinstance(value, int | float) else int(value)


def _parse_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


_HOST_PATTERN_RE = re.compile(r"^(?:\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(?::(\d{1,5}))?$"
                              r"|^\[[0-9a-f:.]+\](?::(\d{1,5}))?$")


def _parse_host_pattern(value: object) -> str:
    """``registry.example.com``, ``*.example.com`` or either with ``:port``, lowercased."""
    text = str(value).strip().lower()
    match = _HOST_PATTERN_RE.match(text)
    port = match and (match[2] or match[3])
    if not match or (port and not 0 < int(port) < 65536):
        raise ValueError(f"{value!r} is not a host pattern like registry.example.com, *.example.com or host:443")
    return text


def _parse_upstream_entry(value: object) -> str:
    """One proxy_allowed_upstreams entry, checked (common.upstreams)."""
    text = str(value).strip()
    UpstreamEntry.parse(text)
    return text


def _parse_str(value: object) -> str:
    if isinstance(value, dict | list):
        raise ValueError(f"{value!r} is not a string")
    return str(value)


def option(default: Any, help: str, parse: Callable[[object], Any] | None = None, minimum: float | None = None) -> Any:
    """Declare a config field: its default, help text, parser and lower bound."""
    meta = {"help": help, "parse": parse, "minimum": minimum}
    if parse is not None:
        default = parse(default)  # defaults are written like file values ("30s"), stored parsed
    if isinstance(default, list | tuple):
        return dataclasses.field(default=tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _parser_for(field: dataclasses.Field[Any]) -> Callable[[object], Any]:
    parse = field.metadata.get("parse")
    if parse is not None:
        return parse  # type: ignore[no-any-return]
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    return {
        "bool": parse_bool,
        "int": _parse_int,
        "float": _parse_float,
        "str": _parse_str,
        "tuple[str, ...]": _parse_list(_parse_str),
    }[kind]


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Settings every component has."""

    log_level: str = option("info", "log level: debug, info, warning, error", _parse_choice(LOG_LEVELS))
    log_format: str = option("text", "log format: text or json", _parse_choice(LOG_FORMATS))


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(LoggingConfig):
    """``damselfly scheduler``."""

    listen: str = option(f"127.0.0.1:{DEFAULT_SCHEDULER_PORT}", "gRPC listen address HOST:PORT", parse_address)
    metrics_listen: str = option(
        f"127.0.0.1:{DEFAULT_SCHEDULER_METRICS_PORT}", "metrics and health HTTP address HOST:PORT", parse_address
    )
    seed_peer: tuple[str, ...] = option(
        (), "dfdaemon gRPC address HOST:PORT of a seed peer", _parse_list(parse_address)
    )
    candidate_parent_limit: int = option(3, "candidate parents sent per schedule", minimum=1)
    filter_parent_limit: int = option(15, "peers sampled when looking for candidate parents", minimum=1)
    back_to_source_limit: int = option(200, "peers of one task allowed to back-source", minimum=0)
    retry_limit: int = option(5, "scheduling attempts before a peer is failed", minimum=1)
    retry_back_to_source_limit: int = option(
        4, "scheduling attempts before a peer is told to back-source", minimum=1
    )
    retry_interval: float = option(0.5, "wait between scheduling attempts", parse_duration)
    peer_ttl: float = option("24h", "forget a peer this long after its last activity", parse_duration)
    task_ttl: float = option("24h", "forget a task this long after its last activity", parse_duration)
    host_ttl: float = option("5m", "forget a host that has not announced itself for this long", parse_duration)
    gc_interval: float = option("30s", "how often expired peers, tasks and hosts are collected", parse_duration)
    seed_cooldown: float = option("30s", "skip a seed whose trigger failed for this long", parse_duration)
    origin_attempt_limit: int = option(
        3, "failed back-to-source attempts of one task (by seeds or peers) before the task fails for every "
        "peer waiting on it; a 4xx answer of the origin fails it at once", minimum=1)
    origin_retry_backoff: float = option("1s", "wait before the next back-to-source attempt of a task whose "
                                         "origin failed, doubled at each further failure", parse_duration)
    failed_task_backoff: float = option("30s", "a task whose origin failed fails new downloads at once, without "
                                        "asking the origin again, for this long", parse_duration)
    max_hosts_per_client: int = option(
        64, "hosts one client identity (its certificate; its IP in plaintext) may have announced at once; "
        "more are refused", minimum=1)
    max_peers_per_host: int = option(
        1000, "peers (downloads) the scheduler keeps for one host; past it the host's oldest finished or "
        "failed ones are forgotten, and a registration is refused when all are active", minimum=1)
    max_streams_per_client: int = option(
        1000, "AnnouncePeer streams one client identity (its certificate; its IP in plaintext) may hold "
        "open at once; more are refused", minimum=1)
    grpc_max_concurrent_streams: int = option(
        1000, "concurrent gRPC streams on one client connection (HTTP/2 setting); more wait", minimum=1)
    tls_ca_cert: str = option("", _TLS_CA_HELP)
    tls_cert: str = option("", _TLS_CERT_HELP)
    tls_key: str = option("", _TLS_KEY_HELP)
    tls_client_auth: bool = option(True, _TLS_CLIENT_AUTH_HELP)
    tls_server_name: str = option("", _TLS_SERVER_NAME_HELP)


@dataclasses.dataclass(frozen=True)
class DfdaemonConfig(LoggingConfig):
    """``damselfly dfdaemon``."""

    scheduler: tuple[str, ...] = option(
        (f"127.0.0.1:{DEFAULT_SCHEDULER_PORT}",), "scheduler gRPC addresses HOST:PORT[,HOST:PORT...]",
        _parse_list(parse_address),
    )
    data_dir: str = option("/var/lib/damselfly", "directory of the piece cache and task metadata")
    host_ip: str = option("127.0.0.1", "IP address other peers use to reach this node")
    hostname: str = option(socket.gethostname(), "name of this node")
    idc: str = option("", "data center of this node (parents in the same IDC score higher)")
    location: str = option("", "location of this node, e.g. region|zone|rack (closer parents score higher)")
    grpc_listen: str = option(f"127.0.0.1:{DEFAULT_DFDAEMON_GRPC_PORT}", "dfdaemon gRPC (upload API) HOST:PORT",
                              parse_address)
    upload_listen: str = option(f"127.0.0.1:{DEFAULT_UPLOAD_PORT}", "HTTP piece server HOST:PORT", parse_address)
    proxy_listen: str = option(f"127.0.0.1:{DEFAULT_PROXY_PORT}", "registry mirror / HTTP proxy HOST:PORT",
                               parse_address)
    metrics_listen: str = option(f"127.0.0.1:{DEFAULT_DFDAEMON_METRICS_PORT}", "metrics HTTP HOST:PORT",
                                 parse_address)
    health_listen: str = option(f"127.0.0.1:{DEFAULT_HEALTH_PORT}", "health HTTP HOST:PORT", parse_address)
    socket: str = option("/var/run/damselfly/dfdaemon.sock", "unix socket of the download API (dfget)")
    socket_group: str = option("", "group (name or id) whose members may use the unix socket, mode 0660 "
                               "(empty: the daemon's own group)")
    seed: bool = option(False, "run as a seed peer: register as a seed host and back-source on trigger")
    concurrent_piece_count: int = option(DEFAULT_CONCURRENT_PIECES, "pieces fetched in parallel per task",
                                         minimum=1)
    upload_slots: int = option(0, "concurrent piece uploads (0: 200, or 2000 for a seed)", minimum=0)
    swarm_upload_slots: int = option(4, "pieces sent at once to children that can fetch them from other parents; "
                                     "more are told to ask elsewhere, so each piece leaves at full speed and "
                                     "spreads (0: no limit)", minimum=0)
    upload_rate_limit: int = option(0, "total upload bandwidth of the piece server per second (0: unlimited)",
                                    parse_size)
    upload_min_rate: int = option("256KiB", "a piece upload slower than this per second (after 3 s) is cut, so "
                                  "slow readers cannot hold the upload slots (0: no minimum)", parse_size)
    back_to_source_concurrency: int = option(8, "parallel ranged GETs to the origin per task", minimum=1)
    piece_timeout: float = option("30s", "give up on one piece transfer after this long", parse_duration)
    origin_connect_timeout: float = option("10s", "give up connecting to an origin after this long",
                                           parse_duration)
    origin_read_timeout: float = option("30s", "give up on an origin body that sends nothing for this long",
                                        parse_duration)
    download_timeout: float = option("2h", "give up on a whole download after this long", parse_duration)
    schedule_timeout: float = option("30s", "back-source when the scheduler gives no parent in this time",
                                     parse_duration)
    announce_interval: float = option("30s", "how often the host re-announces itself", parse_duration)
    registry_mirror: str = option("", "default upstream registry URL for mirror requests")
    proxy_rule: tuple[str, ...] = option(("blobs/sha256.*",), "regexes of GET URLs that go through P2P")
    prefetch: bool = option(True, "after a Range read, fetch the rest of the blob in the background")
    proxy_auth_ttl: float = option("60s", "how long a registry's yes to a client's credentials for a blob is "
                                   "trusted before the proxy asks again", parse_duration)
    proxy_intercept_hosts: tuple[str, ...] = option(
        (), "HTTPS hosts whose CONNECT tunnels the proxy opens (TLS ends at the proxy with a certificate signed "
        "by proxy_ca_cert) so their blobs go through P2P: host, *.domain, optionally :port",
        _parse_list(_parse_host_pattern))
    proxy_ca_cert: str = option("", "PEM CA certificate that signs the certificates of proxy_intercept_hosts "
                                "(clients must trust it)")
    proxy_ca_key: str = option("", "unencrypted PEM private key of proxy_ca_cert")
    proxy_upstream_ca_cert: str = option("", "PEM CA bundle the proxy trusts for upstream HTTPS besides the system "
                                         "store (private registries)")
    proxy_p2p_concurrency: int = option(0, "P2P proxy requests served at once; more get 429 (0: no limit)",
                                        minimum=0)
    proxy_p2p_rate: float = option(0.0, "P2P proxy requests admitted per second, bursts up to one second's "
                                   "worth; more get 429 (0: no limit)", minimum=0.0)
    proxy_allowed_upstreams: tuple[str, ...] = option(
        (), "upstreams the proxy may reach for its clients besides --registry-mirror and proxy_intercept_hosts "
        "(anything else gets 403): host, host:port, scheme://host[:port], *.domain, or * for any public host; "
        "loopback, link-local and private addresses only when listed by name or address",
        _parse_list(_parse_upstream_entry))
    upstream_redirects_public: bool = option(
        True, "an upstream's redirect may go to any public address (registries send blobs to a CDN or object "
        "storage); false: only to the same origin or an allowed upstream. Private addresses need a listing")
    proxy_filtered_query_params: tuple[str, ...] = option(
        DEFAULT_FILTERED_QUERY_PARAMS, "query parameters left out of a proxied URL's task id (signatures, "
        "expiry times), so signed URLs of one content share a task; the client's "
        "X-Dragonfly-Filtered-Query-Params is ignored")
    proxy_header_timeout: float = option("20s", "close a proxy connection whose request headers take longer "
                                         "than this (slowloris)", parse_duration)
    proxy_max_connections: int = option(1024, "open proxy connections at once; more are closed at once",
                                        minimum=1)
    proxy_max_connections_per_client: int = option(256, "open proxy connections of one client IP at once; "
                                                   "more are closed at once", minimum=1)
    task_ttl: float = option("6h", "evict a completed task not read for this long", parse_duration)
    cache_quota: int = option(0, "cache size limit (0: no quota, only the disk)", parse_size)
    page_cache_window: int = option("32MiB", "a task's latest pieces kept in the page cache; older ones are "
                                    "dropped from it once on disk (0: keep every piece)", parse_size)
    gc_high_watermark: float = option(0.9, "start evicting at this fraction of the quota", minimum=0.0)
    gc_low_watermark: float = option(0.7, "evict down to this fraction of the quota", minimum=0.0)
    gc_interval: float = option("60s", "how often the cache is collected", parse_duration)
    tls_ca_cert: str = option("", _TLS_CA_HELP)
    tls_cert: str = option("", _TLS_CERT_HELP)
    tls_key: str = option("", _TLS_KEY_HELP)
    tls_client_auth: bool = option(True, _TLS_CLIENT_AUTH_HELP)
    tls_server_name: str = option("", _TLS_SERVER_NAME_HELP)

    @property
    def effective_upload_slots(self) -> int:
        """Upload slots after applying the seed / normal default."""
        if self.upload_slots:
            return self.upload_slots
        return default_upload_slots(self.seed)


C = TypeVar("C", bound=LoggingConfig)


def _check(cls: type[C], values: Mapping[str, object], source: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parsed: dict[str, Any] = {}
    for key, raw in values.items():
        if not isinstance(key, str):
            raise ConfigError(str(key), f"keys must be strings (in {source})")
        name = key.replace("-", "_")
        field = fields.get(name)
        if field is None:
            known = ", ".join(sorted(fields))
            raise ConfigError(key, f"unknown key in {source}; known keys: {known}")
        try:
            value = _parser_for(field)(raw)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(key, f"{exc} (in {source})") from None
        minimum = field.metadata.get("minimum")
        if minimum is not None and value < minimum:
            raise ConfigError(key, f"{value!r} is below the minimum {minimum} (in {source})")
        parsed[name] = value
    return parsed


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, object] | None = None) -> C:
    """Defaults, then the YAML file at `path`, then `overrides` (command-line flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml  # only with a config file: dfget, which never reads one, starts without it

        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
        if not isinstance(document, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of keys to values")
        values.update(_check(cls, document, str(path)))
    values.update(_check(cls, overrides or {}, "command line"))
    config = cls(**values)
    _validate(config)
    return config


def _validate(config: LoggingConfig) -> None:
    if isinstance(config, SchedulerConfig | DfdaemonConfig) and tls_enabled(config):
        check_settings(ca_cert=config.tls_ca_cert, cert=config.tls_cert, key=config.tls_key,
                       client_auth=config.tls_client_auth)
    if isinstance(config, DfdaemonConfig):
        if not config.scheduler and not config.seed:
            raise ConfigError("scheduler", "at least one scheduler address is needed")
        if not config.gc_low_watermark < config.gc_high_watermark <= 1.0:
            raise ConfigError("gc_low_watermark", "need 0 <= gc_low_watermark < gc_high_watermark <= 1")
        for rule in config.proxy_rule:
            try:
                re.compile(rule)
            except re.error as exc:
                raise ConfigError("proxy_rule", f"{rule!r} is not a valid regex: {exc}") from None
        if config.proxy_intercept_hosts:
            for key in ("proxy_ca_cert", "proxy_ca_key"):
                if not getattr(config, key):
                    raise ConfigError(key, "needed by proxy_intercept_hosts (the CA that signs their certificates)")
        for key in ("proxy_ca_cert", "proxy_ca_key", "proxy_upstream_ca_cert"):
            path = getattr(config, key)
            if path and not Path(path).is_file():
                raise ConfigError(key, f"{path} is not a file")
            if path and not os.access(path, os.R_OK):
                raise ConfigError(key, f"{path} is not readable")
    if isinstance(config, SchedulerConfig) and config.retry_back_to_source_limit > config.retry_limit:
        raise ConfigError("retry_back_to_source_limit", "must not exceed retry_limit")


def format_duration(seconds: float) -> str:
    """A duration as it is written in flags and files: ``24h``, ``5m``, ``30s``, ``500ms``, ``1.5s``."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:.0f}{unit}"
    if 0 < seconds < 1 and (seconds * 1000).is_integer():
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:g}s"


def _format_bytes(size: int) -> str:
    """A size as it is written in flags and files: ``10GiB``, ``512MiB``, ``1000`` (bytes)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def format_default(field: dataclasses.Field[Any]) -> str:
    """A field's default as a user writes it on the command line (not as Python prints it)."""
    value: Any = field.default
    parse = field.metadata.get("parse")
    if isinstance(value, bool):
        return "on" if value else "off"
    if parse is parse_duration:
        return format_duration(value)
    if parse is parse_size:
        return _format_bytes(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    if value == "":
        return "none"
    return str(value)


_METAVARS: dict[object, str] = {parse_address: "HOST:PORT", parse_duration: "DURATION", parse_size: "SIZE"}
_NAMED_METAVARS = {"log_level": "LEVEL", "log_format": "FORMAT", "data_dir": "DIR", "socket": "PATH",
                   "host_ip": "IP", "hostname": "NAME", "idc": "NAME", "location": "LOCATION",
                   "registry_mirror": "URL", "proxy_rule": "REGEX", "proxy_intercept_hosts": "HOST",
                   "proxy_allowed_upstreams": "UPSTREAM", "proxy_filtered_query_params": "NAME",
                   "tls_server_name": "NAME"}


def _metavar(field: dataclasses.Field[Any]) -> str | None:
    parse = field.metadata.get("parse")
    if parse in _METAVARS:
        return _METAVARS[parse]
    if field.name.endswith("listen") or field.name in ("scheduler", "seed_peer"):
        return "HOST:PORT"
    if field.name.endswith(("_cert", "_key")):
        return "FILE"
    return _NAMED_METAVARS.get(field.name) or {"int": "N", "float": "NUMBER"}.get(str(field.type))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[LoggingConfig]) -> None:
    """One flag per config field, plus ``--config`` and ``--version``. Unset flags stay out of the namespace."""
    from common.cli import version  # the dispatcher module: stdlib only, no cycle at import time

    parser.add_argument("-V", "--version", action="version", version=f"damselfly {version()}")
    parser.add_argument("--config", metavar="FILE", help="YAML file with the same keys as the flags "
                        "(the flags win over the file)")
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {format_default(field)})"
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=field.name, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=help_text)
            parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=f"the opposite of {flag}")
        elif str(field.type).startswith("tuple"):
            parser.add_argument(flag, dest=field.name, action="append", default=argparse.SUPPRESS,
                                metavar=_metavar(field), help=help_text + " (repeatable, or comma-separated)")
        else:
            parser.add_argument(flag, dest=field.name, default=argparse.SUPPRESS, metavar=_metavar(field),
                                help=help_text)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Build a config from parsed arguments made by :func:`add_config_arguments`."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(cls, getattr(args, "config", None), overrides)


def to_yaml_dict(config: LoggingConfig) -> dict[str, Any]:
    """The config as the YAML mapping `load_config` reads back (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
