"""Shared fixtures of all test suites. Fixtures live in tests/support/; import them here."""

from tests.support.fixtures import (
    auth_registry,
    registry,
    registry_factory,
    registry_relay,
    relay_factory,
    token_registry,
)

__all__ = [
    "auth_registry",
    "registry",
    "registry_factory",
    "registry_relay",
    "relay_factory",
    "token_registry",
]
