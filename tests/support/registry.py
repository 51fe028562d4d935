"""A real OCI registry for integration tests, and helpers to push blobs and images into it.

Debian's ``docker-registry`` (distribution v2.8) runs as a subprocess on ``127.0.0.1`` with a free
port and filesystem storage in a temporary directory, optionally behind htpasswd (Basic) auth or
token (Bearer) auth. Everything here is synchronous, so it works from sync and async tests alike;
from a running event loop whose servers must stay responsive, wrap pushes in
``await asyncio.to_thread(push_blob, ...)``.

Example::

    with running_registry(tmp_path, users={"alice": "secret"}) as registry:
        digest, path = push_random_blob(registry, "library/demo", 8 << 20, seed=1)
        url = registry.blob_url("library/demo", digest)   # http://127.0.0.1:PORT/v2/library/demo/blobs/sha256:...
        manifest = push_image(registry, "library/demo", "v1", [path])

The fixtures in :mod:`tests.support.fixtures` wrap this (``registry``, ``auth_registry``,
``token_registry``, ``registry_factory``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import random
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

from common.digest import file_digest
from common.launcher import free_port
from tests.support.token_auth import TokenServer, parse_www_authenticate

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 20.0  # seconds for the registry to answer /v2/
UPLOAD_CHUNK = 8 << 20  # bytes per PATCH of a blob upload
HTTP_TIMEOUT = 60.0

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

Auth = tuple[str, str] | str | None  # (user, password), a full Authorization value, or nothing


class RegistryError(RuntimeError):
    """The test registry failed to start or refused a push (message has the registry's answer)."""


@dataclass
class Registry:
    """A running ``docker-registry``. ``url`` is ``http://127.0.0.1:PORT``."""

    url: str
    port: int
    workdir: Path  # config, log, storage and files written by push_random_blob
    users: dict[str, str]
    process: subprocess.Popen[bytes]
    token_server: TokenServer | None = None
    _log: BinaryIO | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as image references and credential maps name it."""
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """The first configured ``(user, password)``, or None without auth."""
        return next(iter(self.users.items()), None)

    def basic_auth(self) -> str:
        """An ``Authorization: Basic`` value for :attr:`credentials`."""
        if self.credentials is None:
            raise RegistryError("this registry has no users")
        return basic_auth_value(*self.credentials)

    def blob_url(self, repo: str, digest: str) -> str:
        return f"{self.url}/v2/{repo}/blobs/{digest}"

    def manifest_url(self, repo: str, reference: str) -> str:
        return f"{self.url}/v2/{repo}/manifests/{reference}"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the registry's log, for assertion messages."""
        path = self.workdir / "registry.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def basic_auth_value(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def htpasswd_lines(users: Mapping[str, str]) -> str:
    """htpasswd file content with bcrypt entries (what distribution's htpasswd auth requires)."""
    import bcrypt

    # Cost 5: the registry checks the hash on every request, and these are throwaway passwords.
    return "".join(
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
        for user, password in users.items()
    )


def start_registry(
    workdir: Path,
    *,
    users: Mapping[str, str] | None = None,
    token_server: TokenServer | None = None,
    start_timeout: float = START_TIMEOUT,
) -> Registry:
    """Start ``docker-registry`` in `workdir`; call :meth:`Registry.stop` when done.

    `users` turns on htpasswd (Basic) auth; `token_server` (started) turns on token (Bearer) auth
    with that server as the realm. The two are exclusive.
    """
    if not Path(REGISTRY_BINARY).exists():
        raise RegistryError(f"{REGISTRY_BINARY} is missing; install Debian's docker-registry package")
    if users and token_server is not None:
        raise RegistryError("choose htpasswd users or a token server, not both")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "storage").mkdir(exist_ok=True)
    auth_lines: list[str] = []
    if users:
        (workdir / "htpasswd").write_text(htpasswd_lines(users))
        htpasswd = workdir / "htpasswd"
        auth_lines = ["auth:", "  htpasswd:", "    realm: damselfly-test", f"    path: {htpasswd}"]
    elif token_server is not None:
        auth_lines = [
            "auth:",
            "  token:",
            f"    realm: {token_server.realm}",
            f"    service: {token_server.service}",
            f"    issuer: {token_server.issuer}",
            f"    rootcertbundle: {token_server.cert_path}",
        ]
    last_error = ""
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        config = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {workdir / 'storage'}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{port}",
            f"  secret: {secrets.token_hex(16)}",
            *auth_lines,
        ]
        (workdir / "config.yml").write_text("\n".join(config) + "\n")
        log = (workdir / "registry.log").open("ab")
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(workdir / "config.yml")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        registry = Registry(
            f"http://127.0.0.1:{port}", port, workdir, dict(users or {}), process, token_server, log
        )
        if _wait_until_up(registry, start_timeout):
            return registry
        last_error = registry.log_tail()
        registry.stop()
    raise RegistryError(f"docker-registry did not start in {workdir}:\n{last_error}")


def _wait_until_up(registry: Registry, timeout: float) -> bool:
    """Poll ``GET /v2/`` until it answers (200 or 401) or the process exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            return False
        try:
            status, _, _ = _request("GET", f"{registry.url}/v2/", timeout=1.0)
            if status in (200, 401):
                return True
        except OSError:
            pass
        with suppress(subprocess.TimeoutExpired):
            # Wait for the process to exit, at most a moment: a condition, not a bare sleep.
            registry.process.wait(timeout=0.05)
    return False


@contextmanager
def running_registry(
    workdir: Path, *, users: Mapping[str, str] | None = None, token_server: TokenServer | None = None
) -> Iterator[Registry]:
    """:func:`start_registry` as a context manager that stops it on exit."""
    registry = start_registry(workdir, users=users, token_server=token_server)
    try:
        yield registry
    finally:
        registry.stop()


# --- HTTP, with just enough auth for pushing --------------------------------------------------


def _request(
    method: str, url: str, body: bytes | BinaryIO | None = None, headers: Mapping[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


class _Client:
    """Sends registry requests, answering Basic and Bearer challenges with `auth`."""

    def __init__(self, base_url: str, auth: Auth) -> None:
        self.base_url = base_url.rstrip("/")
        if isinstance(auth, tuple):
            self.basic: str | None = basic_auth_value(*auth)
        else:
            self.basic = auth
        self.authorization: str | None = None  # what the last challenge asked for

    def request(
        self, method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
        expect: Sequence[int] = (200, 201, 202, 204),
    ) -> tuple[int, dict[str, str], bytes]:
        url = urljoin(self.base_url + "/", url)
        for _ in range(2):
            sent = dict(headers or {})
            if self.authorization:
                sent["Authorization"] = self.authorization
            status, got, data = _request(method, url, body, sent)
            if status == 401 and self._answer(got.get("www-authenticate", "")):
                continue
            if status not in expect:
                text = data[:500].decode(errors="replace")
                raise RegistryError(f"{method} {url} answered {status}: {text}")
            return status, got, data
        raise RegistryError(f"{method} {url}: still 401 after authenticating: {data[:500]!r}")

    def _answer(self, challenge_header: str) -> bool:
        scheme, params = parse_www_authenticate(challenge_header)
        if scheme == "basic" and self.basic and self.authorization != self.basic:
            self.authorization = self.basic
            return True
        if scheme == "bearer":
            query = urlencode([("service", params.get("service", ""))]
                              + [("scope", s) for s in params.get("scope", "").split()])
            token_headers = {"Authorization": self.basic} if self.basic else {}
            status, _, data = _request("GET", f"{params['realm']}?{query}", headers=token_headers)
            if status != 200:
                raise RegistryError(f"token server answered {status}: {data[:300]!r}")
            token = json.loads(data)["token"]
            if self.authorization == f"Bearer {token}":
                return False
            self.authorization = f"Bearer {token}"
            return True
        return False


def _base_and_auth(registry: Registry | str, auth: Auth) -> tuple[str, Auth]:
    if isinstance(registry, Registry):
        if auth is None and registry.credentials is not None:
            auth = registry.credentials
        return registry.url, auth
    return registry, auth


def push_blob(
    registry: Registry | str, repo: str, content: str | Path | bytes | BinaryIO, auth: Auth = None
) -> str:
    """Upload a blob through the registry's upload API; returns its ``sha256:`` digest.

    `content` is a file path, bytes, or a readable binary file (read once, streamed). The upload
    is ``POST /v2/<repo>/blobs/uploads/``, one ``PATCH`` per :data:`UPLOAD_CHUNK`, then
    ``PUT ?digest=``. A blob the repository already has is not uploaded again. `auth` defaults to
    the registry's own credentials when `registry` is a :class:`Registry`.
    """
    base, auth = _base_and_auth(registry, auth)
    client = _Client(base, auth)
    if isinstance(content, str | Path):
        path = Path(content)
        digest = file_digest(path)
        status, _, _ = client.request("HEAD", f"/v2/{repo}/blobs/{digest}", expect=(200, 404))
        if status == 200:
            return digest
        with path.open("rb") as stream:
            return _upload(client, repo, stream, digest)
    if isinstance(content, bytes):
        return _upload(client, repo, io.BytesIO(content), None)
    return _upload(client, repo, content, None)


def _upload(client: _Client, repo: str, stream: BinaryIO, expected: str | None) -> str:
    _, headers, _ = client.request("POST", f"/v2/{repo}/blobs/uploads/", expect=(202,))
    location = urljoin(client.base_url + "/", headers["location"])
    hasher = hashlib.sha256()
    offset = 0
    while chunk := stream.read(UPLOAD_CHUNK):
        hasher.update(chunk)
        chunk_headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        }
        _, headers, _ = client.request("PATCH", location, chunk, chunk_headers, expect=(202,))
        offset += len(chunk)
        location = urljoin(client.base_url + "/", headers["location"])
    digest = f"sha256:{hasher.hexdigest()}"
    if expected is not None and digest != expected:
        raise RegistryError(f"the file changed while it was uploaded: {expected} became {digest}")
    separator = "&" if "?" in location else "?"
    client.request("PUT", f"{location}{separator}{urlencode({'digest': digest})}", b"", expect=(201,))
    return digest


def write_random_file(path: Path, size: int, seed: int) -> str:
    """Write `size` pseudo-random bytes determined by `seed` to `path`, streaming; returns the digest."""
    generator = random.Random(seed)
    hasher = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        remaining = size
        while remaining:
            chunk = generator.randbytes(min(remaining, 1 << 20))
            hasher.update(chunk)
            stream.write(chunk)
            remaining -= len(chunk)
    return f"sha256:{hasher.hexdigest()}"


def push_random_blob(
    registry: Registry, repo: str, size: int, seed: int = 0, auth: Auth = None
) -> tuple[str, Path]:
    """Write `size` random bytes (reproducible from `seed`) to a file and push them as a blob.

    Returns ``(digest, path)``; the file stays under ``registry.workdir / "files"`` so tests can
    compare what they receive with it. Sizes up to hundreds of MiB are fine: nothing is held in
    memory beyond one chunk.
    """
    path = registry.workdir / "files" / f"random-{size}-{seed}.bin"
    if not path.exists():
        partial = path.with_suffix(".part")
        write_random_file(partial, size, seed)
        partial.replace(path)
    return push_blob(registry, repo, path, auth), path


def write_layer_tar(path: Path, members: Mapping[str, bytes], *, compress: bool = True) -> Path:
    """A real image layer: a tar (gzip-compressed by default) holding `members` (name → content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(2) == b"\x1f\x8b"


def _diff_id(path: Path) -> str:
    """Digest of the uncompressed layer, as the image config lists it."""
    if not _is_gzip(path):
        return file_digest(path)
    hasher = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
    except (OSError, EOFError):
        return file_digest(path)  # random bytes that happen to start like gzip
    return f"sha256:{hasher.hexdigest()}"


def push_image(
    registry: Registry | str, repo: str, tag: str, layer_files: Sequence[str | Path], *,
    oci: bool = False, auth: Auth = None,
) -> str:
    """Push a linux/amd64 image (config blob, `layer_files` as layers, schema-2 manifest) as `tag`.

    Layers are used as they are; a file starting with the gzip magic is declared compressed.
    `oci` selects OCI media types instead of Docker's v2 schema 2. Returns the manifest digest.
    """
    base, auth = _base_and_auth(registry, auth)
    layers = []
    diff_ids = []
    for layer in map(Path, layer_files):
        digest = push_blob(base, repo, layer, auth)
        compressed = _is_gzip(layer)
        if oci:
            media_type = OCI_LAYER_GZIP if compressed else OCI_LAYER_TAR
        else:
            media_type = DOCKER_LAYER_GZIP if compressed else DOCKER_LAYER_TAR
        layers.append({"mediaType": media_type, "size": layer.stat().st_size, "digest": digest})
        diff_ids.append(_diff_id(layer))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "damselfly tests"} for _ in diff_ids],
        },
        sort_keys=True,
    ).encode()
    config_digest = push_blob(base, repo, config, auth)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
            "config": {"mediaType": OCI_CONFIG if oci else DOCKER_CONFIG, "size": len(config),
                       "digest": config_digest},
            "layers": layers,
        },
        sort_keys=True,
    ).encode()
    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    client = _Client(base, auth)
    _, headers, _ = client.request(
        "PUT", f"/v2/{repo}/manifests/{tag}", manifest,
        {"Content-Type": OCI_MANIFEST if oci else DOCKER_MANIFEST}, expect=(201,),
    )
    answered = headers.get("docker-content-digest", digest)
    if answered != digest:
        raise RegistryError(f"registry stored manifest {answered}, expected {digest}")
    return digest


def push_manifest(
    registry: Registry | str, repo: str, reference: str, document: bytes, media_type: str, auth: Auth = None
) -> str:
    """PUT a manifest or an index (its blobs or child manifests pushed first) as `reference`
    (a tag, or the document's own digest); returns its digest."""
    base, auth = _base_and_auth(registry, auth)
    digest = f"sha256:{hashlib.sha256(document).hexdigest()}"
    _Client(base, auth).request("PUT", f"/v2/{repo}/manifests/{reference}", document,
                                {"Content-Type": media_type}, expect=(201,))
    return digest


def skopeo_available() -> bool:
    return shutil.which("skopeo") is not None
