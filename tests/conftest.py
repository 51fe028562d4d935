"""Shared fixtures of all test suites. Fixtures live in tests/support/; import them here."""

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.support.cluster import cluster, dfget
from tests.support.fixtures import (
    auth_registry,
    registry,
    registry_factory,
    registry_relay,
    relay_factory,
    token_registry,
)

# In CI the property tests draw the same examples every run (derandomize): a run fails because the
# code changed, never because a new random draw found an old bug. Locally they keep exploring;
# what they find is replayed from .hypothesis/ and belongs in a regression test.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

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
