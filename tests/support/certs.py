"""Throwaway certificate authorities for tests, on ``trustme``: the one place tests make X.509.

``TestCA(dir, "name").issue("node")`` writes ``node.crt`` and ``node.key`` signed by the CA, for
server and client use, with IP SAN 127.0.0.1 and DNS SANs ``localhost`` and ``node``;
``ca.cert_path`` and ``ca.key_path`` are the CA's own certificate and key, and its name is the
organization (O) of its subject. Keys are EC P-256 unless asked for RSA: fast to generate, so
every test can have its own CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Issued:
    """Paths of one issued certificate and its key."""

    cert: Path
    key: Path


def _write_key(pem: bytes, path: Path) -> None:
    path.write_bytes(pem)
    path.chmod(0o600)


class TestCA:
    """A self-signed CA that issues node certificates into a directory."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: Path, name: str = "damselfly-test-ca", *,
                 key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = name
        self._ca = trustme.CA(organization_name=name, key_type=key_type)
        self.cert_path = directory / "ca.crt"
        self._ca.cert_pem.write_to_path(self.cert_path)
        self.key_path = directory / "ca.key"
        _write_key(self._ca.private_key_pem.bytes(), self.key_path)

    def issue(self, name: str, *, ips: tuple[str, ...] = ("127.0.0.1",),
              dns: tuple[str, ...] = ("localhost",), common_name: str | None = None) -> Issued:
        """A certificate for `name` (a DNS SAN, and its common name unless `common_name` is given:
        an identity of :mod:`common.identity` such as ``seed.damselfly``) with the given SANs besides."""
        identities = dict.fromkeys((*ips, *dns, name))  # in order, without repeats
        leaf = self._ca.issue_cert(*identities, common_name=common_name or name)
        issued = Issued(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        leaf.cert_chain_pems[0].write_to_path(issued.cert)
        _write_key(leaf.private_key_pem.bytes(), issued.key)
        return issued
