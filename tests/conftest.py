"""Shared fixtures of all test suites. Fixtures live in tests/support/; import them here."""

from collections.abc import Iterator

import pytest

from tests.support.cluster import cluster, dfget
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
    "cluster",
    "dfget",
    "registry",
    "registry_factory",
    "registry_relay",
    "relay_factory",
    "token_registry",
]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
