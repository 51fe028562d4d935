"""Run a set of tests N times and print how often each one passed: flakiness measured, not guessed.

Used by ``scripts/test.sh --repeat N``. Every run is a fresh pytest process (fresh ports, temp
directories and daemons) writing a JUnit XML report; the table at the end counts, per test, the
runs it passed, failed (or errored) and was skipped in. Exits 1 when any test failed in any run.
A test is never retried inside a run: a failure here is a failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

DEFAULT_TARGETS = ["tests/integration"]


def outcomes(report: Path) -> dict[str, str]:
    """{test id: passed | failed | skipped} from one JUnit XML report."""
    results: dict[str, str] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            results[name] = "failed"
        elif case.find("skipped") is not None:
            results[name] = "skipped"
        else:
            results[name] = "passed"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, help="how many times to run the tests")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help=f"targets and options for pytest (default: {' '.join(DEFAULT_TARGETS)})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"runs must be at least 1, got {args.runs}")
    pytest_args = args.pytest_args or DEFAULT_TARGETS
    passed: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="damselfly-repeat-") as scratch:
        for run in range(1, args.runs + 1):
            report = Path(scratch) / f"run-{run}.xml"
            started = time.monotonic()
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    f"--junitxml={report}", *pytest_args])
            if not report.exists():
                print(f"run {run}: pytest exited with {code} and wrote no report", file=sys.stderr)
                return 1
            results = outcomes(report)
            for name, outcome in results.items():
                {"passed": passed, "failed": failed, "skipped": skipped}[outcome][name] += 1
            bad = sum(1 for outcome in results.values() if outcome == "failed")
            print(f"== run {run}/{args.runs}: {len(results)} tests, {bad} failed, "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    names = sorted(set(passed) | set(failed) | set(skipped))
    width = max((len(name) for name in names), default=4)
    print(f"\n{'test':<{width}}  passed  failed  skipped")
    for name in names:
        print(f"{name:<{width}}  {passed[name]:>6}  {failed[name]:>6}  {skipped[name]:>7}")
    flaky = [name for name in names if failed[name]]
    print(f"\n{len(names)} tests x {args.runs} runs: "
          + (f"{len(flaky)} failed at least once" if flaky else "every run passed"))
    return 1 if flaky else 0


if __name__ == "__main__":
    sys.exit(main())
