"""The seed profile: one host-type enum, one place for what a seed gets by default."""

from __future__ import annotations

import pytest

from common import ids
from common.config import DfdaemonConfig
from common.hosts import DEFAULT_NORMAL_UPLOAD_SLOTS, DEFAULT_SEED_UPLOAD_SLOTS, HostType, announced_type
from scheduler.resource import Host, HostInfo


@pytest.mark.parametrize(("value", "expected", "is_seed"), [
    (0, HostType.NORMAL, False), (1, HostType.SUPER_SEED, True), (2, HostType.STRONG_SEED, True),
    (3, HostType.WEAK_SEED, True), (9, HostType.SUPER_SEED, True),
])
def test_announced_numbers_map_to_one_enum(value: int, expected: HostType, is_seed: bool) -> None:
    assert HostType.of(value) is expected
    assert HostType.of(value).is_seed is is_seed
    assert HostInfo(id="h", ip="10.0.0.1", type=value).is_seed is is_seed


@pytest.mark.parametrize(("seed", "slots", "suffix", "host_type"), [
    (False, DEFAULT_NORMAL_UPLOAD_SLOTS, "", HostType.NORMAL),
    (True, DEFAULT_SEED_UPLOAD_SLOTS, "-seed", HostType.SUPER_SEED),
])
def test_the_daemon_and_the_scheduler_agree_on_the_profile(
    seed: bool, slots: int, suffix: str, host_type: HostType
) -> None:
    config = DfdaemonConfig(seed=seed, scheduler=("127.0.0.1:8002",))
    assert config.effective_upload_slots == slots
    assert ids.host_id("10.0.0.1", "node", seed=seed) == "10.0.0.1-node" + suffix
    assert announced_type(seed) is host_type
    # a host that announces no upload capacity gets the same default in the scheduler
    assert Host(HostInfo(id="h", ip="10.0.0.1", type=announced_type(seed)), 0.0).upload_limit == slots
