"""Pytest fixtures for a real registry and a byte-counting relay (imported by tests/conftest.py).

- ``registry``: a session-wide ``docker-registry`` without auth. Tests share it, so push to a
  repository named after the test (or use distinct seeds); blobs are content-addressed anyway.
- ``auth_registry``: the same behind htpasswd Basic auth; ``auth_registry.credentials`` is
  ``(user, password)``.
- ``token_registry``: behind token (Bearer) auth; ``token_registry.token_server`` is the
  :class:`~tests.support.token_auth.TokenServer` (users as ``credentials``, no anonymous pull).
- ``registry_factory``: ``registry_factory(users=..., token_server=...)`` starts a private one
  for this test, stopped at its end (for tests that stop it, fill it, or need a clean one).
- ``relay_factory``: ``relay_factory(port, host="127.0.0.1", cut_after=None)`` starts a
  :class:`~tests.support.relay.ByteCountingRelay`, closed at the end of the test.
- ``registry_relay``: a relay in front of ``registry``, fresh for each test.

Example::

    def test_one_copy(registry, registry_relay):
        digest, path = push_random_blob(registry, "demo/one-copy", 32 << 20, seed=7)
        url = f"{registry_relay.url}/v2/demo/one-copy/blobs/{digest}"
        ...  # pull it through the system under test
        assert registry_relay.bytes_from_target < path.stat().st_size + 64 * 1024
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.registry import Registry, start_registry
from tests.support.relay import ByteCountingRelay
from tests.support.token_auth import TokenServer

TEST_USER = ("damselfly", "s3cret-pass")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(tmp_path_factory.mktemp("auth-registry"), users=dict([TEST_USER]))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    workdir = tmp_path_factory.mktemp("token-registry")
    with TokenServer(workdir / "token", dict([TEST_USER])) as tokens:
        started = start_registry(workdir / "registry", token_server=tokens)
        started.users = dict([TEST_USER])  # push helpers authenticate at the token server with these
        yield started
        started.stop()


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    started: list[Registry] = []

    def start(**kwargs: object) -> Registry:
        one = start_registry(tmp_path / f"registry-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(one)
        return one

    yield start
    for one in started:
        one.stop()


@pytest.fixture
def relay_factory() -> Iterator[Callable[..., ByteCountingRelay]]:
    relays: list[ByteCountingRelay] = []

    def start(port: int, host: str = "127.0.0.1", cut_after: int | None = None) -> ByteCountingRelay:
        relay = ByteCountingRelay(host, port, cut_after=cut_after).start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.close()


@pytest.fixture
def registry_relay(registry: Registry) -> Iterator[ByteCountingRelay]:
    with ByteCountingRelay("127.0.0.1", registry.port) as relay:
        yield relay
