"""A token server for the registry's ``auth: token`` mode, so the Bearer flow runs for real.

The registry challenges with ``Bearer realm=<this server>/token,service=...,scope=...``; a client
gets a JWT here (with Basic credentials, or anonymously) and presents it to the registry, which
checks the RS256 signature against the certificate in its ``rootcertbundle`` (the key is found by
its libtrust key id in the JWT header ``kid``) and the granted ``access`` claims.

Grants: a known user gets every action it asks for; an anonymous client gets ``pull`` when
`anonymous_pull` is set, nothing otherwise (the registry then refuses with 401); a wrong password
gets a 401 from this server.

Example::

    with TokenServer(tmp_path, {"alice": "secret"}) as tokens:
        registry = start_registry(tmp_path / "reg", token_server=tokens)
        ...
        assert tokens.issued == 1
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

import trustme
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support.certs import TestCA

_PARAM = re.compile(r'([A-Za-z][\w-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')


def parse_www_authenticate(value: str) -> tuple[str, dict[str, str]]:
    """``(scheme, params)`` of a single ``WWW-Authenticate`` challenge (scheme in lower case)."""
    scheme, _, rest = value.strip().partition(" ")
    params = {k.lower(): v[1:-1] if v.startswith('"') else v for k, v in _PARAM.findall(rest)}
    return scheme.lower(), params


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The key id distribution (docker/libtrust) computes for a public key: base32 of the first
    240 bits of the SHA-256 of its DER SubjectPublicKeyInfo, in colon-separated groups of four."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


class TokenServer:
    """Issues registry JWTs on ``GET /token?service=...&scope=...`` at 127.0.0.1:<free port>."""

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str],
        *,
        anonymous_pull: bool = False,
        expires_in: int = 300,
        service: str = "damselfly-test-registry",
        issuer: str = "damselfly-test-token-issuer",
    ) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.service = service
        self.issuer = issuer
        self.issued = 0  # tokens handed out
        self.requests: list[tuple[str | None, list[str]]] = []  # (user, scopes) of every request
        self._lock = threading.Lock()
        # The registry trusts the signer's certificate (its rootcertbundle); RS256 needs an RSA key.
        signer = TestCA(workdir / "token-signer", "damselfly test token signer", key_type=trustme.KeyType.RSA)
        self.cert_path = signer.cert_path
        key = serialization.load_pem_private_key(signer.key_path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self._key = key
        self._kid = libtrust_key_id(self._key.public_key())
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server not started")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> TokenServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.issued = 0
            self.requests.clear()

    def sign(self, subject: str, access: list[dict[str, object]]) -> str:
        """A JWT the registry accepts, granting `access`."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self._kid}
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + self.expires_in,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, object]]:
        access: list[dict[str, object]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            if user is not None:
                granted = wanted
            elif self.anonymous_pull:
                granted = [a for a in wanted if a == "pull"]
            else:
                granted = []
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet in test output
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/token":
                    self._reply(404, {"error": "not found"})
                    return
                query = parse_qs(parts.query)
                scopes = [s for value in query.get("scope", []) for s in value.split()]
                user: str | None = None
                header = self.headers.get("Authorization", "")
                if header.lower().startswith("basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if server.users.get(name) != password:
                        with server._lock:
                            server.requests.append((name, scopes))
                        self._reply(401, {"details": "wrong user name or password"})
                        return
                    user = name
                with server._lock:
                    server.requests.append((user, scopes))
                    server.issued += 1
                token = server.sign(user or "", server._grant(user, scopes))
                issued_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._reply(200, {"token": token, "access_token": token, "expires_in": server.expires_in,
                                  "issued_at": issued_at})

            def _reply(self, status: int, document: dict[str, object]) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
