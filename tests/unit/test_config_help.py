"""What a user reads: ``--help`` of every component, ``damselfly --version``, config errors (issue 13, item 10)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import (
    DfdaemonConfig,
    LoggingConfig,
    SchedulerConfig,
    add_config_arguments,
    format_duration,
    load_config,
)
from common.errors import ConfigError
from common.units import parse_duration

ROOT = Path(__file__).resolve().parents[2]


def help_text(cls: type[LoggingConfig]) -> str:
    parser = argparse.ArgumentParser(prog="damselfly x")
    add_config_arguments(parser, cls)
    return parser.format_help()


@pytest.mark.parametrize("cls", [SchedulerConfig, DfdaemonConfig])
def test_defaults_read_as_a_user_writes_them(cls: type[LoggingConfig]) -> None:
    text = " ".join(help_text(cls).split())  # argparse wraps lines anywhere
    assert not re.search(r"default: [\d.]+\.0\)", text), "a duration shown as raw seconds"
    assert "('" not in text and "()" not in text and "default: ''" not in text, "a default in Python syntax"
    assert "default: True" not in text and "default: False" not in text


def test_scheduler_help_shows_durations_lists_and_both_forms_of_switches() -> None:
    text = " ".join(help_text(SchedulerConfig).split())
    assert "--task-ttl DURATION forget a task this long after its last activity (default: 24h)" in text
    assert "(default: 500ms)" in text  # retry_interval
    assert "--listen HOST:PORT" in text
    assert "--no-tls-client-auth the opposite of --tls-client-auth" in text
    assert "--seed-peer HOST:PORT dfdaemon gRPC address HOST:PORT of a seed peer (default: none)" in text


def test_dfdaemon_help_shows_lists_without_python_syntax() -> None:
    text = " ".join(help_text(DfdaemonConfig).split())
    assert "(default: 127.0.0.1:8002)" in text  # scheduler, a tuple
    assert "(default: blobs/sha256.*)" in text  # proxy_rule
    assert "--seed " in text and "--no-seed" in text
    assert "(default: 0)" in text  # cache_quota, a size


@pytest.mark.parametrize(("seconds", "written"), [
    (86400.0, "24h"), (3600.0, "1h"), (300.0, "5m"), (90.0, "90s"), (30.0, "30s"), (0.5, "500ms"),
    (1.5, "1.5s"), (0.0, "0s"), (7200.0, "2h"),
])
def test_format_duration_reads_back(seconds: float, written: str) -> None:
    assert format_duration(seconds) == written
    assert parse_duration(written) == seconds


def test_a_missing_config_file_names_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as raised:
        load_config(SchedulerConfig, missing)
    assert str(raised.value) == f"--config: cannot read {missing}: No such file or directory"


@pytest.mark.parametrize("argv", [["--version"], ["-V"], ["scheduler", "--version"], ["dfdaemon", "-V"]])
def test_version(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "common.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"damselfly \d+\.\d+\.\d+\S*\n", result.stdout)
